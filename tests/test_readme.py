"""Every ``python`` code block of README.md runs, and the quick start is intact."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_leaks")]


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs(code):
    exec(compile(code, "README.md block", "exec"), {"__name__": "__readme__"})


def test_quick_start_has_exactly_two_commands():
    text = README.read_text()
    start = text.index("## Quick start")
    section = text[start:text.index("\n## ", start + 1)]
    commands = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert len(commands) == 2
    assert "python -m dask_sharedmem" in commands[0]
    assert '".[test]"' in commands[1] and "pytest" in commands[1]
