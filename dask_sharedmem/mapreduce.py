"""MapReduce: sharedmem's programming model on the fork worker pool.

``pool.map(func, sequence, reduce=...)`` forks the workers *inside* ``map``,
so ``func`` may be any closure or lambda and ``sequence`` any list or array:
workers find both in their own memory.  Only index ranges go to the workers
and only results come back.

Dispatch (parent)                          Work (each worker)
-----------------                          ------------------
a new worker's first range: its socket     take a range: its first, then the next
later ranges: the queue, a pipe that       record in the queue (one pipe read)
all workers read; two ranges per worker    for i in range(start, stop):
queued or running                              current[rank] = i
                                               out.append(func(sequence[i]))
on ("done", start, out, seconds):          send ("done", start, out, seconds)
    reduce(*r) for each r, store it
    size the next ranges from seconds,
    queue them
    fork one more worker? (below)

The queue keeps every worker busy to the end: a worker that finishes a
range takes the next one at once, whichever worker it was queued beside, so
none waits for a round trip to the parent, nor for a range that waits behind
a busy worker.  (Ranges sent to each worker's socket, two in flight, bound
each range to a worker early: near the end only one per worker was sent,
so that none waited behind another, at the price of a round trip before
each of the last ranges.  On the development VM, 64 items of 30 ms on 2
workers waited 4 ms per map for those at a load average of 3, and 2-195 ms
per worker at 5-7; from the queue, 0.3 ms.)
One read of a pipe takes a whole record of at most ``PIPE_BUF`` bytes, so
each range (start, stop, slot: 24 bytes) goes to exactly one worker; the
worker writes its rank into the slot's cell of a small shared array, which
tells the parent whose ranges are which when a result cannot be unpickled.
When all results are in, one end record per worker tells them the map is
over (a process forked meanwhile, say by another thread's map, may hold the
pipe open: no end of file can be relied on).

Ranges grow adaptively: a range is sized to take about ``_BATCH_SECONDS``
at the measured cost per item, but never more than an eighth of a forked
worker's share of the sequence, so that 100,000 trivial items cost a
handful of messages and a few slow ones still spread over all workers.

Workers are forked on demand, up to ``np``: a fork costs the parent 2-10 ms
on the development VM (more while other workers start or exit), and forking
all 32 of np=32 for 100 trivial items took 120-370 ms, against 10-16 ms with
np=2.  ``map`` forks one worker and hands it the first item; then, each time
it has collected what arrived (without waiting) and queued the work it freed
workers for, it forks the next rank while items remain that no worker has
taken and either

* no item has completed yet: no evidence, so items are assumed slow and
  32 items of 100 ms get their 32 workers as fast as forks allow, or
* seconds per item x items no worker has taken / workers forked exceeds the
  time the last fork kept the parent busy (``Workers.fork_seconds``).

A new worker is forked to take a range: its first is its own (sent to its
socket), so that no fork is for nothing.  While more workers are coming, the
queue holds one range per worker, not two: a new worker may start it sooner.

Seconds per item are measured in the workers, over the ranges that were not
a worker's first (which also pays for its start: copy-on-write faults), or
over first ranges while there is nothing else.  So 100 trivial items cost
two forks, and slow items keep forking as long as one more worker pays.
Forking stops while the rule says no and resumes if items turn out slower.
With dask callbacks every worker is forked up front, before the callbacks
start their threads.  A worker forked late sees the caller's memory as it is
at its fork: what ``reduce`` has done by then, say, as threads would.

``critical`` and ``ordered`` live in :mod:`dask_sharedmem.sections`.

Each worker writes the index it is working on into a small shared array, so
that if it dies the error names the item.
"""

from __future__ import annotations

import collections.abc
import os
import struct
import threading
import time
import traceback
import types
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from dask.callbacks import Callback, unpack_callbacks

from . import channel, memory
from .channel import dumps
from .pool import UnreadableResult, WorkerDied, Workers, cpu_count, worker_count
from .remote import pack_exception, unpack_exception
from .sections import _Critical, _Item, _Ordered, _ThreadItem, _Turns, _WorkerContext

__all__ = [
    "LostExceptionType",
    "MapReduce",
    "MapReduceByThread",
    "StopProcessGroup",
    "WorkerException",
    "background",
    "get_debug",
    "set_debug",
]

_BATCH_SECONDS = 0.02
#: one range in the queue that the workers share: start, stop, slot (see _processes)
_RANGE = struct.Struct("qqq")
#: ranges queued at most: the queue is a pipe, whose writes must never block (the
#: parent would not answer workers waiting in ordered); 1024 records fill 24 KiB of 64
_QUEUED_MAX = 1024
_debug = False


def set_debug(flag: bool) -> None:
    """Set the debug mode.

    In debug mode ``MapReduce.map`` runs the work function serially in the
    calling process, so exceptions propagate unchanged and ``pdb`` works.

    Examples
    --------
    >>> import dask_sharedmem as sharedmem
    >>> sharedmem.set_debug(True); sharedmem.get_debug()
    True
    >>> sharedmem.set_debug(False)
    """
    global _debug
    _debug = bool(flag)


def get_debug() -> bool:
    """Return the debug mode (see :func:`set_debug`).

    Examples
    --------
    >>> import dask_sharedmem as sharedmem
    >>> sharedmem.get_debug()
    False
    """
    return _debug


class LostExceptionType(Warning):
    """Warned when a worker's exception could not be pickled and its type is lost.

    The message and the worker's traceback are kept.

    Examples
    --------
    >>> import threading, warnings, dask_sharedmem as sharedmem
    >>> def work(i):
    ...     raise ValueError("holds a lock", threading.Lock())  # its args do not pickle
    >>> with warnings.catch_warnings(record=True) as caught, sharedmem.MapReduce(np=1) as pool:
    ...     warnings.simplefilter("always")
    ...     try:
    ...         pool.map(work, [0])
    ...     except sharedmem.WorkerException as e:
    ...         print("holds a lock" in str(e.reason))
    True
    >>> caught[0].category.__name__
    'LostExceptionType'
    """


class WorkerException(Exception):
    """An exception raised in a worker, re-raised in the parent.

    Attributes
    ----------
    reason : BaseException
        The original exception, of its original type when it could be
        pickled (otherwise an ``Exception`` with its message, and a
        :class:`LostExceptionType` warning is issued).  A worker that died
        gives a :class:`~dask_sharedmem.WorkerDied`.
    traceback : str
        The worker's formatted traceback.

    Examples
    --------
    >>> import dask_sharedmem as sharedmem
    >>> with sharedmem.MapReduce(np=2) as pool:
    ...     try:
    ...         pool.map(lambda i: 1 // i, [1, 0])
    ...     except sharedmem.WorkerException as e:
    ...         print(type(e.reason).__name__)
    ZeroDivisionError
    """

    def __init__(self, reason: Any, traceback: str):
        if not isinstance(reason, BaseException):
            warnings.warn(f"Type information of unpicklable exception {reason!r} is lost",
                          LostExceptionType, stacklevel=2)
            reason = Exception(reason)
        self.reason = reason
        self.traceback = traceback
        try:
            message = str(reason)
        except Exception as e:  # a broken __str__ must not hide the exception itself
            message = f"<str() failed with {type(e).__name__}>"
        super().__init__(f"{type(reason).__name__}: {message}\n{traceback}")

    def __reduce__(self) -> tuple:
        # the default (type, args) would call __init__ with the message alone;
        # it must survive pickling to come out of a map nested in a worker
        return (type(self), (self.reason, self.traceback), {**self.__dict__, "args": self.args})


class StopProcessGroup(Exception):
    """Raise in a work function to stop the map early, like ``break`` in a loop.

    No further items are started; ``map`` returns the (reduced) results of
    the items that completed, in sequence order.

    Examples
    --------
    >>> import dask_sharedmem as sharedmem
    >>> def work(i):
    ...     if i == 3:
    ...         raise sharedmem.StopProcessGroup
    ...     return i
    >>> with sharedmem.MapReduce(np=0) as pool:
    ...     pool.map(work, range(10))
    [0, 1, 2]
    """

    def __init__(self, *args: Any):
        super().__init__(*(args or ("StopProcessGroup",)))


def _check_np(np: Any) -> int:
    if np is None:
        return cpu_count()
    return worker_count(np, "np", "an int (the number of workers)", ">= 0 (0 runs in this process)")


class _Progress:
    """dask callbacks (ProgressBar, Profiler, ...) for the items of one map."""

    class _Count:
        def __init__(self) -> None:
            self.n = 0

        def __len__(self) -> int:
            return self.n

    def __init__(self, callbacks: Any, n: int, func: Callable, sequence: Any):
        self.start, self.start_state, self.pretask, self.posttask, self.finish = (
            unpack_callbacks(callbacks))
        self.dsk = _ItemGraph(func, sequence)
        self.state = {k: self._Count() for k in ("ready", "waiting", "running", "finished")}
        self.state["ready"].n = n

    def begin(self) -> None:
        for f in self.start:
            f(self.dsk)
        for f in self.start_state:
            f(self.dsk, self.state)

    def dispatched(self, start: int, stop: int) -> None:
        self.state["ready"].n -= stop - start
        self.state["running"].n += stop - start
        for f in self.pretask:
            for i in range(start, stop):
                f(i, self.dsk, self.state)

    def done(self, i: int, result: Any, rank: int) -> None:
        self.state["running"].n -= 1
        self.state["finished"].n += 1
        for f in self.posttask:
            f(i, result, self.dsk, self.state, rank)

    def end(self, errored: bool) -> None:
        for f in self.finish:
            f(self.dsk, self.state, errored)


class _ItemGraph(collections.abc.Mapping):
    """The items of a map seen as a dask graph ``{index: (func, item)}`` (lazily)."""

    def __init__(self, func: Callable, sequence: Any):
        self.func, self.sequence = func, sequence

    def __getitem__(self, i: int) -> tuple:
        return (self.func, self.sequence[i])

    def __len__(self) -> int:
        return len(self.sequence)

    def __iter__(self):
        return iter(range(len(self.sequence)))


class MapReduce:
    """A pool of forked worker processes for map-reduce over a sequence.

    Parameters
    ----------
    np : int, optional
        Number of workers, at most: ``map`` forks them as it needs them (see
        its Notes).  Default: :func:`cpu_count` (``OMP_NUM_THREADS``, then
        ``PBS_NUM_PPN``, then the CPUs this process may use).  ``0`` runs
        everything in the calling process.
    backend : {'process', 'thread'}
        ``'thread'`` uses threads instead of processes (see
        :func:`MapReduceByThread`).

    Attributes
    ----------
    np : int
        The most workers a map forks.
    critical : context manager
        ``with pool.critical:`` lets one worker at a time into the block,
        among the workers of all the maps of this pool running at once
        (from other threads, from a ``reduce``, nested in a worker).  The
        items of a map started inside the block raise ``RuntimeError`` if
        they enter it, as they would wait forever.
    ordered : context manager
        ``with pool.ordered:`` runs the block in the order of the items, at
        most once per item: entering it again in the same item raises
        ``RuntimeError`` (wrapped in :class:`WorkerException` like any
        error of an item, except in serial mode).
    local : namespace
        ``pool.local.rank`` is the worker's number, 0..np-1 (0 in serial mode).

    Examples
    --------
    >>> import dask_sharedmem as sharedmem
    >>> total = sharedmem.zeros(())
    >>> with sharedmem.MapReduce(np=2) as pool:
    ...     def work(i):
    ...         with pool.critical:
    ...             total[...] += i
    ...         return i * i
    ...     pool.map(work, range(5))
    [0, 1, 4, 9, 16]
    >>> float(total)
    10.0
    """

    def __init__(self, np: int | None = None, backend: str = "process"):
        if backend not in ("process", "thread"):
            raise ValueError(f"backend must be 'process' or 'thread', not {backend!r}")
        self.np = _check_np(np)
        self.backend = backend
        self.critical = _Critical()
        self.ordered = _Ordered()
        self.local = threading.local() if backend == "thread" else types.SimpleNamespace()
        self.local.rank = 0

    def __enter__(self) -> MapReduce:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"MapReduce(np={self.np}, backend={self.backend!r})"

    def map(self, func: Callable, sequence: Iterable, reduce: Callable | None = None,
            star: bool = False, minlength: int = 0) -> list:
        """Apply ``func`` to every item of ``sequence`` in parallel.

        Parameters
        ----------
        func : callable
            Called as ``func(item)`` (``func(*item)`` with ``star=True``).  It
            may be a closure or lambda defined anywhere: it is not pickled.
        sequence : sequence or iterable
            The items.  Unsized iterables (generators) are read into a list
            first.  Items are not pickled either.
        reduce : callable, optional
            Called in this process on each result as it arrives; a tuple
            result is spread into its arguments.  Its return values make up
            the list that ``map`` returns.
        star : bool
            Spread each item into ``func``'s arguments.
        minlength : int
            Sequences shorter than this run serially in this process, to skip
            the cost of forking for little work.

        Returns
        -------
        list
            The (reduced) results in the order of ``sequence``.

        Raises
        ------
        WorkerException
            If ``func`` raised in a worker (``.reason`` is the exception,
            ``.traceback`` the worker's traceback) or a worker died
            (``.reason`` is a :class:`WorkerDied` naming the item and signal).

        Notes
        -----
        Workers are forked as the map needs them, ranks ``0..np-1`` in turn:
        one at first, then one more after each look at what arrived, while
        items remain that no worker has taken and either none has completed
        yet (they may be slow: workers are forked one after another without
        a pause) or the measured seconds per item x items left / workers
        exceed what a fork costs.
        So a quick map forks one or two workers whatever ``np`` is.  A worker
        forked late sees this process's memory as it is then.  Items are
        handed out in ranges from one queue that all workers read: a worker
        that is free takes the next range, so none waits behind a busy one.

        Examples
        --------
        >>> import dask_sharedmem as sharedmem
        >>> with sharedmem.MapReduce(np=2) as pool:
        ...     pool.map(lambda a, b: (a, a * b), [(1, 2), (3, 4)], star=True,
        ...              reduce=lambda a, ab: ab)
        [2, 12]
        """
        if not callable(func):
            raise TypeError(f"func must be callable, not {type(func).__name__}")
        if reduce is not None and not callable(reduce):
            raise TypeError(f"reduce must be callable or None, not {type(reduce).__name__}")
        if not isinstance(minlength, int):
            raise TypeError(f"minlength must be an int, not {type(minlength).__name__}")
        if not _is_indexable(sequence):
            try:
                items = iter(sequence)
            except TypeError:  # list() would say "'int' object is not iterable"
                raise TypeError("sequence must be a sequence or an iterable, not "
                                f"{type(sequence).__name__}") from None
            sequence = list(items)
        n = len(sequence)  # type: ignore[arg-type]
        call = (lambda item: func(*item)) if star else func
        finish = _reducer(reduce)
        callbacks = Callback.active
        progress = _Progress(callbacks, n, call, sequence) if callbacks else None
        if n == 0 or self.np == 0 or _debug or n < minlength:
            return self._serial(call, sequence, finish, progress)
        if self.backend == "thread":
            return self._threads(call, sequence, finish, progress)
        return self._processes(call, sequence, finish, progress)

    # -- serial -------------------------------------------------------------
    def _serial(self, call: Callable, sequence: Any, finish: Callable,
                progress: _Progress | None) -> list:
        out = []
        errored = True
        here = _Item()
        outer_item = self.ordered._run(here)
        outer_barred = self.critical._bar(self.critical._inside())
        if progress:
            progress.begin()
        try:
            for i in range(len(sequence)):
                if progress:
                    progress.dispatched(i, i + 1)
                here.item, here.entered = i, False
                try:
                    r = call(sequence[i])
                except StopProcessGroup:
                    break
                if progress:
                    progress.done(i, r, 0)
                out.append(finish(r))
            errored = False
        finally:
            self.ordered._run(outer_item)
            self.critical._bar(outer_barred)
            if progress:
                progress.end(errored)
        return out

    # -- processes ----------------------------------------------------------
    def _processes(self, call: Callable, sequence: Any, finish: Callable,
                   progress: _Progress | None) -> list:
        n = len(sequence)
        nworkers = min(self.np, n)
        # the item each worker is on (-1: none), then which worker took the range
        # of each slot of the queue (-1: nobody yet)
        board = memory.full(nworkers + 2 * nworkers, -1, dtype="i8")
        current, owner = board[:nworkers], board[nworkers:]
        results: list = [None] * n
        completed = bytearray(n)
        stopped = False
        turns = _Turns()
        waiting: dict[int, int] = {}  # item -> rank waiting to enter ordered
        queued: dict[int, tuple[int, int]] = {}  # slot -> range, queued or running
        slot_of: dict[int, int] = {}  # a queued range's start -> its slot
        free = list(range(min(2 * nworkers, _QUEUED_MAX)))
        cursor = 0
        per_item: float | None = None  # measured seconds per item, in the last range
        # seconds and items measured so far: [0] in each worker's first range, which
        # also pays for its start (copy-on-write faults: 0.1 ms here), [1] in later ones
        busy, measured = [0.0, 0.0], [0, 0]
        reported = bytearray(nworkers)  # which workers have sent a range
        queue, to_queue = os.pipe()

        def worker_main(chan: Any, rank: int) -> None:
            self.local.rank = rank
            self.critical._forked(barred)
            ctx = _WorkerContext(chan, rank)
            self.ordered._run(ctx)
            taken = chan.recv()  # its first range, or None: take one from the queue
            while True:
                # one read of a pipe takes one whole record: the workers share the queue
                start, stop, slot = taken or _RANGE.unpack(os.read(queue, _RANGE.size))
                taken = None
                if start < 0:  # the map is over
                    return
                owner[slot] = rank
                t0 = time.perf_counter()
                out = []
                for i in range(start, stop):
                    current[rank] = ctx.item = i
                    ctx.entered = False
                    try:
                        out.append(call(sequence[i]))
                    except StopProcessGroup:
                        chan.send(("stop", start, out))
                        break
                    except BaseException as e:
                        chan.send(("error", i, pack_exception(e)))
                        return
                    if not ctx.entered:
                        ctx.skipped.append(i)
                else:
                    _send_results(chan, start, out, time.perf_counter() - t0)
                current[rank] = -1
                ctx.skipped = []
                if channel._KEPT:  # the parent may have fetched them meanwhile
                    chan.take_acks()

        def unclaimed() -> int:
            """Items that no worker has taken yet: in the queue, or not handed out."""
            return n - cursor + sum(b - a for slot, (a, b) in queued.items() if owner[slot] < 0)

        def take() -> tuple[int, int, int] | None:
            """The next range to hand out, and its slot; None if there is none."""
            nonlocal cursor
            if cursor >= n or stopped or not free:
                return None
            size = 1
            if per_item is not None:  # aim at _BATCH_SECONDS, keep the load balanced
                share = max(1, n // (8 * w.forked))  # the largest: 8 per worker at least
                size = max(1, min(share, n - cursor, int(_BATCH_SECONDS / max(per_item, 1e-9))))
            start, cursor = cursor, cursor + size
            slot = free.pop()
            queued[slot] = start, cursor
            slot_of[start] = slot
            if progress:
                progress.dispatched(start, cursor)
            return start, cursor, slot

        def start_worker(rank: int) -> None:
            """Give a new worker its first range (it is forked to take it)."""
            taken = take()
            if taken is not None:
                owner[taken[2]] = rank
            w.send(rank, taken)

        def fill() -> None:
            """Queue ranges: one more than each worker runs, so none waits for the
            next; none while more workers come (a new one may start it sooner)."""
            while len(queued) < (1 if grow else 2) * w.forked:
                taken = take()
                if taken is None:
                    return
                owner[taken[2]] = -1
                os.write(to_queue, _RANGE.pack(*taken))

        def collected(start: int) -> tuple[int, int]:
            """The range that starts at ``start`` has come back: free its slot."""
            slot = slot_of.pop(start)
            free.append(slot)
            return queued.pop(slot)

        def release(start: int, stop: int) -> None:
            turns.mark(start, stop)
            rank = waiting.pop(turns.next, None)
            if rank is not None:
                w.send(rank, "go")

        def more_workers() -> bool:
            """Whether to fork another worker now (the rule: see the module docstring)."""
            if stopped or w.forked >= nworkers:
                return False
            left = unclaimed()
            if not left:
                return False
            k = 1 if measured[1] else 0
            if not measured[k]:  # no item has completed: assume they are slow
                return True
            return busy[k] / measured[k] * left / w.forked > w.fork_seconds

        barred = self.critical._open()
        errored = True
        try:
            # with callbacks, every worker is forked first: they may start threads,
            # and a fork must not copy a lock that one of them holds
            with Workers(nworkers, worker_main, initial=nworkers if progress else 1) as w:
                if progress:
                    progress.begin()
                for rank in range(w.forked):
                    start_worker(rank)
                grow = more_workers()
                while True:
                    if grow:
                        start_worker(w.grow())
                    fill()
                    if not queued:  # every range has come back
                        break
                    try:
                        events = w.poll(0 if grow else None)
                    except WorkerDied as e:
                        i = int(current[e.rank])
                        owned = [r for slot, r in queued.items() if owner[slot] == e.rank]
                        if e.undelivered and owned:  # it had sent them: not copied out yet
                            # a worker sends its ranges' results in the order it took them
                            a, b = min(owned)
                            what = (f"the result of item {a} was" if b == a + 1
                                    else f"the results of items {a} to {b - 1} were")
                            e.args = (f"{e}; {what} lost with it",)
                        elif i >= 0 and not completed[i]:
                            e.doing = f"item {i} of the sequence"
                            e.args = (f"{e} while running item {i}",)
                        else:  # its last item's result had arrived: do not blame it
                            e.args = (f"{e} while waiting for work",)
                        raise WorkerException(e, "") from None
                    except UnreadableResult as e:
                        # a worker sends its ranges' results in the order it took them,
                        # and marks each range as its own before it runs it
                        a, b = min(r for slot, r in queued.items() if owner[slot] == e.rank)
                        lost = e.about(f"result of item {a}" if b == a + 1
                                       else f"results of items {a} to {b - 1}")
                        lost.__cause__ = e.__cause__
                        raise WorkerException(lost, "") from None
                    for rank, msg in events:
                        kind = msg[0]
                        if kind == "done" or kind == "stop":
                            start, out = msg[1], msg[2]
                            _, stop = collected(start)
                            for k, r in enumerate(out):
                                if progress:
                                    progress.done(start + k, r, rank)
                                results[start + k] = finish(r)
                            completed[start:start + len(out)] = b"\x01" * len(out)
                            release(start, stop)
                            if kind == "stop":
                                stopped = True
                            else:
                                per_item = msg[3] / max(len(out), 1)
                                busy[reported[rank]] += msg[3]
                                measured[reported[rank]] += len(out)
                                reported[rank] = 1
                        elif kind == "ordered":
                            for j in msg[2]:
                                turns.mark(j, j + 1)
                            if turns.next == msg[1]:
                                w.send(rank, "go")
                            else:
                                waiting[msg[1]] = rank
                        elif kind == "ordered_exit":
                            release(msg[1], msg[1] + 1)
                        elif kind == "error":
                            raise _worker_exception(msg[2], f"item {msg[1]}")
                    # after what had arrived, and the work it freed workers for
                    grow = more_workers()
                for _ in range(w.forked):  # every worker is waiting for a range now
                    os.write(to_queue, _RANGE.pack(-1, -1, -1))
            errored = False
        finally:
            os.close(queue)
            os.close(to_queue)
            self.critical._close()
            if progress:
                progress.end(errored)
        if stopped:
            return [r for r, done in zip(results, completed, strict=True) if done]
        return results

    # -- threads ------------------------------------------------------------
    def _threads(self, call: Callable, sequence: Any, finish: Callable,
                 progress: _Progress | None) -> list:
        n = len(sequence)
        results: list = [None] * n
        completed = bytearray(n)
        lock = threading.Lock()
        items = iter(range(n))
        failure: list = []
        stopped = threading.Event()
        turns = _Turns()
        barred = self.critical._inside()

        def worker(rank: int) -> None:
            self.local.rank = rank
            self.critical._bar(barred)
            here = _ThreadItem(turns)
            self.ordered._run(here)
            while not failure and not stopped.is_set():
                with lock:
                    i = next(items, None)
                    if i is not None and progress:
                        progress.dispatched(i, i + 1)
                if i is None:
                    return
                here.item, here.entered = i, False
                in_reduce = False
                try:
                    r = call(sequence[i])
                    in_reduce = True
                    with lock:
                        if progress:
                            progress.done(i, r, rank)
                        results[i] = finish(r)
                        completed[i] = 1
                except StopProcessGroup:
                    stopped.set()
                except BaseException as e:
                    with lock:
                        failure.append((e, in_reduce))
                finally:
                    if not here.entered:
                        turns.mark(i, i + 1)
                if stopped.is_set() or failure:
                    turns.mark(0, n)  # release anyone waiting in ordered

        threads = [threading.Thread(target=worker, args=(r,), daemon=True)
                   for r in range(min(self.np, n))]
        if progress:
            progress.begin()
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            if progress:
                progress.end(bool(failure))
        if failure:
            e, in_reduce = failure[0]
            if in_reduce:  # reduce is the caller's own code: raised as itself, as with processes
                raise e
            tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
            raise WorkerException(e, tb)
        if stopped.is_set():
            return [r for r, done in zip(results, completed, strict=True) if done]
        return results


def _send_results(chan: Any, start: int, out: list, seconds: float) -> None:
    """Send a range's results; name the item whose result cannot be pickled."""
    try:
        chan.send(("done", start, out, seconds))
    except Exception:
        for k, r in enumerate(out):
            try:
                dumps(r)
            except Exception as e:
                err = TypeError(f"the result of item {start + k} (of type "
                                f"{type(r).__module__}.{type(r).__qualname__}) cannot be "
                                f"pickled to send it to the parent: {e}")
                chan.send(("error", start + k, pack_exception(err)))
                return
        raise


def _worker_exception(packed: tuple, where: str = "") -> WorkerException:
    """The WorkerException for a packed exception; warn if its type was lost."""
    exc, lost = unpack_exception(packed, where)
    if lost:
        warnings.warn(str(exc), LostExceptionType, stacklevel=4)
    return WorkerException(exc, packed[3])


def _reducer(reduce: Callable | None) -> Callable:
    if reduce is None:
        return lambda r: r
    return lambda r: reduce(*r) if isinstance(r, tuple) else reduce(r)


def _is_indexable(sequence: Any) -> bool:
    return isinstance(sequence, (collections.abc.Sequence, memory.np.ndarray))


def MapReduceByThread(np: int | None = None) -> MapReduce:
    """A :class:`MapReduce` that uses threads instead of processes.

    Useful where forking is not allowed or the work releases the GIL.

    Examples
    --------
    >>> import dask_sharedmem as sharedmem
    >>> with sharedmem.MapReduceByThread(np=2) as pool:
    ...     pool.map(abs, [-1, -2])
    [1, 2]
    """
    return MapReduce(np=np, backend="thread")


class background:
    """Call ``function(*args, **kwargs)`` in a forked background process.

    Examples
    --------
    >>> import dask_sharedmem as sharedmem
    >>> bg = sharedmem.background(sum, [1, 2, 3])
    >>> bg.wait()
    6
    """

    def __init__(self, function: Callable, *args: Any, **kwargs: Any):
        if not callable(function):
            raise TypeError(f"function must be callable, not {type(function).__name__}")

        def main(chan: Any, rank: int) -> None:
            try:
                result = function(*args, **kwargs)
            except BaseException as e:
                chan.send(("error", pack_exception(e)))
                return
            try:
                chan.send(("done", result))
            except Exception as e:
                err = TypeError(f"the result (of type {type(result).__qualname__}) cannot "
                                f"be pickled to send it to the parent: {e}")
                chan.send(("error", pack_exception(err)))

        self._workers: Workers | None = Workers(1, main)
        self._workers.__enter__()
        self._finalizer = weakref.finalize(self, self._workers.kill)

    def wait(self) -> Any:
        """Wait for the call to finish and return its result.

        Raises
        ------
        WorkerException
            If the call raised, or the process died.
        """
        if self._workers is None:
            raise RuntimeError("wait() was already called for this background call")
        w, self._workers = self._workers, None
        try:
            try:
                events: list = []
                while not events:
                    events = w.poll()
            except WorkerDied as e:
                raise WorkerException(e, "") from None
            msg = events[0][1]
            if msg[0] == "error":
                raise _worker_exception(msg[1])
            return msg[1]
        finally:
            w.kill()
            self._finalizer.detach()
