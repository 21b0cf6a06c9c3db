"""Start-up by caller size: what a call costs when the caller holds a lot of memory.

Registered with the suite as ``startup-scaling``.  Every fork copies the page
tables of its parent, so a caller that holds gigabytes of private memory
forks its workers slower than the benchmark's own small process (workload 4
measures that one).  Each row is a caller size and a worker count; each run
of a row is a fresh process (``_caller_startup.py``) that fills ``np.ones`` of
that size, then times a one-task graph through ``dask_sharedmem.get`` (its
first call, then repeated calls), a 100-item ``MapReduce.map``, and dask's
threaded scheduler on the same one-task graph, which forks nothing (the
reference).  A fresh process per run keeps memory from one size out of the
next and makes every first call a real one.

numpy asks for transparent huge pages for large arrays, and a fork copies
one page-table entry per 2 MiB of those but one per 4 KiB of ordinary
pages; the last caller holds its gigabyte in 4 KiB pages, as a caller does
when the kernel's huge pages are off or its data is in many small objects.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from typing import Any

from harness import Column, Config, NotApplicable, Plot, Run, Runner, Timed, Workload, workload

GROUP = "Start-up by caller size"
_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_caller_startup.py")
#: (gigabytes held, in 4 KiB pages rather than numpy's huge pages)
CALLERS = [(0.1, False), (1, False), (4, False), (1, True)]
WORKERS = [1, 2, 8, 32]  # more workers than cores is intended: forks are what is timed
QUICK_CALLERS = [(0.1, False)]
QUICK_WORKERS = [1, 2, 8]


def row_label(gb: float, small_pages: bool, workers: int) -> str:
    """
    >>> row_label(0.1, False, 1), row_label(1, True, 32)
    ('0.1 GB caller, 1 worker', '1 GB caller in 4 KiB pages, 32 workers')
    """
    pages = " in 4 KiB pages" if small_pages else ""
    return f"{gb:g} GB caller{pages}, {workers} worker{'s' if workers > 1 else ''}"


def available_bytes() -> int | None:
    """Memory the kernel can give without swapping (MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def skip_reason(gb: float, available: int | None) -> str | None:
    """Why a caller of ``gb`` GB is not run: it needs twice its size free.

    >>> skip_reason(4, 6 * 2**30)
    'skipped: a 4 GB caller needs 8 GB of free memory (MemAvailable), this machine has 6.0 GB'
    >>> skip_reason(4, 9 * 2**30) is None
    True
    """
    need = 2 * gb * 2**30
    if available is None or available >= need:
        return None
    return (f"skipped: a {gb:g} GB caller needs {2 * gb:g} GB of free memory (MemAvailable), "
            f"this machine has {available / 2**30:.1f} GB")


def _callers(cfg: Config) -> tuple[list[tuple[float, bool]], list[int]]:
    return (QUICK_CALLERS, QUICK_WORKERS) if cfg.quick else (CALLERS, WORKERS)


def _setup(cfg: Config) -> Any:
    callers, counts = _callers(cfg)
    available = available_bytes()
    return types.SimpleNamespace(callers=callers, counts=counts, available=available,
                                 skipped={gb: skip_reason(gb, available) for gb, _ in callers})


def _run(gb: float, small_pages: bool, workers: int, cfg: Config) -> Timed:
    """One fresh process: its first call as the time, the rest as metrics."""
    args = [str(gb), str(workers), str(cfg.repeats)] + (["4k"] if small_pages else [])
    p = subprocess.run([sys.executable, _SCRIPT, *args],
                       capture_output=True, text=True, timeout=cfg.timeout)
    if p.returncode:
        lines = p.stderr.strip().splitlines() or [f"exit status {p.returncode}"]
        raise RuntimeError(f"the subprocess failed: {lines[-1]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    return Timed(out["first"], out["result"],
                 {k: out[k] for k in ("repeated", "map", "threads", "rss", "huge")})


def _rows(cfg: Config) -> list[Runner]:
    def make(gb, small, workers, ctx, cfg):
        if ctx.skipped[gb]:
            raise NotApplicable(ctx.skipped[gb])
        return Run(lambda: _run(gb, small, workers, cfg), warmup=False)

    callers, counts = _callers(cfg)
    return [Runner(row_label(gb, small, n),
                   lambda ctx, cfg, gb=gb, small=small, n=n: make(gb, small, n, ctx, cfg))
            for gb, small in callers for n in counts]


def _check(ctx: Any, r: Any) -> str | None:
    expected = {"first": 2, "repeated": 2, "map": list(range(1, 101)), "threads": 2}
    wrong = [k for k in expected if r.get(k) != expected[k]]
    return f"wrong {', '.join(wrong)}" if wrong else None


def _median(name: str, header: str, scale: float, fmt: str) -> Column:
    """The median over the processes of what each reported as ``name``."""

    def value(ctx, s, results, peer):
        m = s.get("metrics", {}).get(name)
        return None if m is None else m["median"] * scale

    return Column(header, value, fmt)


def _map_bar(ctx: Any, s: dict, results: dict) -> tuple[float, float, float] | None:
    m = s.get("metrics", {}).get("map")
    return None if m is None else (m["median"] * 1e3, m["min"] * 1e3, m["max"] * 1e3)


def _one_task_text(ctx: Any, s: dict, results: dict) -> str | None:
    m = s.get("metrics", {}).get("repeated")
    return None if m is None else f"one-task {m['median'] * 1e3:.1f} ms"


def _footer(ctx: Any, results: dict) -> str:
    text = ("Each run of a row is a new Python process: it imports dask and "
            "dask_sharedmem, fills `np.ones` of the caller's size, then times the first "
            "`get` (the median, min and max columns, and *one-task first*).  *One-task "
            "repeated*, *map of 100* and *threads one-task* are the medians of "
            "the calls after it in the same process (map and threads after one untimed "
            "call), then the median over the processes.  *Caller RSS* is the process's "
            "resident memory before its first call, and the part of it in transparent "
            "huge pages (numpy advises them for large arrays; the rows *in 4 KiB pages* "
            "hold theirs in a private mapping with `MADV_NOHUGEPAGE`).")
    skipped = sorted({reason for reason in ctx.skipped.values() if reason})
    if skipped:
        text += "  " + "; ".join(s[0].upper() + s[1:] for s in skipped) + "."
    return text


def _sizes_title(ctx: Any) -> str:
    """
    >>> _sizes_title(types.SimpleNamespace(callers=[(0.1, False), (4, False), (1, True)]))
    '0.1, 4 GB; 1 GB in 4 KiB pages'
    """
    big = ", ".join(f"{gb:g}" for gb, small in ctx.callers if not small) + " GB"
    small = [f"{gb:g} GB in 4 KiB pages" for gb, small in ctx.callers if small]
    return "; ".join([big, *small])


workload(Workload(
    name="startup-scaling",
    label="8",
    group=GROUP,
    title=lambda cfg, ctx: (
        "Start-up by caller size: a one-task graph `dask_sharedmem.get({'x': (inc, 1)}, "
        "'x', num_workers=N)` and `MapReduce(np=N).map(inc, range(100))` in a fresh process "
        f"holding touched private memory (`np.ones`: {_sizes_title(ctx)}), "
        f"N = {', '.join(map(str, ctx.counts))} workers; dask threads' "
        "one-task graph beside it (no fork); median, min and max: the first call"),
    setup=_setup,
    check=_check,
    columns=[Column("one-task first (ms)", lambda ctx, s, res, peer: s["median"] * 1e3,
                    "{:.1f}"),
             _median("repeated", "one-task repeated (ms)", 1e3, "{:.1f}"),
             _median("map", "map of 100 (ms)", 1e3, "{:.1f}"),
             _median("threads", "threads one-task (ms)", 1e3, "{:.1f}"),
             _median("rss", "caller RSS (MB)", 2**-20, "{:.0f}"),
             _median("huge", "of it in huge pages (MB)", 2**-20, "{:.0f}")],
    plot=Plot("map of 100 items, ms (log)", value=_map_bar, log=True,
              annotate=_one_task_text),
    footer=_footer,
    rows=_rows,
))
