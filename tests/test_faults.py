"""Every way a worker or the parent can fail, for MapReduce and for the dask scheduler.

One test per way to fail, parametrized over the two engines where the fault
means the same for both (``ENGINES``).  Each test

* runs under a timeout: an error must arrive, never a hang;
* keeps the other worker busy in a long sleep where it can, so that it passes
  only if the error arrives at once, not when the rest of the work is done;
* records *time to error*: from the moment of the fault (written by the
  faulting process into shared memory, ``time.monotonic`` being system-wide
  on Linux) to the moment the exception reached the caller, and the total
  time of the call;
* checks with ``no_leaks`` that no child process, file descriptor or shared
  segment is left, and records those resources before and after.

The numbers are printed (``pytest -s``) and listed again in the terminal
summary under "dask_sharedmem measurements".

Engines differ in how they report: ``MapReduce.map`` wraps what went wrong in
a worker in :class:`WorkerException` (``.reason`` is the error) and raises
errors of ``reduce`` (which runs in the caller) as themselves; ``get`` raises
a task's own exception, and :class:`WorkerDied`, as dask's local schedulers do.
:meth:`Case.expect` hides that difference.
"""

import contextlib
import errno
import faulthandler
import importlib.util
import json
import os
import pickle
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import warnings

import dask
import dask.array as da
import numpy as np
import pytest
from conftest import (
    BadStr,
    Formatted,
    SlotHoldsLock,
    Slotted,
    SlottedWithDict,
    TwoArgs,
    Unpicklable,
    children,
    ended,
    measured,
    running,
    seen,
    snapshot,
    subprocess_script,
)
from dask.callbacks import Callback

import dask_sharedmem
from dask_sharedmem import (
    LostExceptionType,
    MapReduce,
    WorkerDied,
    WorkerException,
    memory,
    pool,
    transports,
)
from dask_sharedmem.remote import LostException, RemoteTraceback

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_leaks", "always_fork")]

LONG = 600  # seconds: a sleep that only a kill can end
MB = 1 << 20
ENGINES = ["mapreduce", "scheduler"]
BOUND = 5.0  # seconds: an error that takes longer than this did not arrive "at once"


# -- the harness ---------------------------------------------------------------------

def run(engine, tasks, np=2, reduce=None):
    """Run each zero-argument callable of ``tasks``: one item of a map, or one task of a graph.

    Two workers, two tasks: both engines hand the first task to worker 0 and
    the second to worker 1 (and the rendezvous of :meth:`Case.meet` checks it).
    """
    if engine == "mapreduce":
        with MapReduce(np=np) as pool:
            return pool.map(lambda f: f(), tasks, reduce=reduce)
    dsk = {("t", i): (f,) for i, f in enumerate(tasks)}
    return list(dask_sharedmem.get(dsk, list(dsk), num_workers=np))


def still_works(engine):
    """After an error, a new session of the same engine is as good as new."""
    assert run(engine, [lambda: 1, lambda: 2]) == [1, 2]


def item(engine, i):
    """How each engine names the i-th task of :func:`run` in its messages."""
    return f"item {i}" if engine == "mapreduce" else repr(("t", i))


def usage(snap):
    return f"{len(snap['children'])}/{len(snap['fds'])}/{snap['segments']}"


class Case:
    """One fault: shared memory for the workers to report in, and the clocks."""

    def __init__(self, name, before):
        self.name = name
        self.before = before
        self.clock = memory.zeros((), dtype="f8")  # when the fault happened (monotonic)
        self.slots = memory.zeros(8, dtype="i8")  # worker pids, written by tasks
        self.latency = self.total = None
        self.exc = None
        self.note = ""

    def fault(self):
        """Call right before the fault (in whichever process makes it)."""
        self.clock[...] = time.monotonic()

    def meet(self, i, parties=2, seconds=20):
        """Write our pid to slot ``i``; wait until ``parties`` distinct pids are there.

        A rendezvous: it returns True as soon as enough different workers run
        at once.  The deadline turns a scheduling change (the two tasks on one
        worker, one after the other) into False and a slow test, not a hang.
        """
        self.slots[i] = os.getpid()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if len(set(self.slots[self.slots != 0].tolist())) >= parties:
                return True
            time.sleep(0.001)
        return False

    def busy(self, i, parties=2, seconds=20):
        """The sibling of a fault: meets it, then sleeps until killed."""
        if self.meet(i, parties, seconds):
            time.sleep(LONG)
        return i

    @contextlib.contextmanager
    def expect(self, engine, kind, match=None, wrapped=True):
        """``pytest.raises`` for both engines; record the time to error.

        ``kind`` is the error itself (a type or tuple of types): MapReduce
        must wrap it in a WorkerException unless ``wrapped`` is False (errors of
        the caller's own code, such as ``reduce`` and callbacks).
        """
        outer = WorkerException if engine == "mapreduce" and wrapped else kind
        t0 = time.monotonic()
        with pytest.raises(outer) as info:
            try:
                yield info
            finally:
                t1 = time.monotonic()
        self.exc = info.value.reason if engine == "mapreduce" and wrapped else info.value
        assert isinstance(self.exc, kind), repr(self.exc)
        if match is not None:
            assert re.search(match, str(self.exc)), str(self.exc)
        self.total = t1 - t0
        if float(self.clock):
            self.latency = t1 - float(self.clock)
            assert self.latency < BOUND, f"the error took {self.latency:.1f} s to arrive"

    @contextlib.contextmanager
    def timed(self):
        """For calls that must succeed: record how long they took."""
        t0 = time.monotonic()
        yield
        self.total = time.monotonic() - t0

    def release(self):
        # the clock and slots are shared segments; the exception's traceback
        # holds the frames of the call, and they hold its shared arrays
        del self.clock, self.slots
        self.what = "ok" if self.exc is None else type(self.exc).__name__
        self.exc = None

    def line(self, after):
        ms = lambda s: "-" if s is None else f"{s * 1e3:8.1f} ms"
        return (f"fault {self.name:58s} {self.what:16s} to error {ms(self.latency)}  "
                f"call {ms(self.total)}  children/fds/segments {usage(self.before)}"
                f" -> {usage(after)}{self.note}")


@pytest.fixture
def case(request, no_leaks):
    c = Case(request.node.name.removeprefix("test_"), no_leaks)
    yield c
    c.release()
    if not getattr(request.node, "_call_failed", False):
        measured(c.line(snapshot()))


# -- exceptions ----------------------------------------------------------------------

class CustomError(Exception):
    pass


@pytest.mark.parametrize("error", [CustomError, SystemExit, KeyboardInterrupt])
@pytest.mark.parametrize("engine", ENGINES)
def test_exception_in_a_task(engine, error, case):
    def bad():
        case.meet(0)
        case.fault()
        raise error(3)

    with case.expect(engine, error):
        run(engine, [bad, lambda: case.busy(1)])
    cause = case.exc.__cause__
    assert isinstance(cause, RemoteTraceback) and "in bad" in cause.tb
    still_works(engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_exception_in_reduce(engine, case):
    """MapReduce: ``reduce`` runs in the caller.  Scheduler: the aggregate of a tree reduction."""
    if engine == "mapreduce":
        def work(i):
            if i >= 4:
                time.sleep(LONG)  # only sent after the first results: these are busy
            return i

        def reduce(r):
            if r == 3:
                case.fault()
                raise CustomError("reduce failed")
            return r

        with MapReduce(np=2) as pool, case.expect(engine, CustomError, "reduce failed",
                                                   wrapped=False):
            pool.map(work, range(20), reduce=reduce)
    else:
        def aggregate(part):
            case.meet(0)
            case.fault()
            raise CustomError("reduce failed")

        # "part" -> "total" is a chain, sent to one worker as one batch: with
        # "busy" there are two batches, one for each worker (in a wider tree
        # "total" could be queued behind "busy" on the same worker)
        dsk = {"part": (sum, [1, 2, 3]), "total": (aggregate, "part"), "busy": (case.busy, 1)}
        with case.expect(engine, CustomError, "reduce failed"):
            dask_sharedmem.get(dsk, ["total", "busy"], num_workers=2)
        assert "in aggregate" in case.exc.__cause__.tb
    still_works(engine)


class Boom(Callback):
    def _posttask(self, key, result, dsk, state, worker_id):
        raise CustomError("callback failed")


@pytest.mark.parametrize("engine", ENGINES)
def test_exception_in_a_callback_in_the_parent(engine, case):
    """The caller's own code fails mid-run (a dask callback): busy workers are killed."""
    def quick():
        case.meet(0)
        case.fault()
        return 0

    with Boom(), case.expect(engine, CustomError, "callback failed", wrapped=False):
        run(engine, [quick, lambda: case.busy(1)])
    still_works(engine)


# -- a worker dies -------------------------------------------------------------------

DEATHS = {
    "SIGKILL": "was killed by SIGKILL",
    "SIGSEGV": "was killed by SIGSEGV",
    "SIGTERM": "was killed by SIGTERM",
    "os._exit": "exited with code 3",
}


def die(how):
    if how == "os._exit":
        os._exit(3)
    if how == "SIGSEGV":
        faulthandler.disable()  # pytest's handler would print every thread's stack first
    os.kill(os.getpid(), getattr(signal, how))
    time.sleep(LONG)


@pytest.mark.parametrize("how", DEATHS)
@pytest.mark.parametrize("engine", ENGINES)
def test_worker_dies_in_a_task(engine, how, case):
    def doomed():
        case.meet(0)
        case.fault()
        die(how)

    with case.expect(engine, WorkerDied, DEATHS[how]):
        run(engine, [doomed, lambda: case.busy(1)])
    e = case.exc
    assert item(engine, 0) in str(e), str(e)
    assert e.pid == case.slots[0] and not running(e.pid)
    still_works(engine)


def waiting_for_work(pid):
    """Whether ``pid`` is blocked reading its socket, or the queue of a map (a pipe):
    what an idle worker does."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f.read().startswith(("unix_stream", "anon_pipe_read", "pipe_read",
                                        "pipe_wait"))
    except OSError:
        return False


@pytest.mark.parametrize("how", ["timer SIGKILL", "timer os._exit", "parent SIGKILL",
                                 "parent SIGTERM"])
@pytest.mark.parametrize("engine", ENGINES)
def test_worker_dies_between_tasks(engine, how, case):
    """A worker that finished its task dies while waiting for more work.

    ``timer``: the task arms a timer in its worker and returns; the timer's
    thread kills the idle worker.  ``parent``: a thread of the test reads the
    worker's pid from shared memory, waits until the worker sleeps in its
    read of the socket or the queue, and kills it.
    """
    who, sig = how.split()

    def arm():
        case.meet(0)
        if who == "timer":
            threading.Timer(0.05, lambda: (case.fault(), die(sig))).start()
        return 0

    def kill_when_idle():
        deadline = time.monotonic() + 20
        while not (case.slots[0] and waiting_for_work(int(case.slots[0]))):
            if time.monotonic() > deadline:
                return
            time.sleep(0.002)
        case.fault()
        os.kill(int(case.slots[0]), getattr(signal, sig))

    killer = threading.Thread(target=kill_when_idle) if who == "parent" else None
    if killer:
        killer.start()
    try:
        with case.expect(engine, WorkerDied, DEATHS[sig]):
            run(engine, [arm, lambda: case.busy(1)])
    finally:
        if killer:
            killer.join()
    e = case.exc
    assert e.pid == case.slots[0] and not running(e.pid)
    # it ran nothing when it died: the message must not blame a task that had finished
    assert "waiting for work" in str(e) and "None" not in str(e), str(e)
    assert item(engine, 0) not in str(e), str(e)
    still_works(engine)


# -- a worker dies before its result is copied out of it ------------------------------

PULLED = 8 * MB  # a result this large stays in its maker's memory until it is copied out
TARGET = 0.2  # seconds from the kill to the error: what we aim at (printed, not asserted)
SHM_NOTE = "  (shm: nothing lost; the death is seen as a worker's between tasks)"


def pulled():
    """Whether a worker's large result is copied out of its own memory (cma), or sent
    in shared memory (shm: ``DASK_SHAREDMEM__TRANSPORT=shm``, or a kernel that refuses
    process_vm_readv), which outlives the worker: then its death loses nothing."""
    return transports.choose() == "cma"


def kill_maker_in_pull(monkeypatch, case, victim, when, puller, at=("fetch", "fetch_into"),
                       nth=1):
    """Kill the maker of a large value in the first pull of it: the pull then finds it gone.

    ``puller`` is the pid of the process that pulls (None: any worker).
    ``when``: ``"before"`` the value's buffers are fetched at all (by the
    functions of transports named in ``at``: either room), killing ``victim()``,
    the maker's pid (which the test knows: tasks write theirs in ``case.slots``;
    shm's stand-ins do not name it), or with ``victim`` None the maker of what
    is pulled (cma: its offer names it); or ``"midway"``, after ``process_vm_readv``
    has copied half of them out of the maker (cma only).  The killer waits
    until the maker has exited before it goes on, so that what follows is the
    same on every run.  Installed before the fork: workers have it too.
    ``nth``: the kill comes in the nth pull (the first ones go through).
    """
    parent = os.getpid()
    done = []
    lock, killed = threading.Lock(), threading.Event()

    def mine():
        """Whether this is the first pull; any other waits for the kill (a join pulls
        its chunks by several threads: none may finish first by chance)."""
        me = os.getpid()
        if (me != puller if puller is not None else me == parent) or (
                victim is not None and me == victim()):
            return False
        with lock:
            done.append(1)
            first = len(done) == nth
        if len(done) > nth:
            killed.wait(20)
        return first

    def kill(pid):
        case.slots[7] = pid
        case.fault()
        os.kill(pid, signal.SIGKILL)
        if os.getpid() == parent:
            exited(pid)
        else:  # a sibling: not ours to wait for
            wait_gone([pid], 20)
        killed.set()

    if when == "midway":
        real_pull = transports.cma.pull

        def pull(pid, remote, local):
            if not mine():
                return real_pull(pid, remote, local)
            total = sum(n for _, n in remote)
            rs, ls = (transports._split(list(pieces), 2, total) for pieces in (remote, local))
            real_pull(pid, rs[0], ls[0])
            kill(pid)
            real_pull(pid, rs[1], ls[1])

        monkeypatch.setattr(transports.cma, "pull", pull)
        return
    real_fetch, real_fetch_into = transports.fetch, transports.fetch_into

    def fetch(items):
        if items and mine():
            kill(int(victim() if victim is not None else items[0].pid))
        return real_fetch(items)

    def fetch_into(item, out):
        if mine():
            kill(int(victim() if victim is not None else item.pid))
        return real_fetch_into(item, out)

    for name, hook in (("fetch", fetch), ("fetch_into", fetch_into)):
        if name in at:
            monkeypatch.setattr(transports, name, hook)


def nothing_lost(e):
    """Under shm: the death of a worker whose results were all in: no result lost."""
    text = str(e)
    assert "waiting for work" in text and "lost" not in text, text


WHEN = ["before", "midway"]


def skip_midway_under_shm(when):
    if when == "midway" and not pulled():
        pytest.skip("shm: nothing is pulled out of the maker (a shared segment is mapped whole)")


@pytest.mark.parametrize("when", WHEN)
@pytest.mark.parametrize("engine", ENGINES)
def test_worker_killed_while_its_result_is_pulled(engine, when, monkeypatch, case):
    """The caller's result (a map item's, a wanted key's) is being copied out of its
    maker when the maker is SIGKILLed: a WorkerDied that names the item or task."""
    skip_midway_under_shm(when)

    def maker():
        case.meet(0)
        return np.full(PULLED // 8, 7.0)

    kill_maker_in_pull(monkeypatch, case, lambda: case.slots[0], when, puller=os.getpid())
    with case.expect(engine, WorkerDied, DEATHS["SIGKILL"]):
        run(engine, [maker, lambda: case.busy(1)])
    e = case.exc
    assert e.pid == case.slots[0] == case.slots[7] and not running(e.pid)
    if pulled():
        what = item(engine, 0) if engine == "mapreduce" else f"task {item(engine, 0)}"
        assert f"the result of {what} was lost with it" in str(e), str(e)
    else:  # the result was in shared memory, and arrived whole: the death is all
        nothing_lost(e)
    case.note = f"  (target {TARGET} s)" if pulled() else SHM_NOTE
    monkeypatch.undo()
    still_works(engine)


@pytest.mark.parametrize("when", WHEN)
def test_worker_killed_while_the_join_pulls_its_chunk(when, monkeypatch, case):
    """The join of a dask array pulls its chunks straight into their slots (strided
    ones: the chunks split the columns); the maker of one is SIGKILLed meanwhile."""
    skip_midway_under_shm(when)
    slots = case.slots

    def block(b, block_info=None):
        k = block_info[0]["chunk-location"][1]
        slots[k] = os.getpid()
        return b + k

    x = da.zeros((256, 2 * 4096), chunks=(256, 4096)).map_blocks(block, dtype="f8")
    expected = np.repeat([0.0, 1.0], 4096)[None, :].repeat(256, axis=0)
    # chunks are pulled into their slots as they arrive: the maker of the first one
    # pulled is killed; under shm (whose stand-ins name no process) that of chunk 0,
    # once both have arrived
    if pulled():
        kill_maker_in_pull(monkeypatch, case, None, when, puller=os.getpid(),
                           at=("fetch_into",))
    else:
        kill_maker_in_pull(monkeypatch, case, lambda: slots[0], when, puller=os.getpid(),
                           at=("fetch_into",), nth=2)
    if not pulled():  # in shared memory: the join finds the chunk whole
        with case.timed():
            np.testing.assert_array_equal(x.compute(scheduler=dask_sharedmem.get, num_workers=2),
                                          expected)
        assert not running(int(slots[7]))
        case.note = "  (shm: the chunk of the killed maker arrived whole)"
    else:
        with case.expect("scheduler", WorkerDied, DEATHS["SIGKILL"]):
            x.compute(scheduler=dask_sharedmem.get, num_workers=2)
        e = case.exc
        assert e.pid == slots[7] and not running(e.pid)
        assert x.name in str(e) and "lost" in str(e), str(e)
        case.note = f"  (target {TARGET} s)"
    monkeypatch.undo()
    still_works("scheduler")


def test_worker_killed_while_holding_a_needed_result(monkeypatch, case):
    """Task b needs a0 and a1, made at once by the two workers; whichever runs b pulls
    the other's, and kills it first: a WorkerDied naming the dead worker and the
    result lost with it (or the task that needed it), never a hang or wrong data."""
    def made(i):
        assert case.meet(i), "a0 and a1 did not run at once"
        return np.full(PULLED // 8, float(i))

    def needs(a0, a1):
        return float(a0.sum() + a1.sum())

    slots = case.slots
    victim = lambda: slots[1] if slots[0] == os.getpid() else slots[0]  # noqa: E731
    kill_maker_in_pull(monkeypatch, case, victim, "before", puller=None)
    dsk = {"a0": (made, 0), "a1": (made, 1), "b": (needs, "a0", "a1")}
    with case.expect("scheduler", WorkerDied, DEATHS["SIGKILL"]):
        dask_sharedmem.get(dsk, "b", num_workers=2)
    e = case.exc
    assert e.pid == slots[7] and not running(e.pid)
    lost = "a0" if slots[0] == slots[7] else "a1"
    if pulled():
        assert f"'{lost}'" in str(e) and "lost" in str(e), str(e)
        case.note = f"  (target {TARGET} s; the killer: the worker that runs 'b')"
    else:  # b read a0 and a1 out of shared memory: only the death is an error
        nothing_lost(e)
        case.note = SHM_NOTE
    monkeypatch.undo()
    still_works("scheduler")


# -- what cannot be pickled ----------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_unpicklable_result(engine, case):
    def bad():
        case.meet(0)
        case.fault()
        return threading.Lock()

    with case.expect(engine, TypeError):
        run(engine, [bad, lambda: case.busy(1)])
    text = str(case.exc)
    assert item(engine, 0) in text and "pickle" in text and "lock" in text, text
    still_works(engine)


def _refuse_to_unpickle():
    raise CustomError("this object refuses to be unpickled")


class Unloadable:
    """Pickles fine in the worker; unpickling it in the parent fails."""

    def __reduce__(self):
        return (_refuse_to_unpickle, ())


@pytest.mark.parametrize("engine", ENGINES)
def test_result_that_cannot_be_unpickled(engine, case):
    def bad():
        case.meet(0)
        case.fault()
        return Unloadable()

    with case.expect(engine, pickle.UnpicklingError, "could not be unpickled in the parent"):
        run(engine, [bad, lambda: case.busy(1)])
    text = str(case.exc)
    assert item(engine, 0) in text and "refuses to be unpickled" in text, text
    assert f"pid {case.slots[0]}" in text and isinstance(case.exc.__cause__, CustomError)
    still_works(engine)


def test_result_that_cannot_be_unpickled_from_a_range_taken_off_the_queue(case):
    """Workers take ranges from one queue: the parent learns whose range it was from
    the slot the worker marked, and names the item (ranges of one: items of 25 ms)."""
    def work(i):
        time.sleep(0.025)
        if i == 5:
            case.fault()
            return Unloadable()
        return i

    with case.expect("mapreduce", pickle.UnpicklingError, "could not be unpickled"):
        with MapReduce(np=2) as pool:
            pool.map(work, range(8))
    assert "result of item 5" in str(case.exc), str(case.exc)
    still_works("mapreduce")


def test_unpicklable_items_of_a_map_are_inherited(case):
    """MapReduce never pickles its items: locks, lambdas, generators are fine."""
    locks = [threading.Lock() for _ in range(6)]
    locks[2].acquire()
    with MapReduce(np=2) as pool, case.timed():
        assert pool.map(lambda lock: lock.locked(), locks) == [False, False, True] + [False] * 3
    locks[2].release()


class Tripler:
    """Multiplies by 3, and cannot be pickled (a function made in a worker can:
    by value, with cloudpickle)."""

    def __init__(self):
        self.lock = threading.Lock()

    def __call__(self, v):
        return v * 3


@pytest.mark.parametrize("consumer", ["chained", "two inputs"])
def test_unpicklable_input_of_a_task(consumer, case):
    """A task's result that cannot be pickled is fine while it stays in its worker
    (its only dependent runs right after it, in the same worker); when it must
    travel to the task that needs it, the error names the task that made it."""
    if consumer == "chained":
        dsk = {"f": (Tripler,), "y": (lambda f: f(14), "f")}
        with case.timed():
            assert dask_sharedmem.get(dsk, "y", num_workers=2) == 42
        return
    dsk = {"f": (Tripler,), "n": (int, 14), "y": (lambda f, n: f(n), "f", "n")}
    with case.expect("scheduler", TypeError, "'f'"):
        dask_sharedmem.get(dsk, "y", num_workers=2)
    assert "pickle" in str(case.exc)
    still_works("scheduler")


@pytest.mark.parametrize("error", [Unpicklable("holds a lock"), SlotHoldsLock("holds a lock"),
                                   TwoArgs("one", "two"), ValueError(threading.Lock())],
                         ids=["attribute-cannot-pickle", "slot-cannot-pickle",
                              "init-takes-other-arguments", "args-cannot-pickle"])
@pytest.mark.parametrize("engine", ENGINES)
def test_unpicklable_exception(engine, error, case):
    """Plain pickle fails on three (it would make the slot's lock anew, calling
    ``__init__``): only the last, whose args do not pickle, is lost."""
    def bad():
        case.meet(0)
        case.fault()
        raise error

    lost = isinstance(error, ValueError)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with case.expect(engine, LostException if lost else type(error)):
            run(engine, [bad, lambda: case.busy(1)])
    text = str(case.exc)
    assert str(error) in text, text
    tb = case.exc.__cause__.tb
    assert "in bad" in tb
    if not lost:
        assert type(case.exc) is type(error) and case.exc.args == error.args
        assert not hasattr(case.exc, "lock")
        assert ("attribute 'lock'" in tb) == hasattr(error, "lock")  # named as left out
        assert not any(w.category is LostExceptionType for w in caught)
    elif engine == "mapreduce":
        assert "ValueError" in text, text
        assert any(w.category is LostExceptionType for w in caught)
    else:
        assert "ValueError" in text and "('t', 0)" in text, text
    still_works(engine)


def raise_formatted():
    raise Formatted(7)


def raise_two_args():
    raise TwoArgs(1, 2)


def raise_bad_str():
    raise BadStr("unprintable")


def raise_chained():
    try:
        raise KeyError("first")
    except KeyError:
        raise Formatted(7) from TwoArgs(1, 2)


def raise_axis_error():
    np.moveaxis(np.zeros(3), 2, 0)  # numpy's AxisError keeps axis and ndim in __slots__


def raise_slotted():
    raise Slotted(3, "bad")


def raise_slotted_with_dict():
    raise SlottedWithDict(4, "worse")


#: exceptions that plain pickle rebuilds wrong or not at all, or cannot even print,
#: and those whose __init__ alone sets their __slots__
REBUILT = [raise_formatted, raise_two_args, raise_bad_str, raise_chained, raise_axis_error,
           raise_slotted, raise_slotted_with_dict]


def caught(call, *args, **kwargs):
    try:
        call(*args, **kwargs)
    except BaseException as e:
        return e
    raise AssertionError(f"{call} raised nothing")


def same_as_threads(engine, raises):
    """Raise in a task with processes and with threads: the caller sees the same exception.

    Only the top ``__cause__`` differs: with processes it is the worker's
    traceback, whose own ``__cause__`` is the original cause.
    """
    if engine == "mapreduce":
        def call(backend):
            with MapReduce(np=2, backend=backend) as pool:
                pool.map(lambda f: f(), [raises])
        theirs, ours = caught(call, "thread"), caught(call, "process")
        if isinstance(theirs, WorkerException):  # not when str() fails: it has the message
            assert isinstance(ours, WorkerException), repr(ours)
            theirs, ours = theirs.reason, ours.reason
    else:
        dsk = {"x": (raises,)}
        theirs, ours = caught(dask.get, dsk, "x", scheduler="threads"), \
            caught(dask_sharedmem.get, dsk, "x", num_workers=2)
    remote = isinstance(ours.__cause__, RemoteTraceback)
    if remote:
        assert f"in {raises.__name__}" in ours.__cause__.tb
    assert seen(ours, ours.__cause__.__cause__ if remote else ours.__cause__) == \
        seen(theirs, theirs.__cause__)


@pytest.mark.parametrize("raises", REBUILT)
@pytest.mark.parametrize("engine", ENGINES)
def test_exception_comes_back_as_with_threads(engine, raises, case):
    with case.timed():
        same_as_threads(engine, raises)
    still_works(engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_axis_error_comes_back_whole(engine, case):
    """numpy's AxisError: its message is made from the slots ``axis`` and ``ndim``."""
    theirs = caught(raise_axis_error)  # (np.exceptions is numpy 1.25+)
    with case.expect(engine, type(theirs)):
        run(engine, [raise_axis_error])
    ours = case.exc
    assert (type(ours), ours.args, str(ours), ours.axis, ours.ndim) == \
        (type(theirs), theirs.args, str(theirs), theirs.axis, theirs.ndim)
    assert (ours.axis, ours.ndim) == (2, 1)


SAME_AS_THREADS = subprocess_script("""
    import pickle, sys
    if sys.argv[1] == "distributed":
        import distributed  # installs tblib's pickling of exceptions
    from conftest import TwoArgs
    from test_faults import ENGINES, REBUILT, same_as_threads

    try:
        pickle.loads(pickle.dumps(TwoArgs(1, 2)))
        plain = True
    except TypeError:
        plain = False
    assert plain == ("distributed" in sys.modules), "tblib's pickling changes plain pickle"
    for engine in ENGINES:
        for raises in REBUILT:
            same_as_threads(engine, raises)
    print("same")
""")


@pytest.mark.parametrize("imported", ["distributed", "no-distributed"])
def test_exception_comes_back_whatever_is_imported(imported, case):
    """distributed installs tblib's pickling of exceptions: it must change nothing."""
    if imported == "distributed" and importlib.util.find_spec("distributed") is None:
        pytest.skip("distributed is not installed")  # not importorskip: it would import it here
    with case.timed():
        proc = subprocess.run([sys.executable, "-c", SAME_AS_THREADS, imported],
                              capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0 and proc.stdout.strip() == "same", proc.stderr


# -- results too large for the socket --------------------------------------------------

LARGE = {
    "bytes 50 MB": lambda: b"\x01\x02\x03\x04\x05" * (10 * MB),
    "list of 10**6 ints": lambda: list(range(10**6)),
    "dict of 10**5 str": lambda: {str(k): k for k in range(10**5)},
    "ndarray 50 MB": lambda: np.arange(50 * MB // 8, dtype="f8"),
}


@pytest.mark.parametrize("what", LARGE)
@pytest.mark.parametrize("engine", ENGINES)
def test_large_result(engine, what, case):
    make = LARGE[what]
    with case.timed():
        out = run(engine, [make, make, make])
    expected = make()
    for r in out:
        if isinstance(expected, np.ndarray):
            np.testing.assert_array_equal(r, expected)
        else:
            assert r == expected


def big_bytes(i):
    return bytes([i]) * (50 * MB)


def both(a, b):
    return len(a) + len(b), a[0], b[0]


def test_large_inputs_and_results_both_ways(case):
    """Large results come back while large inputs go out to the same workers.

    Each worker has two batches in flight: the parent sends one with 100 MB
    of inputs while the worker sends its 50 MB result.  Over a socket alone
    both would block in ``send``, each waiting for the other to read.
    """
    n = 4
    dsk = {("a", i): (big_bytes, i) for i in range(n)}
    dsk.update({("c", i): (both, ("a", i), ("a", (i + 1) % n)) for i in range(n)})
    with case.timed():
        out = dask_sharedmem.get(dsk, [("c", i) for i in range(n)], num_workers=2)
    assert out == tuple((100 * MB, i, (i + 1) % n) for i in range(n))


SPILLED_WHILE_THE_PARENT_ENDS = subprocess_script("""
    import select, sys
    import dask_sharedmem

    def hold_after_sendmsg(frame, event, arg):
        # as a busy machine's scheduler may: the worker stops right after sending
        # its result's descriptors, until the parent has read it, finished and closed
        if event == "c_return" and getattr(arg, "__name__", "") == "sendmsg":
            select.select([arg.__self__], [], [], 20)

    def work(i):
        sys.setprofile(hold_after_sendmsg)  # in this worker, from now on
        return [i] * 100_000  # a pickle over 64 KiB that is not an array: spilled

    with dask_sharedmem.MapReduce(np=2) as pool:
        assert pool.map(work, [0, 1]) == [[0] * 100_000, [1] * 100_000]
    dsk = {("t", i): (work, i) for i in range(2)}
    assert dask_sharedmem.get(dsk, list(dsk), num_workers=2) == ([0] * 100_000, [1] * 100_000)
    print("done")
""")


def test_spilled_results_while_the_parent_ends_print_nothing(case):
    """A spilled result is complete once its descriptors are sent: a worker held
    there while the parent finishes must not fail on the closed socket, or print."""
    with case.timed():
        proc = subprocess.run([sys.executable, "-c", SPILLED_WHILE_THE_PARENT_ENDS],
                              capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr
    assert "Traceback" not in proc.stderr and "Error" not in proc.stderr, proc.stderr


# -- the parent: Ctrl-C, killed --------------------------------------------------------

PARENT_SCRIPT = subprocess_script("""
    import json, os, sys, threading, time
    import dask_sharedmem

    engine, where, nested = sys.argv[1], sys.argv[2], sys.argv[3] == "nested"
    from_thread = sys.argv[4] == "thread"


    def started(tasks):
        return [dask_sharedmem.background(f) for f in tasks]

    def run(tasks):
        if engine == "background":
            return [call.wait() for call in started(tasks)]
        if engine == "mapreduce":
            with dask_sharedmem.MapReduce(np=len(tasks)) as pool:
                return pool.map(lambda f: f(), tasks)
        dsk = {("t", i): (f,) for i, f in enumerate(tasks)}
        return dask_sharedmem.get(dsk, list(dsk), num_workers=len(tasks))

    def sleeper():
        open(os.path.join(where, str(os.getpid())), "w").close()
        if nested:  # a worker with a worker of its own
            run([lambda: sleeper_inner()])
        time.sleep(600)

    def sleeper_inner():
        open(os.path.join(where, str(os.getpid())), "w").close()
        time.sleep(600)

    try:
        if not from_thread:
            run([sleeper, sleeper])
        elif engine == "background":  # started by a thread that ends, waited for here
            calls = []
            thread = threading.Thread(target=lambda: calls.extend(started([sleeper, sleeper])))
            thread.start()
            thread.join()
            [call.wait() for call in calls]
        else:
            thread = threading.Thread(target=run, args=([sleeper, sleeper],))
            thread.start()
            thread.join()
    except KeyboardInterrupt:
        print(json.dumps(sorted(children())), flush=True)
        raise
""")


def start_parent(tmp_path, engine, nested, starter="main"):
    """Start a parent that runs two sleeping workers, forked by its main thread
    or by another (``starter="thread"``); return it and all its descendants."""
    where = tmp_path / "pids"
    where.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", PARENT_SCRIPT, engine, str(where),
                             "nested" if nested else "flat", starter],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    expected = 4 if nested else 2
    deadline = time.monotonic() + 30
    while len(os.listdir(where)) < expected:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the workers did not start"
        time.sleep(0.005)
    pids = [int(p) for p in os.listdir(where)]
    assert all(running(p) for p in pids)
    return proc, pids


def wait_gone(pids, seconds):
    deadline = time.monotonic() + seconds
    while any(running(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


@pytest.mark.parametrize("engine", ENGINES)
def test_parent_gets_sigint(engine, tmp_path, case):
    """Ctrl-C: KeyboardInterrupt in the parent, every worker reaped before it propagates."""
    proc, pids = start_parent(tmp_path, engine, nested=False)
    with ended(proc):
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
        case.latency = time.monotonic() - t0
    assert proc.returncode == -signal.SIGINT, (proc.returncode, err)
    assert err.rstrip().endswith("KeyboardInterrupt") and err.count("KeyboardInterrupt") == 1, err
    assert json.loads(out) == []  # no child left when the exception reached the caller
    assert wait_gone(pids, 0)
    case.note = f"  (process exit after SIGINT; children at KeyboardInterrupt: {out.strip()})"


@pytest.mark.parametrize("sig, nested", [("SIGKILL", False), ("SIGKILL", True),
                                         ("SIGTERM", False)],
                         ids=["SIGKILL", "SIGKILL-nested", "SIGTERM"])
@pytest.mark.parametrize("engine", ENGINES)
def test_parent_is_killed(engine, sig, nested, tmp_path, case):
    """Workers (and their own workers) follow a killed parent within a second."""
    proc, pids = start_parent(tmp_path, engine, nested)
    with ended(proc):
        t0 = time.monotonic()
        proc.send_signal(getattr(signal, sig))
        gone = wait_gone(pids, 1.0)
        case.latency = time.monotonic() - t0
        proc.communicate(timeout=20)
    assert gone, f"workers {[p for p in pids if running(p)]} outlived their parent by 1 s"
    case.note = f"  (until all {len(pids)} workers were gone)"


@pytest.mark.parametrize("engine", ENGINES + ["background"])
def test_parent_is_killed_after_forking_from_a_thread(engine, tmp_path, case):
    """Workers forked by a thread other than the main one (by one that has ended
    since, for background()) follow a SIGKILLed parent too, and so do their own."""
    proc, pids = start_parent(tmp_path, engine, nested=True, starter="thread")
    with ended(proc):
        t0 = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        wait_gone(pids, 20.0)  # a bound against a hang, not a measure of speed
        case.latency = time.monotonic() - t0
        survivors = [p for p in pids if running(p)]
        for pid in survivors:  # else they live on after the suite, and hold proc's pipes
            os.kill(pid, signal.SIGKILL)
        proc.communicate(timeout=20)
    assert not survivors, f"workers {survivors} outlived their parent"
    case.note = f"  (until all {len(pids)} workers were gone)"


# -- failures while the pool starts -----------------------------------------------------

@pytest.mark.parametrize("error", [BlockingIOError, KeyboardInterrupt])
@pytest.mark.parametrize("engine", ENGINES)
def test_fork_fails_after_the_first_worker(engine, error, monkeypatch, case):
    """What fork raises when the system is out of processes (EAGAIN), or a Ctrl-C."""
    real_fork = os.fork
    forked = []

    def fork():
        if forked:
            case.fault()
            raise error(errno.EAGAIN, "Resource temporarily unavailable")
        pid = real_fork()
        if pid:
            forked.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", fork)
    with case.expect(engine, error, wrapped=False):
        run(engine, [lambda: 1, lambda: 2])
    assert len(forked) == 1 and forked[0] not in children()
    monkeypatch.undo()
    still_works(engine)


# -- after a normal end: finished workers are reaped lazily ----------------------------

def finished_session(engine, case):
    """A session that ends normally; return its two workers' pids."""
    with case.timed():
        assert run(engine, [lambda: case.meet(0), lambda: case.meet(1)]) == [True, True]
    return case.slots[:2].tolist()


def exited(pid):
    """Block until ``pid`` has ended, without reaping it; False if it was reaped already."""
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


@pytest.mark.parametrize("engine", ENGINES)
def test_worker_killed_right_after_a_normal_end(engine, case):
    """The results were all in: a worker that dies as it exits is no error, and is reaped."""
    pids = finished_session(engine, case)
    for pid in pids:
        if pid in pool._finished:  # exiting, or exited and not reaped: not another process
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        exited(pid)
    still_works(engine)
    assert not set(pids) & set(children()) and not set(pids) & set(pool._finished)


@pytest.mark.parametrize("how", ["os.wait()", "os.waitpid(-1, 0)"])
@pytest.mark.parametrize("engine", ENGINES)
def test_users_own_wait_takes_a_finished_worker(engine, how, case):
    """What the caller's os.wait() may now see: one of our workers, exit status 0."""
    pids = finished_session(engine, case)
    if not set(pids) & set(pool._finished):
        pytest.skip("both workers exited and were reaped as the session ended")
    pid, status = os.wait() if how == "os.wait()" else os.waitpid(-1, 0)
    assert pid in pids and os.waitstatus_to_exitcode(status) == 0
    case.note = f"  (the caller's {how} returned worker {pid}, exit status 0)"
    still_works(engine)  # finds it gone: counted as reaped, once (no_leaks checks the count)
    assert not set(pids) & set(pool._finished)


@pytest.mark.parametrize("engine", ENGINES)
def test_sigchld_ignored(engine, case):
    """With SIGCHLD ignored the kernel reaps every worker: sessions and deaths still work."""
    def doomed():
        case.meet(0)
        case.fault()
        die("SIGKILL")

    saved = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        still_works(engine)
        with case.expect(engine, WorkerDied, "exit status is lost"):
            run(engine, [doomed, lambda: case.busy(1)])
        still_works(engine)
        pool._reap_finished(block=True)
    finally:
        signal.signal(signal.SIGCHLD, saved)
    assert not pool._finished


# -- a session inside a worker ---------------------------------------------------------

def run_inner(engine, fail):
    def inner_task():
        if fail:
            os.kill(os.getpid(), signal.SIGKILL)
        return os.getppid()

    return run(engine, [inner_task, inner_task])


@pytest.mark.parametrize("inner", ENGINES)
@pytest.mark.parametrize("outer", ENGINES)
def test_session_inside_a_worker(outer, inner, case):
    with case.timed():
        out = run(outer, [lambda: (os.getpid(), run_inner(inner, False))] * 2)
    for pid, parents in out:
        assert parents == [pid, pid]  # the inner workers were forked by the outer worker


@pytest.mark.parametrize("inner", ENGINES)
@pytest.mark.parametrize("outer", ENGINES)
def test_inner_worker_dies(outer, inner, case):
    """The innermost error reaches the caller with its type, through both layers."""
    def task():
        case.meet(0)
        case.fault()
        return run_inner(inner, True)

    expected = WorkerException if inner == "mapreduce" else WorkerDied
    with case.expect(outer, expected):
        run(outer, [task, lambda: case.busy(1)])
    e = case.exc
    if inner == "mapreduce":
        e = e.reason
    assert isinstance(e, WorkerDied) and "SIGKILL" in str(e), repr(e)
    assert item(inner, 0) in str(e) or item(inner, 1) in str(e), str(e)
    still_works(outer)


# -- fork with other threads in the parent ------------------------------------------

def threaded_sum(i):
    """A task that uses dask's default (threaded) scheduler inside a worker."""
    return int(da.arange(100, chunks=10).sum().compute(scheduler="threads")) + i


@pytest.mark.timeout(30)
@pytest.mark.parametrize("engine", ENGINES)
def test_fork_after_the_threads_scheduler_ran(engine, case):
    """dask's thread pool exists in the parent (its threads do not in a worker)."""
    assert int(da.ones(10, chunks=2).sum().compute(scheduler="threads")) == 10
    assert any(t.name.startswith("ThreadPoolExecutor") for t in threading.enumerate())
    with case.timed():
        out = run(engine, [lambda: threaded_sum(0), lambda: threaded_sum(1)])
    assert out == [4950, 4951]
    with dask.config.set(scheduler="threads"):  # and with it as the default
        assert run(engine, [lambda: int(da.ones(10, chunks=2).sum().compute())]) == [10]


@pytest.mark.parametrize("engine", ENGINES)
def test_fork_while_a_thread_holds_a_lock(engine, case):
    """A lock the tasks do not need, held by a live thread across the fork, is harmless."""
    lock = threading.Lock()
    holding, done = threading.Event(), threading.Event()

    def holder():
        with lock:
            holding.set()
            done.wait()

    t = threading.Thread(target=holder)
    t.start()
    holding.wait()
    try:
        with case.timed():
            assert run(engine, [lambda: lock.locked(), lambda: 2]) == [True, 2]
    finally:
        done.set()
        t.join()


@pytest.mark.parametrize("engine", ENGINES)
def test_fork_while_a_thread_prints(engine, case, capfd):
    """A thread writing to stdout across many forks: workers print and exit cleanly."""
    stop = threading.Event()

    def chatter():
        while not stop.is_set():
            print("chatter " * 10)

    t = threading.Thread(target=chatter)
    t.start()
    try:
        with case.timed():
            for _ in range(10):
                assert run(engine, [lambda: print("from a worker") or 1] * 2) == [1, 1]
    finally:
        stop.set()
        t.join()
    assert "from a worker" in capfd.readouterr().out


# -- memory exhaustion -----------------------------------------------------------------

def limit_address_space(extra):
    """Let this process grow by at most ``extra`` bytes of address space."""
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm + extra, hard))


HOGS = {
    "numpy 4 GB": lambda: np.ones(4 << 30, dtype="u1"),
    "shared 4 GB": lambda: dask_sharedmem.empty(4 << 30, dtype="u1"),
    "list 8 GB": lambda: [0] * (1 << 30),
    "grow until it fails": lambda: [bytes(1 << 20) for _ in range(1 << 20)],
}


@pytest.mark.parametrize("hog", HOGS)
@pytest.mark.parametrize("engine", ENGINES)
def test_memory_exhaustion_in_a_worker(engine, hog, case):
    """RLIMIT_AS in a task: a MemoryError comes back, or the worker dies; never a hang."""
    def greedy():
        case.meet(0)
        limit_address_space(256 * MB)
        case.fault()
        return HOGS[hog]()

    with case.expect(engine, (MemoryError, WorkerDied)):
        run(engine, [greedy, lambda: case.busy(1)])
    still_works(engine)
