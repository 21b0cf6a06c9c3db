"""mapreduce.py: MapReduce, critical, ordered, local.rank, background, debug.

Real forked workers, real signals.  Every test runs under a timeout (an error
must arrive, never a hang) and under the ``no_leaks`` check.  Fault tests keep
the other workers busy in long sleeps, so they pass only if the error arrives
at once; they print the time it took (``pytest -s``).
"""

import collections
import contextlib
import ctypes
import faulthandler
import gc
import io
import os
import pickle
import resource
import signal
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import pytest
from conftest import (
    TwoArgs,
    Unpicklable,
    children,
    ended,
    open_fds,
    running,
    subprocess_script,
)
from dask.callbacks import Callback
from dask.diagnostics import ProgressBar
from numpy.testing import assert_almost_equal

import dask_sharedmem as sharedmem
from dask_sharedmem import (
    LostExceptionType,
    MapReduce,
    MapReduceByThread,
    StopProcessGroup,
    WorkerDied,
    WorkerException,
    background,
    memory,
    transports,
)
from dask_sharedmem.pool import Workers
from dask_sharedmem.remote import RemoteTraceback

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_leaks")]

PARENT = os.getpid()
LONG = 600  # seconds: a sleep that only a kill can end
POOLS = {"processes": lambda: MapReduce(np=2), "serial": lambda: MapReduce(np=0),
         "threads": lambda: MapReduceByThread(np=2)}


@pytest.fixture
def debug():
    sharedmem.set_debug(True)
    yield
    sharedmem.set_debug(False)


@contextlib.contextmanager
def time_to_error(label):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        print(f"\ntime to error ({label}): {(time.perf_counter() - t0) * 1e3:.1f} ms")


def assert_works(pool):
    """The pool is usable again (after an error)."""
    assert pool.map(lambda x: x + 1, range(10)) == list(range(1, 11))


def all_at_once(n, timeout=30):
    """``wait(i)`` for items ``0..n-1``: returns once all ``n`` of them run at once.

    No item completes before every one of them has started, each in its own
    worker: ``map`` has no evidence that items are quick and must fork them all.
    """
    flags = sharedmem.zeros(n, dtype="i1")

    def wait(i):
        flags[i] = 1
        deadline = time.monotonic() + timeout
        while not flags.all():
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {int(flags.sum())} of {n} items ran at once")
            time.sleep(0.001)
    return wait


def square(x):
    return x * x


# -- np -------------------------------------------------------------------------

def test_np_default_order(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("PBS_NUM_PPN", "5")
    assert MapReduce().np == 3 == sharedmem.cpu_count()
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert MapReduce().np == 5 == sharedmem.cpu_count()
    monkeypatch.delenv("PBS_NUM_PPN")
    assert MapReduce().np == len(os.sched_getaffinity(0)) == sharedmem.cpu_count()
    monkeypatch.setenv("OMP_NUM_THREADS", "4,2")  # OpenMP's nested form: the outer level
    assert MapReduce(np=None).np == 4
    assert MapReduce(np=7).np == 7


def test_np_zero_runs_in_the_parent():
    with MapReduce(np=0) as pool:
        assert pool.np == 0
        assert pool.map(lambda x: (os.getpid(), x), range(5)) == [(PARENT, x) for x in range(5)]


def test_results_in_sequence_order_from_workers():
    with MapReduce(np=2) as pool:
        def work(i):
            time.sleep(0.001 * (i % 3))  # finish out of order
            return i, os.getpid()

        out = pool.map(work, range(100))
    assert [i for i, _ in out] == list(range(100))
    pids = {pid for _, pid in out}
    assert len(pids) == 2 and PARENT not in pids


def test_np_larger_than_the_sequence_or_the_cpus():
    with MapReduce(np=8) as pool:
        assert pool.map(square, [3]) == [9]
        assert pool.map(square, []) == []
    wait = all_at_once(16)
    with MapReduce(np=16) as pool:
        out = pool.map(lambda i: (os.getpid(), i), range(100))
        slow = pool.map(lambda i: (wait(i), os.getpid())[1], range(16))
    assert [i for _, i in out] == list(range(100)) and 1 <= len({p for p, _ in out}) <= 16
    assert len(set(slow)) == 16 and PARENT not in slow  # more workers than CPUs


# -- workers forked on demand ----------------------------------------------------------

def count_forks(monkeypatch):
    """The ranks of the workers forked from now on, in order."""
    forked = []
    fork_one = Workers._fork_one

    def counting(self, rank):
        fork_one(self, rank)
        forked.append(rank)

    monkeypatch.setattr(Workers, "_fork_one", counting)
    return forked


def ranks_by_pid(pairs):
    """``{pid: rank}`` from (pid, rank) pairs; each pid must have one rank."""
    rank_of = {}
    for pid, rank in pairs:
        assert rank_of.setdefault(pid, rank) == rank, f"pid {pid} ran as two ranks"
    return rank_of


@pytest.mark.timeout(30)
def test_a_quick_map_forks_few_workers(monkeypatch):
    """Once an item has come back, forking one more of np=32 costs more than the rest."""
    forked = count_forks(monkeypatch)
    with MapReduce(np=32) as pool:
        out = pool.map(lambda x: (os.getpid(), pool.local.rank, x + 1), range(100))
    assert [r for *_, r in out] == list(range(1, 101))
    rank_of = ranks_by_pid((pid, rank) for pid, rank, _ in out)
    assert PARENT not in rank_of
    # every worker forked got work; ranks 0..k-1, in order
    assert sorted(rank_of.values()) == forked == list(range(len(forked)))
    assert 1 <= len(forked) <= 8, f"{len(forked)} workers forked for 100 trivial items"


@pytest.mark.timeout(60)
def test_slow_items_get_every_worker_without_evidence(monkeypatch):
    """No item completes before all 8 run at once: map forks all 8 anyway."""
    forked = count_forks(monkeypatch)
    wait = all_at_once(8)
    with MapReduce(np=8) as pool:
        out = pool.map(lambda i: (wait(i), os.getpid(), pool.local.rank)[1:], range(8))
    rank_of = ranks_by_pid(out)
    assert len(rank_of) == 8 and PARENT not in rank_of
    assert sorted(rank_of.values()) == forked == list(range(8))


@pytest.mark.timeout(60)
def test_slow_items_get_every_worker_with_evidence():
    """Items come back (50 ms each) while workers are still forked: the rest is
    worth more workers, up to np, never more."""
    with MapReduce(np=4) as pool:
        out = pool.map(lambda i: (time.sleep(0.05), os.getpid(), pool.local.rank)[1:],
                       range(40))
    rank_of = ranks_by_pid(out)
    assert sorted(rank_of.values()) == [0, 1, 2, 3] and PARENT not in rank_of


@pytest.mark.timeout(60)
def test_a_free_worker_takes_the_next_range_while_another_is_busy():
    """Ranges wait in one queue that every worker reads: none waits behind a busy
    worker while another is free.  Item 0 holds its worker until every other item
    has finished; were later ranges handed to that worker too, they would wait."""
    finished = sharedmem.zeros(20, dtype="i1")

    def work(i):
        if i == 0:  # the deadline turns the wait of a range behind it into False, not a hang
            deadline = time.monotonic() + 20
            while not finished[1:].all() and time.monotonic() < deadline:
                time.sleep(0.001)
            return bool(finished[1:].all())
        finished[i] = 1
        return True

    with MapReduce(np=2) as pool:
        assert all(pool.map(work, range(20)))


@pytest.mark.timeout(30)
def test_callbacks_get_every_worker_forked_first(monkeypatch):
    """Callbacks may start threads: no fork may follow them, so all are forked first."""
    forked = count_forks(monkeypatch)
    with Recorder(), MapReduce(np=3) as pool:
        assert pool.map(square, range(30)) == [i * i for i in range(30)]
    assert forked == [0, 1, 2]


@pytest.mark.timeout(30)
def test_death_of_a_late_forked_worker_names_its_item():
    wait = all_at_once(4)
    with MapReduce(np=4) as pool:
        def work(i):
            wait(i)  # item i runs in rank i, forked after items 0..i-1 had started
            if pool.local.rank == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(LONG)

        with time_to_error("late worker SIGKILL"), pytest.raises(WorkerException) as info:
            pool.map(work, range(4))
        reason = info.value.reason
        assert isinstance(reason, WorkerDied) and reason.rank == 3
        assert "SIGKILL" in str(reason) and "item 3" in str(reason)
        assert reason.pid not in children()
        assert_works(pool)


@pytest.mark.timeout(30)
def test_exception_in_a_late_forked_worker():
    wait = all_at_once(3)
    with MapReduce(np=3) as pool:
        def work(i):
            wait(i)
            if pool.local.rank == 2:
                raise ValueError(f"item {i} in rank 2")
            time.sleep(LONG)

        with time_to_error("late worker exception"), pytest.raises(WorkerException) as info:
            pool.map(work, range(3))
        assert isinstance(info.value.reason, ValueError)
        assert str(info.value.reason) == "item 2 in rank 2"
        assert_works(pool)


# -- map arguments ----------------------------------------------------------------

def test_reduce_runs_in_the_parent_and_spreads_tuples():
    calls = []

    def reduce(i, sq):
        calls.append((os.getpid(), i))
        return i + sq

    with MapReduce(np=2) as pool:
        out = pool.map(lambda i: (i, i * i), range(50), reduce=reduce)
    assert out == [i + i * i for i in range(50)]
    assert sorted(i for _, i in calls) == list(range(50))
    assert {pid for pid, _ in calls} == {PARENT}


def test_reduce_gets_non_tuples_whole_and_may_return_none():
    seen = []
    with MapReduce(np=2) as pool:
        out = pool.map(lambda i: [i, -i], range(10), reduce=seen.append)
    assert out == [None] * 10
    assert sorted(seen) == sorted([i, -i] for i in range(10))


def test_star():
    with MapReduce(np=2) as pool:
        assert pool.map(lambda a, b: a * b, [(1, 2), (3, 4), (5, 6)], star=True) == [2, 12, 30]
        assert pool.map(lambda a, b: (a, b), [(1, 2)], star=True,
                        reduce=lambda a, b: a + b) == [3]


def test_minlength_runs_short_sequences_in_the_parent():
    with MapReduce(np=2) as pool:
        assert pool.map(lambda i: os.getpid(), range(3), minlength=10) == [PARENT] * 3
        assert PARENT not in pool.map(lambda i: os.getpid(), range(3), minlength=3)


def test_generator_sequence():
    with MapReduce(np=2) as pool:
        assert pool.map(square, (i for i in range(30))) == [i * i for i in range(30)]
        assert pool.map(square, iter(range(5)), reduce=lambda x: -x) == [0, -1, -4, -9, -16]


def test_closures_and_lambdas_are_not_pickled():
    lock = threading.Lock()  # unpicklable, yet the workers can use what refers to it
    offset = 100
    with MapReduce(np=2) as pool:
        def work(i):
            with lock:
                return i + offset

        assert pool.map(work, range(10)) == list(range(100, 110))
        assert pool.map(lambda i: (lambda j: j + offset)(i) * 2, range(3)) == [200, 202, 204]


def test_classes_and_functions_of_the_caller_come_back_as_themselves():
    """As with threads; a class or function that the item makes travels by value."""
    class Local(NamedTuple):
        a: int

    def local(v):
        return v + 1

    def work(i):
        class Inner(NamedTuple):
            v: int

        return os.getpid(), Local(i), local, Inner(i), lambda: i * 2

    with MapReduce(np=2) as pool:
        out = pool.map(work, range(4))
    for i, (pid, one, f, inner, g) in enumerate(out):
        assert pid != PARENT
        assert type(one) is Local and one == Local(i)
        assert f is local
        assert type(inner).__name__ == "Inner" and inner.v == i  # cloudpickle's copy
        assert g() == i * 2


def test_numpy_array_as_sequence():
    a = np.arange(30).reshape(10, 3)
    with MapReduce(np=2) as pool:
        assert pool.map(lambda row: int(row.sum()), a) == a.sum(axis=1).tolist()
        assert pool.map(float, np.linspace(0, 1, 5)) == np.linspace(0, 1, 5).tolist()


def test_large_array_results_come_back_correct():
    with MapReduce(np=2) as pool:
        out = pool.map(lambda i: np.full((300, 300), i, dtype="f8"), range(12))
        small = pool.map(lambda i: np.arange(i), range(5))
    for i, a in enumerate(out):
        assert a.shape == (300, 300) and (a == i).all()
        # pulled into private memory (cma), or mapped from the worker's copy (shm)
        assert (memory._segment_of(a) is not None) == (transports._active == "shm")
    for i, a in enumerate(small):
        np.testing.assert_array_equal(a, np.arange(i))


def test_views_of_a_shared_array_come_back_as_views():
    shared = sharedmem.zeros(50)
    with MapReduce(np=2) as pool:
        def work(i):
            view = shared[i * 10:(i + 1) * 10]
            view[...] = i
            return view

        out = pool.map(work, range(5))
    for i, view in enumerate(out):
        assert np.shares_memory(view, shared) and (view == i).all()


def test_many_trivial_items():
    n = 100_000
    with MapReduce(np=2) as pool:
        assert pool.map(lambda i: i + 1, range(n)) == list(range(1, n + 1))
        total = []
        pool.map(lambda i: i, np.arange(n), reduce=total.append)
    assert sum(total) == n * (n - 1) // 2


def test_many_large_results_under_the_usual_descriptor_limit():
    """1000 live shared results under `ulimit -n 1024`: the pool lifts the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    try:
        with MapReduce(np=2) as pool:
            out = pool.map(lambda i: np.full(10_000, i), range(1000))  # 80 kB each
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert all((a == i).all() for i, a in enumerate(out))


# -- critical, ordered, local.rank ---------------------------------------------------

@pytest.mark.parametrize("make", [lambda: MapReduce(np=4), lambda: MapReduce(np=0),
                                  lambda: MapReduceByThread(np=4)],
                         ids=["processes", "serial", "threads"])
def test_critical_lets_one_in_at_a_time(make):
    n = 80
    counter = sharedmem.zeros((), dtype="i8")
    spans = sharedmem.zeros((n, 2))  # entry, exit (CLOCK_MONOTONIC is system-wide)
    with make() as pool:
        def work(i):
            with pool.critical:
                spans[i, 0] = time.monotonic()
                value = int(counter)  # a read-modify-write that a second entrant would break
                time.sleep(0.001)
                counter[...] = value + 1
                spans[i, 1] = time.monotonic()
            return pool.local.rank

        ranks = pool.map(work, range(n))
    assert int(counter) == n
    by_entry = spans[np.argsort(spans[:, 0])]
    overlaps = np.flatnonzero(by_entry[1:, 0] < by_entry[:-1, 1])
    assert overlaps.size == 0, f"{overlaps.size} entries while another was inside"
    if pool.np and pool.backend == "process":
        assert set(ranks) == {0, 1, 2, 3}


@pytest.mark.parametrize("n, every", [(40, 1), (40, 3), (5000, 1), (20000, 7)])
def test_ordered_runs_in_item_order(n, every):
    log = sharedmem.full(n, -1, dtype="i8")
    pos = sharedmem.zeros((), dtype="i8")
    with MapReduce(np=2) as pool:
        def work(i):
            if n <= 100:
                time.sleep(0.001 * ((i * 7) % 5))  # arrive out of order
            if i % every == 0:
                with pool.ordered:
                    log[int(pos)] = i
                    pos[...] += 1
            return i

        assert pool.map(work, range(n)) == list(range(n))
    expected = list(range(0, n, every))
    assert int(pos) == len(expected)
    assert log[:len(expected)].tolist() == expected


@pytest.mark.parametrize("make", [lambda: MapReduce(np=0), lambda: MapReduceByThread(np=3)],
                         ids=["serial", "threads"])
def test_ordered_serial_and_threads(make):
    log = []
    with make() as pool:
        def work(i):
            time.sleep(0.001 * ((i * 7) % 5))
            if i % 2:
                with pool.ordered:
                    log.append(i)
            return i

        assert pool.map(work, range(30)) == list(range(30))
    assert log == list(range(1, 30, 2))


# -- ordered entered twice, critical across maps --------------------------------------

ENTRY_POOLS = {**POOLS, "debug": lambda: MapReduce(np=2)}


@pytest.mark.timeout(20)
@pytest.mark.parametrize("how", ["again", "nested"])
@pytest.mark.parametrize("kind", ENTRY_POOLS)
def test_ordered_entered_twice_in_one_item_raises(kind, how, request):
    if kind == "debug":
        request.getfixturevalue("debug")
    log = sharedmem.full(12, -1, dtype="i8")
    pos = sharedmem.zeros((), dtype="i8")
    with ENTRY_POOLS[kind]() as pool:
        def work(i):
            with pool.ordered:
                log[int(pos)] = i
                pos[...] += 1
                if i == 3 and how == "nested":
                    with pool.ordered:
                        pass
            if i == 3 and how == "again":
                with pool.ordered:
                    pass
            return i

        if kind in ("serial", "debug"):  # serial mode raises what the item raised, unwrapped
            with pytest.raises(RuntimeError) as info:
                pool.map(work, range(12))
            reason = info.value
        else:
            with pytest.raises(WorkerException) as info:
                pool.map(work, range(12))
            reason = info.value.reason
        assert type(reason) is RuntimeError
        assert "item 3" in str(reason) and "once per item" in str(reason)
        assert_works(pool)
    assert log[:4].tolist() == [0, 1, 2, 3]  # the first entry ran, in order


def count_under_critical(pool, counter, sleep=0.001):
    """A work function whose read-modify-write of ``counter`` loses updates without exclusion."""
    def work(i):
        with pool.critical:
            value = int(counter)
            time.sleep(sleep)
            counter[...] = value + 1
        return i

    return work


def critical_fds():
    return sum("dask_sharedmem-critical" in target for target in open_fds().values())


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", POOLS)
def test_critical_excludes_two_maps_at_once_from_two_threads(kind):
    n = 100
    counter = sharedmem.zeros((), dtype="i8")
    both = threading.Barrier(2, timeout=20)
    fds = []
    with POOLS[kind]() as pool:
        work = count_under_critical(pool, counter)

        def reduce(i):
            if i == 0:
                both.wait()  # both maps are running
                fds.append(critical_fds())
            return i

        outs = [None, None]

        def run(k):
            outs[k] = pool.map(work, range(n), reduce=reduce)

        threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert outs == [list(range(n))] * 2
        assert int(counter) == 2 * n
    if kind == "processes":
        assert fds == [1, 1]  # one lock for both maps
    assert critical_fds() == 0  # and none once no map runs


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", POOLS)
def test_critical_excludes_a_map_run_inside_reduce(kind):
    n = 100
    counter = sharedmem.zeros((), dtype="i8")
    inner = []
    with POOLS[kind]() as pool:
        work = count_under_critical(pool, counter)

        def outer(i):  # long: the items in flight count all through the inner map
            for _ in range(20):
                work(i)
            return i

        def reduce(i):
            if i == 0:
                inner.append(pool.map(work, range(n)))
            return i

        assert pool.map(outer, range(8), reduce=reduce) == list(range(8))
    assert inner == [list(range(n))]
    assert int(counter) == 8 * 20 + n


@pytest.mark.timeout(30)
def test_critical_excludes_a_map_of_the_same_pool_nested_in_a_worker():
    counter = sharedmem.zeros((), dtype="i8")
    with MapReduce(np=2) as pool:
        work = count_under_critical(pool, counter)

        def outer(i):
            if i == 0:  # its workers count while the other outer worker does
                return sum(pool.map(work, range(40)))
            return work(i)

        assert pool.map(outer, range(40)) == [sum(range(40))] + list(range(1, 40))
    assert int(counter) == 39 + 40


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", POOLS)
def test_critical_nested_in_itself_keeps_excluding(kind):
    counter = sharedmem.zeros((), dtype="i8")
    with POOLS[kind]() as pool:
        def work(i):
            with pool.critical:
                with pool.critical:
                    pass
                value = int(counter)  # still inside the outer block
                time.sleep(0.001)
                counter[...] = value + 1
            return i

        assert pool.map(work, range(60)) == list(range(60))
    assert int(counter) == 60


@pytest.mark.timeout(20)
@pytest.mark.parametrize("kind", ENTRY_POOLS)
def test_critical_in_a_map_started_inside_critical_raises(kind, request):
    if kind == "debug":
        request.getfixturevalue("debug")
    counter = sharedmem.zeros((), dtype="i8")
    with ENTRY_POOLS[kind]() as pool:
        work = count_under_critical(pool, counter, sleep=0)
        with pool.critical:
            assert pool.map(square, range(4)) == [0, 1, 4, 9]  # items that stay out are fine
            if kind in ("serial", "debug"):
                with pytest.raises(RuntimeError, match="inside pool.critical") as info:
                    pool.map(work, range(4))
                reason = info.value
            else:
                with pytest.raises(WorkerException) as info:
                    pool.map(work, range(4))
                reason = info.value.reason
        assert type(reason) is RuntimeError and "start the map outside" in str(reason)
        assert pool.map(work, range(4)) == list(range(4))  # and outside, they enter
    assert int(counter) == 4


@pytest.mark.timeout(30)
def test_ordered_in_two_thread_maps_at_once():
    logs = [[], []]
    outs = [None, None]
    both = threading.Barrier(2, timeout=20)
    with MapReduceByThread(np=3) as pool:
        def run(k):
            def work(i):
                if i == 0:
                    both.wait()  # both maps are running
                time.sleep(0.001 * ((i * 7) % 5))
                with pool.ordered:
                    logs[k].append(i)
                return i

            outs[k] = pool.map(work, range(30))

        threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert outs == [list(range(30))] * 2
    assert logs == [list(range(30))] * 2


def test_local_rank():
    wait = all_at_once(3)
    with MapReduce(np=3) as pool:
        out = pool.map(lambda i: (i >= 3 or wait(i), pool.local.rank, os.getpid())[1:],
                       range(30))
        assert pool.local.rank == 0  # the parent's
        ranks_of = collections.defaultdict(set)
        for rank, pid in out:
            ranks_of[pid].add(rank)
        assert len(ranks_of) == 3 and PARENT not in ranks_of
        assert sorted(r for ranks in ranks_of.values() for r in ranks) == [0, 1, 2]
    with MapReduce(np=0) as pool:
        assert pool.map(lambda i: pool.local.rank, range(5)) == [0] * 5


# -- debug, threads, background, helpers --------------------------------------------

def test_debug_runs_serially_and_raises_unwrapped(debug):
    assert sharedmem.get_debug() is True
    with MapReduce(np=2) as pool:
        assert pool.map(lambda i: os.getpid(), range(5)) == [PARENT] * 5
        with pytest.raises(ZeroDivisionError):
            pool.map(lambda i: 1 // i, [1, 0])


def test_get_debug_default():
    assert sharedmem.get_debug() is False


def test_map_reduce_by_thread():
    with MapReduceByThread(np=3) as pool:
        assert pool.np == 3
        out = pool.map(lambda i: (os.getpid(), pool.local.rank, threading.get_ident(), i * i),
                       range(40))
        assert pool.local.rank == 0
        with pytest.raises(WorkerException) as info:
            pool.map(lambda i: 1 // (i - 7), range(20))
        assert isinstance(info.value.reason, ZeroDivisionError)
        assert "<lambda>" in info.value.traceback
        assert pool.map(lambda i: i, range(5), reduce=lambda x: -x) == [0, -1, -2, -3, -4]
    assert [sq for *_, sq in out] == [i * i for i in range(40)]
    assert {pid for pid, *_ in out} == {PARENT}
    rank_of = {}
    for _, rank, ident, _ in out:
        assert rank_of.setdefault(ident, rank) == rank and rank in range(3)


def test_stop_process_group_threads():
    with MapReduceByThread(np=2) as pool:
        def work(i):
            if i == 10:
                raise StopProcessGroup
            return i

        out = pool.map(work, range(1000))
    assert out == sorted(out) and 10 not in out and len(out) < 1000


def test_background_result_and_exception():
    bg = background(lambda a, b=0: (os.getpid(), a + b), 1, b=2)
    pid, value = bg.wait()
    assert value == 3 and pid != PARENT
    with pytest.raises(RuntimeError, match="already"):
        bg.wait()

    def failing(x):
        raise ValueError(f"bad {x}")

    with pytest.raises(WorkerException) as info:
        background(failing, 7).wait()
    assert isinstance(info.value.reason, ValueError) and info.value.reason.args == ("bad 7",)
    assert "failing" in info.value.traceback


def test_background_large_result_and_death():
    a = background(lambda: np.arange(1_000_000)).wait()
    np.testing.assert_array_equal(a, np.arange(1_000_000))
    with pytest.raises(WorkerException) as info:
        background(os._exit, 4).wait()
    assert isinstance(info.value.reason, WorkerDied) and "exited with code 4" in str(info.value)
    with pytest.raises(WorkerException) as info:
        background(threading.Lock).wait()
    assert isinstance(info.value.reason, TypeError) and "lock" in str(info.value.reason)


def test_background_outlives_the_thread_that_started_it():
    """As with multiprocessing's fork Process: a background call started by a
    thread that then ends (an executor's, a request handler's) returns its result."""
    running_r, running_w = os.pipe()
    go_r, go_w = os.pipe()

    def call():
        os.write(running_w, b"1")
        os.read(go_r, 1)  # until the thread that forked this process has ended
        return "result"

    calls = []

    def start():
        calls.append(background(call))
        os.read(running_r, 1)  # its process is set up: it would die with this thread now

    try:
        thread = threading.Thread(target=start)
        thread.start()
        thread.join()
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/self/task/{thread.native_id}"):  # join() returns first
            assert time.monotonic() < deadline, "the thread did not end"
            time.sleep(0.001)
        os.write(go_w, b"1")
        assert calls[0].wait() == "result"
    finally:
        for fd in (running_r, running_w, go_r, go_w):
            os.close(fd)


def death_signal():
    """The signal this process gets when the thread that forked it ends (PR_GET_PDEATHSIG)."""
    sig = ctypes.c_int()
    ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0)
    return sig.value


@pytest.mark.usefixtures("always_fork")
def test_map_and_compute_from_a_thread_that_is_not_the_main_one():
    """Workers forked by another thread die with the process, not with that
    thread: an executor may end its threads whenever it likes."""
    def both():
        with MapReduce(np=2) as pool:
            mapped = pool.map(lambda i: (i * i, os.getpid(), death_signal()), range(4))
        computed = sharedmem.get({"x": (lambda: (os.getpid(), death_signal()),)}, "x")
        return mapped, computed

    with ThreadPoolExecutor(1) as executor:
        mapped, computed = executor.submit(both).result()
    assert [sq for sq, _, _ in mapped] == [0, 1, 4, 9]
    assert all(pid != PARENT and sig == 0 for _, pid, sig in mapped)
    assert computed[0] != PARENT and computed[1] == 0
    with MapReduce(np=2) as pool:  # the main thread ends with the process: the kernel's rule
        assert pool.map(lambda i: death_signal(), range(2)) == [signal.SIGKILL] * 2


def test_background_never_waited_for_is_cleaned_up():
    bg = background(time.sleep, LONG)
    pid = bg._workers.pids[0]
    assert running(pid)
    del bg
    gc.collect()
    assert pid not in children()


def test_cpu_count_and_total_memory():
    assert sharedmem.cpu_count() >= 1
    with open("/proc/meminfo") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    assert sharedmem.total_memory() == kib * 1024


def test_aliases():
    assert sharedmem.Pool is MapReduce
    assert sharedmem.TPool is MapReduceByThread


# -- dask callbacks ---------------------------------------------------------------------

class Recorder(Callback):
    def __init__(self):
        super().__init__()
        self.events = []

    def _start(self, dsk):
        self.events.append(("start", len(dsk)))

    def _start_state(self, dsk, state):
        self.events.append(("start_state",))

    def _pretask(self, key, dsk, state):
        self.events.append(("pretask", key))

    def _posttask(self, key, result, dsk, state, worker_id):
        self.events.append(("posttask", key, result, worker_id))

    def _finish(self, dsk, state, errored):
        self.events.append(("finish", errored))


@pytest.mark.parametrize("kind", POOLS)
def test_progress_bar(kind):
    out = io.StringIO()
    bar = ProgressBar(out=out, dt=0.005)
    with POOLS[kind]() as pool, bar:
        result = pool.map(lambda i: time.sleep(0.002) or i, range(40))
    assert result == list(range(40))
    assert "100% Completed" in out.getvalue()
    state = bar._state
    assert len(state["finished"]) == 40
    assert sum(len(state[k]) for k in ("ready", "waiting", "running")) == 0


@pytest.mark.parametrize("kind", POOLS)
def test_callbacks_see_every_item(kind):
    n = 25
    with POOLS[kind]() as pool:
        with Recorder() as rec:
            assert pool.map(square, range(n)) == [i * i for i in range(n)]
        with Recorder() as failed, pytest.raises((WorkerException, ZeroDivisionError)):
            pool.map(lambda i: 1 // (i - 3), range(n))
    ev = rec.events
    assert ev[0] == ("start", n) and ev[1] == ("start_state",) and ev[-1] == ("finish", False)
    pre = [e[1] for e in ev if e[0] == "pretask"]
    post = {e[1]: e[2] for e in ev if e[0] == "posttask"}
    assert sorted(pre) == list(range(n)) and post == {i: i * i for i in range(n)}
    for i in range(n):
        assert ev.index(("pretask", i)) < next(k for k, e in enumerate(ev)
                                               if e[:2] == ("posttask", i))
    assert {e[3] for e in ev if e[0] == "posttask"} <= set(range(pool.np or 1))
    assert failed.events[-1] == ("finish", True)


def test_registered_callback():
    rec = Recorder()
    rec.register()
    try:
        with MapReduce(np=2) as pool:
            pool.map(square, range(5))
    finally:
        rec.unregister()
    assert sum(e[0] == "posttask" for e in rec.events) == 5


# -- errors in work functions -----------------------------------------------------------

def failing_work(i):
    if i == 3:
        raise ValueError(f"bad item {i}")
    if i > 3:
        time.sleep(LONG)
    return i


def test_exception_in_func():
    with MapReduce(np=2) as pool:
        with time_to_error("exception in func"), pytest.raises(WorkerException) as info:
            pool.map(failing_work, range(20))
        e = info.value
        assert type(e.reason) is ValueError and e.reason.args == ("bad item 3",)
        assert "failing_work" in e.traceback and 'raise ValueError(f"bad item {i}")' in e.traceback
        assert isinstance(e.reason.__cause__, RemoteTraceback)
        assert "ValueError: bad item 3" in str(e)
        assert_works(pool)


def raises_unpicklable(i):
    if i == 2:
        raise Unpicklable("cannot pickle me")
    if i == 5:
        raise TwoArgs("one", "two")
    if i > 5:
        time.sleep(LONG)
    return i


@pytest.mark.parametrize("items, cls, args", [(range(3), Unpicklable, ("cannot pickle me",)),
                                              (range(3, 20), TwoArgs, ("one and two",))])
def test_unpicklable_exception_keeps_message_and_traceback(items, cls, args):
    """Both come back as themselves, whatever is imported (an attribute that does not
    pickle is left out); no LostExceptionType warning."""
    with MapReduce(np=2) as pool:
        with warnings.catch_warnings(record=True) as caught, \
                pytest.raises(WorkerException) as info:
            warnings.simplefilter("always")
            pool.map(raises_unpicklable, items)
        e = info.value
        assert not any(w.category is LostExceptionType for w in caught)
        assert type(e.reason) is cls and e.reason.args == args
        assert "raises_unpicklable" in e.traceback and cls.__name__ in e.traceback
        assert_works(pool)


def test_unpicklable_result():
    with MapReduce(np=2) as pool:
        def work(i):
            if i > 3:
                time.sleep(LONG)
            return threading.Lock() if i == 3 else i

        with time_to_error("unpicklable result"), pytest.raises(WorkerException) as info:
            pool.map(work, range(20))
        reason = info.value.reason
        assert isinstance(reason, TypeError)
        assert "lock" in str(reason) and "item 3" in str(reason)
        assert_works(pool)


def test_a_function_made_by_the_item_that_cannot_travel_names_the_item():
    with MapReduce(np=2) as pool:
        def work(i):
            lock = threading.Lock()  # neither found in the parent nor picklable by value
            return lambda: lock.locked()

        with pytest.raises(WorkerException) as info:
            pool.map(work, range(1))
        reason = info.value.reason
        assert isinstance(reason, pickle.UnpicklingError)
        assert "lock" in str(reason) and "item 0" in str(reason)
        assert_works(pool)


def test_exception_of_a_class_defined_in_the_caller_keeps_its_type():
    class LocalError(ValueError):
        pass

    def work(i):
        if i == 3:
            raise LocalError(f"bad item {i}")
        return i

    with MapReduce(np=2) as pool:
        with pytest.raises(WorkerException) as info:
            pool.map(work, range(8))
    assert type(info.value.reason) is LocalError and info.value.reason.args == ("bad item 3",)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("how, status", [("SIGKILL", "killed by SIGKILL"),
                                         ("SIGSEGV", "killed by SIGSEGV"),
                                         ("exit3", "exited with code 3")])
def test_worker_death(how, status):
    with MapReduce(np=2) as pool:
        def work(i):
            if i == 7:
                if how == "exit3":
                    os._exit(3)
                faulthandler.disable()  # its report of the SIGSEGV is noise here
                os.kill(os.getpid(), getattr(signal, how))
            if i > 7:
                time.sleep(LONG)
            return i

        with time_to_error(f"worker {how}"), pytest.raises(WorkerException) as info:
            pool.map(work, range(20))
        reason = info.value.reason
        assert isinstance(reason, WorkerDied)
        assert status in str(reason) and "item 7" in str(reason)
        assert reason.pid != PARENT and reason.pid not in children()
        assert_works(pool)


def test_worker_dies_while_the_parent_reduces():
    """The parent learns of the death when it sends the next range, not by polling."""
    def work(i):
        if i == 1:
            os._exit(3)
        return i

    with MapReduce(np=1) as pool:
        with pytest.raises(WorkerException) as info:
            pool.map(work, range(5), reduce=lambda r: time.sleep(0.2) or r)
        assert isinstance(info.value.reason, WorkerDied)
        assert "exited with code 3" in str(info.value.reason) and "item 1" in str(info.value.reason)
        assert_works(pool)


@pytest.mark.parametrize("kind", POOLS)
def test_exception_in_reduce_propagates_as_itself_and_stops_workers(kind):
    def reduce(r):
        if r == 5:
            raise KeyError("reduce failed")
        return r

    def work(i):
        if i > 5 and kind == "processes":
            time.sleep(LONG)
        return i

    with POOLS[kind]() as pool:
        with time_to_error(f"exception in reduce ({kind})"), \
                pytest.raises(KeyError, match="reduce failed"):
            pool.map(work, range(20), reduce=reduce)
        assert_works(pool)


def test_keyboard_interrupt_in_the_parent_kills_and_reaps():
    started = sharedmem.zeros(2, dtype="i8")

    def interrupt():
        deadline = time.monotonic() + 20
        while not started.all() and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(PARENT, signal.SIGINT)  # Python raises it in the main thread, inside map

    with MapReduce(np=2) as pool:
        def work(i):
            started[pool.local.rank] = os.getpid()
            time.sleep(LONG)

        t = threading.Thread(target=interrupt)
        t.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                pool.map(work, range(4))
        finally:
            t.join()
        assert_works(pool)
    assert not any(running(pid) for pid in started.tolist())


def test_error_while_others_wait_in_ordered():
    with MapReduce(np=3) as pool:
        def work(i):
            if i == 4:
                time.sleep(0.05)  # let later items queue up at the ordered block
                raise ValueError("inside ordered")
            with pool.ordered:
                pass
            return i

        with time_to_error("error with workers waiting in ordered"), \
                pytest.raises(WorkerException) as info:
            pool.map(work, range(50))
        assert isinstance(info.value.reason, ValueError)
        assert_works(pool)


def test_death_inside_critical_releases_it():
    with MapReduce(np=2) as pool:
        def work(i):
            with pool.critical:
                if i == 2:
                    os.kill(os.getpid(), signal.SIGKILL)
            return i

        with pytest.raises(WorkerException, match="SIGKILL"):
            pool.map(work, range(10))
        assert pool.map(work, range(2)) == [0, 1]


def test_stop_process_group():
    with MapReduce(np=2) as pool:
        def work(i):
            if i == 10:
                raise StopProcessGroup
            time.sleep(0.002)
            return i

        out = pool.map(work, range(1000))
        reduced = pool.map(work, range(1000), reduce=lambda i: -i)
        assert_works(pool)
    assert out == sorted(out) and set(range(10)) <= set(out) and 10 not in out
    assert len(out) < 500  # it stopped early
    assert all(r <= 0 for r in reduced) and set(range(0, -10, -1)) <= set(reduced)
    with MapReduce(np=0) as pool:
        assert pool.map(work, range(1000)) == list(range(10))


def test_nested_map_reduce_in_a_worker():
    with MapReduce(np=2) as pool:
        def work(i):
            with MapReduce(np=2) as inner:
                parts = inner.map(lambda j: (j * i, os.getppid()), range(5))
            assert {ppid for _, ppid in parts} == {os.getpid()}
            return sum(p for p, _ in parts)

        assert pool.map(work, range(6)) == [10 * i for i in range(6)]


def test_nested_map_of_the_same_pool_keeps_critical_working():
    counter = sharedmem.zeros((), dtype="i8")
    with MapReduce(np=2) as pool:
        def work(i):
            total = sum(pool.map(square, range(3)))  # forks, in this worker, with this pool
            with pool.critical:
                value = int(counter)
                time.sleep(0.001)
                counter[...] = value + 1
            return total

        assert pool.map(work, range(40)) == [5] * 40
    assert int(counter) == 40


def test_bad_arguments_raise_before_forking(monkeypatch):
    def no_fork():
        raise AssertionError("forked")

    monkeypatch.setattr(os, "fork", no_fork)
    with pytest.raises(ValueError, match="np"):
        MapReduce(np=-1)
    for np_ in ("2", 2.0, True):
        with pytest.raises(TypeError, match="np"):
            MapReduce(np=np_)
    with pytest.raises(ValueError, match="backend"):
        MapReduce(np=2, backend="mpi")
    pool = MapReduce(np=2)
    with pytest.raises(TypeError, match="func"):
        pool.map(5, range(3))
    with pytest.raises(TypeError, match="reduce"):
        pool.map(square, range(3), reduce=3)
    with pytest.raises(TypeError, match="minlength"):
        pool.map(square, range(3), minlength="1")
    with pytest.raises(TypeError, match="function"):
        background(5)


# -- Ctrl-C and a killed parent, in a subprocess -------------------------------------------

SCRIPT = subprocess_script("""
    import os, sys, time
    import dask_sharedmem as sharedmem


    def work(i):
        with open(sys.argv[1], "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(600)

    with sharedmem.MapReduce(np=2) as pool:
        try:
            pool.map(work, range(4))
        except KeyboardInterrupt:
            print("children after KeyboardInterrupt:", sorted(children()), flush=True)
            raise
""")


def start_script(tmp_path, **kwargs):
    pidfile = tmp_path / "pids"
    pidfile.touch()
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(pidfile)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
    deadline = time.monotonic() + 20
    while len(pidfile.read_text().split()) < 2:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the workers did not start"
        time.sleep(0.01)
    return proc, [int(p) for p in pidfile.read_text().split()]


@pytest.mark.parametrize("group", [False, True], ids=["parent", "process-group"])
def test_ctrl_c(tmp_path, group):
    proc, workers = start_script(tmp_path, start_new_session=True)
    with ended(proc):
        t0 = time.perf_counter()
        if group:  # what a terminal does: every process of the foreground group
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=20)
        print(f"\ntime from SIGINT ({'group' if group else 'parent'}) to exit: "
              f"{(time.perf_counter() - t0) * 1e3:.1f} ms")
    assert proc.returncode in (-signal.SIGINT, 130, 1), (proc.returncode, err)
    assert "Traceback" in err and err.rstrip().endswith("KeyboardInterrupt"), err
    assert err.count("KeyboardInterrupt") == 1, err  # the workers ignored it
    assert "children after KeyboardInterrupt: []" in out  # reaped before re-raising
    assert not any(running(pid) for pid in workers)


def test_workers_die_with_a_killed_parent(tmp_path):
    proc, workers = start_script(tmp_path)
    with ended(proc):
        assert all(running(pid) for pid in workers)
        t0 = time.perf_counter()
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 2
        while any(running(pid) for pid in workers):
            assert time.monotonic() < deadline, "workers outlived their SIGKILLed parent"
            time.sleep(0.005)
        gone = (time.perf_counter() - t0) * 1e3
        print(f"\nworkers gone {gone:.1f} ms after SIGKILL of the parent")


# -- the seed README's examples ----------------------------------------------------------

def test_readme_integration():
    """Integrate [0, ... 1.0) with the rectangle rule (the README's first example)."""
    xdx = sharedmem.empty(2**22, dtype="f8")
    shmsum = sharedmem.empty((), dtype="f8")

    shmsum[...] = 0.0

    with sharedmem.MapReduce() as pool:

        def work(i):
            s = slice(i, i + chunksize)
            start, end, step = s.indices(len(xdx))

            dx = 1.0 / len(xdx)

            myxdx = np.arange(start, end, step) * 1.0 / len(xdx) * dx

            xdx[s] = myxdx

            a = xdx[s].sum(dtype="f8")

            with pool.critical:
                shmsum[...] += a

            return i, a

        def reduce(i, a):
            return a

        chunksize = 2**16

        r = pool.map(work, range(0, len(xdx), chunksize), reduce=reduce)

    assert_almost_equal(np.sum(r, dtype="f8"), shmsum)
    assert_almost_equal(np.sum(xdx, dtype="f8"), shmsum)
    n = len(xdx)
    assert_almost_equal(shmsum, (n - 1) / (2 * n))  # sum of k / n**2 for k < n


def test_readme_word_count():
    """The README's word count, reading this file with open() instead of file()."""
    word_count = {
        "sharedmem": 0,
        "pool": 0,
    }

    with sharedmem.MapReduce() as pool:

        def work(line):
            # create a fresh local counter dictionary
            my_word_count = dict([(word, 0) for word in word_count])

            for word in line.replace(".", " ").split():
                if word in word_count:
                    my_word_count[word] += 1

            return my_word_count

        def reduce(her_word_count):
            for word in word_count:
                word_count[word] += her_word_count[word]

        with open(__file__) as f:
            pool.map(work, f.readlines(), reduce=reduce)

        parallel_result = dict(word_count)

        # establish the ground truth from the sequential counter
        sharedmem.set_debug(True)
        try:
            for word in word_count:
                word_count[word] = 0

            with open(__file__) as f:
                pool.map(work, f.readlines(), reduce=reduce)
        finally:
            sharedmem.set_debug(False)

    for word in word_count:
        assert word_count[word] == parallel_result[word]
    with open(__file__) as f:
        words = f.read().replace(".", " ").split()
    assert parallel_result == {w: words.count(w) for w in word_count}
    assert parallel_result["pool"] > 10 and parallel_result["sharedmem"] > 10
