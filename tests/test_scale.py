"""Scale: a graph of 200,000 tasks and a map over 1,000,000 items complete;
20,000 large results alive at once do not exhaust file descriptors.

    pytest tests/test_scale.py -m "slow or not slow" -s   # the 200,000-task graph too


Each test prints (and lists in the terminal summary) its time and the
parent's memory: RSS before the run and its peak during the run (VmHWM,
reset by writing 5 to /proc/self/clear_refs just before).  The graph also
runs on dask's threaded scheduler, for comparison.  Tests that take more
than 30 seconds here are marked ``slow`` and run only with ``pytest -m slow``.
"""

import resource
import subprocess
import sys
import time

import dask.threaded
import numpy as np
import pytest
from conftest import measured, open_fds, status
from dask.utils_test import inc

import dask_sharedmem
from dask_sharedmem import MapReduce, memory

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("no_leaks", "always_fork")]

MB = 1 << 20


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


def part(i):
    return np.full(8192, i, dtype="f8")  # 64 KiB: at the threshold, so it travels in shared memory


def check_parts(*parts):
    return all(p.shape == (8192,) and p[0] == p[-1] == i for i, p in enumerate(parts))


def test_20000_large_results_alive_at_once():
    """20,000 results of 64 KiB, all alive in the parent and in one task at once.

    The limit on open files here is 20,000, so one descriptor per result
    cannot work: results in one batch share a segment, and past half the
    limit the oldest descriptors are closed (memory._trim_fds).
    """
    n = 20_000
    dsk = {("part", i): (part, i) for i in range(n)}
    keys = list(dsk)
    dsk["check"] = (check_parts, *keys)
    fds_before = len(open_fds())
    ok, parts = measure(f"get, {n} results of 64 KiB alive at once (returned, and all inputs "
                        "of one task), 2 workers",
                        lambda: dask_sharedmem.get(dsk, ["check", keys], num_workers=2))
    assert ok is True
    assert len(parts) == n and all(p[0] == i and p[-1] == i for i, p in enumerate(parts))
    segments = {id(memory._segment_of(p)) for p in parts}
    fds = len(open_fds())
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    measured(f"scale {n} live results of 64 KiB: {len(segments)} segments, open fds "
             f"{fds_before} -> {fds} while they live (limit {limit})")
    assert fds - fds_before <= len(segments) and fds < limit // 2
    del parts

    with MapReduce(np=2) as pool:
        parts = measure(f"MapReduce.map, {n} results of 64 KiB, 2 workers",
                        lambda: pool.map(part, range(n)))
    assert check_parts(*parts)


LOW_LIMIT = r"""
import gc, os, resource, sys
import numpy as np
import dask_sharedmem
from dask_sharedmem import MapReduce, channel, memory

resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))
memory._fd_budget = 64
channel._PACK_ITEM_MAX = 0  # one segment per array: the fallbacks, not the packs, must cope
n = 1000

# arrays the user made: far more than the limit
mine = [dask_sharedmem.full(10, i) for i in range(n)]
assert len(memory._FDS) <= 64 and len(os.listdir("/proc/self/fd")) < 128

def part(i):
    return np.full(8192, i, dtype="f8")

def check(*parts):
    return all(p[0] == p[-1] == i for i, p in enumerate(parts))

dsk = {("part", i): (part, i) for i in range(n)}
keys = list(dsk)
dsk["check"] = (check, *keys)
dsk["mine"] = (check, *mine)  # inherited segments, most of them without a descriptor
ok, ok_mine, parts = dask_sharedmem.get(dsk, ["check", "mine", keys], num_workers=2)
assert ok and ok_mine and check(*parts)

with MapReduce(np=2) as pool:  # results come back while the parent holds n arrays
    back = pool.map(lambda i: mine[i] + parts[i][:10] + 0 * part(i)[:10], range(n))
assert all((b == 2 * i).all() for i, b in enumerate(back))

# segments made after the fork, sent to a worker that does not know them
late = [dask_sharedmem.full(8192, i) for i in range(n)]
dsk = {"late": (check, *late)}
assert dask_sharedmem.get(dsk, "late", num_workers=1)
# threads that make, send and drop segments while others do the same
import threading
errors = []

def churn(k):
    try:
        a, b = channel.pair()
        for i in range(300):
            x = dask_sharedmem.full(100, k * 1000 + i)
            a.send([x, np.full(20_000, i)])
            y, z = b.recv()
            assert y[0] == k * 1000 + i and z[-1] == i
        a.close(); b.close()
    except BaseException as e:
        errors.append(e)

threads = [threading.Thread(target=churn, args=(k,)) for k in range(4)]
for t in threads: t.start()
for t in threads: t.join()
assert not errors, errors
assert memory._pinned == 0

del mine, parts, back, late, dsk
gc.collect()
left = (len(memory._SEGMENTS), len(memory._FDS))
assert left == (0, 0), left
print("fds at the end", len(os.listdir("/proc/self/fd")))
"""


def test_thousands_of_live_arrays_under_a_limit_of_128_open_files():
    """With 128 descriptors allowed, 1,000 live segments in every direction still work."""
    out = subprocess.run([sys.executable, "-c", LOW_LIMIT], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    measured(f"scale 1,000 live segments under RLIMIT_NOFILE 128: {out.stdout.strip()}")
