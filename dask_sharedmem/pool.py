"""A group of forked workers for one session: start, dispatch, collect, notice
death at once, stop, reap.

Data flow (one session; ``mapreduce.py`` and ``scheduler.py`` each drive one
per call)::

     parent process                                    worker processes
    +--------------------------------+   socketpair   +---------------------+
    | Workers.send(rank, msg) -------+--------------->| main(chan, rank):   |
    |                                |                |   msg = chan.recv() |
    | Workers.poll() <- selectors <--+<---------------+-- chan.send(reply)  |
    |   EOF on a socket => reap it,  |   + memfds     |                     |
    |   raise WorkerDied(signal)     |                +---------------------+
    +--------------------------------+

* ``start`` forks ``n`` workers *now*: each finds the work (functions,
  closures, sequences, graphs) in its own copy of the parent's memory, so
  nothing about the work is pickled; only what ``send`` carries is.  A
  session that does not know yet how many it needs (``MapReduce.map``)
  starts with ``initial`` of them and forks the next rank with ``grow``,
  through the same steps: a late worker sees the parent's memory as it is
  at its own fork.
* Each worker owns one end of one socket; it closes the parent's ends of its
  siblings' sockets, so when a worker dies -- signal, ``os._exit``, the OOM
  killer -- its socket reads EOF in the parent at once.  The parent waits on
  all sockets with ``selectors``: no polling loops, no sleeps, no timeouts.
  It then ``waitpid``s the worker to name the signal or exit code.
* Workers ignore SIGINT (Ctrl-C is the parent's decision), are SIGKILLed
  when the parent process dies (see "Dying with the parent" below), and
  leave with ``os._exit`` so that no atexit handler or inherited buffer runs
  twice.
* ``close`` (normal end) shuts the sockets down for writing: workers read
  EOF (or find the socket closed as they send), close every descriptor they
  inherited (the caller's files and the locks on them, its pipes) and last
  their socket, and exit 0.  ``close`` waits for that EOF, not for their exit
  (see below): when it returns, no worker holds anything the caller could
  notice but memory.  (A process a task forked does not keep the socket: it
  is closed in every child a worker forks.)  ``kill`` (any error,
  KeyboardInterrupt included) SIGKILLs them and reaps every one before
  returning.

Finished workers are reaped lazily, as ``subprocess`` reaps the Popen objects
nobody waited for.  A worker's exit unmaps its copy of the caller's memory,
which takes about as long as the fork did (milliseconds for a caller of
100 MB, one worker after another); ``close`` leaves that to the kernel and
puts the pids in ``_finished``.  Every session reaps those that have exited
(``waitpid(pid, WNOHANG)``) when it starts and when it ends, and waits for
the oldest while more than ``_MAX_FINISHED`` are pending, so a zombie lasts
until the next session at most, or until the bound.  A pid that the caller's
own ``os.wait()`` took first (ChildProcessError) counts as reaped.  Nothing
is lost by not looking at their status: the session's results had all
arrived, so a worker that dies now (even by a signal) is no error.  No
orphan can outlive the caller either way: workers die with it, zombies go
to init.

Dying with the parent: a worker (or a ``background()`` process) lives as long
as the *process* that forked it, and no longer.  ``PR_SET_PDEATHSIG`` alone
would not do, since its "parent" is the forking *thread*: forked by a
``concurrent.futures`` thread or a request handler, a ``background()`` call
would be SIGKILLed as soon as that thread ends, while its caller still waits
for the result (multiprocessing's fork ``Process`` lives on).  So it depends
on the thread that forks (:func:`_pidfd_for_child`, :func:`_die_with_parent`):

* the main thread (the thread-group leader, which ends only with the
  process): the child asks for ``PR_SET_PDEATHSIG`` as before -- no thread,
  no descriptor -- and checks ``getppid()`` afterwards in case the parent
  died before that took effect;
* any other thread: the parent opens a pidfd of itself (``os.pidfd_open``)
  right before the fork, the child inherits it, and a daemon thread of the
  child blocks in ``poll`` on it.  A pidfd reads ready once every thread of
  its process has exited; the thread then SIGKILLs its own process, if
  ``getppid()`` confirms the parent is gone.  Opened by the parent on itself,
  the pidfd cannot name a recycled pid, and a parent that died before the
  thread started is seen at once: no race to close.  The thread blocks every
  signal, so that signals still reach (and interrupt) the main thread.

Its limits: such a worker runs two threads, so an ``os.fork()`` in one of
its tasks gets Python 3.12's warning about forking with threads (the
library's own forks filter it, see :func:`_fork`), and a task that closes
descriptors it did not open, before the thread is in ``poll``, takes the
watch away.  Where ``pidfd_open`` is missing (Linux before 5.3, a seccomp
filter), the child falls back to ``PR_SET_PDEATHSIG`` and dies with the
thread that forked it.

Exceptions and warnings of a worker reach the parent through ``remote.py``.
"""

from __future__ import annotations

import ctypes
import numbers
import os
import pickle
import re
import resource
import select
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any, cast

from dask.multiprocessing import default_initializer

from . import channel, memory, remote, transports

__all__ = ["WorkerDied", "cpu_count", "total_memory"]

_PR_SET_PDEATHSIG = 1


class WorkerDied(RuntimeError):
    """A worker process ended unexpectedly (a signal, ``os._exit``, the OOM killer).

    Attributes
    ----------
    rank : int
        The worker's number in its session.
    pid : int
        Its process id.
    status : str
        How it ended, e.g. ``"was killed by SIGKILL ..."`` or ``"exited with code 3"``.
    undelivered : bool
        Whether it died with a message sent but not delivered: the parent had
        read it, and found the worker gone as it pulled the large arrays in it.

    Examples
    --------
    >>> import os, dask, dask_sharedmem
    >>> try:
    ...     dask_sharedmem.get({"x": (os._exit, 3)}, "x")
    ... except dask_sharedmem.WorkerDied as e:
    ...     print(e.status, "|", e.doing)
    exited with code 3 | task 'x'
    """

    def __init__(self, rank: int, pid: int, status: str, doing: str = ""):
        self.rank, self.pid, self.status, self.doing = rank, pid, status, doing
        self.undelivered = False
        where = f" while running {doing}" if doing else ""
        super().__init__(f"worker {rank} (pid {pid}) {status}{where}")

    def __reduce__(self) -> tuple:
        # the default (type, args) would call __init__ with the message alone;
        # a WorkerDied must survive pickling to come out of a nested session
        return (type(self), (self.rank, self.pid, self.status, self.doing),
                {**self.__dict__, "args": self.args})


class UnreadableResult(pickle.UnpicklingError):
    """Raised by :meth:`Workers.poll`: what a worker sent does not unpickle here.

    It pickled in the worker, but rebuilding it failed in the parent (a
    ``__reduce__`` or ``__setstate__`` that raises, a class the parent cannot
    import).  The sessions turn it into an error that names the task.
    """

    def __init__(self, rank: int, pid: int, why: str):
        self.rank, self.pid, self.why = rank, pid, why
        super().__init__(self._say("message"))

    def _say(self, what: str) -> str:
        return (f"the {what} from worker {self.rank} (pid {self.pid}) could not be "
                f"unpickled in the parent: {self.why}")

    def about(self, what: str) -> pickle.UnpicklingError:
        """The error to raise, naming ``what`` was lost (e.g. ``"result of item 3"``)."""
        return pickle.UnpicklingError(self._say(what))


def cpu_count() -> int:
    """The default number of workers.

    ``OMP_NUM_THREADS`` if set, else ``PBS_NUM_PPN``, else the number of CPUs
    this process may run on (``os.sched_getaffinity``).

    Examples
    --------
    >>> import dask_sharedmem as sharedmem
    >>> sharedmem.cpu_count() >= 1
    True
    """
    for var in ("OMP_NUM_THREADS", "PBS_NUM_PPN"):
        value = os.environ.get(var, "").strip()
        if value:
            try:
                n = int(value.split(",")[0])
            except ValueError:
                continue
            if n >= 1:
                return n
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_count(n: Any, name: str, kind: str, minimum: str) -> int:
    """Validate a number of workers given as ``name``; numpy integers are fine.

    >>> worker_count(2, "np", "an int", ">= 0")
    2
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"{name} must be {kind} or None, not {n!r}")
    if n < (0 if minimum.startswith(">= 0") else 1):
        raise ValueError(f"{name} must be {minimum}, not {n}")
    return int(n)


def total_memory() -> int:
    """Total physical memory of this machine in bytes (``MemTotal`` of /proc/meminfo).

    Examples
    --------
    >>> import dask_sharedmem as sharedmem
    >>> sharedmem.total_memory() > 0
    True
    """
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                words = line.split()
                if words and words[0].upper() == "MEMTOTAL:":
                    return int(words[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def describe_status(status: int) -> str:
    """Say how a process ended, from a ``waitpid`` status.

    >>> describe_status(9)
    'was killed by SIGKILL (the out-of-memory killer sends this signal too)'
    >>> describe_status(3 << 8)
    'exited with code 3'
    """
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        extra = " (the out-of-memory killer sends this signal too)" if sig == signal.SIGKILL else ""
        return f"was killed by {name}{extra}"
    return f"exited with code {os.WEXITSTATUS(status)}"


class _WorkerChannel(channel.Channel):
    """A worker's end: every message it sends is preceded by the warnings issued since."""

    def send(self, obj: Any) -> None:
        if remote._CAUGHT:
            super().send((remote.WARNINGS, remote.take_warnings()))
        super().send(obj)


# -- the worker group ---------------------------------------------------------

_libc = None
# sessions started from several threads fork one at a time: a fork between
# another session's socketpair() and its close of the worker's end would give
# that end to our worker, and hide the other worker's death until ours exits
_forking = threading.Lock()


def _new_forking_lock() -> None:
    global _forking
    _forking = threading.Lock()  # a child must not inherit it held (nested pools)


os.register_at_fork(after_in_child=_new_forking_lock)


#: Python 3.12+ warns at every ``os.fork()`` while another Python thread runs;
#: this filter silences it for the forks of this module only (see :func:`_fork`)
_FORK_WARNING = ("ignore", re.compile(r"This process \(pid=\d+\) is multi-threaded, use of "
                                      r"fork\(\) may lead to deadlocks", re.I),
                 DeprecationWarning, re.compile(r"dask_sharedmem\.pool\Z"), 0)


def _fork() -> int:
    """``os.fork()``, without Python 3.12's ``DeprecationWarning`` about other threads.

    The warning names a real hazard: a lock that another thread holds at the
    fork stays locked in the child.  This package keeps its own side of it
    safe -- the threads it starts (dask callbacks such as ProgressBar) start
    after its forks, its locks and dask's thread pools are made anew in the
    child -- and the README's Limitations tell the user's side (a task must
    not need a lock that one of the caller's threads holds).  But the warning
    fires at every fork once any other thread exists: after one compute with
    dask's ``threads`` scheduler (its idle pool threads live on), in every
    Jupyter kernel, under every ProgressBar of an outer call.  Shown by pytest
    at each call, it would be noise that threads never give.  So it is
    filtered for this call site only: the filter is put in front of the
    filters in use and taken out again, by identity, in parent and child, so
    an ``os.fork()`` of the user's still warns.  (The list is changed in
    place: a ``catch_warnings`` entered meanwhile in another thread keeps a
    copy with this one entry, which only ever matches this module's forks.
    ``warnings._filters_mutated()`` is not called: it would make every
    location warned once so far warn again.)
    """
    filters = cast(list, warnings.filters)
    filters.insert(0, _FORK_WARNING)
    try:
        return os.fork()
    finally:
        for k, entry in enumerate(filters):
            if entry is _FORK_WARNING:
                del filters[k]
                break


def _pidfd_for_child() -> int | None:
    """In the parent, right before a fork: a pidfd of this process for the child
    to watch, or None where ``PR_SET_PDEATHSIG`` will do (see the module docstring).

    The kernel's "parent" for that signal is the forking thread; only the
    thread-group leader's end is the process's.
    """
    if threading.get_native_id() == os.getpid():
        return None
    try:
        return os.pidfd_open(os.getpid())
    except (AttributeError, OSError):  # not Linux, Linux before 5.3, seccomp
        return None


def _die_with_parent(parent_pid: int, pidfd: int | None) -> None:
    """In a new worker: be SIGKILLed when the process ``parent_pid`` dies.

    ``pidfd`` (from :func:`_pidfd_for_child`) is watched by a thread of ours;
    None asks the kernel instead (``PR_SET_PDEATHSIG``).
    """
    if pidfd is not None:
        # a process-wide signal taken by this thread would not interrupt what the
        # main thread waits in (a task's sleep, or select under an alarm's timeout)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            threading.Thread(target=_kill_when_gone, args=(pidfd, parent_pid), daemon=True,
                             name=f"dask_sharedmem: dies with pid {parent_pid}").start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        return
    global _libc
    if sys.platform.startswith("linux"):
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _kill_when_gone(pidfd: int, parent_pid: int) -> None:  # pragma: no cover - in a worker
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    poller.poll()
    # the wake-up alone is no proof: a task may have closed the descriptor (POLLNVAL)
    # or put another file at its number; a parent that died has handed us to another
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)


def _forget_inherited_thread_pools() -> None:
    """Make dask's threaded scheduler start new thread pools in this worker.

    dask keeps its pools in module globals, and a forked child inherits them
    without their threads: a task that computes with ``scheduler="threads"``
    (the default for dask arrays) would queue work that no thread ever runs.
    The lock is new too: another thread of the parent may have held it.
    """
    threaded: Any = sys.modules.get("dask.threaded")
    if threaded is not None:
        threaded.default_pool = None
        threaded.pools.clear()
        threaded.pools_lock = threading.Lock()


# -- finished workers, reaped lazily ------------------------------------------

#: pids of workers whose session ended but which nobody has reaped yet, oldest first
_finished: list[int] = []
#: more pending than this and the oldest are waited for: zombies hold a pid
#: each, and count against the user's process limit (RLIMIT_NPROC)
_MAX_FINISHED = max(64, 4 * (os.cpu_count() or 1))


def _collect(pid: int, block: bool) -> bool:
    """``waitpid`` one finished worker; whether it is reaped now.

    It is reaped once: by us, or by someone else's ``os.wait()`` (ChildProcessError).
    Taking it out of ``_finished`` is what claims it, so that a thread (or a
    signal handler) that collects it at the same moment reports it only once.
    """
    try:
        done = os.waitpid(pid, 0 if block else os.WNOHANG)[0] != 0
    except ChildProcessError:
        done = True
    if done:
        try:
            _finished.remove(pid)
        except ValueError:  # collected at the same time elsewhere
            return True
    return done


def _reap_finished(block: bool = False) -> None:
    """Reap the finished workers that have exited; ``block``: wait for every one.

    Then wait for the oldest while more than ``_MAX_FINISHED`` remain.
    """
    for pid in list(_finished):
        _collect(pid, block)
    for pid in list(_finished)[:max(0, len(_finished) - _MAX_FINISHED)]:
        _collect(pid, block=True)


#: in a worker: its socket to the parent, which no process it forks may keep
_to_parent: socket.socket | None = None


def _forget_parents_workers() -> None:
    global _to_parent
    _finished.clear()  # a child cannot reap its parent's children
    if _to_parent is not None:
        # the parent waits for the last copy of it to close (Workers._end): a
        # process started by a task and left running must not make it wait
        _to_parent.close()
        _to_parent = None


os.register_at_fork(after_in_child=_forget_parents_workers)


def _close_descriptors(last: int) -> None:
    """In a worker about to exit: close every descriptor, the socket ``last`` last.

    Those inherited from the caller (its files and the locks on them, its
    pipes) go first, and the caller waits for the socket's EOF: once
    ``close()`` returns, no worker holds them, though unmapping the worker's
    copy of the caller's memory still takes a while.
    """
    end = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if last < 0:  # already closed
        os.closerange(0, end)
        return
    os.closerange(0, last)
    os.closerange(last + 1, end)
    os.close(last)


def _wait_for_eof(sock: socket.socket) -> None:
    """Wait until the worker at the other end has closed its socket (and so every
    descriptor it had: see Workers._child); what it still sends is dropped."""
    try:
        while sock.recv(1 << 16):
            pass
    except OSError:  # ConnectionResetError: it is gone too
        pass


class Workers:
    """``n`` forked workers, each running ``main(channel, rank)``.

    Use as a context manager: leaving normally closes the workers (they exit
    on their own and a later session reaps them), leaving with an exception
    (KeyboardInterrupt included) kills and reaps them.

    ``start`` forks ``initial`` of them (default all ``n``), ranks
    ``0..initial-1``; :meth:`grow` forks the next rank while fewer than ``n``
    run.  ``fork_seconds`` is how long the last fork kept this process busy.

    >>> def main(chan, rank):
    ...     while True:
    ...         chan.send(chan.recv() * 2)
    >>> with Workers(2, main) as w:
    ...     w.send(0, 21)
    ...     w.poll()
    [(0, 42)]
    >>> with Workers(3, main, initial=1) as w:
    ...     w.grow(), w.forked
    (1, 2)
    """

    def __init__(self, n: int, main: Callable[[channel.Channel, int], None],
                 threshold: int | None = channel.DEFAULT_THRESHOLD,
                 initial: int | None = None):
        self.n = n
        self.initial = n if initial is None else min(initial, n)
        self.main = main
        self.threshold = threshold
        self.pids: list[int] = []
        self.channels: list[channel.Channel] = []
        self.fork_seconds = 0.0
        self._selector: Any = None  # a selectors.DefaultSelector while started
        self._alive: set[int] = set()
        self._parent = 0

    @property
    def forked(self) -> int:
        """How many workers were forked so far (ranks ``0..forked-1``)."""
        return len(self.pids)

    def __enter__(self) -> Workers:
        try:
            self.start()
        except BaseException:
            self.kill()
            raise
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is None:
            self.close()
        else:
            self.kill()

    def start(self) -> None:
        _reap_finished()
        self._parent = os.getpid()
        # how the workers' large results cross (inherited by them: see transports)
        transports.new_session()
        # every shared result that arrives holds descriptors; a refusal to take
        # one in recvmsg cannot be recovered, so lift the soft limit up front
        memory._raise_fd_limit()
        self._selector = selectors.DefaultSelector()
        self._fork(self.initial)

    def grow(self) -> int:
        """Fork one more worker, the next rank; return that rank.

        It goes through every step of a fork at :meth:`start`; it sees the
        parent's memory as it is now.
        """
        if self._selector is None:
            raise RuntimeError("grow() needs a started session (start() or with)")
        if self.forked >= self.n:
            raise RuntimeError(f"all {self.n} workers of this session are forked already")
        self._fork(1)
        return self.forked - 1

    def _fork(self, count: int) -> None:
        for stream in (sys.stdout, sys.stderr):  # or the children print it again
            try:
                stream.flush()
            except (AttributeError, ValueError):
                pass
        with _forking:
            for _ in range(count):
                self._fork_one(self.forked)

    def _fork_one(self, rank: int) -> None:
        t0 = time.perf_counter()
        mine, theirs = channel.pair(self.threshold)
        # SIGINT waits until the child ignores it and the parent has recorded
        # the child: else a Ctrl-C here raises KeyboardInterrupt in the child's
        # copy of our stack (which then runs the parent's code), or leaves a
        # child that kill() does not know about
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        watch = _pidfd_for_child()
        try:
            try:
                pid = _fork()
            except BaseException:
                mine.close()
                theirs.close()
                raise
            if pid == 0:  # pragma: no cover - runs in the child
                mine.sock.close()
                self._child(_WorkerChannel(theirs.sock, self.threshold, to_parent=True), rank,
                            self._parent, mask, watch)
            theirs.close()
            mine.inherited = memory._serial  # the child knows every segment we have
            self.pids.append(pid)
            self.channels.append(mine)
            self._alive.add(rank)
            self._selector.register(mine.sock, selectors.EVENT_READ, rank)
        finally:
            if watch is not None:
                os.close(watch)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self.fork_seconds = time.perf_counter() - t0

    def _child(self, chan: channel.Channel, rank: int, parent: int, mask: set,
               watch: int | None) -> None:  # pragma: no cover
        code = 1
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            _die_with_parent(parent, watch)
            _forget_inherited_thread_pools()
            # numpy's global random state came from the parent: every worker would draw
            # the same numbers (np.random.random() in two tasks gives one value twice);
            # re-seeded from the OS, as dask's processes scheduler does in its workers
            if "numpy.random" in sys.modules:  # else imported here later, seeded then
                default_initializer()  # (importing it for this took 13-16 ms a worker)
            warnings.showwarning = remote._record_warning
            remote._CAUGHT.clear()
            memory._in_worker = True
            if transports._active == "cma":
                transports.cma.allow_family(parent)
            global _to_parent
            _to_parent = chan.sock
            for sibling in self.channels:  # every rank forked before this one
                sibling.sock.close()
            self.main(chan, rank)
            code = 0
            # what it sent may still be read out of its memory (cma): it stays
            # until the parent says it has all of it, or ends the session
            while channel._KEPT:
                chan.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError):
            code = 0  # the parent closed our socket: the session is over
        except BaseException:
            traceback.print_exc()
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except BaseException:
                    pass
            try:
                channel.drop_kept()  # its results' memory returns before the parent goes on
                _close_descriptors(chan.fileno())
            finally:
                os._exit(code)

    def send(self, rank: int, msg: Any) -> None:
        """Send ``msg`` to worker ``rank``.

        If that worker has died the message is dropped: :meth:`poll` reports
        the death, since the worker's socket reads EOF.
        """
        try:
            self.channels[rank].send(msg)
        except (BrokenPipeError, ConnectionResetError):
            # raising WorkerDied here would bypass the callers' handling of
            # deaths around poll(), which names the item the worker was on
            pass

    def poll(self, timeout: float | None = None) -> list[tuple[int, Any]]:
        """Wait until some worker has sent something; return ``(rank, message)`` pairs.

        The list is empty if all that came were warnings: they are re-issued here.

        Raises :class:`WorkerDied` as soon as a worker's socket reads EOF, or
        when what it offered can no longer be fetched from it.
        """
        for rank in self._alive:  # what the last messages let workers drop
            if self.channels[rank].acks:
                self.send_acks(rank)
        out: list[tuple[int, Any]] = []
        for key, _ in self._selector.select(timeout):
            rank = key.data
            try:
                msgs = self.channels[rank].feed()
            except (EOFError, ConnectionResetError):
                self._reap(rank)
            except transports.cma.MakerGone:
                try:
                    self._reap(rank, kill=True)
                except WorkerDied as e:
                    e.undelivered = True
                    raise
            except pickle.UnpicklingError as e:
                raise UnreadableResult(rank, self.pids[rank], str(e)) from e.__cause__
            for m in msgs:
                if type(m) is tuple and m[0] == remote.WARNINGS:
                    remote.reissue(m[1])
                else:
                    out.append((rank, m))
        return out

    def send_acks(self, rank: int) -> None:
        """Tell worker ``rank`` now which of its kept values it may drop."""
        try:
            self.channels[rank].flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # it died: poll() says so

    def died(self, pid: int) -> WorkerDied:
        """The error for the worker ``pid``, whose memory was gone when a value of
        it was fetched (it is reaped, and killed first if it is still there)."""
        rank = self.pids.index(pid)
        try:
            self._reap(rank, kill=True)
        except WorkerDied as e:
            return e
        raise AssertionError("_reap returns only by raising")

    def _reap(self, rank: int, kill: bool = False) -> None:
        """Reap worker ``rank`` and raise the WorkerDied that says how it ended.

        ``kill``: its memory was found gone while it may still be exiting (or,
        never by design, running): SIGKILLed first unless it has exited.
        """
        pid = self.pids[rank]
        status: int | None = None
        try:
            if rank in self._alive and kill:
                got, status = os.waitpid(pid, os.WNOHANG)
                if not got:
                    status = None
                    os.kill(pid, signal.SIGKILL)
            if status is None:
                status = os.waitpid(pid, 0)[1]
            how = describe_status(status)
        except ChildProcessError:
            how = ("ended (its exit status is lost: SIGCHLD is ignored, or another "
                   "wait() in this process took it)")
        if rank in self._alive:
            self._alive.discard(rank)
            self._selector.unregister(self.channels[rank].sock)
        raise WorkerDied(rank, pid, how)

    def close(self) -> None:
        """End the session: workers read EOF and exit 0, reaped by a later session.

        Waiting here for each worker to exit (and unmap its copy of the
        caller's memory) would cost as much as forking it.
        """
        self._end(kill=False)

    def kill(self) -> None:
        """SIGKILL every worker and reap them all."""
        self._end(kill=True)

    def _end(self, kill: bool) -> None:
        pids = [self.pids[rank] for rank in sorted(self._alive)]
        if kill:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for chan in self.channels:
            # close() alone does not give the worker EOF if a process forked
            # during the session (e.g. ResourceProfiler's tracker, started by a
            # callback) holds a copy of our end; shutdown acts on the socket itself
            try:
                chan.sock.shutdown(socket.SHUT_RDWR if kill else socket.SHUT_WR)
            except OSError:
                pass
        if not kill:
            for rank in sorted(self._alive):
                _wait_for_eof(self.channels[rank].sock)
        for chan in self.channels:
            chan.close()
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        # finished workers from here on: one place reaps and reports each, once,
        # even if a Ctrl-C interrupts the waits below (or this, and _end runs again)
        _finished.extend(pid for pid in pids if pid not in _finished)
        self._alive.clear()
        self.channels = []
        if kill:
            for pid in pids:
                _collect(pid, block=True)
        _reap_finished()
