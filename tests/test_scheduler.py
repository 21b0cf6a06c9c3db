"""scheduler.py: ``get`` runs real dask graphs on real forked workers.

Every compute here forks real worker processes; every answer is checked
against dask's own schedulers (``sync`` or ``threads``) or numpy.  Each test
runs under a timeout (an error must arrive, never a hang) and the
``no_leaks`` check (no child process, file descriptor or shared segment left
behind, after errors too).  Nothing here asserts on timing.
"""

import collections
import faulthandler
import io
import itertools
import math
import operator
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from operator import add
from typing import NamedTuple

import cloudpickle
import dask
import dask.array as da
import dask.bag as db
import dask.local
import numpy as np
import pytest
from conftest import ended, live_segments, subprocess_script
from dask.callbacks import Callback
from dask.diagnostics import Profiler, ProgressBar, ResourceProfiler
from dask.highlevelgraph import HighLevelGraph
from dask.utils_test import GetFunctionTestMixin, inc

import dask_sharedmem
from dask_sharedmem import channel, joins, memory, transports
from dask_sharedmem.remote import RemoteTraceback

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_leaks")]

MB = 1 << 20


def getpid(*args):
    return os.getpid()


def still_works():
    """After an error the scheduler must be as good as new."""
    assert dask_sharedmem.get({"x": 1, "y": (inc, "x")}, "y", num_workers=2) == 2


def meet(slots, i, parties):
    """Write our pid to ``slots[i]`` and wait until ``parties`` distinct pids are there.

    A rendezvous, not a timer: it returns as soon as enough different workers
    have arrived.  The deadline only turns a wrong answer (tasks run one after
    the other in one process) into a failed assertion instead of a hang.
    """
    slots[i] = os.getpid()
    deadline = time.monotonic() + 20
    while len(set(slots[slots != 0].tolist())) < parties and time.monotonic() < deadline:
        time.sleep(0.001)
    return os.getpid()


# -- entry points and options ---------------------------------------------------

def test_dask_compute_with_get():
    x = da.arange(100, chunks=10)
    (total, doubled) = dask.compute(x.sum(), x * 2, scheduler=dask_sharedmem.get)
    assert total == 4950
    np.testing.assert_array_equal(doubled, np.arange(100) * 2)


def test_scheduler_by_name():
    x = da.arange(100, chunks=10)
    assert x.sum().compute(scheduler="sharedmem") == 4950


def test_scheduler_by_config():
    x = da.arange(100, chunks=10)
    pid = dask.delayed(getpid)()
    with dask.config.set(scheduler="sharedmem"):
        assert x.sum().compute() == 4950
        assert pid.compute() != os.getpid()
    assert pid.compute(scheduler="sync") == os.getpid()


def test_one_worker_runs_every_task():
    tasks = [dask.delayed(getpid)(i) for i in range(8)]
    pids = set(dask.compute(*tasks, scheduler="sharedmem", num_workers=1))
    assert len(pids) == 1 and os.getpid() not in pids


def test_num_workers_two_processes():
    slots = memory.zeros(2, dtype="i8")
    tasks = [dask.delayed(meet)(slots, i, 2) for i in range(2)]
    pids = set(dask.compute(*tasks, scheduler="sharedmem", num_workers=2))
    assert len(pids) == 2 and os.getpid() not in pids


def test_num_workers_from_dask_config():
    tasks = [dask.delayed(getpid)(i) for i in range(8)]
    with dask.config.set(num_workers=1):
        pids = set(dask.compute(*tasks, scheduler="sharedmem"))
    assert len(pids) == 1 and os.getpid() not in pids
    slots = memory.zeros(2, dtype="i8")
    meets = [dask.delayed(meet)(slots, i, 2) for i in range(2)]
    with dask.config.set(num_workers=2, scheduler="sharedmem"):
        pids = set(dask.compute(*meets))
    assert len(pids) == 2 and os.getpid() not in pids


def test_num_workers_from_sharedmem_config():
    tasks = [dask.delayed(getpid)(i) for i in range(8)]
    with dask.config.set({"sharedmem.num-workers": 1}):
        pids = set(dask.compute(*tasks, scheduler="sharedmem"))
    assert len(pids) == 1


@pytest.mark.parametrize("bad, kind", [(0, ValueError), (-1, ValueError), ("2", TypeError),
                                       (2.0, TypeError), (True, TypeError)])
def test_bad_num_workers(bad, kind):
    with pytest.raises(kind, match="num_workers"):
        dask_sharedmem.get({"x": 1}, "x", num_workers=bad)
    with pytest.raises(kind, match="num_workers"):
        da.ones(4, chunks=2).sum().compute(scheduler="sharedmem", num_workers=bad)
    still_works()


def test_legacy_dict_graph():
    dsk = {"x": 1, "y": (inc, "x"), "z": (add, "x", "y"), "w": (sum, ["x", "y", "z"])}
    assert dask_sharedmem.get(dsk, "w", num_workers=2) == 6
    assert dask_sharedmem.get(dsk, ["x", "z"], num_workers=2) == (1, 3)


def test_nested_list_keys():
    dsk = {"a": 1, "b": (inc, "a"), "c": (inc, "b"), "d": (add, "a", "c")}
    out = dask_sharedmem.get(dsk, [["a", ["b"]], "c", [["d"]]], num_workers=2)
    assert out == ((1, (2,)), 3, ((4,),))


def test_high_level_graph():
    layers = {"a": {"x": 1, "y": (inc, "x")}, "b": {"z": (add, (inc, "x"), "y")}}
    graph = HighLevelGraph(layers, {"a": set(), "b": {"a"}})
    assert dask_sharedmem.get(graph, "z", num_workers=2) == 4


def test_object_with_dask_graph():
    class Graph:
        def __dask_graph__(self):
            return {"x": 20, "y": (add, "x", 22)}

    assert dask_sharedmem.get(Graph(), "y", num_workers=2) == 42
    x = da.arange(6, chunks=3) + 1
    chunks = dask_sharedmem.get(x, x.__dask_keys__(), num_workers=2)
    np.testing.assert_array_equal(np.concatenate(chunks), np.arange(1, 7))


def test_empty_key_list():
    assert dask_sharedmem.get({"x": 1}, [], num_workers=2) == ()


def test_concurrent_computes_from_threads():
    """Sessions started by different threads overlap: each one's workers also
    inherit the other session's sockets, which must not keep them from ending
    (this used to deadlock)."""
    def job(i):
        x = da.arange(20000, chunks=2000) * i
        return int(x.sum().compute(scheduler="sharedmem", num_workers=2))

    results = {}

    def run(ids):
        for i in ids:
            results[i] = job(i)

    # daemon threads and a bounded join: a deadlock fails the test instead of
    # hanging the whole run in an executor's shutdown
    threads = [threading.Thread(target=run, args=(range(k, 12, 3),), daemon=True)
               for k in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "concurrent computes deadlocked"
    assert results == {i: i * 199990000 for i in range(12)}


def test_nested_compute_inside_a_task():
    @dask.delayed
    def inner(i):
        return int((da.arange(100, chunks=10) * i).sum().compute(scheduler="sharedmem",
                                                                 num_workers=2))

    out = dask.compute(*[inner(i) for i in range(3)], scheduler="sharedmem", num_workers=2)
    assert out == (0, 4950, 9900)


# -- workers are forked: tasks are never pickled -----------------------------------

def test_closures_over_unpicklable_objects(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello")
    lock = threading.Lock()
    with open(path) as f:
        def task(i):
            with lock:
                return os.pread(f.fileno(), 100, 0).decode() + str(i)

        with pytest.raises(Exception):
            cloudpickle.dumps(task)  # so no scheduler that pickles tasks could run it
        out = dask.compute(*[dask.delayed(task)(i) for i in range(6)],
                           scheduler="sharedmem", num_workers=2)
        assert out == tuple(f"hello{i}" for i in range(6))
        # a graph of raw lambdas over the lock, too
        dsk = {"a": (lambda: lock.locked(),), "b": (lambda a: (a, f.name), "a")}
        assert dask_sharedmem.get(dsk, "b", num_workers=2) == (False, str(path))


def where(a):
    return a.__array_interface__["data"][0], memory._segment_of(a) is None, float(a.sum())


def test_graph_data_is_found_in_the_workers_memory():
    """Data in the graph (here a 2 MiB plain numpy array read by 6 tasks) is
    in each worker's forked memory: read at its own address, never copied."""
    big = np.arange(2 * MB // 8, dtype="f8")
    expected = (big.__array_interface__["data"][0], True, float(big.sum()))
    dsk = {"big": big, **{("t", i): (where, "big") for i in range(6)}}
    out = dask_sharedmem.get(dsk, [("t", i) for i in range(6)], num_workers=2)
    assert out == (expected,) * 6
    data = dask.delayed(big)
    out = dask.compute(*[dask.delayed(where)(data) for _ in range(4)],
                       scheduler="sharedmem", num_workers=2)
    assert out == (expected,) * 4


def test_unpicklable_graph_data():
    lock = threading.Lock()
    locked = lambda lk: lk.locked()
    dsk = {"lock": lock, "a": (locked, "lock"), "b": (locked, "lock")}
    assert dask_sharedmem.get(dsk, ["a", "b"], num_workers=2) == (False, False)


def test_lambda_results_stay_in_the_worker():
    """An unpicklable intermediate is fine as long as it never leaves a worker."""
    dsk = {"f": (lambda: (lambda v: v * 3),), "y": (lambda f: f(14), "f")}
    assert dask_sharedmem.get(dsk, "y", num_workers=2) == 42


# -- shared arrays in and out; large results as shared memory ---------------------

def test_shared_input_is_read_in_place():
    a = memory.empty((100, 80))
    a[...] = np.arange(8000).reshape(100, 80)
    x = da.from_array(a, chunks=(50, 40))
    # from_array copies its input: a SharedArray's copy is shared too
    (stored,) = [v for k, v in dict(x.__dask_graph__()).items() if isinstance(k, str)]
    token = memory._segment_of(stored).token

    def where(block):
        seg = memory._segment_of(block)
        return np.full((1, 1), seg is not None and seg.token == token)

    in_place = x.map_blocks(where, chunks=(1, 1), dtype=bool)
    assert in_place.compute(scheduler="sharedmem", num_workers=2).all()
    assert (x * 2).sum().compute(scheduler="sharedmem", num_workers=2) == 2 * a.sum()


def test_store_into_shared_output():
    x = da.from_array(np.arange(10000.0).reshape(100, 100), chunks=(30, 40))
    out = memory.zeros((100, 100))
    assert da.store(np.sqrt(x) + 1, out, scheduler="sharedmem", num_workers=2) is None
    np.testing.assert_allclose(out, np.sqrt(np.arange(10000.0).reshape(100, 100)) + 1)

    out2 = memory.zeros((100, 100))
    lazy = da.store(x * 3, out2, compute=False, lock=False)
    dask.compute(lazy, scheduler="sharedmem", num_workers=2)
    np.testing.assert_array_equal(out2, np.arange(10000.0).reshape(100, 100) * 3)


def make(n, value):
    return np.full(n, value, dtype="f8")


class Pulls:
    """Counts, by process, the bytes pulled by process_vm_readv (cma.pull), in the
    caller and its workers alike (a shared array: workers are forked after)."""

    def __init__(self, monkeypatch):
        transports.cma.available()  # its probe pulls 16 bytes once per process: not counted
        self.by = dask_sharedmem.zeros(2, dtype="i8")  # [pulled by the caller, by workers]
        caller, pull = os.getpid(), transports.cma.pull

        def counting(pid, remote, local):
            n = sum(n for _, n in local)
            if n != 16:  # not the nonce read back after the data (transports._pull)
                self.by[int(os.getpid() != caller)] += n
            return pull(pid, remote, local)

        monkeypatch.setattr(transports.cma, "pull", counting)


def test_a_large_intermediate_stays_with_its_maker_until_needed(monkeypatch):
    """"a" has two dependents: the caller never copies it; a worker that needs it
    pulls it from its maker (or is its maker), and the caller pulls only "b"."""
    n = MB // 8  # a 1 MiB array, well above the 64 KiB threshold
    pulls = Pulls(monkeypatch)
    dsk = {"a": (make, n, 1.5), "b": (operator.mul, "a", 2), "c": (np.sum, "a")}
    with ProgressBar(out=io.StringIO()):  # a callback that never looks at values
        b, c = dask_sharedmem.get(dsk, ["b", "c"], num_workers=2)
    assert type(b) is np.ndarray and b.shape == (n,)
    np.testing.assert_array_equal(b, np.full(n, 3.0))
    assert c == 1.5 * n
    if transports._active == "cma":
        assert pulls.by[0] == b.nbytes and pulls.by[1] in (0, MB)
    else:
        assert pulls.by.sum() == 0  # mapped, not pulled


def test_large_result_is_a_plain_ndarray():
    x = da.ones((512, 512), chunks=(256, 512)) * 2  # 2 MiB, two 1 MiB chunks
    before = live_segments()
    r = x.compute(scheduler="sharedmem", num_workers=2)
    assert type(r) is np.ndarray
    np.testing.assert_array_equal(r, np.full((512, 512), 2.0))
    del r
    assert live_segments() == before


class Joined:
    """Counts the joins run in the caller (joins.join) and the chunks pulled straight
    into their slots (channel.Held.into)."""

    def __init__(self, monkeypatch):
        self.joins, self.placed = 0, 0
        join, into = joins.join, channel.Held.into

        def counting_join(task, data):
            self.joins += 1
            return join(task, data)

        def counting_into(held, out):
            placed = into(held, out)
            self.placed += placed
            return placed

        monkeypatch.setattr(joins, "join", counting_join)
        monkeypatch.setattr(channel.Held, "into", counting_into)


@pytest.mark.usefixtures("always_fork")
@pytest.mark.parametrize("case", ["regular", "irregular", "3-d", "fortran chunks", "f4"])
def test_chunks_are_pulled_into_their_slots_of_the_joined_array(monkeypatch, case):
    """Large chunks are pulled into their slots, small ones copied from the message."""
    base = np.random.default_rng(1).random((600, 400))
    x = {"regular": lambda: da.from_array(base, chunks=(200, 100)),
         "irregular": lambda: da.from_array(base, chunks=((10, 290, 250, 50), (7, 393))),
         "3-d": lambda: da.from_array(base.reshape(60, 10, 400), chunks=(17, 5, 400)),
         "fortran chunks": lambda: da.from_array(base, chunks=(200, 100)).map_blocks(
             np.asfortranarray),
         "f4": lambda: da.from_array(base.astype("f4"), chunks=(300, 400))}[case]()
    y = da.sqrt(x) + 1
    joined = Joined(monkeypatch)
    got = y.compute(scheduler=dask_sharedmem.get, num_workers=2)
    want = y.compute(scheduler="threads")
    assert type(got) is np.ndarray and got.flags.c_contiguous
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    large = sum(math.prod(shape) * y.dtype.itemsize >= channel.DEFAULT_THRESHOLD
                for shape in itertools.product(*y.chunks))
    assert (joined.joins, joined.placed) == (1, large) and large


@pytest.mark.usefixtures("always_fork")
@pytest.mark.parametrize("case", ["shape", "dtype"])
def test_chunks_unlike_their_annotations_are_joined_as_threads_join_them(case):
    """map_blocks told nothing of what its function does: dask's annotations are wrong,
    and threads' join (concatenate3) goes by the chunks themselves."""
    x = da.from_array(np.arange(400_000.0).reshape(800, 500), chunks=(200, 500))
    if case == "shape":  # told the chunks stay as they are
        y = x.map_blocks(lambda b: b[:-1], chunks=x.chunks)
    else:  # told the dtype stays float64
        y = x.map_blocks(lambda b: b.astype("f4"), dtype="f8")
    got = y.compute(scheduler=dask_sharedmem.get, num_workers=2)
    want = y.compute(scheduler="threads")
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


N_BIG = 200_000  # 1.6 MB of float64: above the threshold

RESULTS = {  # large results of every layout, and some that must travel by pickle
    "strided": (lambda: np.arange(3 * N_BIG, dtype="f8")[::3], np.ndarray),
    "fortran": (lambda: np.asfortranarray(np.arange(2 * N_BIG, dtype="f8").reshape(400, -1)),
                np.ndarray),
    "reversed": (lambda: np.arange(N_BIG, dtype="f8")[::-1], np.ndarray),
    "broadcast": (lambda: np.broadcast_to(np.arange(500.0), (500, 500)), np.ndarray),
    "structured": (lambda: np.ones(N_BIG, dtype=[("a", "f8"), ("b", "i4")]), np.ndarray),
    "big-endian": (lambda: np.arange(N_BIG, dtype=">f8"), np.ndarray),
    "object": (lambda: np.array([str(i) for i in range(N_BIG // 10)], dtype=object),
               np.ndarray),
    "masked": (lambda: np.ma.masked_less(np.arange(N_BIG, dtype="f8"), 10), np.ma.MaskedArray),
    # results are ordinary arrays, even those over shared memory
    "shared-made-in-task": (lambda: dask_sharedmem.full(N_BIG, 3.0), np.ndarray),
}


@pytest.mark.parametrize("name", list(RESULTS))
def test_large_results_of_every_layout(name):
    make_result, kind = RESULTS[name]
    expected = make_result()
    got = dask_sharedmem.get({"x": (make_result,)}, "x", num_workers=1)
    assert type(got) is kind
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    if kind is np.ma.MaskedArray:
        np.testing.assert_array_equal(got.mask, expected.mask)


def accumulate(total, part):
    return part.copy() if total is None else total + part


def make_after(n, value, _previous):
    return make(n, value)


def _reducer_chain(count, n, lag):
    """``count`` producers of ``n`` floats, summed by a chain of reducers.

    With ``lag``, producer ``i`` also waits for reducer ``i - lag``: a bound on
    how far producers may run ahead that holds whatever the timing.
    """
    dsk = {}
    for i in range(count):
        if lag and i >= lag:
            dsk[("p", i)] = (make_after, n, float(i), ("r", i - lag))
        else:
            dsk[("p", i)] = (make, n, float(i))
    dsk[("r", 0)] = (accumulate, None, ("p", 0))
    for i in range(1, count):
        dsk[("r", i)] = (accumulate, ("r", i - 1), ("p", i))
    return dsk


def accumulate_counting(kept, total, part):
    """accumulate, and the most values a worker has kept for others so far."""
    kept[os.getpid() % len(kept)] = max(kept[os.getpid() % len(kept)], len(channel._KEPT))
    return accumulate(total, part)


def test_intermediates_are_freed_during_the_run():
    """50 results of 8 MiB, each used once: each is freed as soon as it is used.

    Reducer ``i`` (8 MiB) is needed by reducer ``i + 1`` and producer ``i + 2``,
    so the workers keep a few at a time; kept to the end, 50 would be alive.
    """
    count, n = 50, 8 * MB // 8
    kept = dask_sharedmem.zeros(1 << 16, dtype="i8")
    dsk = _reducer_chain(count, n, lag=2)
    for i in range(1, count):
        dsk[("r", i)] = (accumulate_counting, kept, ("r", i - 1), ("p", i))
    r = dask_sharedmem.get(dsk, ("r", count - 1), num_workers=2)
    assert type(r) is np.ndarray and r.shape == (n,)
    np.testing.assert_array_equal(r[:3], np.full(3, sum(range(count)), dtype="f8"))
    assert 0 < kept.max() <= 8, f"values kept by a worker at once: {kept.max()}"
    assert not channel._KEPT


def test_unconstrained_reducer_chain_completes():
    """Producers are free to run ahead of the reducers (how far depends on
    timing, as with dask's threaded scheduler): the answer is right and
    everything is freed at the end."""
    count, n = 50, 8 * MB // 8
    before = live_segments()
    r = dask_sharedmem.get(_reducer_chain(count, n, lag=0), ("r", count - 1), num_workers=2)
    np.testing.assert_array_equal(r[-3:], np.full(3, sum(range(count)), dtype="f8"))
    del r
    assert live_segments() == before


# -- dask's callbacks ------------------------------------------------------------

def test_progress_bar_reaches_100_percent():
    out = io.StringIO()
    x = da.ones((100, 100), chunks=10)
    with ProgressBar(out=out, dt=0.01):
        assert (x + 1).sum().compute(scheduler="sharedmem", num_workers=2) == 20000
    assert "100%" in out.getvalue()


def test_profiler_records_every_task_with_worker_ids():
    x = da.ones((100, 100), chunks=25)
    expr = (x + 1).sum(axis=0)
    with Profiler() as sync:
        expr.compute(scheduler="sync")
    with Profiler() as prof:
        expr.compute(scheduler="sharedmem", num_workers=2)
    assert len(prof.results) == len(sync.results) > 10
    assert len({r.key for r in prof.results}) == len(prof.results)  # each task once
    # ranks 0 and 1; the join of the chunks (finalize) runs in the caller, id 2
    ids = {r.key: r.worker_id for r in prof.results}
    assert set(ids.values()) <= {0, 1, 2}
    assert {k for k, i in ids.items() if i == 2} <= {expr.__dask_keys__()[0][0]} | {
        k for k in ids if "finalize" in str(k)}
    assert all(r.end_time >= r.start_time for r in prof.results)


def test_resource_profiler():
    pytest.importorskip("psutil")
    x = da.ones((200, 200), chunks=50)
    with ResourceProfiler(dt=0.01) as rprof:
        assert x.sum().compute(scheduler="sharedmem", num_workers=2) == 40000
    assert rprof.results and all(r.mem > 0 for r in rprof.results)


def test_resource_profiler_started_by_the_callback():
    pytest.importorskip("psutil")
    """Registered, not entered: its tracker process is forked *during* get.

    That tracker inherits the parent's ends of the workers' sockets; the
    workers must still see the end of the session (this used to hang).
    """
    x = da.ones((200, 200), chunks=50)
    rprof = ResourceProfiler(dt=0.01)
    rprof.register()
    try:
        assert x.sum().compute(scheduler="sharedmem", num_workers=2) == 40000
    finally:
        rprof.unregister()
        rprof.close()
    assert rprof.results


class Recorder(Callback):
    def __init__(self):
        super().__init__()
        self.calls = {"start": 0, "start_state": 0, "finish": 0}
        self.pre, self.post = [], []
        self.failed = None

    def _start(self, dsk):
        self.calls["start"] += 1

    def _start_state(self, dsk, state):
        self.calls["start_state"] += 1

    def _pretask(self, key, dsk, state):
        self.pre.append(key)

    def _posttask(self, key, result, dsk, state, worker_id):
        self.post.append(key)

    def _finish(self, dsk, state, failed):
        self.calls["finish"] += 1
        self.failed = failed


def test_callbacks_match_the_sync_scheduler():
    x = da.arange(1000, chunks=50)
    expr = ((x + 1) * 2).sum() + x.mean()
    graph, keys = expr.__dask_graph__(), expr.__dask_keys__()
    results = {}
    for name, get in (("sync", dask.local.get_sync), ("sharedmem", dask_sharedmem.get)):
        with Recorder() as rec:
            value = get(graph, keys)
        results[name] = (value, rec)
    (v_sync, sync), (v_shm, shm) = results["sync"], results["sharedmem"]
    assert v_shm == v_sync
    assert shm.calls == sync.calls == {"start": 1, "start_state": 1, "finish": 1}
    assert shm.failed is False
    assert len(shm.pre) == len(shm.post) == len(sync.pre) > 20
    assert len(set(shm.pre)) == len(shm.pre)
    assert set(shm.pre) == set(shm.post) == set(sync.pre) == set(sync.post)
    # and through .compute(), which optimizes the graph first
    counts = {}
    for scheduler in ("sync", "sharedmem"):
        with Recorder() as rec:
            assert expr.compute(scheduler=scheduler) == v_sync
        assert rec.calls == {"start": 1, "start_state": 1, "finish": 1}
        counts[scheduler] = (len(rec.pre), len(set(rec.pre)), len(rec.post), len(set(rec.post)))
    assert counts["sharedmem"] == counts["sync"]


def test_callbacks_passed_as_argument():
    rec = Recorder()
    dsk = {"x": 1, "y": (inc, "x"), "z": (inc, "y")}
    assert dask_sharedmem.get(dsk, "z", num_workers=2, callbacks=[rec._callback]) == 3
    assert rec.calls == {"start": 1, "start_state": 1, "finish": 1}
    assert sorted(rec.post) == sorted(rec.pre) and "z" in rec.post


def test_finish_callback_told_of_failure():
    with Recorder() as rec, pytest.raises(ZeroDivisionError):
        dask_sharedmem.get({"x": (operator.truediv, 1, 0)}, "x", num_workers=2)
    assert rec.calls["finish"] == 1 and rec.failed is True


# -- dask's contract for get functions ----------------------------------------------

class TestGetFunction(GetFunctionTestMixin):
    get = staticmethod(dask_sharedmem.get)


# -- dask workloads, checked against the threaded scheduler -----------------------

def _source(shape=(120, 90), chunks=(40, 30), seed=0):
    return da.from_array(np.random.default_rng(seed).standard_normal(shape), chunks=chunks)


def _tall():
    return _source((400, 20), (100, 20), seed=1)


def _smooth(block):
    return block + np.roll(block, 1, axis=0) + np.roll(block, -1, axis=1)


WORKLOADS = {
    "sum": lambda: _source().sum(),
    "sum-axis0": lambda: _source().sum(axis=0),
    "mean-axis1": lambda: _source().mean(axis=1),
    "std": lambda: _source().std(axis=0),
    "argmax-axis0": lambda: _source().argmax(axis=0),
    "argmax-axis1": lambda: _source().argmax(axis=1),
    "elementwise": lambda: da.sin(_source()) ** 2 + da.exp(-abs(_source(seed=2))),
    "map_blocks": lambda: _source().map_blocks(lambda b: b * b.sum(), dtype="f8"),
    "map_overlap": lambda: _source().map_overlap(_smooth, depth=1, boundary="reflect"),
    "overlap": lambda: da.overlap.trim_internal(
        da.overlap.overlap(_source(), depth={0: 2, 1: 1}, boundary={0: "periodic", 1: 0}),
        {0: 2, 1: 1}),
    "rechunk": lambda: _source().rechunk((37, 53)) * 2,
    "transpose-dot": lambda: _source() @ _source().T,
    "qr-r": lambda: da.linalg.qr(_tall())[1],
    "qr-qr": lambda: operator.matmul(*da.linalg.qr(_tall())),
    "svd-s": lambda: da.linalg.svd(_tall())[1],
    "random": lambda: da.random.default_rng(42).standard_normal((300, 200), chunks=(100, 50)),
    "random-sum": lambda: da.random.default_rng(7).random((300, 200), chunks=50).sum(axis=1),
    "cumsum": lambda: _source().cumsum(axis=0),
    "reshape-slice": lambda: _source()[::3, 5:70].reshape(-1)[::7],
}


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_array_workload_matches_threads(name):
    expected = WORKLOADS[name]().compute(scheduler="threads")
    got = WORKLOADS[name]().compute(scheduler="sharedmem", num_workers=2)
    assert type(got) is type(expected)  # a plain ndarray or numpy scalar, never shared
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_qr_reconstructs_input():
    x = _tall()
    q, r = da.linalg.qr(x)
    q, r, xv = dask.compute(q, r, x, scheduler="sharedmem", num_workers=2)
    np.testing.assert_allclose(q @ r, xv, atol=1e-10)


def test_random_same_seed_same_answer():
    def make_x():
        return da.random.default_rng(123).standard_normal((200, 100), chunks=50)

    a = make_x().compute(scheduler="sharedmem", num_workers=2)
    b = make_x().compute(scheduler="sharedmem", num_workers=1)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, make_x().compute(scheduler="threads"))


def test_store_workload_matches_threads():
    expr = da.linalg.qr(_tall())[0] * 3
    out_threads = np.zeros(expr.shape)
    da.store(expr, out_threads, scheduler="threads")
    out = memory.zeros(expr.shape)
    assert da.store(expr, out, scheduler="sharedmem", num_workers=2) is None
    np.testing.assert_allclose(out, out_threads, rtol=1e-12, atol=1e-12)


def test_bag():
    b = db.from_sequence(range(1000), npartitions=8)
    expr = b.map(lambda v: v * v).filter(lambda v: v % 3 == 0)
    assert expr.sum().compute(scheduler="sharedmem", num_workers=2) == \
        expr.sum().compute(scheduler="sync")
    freq = db.from_sequence("the quick brown fox jumps over the lazy dog".split(),
                            npartitions=3).frequencies()
    assert dict(freq.compute(scheduler="sharedmem", num_workers=2)) == \
        dict(freq.compute(scheduler="sync"))


def test_delayed():
    @dask.delayed
    def square(v):
        return v * v

    @dask.delayed
    def total(*vs):
        return sum(vs)

    parts = [square(i) for i in range(20)]
    assert total(*parts).compute(scheduler="sharedmem", num_workers=2) == \
        sum(i * i for i in range(20))
    pids = dask.delayed(set)([dask.delayed(getpid)(p) for p in parts])
    assert os.getpid() not in pids.compute(scheduler="sharedmem", num_workers=2)



# -- classes and functions that pickle cannot find by name -----------------------
# Threads give back the very objects; a worker forked after the caller made them
# has them too, so its results refer to them.  What a task makes travels by value.

def test_a_class_defined_in_the_caller_comes_back_as_itself(always_fork):
    class Local(NamedTuple):
        a: int
        b: float = 0.5

    dsk = {"x": (lambda: (os.getpid(), Local(1), [Local(2, 3.0)]),)}
    pid, one, more = dask_sharedmem.get(dsk, "x", num_workers=2)
    assert pid != os.getpid()
    assert type(one) is Local and one == Local(1) and one.b == 0.5
    assert type(more[0]) is Local and more == [Local(2, 3.0)]


def test_a_function_defined_in_the_caller_comes_back_as_itself(always_fork):
    offset = 10

    def local(v):
        return v + offset

    square = lambda v: v * v
    dsk = {"x": (lambda: (os.getpid(), local, [square]),)}
    pid, f, (g,) = dask_sharedmem.get(dsk, "x", num_workers=2)
    assert pid != os.getpid()
    assert f is local and g is square


def test_a_class_or_function_made_by_the_task_comes_back_by_value(always_fork):
    def make(v):
        class Inner(NamedTuple):
            v: int

        return os.getpid(), Inner(v), lambda: v * 2

    pid, inner, f = dask_sharedmem.get({"x": (make, 4)}, "x", num_workers=2)
    assert pid != os.getpid()
    assert type(inner).__name__ == "Inner"  # cloudpickle's copy, as dask's processes give
    assert inner.v == 4 and inner == (4,) and f() == 8


def test_a_function_made_by_the_task_that_cannot_travel_names_the_task(always_fork):
    def make(x):
        lock = threading.Lock()  # neither found in the caller nor picklable by value
        return lambda: lock.locked()

    with pytest.raises(pickle.UnpicklingError, match="'unsendable'") as info:
        dask_sharedmem.get({"x": 1, "unsendable": (make, "x")}, "unsendable", num_workers=2)
    assert "lock" in str(info.value)
    still_works()


def test_dask_delayed_with_namedtuple(always_fork):
    """dask's own dask/tests/test_delayed.py::test_delayed_with_namedtuple, under get."""
    from dask import delayed

    class ANamedTuple(NamedTuple):
        a: int

    with dask.config.set(scheduler=dask_sharedmem.get, num_workers=2):
        literal = dask.delayed(3)
        with_class = dask.delayed({"a": ANamedTuple(a=literal)})
        assert with_class.compute() == {"a": ANamedTuple(a=3)}
        assert type(with_class.compute()["a"]) is ANamedTuple

        def return_nested(obj):
            return obj["a"].a

        final = delayed(return_nested)(with_class)

        assert final.compute() == 3


# -- errors ----------------------------------------------------------------------

class CustomError(Exception):
    pass


class UnpicklableError(Exception):
    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


def divide_by_zero_task(x):
    return x / 0


def raise_custom_task(x):
    raise CustomError(f"custom failure with {x}")


def raise_unpicklable_task(x):
    raise UnpicklableError(f"unpicklable failure with {x}")


def kill_self_task(x):
    os.kill(os.getpid(), signal.SIGKILL)


def segfault_task(x):
    faulthandler.disable()  # pytest's handler would print every thread's stack first
    os.kill(os.getpid(), signal.SIGSEGV)


def exit_task(x):
    os._exit(3)


def _failing_graph(func):
    dsk = {("ok", i): (inc, i) for i in range(6)}
    dsk["bad"] = (func, ("ok", 0))
    dsk["after"] = (add, "bad", ("ok", 1))
    dsk["total"] = (sum, [("ok", i) for i in range(6)] + ["after"])
    return dsk


@pytest.mark.parametrize("func, kind, message", [
    (divide_by_zero_task, ZeroDivisionError, "division by zero"),
    (raise_custom_task, CustomError, "custom failure with 1"),
])
def test_task_exception_keeps_its_type(func, kind, message):
    with pytest.raises(kind, match=message) as info:
        dask_sharedmem.get(_failing_graph(func), "total", num_workers=2)
    assert type(info.value) is kind
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert func.__name__ in str(cause) and kind.__name__ in str(cause)
    still_works()


def test_exception_of_a_class_defined_in_the_caller_keeps_its_type(always_fork):
    class LocalError(ValueError):
        pass

    def fail(x):
        raise LocalError(f"local failure with {x}")

    with pytest.raises(LocalError, match="local failure with 1") as info:
        dask_sharedmem.get(_failing_graph(fail), "total", num_workers=2)
    assert type(info.value) is LocalError
    assert isinstance(info.value.__cause__, RemoteTraceback)
    still_works()


def test_exception_through_dask_compute():
    x = da.ones(10, chunks=5).map_blocks(raise_custom_task, dtype="f8")
    with pytest.raises(CustomError) as info:
        x.compute(scheduler="sharedmem", num_workers=2)
    assert "raise_custom_task" in str(info.value.__cause__)
    still_works()


def test_unpicklable_exception_keeps_its_message():
    """The lock attribute cannot travel: left out (and named), the exception itself comes back."""
    with pytest.raises(UnpicklableError, match="unpicklable failure with 1") as info:
        dask_sharedmem.get(_failing_graph(raise_unpicklable_task), "total", num_workers=2)
    assert not hasattr(info.value, "lock")
    assert "attribute 'lock'" in info.value.__cause__.tb
    assert "raise_unpicklable_task" in str(info.value.__cause__)
    still_works()


@pytest.mark.parametrize("func, status", [
    (kill_self_task, "SIGKILL"),
    (segfault_task, "SIGSEGV"),
    (exit_task, "exited with code 3"),
])
def test_worker_death_names_task_and_cause(func, status):
    with pytest.raises(dask_sharedmem.WorkerDied) as info:
        dask_sharedmem.get(_failing_graph(func), "total", num_workers=2)
    text = str(info.value)
    assert status in text and "'bad'" in text, text
    assert info.value.pid > 0 and info.value.rank in (0, 1)
    still_works()


def test_worker_death_in_a_dask_array():
    def die_on_second_block(block, block_info=None):
        if block_info[0]["chunk-location"] == (1,):
            os.kill(os.getpid(), signal.SIGKILL)
        return block

    x = da.ones(30, chunks=10).map_blocks(die_on_second_block, dtype="f8")
    with pytest.raises(dask_sharedmem.WorkerDied, match="SIGKILL") as info:
        x.compute(scheduler="sharedmem", num_workers=2)
    text = str(info.value)
    assert "('die_on_second_block-" in text and ", 1)" in text, text
    still_works()


def test_unpicklable_result_names_the_key():
    dsk = {"x": 1, "unsendable": (lambda x: threading.Lock(), "x")}
    with pytest.raises(TypeError, match="unsendable") as info:
        dask_sharedmem.get(dsk, "unsendable", num_workers=2)
    assert "pickle" in str(info.value)
    still_works()


def test_missing_keys():
    dsk = {"x": 1, "y": (inc, "x")}
    with pytest.raises(KeyError):
        dask_sharedmem.get(dsk, "nope", num_workers=2)
    with pytest.raises(KeyError):
        dask_sharedmem.get(dsk, [["y", "nope"]], num_workers=2)
    still_works()


def test_cycle_raises_like_dask():
    dsk = {"a": (inc, "b"), "b": (inc, "a"), "c": 1}
    with pytest.raises(Exception) as sync:
        dask.get(dsk, "a")
    with pytest.raises(type(sync.value), match="[Cc]ycle"):
        dask_sharedmem.get(dsk, "a", num_workers=2)
    assert type(sync.value) is RuntimeError
    still_works()


def test_error_while_other_tasks_run():
    """One task fails while the other worker is busy: both are stopped at once."""
    slots = memory.zeros(2, dtype="i8")

    def busy(i):
        meet(slots, i, 2)
        if i == 0:
            raise CustomError("first")
        time.sleep(60)  # killed by the parent, never finishes

    dsk = {("t", i): (busy, i) for i in range(2)}
    with pytest.raises(CustomError, match="first"):
        dask_sharedmem.get(dsk, list(dsk), num_workers=2)
    still_works()


# -- Ctrl-C -------------------------------------------------------------------------

CTRL_C_SCRIPT = subprocess_script("""
    import json, os, sys, time
    import dask_sharedmem

    where = sys.argv[1]

    def slow(i):
        with open(os.path.join(where, str(os.getpid())), "w"):
            pass
        time.sleep(60)
        return i


    dsk = {("slow", i): (slow, i) for i in range(4)}
    try:
        dask_sharedmem.get(dsk, list(dsk), num_workers=2)
    except KeyboardInterrupt:
        print(json.dumps(sorted(children())), flush=True)
        raise
    print("finished without KeyboardInterrupt", flush=True)
""")


def _gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def test_ctrl_c_stops_workers(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C_SCRIPT, str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with ended(proc):
        deadline = time.monotonic() + 30
        while len(os.listdir(tmp_path)) < 2 and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        workers = [int(p) for p in os.listdir(tmp_path)]
        assert len(workers) == 2, proc.communicate(timeout=5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == -signal.SIGINT, (out, err)
    assert "KeyboardInterrupt" in err
    assert out.strip() == "[]"  # no child left when the exception reached the caller
    assert all(_gone(pid) for pid in workers)


# -- memory after computes -------------------------------------------------------------

@pytest.mark.usefixtures("always_fork")
def test_memory_returns_when_the_compute_returns():
    """20 computes of a 64 MB result: once each result is dropped, this process's
    memory is back where it was, shared memory included, and the workers (exiting
    lazily) hold none of the results they made."""
    from conftest import children, status

    x = dask_sharedmem.empty(8 * MB)  # 64 MB of float64
    x[...] = 4.0
    a = da.from_array(x, chunks=MB)  # 8 chunks of 8 MB
    rss0, shmem0 = status("VmRSS"), status("RssShmem")
    for _ in range(20):
        r = (da.sqrt(a) + 1).compute(scheduler=dask_sharedmem.get, num_workers=2)
        assert type(r) is np.ndarray and (r == 3.0).all()
        del r
        assert status("VmRSS") - rss0 < 24 * MB
        assert status("RssShmem") - shmem0 < 4 * MB
        assert sum(_rss_anon(pid) for pid in children()) < 24 * MB


def _rss_anon(pid):
    """A process's private resident memory (0 once it has exited)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def test_every_setting_is_among_dasks_config_defaults():
    assert set(dask.config.get("sharedmem")) == {"num-workers", "inline", "threshold",
                                                 "transport"}
    with dask.config.set({"sharedmem.transport": "pigeon"}), \
            pytest.raises(ValueError, match="sharedmem.transport must be one of"):
        dask_sharedmem.get({"x": (abs, -1)}, "x")


# --------------------------------------------------------------------------
# Small graphs run in the caller once they are known to be quick
# --------------------------------------------------------------------------


def test_a_quick_graph_runs_in_the_caller_on_its_second_call():
    dsk = {"a": (getpid,), "b": (getpid,), "c": (lambda *p: p, "a", "b")}
    first = dask_sharedmem.get(dsk, "c")
    assert os.getpid() not in first  # nothing measured yet: workers
    second = dask_sharedmem.get(dsk, "c")
    assert second == (os.getpid(), os.getpid())
    with dask.config.set({"sharedmem.inline": 0}):  # off: every call forks
        assert os.getpid() not in dask_sharedmem.get(dsk, "c")


def test_a_slow_graph_keeps_forking():
    def slow():
        time.sleep(0.05)  # more than sharedmem.inline's 20 ms
        return os.getpid()

    dsk = {"x": (slow,)}
    for _ in range(3):
        assert dask_sharedmem.get(dsk, "x") != os.getpid()


def test_a_graph_that_became_slow_forks_again():
    """The caller measures what it runs: a graph whose tasks slowed down forks next time."""
    delay = [0.0]

    def work():
        time.sleep(delay[0])
        return os.getpid()

    dsk = {"x": (work,)}
    dask_sharedmem.get(dsk, "x")
    assert dask_sharedmem.get(dsk, "x") == os.getpid()
    delay[0] = 0.05
    assert dask_sharedmem.get(dsk, "x") == os.getpid()  # it ran here, measured 50 ms
    assert dask_sharedmem.get(dsk, "x") != os.getpid()


def sleepy(b):
    time.sleep(0.2 * len(b) / 1000)  # 0.2 s for a full chunk, nothing for the last one
    return b


def test_a_name_of_slow_tasks_and_a_quick_one_keeps_forking(sessions):
    """Four chunks of 0.2 s and a last chunk of one element: the name's fastest
    task (0.1 ms) is not its time, and the same graph again forks, as threads
    run it in parallel: run here it would take 0.8 s, not 0.4."""
    x = da.from_array(np.ones(4001), chunks=1000).map_blocks(sleepy)
    for _ in range(2):
        assert x.compute(scheduler="sharedmem", num_workers=2).sum() == 4001
    assert sessions == [2, 2]


def pid_block(b):
    return np.full(1, os.getpid())


def pid_of_block(b):
    return np.full(1, os.getpid())


def test_a_task_name_never_measured_forks():
    """Known names: the graph's own (with dask's token); a task of a new function,
    or a new task under a known function's name, forks on its first call."""
    x = da.from_array(dask_sharedmem.ones(1000), chunks=100)
    pids = x.map_blocks(pid_block, chunks=(1,))
    assert os.getpid() not in pids.compute(scheduler="sharedmem")
    assert set(pids.compute(scheduler="sharedmem")) == {os.getpid()}  # the same graph: here
    again = (x + 1).map_blocks(pid_block, chunks=(1,))  # a new token, fused: "pid_block"
    assert os.getpid() not in again.compute(scheduler="sharedmem")
    assert set(again.compute(scheduler="sharedmem")) == {os.getpid()}
    other = x.map_blocks(pid_of_block, chunks=(1,))  # a new function: workers
    assert os.getpid() not in other.compute(scheduler="sharedmem")


def slow_block(b):
    time.sleep(0.2)
    return b


def test_a_new_graph_under_names_known_without_their_token_forks(sessions):
    """dask names a fused task from its first and last layers: the roots of a
    new, slow ``x.map_blocks(f).sum()`` are ``array-sum-<token>``, as are those
    of a trivial ``x.sum()`` measured before.  Known only without its token a
    root could be anything: the slow graph forks (0.4 s on 2 workers, 0.8 s
    here).  The keys that ``compute`` names anew each call (``finalize-...``)
    are still known without their token: the trivial sum again runs here."""
    x = da.from_array(np.ones(4000), chunks=1000)
    assert x.sum().compute(scheduler="sharedmem", num_workers=2) == 4000
    assert x.map_blocks(slow_block).sum().compute(scheduler="sharedmem", num_workers=2) == 4000
    assert sessions == [2, 2]
    assert x.sum().compute(scheduler="sharedmem", num_workers=2) == 4000
    assert sessions == [2, 2]


def test_a_run_in_the_caller_slower_than_estimated_forks_for_the_rest(sessions):
    """An estimate can be wrong (tasks that became slow, a name known without its
    token): a run here that has taken twice ``sharedmem.inline`` stops and forks
    workers for what is left, which find the results made here in their own
    memory.  Callbacks see one compute, and every task once."""
    delay = [0.0]
    where = dask_sharedmem.zeros(8, dtype="i8")  # the process that made each chunk

    def chunk(i):
        time.sleep(delay[0])
        where[i] = os.getpid()
        return np.full(100_000, float(i))  # 800 KB: made in a worker, it is shared memory

    def total(a):
        return float(a.sum())

    dsk = {("c", i): (chunk, i) for i in range(8)}
    dsk.update({("t", i): (total, ("c", i)) for i in range(8)})
    keys = [("t", i) for i in range(8)]
    seen = collections.Counter()

    class Watch(Callback):
        def _start(self, dsk):
            seen["start"] += 1

        def _start_state(self, dsk, state):
            seen["start_state"] += 1

        def _pretask(self, key, dsk, state):
            seen["pretask"] += 1

        def _posttask(self, key, result, dsk, state, worker_id):
            seen["posttask"] += 1

        def _finish(self, dsk, state, errored):
            seen["finish", errored] += 1

    out = io.StringIO()
    with dask.config.set({"sharedmem.inline": 0.05}):  # a margin for the estimates here
        dask_sharedmem.get(dsk, keys, num_workers=2)
        dask_sharedmem.get(dsk, keys, num_workers=2)
        assert set(where) == {os.getpid()}
        delay[0] = 0.1  # 0.8 s here, 0.4 s on two workers
        with Watch(), ProgressBar(out=out, dt=0.01), Profiler() as prof:
            got = dask_sharedmem.get(dsk, keys, num_workers=2)
    assert got == tuple(100_000.0 * i for i in range(8))
    assert os.getpid() in where and len(set(where)) > 1  # begun here, ended in workers
    assert sessions == [2, 2]
    assert seen == {"start": 1, "start_state": 1, "pretask": 16, "posttask": 16,
                    ("finish", False): 1}
    assert "100%" in out.getvalue()
    assert sorted(r.key for r in prof.results) == sorted(dsk)
    with dask.config.set({"sharedmem.inline": 0.05}):  # measured: the next call forks
        assert dask_sharedmem.get(dsk, keys, num_workers=2) == got
    assert sessions == [2, 2, 2]


def test_a_task_delayed_once_here_leaves_the_graph_here(sessions):
    """One task that something else delayed (the first writes after a fork,
    another process) does not make the name slow: its median task is kept."""
    late = [None]

    def work(i):
        if i == late[0]:
            time.sleep(0.06)  # more than sharedmem.inline for the whole graph
        return i

    dsk = {("w", i): (work, i) for i in range(8)}
    keys = list(dsk)
    with dask.config.set({"sharedmem.inline": 0.05}):
        for delayed in (None, None, 3, None):
            late[0] = delayed
            assert dask_sharedmem.get(dsk, keys, num_workers=2) == tuple(range(8))
    assert len(sessions) == 1  # the first call


def test_in_the_caller_results_errors_and_callbacks_are_as_with_threads(sessions):
    a = dask_sharedmem.ones(4 * MB // 8)
    y = (da.from_array(a, chunks=len(a) // 8) + 1)
    y.compute(scheduler="sharedmem")
    out = y.compute(scheduler="sharedmem")
    assert len(sessions) == 1  # the second ran here
    assert type(out) is np.ndarray and (out == 2).all()

    seen = []

    class Watch(Callback):
        def _start(self, dsk):
            seen.append("start")

        def _pretask(self, key, dsk, state):
            seen.append("pre")

        def _posttask(self, key, result, dsk, state, worker_id):
            seen.append(os.getpid())

        def _finish(self, dsk, state, errored):
            seen.append(("finish", errored))

    dsk = {"x": (inc, 1), "y": (inc, "x")}
    dask_sharedmem.get(dsk, "y")
    with Watch():
        assert dask_sharedmem.get(dsk, "y") == 3
    assert seen == ["start", "pre", os.getpid(), "pre", os.getpid(), ("finish", False)]

    def fails(x):
        if x:
            raise KeyError("bad")
        return 1

    dsk = {"f": (fails, 0)}
    dask_sharedmem.get(dsk, "f")
    with pytest.raises(KeyError, match="bad") as info:
        dask_sharedmem.get({"f": (fails, 1)}, "f")
    assert not isinstance(info.value.__cause__, RemoteTraceback)  # raised here, as threads
    assert len(sessions) == 3  # the first call of each of the three graphs, no other


def test_in_the_caller_a_start_callback_that_changes_the_graph_is_followed(sessions):
    pytest.importorskip("cachey")
    from dask.cache import Cache

    dsk = {"x": (inc, 1), "y": (inc, "x")}
    dask_sharedmem.get(dsk, "y")
    cache = Cache(1e6)
    with cache:
        assert dask_sharedmem.get(dsk, "y") == 3
        assert dask_sharedmem.get(dsk, "y") == 3  # from the cache, which put "y" in the graph
    assert "y" in cache.cache.data
    assert len(sessions) == 1  # both calls under the cache ran here


@pytest.mark.parametrize("value", [-1, "fast", True])
def test_inline_config_must_be_seconds(value):
    dsk = {"x": (inc, 1)}
    with dask.config.set({"sharedmem.inline": value}):
        with pytest.raises(ValueError, match="sharedmem.inline must be a number of seconds"):
            dask_sharedmem.get(dsk, "x")


def test_a_graph_too_big_to_run_here_is_not_remembered():
    """Names of graphs that could never run in the caller (20 us of bookkeeping per
    task alone exceeds sharedmem.inline) are not kept: the memory of names stays small."""
    dsk = {f"t-{i}": (inc, i) for i in range(2000)}
    dask_sharedmem.get(dsk, list(dsk))
    assert not dask_sharedmem.inline._DURATIONS
    dask_sharedmem.get({"x": (inc, 1)}, "x")
    assert "x" in dask_sharedmem.inline._DURATIONS


@pytest.mark.timeout(60)
def test_a_free_worker_takes_a_ready_task_whose_large_input_it_holds():
    """Of the ready tasks near the front, a worker is given one whose large inputs it
    made (no pull from the other worker) over dask's next one that needs another's.

    Two roots make 8 MB each, one per worker; each has six dependents, ready
    together once the roots are done.  The dependents' pids (each returns its own)
    say where they ran: with the choice, (nearly) all where their input is.
    """
    def root(i):
        time.sleep(0.2)
        return np.full(1 << 20, float(i)), os.getpid()

    def dependent(made, j):
        time.sleep(0.02)
        return os.getpid(), made[1]

    dsk = {("root", i): (root, i) for i in range(2)}
    dsk.update({("dep", i, j): (dependent, ("root", i), j) for i in range(2) for j in range(6)})
    keys = [("dep", i, j) for i in range(2) for j in range(6)]
    with dask.config.set({"sharedmem.inline": 0}):
        for _ in range(3):
            out = dask_sharedmem.get(dsk, keys, num_workers=2)
            roots = {maker for _, maker in out}
            if len(roots) == 2:  # each root ran in a worker of its own
                break
        else:
            pytest.skip("both roots ran in one worker three times (a loaded machine)")
    local = sum(ran == maker for ran, maker in out)
    assert local >= 10, f"{local} of 12 dependents ran where their input was made"
