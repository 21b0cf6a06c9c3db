"""The version matrix of CI, after the README's test command (see .ci/run).

Each row is a fresh virtual environment with what a user would install, and
the smoke tests (shared arrays, pool, MapReduce, scheduler, warnings,
docstrings, bad input) run in it:

* the newest dask that a plain ``pip install .`` picks, without distributed,
  as most users install it;
* the oldest dask and numpy that pyproject.toml admits;
* each other Python >= 3.10 found on the machine (pyenv's, or on PATH),
  with a plain ``pip install .``; an absent one is a printed line;
* the fallback transport forced (``sharedmem.transport: shm``, as where the
  kernel refuses ``process_vm_readv``): the pool, MapReduce, scheduler and
  fault tests.

At the end it prints the table of every run, the README's full run first,
and exits 1 if any run failed.

    python3 .ci/matrix.py --full-log LOG --full-status N --full-python PY
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["tests/test_memory.py", "tests/test_pool.py", "tests/test_mapreduce.py",
         "tests/test_scheduler.py", "tests/test_warnings.py", "tests/test_doctests.py",
         "tests/test_bad_input.py", "tests/test_packaging.py"]
# the smoke rows of the newest dask and of the other Pythons leave out ~50 runs of a
# fresh interpreter (45 s a row); the full row and the oldest numpy's row run them
QUICK = ["-k", "not unrelated_process"]
SHM_TESTS = ["tests/test_pool.py", "tests/test_mapreduce.py", "tests/test_scheduler.py",
             "tests/test_faults.py"]
PYTHONS = ["3.10", "3.11", "3.12", "3.13", "3.14"]
VERSIONS = ("import sys, importlib.metadata as m\n"
            "def v(name):\n"
            "    try:\n"
            "        return m.version(name)\n"
            "    except m.PackageNotFoundError:\n"
            "        return '-'\n"
            "print(sys.version.split()[0], v('dask'), v('distributed'), v('numpy'))\n")


def floors() -> dict[str, str]:
    """The lower bounds of the run-time dependencies in pyproject.toml."""
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        text = f.read()
    deps = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, re.M | re.S).group(1)
    return dict(re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9.]+)"', deps))


def find_python(minor: str) -> str | None:
    """An interpreter of Python ``minor`` (e.g. "3.12"): pyenv's, else on PATH."""
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    found = sorted(glob.glob(os.path.join(root, "versions", f"{minor}.*", "bin", f"python{minor}")))
    if found:
        return found[-1]
    exe = shutil.which(f"python{minor}")
    if exe and subprocess.run([exe, "-c", "pass"], capture_output=True).returncode == 0:
        return exe
    return None


def summary(text: str) -> dict[str, int]:
    """pytest's counts from its last line: passed, failed, skipped, errors."""
    lines = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?)", lines[-1] if lines else ""):
        counts["errors" if what.startswith("error") else what] += int(n)
    return counts


def versions(python: str) -> list[str]:
    p = subprocess.run([python, "-c", VERSIONS], capture_output=True, text=True)
    return p.stdout.split() if p.returncode == 0 else ["?"] * 4


def run(cmd: list[str], log, **kw) -> int:
    log.write(f"+ {' '.join(cmd)}\n")
    log.flush()
    return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, **kw).returncode


def smoke(label: str, python: str, installs: list[list[str]], logdir: str,
          tests: list[str] = SMOKE, env: dict | None = None) -> dict:
    """One row: a new venv, the installs, the tests (the smoke tests); its result."""
    row = {"label": label, "versions": ["?"] * 4, "status": "failed"}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dask_sharedmem-ci-") as tmp, \
            open(os.path.join(logdir, re.sub(r"\W+", "-", label) + ".log"), "w+") as log:
        venv = os.path.join(tmp, "venv")
        py = os.path.join(venv, "bin", "python")
        ok = run([python, "-m", "venv", venv], log) == 0
        for args in installs:
            ok = ok and run([py, "-m", "pip", "install", "-q", *args], log, cwd=ROOT) == 0
        if ok:
            row["versions"] = versions(py)
            # bin/pytest, not python -m pytest: the installed copy is tested, not the checkout
            code = run([os.path.join(venv, "bin", "pytest"), "-q", "-p", "no:cacheprovider",
                        *tests], log,
                       cwd=ROOT, env={**os.environ, **(env or {})})
            log.seek(0)
            row.update(summary(log.read()))
            row["status"] = "passed" if code == 0 else "failed"
        else:
            row["status"] = "install failed"
        row["seconds"] = time.perf_counter() - start
        print(f"{label}: {row['status']} ({row['seconds']:.0f} s; log {log.name})", flush=True)
        if row["status"] != "passed":
            log.seek(0)
            print("".join(log.readlines()[-40:]), flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--full-log", required=True)
    parser.add_argument("--full-status", type=int, required=True)
    parser.add_argument("--full-python", required=True)
    parser.add_argument("--full-seconds", type=float, default=0.0)
    args = parser.parse_args()
    logdir = os.path.join(ROOT, ".ci", "logs")
    os.makedirs(logdir, exist_ok=True)

    with open(args.full_log) as f:
        full = {"label": "full suite, README's test command (test extra)",
                "versions": versions(args.full_python), **summary(f.read()),
                "seconds": args.full_seconds,
                "status": "passed" if args.full_status == 0 else "failed"}
    rows = [full]
    main_minor = ".".join(full["versions"][0].split(".")[:2])
    main_python = find_python(main_minor) or sys.executable
    low = floors()
    rows.append(smoke("newest dask, plain pip install . (no distributed)", main_python,
                      [["."], ["pytest", "pytest-timeout"]], logdir, SMOKE + QUICK))
    pins = [f"{name}=={low[name]}.*" if name == "numpy" else f"{name}=={low[name]}"
            for name in ("dask", "numpy", "toolz") if name in low]
    rows.append(smoke(f"oldest admitted: {', '.join(pins)}", main_python,
                      [[".", *pins], ["pytest", "pytest-timeout"]], logdir))
    for minor in PYTHONS:
        if minor == main_minor:
            continue
        python = find_python(minor)
        if python is None:
            print(f"Python {minor}: not found on this machine, its smoke run is skipped")
            rows.append({"label": f"Python {minor}: not found, skipped", "status": "absent",
                         "versions": [minor, "-", "-", "-"]})
            continue
        rows.append(smoke(f"Python {minor}, plain pip install .", python,
                          [["."], ["pytest", "pytest-timeout"]], logdir, SMOKE + QUICK))

    rows.append(smoke("shm transport forced (DASK_SHAREDMEM__TRANSPORT=shm)", main_python,
                      [["."], ["pytest", "pytest-timeout"]], logdir, SHM_TESTS,
                      {"DASK_SHAREDMEM__TRANSPORT": "shm"}))

    print("\nVersion matrix")
    head = ["run", "Python", "dask", "distributed", "numpy", "passed", "failed", "skipped",
            "result", "time"]
    table = [head] + [[r["label"], *r["versions"], *(str(r.get(k, "-")) for k in
                                                    ("passed", "failed", "skipped")),
                       r["status"], f"{r['seconds']:.0f} s" if r.get("seconds") else "-"]
                      for r in rows]
    widths = [max(len(line[k]) for line in table) for k in range(len(head))]
    for k, line in enumerate(table):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |")
        if k == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return 0 if all(r["status"] in ("passed", "absent") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
