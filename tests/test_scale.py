"""Scale: a graph of 200,000 tasks and a map over 1,000,000 items complete.

    pytest tests/test_scale.py -m "slow or not slow" -s   # the 200,000-task graph too


Each test prints (and lists in the terminal summary) its time and the
parent's memory: RSS before the run and its peak during the run (VmHWM,
reset by writing 5 to /proc/self/clear_refs just before).  The graph also
runs on dask's threaded scheduler, for comparison.  Tests that take more
than 30 seconds here are marked ``slow`` and run only with ``pytest -m slow``.
"""

import time

import dask.threaded
import pytest
from conftest import measured
from dask.utils_test import inc

import dask_sharedmem
from dask_sharedmem import MapReduce

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("no_leaks")]

MB = 1 << 20


def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def measure(label, run):
    """Run ``run()``; report its time, RSS before and peak RSS during it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM starts again from the current RSS
    before = status("VmRSS")
    t0 = time.perf_counter()
    out = run()
    seconds = time.perf_counter() - t0
    peak = status("VmHWM")
    measured(f"scale {label}: {seconds:.1f} s; parent RSS before {before / MB:.0f} MB, "
             f"peak {peak / MB:.0f} MB (+{(peak - before) / MB:.0f} MB)")
    return out


def tree(leaves, fan_in=10):
    """``leaves`` independent tasks and a tree of sums over them, ``fan_in`` at a time."""
    dsk = {("leaf", i): (inc, i) for i in range(leaves)}
    level = list(dsk)
    depth = 0
    while len(level) > 1:
        depth += 1
        above = []
        for j in range(0, len(level), fan_in):
            key = ("sum", depth, j // fan_in)
            dsk[key] = (sum, level[j:j + fan_in])
            above.append(key)
        level = above
    return dsk, level[0]


@pytest.mark.parametrize("leaves", [18_000, pytest.param(180_000, marks=pytest.mark.slow)],
                         ids=["20k-tasks", "200k-tasks"])
def test_graph_of_many_tasks(leaves):
    """Many small independent tasks and a tree reduction over them (200,001 tasks when slow)."""
    dsk, top = tree(leaves)
    expected = sum(range(1, leaves + 1))
    out = measure(f"get, {len(dsk)} tasks ({leaves} leaves and a sum tree of fan-in 10), "
                  "2 workers", lambda: dask_sharedmem.get(dsk, top, num_workers=2))
    assert out == expected
    out = measure(f"dask threads, the same {len(dsk)} tasks, 2 threads",
                  lambda: dask.threaded.get(dsk, top, num_workers=2))
    assert out == expected


def double(i):
    return 2 * i


def test_map_over_1000000_items():
    with MapReduce(np=2) as pool:
        out = measure("MapReduce.map over 1,000,000 items, 2 workers",
                      lambda: pool.map(double, range(1_000_000)))
    assert len(out) == 1_000_000 and out[-1] == 1_999_998 and sum(out) == 999_999_000_000
