"""dask scheduler workloads: dask_sharedmem.get beside dask's own schedulers.

Registered with the suite (``python benchmarks/run.py --only scheduler``):

* ``tasks``, ``chain``, ``graph``: per-task overhead (5,000 tiny tasks through
  ``dask.compute``, a 5,000-task chain, and a raw dict graph handed straight
  to each scheduler's ``get``);
* ``gil``: pure-Python (GIL-bound) tasks over the chunks of a shared array;
* ``compute``, ``store``: large in, large out, with the parent's peak RSS;
* ``startup``: a one-task graph, first call in a fresh process and repeated
  (and repeated with ``sharedmem.inline`` 0, forking every call);
* ``small``: ``(x + 1).sum().compute()`` on a 32 MB array, an interactive-size
  call, as a ratio to threads' time (and with ``sharedmem.inline`` 0).

Every workload runs on the same five peers: dask's ``sync``, ``threads`` and
``processes`` schedulers, a ``distributed.LocalCluster`` with worker
processes (started once, outside the timings), and ``dask_sharedmem.get``.
Workloads 1 to 3 have a sixth where ray is installed, Dask-on-Ray: bench_ray.py
registers it with the calls of ``CALLS``.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import types
import warnings
from typing import Any

import _work
import dask
import dask.array as da
import dask.multiprocessing
import dask.threaded
import numpy as np
from bench_mapreduce import shared_check, shared_setup, shared_teardown, shared_title
from harness import (
    CLUSTER,
    RUNNERS,
    Column,
    Config,
    NotApplicable,
    Plot,
    Run,
    Runner,
    Timed,
    Workload,
    metric,
    peak_rss,
    per_unit,
    speedup,
    speedup_bar,
    stats,
    time_bar,
    workload,
)

import dask_sharedmem

GROUP = "dask schedulers"

# distributed says so for every graph with the chunks of a large plain array in it
warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)

# --------------------------------------------------------------------------
# The peers
# --------------------------------------------------------------------------

#: scheduler key -> row label
SCHEDULERS = {
    "sync": "dask sync",
    "threads": "dask threads",
    "processes": "dask processes",
    "distributed": "distributed LocalCluster",
    "sharedmem": "dask_sharedmem.get",
}
SYNC, THREADS, PROCESSES, DISTRIBUTED, SHAREDMEM = SCHEDULERS.values()
#: scheduler key "ray": ``ray.util.dask.ray_dask_get``, registered by bench_ray.py
#: (workloads 1 to 3, where ray is installed) and timed in a helper process
RAY = "Dask-on-Ray"

#: peers whose workers can read the parent's shared array without a copy
SHARES_MEMORY = {"sync", "threads", "sharedmem"}

_PLAIN_NOTE = "graph on a plain copy of x (see below)"


def _rows(peers: list[str]) -> str:
    """``peers`` as markdown: "`a`, `b` and `c`"."""
    names = [f"`{p}`" for p in peers]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def plain_footer(ctx: Any, results: dict) -> str:
    ray = RAY in results
    text = (f"The {_rows([PROCESSES, DISTRIBUTED] + [RAY] * ray)} rows compute the same "
            "expression built on a plain ndarray copy of x (made untimed, with the graph): "
            "dask slices a plain ndarray into chunks embedded in the graph, so each task "
            "carries only its own chunk.  A graph on the shared array itself keeps the array "
            "as one graph value that every chunk's task depends on, so these schedulers would "
            "pickle the whole array into every task (at 64 MB, 30 to 70 s per call with "
            "`processes`")
    if ray:
        text += (f"; `{RAY}` put the whole array into its object store for every task: "
                 "67 and 77 s per call of workload 3a at 512 MB, spilling tens of GB to disk")
    return text + ")."


def default_note(key: str, cfg: Config) -> str:
    return {
        "sync": "one thread, no pool",
        "threads": f"{cfg.workers} threads",
        "processes": f"a new pool of {cfg.workers} spawned processes (dask's default "
                     "context) per call",
        "distributed": f"{cfg.workers} worker processes, 1 thread each; the cluster runs "
                       "in a helper process, started once outside the timings (start-up: "
                       "workload 4)",
        "sharedmem": f"{cfg.workers} workers forked per call",
        "ray": f"`ray.init(num_cpus={cfg.workers})` once, outside the timings, in a helper "
               "process that is Ray's driver and times its own calls; "
               f"{cfg.workers} threads submit the tasks",
    }[key]


def compute_kwargs(key: str, cfg: Config, workers: int | None = None) -> dict:
    """The keyword arguments of ``dask.compute`` that select scheduler ``key``."""
    workers = workers or cfg.workers
    if key == "sync":
        return {"scheduler": "sync"}
    if key == "distributed":
        return {"scheduler": CLUSTER.get_client(cfg)}
    if key == "sharedmem":
        return {"scheduler": dask_sharedmem.get, "num_workers": workers}
    if key == "ray":
        return {"scheduler": _ray_dask_get(), "num_workers": workers}
    return {"scheduler": key, "num_workers": workers}


def _ray_dask_get() -> Any:
    """Dask-on-Ray's scheduler, imported only in the process that runs it (bench_ray.py).

    Its ``num_workers`` is the number of threads that submit tasks to Ray; Ray
    runs them on the workers of ``ray.init(num_cpus=...)``.
    """
    from ray.util.dask import ray_dask_get

    return ray_dask_get


def raw_get(key: str, cfg: Config) -> Any:
    """Scheduler ``key``'s own ``get(dsk, keys)``."""
    if key == "sync":
        return dask.get
    if key == "distributed":
        return CLUSTER.get_client(cfg).get
    if key == "ray":
        return functools.partial(_ray_dask_get(), num_workers=cfg.workers)
    get = {"threads": dask.threaded.get, "processes": dask.multiprocessing.get,
           "sharedmem": dask_sharedmem.get}[key]
    return functools.partial(get, num_workers=cfg.workers)


_GET_NAMES = {"sync": "dask.get", "threads": "dask.threaded.get",
              "processes": "dask.multiprocessing.get", "distributed": "Client.get",
              "sharedmem": "dask_sharedmem.get", "ray": "ray_dask_get"}

#: workload -> (make, note), each given the scheduler key first: how every
#: scheduler of the workload is called, for peers registered elsewhere (bench_ray.py)
CALLS: dict[str, tuple[Any, Any]] = {}


def each_scheduler(name: str, make: Any, note: Any = None, label: str = "{}") -> None:
    """Register ``make(key, ctx, cfg)`` for every scheduler of workload ``name``.

    ``note(key, cfg)`` gives the row's note (default: how the peer is set up).
    """
    note = note or default_note
    CALLS.setdefault(name, (make, note))
    for key, peer in SCHEDULERS.items():
        RUNNERS.setdefault(name, []).append(Runner(
            label.format(peer), functools.partial(make, key), functools.partial(note, key)))


# --------------------------------------------------------------------------
# 1. Per-task overhead
# --------------------------------------------------------------------------


def _list_check(ctx: Any, result: Any) -> str | None:
    if list(result) != ctx.expected:
        return f"expected {ctx.n} results 1..{ctx.n} in order"
    return None


def _tasks_setup(cfg: Config) -> Any:
    n = cfg.tasks
    return types.SimpleNamespace(n=n, tasks=[dask.delayed(_work.inc)(i) for i in range(n)],
                                 expected=list(range(1, n + 1)))


def _chain_setup(cfg: Config) -> Any:
    c: Any = 0
    for _ in range(cfg.tasks):
        c = dask.delayed(_work.inc)(c)
    return types.SimpleNamespace(n=cfg.tasks, chain=c)


def _graph_setup(cfg: Config) -> Any:
    n = cfg.tasks
    dsk = {("inc", i): (_work.inc, i) for i in range(n)}
    return types.SimpleNamespace(n=n, dsk=dsk, keys=list(dsk),
                                 expected=list(range(1, n + 1)))


def _per_task_columns() -> list[Column]:
    return [per_unit("µs/task (median)", lambda ctx: ctx.n),
            speedup(THREADS, "speed-up vs dask threads")]


def _per_task_plot() -> Plot:
    return Plot("µs per task (log)", value=lambda ctx, s, res: tuple(
        v / ctx.n * 1e6 for v in (s["median"], s["min"], s["max"])), log=True)


workload(Workload(
    name="tasks",
    label="1a",
    group=GROUP,
    title=lambda cfg, ctx: (
        f"Per-task overhead, independent tasks: `dask.compute([delayed(inc)(i) for i in "
        f"range({ctx.n})])`, {cfg.workers} workers (graph handling in `dask.compute` "
        "included: the `dask sync` row is its floor)"),
    setup=_tasks_setup,
    check=_list_check,
    columns=_per_task_columns(),
    plot=_per_task_plot(),
    needs_cluster=True,
))


def _tasks_make(key, ctx, cfg):
    kw = compute_kwargs(key, cfg)
    return lambda: dask.compute(ctx.tasks, **kw)[0]


each_scheduler("tasks", _tasks_make)

workload(Workload(
    name="chain",
    label="1b",
    group=GROUP,
    title=lambda cfg, ctx: (
        f"Per-task overhead, a chain: `c = delayed(inc)(c)` {ctx.n:,} times, "
        f"`dask.compute(c)`, {cfg.workers} workers"),
    setup=_chain_setup,
    check=lambda ctx, r: None if r == ctx.n else f"{r!r}, expected {ctx.n}",
    columns=_per_task_columns(),
    plot=_per_task_plot(),
    needs_cluster=True,
))


def _chain_make(key, ctx, cfg):
    kw = compute_kwargs(key, cfg)
    return lambda: dask.compute(ctx.chain, **kw)[0]


each_scheduler("chain", _chain_make)

workload(Workload(
    name="graph",
    label="1c",
    group=GROUP,
    title=lambda cfg, ctx: (
        f"Per-task overhead, the scheduler alone: a raw dict graph of {ctx.n:,} "
        "independent tasks `{('inc', i): (inc, i)}` handed straight to each scheduler's "
        f"`get`, {cfg.workers} workers"),
    setup=_graph_setup,
    check=_list_check,
    columns=_per_task_columns(),
    plot=_per_task_plot(),
    needs_cluster=True,
))


def _graph_make(key, ctx, cfg):
    get = raw_get(key, cfg)
    return lambda: get(ctx.dsk, ctx.keys)


each_scheduler("graph", _graph_make,
               note=lambda key, cfg: f"`{_GET_NAMES[key]}`; " + default_note(key, cfg))

# --------------------------------------------------------------------------
# 2. GIL-bound tasks over a shared array
# --------------------------------------------------------------------------


def _meta() -> np.ndarray:
    return np.array((), dtype="f8")


def gil_setup(cfg: Config) -> Any:
    """The shared array of ``shared_setup`` and the map_blocks graphs over it."""
    ctx = shared_setup(cfg)
    shared = da.from_array(ctx.array, chunks=ctx.chunk)
    plain = da.from_array(np.asarray(ctx.array), chunks=ctx.chunk)
    ctx.graphs = {
        kind: a.map_blocks(_work.block_sum, ctx.step, chunks=(1,), meta=_meta())
        for kind, a in (("shared", shared), ("plain", plain))}
    return ctx


def graph_for(ctx: Any, key: str) -> Any:
    """The graph on the shared array, or on a plain copy for peers that cannot share it."""
    return ctx.graphs["shared" if key in SHARES_MEMORY else "plain"]


def gil_call(ctx: Any, key: str, cfg: Config, workers: int | None = None) -> Any:
    graph, kw = graph_for(ctx, key), compute_kwargs(key, cfg, workers)
    return lambda: float(dask.compute(graph, **kw)[0].sum())


def _gil_note(key: str, cfg: Config) -> str:
    note = default_note(key, cfg)
    return note if key in SHARES_MEMORY else f"{note}; {_PLAIN_NOTE}"


workload(Workload(
    name="gil",
    label="2",
    group=GROUP,
    title=lambda cfg, ctx: (
        f"GIL-bound tasks on a shared array: `da.from_array(x).map_blocks(python_sum)` on "
        f"{shared_title(ctx)}, partial sums added; {cfg.workers} workers"),
    setup=gil_setup,
    check=shared_check,
    columns=[speedup(SYNC, "speed-up vs sync")],
    plot=Plot("speed-up over dask sync", value=speedup_bar(SYNC), ref=1.0),
    teardown=shared_teardown,
    needs_cluster=True,
    footer=plain_footer,
))


def _gil_make(key, ctx, cfg):
    return gil_call(ctx, key, cfg)


each_scheduler("gil", _gil_make, note=_gil_note)

# --------------------------------------------------------------------------
# 3. Large in, large out
# --------------------------------------------------------------------------

_SAMPLE = 4099  # every _SAMPLE-th element is checked, and the last one


def _large_setup(cfg: Config) -> Any:
    n = cfg.array_bytes // 8
    chunk = n // cfg.chunks
    x = dask_sharedmem.empty(n, dtype="f8")
    _work.fill(x, chunk)
    graphs = {"shared": da.sqrt(da.from_array(x, chunks=chunk)) + 1,
              "plain": da.sqrt(da.from_array(np.asarray(x), chunks=chunk)) + 1}
    expected = np.sqrt(x[::_SAMPLE]) + 1
    last = np.sqrt(x[-1]) + 1
    return types.SimpleNamespace(x=x, n=n, chunk=chunk, chunks=cfg.chunks, graphs=graphs,
                                 expected=np.asarray(expected), last=last, nbytes=n * 8)


def _large_teardown(ctx: Any) -> None:
    ctx.__dict__.clear()


def _compute_check(ctx: Any, r: Any) -> str | None:
    if not isinstance(r, np.ndarray) or r.shape != (ctx.n,):
        return f"expected an array of shape ({ctx.n},), got {type(r).__name__}"
    if not (np.array_equal(r[::_SAMPLE], ctx.expected) and r[-1] == ctx.last):
        return "values differ from numpy's"
    return None


def _rss_columns() -> list[Column]:
    def ratio(ctx, s, res, peer):
        m = s.get("metrics", {}).get("peak_rss_increase")
        return None if m is None else m["median"] / ctx.nbytes

    return [speedup(PROCESSES, "speed-up vs processes"),
            speedup(THREADS, "speed-up vs threads"),
            metric("peak_rss_increase", "parent's peak RSS increase (MB, median)", 2**-20),
            Column("peak RSS / output", ratio, "{:.2f}x")]


def _rss_annotation(ctx, s, res):
    m = s.get("metrics", {}).get("peak_rss_increase")
    if m is None:
        return None
    return f"peak RSS +{m['median'] / 2**20:.0f} MB ({m['median'] / ctx.nbytes:.2f}x output)"


def _large_title(cfg: Config, ctx: Any, what: str) -> str:
    return (f"Large in, large out: {what} on a {ctx.nbytes / 2**20:.0f} MB float64 shared "
            f"array in {ctx.chunks} chunks; {cfg.workers} workers; the parent's peak RSS "
            f"increase during the call, also as a ratio to the output's "
            f"{ctx.nbytes / 2**20:.0f} MB")


workload(Workload(
    name="compute",
    label="3a",
    group=GROUP,
    title=lambda cfg, ctx: _large_title(cfg, ctx, "`(da.sqrt(x) + 1).compute()`"),
    setup=_large_setup,
    check=_compute_check,
    columns=_rss_columns(),
    plot=Plot("seconds (log)", value=time_bar(), log=True, annotate=_rss_annotation),
    probe=peak_rss,
    teardown=_large_teardown,
    needs_cluster=True,
    footer=plain_footer,
))


def _compute_make(key, ctx, cfg):
    kw = compute_kwargs(key, cfg)
    graph = graph_for(ctx, key)
    return lambda: dask.compute(graph, **kw)[0]


each_scheduler("compute", _compute_make, note=_gil_note)


def _store_setup(cfg: Config) -> Any:
    ctx = _large_setup(cfg)
    ctx.out = dask_sharedmem.empty(ctx.n, dtype="f8")
    ctx.out[...] = 0  # touch every page before any timing
    return ctx


def _store_check(ctx: Any, r: Any) -> str | None:
    out = ctx.out
    if not (np.array_equal(out[::_SAMPLE], ctx.expected) and out[-1] == ctx.last):
        return "the shared output does not hold sqrt(x) + 1"
    return None


def _store_writes_through(key: str, cfg: Config) -> None:
    """Raise NotApplicable unless ``da.store`` with this scheduler fills a
    shared output (checked on a 1 MB array, before any timing)."""
    out = dask_sharedmem.zeros(2**17)
    try:
        da.store(da.ones(out.size, chunks=out.size // 4), out, lock=False,
                 **compute_kwargs(key, cfg))
    except Exception as e:
        raise NotApplicable(f"`da.store` into a shared array failed on a 1 MB array: "
                            f"{type(e).__name__}: {e}") from e
    if not out.all():
        raise NotApplicable(
            "the shared output stayed empty (checked on a 1 MB array before timing): the "
            "output array is pickled into the tasks, so the workers write into copies of it")


def _store_footer(ctx: Any, results: dict) -> str:
    peers = [PROCESSES, DISTRIBUTED] + [RAY] * (RAY in results)
    return (f"{_rows(peers)} are checked first on a 1 MB array: their workers are "
            "processes of their own that get the output array pickled into their tasks, "
            "so they write into copies and the shared output stays empty; they are then "
            "not timed.")


workload(Workload(
    name="store",
    label="3b",
    group=GROUP,
    title=lambda cfg, ctx: _large_title(
        cfg, ctx, "`da.store(da.sqrt(x) + 1, out, lock=False)` into a shared `out` "
                  "(`dask_sharedmem.empty`, zeroed untimed before each call)"),
    setup=_store_setup,
    check=_store_check,
    columns=_rss_columns(),
    plot=Plot("seconds (log)", value=time_bar(), log=True, annotate=_rss_annotation),
    probe=peak_rss,
    teardown=_large_teardown,
    needs_cluster=True,
    footer=_store_footer,
))


def _store_make(key, ctx, cfg):
    if key not in SHARES_MEMORY:
        _store_writes_through(key, cfg)
    kw = compute_kwargs(key, cfg)
    graph, out = graph_for(ctx, key), ctx.out

    def zero():
        out[...] = 0

    return Run(lambda: da.store(graph, out, lock=False, **kw), before=zero)


each_scheduler("store", _store_make, note=_gil_note)

def each_of(name: str, make: Any, keys: tuple[str, ...], note: Any = None) -> None:
    """Register ``make`` for the schedulers ``keys`` only (those that share memory:
    the others write into copies, or take tens of seconds a call)."""
    note = note or default_note
    CALLS.setdefault(name, (make, note))
    for key in keys:
        RUNNERS.setdefault(name, []).append(Runner(
            SCHEDULERS[key], functools.partial(make, key), functools.partial(note, key)))


_IN_MEMORY = ("sync", "threads", "sharedmem")


def _store_numpy_setup(cfg: Config) -> Any:
    ctx = _large_setup(cfg)
    ctx.out = np.zeros(ctx.n)  # made before the fork, every page touched
    return ctx


workload(Workload(
    name="store-numpy",
    label="3c",
    group=GROUP,
    title=lambda cfg, ctx: (
        f"Large in, large out: `da.store(da.sqrt(x) + 1, out, lock=False)` into a plain numpy "
        f"`out` (made before the call, every page touched; zeroed untimed before each call) "
        f"on a {ctx.nbytes / 2**20:.0f} MB float64 shared array in {ctx.chunks} chunks; "
        f"{cfg.workers} workers"),
    setup=_store_numpy_setup,
    check=_store_check,
    columns=[speedup(THREADS, "speed-up vs threads")],
    plot=Plot("seconds (log)", value=time_bar(), log=True),
    teardown=_large_teardown,
))


def _store_numpy_make(key, ctx, cfg):
    kw = compute_kwargs(key, cfg)
    graph, out = ctx.graphs["shared"], ctx.out

    def zero():
        out[...] = 0

    return Run(lambda: da.store(graph, out, lock=False, **kw), before=zero)


each_of("store-numpy", _store_numpy_make, _IN_MEMORY)


def _square_setup(cfg: Config) -> Any:
    side = int(round((cfg.array_bytes // 8) ** 0.5))
    block = max(1, side // int(round(cfg.chunks ** 0.5)))
    x = dask_sharedmem.empty((side, side))
    _work.fill(x.reshape(-1), block * side)
    y = da.sqrt(da.from_array(x, chunks=block)) + 1
    rows = da.sqrt(da.from_array(x, chunks=(block, side))) + 1
    expected = (np.sqrt(x[::97, ::89]) + 1) + (np.sqrt(x.T[::97, ::89]) + 1)
    return types.SimpleNamespace(x=x, side=side, block=block, nbytes=x.nbytes, chunks=cfg.chunks,
                                 graphs={"transpose": y + y.T,
                                         "rechunk": rows.rechunk((side, block))},
                                 expected=np.asarray(expected),
                                 rechunked=np.asarray(np.sqrt(x[::97, ::89]) + 1))


def _transpose_check(ctx: Any, r: Any) -> str | None:
    if not isinstance(r, np.ndarray) or r.shape != (ctx.side, ctx.side):
        return f"expected an array of shape ({ctx.side}, {ctx.side}), got {type(r).__name__}"
    return None if np.array_equal(r[::97, ::89], ctx.expected) else "values differ from numpy's"


def _rechunk_check(ctx: Any, r: Any) -> str | None:
    if not isinstance(r, np.ndarray) or r.shape != (ctx.side, ctx.side):
        return f"expected an array of shape ({ctx.side}, {ctx.side}), got {type(r).__name__}"
    return None if np.array_equal(r[::97, ::89], ctx.rechunked) else "values differ from numpy's"


def _square_title(cfg: Config, ctx: Any, what: str) -> str:
    return (f"Data between workers: {what}, x a {ctx.side}x{ctx.side} float64 shared array "
            f"({ctx.nbytes / 2**20:.0f} MB); {cfg.workers} workers")


workload(Workload(
    name="transpose",
    label="3d",
    group=GROUP,
    title=lambda cfg, ctx: _square_title(
        cfg, ctx, f"`y = da.sqrt(x) + 1; (y + y.T).compute()` in {ctx.block}x{ctx.block} "
                  "chunks (each output chunk needs a chunk another task made)"),
    setup=_square_setup,
    check=_transpose_check,
    columns=[speedup(THREADS, "speed-up vs threads")],
    plot=Plot("seconds (log)", value=time_bar(), log=True),
    teardown=_large_teardown,
))

workload(Workload(
    name="rechunk",
    label="3e",
    group=GROUP,
    title=lambda cfg, ctx: _square_title(
        cfg, ctx, f"`(da.sqrt(x) + 1).rechunk(...).compute()`, rows of {ctx.block} to "
                  f"columns of {ctx.block} (every output chunk takes a slice of every "
                  "input chunk)"),
    setup=_square_setup,
    check=_rechunk_check,
    columns=[speedup(THREADS, "speed-up vs threads")],
    plot=Plot("seconds (log)", value=time_bar(), log=True),
    teardown=_large_teardown,
))


def _square_make(name):
    def make(key, ctx, cfg):
        kw = compute_kwargs(key, cfg)
        graph = ctx.graphs[name]
        return lambda: dask.compute(graph, **kw)[0]
    return make


each_of("transpose", _square_make("transpose"), _IN_MEMORY)
each_of("rechunk", _square_make("rechunk"), _IN_MEMORY)


# --------------------------------------------------------------------------
# sharedmem.inline: small graphs run in the caller, unless it is 0
# --------------------------------------------------------------------------

#: dask config key: graphs whose estimated work (from task durations measured in
#: earlier calls) is below this many seconds run in the caller; 0 forks every call
INLINE = "sharedmem.inline"
_FORKED = "forked every call"


def _forked(call: Any) -> Any:
    """``call`` with ``sharedmem.inline`` 0 (setting the key costs a few µs per call)."""

    def forked():
        with dask.config.set({INLINE: 0}):
            return call()

    return forked


def _forked_note(cfg: Config) -> str:
    return (f"`dask.config.set({{'{INLINE}': 0}})` around each call: {cfg.workers} "
            "workers forked every call, whatever earlier calls measured")


def inline_line(row: str) -> str:
    """A footer: what ``sharedmem.inline`` is in this run, beside ``row`` (the
    same call with the default) and the *forked every call* row."""
    value = dask.config.get(INLINE, None)
    if value is None:
        return (f"`{INLINE}` is not set in dask's config in this run, so `{SHAREDMEM}` uses "
                "its built-in default if this version has the setting; without it every "
                f"call forks, and the *{_FORKED}* row times the same calls as the `{row}` "
                "row.")
    return (f"`{INLINE}` is {value!r} in this run (dask's config): `{SHAREDMEM}` runs a "
            "graph in the caller when its work, estimated from the task durations of "
            f"earlier calls, is below that many seconds (the `{row}` row); the "
            f"*{_FORKED}* row sets it to 0.")


# --------------------------------------------------------------------------
# 4. Start-up
# --------------------------------------------------------------------------

_FIRST_CALL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_first_call.py")
_FIRST = "{}: first call, fresh process"
_REPEATED = "{}: repeated call"
_CLUSTER_ROW = "distributed: LocalCluster + Client start-up, fresh process"


def _first_call(key: str, cfg: Config) -> Timed:
    p = subprocess.run([sys.executable, _FIRST_CALL, key, str(cfg.workers)],
                       capture_output=True, text=True, timeout=cfg.timeout)
    if p.returncode:
        lines = p.stderr.strip().splitlines() or [f"exit status {p.returncode}"]
        raise RuntimeError(f"the subprocess failed: {lines[-1]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    metrics = {"import": out["import"]}
    if "cluster_start" in out:
        metrics["cluster_start"] = out["cluster_start"]
    return Timed(out["first"], out["result"], metrics)


def _startup_after(ctx: Any, results: dict, notes: dict) -> None:
    """Add the cluster start-up row, from the distributed first-call runs."""
    first = results.get(_FIRST.format(DISTRIBUTED), {})
    m = first.get("metrics", {}).get("cluster_start")
    if m is not None:
        results[_CLUSTER_ROW] = stats(m["runs"])
        note = (f"timed in the subprocesses of the `{_FIRST.format(DISTRIBUTED)}` row, "
                "before their first call")
        if CLUSTER.startup is not None:
            note += (f"; this run's own cluster (the distributed rows of every workload) "
                     f"started in {CLUSTER.startup:.2f} s")
        notes[_CLUSTER_ROW] = note


workload(Workload(
    name="startup",
    label="4",
    group=GROUP,
    title=lambda cfg, ctx: (
        "Start-up: a one-task graph `{'x': (inc, 1)}` through each scheduler's `get`: the "
        "first call in a fresh Python process (after the imports, timed in that process), "
        f"and repeated calls in this one; {cfg.workers} workers"),
    setup=lambda cfg: types.SimpleNamespace(dsk={"x": (_work.inc, 1)}),
    check=lambda ctx, r: None if r == 2 else f"{r!r}, expected 2",
    columns=[Column("ms (median)", lambda ctx, s, res, peer: s["median"] * 1e3, "{:.2f}"),
             metric("import", "imports before it (ms, median)", 1e3, "{:.0f}")],
    plot=Plot("milliseconds (log)", value=time_bar(1e3), log=True, ref=10.0),
    after=_startup_after,
    needs_cluster=True,
    footer=lambda ctx, results: inline_line(_REPEATED.format(SHAREDMEM)),
))


def _first_make(key, ctx, cfg):
    return Run(lambda: _first_call(key, cfg), warmup=False)


def _repeated_make(key, ctx, cfg):
    get = raw_get(key, cfg)
    return lambda: get(ctx.dsk, "x")


each_scheduler("startup", _first_make, label=_FIRST,
               note=lambda key, cfg: f"`{_GET_NAMES[key]}`, in a new subprocess each time")
each_scheduler("startup", _repeated_make, label=_REPEATED,
               note=lambda key, cfg: f"`{_GET_NAMES[key]}`, in this process")

RUNNERS["startup"].append(Runner(
    f"{_REPEATED.format(SHAREDMEM)}, {_FORKED}",
    lambda ctx, cfg: _forked(_repeated_make("sharedmem", ctx, cfg)),
    lambda cfg: f"`{_GET_NAMES['sharedmem']}`, in this process; " + _forked_note(cfg)))

# --------------------------------------------------------------------------
# 4b. Interactive-size compute
# --------------------------------------------------------------------------

_SMALL_CHUNKS = 8
_X_THREADS = "x threads' time"


def _small_setup(cfg: Config) -> Any:
    n = cfg.small_bytes // 8
    chunk = n // _SMALL_CHUNKS
    a = dask_sharedmem.empty(n, dtype="f8")
    a[...] = 1  # every page touched before any timing
    graphs = {"shared": (da.from_array(a, chunks=chunk) + 1).sum(),
              "plain": (da.from_array(np.asarray(a), chunks=chunk) + 1).sum()}
    return types.SimpleNamespace(a=a, n=n, chunk=chunk, graphs=graphs,
                                 expected=2.0 * n, nbytes=n * 8)


def _small_check(ctx: Any, r: Any) -> str | None:
    return None if r == ctx.expected else f"{r!r}, expected {ctx.expected!r}"


def _x_threads(ctx, s, results, peer):
    base = results.get(THREADS)
    if not base or "median" not in base:
        return None
    return s["median"] / base["median"]


def _small_annotation(ctx, s, results):
    r = _x_threads(ctx, s, results, None)
    return None if r is None else f"{r:.2f}x threads"


def _small_note(key: str, cfg: Config) -> str:
    if key == "sharedmem":
        return (f"{cfg.workers} workers; default `{INLINE}`: forked per call unless the "
                "graph's estimated work is below it")
    return _gil_note(key, cfg)


def _small_footer(ctx: Any, results: dict) -> str:
    return plain_footer(ctx, results) + "\n\n" + inline_line(SHAREDMEM)


workload(Workload(
    name="small",
    label="4b",
    group=GROUP,
    title=lambda cfg, ctx: (
        f"Interactive-size compute: `(x + 1).sum().compute()` with `x = da.from_array(a, "
        f"chunks=len(a) // {_SMALL_CHUNKS})` on a {ctx.nbytes / 2**20:.0f} MB float64 shared "
        f"array of ones (`dask_sharedmem.empty`), repeated calls in this process; "
        f"{cfg.workers} workers; *{_X_THREADS}*: each row's median / `{THREADS}`'s"),
    setup=_small_setup,
    check=_small_check,
    columns=[Column("ms (median)", lambda ctx, s, res, peer: s["median"] * 1e3, "{:.2f}"),
             Column(_X_THREADS, _x_threads, "{:.2f}x")],
    plot=Plot("milliseconds (log)", value=time_bar(1e3), log=True,
              annotate=_small_annotation),
    teardown=_large_teardown,
    needs_cluster=True,
    footer=_small_footer,
))


def _small_make(key, ctx, cfg):
    kw = compute_kwargs(key, cfg)
    graph = graph_for(ctx, key)
    return lambda: graph.compute(**kw)


each_scheduler("small", _small_make, note=_small_note)
RUNNERS["small"].append(Runner(
    f"{SHAREDMEM}, {_FORKED}",
    lambda ctx, cfg: _forked(_small_make("sharedmem", ctx, cfg)),
    _forked_note))
