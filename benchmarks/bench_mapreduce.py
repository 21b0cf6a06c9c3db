"""MapReduce workloads: dask_sharedmem.MapReduce beside other process pools.

Registered with the suite (``python benchmarks/run.py --only mapreduce``):

* ``mapreduce-overhead``: per-item overhead, pool start-up and shut-down included;
* ``mapreduce-gil``: GIL-bound work on a large shared array, beside the
  machine's limit for it: forked processes running the serial loop, no pool.

Pools are created and shut down inside every timed call (start-up included),
except where a peer's normal use keeps workers alive between calls (joblib's
reusable loky executor): its note says so.  Functions that a peer must
pickle live in ``_work.py``.
"""

from __future__ import annotations

import os
import struct
import types
from typing import Any

import _work
import numpy as np
from harness import (
    Column,
    Config,
    Plot,
    Run,
    Workload,
    per_unit,
    runner,
    speedup,
    speedup_bar,
    workload,
)

import dask_sharedmem

GROUP = "MapReduce"

# --------------------------------------------------------------------------
# Pools, as each peer is normally used
# --------------------------------------------------------------------------


def mp_pool(workers, func, items, chunksize=None):
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return pool.map(func, items, chunksize)


def _executor(cfg, func, items):
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(
            cfg.workers, mp_context=multiprocessing.get_context("fork")) as ex:
        return list(ex.map(func, items))


def _joblib(cfg, calls):
    from joblib import Parallel

    return Parallel(n_jobs=cfg.workers, backend="loky")(calls)


def loky_shutdown():
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor().shutdown(wait=True)


def _mpire(cfg, func, items):
    from mpire import WorkerPool

    with WorkerPool(n_jobs=cfg.workers, start_method="fork") as pool:
        return pool.map(func, items)


# --------------------------------------------------------------------------
# Per-item overhead
# --------------------------------------------------------------------------


def _overhead_setup(cfg: Config) -> Any:
    items = list(range(cfg.overhead_items))
    return types.SimpleNamespace(items=items, n=len(items))


def _overhead_check(ctx: Any, result: Any) -> str | None:
    if list(result) != ctx.items:
        return f"expected the {ctx.n} items back in order"
    return None


_MP_DEFAULT = "multiprocessing.Pool (fork, default chunksize)"

workload(Workload(
    name="mapreduce-overhead",
    label="6",
    group=GROUP,
    title=lambda cfg, ctx: (
        f"MapReduce per-item overhead: map `lambda x: x` over {ctx.n:,} items, "
        f"{cfg.workers} workers, pool start-up and shut-down included"),
    setup=_overhead_setup,
    check=_overhead_check,
    columns=[per_unit("µs/item (median)", lambda ctx: ctx.n),
             Column("vs Pool default chunksize",
                    lambda ctx, s, res, peer: (s["median"] / res[_MP_DEFAULT]["median"]
                                         if "median" in res.get(_MP_DEFAULT, {}) else None),
                    "{:.2f}x")],
    plot=Plot("µs per item (log)", value=lambda ctx, s, res: tuple(
        v / ctx.n * 1e6 for v in (s["median"], s["min"], s["max"])), log=True),
))


@runner("mapreduce-overhead", "serial for loop (reference, 1 process)")
def _overhead_serial(ctx, cfg):
    f = lambda x: x
    return lambda: [f(x) for x in ctx.items]


@runner("mapreduce-overhead", "dask_sharedmem.MapReduce")
def _overhead_mapreduce(ctx, cfg):
    return lambda: dask_sharedmem.MapReduce(np=cfg.workers).map(lambda x: x, ctx.items)


@runner("mapreduce-overhead", "multiprocessing.Pool (fork, chunksize=1)")
def _overhead_mp_pool_1(ctx, cfg):
    return lambda: mp_pool(cfg.workers, _work.identity, ctx.items, 1)


@runner("mapreduce-overhead", _MP_DEFAULT, note="chunksize = len/(4*workers)")
def _overhead_mp_pool_default(ctx, cfg):
    return lambda: mp_pool(cfg.workers, _work.identity, ctx.items)


@runner("mapreduce-overhead", "ProcessPoolExecutor (fork, chunksize=1)")
def _overhead_executor(ctx, cfg):
    return lambda: _executor(cfg, _work.identity, ctx.items)


@runner("mapreduce-overhead", "joblib (loky), warm workers",
        note="loky keeps its workers between calls: start-up not included")
def _overhead_joblib_warm(ctx, cfg):
    from joblib import delayed

    return lambda: _joblib(cfg, (delayed(_work.identity)(x) for x in ctx.items))


@runner("mapreduce-overhead", "joblib (loky), cold start",
        note="loky executor shut down (untimed) before each call")
def _overhead_joblib_cold(ctx, cfg):
    from joblib import delayed

    return Run(lambda: _joblib(cfg, (delayed(_work.identity)(x) for x in ctx.items)),
               before=loky_shutdown)


@runner("mapreduce-overhead", "mpire (fork)", note="default chunksize")
def _overhead_mpire(ctx, cfg):
    return lambda: _mpire(cfg, _work.identity, ctx.items)


@runner("mapreduce-overhead", "sharedmem 0.3.8 MapReduce")
def _overhead_sharedmem(ctx, cfg):
    import sharedmem

    def call():
        with sharedmem.MapReduce(np=cfg.workers) as pool:
            return pool.map(lambda x: x, ctx.items)

    return call


# --------------------------------------------------------------------------
# GIL-bound work over a large shared array (also used by the scheduler and
# scaling workloads)
# --------------------------------------------------------------------------


def shared_setup(cfg: Config) -> Any:
    """A filled shared array, published in ``_work`` for fork-based pools."""
    n = cfg.array_bytes // 8
    if n % (cfg.chunks * cfg.step):
        raise ValueError("array size must split into chunks of a multiple of step")
    a = dask_sharedmem.empty(n, dtype="f8")
    chunk = n // cfg.chunks
    _work.fill(a, chunk)
    _work.ARRAY, _work.CHUNK, _work.STEP = a, chunk, cfg.step
    expected = float(np.asarray(a[::cfg.step]).sum())
    return types.SimpleNamespace(array=a, n=n, chunk=chunk, chunks=cfg.chunks,
                                 step=cfg.step, expected=expected)


def shared_teardown(ctx: Any) -> None:
    _work.ARRAY = None
    ctx.__dict__.clear()


def shared_check(ctx: Any, result: Any) -> str | None:
    if result != ctx.expected:
        return f"sum {result!r}, expected {ctx.expected!r}"
    return None


def shared_title(ctx: Any) -> str:
    return (f"{ctx.n * 8 / 2**20:.0f} MB float64 (`dask_sharedmem.empty`) in {ctx.chunks} "
            f"chunks of {ctx.chunk * 8 / 2**20:.3g} MB; each task sums one element in "
            f"{ctx.step} of its chunk in a Python for loop ({ctx.chunk // ctx.step:,} "
            "iterations)")


_SERIAL = "serial for loop (1 process)"
LIMIT = "forked processes running the serial loop, no pool (the machine's limit)"


def _of_limit(ctx, s, results, peer):
    limit = results.get(LIMIT)
    return limit["median"] / s["median"] if limit and "median" in limit else None


workload(Workload(
    name="mapreduce-gil",
    label="7",
    group=GROUP,
    title=lambda cfg, ctx: (
        f"MapReduce, GIL-bound work on a shared array: {shared_title(ctx)}, results "
        f"summed; {cfg.workers} workers, pool start-up included"),
    setup=shared_setup,
    check=shared_check,
    columns=[speedup(_SERIAL, "speed-up vs serial"),
             Column("of the limit", _of_limit, "{:.2f}x")],
    plot=Plot("speed-up over the serial loop", value=speedup_bar(_SERIAL), ref=1.0),
    teardown=shared_teardown,
))


@runner("mapreduce-gil", _SERIAL)
def _shared_serial(ctx, cfg):
    return lambda: sum(_work.chunk_sum(i) for i in range(ctx.chunks))


def forked_loops(workers: int, chunks: int) -> float:
    """The serial loop run by ``workers`` forked processes: no pool at all.

    Each process takes the next chunk index off a pipe (one 4-byte record per
    chunk, then one end record per process: a pipe read that small is atomic),
    sums the chunk with the serial loop's code, and at the end writes its total
    to a pipe of its own.  No dispatch, no message per chunk, yet the chunks
    balance over the processes as they go: the two CPUs of the development VM
    ran this loop up to 40% apart (19 against 27 ms a chunk), and a fixed half
    each left the faster one idle for a quarter of the run.  What is left is
    what every fork-based pool
    pays too (the forks, each process's first touches of the shared array's
    pages, the exits).
    """
    take, put = os.pipe()
    readers = []
    for _ in range(workers):
        r, w = os.pipe()
        if os.fork() == 0:  # pragma: no cover - the child
            try:
                total = 0.0
                while (i := struct.unpack("i", os.read(take, 4))[0]) >= 0:
                    total += _work.chunk_sum(i)
                os.write(w, struct.pack("d", total))
            finally:
                os._exit(0)
        os.close(w)
        readers.append(r)
    os.close(take)
    with os.fdopen(put, "wb") as f:
        f.write(struct.pack(f"{chunks + workers}i", *range(chunks), *[-1] * workers))
    total = 0.0
    for r in readers:
        with os.fdopen(r, "rb") as f:
            data = f.read()
        if len(data) != 8:
            raise RuntimeError("a forked process died before sending its sum")
        total += struct.unpack("d", data)[0]
    for _ in readers:
        os.wait()
    return total


@runner("mapreduce-gil", LIMIT,
        note=lambda cfg: (f"{cfg.workers} processes forked per call; each takes the next "
                          "chunk index off a pipe, sums the chunk with the serial loop's "
                          "code, and sends one float at the end"))
def _shared_limit(ctx, cfg):
    return lambda: forked_loops(cfg.workers, ctx.chunks)


def mapreduce_sum(ctx: Any, workers: int) -> Any:
    a, chunk, step = ctx.array, ctx.chunk, ctx.step

    def call():
        pool = dask_sharedmem.MapReduce(np=workers)
        return sum(pool.map(lambda i: _work.gil_sum(a[i * chunk:(i + 1) * chunk], step),
                            range(ctx.chunks)))

    return call


@runner("mapreduce-gil", "dask_sharedmem.MapReduce", note="closure over the array")
def _shared_mapreduce(ctx, cfg):
    return mapreduce_sum(ctx, cfg.workers)


_INHERITED = "chunk index; array is a fork-inherited global"


@runner("mapreduce-gil", "multiprocessing.Pool (fork, chunksize=1)", note=_INHERITED)
def _shared_mp_pool_1(ctx, cfg):
    return lambda: sum(mp_pool(cfg.workers, _work.chunk_sum, range(ctx.chunks), 1))


@runner("mapreduce-gil", _MP_DEFAULT, note=_INHERITED)
def _shared_mp_pool_default(ctx, cfg):
    return lambda: sum(mp_pool(cfg.workers, _work.chunk_sum, range(ctx.chunks)))


@runner("mapreduce-gil", "ProcessPoolExecutor (fork, chunksize=1)", note=_INHERITED)
def _shared_executor(ctx, cfg):
    return lambda: sum(_executor(cfg, _work.chunk_sum, range(ctx.chunks)))


@runner("mapreduce-gil", "joblib (loky), chunk passed as argument",
        note="loky workers are not forked and cannot see the array: each chunk's "
             "slice is passed and joblib auto-memmaps it through a temp file; "
             "warm workers")
def _shared_joblib_slices(ctx, cfg):
    from joblib import delayed

    a, chunk, step = np.asarray(ctx.array), ctx.chunk, ctx.step

    def call():
        return sum(_joblib(cfg, (delayed(_work.gil_sum)(a[i * chunk:(i + 1) * chunk], step)
                                 for i in range(ctx.chunks))))

    return call


@runner("mapreduce-gil", "joblib (loky), np.memmap of the array's memfd",
        note="workers map /proc/<pid>/fd/<memfd> themselves (no copy); warm workers")
def _shared_joblib_memfd(ctx, cfg):
    from joblib import delayed

    from dask_sharedmem import memory

    path = f"/proc/{os.getpid()}/fd/{memory._segment_of(ctx.array).fd}"
    chunk, step = ctx.chunk, ctx.step

    def call():
        return sum(_joblib(cfg, (delayed(_work.memmap_sum)(path, i * chunk * 8, chunk, step)
                                 for i in range(ctx.chunks))))

    return call


@runner("mapreduce-gil", "mpire (fork)", note=_INHERITED)
def _shared_mpire(ctx, cfg):
    return lambda: sum(_mpire(cfg, _work.chunk_sum, range(ctx.chunks)))


@runner("mapreduce-gil", "sharedmem 0.3.8 MapReduce", note="closure over the array")
def _shared_sharedmem(ctx, cfg):
    import sharedmem

    a, chunk, step = ctx.array, ctx.chunk, ctx.step

    def call():
        with sharedmem.MapReduce(np=cfg.workers) as pool:
            return sum(pool.map(lambda i: _work.gil_sum(a[i * chunk:(i + 1) * chunk], step),
                                range(ctx.chunks)))

    return call



# --------------------------------------------------------------------------
# Large results: each item returns a new array (numpy work, the GIL released)
# --------------------------------------------------------------------------


def _results_setup(cfg: Config) -> Any:
    """A plain numpy array (the caller's private memory), cut into chunk views."""
    n = cfg.array_bytes // 8
    a = np.arange(n, dtype="f8")
    chunk = n // cfg.chunks
    chunks = [a[i * chunk:(i + 1) * chunk] for i in range(cfg.chunks)]
    _work.ARRAY, _work.CHUNK = a, chunk
    return types.SimpleNamespace(array=a, chunks=chunks, n=n, chunk=chunk)


def _results_check(ctx: Any, result: Any) -> str | None:
    result = list(result)
    if len(result) != len(ctx.chunks):
        return f"{len(result)} results, expected {len(ctx.chunks)}"
    for i, r in enumerate(result):
        first, last = i * ctx.chunk, (i + 1) * ctx.chunk - 1
        if (np.shape(r) != (ctx.chunk,) or r[0] != np.sqrt(first) + 1
                or r[-1] != np.sqrt(last) + 1):
            return f"result {i} is wrong"
    return None


_TPE = "ThreadPoolExecutor.map"


def _vs_threads(ctx, s, results, peer):
    t = results.get(_TPE)
    return s["median"] / t["median"] if t and "median" in t else None


workload(Workload(
    name="mapreduce-results",
    label="7b",
    group=GROUP,
    title=lambda cfg, ctx: (
        f"MapReduce returning large arrays: `np.sqrt(c) + 1` for each of {len(ctx.chunks)} "
        f"chunks of {ctx.chunk * 8 / 2**20:.3g} MB of a plain numpy array; every result "
        f"comes back to the caller as a list; {cfg.workers} workers, start-up included"),
    setup=_results_setup,
    check=_results_check,
    columns=[Column("vs ThreadPoolExecutor", _vs_threads, "{:.2f}x")],
    plot=Plot("seconds", value=lambda ctx, s, res: (s["median"], s["min"], s["max"])),
    teardown=shared_teardown,
))


@runner("mapreduce-results", "serial for loop (1 process)")
def _results_serial(ctx, cfg):
    return lambda: [np.sqrt(c) + 1 for c in ctx.chunks]


@runner("mapreduce-results", _TPE, note="the threads share the caller's memory")
def _results_threads(ctx, cfg):
    import concurrent.futures

    def call():
        with concurrent.futures.ThreadPoolExecutor(cfg.workers) as ex:
            return list(ex.map(lambda c: np.sqrt(c) + 1, ctx.chunks))

    return call


@runner("mapreduce-results", "dask_sharedmem.MapReduce",
        note="each result is pulled out of its worker by one copy")
def _results_mapreduce(ctx, cfg):
    def call():
        with dask_sharedmem.MapReduce(np=cfg.workers) as pool:
            return pool.map(lambda c: np.sqrt(c) + 1, ctx.chunks)

    return call


@runner("mapreduce-results", _MP_DEFAULT, note="chunk index; results pickled through a pipe")
def _results_mp_pool(ctx, cfg):
    return lambda: mp_pool(cfg.workers, _work.sqrt_chunk, range(len(ctx.chunks)))
