"""What ``pip install .`` puts on a user's machine works outside this checkout.

The tests import the package from the checkout (pytest runs from its root), so a
module left out of the wheel would pass every other test and break every user:
``transports/`` once was.  Here a process started elsewhere imports the installed
copy and every module of it.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(120)

IMPORT_ALL = """
import importlib, json, pkgutil, dask_sharedmem
names = sorted(m.name for m in pkgutil.walk_packages(dask_sharedmem.__path__, "dask_sharedmem.")
               if not m.name.endswith("__main__"))  # the demo: present, not run here
for name in names:
    importlib.import_module(name)
print(json.dumps({"file": dask_sharedmem.__file__, "modules": names}))
"""


def _modules_in_checkout() -> list[str]:
    pkg = ROOT / "dask_sharedmem"
    names = []
    for path in pkg.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
            if len(parts) == 1:
                continue
        if parts[-1] == "__main__":
            continue
        names.append(".".join(parts))
    return sorted(names)


def test_the_installed_copy_has_every_module(tmp_path):
    r = subprocess.run([sys.executable, "-c", IMPORT_ALL], cwd=tmp_path,
                       capture_output=True, text=True)
    if r.returncode != 0 and "No module named 'dask_sharedmem'" in r.stderr:
        pytest.skip("dask_sharedmem is not installed in this environment (run from the checkout)")
    assert r.returncode == 0, r.stderr[-3000:]
    found = json.loads(r.stdout.strip().splitlines()[-1])
    assert found["modules"] == _modules_in_checkout(), (
        f"the installed copy at {found['file']} differs from the checkout: "
        "is every subpackage in pyproject.toml's [tool.setuptools.packages.find]?")
