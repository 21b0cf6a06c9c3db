"""The code is lint-clean (ruff) and its type hints check (mypy), as CI requires."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(300)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True)


def test_ruff_is_clean():
    pytest.importorskip("ruff")
    r = _run("ruff", "check", "dask_sharedmem", "tests", "benchmarks", ".ci")
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_is_clean():
    pytest.importorskip("mypy")
    r = _run("mypy")
    assert r.returncode == 0, r.stdout + r.stderr
