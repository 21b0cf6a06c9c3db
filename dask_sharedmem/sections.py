"""OpenMP-like sections of a map: ``pool.critical`` and ``pool.ordered``.

What a worker, a thread or the serial mode does when an item enters either
block (the dispatch that runs the items is :mod:`dask_sharedmem.mapreduce`).

``critical`` is a POSIX record lock (``lockf``) on a memfd, taken under an
RLock that excludes the threads of one process.  One memfd serves every map
of the pool running at once (maps started from several threads, or from a
``reduce``); their workers inherit it, and so do the workers of a map nested
in a worker, so the block excludes them all.  The kernel drops the lock if
its holder dies.  The memfd is made when the first map starts and closed
when the last one ends.  The items of a map started inside the block cannot
enter it (the block waits for the map): they raise ``RuntimeError``.

``ordered`` is arbitrated by the parent: a worker asks to enter for item
``i`` and the parent answers once every item before ``i`` has left the
block or finished without entering it.  As in OpenMP the block runs at most
once per item: a second entry in the same item, or one nested in the block,
would wait for a turn that has passed, so it raises ``RuntimeError`` in the
worker, as it does with threads and in serial mode.
"""

from __future__ import annotations

import fcntl
import heapq
import os
import threading
from typing import Any


class _Critical:
    """``with pool.critical:`` -- one worker inside at a time, across all the pool's maps.

    Two locks, because neither excludes everything alone.  An RLock excludes
    the threads of one process.  A POSIX record lock (``lockf``) on a memfd
    excludes processes: it belongs to a process (so it cannot tell two of its
    threads apart), a forked child does not inherit it, and the kernel drops
    it when its holder dies.  Every map of the pool running in this process
    shares one memfd, and the workers of every map, nested ones too, inherit
    it, so they all lock the same file.  It is made when the first map starts
    and closed when the last ends: an idle pool holds no descriptor, without
    relying on ``with`` or the garbage collector to close it.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._fd: int | None = None
        self._maps = 0  # maps of this pool running in this process, which share _fd
        # .depth: how deep this thread is in the block (only the outermost entry
        # locks the file: a process's record lock is not counted);
        # .barred: this thread runs the items of a map started inside the block
        self._tls = threading.local()

    def _inside(self) -> bool:
        """Whether a map started by this thread now must keep its items out.

        They would wait forever for this thread to leave the block, and it
        waits for the map.
        """
        return getattr(self._tls, "depth", 0) > 0 or getattr(self._tls, "barred", False)

    def _bar(self, barred: bool) -> bool:
        """Set whether this thread's items are barred; return what it was."""
        outer, self._tls.barred = getattr(self._tls, "barred", False), barred
        return outer

    def _open(self) -> bool:
        """A map of processes starts: share the memfd; return :meth:`_inside`.

        Under the RLock, so that no other thread is in the block while the
        file comes and goes; a file made while this thread is in the block
        need not be locked, as the map's workers are barred.
        """
        with self._lock:
            if self._fd is None:
                self._fd = os.memfd_create("dask_sharedmem-critical", os.MFD_CLOEXEC)
            self._maps += 1
            return self._inside()

    def _close(self) -> None:
        """A map of processes ended and reaped its workers."""
        with self._lock:
            self._maps -= 1
            if not self._maps and self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _forked(self, barred: bool) -> None:
        """In a new worker: the parent's threads, and its record lock, are not here."""
        self._lock = threading.RLock()
        self._tls.depth = 0
        self._tls.barred = barred

    def __enter__(self) -> _Critical:
        if getattr(self._tls, "barred", False):
            raise RuntimeError(
                "pool.critical was entered by an item of a map that was started inside "
                "pool.critical: it would wait forever for the block, which waits for the "
                "map; start the map outside the critical block")
        self._lock.acquire()
        depth = getattr(self._tls, "depth", 0)
        if not depth and self._fd is not None:
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX)
            except BaseException:  # Ctrl-C while waiting
                self._lock.release()
                raise
        self._tls.depth = depth + 1
        return self

    def __exit__(self, *exc: Any) -> None:
        self._tls.depth -= 1
        if not self._tls.depth and self._fd is not None:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
        self._lock.release()


class _Ordered:
    """``with pool.ordered:`` -- the block runs in the order of the items, once per item.

    It acts on the :class:`_Item` that this thread is running (none outside
    a map: then it does nothing).
    """

    def __init__(self) -> None:
        self._tls = threading.local()  # .item: the _Item this thread runs

    def _run(self, item: _Item | None) -> _Item | None:
        """Make ``item`` this thread's; return the one it replaces (a map in a map)."""
        outer, self._tls.item = getattr(self._tls, "item", None), item
        return outer

    def __enter__(self) -> _Ordered:
        item = getattr(self._tls, "item", None)
        if item is not None:
            item.enter_ordered()
        return self

    def __exit__(self, *exc: Any) -> None:
        item = getattr(self._tls, "item", None)
        if item is not None:
            item.exit_ordered()


class _Item:
    """The item a thread is running, as ``pool.ordered`` sees it.

    An ordered block runs at most once per item (as in OpenMP): a second
    entry would wait for a turn that has passed, so it raises instead, in
    every mode.  In serial mode items already run in order, so there is no
    turn to wait for; threads wait on their map's :class:`_Turns`; worker
    processes ask the parent (:class:`_WorkerContext`).

    >>> item = _Item(); item.item = 3
    >>> item.enter_ordered(); item.exit_ordered()
    >>> item.enter_ordered()
    Traceback (most recent call last):
    RuntimeError: pool.ordered was entered a second time in item 3: ...
    """

    def __init__(self) -> None:
        self.item = -1
        self.entered = False

    def enter_ordered(self) -> None:
        if self.entered:
            raise RuntimeError(
                f"pool.ordered was entered a second time in item {self.item}: an ordered "
                "block runs at most once per item; enter it once per item (not in a loop, "
                "not inside itself)")
        self.entered = True
        self._wait_turn()

    def _wait_turn(self) -> None:
        pass

    def exit_ordered(self) -> None:
        pass


class _ThreadItem(_Item):
    """A worker thread's item: its turn comes from its map's :class:`_Turns`."""

    def __init__(self, turns: _Turns):
        super().__init__()
        self.turns = turns

    def _wait_turn(self) -> None:
        self.turns.wait_for(self.item)

    def exit_ordered(self) -> None:
        self.turns.mark(self.item, self.item + 1)


class _Turns:
    """Which items have passed the ordered block (or finished without it).

    ``mark(start, stop)`` records a finished range; ``next`` is the first
    item that has not passed.  Item ``i`` may enter once ``next == i``.

    >>> t = _Turns(); t.mark(1, 3); t.next
    0
    >>> t.mark(0, 1); t.next
    3
    """

    def __init__(self) -> None:
        self.next = 0
        self._ranges: list[tuple[int, int]] = []
        self._cond = threading.Condition()

    def mark(self, start: int, stop: int) -> None:
        with self._cond:
            heapq.heappush(self._ranges, (start, stop))
            while self._ranges and self._ranges[0][0] <= self.next:
                self.next = max(self.next, heapq.heappop(self._ranges)[1])
            self._cond.notify_all()

    def wait_for(self, item: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.next >= item)


class _WorkerContext(_Item):
    """A worker's side of one map: its channel, current item, ordered state."""

    def __init__(self, chan: Any, rank: int):
        super().__init__()
        self.chan = chan
        self.rank = rank
        self.skipped: list[int] = []  # finished without entering ordered, not yet reported

    def _wait_turn(self) -> None:
        self.chan.send(("ordered", self.item, self.skipped))
        self.skipped = []
        self.chan.recv()  # "go": after its first range, a worker is sent nothing else

    def exit_ordered(self) -> None:
        self.chan.send(("ordered_exit", self.item))
