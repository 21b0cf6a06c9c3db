"""``python -m dask_sharedmem``: a short demo of the library doing real work.

It allocates a shared array, fills it in parallel with MapReduce (workers
write their chunks in place), checks the answer, and times the same work
serially; then it runs two dask.array computations on the shared array with
the sharedmem scheduler beside dask's threaded scheduler: GIL-bound Python
per chunk, and a large array out (each chunk pulled once into its place).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time

import numpy as np

import dask_sharedmem as sharedmem


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dask_sharedmem", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, metavar="MB",
                   help="size of the shared array in MB (default: 256)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="number of worker processes (default: sharedmem.cpu_count(), "
                        f"here {sharedmem.cpu_count()})")
    p.add_argument("--chunks", type=int, default=64, help="number of chunks (default: 64)")
    return p.parse_args(argv)


def _timed(f):
    t0 = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t0


def _python_work(block: np.ndarray, stride: int) -> float:
    """GIL-bound work: a pure-Python loop over every ``stride``-th element."""
    s = 0.0
    for v in np.asarray(block)[::stride].tolist():
        s += math.sin(v) ** 2
    return s


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.size < 1 or args.chunks < 1:
        sys.exit("--size and --chunks must be at least 1")
    if args.workers is not None and args.workers < 1:
        sys.exit("--workers must be at least 1")
    n = args.size * 2**20 // 8
    stride = 8
    x = sharedmem.empty(n, dtype="f8")
    x[...] = 0  # touch every page once, so no run below pays the first-touch cost
    edges = np.linspace(0, n, args.chunks + 1).astype(int)
    chunks = list(itertools.pairwise(edges.tolist()))

    def work(chunk):
        # the workers write their chunk of the shared array in place, then do
        # GIL-bound Python work on it; only the float result comes back
        lo, hi = chunk
        x[lo:hi] = np.arange(lo, hi, dtype="f8") * (1.0 / n)
        return _python_work(x[lo:hi], stride)

    print(f"dask_sharedmem demo: a {args.size} MB shared array in {len(chunks)} chunks; "
          f"each task fills its chunk in place, then loops in Python over 1 in {stride} "
          "elements")
    huge = sharedmem.memory.shmem_huge_pages()
    print(f"  huge pages for shared memory: {huge} (the kernel's shmem_enabled: "
          + ("large segments use 2 MiB pages)" if sharedmem.memory._huge else
             "4 KiB pages, which each worker maps one by one; 'advise' as root would "
             "let large segments use 2 MiB pages)"))
    print(f"  large arrays cross between processes by {sharedmem.transports.describe()}")
    with sharedmem.MapReduce(np=args.workers) as pool:
        parallel, t_par = _timed(lambda: pool.map(work, chunks))
        np_used = pool.np
    ok = bool(np.allclose(x[::997], np.arange(0, n, 997) / n))
    with sharedmem.MapReduce(np=0) as pool:
        serial, t_ser = _timed(lambda: pool.map(work, chunks))
    ok = ok and bool(np.allclose(parallel, serial))
    print(f"  MapReduce, {np_used} worker processes: {t_par:.2f} s; the same loop serially: "
          f"{t_ser:.2f} s; speed-up {t_ser / t_par:.2f}x; shared array filled in place and "
          f"results {'correct' if ok else 'WRONG'}")

    import dask
    import dask.array as da
    from dask.diagnostics import ProgressBar

    arr = da.from_array(x, chunks=len(x) // args.chunks or 1)
    parts = arr.map_blocks(lambda b: np.array([_python_work(b, stride)]), chunks=(1,),
                           dtype="f8")
    expr = parts.sum()
    print(f"dask.array: the same Python loop as map_blocks over {arr.npartitions} chunks, "
          "then sum()")
    with ProgressBar(out=sys.stdout):
        (total,), t_shm = _timed(lambda: dask.compute(expr, scheduler="sharedmem",
                                                       num_workers=args.workers))
    (expected,), t_thr = _timed(lambda: dask.compute(expr, scheduler="threads",
                                                      num_workers=args.workers))
    same = bool(np.isclose(total, expected))
    print(f"  scheduler='sharedmem': {t_shm:.2f} s; scheduler='threads' (held back by "
          f"the GIL): {t_thr:.2f} s; speed-up {t_thr / t_shm:.2f}x; same answer: {same}")

    big = da.sqrt(arr) + 1
    print(f"dask.array: (da.sqrt(x) + 1).compute(), {args.size} MB out (second calls; the "
          "first pays for new memory)")
    timings = {}
    for name in ("sharedmem", "threads"):
        big.compute(scheduler=name, num_workers=args.workers)
        timings[name] = _timed(lambda n=name: big.compute(scheduler=n,
                                                            num_workers=args.workers))
    (mine, t_mine), (theirs, t_theirs) = timings["sharedmem"], timings["threads"]
    equal = bool(np.array_equal(mine, theirs))
    print(f"  scheduler='sharedmem': {t_mine:.2f} s; scheduler='threads': {t_theirs:.2f} s; "
          f"{t_mine / t_theirs:.2f}x threads' time; same answer: {equal}")
    return 0 if ok and same and equal else 1


if __name__ == "__main__":
    sys.exit(main())
