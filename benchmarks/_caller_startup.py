"""Time dask_sharedmem's start-up in a fresh process that holds private memory.

Usage: ``python _caller_startup.py GB WORKERS REPEATS [4k]``.  After the
imports the process fills ``np.ones`` of GB gigabytes (every page touched, so
private and mapped: each fork copies its page tables), then times, with
WORKERS workers:

* ``first``: the first ``dask_sharedmem.get({"x": (inc, 1)}, "x")`` of the process;
* ``repeated``: the median of REPEATS more such calls;
* ``map``: the median of REPEATS ``MapReduce(np=WORKERS).map(inc, range(100))``
  after one untimed call;
* ``threads``: the median of REPEATS ``dask.threaded.get`` of the same graph
  after one untimed call (no fork: the reference).

numpy advises transparent huge pages (2 MiB) for large arrays, so a fork
copies one page-table entry per 2 MiB of them.  With ``4k`` the array is
kept in 4 KiB pages instead (a private anonymous mapping with
``MADV_NOHUGEPAGE``, filled with ones), as memory is when the kernel's huge
pages are off or a caller's data lives in many small allocations.

Prints one JSON line with those seconds, the bytes held, the process's RSS
and the part of it in huge pages before the first call (``held``, ``rss``,
``huge``), and the results, which the suite checks.  The array stays alive
(a local of ``main``) until the line is printed.
"""

import json
import statistics
import sys
import time


def _kib(path: str, field: str) -> int:
    """A ``field: N kB`` line of a /proc file, in bytes (0 if absent)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _ones(nbytes: int, small_pages: bool):
    """``np.ones`` of ``nbytes``, every page touched; in 4 KiB pages if asked."""
    import mmap

    import numpy as np

    if not small_pages:
        return np.ones(nbytes // 8)
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_NOHUGEPAGE)
    a = np.frombuffer(m, dtype="f8")
    a[:] = 1
    return a


def _median_time(call, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def main() -> None:
    gb, workers, repeats = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    small_pages = sys.argv[4:] == ["4k"]
    import dask.threaded
    from _work import inc

    import dask_sharedmem

    held = _ones(int(gb * 2**30) // 8 * 8, small_pages)
    dsk = {"x": (inc, 1)}
    out = {"held": held.nbytes, "rss": _kib("/proc/self/status", "VmRSS"),
           "huge": _kib("/proc/self/smaps_rollup", "AnonHugePages")}

    def one_task():
        return dask_sharedmem.get(dsk, "x", num_workers=workers)

    def map100():
        return dask_sharedmem.MapReduce(np=workers).map(inc, range(100))

    def threads():
        return dask.threaded.get(dsk, "x", num_workers=workers)

    t = time.perf_counter()
    first = one_task()
    out["first"] = time.perf_counter() - t
    out["repeated"], repeated = _median_time(one_task, repeats)
    map100()
    out["map"], mapped = _median_time(map100, repeats)
    threads()
    out["threads"], threaded = _median_time(threads, repeats)
    out["result"] = {"first": first, "repeated": repeated, "map": list(mapped),
                     "threads": threaded}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
