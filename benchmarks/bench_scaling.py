"""Scaling: the GIL-bound workload on 1, 2, 4, ... workers, up to the usable CPUs.

Registered with the suite as ``scaling``.  Parallel efficiency = speed-up
over the serial loop / workers: 1.0 is perfect, 1/workers is no speed-up.
"""

from __future__ import annotations

import os
from typing import Any

import _work
from bench_mapreduce import mapreduce_sum, mp_pool, shared_check, shared_teardown, shared_title
from bench_scheduler import GROUP, PROCESSES, SHAREDMEM, THREADS, gil_call, gil_setup
from harness import Column, Plot, Runner, Workload, runner, workload


def worker_counts(cpus: int | None = None) -> list[int]:
    """1, 2, 4, ... below ``cpus``, then ``cpus`` (default: the CPUs we may use).

    >>> worker_counts(6)
    [1, 2, 4, 6]
    """
    cpus = cpus or len(os.sched_getaffinity(0))
    counts = [1]
    while counts[-1] * 2 < cpus:
        counts.append(counts[-1] * 2)
    if cpus > 1:
        counts.append(cpus)
    return counts


COUNTS = worker_counts()
SERIAL = "serial for loop (1 process)"
MAPREDUCE = "dask_sharedmem.MapReduce"
POOL = "multiprocessing.Pool (fork, chunksize=1)"
#: peer -> (how it is set up, make(ctx, cfg, workers))
PEERS: dict[str, tuple[str, Any]] = {
    MAPREDUCE: ("closure over the shared array",
                lambda ctx, cfg, w: mapreduce_sum(ctx, w)),
    SHAREDMEM: ("`dask.compute(x.map_blocks(...), scheduler=dask_sharedmem.get)` on the "
                "shared array", lambda ctx, cfg, w: gil_call(ctx, "sharedmem", cfg, w)),
    POOL: ("chunk index; array is a fork-inherited global",
           lambda ctx, cfg, w: lambda: sum(mp_pool(w, _work.chunk_sum, range(ctx.chunks), 1))),
    PROCESSES: ("`dask.compute(x.map_blocks(...), scheduler='processes')` on a plain copy "
                "(chunks embedded in the graph)",
                lambda ctx, cfg, w: gil_call(ctx, "processes", cfg, w)),
    THREADS: ("`dask.compute(x.map_blocks(...), scheduler='threads')`: the GIL lets one "
              "thread run Python at a time", lambda ctx, cfg, w: gil_call(ctx, "threads", cfg, w)),
}
#: row label -> (peer, workers)
ROWS = {f"{peer}, {w} worker{'s' if w > 1 else ''}": (peer, w)
        for peer in PEERS for w in COUNTS}


def _speedup(ctx, s, results, row):
    base = results.get(SERIAL)
    return None if not base or "median" not in base else base["median"] / s["median"]


def _efficiency(ctx, s, results, row):
    sp = _speedup(ctx, s, results, row)
    return None if sp is None or row not in ROWS else sp / ROWS[row][1]


def _series(ctx: Any, results: dict) -> dict:
    """peer -> [(workers, efficiency median, low, high)] for plot.py."""
    base = results.get(SERIAL, {}).get("median")
    out: dict = {}
    if base is None:
        return out
    for row, (peer, w) in ROWS.items():
        s = results.get(row, {})
        if "median" in s:
            out.setdefault(peer, []).append(
                [w, base / s["median"] / w, base / s["max"] / w, base / s["min"] / w])
    return out


def _footer(ctx: Any, results: dict) -> str:
    """The efficiencies again, one row per peer and one column per worker count."""
    series = _series(ctx, results)
    head = "| parallel efficiency | " + " | ".join(
        f"{w} worker{'s' if w > 1 else ''}" for w in COUNTS) + " |"
    lines = [head, "|---|" + "---:|" * len(COUNTS)]
    for peer in PEERS:
        got = {w: e for w, e, _, _ in series.get(peer, [])}
        lines.append(f"| {peer} | " + " | ".join(
            f"{got[w]:.2f}" if w in got else "n/a" for w in COUNTS) + " |")
    return "\n".join(lines)


workload(Workload(
    name="scaling",
    label="5",
    group=GROUP,
    title=lambda cfg, ctx: (
        f"Scaling: the GIL-bound work of workloads 2 and 7 ({shared_title(ctx)}) on "
        f"{', '.join(map(str, COUNTS))} workers; parallel efficiency = speed-up over the "
        "serial loop / workers"),
    setup=gil_setup,
    check=shared_check,
    columns=[Column("speed-up vs serial", _speedup, "{:.2f}x"),
             Column("parallel efficiency", _efficiency, "{:.2f}")],
    plot=Plot("workers", series=_series, kind="lines", ref=1.0),
    teardown=shared_teardown,
    footer=_footer,
))


@runner("scaling", SERIAL)
def _serial(ctx, cfg):
    return lambda: sum(_work.chunk_sum(i) for i in range(ctx.chunks))


def _register() -> None:
    from harness import RUNNERS

    for row, (peer, w) in ROWS.items():
        note, make = PEERS[peer]
        RUNNERS["scaling"].append(Runner(
            row, lambda ctx, cfg, make=make, w=w: make(ctx, cfg, w), note))


_register()
