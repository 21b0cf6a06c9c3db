"""pool.py (Workers) and channel.py, with real processes and signals.

Every worker here is a real forked process; every death is a real signal or
``os._exit``.  Each test runs under a timeout (an error must arrive, never a
hang) and under the ``no_leaks`` check (no child, descriptor or segment left).
"""

import contextlib
import errno
import faulthandler
import gc
import io
import os
import pickle
import resource
import select
import signal
import threading
import time

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
    running,
    seen,
    slots,
)

import dask_sharedmem as sharedmem
from dask_sharedmem import channel, memory, pool, transports
from dask_sharedmem.pool import WorkerDied, Workers, describe_status
from dask_sharedmem.remote import LostException, RemoteTraceback, pack_exception, unpack_exception

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_leaks")]


def echo(chan, rank):
    while True:
        msg = chan.recv()
        chan.send((rank, os.getpid(), msg))


def poll_all(w, count):
    """Poll until ``count`` messages have arrived; return them by rank."""
    got = {}
    while len(got) < count:
        for rank, msg in w.poll():
            got[rank] = msg
    return got


def wait_exited(pid):
    """Block until ``pid`` has ended, without reaping it (that is the pool's job;
    it may have done it already: close() waits for the worker's last descriptor,
    and a worker that exits at once is reaped by the same close)."""
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    except ChildProcessError:
        pass


def reaped_or_pending(pids):
    """After a normal close: each worker is reaped, or waits in ``pool._finished``."""
    ours = set(children())
    return all(pid in pool._finished or pid not in ours for pid in pids)


# -- Workers -------------------------------------------------------------------

def test_echo():
    parent = os.getpid()
    with Workers(3, echo) as w:
        assert len(w.pids) == 3 and len(set(w.pids)) == 3
        assert set(w.pids) <= set(children())
        for rank in range(3):
            w.send(rank, {"n": rank, "data": [rank] * 3})
        got = poll_all(w, 3)
        pids = list(w.pids)
    for rank in range(3):
        r, pid, msg = got[rank]
        assert r == rank and pid == pids[rank] != parent
        assert msg == {"n": rank, "data": [rank] * 3}
    assert reaped_or_pending(pids)
    pool._reap_finished(block=True)
    assert not set(pids) & set(children())


def test_workers_see_the_parents_memory_without_pickling():
    lock = threading.Lock()  # cannot be pickled, yet the workers have it
    table = {"secret": 41}

    def main(chan, rank):
        chan.recv()
        chan.send((table["secret"] + 1, type(lock).__name__))

    with Workers(1, main) as w:
        w.send(0, "go")
        assert poll_all(w, 1)[0] == (42, "lock")


def test_many_messages_both_ways():
    with Workers(2, echo) as w:
        for k in range(500):
            w.send(k % 2, k)
        got = []
        while len(got) < 500:
            got.extend(msg for _, msg in w.poll())
    assert sorted(m[2] for m in got) == list(range(500))


def test_main_returning_ends_the_worker_cleanly():
    def main(chan, rank):
        chan.send("bye")

    with Workers(1, main) as w:
        assert poll_all(w, 1) == {0: "bye"}
        wait_exited(w.pids[0])
        with pytest.raises(WorkerDied, match="exited with code 0"):
            w.poll()


@pytest.mark.parametrize("how, status", [
    ("SIGKILL", "was killed by SIGKILL"),
    ("SIGSEGV", "was killed by SIGSEGV"),
    ("exit3", "exited with code 3"),
    ("raise", "exited with code 1"),
])
def test_worker_death_is_reported_by_poll_at_once(how, status):
    def main(chan, rank):
        chan.recv()
        if rank == 1:
            if how == "exit3":
                os._exit(3)
            if how == "raise":
                raise RuntimeError("boom")
            faulthandler.disable()  # its report of the SIGSEGV is noise here
            os.kill(os.getpid(), getattr(signal, how))
        time.sleep(600)  # rank 0 never answers: only the death can end poll

    t0 = time.perf_counter()
    with pytest.raises(WorkerDied) as info:
        with Workers(2, main) as w:
            pids = list(w.pids)
            w.send(0, "go")
            w.send(1, "go")
            while True:
                w.poll()
    print(f"\ntime to WorkerDied ({how}): {(time.perf_counter() - t0) * 1e3:.1f} ms")
    e = info.value
    assert e.rank == 1 and e.pid == pids[1]
    assert status in e.status and status in str(e)
    assert not set(pids) & set(children())  # the sleeping sibling was killed and reaped


def test_send_to_a_dead_worker_leaves_the_report_to_poll():
    def main(chan, rank):
        os._exit(5)

    with Workers(1, main) as w:
        wait_exited(w.pids[0])
        w.send(0, "x" * 1_000_000)  # more than the socket holds: would block if it waited
        with pytest.raises(WorkerDied, match="exited with code 5"):
            w.poll()


def test_worker_exits_quietly_when_the_session_ended_before_it_sent(capfd):
    def main(chan, rank):
        select.select([chan.sock], [], [])  # readable at EOF: the parent has ended the session
        chan.send("too late")  # BrokenPipeError

    with Workers(1, main) as w:
        pid = w.pids[0]
    pool._reap_finished(block=True)
    assert pid not in children()
    assert "Traceback" not in capfd.readouterr().err


def sigint_workers_and_echo(w):
    for pid in w.pids:
        os.kill(pid, signal.SIGINT)
    for rank in range(w.n):
        w.send(rank, "still there?")
    got = poll_all(w, w.n)
    assert [got[r][2] for r in range(w.n)] == ["still there?"] * w.n


def test_workers_ignore_sigint():
    with Workers(3, echo) as w:
        time.sleep(0.05)  # let them settle in main
        sigint_workers_and_echo(w)


def test_sigint_right_after_the_fork_is_ignored(monkeypatch):
    """Ctrl-C reaches the whole process group, freshly forked workers included."""
    fork = os.fork

    def slow_fork():
        pid = fork()
        if pid == 0:  # widen the gap between fork and the worker's own set-up
            time.sleep(0.05)
        return pid

    monkeypatch.setattr(os, "fork", slow_fork)
    with Workers(3, echo) as w:
        sigint_workers_and_echo(w)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_leaving_with_an_error_kills_busy_workers(error):
    def main(chan, rank):
        chan.send(os.getpid())
        time.sleep(600)  # never reads EOF: only SIGKILL ends it

    with pytest.raises(error):
        with Workers(2, main) as w:
            pids = [msg for _, msg in sorted(poll_all(w, 2).items())]
            raise error()
    assert pids == w.pids
    assert not set(pids) & set(children())  # reaped at once, not left for later
    assert not set(pids) & set(pool._finished)


# -- workers forked later (grow) --------------------------------------------------

def socket_inodes(pid):
    """The inodes of the sockets process ``pid`` holds open."""
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def test_grow_forks_the_next_rank_like_start():
    with Workers(3, echo, initial=1) as w:
        assert w.forked == len(w.pids) == 1 and w.fork_seconds > 0
        w.send(0, "first")
        assert poll_all(w, 1)[0][2] == "first"
        assert w.grow() == 1 and w.grow() == 2 and w.forked == 3
        with pytest.raises(RuntimeError, match="all 3 workers"):
            w.grow()
        sigint_workers_and_echo(w)  # late workers ignore SIGINT too
        pids = list(w.pids)
        assert len(set(pids)) == 3 and set(pids) <= set(children())
        # a late worker closed the parent's end of every earlier worker's socket
        # (else it would hold them for the whole session)
        ours = [os.fstat(chan.sock.fileno()).st_ino for chan in w.channels]
        assert not socket_inodes(pids[2]) & set(ours)
        assert not socket_inodes(pids[1]) & set(ours)
    assert reaped_or_pending(pids)


@pytest.mark.timeout(20)
def test_death_of_a_grown_worker_is_reported_at_once():
    def main(chan, rank):
        chan.send(os.getpid())
        if rank == 1:
            chan.recv()
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(600)

    with pytest.raises(WorkerDied) as info:
        with Workers(2, main, initial=1) as w:
            poll_all(w, 1)
            w.grow()
            poll_all(w, 1)
            pids = list(w.pids)
            w.send(1, "die")
            while True:
                w.poll()
    assert info.value.rank == 1 and info.value.pid == pids[1]
    assert "SIGKILL" in info.value.status
    assert not set(pids) & set(children())  # the other one was killed and reaped too


def test_grown_workers_are_killed_and_reaped_on_an_error():
    def main(chan, rank):
        chan.send(os.getpid())
        time.sleep(600)

    with pytest.raises(KeyError):
        with Workers(4, main, initial=2) as w:
            w.grow()
            poll_all(w, 3)
            raise KeyError()
    assert len(w.pids) == 3 and not set(w.pids) & set(children())


# -- finished workers, reaped lazily ---------------------------------------------

def lingering(chan, rank):
    """A worker that does not exit when its session ends: only SIGKILL ends it.

    It closes its socket first, as every worker does before it exits (close()
    waits for that, not for the exit).
    """
    chan.send(os.getpid())
    try:
        chan.recv()
    except EOFError:
        chan.sock.close()
        time.sleep(600)


def test_close_does_not_wait_for_workers_to_exit():
    t0 = time.perf_counter()
    with Workers(2, lingering) as w:
        poll_all(w, 2)
        pids = list(w.pids)
    print(f"\nclose with two workers that never exit: {(time.perf_counter() - t0) * 1e3:.1f} ms")
    assert all(running(pid) for pid in pids)
    assert set(pids) <= set(pool._finished)
    w.close()  # a second close is harmless
    for pid in pids:  # what ends them (or the OOM killer) is no error
        os.kill(pid, signal.SIGKILL)


def test_finished_workers_are_reaped_by_the_next_session():
    w = Workers(3, echo)
    w.start()
    pids = list(w.pids)
    w.close()
    assert reaped_or_pending(pids)
    for pid in pids:
        wait_exited(pid)  # exited (a zombie, or reaped already), not reaped here
    with Workers(1, echo) as w2:
        assert not set(pids) & set(children()) and not set(pids) & set(pool._finished)
        w2.send(0, "x")
        poll_all(w2, 1)


def test_a_worker_killed_after_a_normal_close_is_no_error_and_is_reaped():
    with Workers(2, lingering) as w:
        poll_all(w, 2)
        pids = list(w.pids)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
        wait_exited(pid)
    with Workers(2, echo) as w:
        for rank in range(2):
            w.send(rank, rank)
        assert len(poll_all(w, 2)) == 2
        assert not set(pids) & set(children())


def test_pending_workers_never_exceed_the_bound(monkeypatch):
    """Workers that take a while to exit: sessions wait for the oldest past the bound."""
    monkeypatch.setattr(pool, "_MAX_FINISHED", 3)

    def slow_to_exit(chan, rank):
        try:
            chan.recv()
        except EOFError:
            chan.sock.close()
            time.sleep(0.02)

    most = 0
    for _ in range(20):
        with Workers(2, slow_to_exit):
            pass
        most = max(most, len(pool._finished))
        assert len(pool._finished) <= 3 and len(children()) <= 3
    assert most == 3  # they did pile up to the bound


def test_many_sessions_stay_within_the_default_bound():
    for _ in range(100):
        with Workers(2, echo) as w:
            w.send(0, "x")
            poll_all(w, 1)
        assert len(pool._finished) <= pool._MAX_FINISHED
    assert len(children()) <= pool._MAX_FINISHED


@pytest.mark.parametrize("how", ["os.wait()", "os.waitpid(-1, 0)"])
def test_a_users_wait_may_reap_a_finished_worker(how):
    """The caller's own os.wait() sees one of our finished workers, exit status 0."""
    r, w = os.pipe()

    def main(chan, rank):
        try:
            chan.recv()
        except EOFError:
            chan.sock.close()
            os.read(r, 1)  # exit (with code 0) when the test says so

    try:
        with Workers(2, main) as session:
            pids = list(session.pids)
        assert set(pids) <= set(pool._finished)
        os.write(w, b"xx")
    finally:
        os.close(r)
        os.close(w)
    for pid in pids:
        wait_exited(pid)
    pid, status = os.wait() if how == "os.wait()" else os.waitpid(-1, 0)
    assert pid in pids and os.waitstatus_to_exitcode(status) == 0
    with Workers(2, echo) as w:  # the next session finds it gone: reported as reaped
        for rank in range(2):
            w.send(rank, rank)
        assert len(poll_all(w, 2)) == 2
        assert not set(pids) & set(pool._finished)


def test_kill_reaps_at_once():
    w = Workers(3, lingering)
    w.start()
    poll_all(w, 3)
    pids = list(w.pids)
    w.kill()
    assert not set(pids) & set(children()) and not set(pids) & set(pool._finished)
    w.kill()  # harmless, as is a close after it
    w.close()


def test_concurrent_sessions_reap_every_worker_once():
    """Sessions in several threads reap the same list: each pid is claimed by one."""
    errors, pids = [], []

    def sessions():
        try:
            for _ in range(20):
                with Workers(2, echo) as w:
                    w.send(1, "x")
                    poll_all(w, 1)
                pids.extend(w.pids)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=sessions) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(pids)) == 120
    pool._reap_finished(block=True)
    assert not pool._finished
    assert not set(pids) & set(children())


def test_a_worker_does_not_inherit_the_finished_list():
    def main(chan, rank):
        chan.send(list(pool._finished))
        chan.recv()

    with Workers(2, lingering) as w:  # two pending, for as long as this test runs
        poll_all(w, 2)
        pending = list(w.pids)
    try:
        assert set(pending) <= set(pool._finished)
        with Workers(1, main) as w:
            assert poll_all(w, 1) == {0: []}
    finally:
        for pid in pending:
            os.kill(pid, signal.SIGKILL)


def test_worker_dies_with_its_parent():
    """PR_SET_PDEATHSIG: a worker's worker dies when the worker is SIGKILLed."""
    def inner(chan, rank):
        chan.recv()

    def outer(chan, rank):
        w = Workers(1, inner)
        w.start()
        chan.send(w.pids[0])
        time.sleep(600)

    with pytest.raises(WorkerDied, match="SIGKILL"):
        with Workers(1, outer) as w:
            grandchild = poll_all(w, 1)[0]
            assert os.path.exists(f"/proc/{grandchild}")
            os.kill(w.pids[0], signal.SIGKILL)
            while True:
                w.poll()
    deadline = time.monotonic() + 5
    while running(grandchild):
        assert time.monotonic() < deadline, f"pid {grandchild} outlived its parent"
        time.sleep(0.01)


def test_describe_status():
    assert describe_status(signal.SIGSEGV) == "was killed by SIGSEGV"
    assert describe_status(7 << 8) == "exited with code 7"
    assert "out-of-memory" in describe_status(signal.SIGKILL)


# -- remote exceptions ----------------------------------------------------------

class Missing(FileNotFoundError):
    """A built-in base whose fields (errno, filename) live outside ``__dict__``."""

    def __init__(self, path):
        super().__init__(errno.ENOENT, "no such thing", path)


def raise_chained():
    try:
        raise KeyError("first")
    except KeyError:
        raise Formatted(7) from TwoArgs(1, 2)


def raise_(exc):
    raise exc


def raise_axis_error():
    np.moveaxis(np.zeros(3), 2, 0)


def caught(call, *args):
    try:
        call(*args)
    except BaseException as e:
        return e
    raise AssertionError(f"{call} raised nothing")


def round_trip(exc):
    """``exc`` packed, sent through a channel's pickle and unpacked."""
    exc, lost = unpack_exception(pickle.loads(channel.dumps(pack_exception(exc))))
    assert not lost and isinstance(exc.__cause__, RemoteTraceback)
    return exc


def test_exception_round_trip_keeps_type_and_traceback():
    exc = round_trip(caught(raise_, KeyError("k")))
    assert type(exc) is KeyError and exc.args == ("k",)
    assert "in raise_" in exc.__cause__.tb and "KeyError" in exc.__cause__.tb
    assert "worker process" in str(exc.__cause__)


@pytest.mark.parametrize("raises, args", [
    (raise_, (Formatted(7),)),
    (raise_, (TwoArgs(1, 2),)),
    (raise_, (BadStr("unprintable"),)),
    (raise_chained, ()),
    (raise_, (Missing("/nowhere"),)),
    (raise_, (SystemExit(3),)),
    (raise_, (WorkerDied(1, 2, "exited with code 3", "task 'x'"),)),
    (raise_, (Slotted(3, "bad"),)),
    (raise_, (SlottedWithDict(4, "worse"),)),
    (raise_axis_error, ()),
], ids=["formats-its-argument", "two-arguments", "str-raises", "chained", "oserror-fields",
        "builtin", "own-reduce", "slots", "slots-and-dict", "numpy-axis-error"])
def test_exception_round_trip_is_the_same_exception(raises, args):
    """Pickle calls ``cls(*args)``: wrong or impossible when __init__ takes other arguments."""
    exc = caught(raises, *args)
    back = round_trip(exc)
    assert seen(back, back.__cause__.__cause__) == seen(exc, exc.__cause__)
    assert "in raise" in back.__cause__.tb
    if isinstance(exc, OSError):
        assert (back.errno, back.strerror, back.filename) == (errno.ENOENT, "no such thing",
                                                             "/nowhere")


def test_exception_whose_str_raises_does_not_kill_the_worker():
    def main(chan, rank):
        chan.recv()
        try:
            raise BadStr("unprintable")
        except BadStr as e:
            chan.send(pack_exception(e))
        chan.recv()  # a dead worker would end the session with WorkerDied

    with Workers(1, main) as w:
        w.send(0, "go")
        exc, lost = unpack_exception(poll_all(w, 1)[0])
    assert not lost and type(exc) is BadStr and exc.args == ("unprintable",)
    assert "BadStr: <" in exc.__cause__.tb and "str() failed>" in exc.__cause__.tb


def test_what_does_not_pickle_is_left_out_and_named():
    error = Unpicklable("holds a lock")
    error.note = "kept"
    error.__context__ = Unpicklable("so does its context")
    error.__cause__ = ValueError(threading.Lock())  # its args cannot be pickled at all
    back = round_trip(caught(raise_, error))
    assert type(back) is Unpicklable and back.args == ("holds a lock",)
    assert vars(back) == {"note": "kept"}
    context = back.__context__
    assert type(context) is Unpicklable and context.args == ("so does its context",)
    assert vars(context) == {}
    assert back.__cause__.__cause__ is None  # the original cause did not pickle
    left_out = back.__cause__.tb.split("left out of the exception sent to the parent")[1]
    assert left_out.count("attribute 'lock' of conftest.Unpicklable") == 2
    assert "the __cause__ of conftest.Unpicklable" in left_out


def test_slots_of_every_class_come_back_and_unset_ones_stay_unset():
    back = round_trip(caught(raise_, SlottedWithDict(4, "worse")))
    assert slots(back) == {"more": "a slot", "detail": "worse", "_Slotted__private": [4],
                           "code": 4}
    assert not hasattr(back, "unset") and vars(back) == {"note": "in __dict__"}
    assert str(back) == "code 4: worse [4]"


def test_a_slot_that_does_not_pickle_is_left_out_and_named():
    back = round_trip(caught(raise_, SlotHoldsLock("holds a lock")))
    assert type(back) is SlotHoldsLock and back.args == ("holds a lock",)
    assert slots(back) == {"kept": "kept"}
    left_out = back.__cause__.tb.split("left out of the exception sent to the parent")[1]
    assert "attribute 'lock' of conftest.SlotHoldsLock" in left_out


def test_exception_that_does_not_pickle_keeps_name_message_traceback():
    exc = caught(raise_, ValueError(threading.Lock()))  # its args cannot be pickled
    exc, lost = unpack_exception(pickle.loads(pickle.dumps(pack_exception(exc))))
    assert lost and isinstance(exc, LostException)
    assert "ValueError: <unlocked _thread.lock object" in str(exc)
    assert "in raise_" in exc.__cause__.tb


def test_exception_class_the_parent_cannot_import_is_lost_not_fatal():
    def main(chan, rank):
        class Late(BadStr):  # importable as test_pool.Late in the worker only
            pass
        Late.__qualname__ = "Late"
        globals()["Late"] = Late
        try:
            raise Late()
        except Late as e:
            chan.send(pack_exception(e))
        chan.recv()

    with Workers(1, main) as w:
        exc, lost = unpack_exception(poll_all(w, 1)[0])
    assert lost and isinstance(exc, LostException)
    assert f"{__name__}.Late: <str() failed with RuntimeError>" in str(exc)
    assert "in main" in exc.__cause__.tb


# -- channel --------------------------------------------------------------------

def test_channel_pair_round_trip():
    a, b = channel.pair()
    try:
        for obj in [None, 1, "two", [3.0, {"four": (5,)}], np.arange(10), b"x" * 100_000]:
            a.send(obj)
            got = b.recv()
            if isinstance(obj, np.ndarray):
                np.testing.assert_array_equal(got, obj)
            else:
                assert got == obj
    finally:
        a.close()
        b.close()


def message(obj, room="cma", threshold=channel.DEFAULT_THRESHOLD, inherited=0):
    """What a message of ``obj`` carries: its body, its stand-ins, the segments whose
    descriptors ride along, and the stand-ins' pickle."""
    body, outbox = channel._dumps_value(obj, room, threshold)
    buf = io.BytesIO()
    p = channel._HandlePickler(buf, inherited)
    p.dump(outbox.items)
    return body, outbox.items, list(p.segments.values()), buf.getvalue()


def test_large_array_travels_beside_the_message_not_in_it():
    big = np.arange(1_000_000, dtype="f8")  # 8 MB
    body, items, segments, _ = message(big)
    assert len(body) < 1000 and segments == []
    assert items == [transports.Offer(os.getpid(), big.ctypes.data, big.nbytes)]
    body, items, segments, _ = message(big, room="shm")  # copied into a new segment
    assert len(body) < 1000 and len(items) == len(segments) == 1
    np.testing.assert_array_equal(items[0].view("f8"), big)
    small = np.arange(100)
    body, items, _, _ = message(small)
    assert items == [] and len(body) > small.nbytes  # below the threshold: by value
    body, items, _, _ = message(big, threshold=None)
    assert items == [] and len(body) > big.nbytes
    shared = sharedmem.copy(small)
    body, items, segments, _ = message({"a": shared, "b": shared[2:5]})
    assert len(items) == len(segments) == 1  # one segment, listed (and sent) once
    assert len(body) < 1000


def test_large_array_crosses_processes_by_one_copy():
    """To a worker through shared memory (a worker may not read its parent); back
    by the session's transport: pulled into private memory (cma), or mapped (shm)."""
    big = np.arange(2_000_000, dtype="f8")

    def main(chan, rank):
        a = chan.recv()
        assert memory._segment_of(a) is not None  # a view of shared memory, not a copy
        chan.send((float(a.sum()), a * 2))

    with Workers(1, main) as w:
        w.send(0, big)
        total, doubled = poll_all(w, 1)[0]
    assert total == float(big.sum())
    shared = memory._segment_of(doubled) is not None
    assert shared == (transports._active == "shm")
    np.testing.assert_array_equal(doubled, big * 2)


def test_arrays_made_after_the_fork_are_shared_both_ways():
    def main(chan, rank):
        while True:
            a = chan.recv()
            a += 1  # writes into the parent's memory
            chan.send("ok")

    with Workers(1, main) as w:
        late = sharedmem.zeros(10_000)  # the worker has never seen this segment
        w.send(0, late[::2])
        assert poll_all(w, 1) == {0: "ok"}
        w.send(0, late[::2])
        assert poll_all(w, 1) == {0: "ok"}
    np.testing.assert_array_equal(late[::2], 2)
    np.testing.assert_array_equal(late[1::2], 0)


def test_descriptors_the_kernel_drops_are_an_error_not_a_mismatch():
    """recvmsg drops the descriptors it cannot install (EMFILE): say so, at once."""
    def main(chan, rank):
        chan.recv()
        chan.send([sharedmem.zeros(10) for _ in range(5)])

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with Workers(1, main) as w:
        dummies = []
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 5, hard))
        try:
            with contextlib.suppress(OSError):
                while True:  # use up every descriptor this process may still open
                    dummies.append(os.open(os.devnull, os.O_RDONLY))
            w.send(0, "go")
            with pytest.raises(OSError) as info:
                poll_all(w, 1)
        finally:
            for fd in dummies:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert info.value.errno == errno.EMFILE and "ulimit -n" in str(info.value)


def test_hundreds_of_segments_in_one_message():
    n = 300  # more than SCM_MAX_FD (253) descriptors in one message

    def main(chan, rank):
        arrays = chan.recv()
        for k, a in enumerate(arrays):
            a[...] = k
        # and back: n fresh segments made in the worker (plain arrays would share one pack)
        chan.send([sharedmem.full(10_000, k, dtype="i8") for k in range(n)])

    with Workers(1, main) as w:
        arrays = [sharedmem.zeros(3, dtype="i8") for _ in range(n)]
        fresh = len(memory._SEGMENTS)
        w.send(0, arrays)
        back = poll_all(w, 1)[0]
        assert len(memory._SEGMENTS) == fresh + n
    for k in range(n):
        np.testing.assert_array_equal(arrays[k], k)
        np.testing.assert_array_equal(back[k], k)
        assert memory._segment_of(back[k]) is not None


def test_segments_cross_by_handle_when_inherited_and_by_value_without_a_descriptor():
    old = sharedmem.full(10, 7.0)  # exists when the worker forks: it knows this segment

    def main(chan, rank):
        while True:
            a = chan.recv()
            seg = memory._segment_of(a)
            chan.send((float(a.sum()), seg is not None and seg.token))

    with Workers(1, main) as w:
        _, _, segments, _ = message(old, inherited=w.channels[0].inherited)
        assert segments == []  # a bare handle: no descriptor travels
        w.send(0, old)
        total, token = poll_all(w, 1)[0]
        assert total == 70.0 and token == memory._segment_of(old).token  # the same memory

        late = sharedmem.full(10_000, 3.0)  # made after the fork: unknown to the worker
        seg = memory._segment_of(late)
        os.close(memory._FDS.pop(seg.token))  # as memory._trim_fds does under pressure
        assert seg.fd == -1
        _, _, segments, head = message(late)
        assert segments == [] and len(head) > late.nbytes  # the data travels in the message
        w.send(0, late)
        total, token = poll_all(w, 1)[0]
        assert total == 30_000.0 and token != seg.token  # a copy in the worker's own segment
        late[...] = 0  # still mapped here, though its descriptor is closed
        assert late.sum() == 0


def test_small_arrays_in_one_message_share_a_pack_freed_with_the_last_of_them():
    a, b = channel.pair()
    try:
        a.send([np.full(10_000, k) for k in range(3)] + [np.arange(200_000.0)])  # 80 KB x3, 1.6 MB
        got = b.recv()
        packs = {memory._segment_of(x).token for x in got[:3]}
        big = memory._segment_of(got[3]).token
        assert len(packs) == 1 and big not in packs  # one pack; 1 MiB and more: a segment each
        assert [int(x[0]) for x in got[:3]] == [0, 1, 2]
        (token,) = packs
        del got[3]
        gc.collect()
        assert big not in memory._SEGMENTS
        del got[:2]
        gc.collect()
        assert token in memory._SEGMENTS  # the third array still holds the pack
        del got
        gc.collect()
        assert token not in memory._SEGMENTS
    finally:
        a.close()
        b.close()


class HeldSocket:
    """A socket whose ``sendmsg`` returns only once ``gone`` is set, as a busy
    machine's scheduler may hold the sender while the receiver reads and leaves."""

    def __init__(self, sock, gone):
        self.sock, self.gone = sock, gone

    def sendmsg(self, *args):
        sent = self.sock.sendmsg(*args)
        assert self.gone.wait(20)
        return sent

    def __getattr__(self, name):
        return getattr(self.sock, name)


def test_spilled_message_is_complete_once_its_descriptors_are_sent():
    """A body in a memfd: nothing follows in the socket, where a peer that read
    the message and closed would make the sender fail with BrokenPipeError."""
    a, b = channel.pair()
    gone = threading.Event()
    a.sock = HeldSocket(a.sock, gone)
    errors = []

    def send():
        try:
            a.send(list(range(100_000)))  # a pickle of ~500 KB: spilled
        except BaseException as e:
            errors.append(e)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        assert b.recv() == list(range(100_000))
        b.close()
    finally:
        gone.set()
        sender.join()
        a.sock = a.sock.sock
        a.close()
    assert errors == []


def test_after_a_session_no_worker_holds_the_callers_descriptors():
    """Workers are reaped lazily, but close() returns only once each has closed what it
    inherited: a pipe the caller closes reads EOF at once, as with threads (a file lock
    held through an inherited descriptor is released the same way)."""
    import select

    for engine in ("get", "map"):
        r, w = os.pipe()
        if engine == "get":
            assert sharedmem.get({"x": (abs, -1)}, "x", num_workers=2) == 1
        else:
            with sharedmem.MapReduce(np=2) as pool:
                assert pool.map(abs, [-1, -2]) == [1, 2]
        os.close(w)
        readable, _, _ = select.select([r], [], [], 0)  # no waiting: EOF must be there
        assert readable and os.read(r, 1) == b"", engine
        os.close(r)
