"""Soak: a thousand sessions in a row leave nothing behind.

Each test repeats one kind of session many times and checks that the
parent's resident memory (after a warm-up; a little slack for allocator
noise), open file descriptors, child processes and live shared segments do
not grow.  Workers of a session that ended normally are reaped lazily (by a
later session, see pool.py): their number stays within the bound during the
loop, and resources are counted after waiting for them.  By default (CI)
each loop runs 50 times; for the long run set ``DASK_SHAREDMEM_SOAK`` to the
number of iterations::

    DASK_SHAREDMEM_SOAK=1000 pytest tests/test_soak.py -m soak -s

The numbers (duration, memory at the start and end of the loop, and its
peak) are printed and listed in the terminal summary.
"""

import gc
import os
import time

import dask
import dask.array as da
import numpy as np
import pytest
from conftest import children, live_segments, measured, open_fds, status

import dask_sharedmem
from dask_sharedmem import MapReduce, pool

N = int(os.environ.get("DASK_SHAREDMEM_SOAK", "50"))
WARMUP = 5
MB = 1 << 20
# RSS may grow this much over the loop: pymalloc arenas, numpy's caches and
# dask's tokenize caches settle in after a while, a leak does not
SLACK = 16 * MB

pytestmark = [pytest.mark.soak, pytest.mark.timeout(120 + N),
              pytest.mark.usefixtures("no_leaks", "always_fork")]


def resources():
    pool._reap_finished(block=True)
    gc.collect()
    return {"rss": status("VmRSS"), "anon": status("RssAnon"), "fds": len(open_fds()),
            "children": len(children()), "segments": live_segments()}


def reset_peak():
    """Make VmHWM (peak RSS) start again from the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def soak(name, step):
    """Run ``step`` WARMUP + N times; check and report that nothing grew."""
    for _ in range(WARMUP):
        step()
    start = resources()
    reset_peak()
    t0 = time.perf_counter()
    pending = 0  # finished workers not reaped yet, at most
    for _ in range(N):
        step()
        pending = max(pending, len(pool._finished))
    seconds = time.perf_counter() - t0
    peak = status("VmHWM")
    end = resources()
    mb = lambda b: f"{b / MB:.1f} MB"
    measured(f"soak {name}: {N} iterations in {seconds:.1f} s ({seconds / N * 1e3:.1f} ms each); "
             f"RSS {mb(start['rss'])} -> {mb(end['rss'])} (peak {mb(peak)}), anonymous "
             f"{mb(start['anon'])} -> {mb(end['anon'])}; fds {start['fds']} -> {end['fds']}, "
             f"children {start['children']} -> {end['children']}, live segments "
             f"{start['segments']} -> {end['segments']}; finished workers pending at most "
             f"{pending} (bound {pool._MAX_FINISHED})")
    assert pending <= pool._MAX_FINISHED
    for key in ("fds", "children", "segments"):
        assert end[key] <= start[key], (key, start, end)
    assert end["rss"] - start["rss"] <= SLACK, (start, end)
    assert end["anon"] - start["anon"] <= SLACK, (start, end)


def test_soak_compute():
    """compute() of a graph on a shared array, with large intermediates and a large result."""
    a = dask_sharedmem.empty((1024, 1024))  # 8 MB
    a[...] = np.arange(a.size).reshape(a.shape) % 1000
    x = da.from_array(a, chunks=(128, 1024))  # 1 MB chunks: they travel as shared memory
    expected_sum = float((a + 1).sum())
    expected = np.sqrt(a) * 2

    def step():
        total = (x + 1).sum().compute(scheduler="sharedmem", num_workers=2)
        assert float(total) == expected_sum
        out = (da.sqrt(x) * 2).compute(scheduler="sharedmem", num_workers=2)  # 8 MB back
        np.testing.assert_array_equal(out, expected)

    soak("compute", step)


def test_soak_compute_in_the_caller(sessions):
    """The same compute as a quick graph that runs in the caller (scheduler.py)."""
    a = dask_sharedmem.empty((1024, 1024))
    a[...] = np.arange(a.size).reshape(a.shape) % 1000
    x = da.from_array(a, chunks=(128, 1024))
    expected_sum = float((a + 1).sum())

    def step():
        with dask.config.set({"sharedmem.inline": 1.0}):  # seconds: any repeat of it
            total = (x + 1).sum().compute(scheduler="sharedmem", num_workers=2)
            out = (da.sqrt(x) * 2).compute(scheduler="sharedmem", num_workers=2)
        assert float(total) == expected_sum and out.shape == a.shape

    soak("compute in the caller", step)
    assert len(sessions) <= 2  # the first call of each graph forked, no other


def test_soak_map():
    """MapReduce.map with large (shared memory) and small results."""
    a = dask_sharedmem.empty((64, 32768))  # 64 rows of 256 KiB
    a[...] = np.arange(a.shape[1])

    def work(i):
        return a[i] * 2 if i % 2 else float(a[i].sum())

    def step():
        with MapReduce(np=2) as pool:
            out = pool.map(work, range(len(a)))
        assert out[2] == float(a[2].sum())
        np.testing.assert_array_equal(out[3], a[3] * 2)

    soak("map", step)
