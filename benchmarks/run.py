"""The dask_sharedmem benchmark suite: every workload against every peer, in one run.

Usage::

    python benchmarks/run.py [--quick] [--workers N] [--json PATH] [--plot PATH]
                             [--only WORKLOAD|GROUP ...] [--repeats N] [--timeout S]

Prints the machine, then one markdown table per workload (stdout; progress
goes to stderr), then the design targets with the measured figures.
``--json`` writes every raw timing; ``--plot`` draws them (PNG, needs
matplotlib).  The workloads live in bench_scheduler.py, bench_scaling.py,
bench_mapreduce.py, bench_startup.py and bench_clients.py; the machinery in
harness.py; see README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time

# Only the standard library at module level: dask's processes scheduler
# spawns workers that import this file again as __mp_main__.
HERE = os.path.dirname(os.path.abspath(__file__))
GROUPS = {"scheduler": "dask schedulers", "mapreduce": "MapReduce", "clients": "dask's clients"}


def _load() -> None:
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import bench_clients  # noqa: F401
    import bench_mapreduce  # noqa: F401
    import bench_ray  # noqa: F401  (adds Ray rows to bench_scheduler's workloads)
    import bench_scaling  # noqa: F401
    import bench_scheduler  # noqa: F401
    import bench_startup  # noqa: F401  (each registers its workloads)


def parse_args(argv: list[str] | None = None):
    from harness import WORKLOADS, Config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="small sizes (32 MB arrays, 200 tasks, 1,000 items, 0.5 MB of "
                        "text, 100,000 rows, a 0.1 GB caller), 2 runs: a smoke run of "
                        "every workload and peer in a few minutes")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="workers per pool (default: the CPUs this process may use, "
                        "%(default)s here)")
    p.add_argument("--json", metavar="PATH", help="write every raw timing to PATH")
    p.add_argument("--plot", metavar="PATH", help="draw the results into PATH (PNG)")
    p.add_argument("--only", metavar="NAME", action="append",
                   choices=list(WORKLOADS) + list(GROUPS),
                   help="run only this workload, or group (scheduler, mapreduce, clients); "
                        "repeatable. Workloads: " + ", ".join(
                            sorted(WORKLOADS, key=lambda n: WORKLOADS[n].label)))
    p.add_argument("--repeats", type=int, help="timed runs per peer (default 5, quick 2)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds before one call of a peer counts as failed (default 300)")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be at least 1")
    only = []
    for name in args.only or list(WORKLOADS):
        names = ([w.name for w in WORKLOADS.values() if w.group == GROUPS[name]]
                 if name in GROUPS else [name])
        only += [n for n in names if n not in only]
    only.sort(key=lambda n: WORKLOADS[n].label)
    repeats = args.repeats or (2 if args.quick else 5)
    cfg = Config(workers=args.workers, quick=args.quick, repeats=repeats, warmup=1,
                 timeout=args.timeout, budget=2.0 if args.quick else 60.0,
                 min_runs=min(repeats, 3), only=only,
                 json=args.json, plot=args.plot)
    if args.quick:
        cfg.array_bytes = 32 * 2**20
        cfg.tasks = 200
        cfg.overhead_items = 1_000
        cfg.text_bytes = 2**19
        cfg.frame_rows = 100_000
    return cfg


# --------------------------------------------------------------------------
# The design targets, checked against this run's figures
# --------------------------------------------------------------------------


def _value(reports: dict, workload: str, peer: str, column: str | None = None):
    r = reports.get(workload)
    if r is None:
        return None
    s = r["results"].get(peer, {})
    if "error" in s:
        return None
    if column is None:
        return s.get("median")
    return r["derived"].get(peer, {}).get(column)


def targets(reports: dict, cfg) -> list[dict]:
    """Each design target: what was measured, and whether it was met."""
    from bench_mapreduce import LIMIT
    from bench_scaling import ROWS
    from bench_scheduler import PROCESSES, SHAREDMEM, THREADS

    out = []

    def target(what: str, measured: str, met: bool | None) -> None:
        out.append({"target": what, "measured": measured, "met": met})

    us = "µs/task (median)"
    for name, kind in (("tasks", "independent, `dask.compute`"), ("chain", "chain"),
                       ("graph", "raw graph")):
        a, b = _value(reports, name, SHAREDMEM, us), _value(reports, name, THREADS, us)
        if a is not None and b is not None:
            target(f"per-task overhead ({kind}): dask_sharedmem.get <= dask threads",
                   f"{a:.0f} vs {b:.0f} µs/task ({b / a:.2f}x)", a <= b)
    sp = _value(reports, "gil", SHAREDMEM, "speed-up vs sync")
    if sp is not None:
        target(f"GIL-bound tasks: >= 1.8x over sync ({cfg.workers} workers)",
               f"{sp:.2f}x", sp >= 1.8 if cfg.workers == 2 else None)
    row = f"{SHAREDMEM}, 2 workers"
    sp2 = _value(reports, "scaling", row, "speed-up vs serial")
    if sp2 is not None and row in ROWS:
        target("GIL-bound tasks, scaling: dask_sharedmem.get >= 1.8x over serial with 2 "
               "workers", f"{sp2:.2f}x", sp2 >= 1.8)
    for name in ("compute", "store"):
        what = "`(da.sqrt(x) + 1).compute()`" if name == "compute" else "`da.store`"
        vp = _value(reports, name, SHAREDMEM, "speed-up vs processes")
        if vp is not None:
            target(f"{what}: >= 5x faster than processes", f"{vp:.2f}x", vp >= 5)
        elif reports.get(name) and "error" in reports[name]["results"].get(PROCESSES, {}):
            target(f"{what}: >= 5x faster than processes", "processes: n/a", None)
        vt = _value(reports, name, SHAREDMEM, "speed-up vs threads")
        if vt is not None:
            target(f"{what}: no slower than threads", f"{vt:.2f}x threads' speed", vt >= 1)
        rss = _value(reports, name, SHAREDMEM, "peak RSS / output")
        if rss is not None:
            target(f"{what}: parent's peak RSS <= 1.25x the output", f"{rss:.2f}x", rss <= 1.25)
    for which in ("first call, fresh process", "repeated call"):
        ms = _value(reports, "startup", f"{SHAREDMEM}: {which}", "ms (median)")
        if ms is not None:
            target(f"one-task graph, {which}: < 10 ms", f"{ms:.2f} ms", ms < 10)
    ratio = _value(reports, "small", SHAREDMEM, "x threads' time")
    if ratio is not None:
        target(f"{cfg.small_bytes / 2**20:.0f} MB compute, `(x + 1).sum()`: "
               "dask_sharedmem.get at most 2x threads' time",
               f"{ratio:.2f}x threads' time", ratio <= 2)
    a = _value(reports, "mapreduce-overhead", "dask_sharedmem.MapReduce", "µs/item (median)")
    b = _value(reports, "mapreduce-overhead", "multiprocessing.Pool (fork, default chunksize)",
               "µs/item (median)")
    if a is not None and b is not None:
        target("MapReduce per-item overhead <= multiprocessing.Pool, default chunksize",
               f"{a:.1f} vs {b:.1f} µs/item", a <= b)
    r = _value(reports, "mapreduce-results", "dask_sharedmem.MapReduce",
               "vs ThreadPoolExecutor")
    if r is not None:
        target("MapReduce returning large arrays: <= 1.2x ThreadPoolExecutor.map",
               f"{r:.2f}x", r <= 1.2)
    sp = _value(reports, "mapreduce-gil", "dask_sharedmem.MapReduce", "speed-up vs serial")
    if sp is not None:
        limit = _value(reports, "mapreduce-gil", LIMIT, "speed-up vs serial")
        target(f"MapReduce GIL-bound: >= 1.8x over serial ({cfg.workers} workers)",
               f"{sp:.2f}x" + (f" (the limit: {limit:.2f}x)" if limit is not None else ""),
               sp >= 1.8 if cfg.workers == 2 else None)
    return out


def targets_table(rows: list[dict]) -> str:
    lines = ["| target | measured | met |", "|---|---:|:---:|"]
    for r in rows:
        met = {True: "yes", False: "**no**", None: "n/a"}[r["met"]]
        lines.append(f"| {r['target']} | {r['measured']} | {met} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    _load()
    import bench_ray
    import harness
    from harness import CLUSTER, WORKLOADS

    cfg = parse_args(argv)
    m = harness.machine()
    print(harness.machine_line(m))
    print(f"\nEach timing: median of {cfg.repeats} runs after {cfg.warmup} warm-up "
          "(peers alternate round-robin), min and max alongside; peers slower than "
          f"{cfg.budget:g} s in all stop after {cfg.min_runs} runs; "
          f"{cfg.workers} workers; {'--quick' if cfg.quick else 'full'} run.", flush=True)
    skipped = bench_ray.skipped(cfg.only)
    if skipped:
        print(f"\n{skipped}", flush=True)
    t0 = time.perf_counter()
    reports: dict[str, dict] = {}
    group = None
    try:
        for i, name in enumerate(cfg.only):
            w = WORKLOADS[name]
            if w.group != group:
                group = w.group
                print(f"\n## {group}", flush=True)
            started, ray_started = CLUSTER.startup, bench_ray.DRIVER.startup
            report = harness.run_workload(w, cfg)
            reports[name] = report
            print(f"\n### {report['label']}. {report['title']}\n\n{report['table']}\n\n"
                  f"{harness.contention(report, m['usable_cpus'])}", flush=True)
            if started is None and CLUSTER.startup is not None:
                print(f"\nThe distributed rows use one `LocalCluster(n_workers={cfg.workers}, "
                      "threads_per_worker=1, processes=True)`, run in a helper process, and "
                      "a `Client` to it in this one, started before their first call, "
                      f"outside the timings, in {CLUSTER.startup:.2f} s.", flush=True)
            if ray_started is None and bench_ray.DRIVER.startup is not None:
                print(f"\n{bench_ray.startup_line(cfg)}", flush=True)
            if not any(WORKLOADS[n].needs_cluster for n in cfg.only[i + 1:]):
                CLUSTER.close()
            if not bench_ray.needed(cfg.only[i + 1:]):
                bench_ray.DRIVER.close()
    finally:
        CLUSTER.close()
        bench_ray.DRIVER.close()
        with contextlib.suppress(Exception):
            from bench_mapreduce import loky_shutdown

            loky_shutdown()
    total = time.perf_counter() - t0
    goals = targets(reports, cfg)
    if goals:
        print(f"\n## Targets (from DESIGN.md), this run\n\n{targets_table(goals)}")
    print(f"\nTotal benchmark time: {total:.0f} s", flush=True)
    doc = {"machine": m, "config": dataclasses.asdict(cfg),
           "cluster_startup_seconds": CLUSTER.startup,
           "ray_init_seconds": bench_ray.DRIVER.init,
           "ray_startup_seconds": bench_ray.DRIVER.startup, "total_seconds": total,
           "workloads": list(reports.values()), "targets": goals}
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"Timings written to {cfg.json}", file=sys.stderr)
    if cfg.plot:
        import plot

        print(plot.plot(doc, cfg.plot), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
