"""``python -m dask_sharedmem``: a short demo of the library doing real work.

It allocates a shared array, fills it in parallel with MapReduce (workers
write their chunks in place), checks the answer, and times the same work
serially; then it runs a dask.array computation on the shared array with the
sharedmem scheduler beside dask's threaded scheduler.
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


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.size < 1 or args.chunks < 1:
        sys.exit("--size and --chunks must be at least 1")
    n = args.size * 2**20 // 8
    x = sharedmem.zeros(n, dtype="f8")
    x[...] = 0  # touch every page once, so no run below pays the first-touch cost
    edges = np.linspace(0, n, args.chunks + 1).astype(int)
    chunks = list(itertools.pairwise(edges.tolist()))

    def work(chunk):
        # GIL-bound Python work on each chunk, then a numpy write in place
        lo, hi = chunk
        s = 0.0
        for k in range(lo, min(hi, lo + 20000)):
            s += math.sin(k) ** 2
        x[lo:hi] = np.arange(lo, hi, dtype="f8") * (1.0 / n)
        return s

    print(f"dask_sharedmem demo: {args.size} MB shared array, {len(chunks)} chunks")
    with sharedmem.MapReduce(np=args.workers) as pool:
        parallel, t_par = _timed(lambda: pool.map(work, chunks))
        np_used = pool.np
    ok = bool(np.allclose(x[::997], np.arange(0, n, 997) / n))
    x[...] = 0
    with sharedmem.MapReduce(np=0) as pool:
        serial, t_ser = _timed(lambda: pool.map(work, chunks))
    assert np.allclose(parallel, serial)
    print(f"  MapReduce, {np_used} worker processes: {t_par:.3f} s; serial loop: {t_ser:.3f} s "
          f"(speed-up {t_ser / t_par:.2f}x); the workers filled the shared array in place: "
          f"{'correct' if ok else 'WRONG'}")

    import dask
    import dask.array as da
    from dask.diagnostics import ProgressBar

    x[...] = np.arange(n, dtype="f8") * (1.0 / n)
    arr = da.from_array(x, chunks=len(x) // args.chunks or 1)
    expr = (da.sqrt(arr) + 1).sum()
    print(f"dask.array: (sqrt(x) + 1).sum() over the shared array in {arr.npartitions} chunks")
    with ProgressBar(out=sys.stdout):
        (total,), t_shm = _timed(lambda: dask.compute(expr, scheduler="sharedmem",
                                                       num_workers=args.workers))
    (expected,), t_thr = _timed(lambda: dask.compute(expr, scheduler="threads",
                                                      num_workers=args.workers))
    same = bool(np.isclose(total, expected))
    print(f"  scheduler='sharedmem': {t_shm:.3f} s; scheduler='threads': {t_thr:.3f} s; "
          f"same answer: {same} ({total:.6g})")
    return 0 if ok and same else 1


if __name__ == "__main__":
    sys.exit(main())
