"""How a large buffer crosses between processes: one small interface, a room per way.

A message (``channel.py``) never carries the bytes of a numpy array of at
least ``sharedmem.threshold`` bytes, nor those of a pickle-protocol-5 buffer
that large (pandas and xarray objects carry their arrays that way).  The
sender *offers* each such buffer in an :class:`Outbox`, which puts a small
stand-in in the message; the receiver *fetches* the stand-ins into buffers,
or straight into the place where the data ends up (:func:`fetch_into`)::

    room  the stand-in                        fetch                        copies
    ----  ---------------------------------   --------------------------   ------
    cma   Offer(pid, address, nbytes):        process_vm_readv, into new   1
          the bytes stay where they are,      private memory or into the
          the maker keeps them alive          final place (cma.py)
    shm   a view of a new memfd segment,      map it (a view)              1
          its descriptor beside the message   (shm.py)

Like Open MPI's single-copy components (smsc: cma, knem, xpmem), each room
is a module of its own; this one chooses, :func:`choose`, from dask config
``sharedmem.transport``: ``"auto"`` (the default) takes ``cma`` where the
kernel allows a worker's parent and siblings to read it
(:func:`cma.available`, probed once per process) and ``shm`` elsewhere;
``"cma"`` and ``"shm"`` force one.  The choice is made by the caller when a
session starts, so its workers inherit it.

Only a worker's offers use cma: the caller's own process is never opened to
its workers (nothing is declared for it, see cma.py), so what a parent sends
to its workers goes through shm (:func:`room`).  The maker of a cma offer
keeps its buffer alive until the receiver says it has it (channel.py).

Why not shared memory for everything, as this package once did: a new 4 KiB
page of shared memory costs 3.6-4.4 us to write on the development VM and
another 0.3-1 us to map in each process that reads it (shared memory gets no
huge pages unless the kernel's ``shmem_enabled`` allows them: rarely), where
a worker's private result is already on huge pages and one
``process_vm_readv`` copies it at memcpy speed.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from . import cma, shm

__all__ = ["Offer", "Outbox", "choose", "describe", "fetch", "fetch_into", "room"]

_ROOMS = ("auto", "cma", "shm")

#: the room of this process's offers to its parent: set by the parent when it
#: starts a session (choose), so forked workers inherit it
_active = "shm"

#: 16 random bytes, new for each session of workers, which they inherit at the same
#: address: read back from a maker after its data, they prove it was that process
#: and not another one that got its pid after it died (see _pull)
_nonce = bytearray(16)

#: fetches of at least this many bytes from one process are split over threads
_PARALLEL_MIN = 32 << 20


class Offer(NamedTuple):
    """A cma stand-in: ``nbytes`` at ``address`` in process ``pid``; with a
    ``layout`` (shape, strides, itemsize), the bytes of a strided array there,
    in C order (pulled piece by piece: no contiguous copy in the maker)."""

    pid: int
    address: int
    nbytes: int
    layout: tuple | None = None

    def pieces(self) -> list[tuple[int, int]]:
        """Where its bytes are in the maker, in order: (address, length) pairs."""
        if self.layout is None:
            return [(self.address, self.nbytes)] if self.nbytes else []
        return _pieces(self.address, *self.layout) or []


def new_session() -> None:
    """Before forking a session's workers: their room (:func:`choose`), and a new nonce."""
    global _active, _nonce
    _active = choose()
    _nonce = bytearray(os.urandom(16))


def choose() -> str:
    """The room for workers forked from now on (dask config ``sharedmem.transport``).

    >>> choose() in ("cma", "shm")
    True
    """
    import dask.config

    wanted = dask.config.get("sharedmem.transport", "auto")
    if wanted not in _ROOMS:
        raise ValueError(f"dask config sharedmem.transport must be one of {_ROOMS}, "
                         f"not {wanted!r}")
    if wanted == "auto":
        wanted = "cma" if cma.available()[0] else "shm"
    return wanted


def describe() -> str:
    """One line: the room ``auto`` takes on this machine, and why.

    >>> describe().split()[0] in ("cma:", "shm:")
    True
    """
    ok, why = cma.available()
    return f"cma: {why}" if ok else f"shm: {why}"


def room(to_parent: bool) -> str:
    """The room of an offer: the session's for a worker's, shm for a parent's."""
    return _active if to_parent else "shm"


class Outbox:
    """The buffers offered in one message or one held value.

    ``items`` are the stand-ins, in the order offered; ``keep`` what the
    maker must keep alive until the receiver has fetched them (cma).
    """

    def __init__(self, room: str):
        self.room = room
        self.items: list[Any] = []
        self.keep: list[Any] = []
        self._pack: list[tuple[int, memoryview]] = []

    def offer(self, buf: Any) -> int:
        """Offer a contiguous buffer; return the number of its stand-in."""
        view = memoryview(buf).cast("B")
        self.items.append(None)
        k = len(self.items) - 1
        if self.room == "cma":
            self.items[k] = Offer(os.getpid(), _address(view), view.nbytes)
            self.keep.append(buf)
        elif view.nbytes < shm.PACK_ITEM_MAX:
            self._pack.append((k, view))
        else:
            self.items[k] = shm.copy([view])[0]
        return k

    def offer_strided(self, a: np.ndarray) -> int | None:
        """Offer a strided array whose contiguous runs are long enough to be pulled
        one by one (cma only); None if it is not worth it: the caller copies it."""
        if self.room != "cma" or _pieces(a.ctypes.data, a.shape, a.strides, a.itemsize) is None:
            return None
        self.items.append(Offer(os.getpid(), a.ctypes.data, a.nbytes,
                                (a.shape, a.strides, a.itemsize)))
        self.keep.append(a)
        return len(self.items) - 1

    def close(self) -> list[Any]:
        """The stand-ins, once every offer is in place (shm packs the small ones)."""
        if self._pack:
            for (k, _), item in zip(self._pack, shm.copy([v for _, v in self._pack]),
                                    strict=True):
                self.items[k] = item
            self._pack = []
        return self.items


def _address(view: memoryview) -> int:
    return np.frombuffer(view, np.uint8).__array_interface__["data"][0] if view.nbytes else 0


def fetch(items: Sequence[Any]) -> list[Any]:
    """Buffers holding the data of these stand-ins: cma offers are pulled into new
    memory (one call per maker for all of its pieces), shm views are themselves.

    >>> import numpy as np
    >>> a = np.arange(4.0)
    >>> out = fetch([Offer(os.getpid(), a.ctypes.data, a.nbytes)])
    >>> out[0].view("f8")
    array([0., 1., 2., 3.])
    """
    out: list[Any] = list(items)
    by_pid: dict[int, list[int]] = {}
    for k, item in enumerate(items):
        if isinstance(item, Offer):
            by_pid.setdefault(item.pid, []).append(k)
    for pid, ks in by_pid.items():
        remote, local = [], []
        for k in ks:
            buf = _new(items[k].nbytes)
            out[k] = buf
            if buf.nbytes:
                remote.extend(items[k].pieces())
                local.append((buf.ctypes.data, buf.nbytes))
        _pull(pid, remote, local)
    return out


#: buffers at least this large are mappings of their own (see _new)
_MAP_MIN = 1 << 20
_HUGE = 2 << 20


def _new(nbytes: int) -> np.ndarray:
    """New private memory for ``nbytes`` fetched bytes.

    From 1 MiB up a mapping of its own, unmapped when the last array on it
    goes: malloc keeps freed memory of the sizes it has seen in its heap
    (its threshold for mappings rises to 32 MiB), so a process that fetched
    1 GB of results kept it after they were dropped.  Advised to use huge
    pages from 2 MiB, as numpy does with its own large arrays.
    """
    if nbytes < _MAP_MIN:
        return np.empty(nbytes, np.uint8)
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if nbytes >= _HUGE and hasattr(mmap, "MADV_HUGEPAGE"):
        m.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(m, np.uint8)


def fetch_into(item: Any, out: np.ndarray) -> None:
    """Copy the bytes of stand-in ``item`` into ``out`` (C order), as ``out[...] = data``
    of the same dtype would; ``out`` may be any view (e.g. a chunk's slot in a
    joined array): a cma offer is pulled straight into it, piece by piece.

    >>> import numpy as np
    >>> a, out = np.arange(4.0), np.zeros((2, 4))
    >>> fetch_into(Offer(os.getpid(), a.ctypes.data, a.nbytes), out[:, 1:3])
    >>> out
    array([[0., 0., 1., 0.],
           [0., 2., 3., 0.]])
    """
    if out.nbytes != (item.nbytes if isinstance(item, Offer) else np.asarray(item).nbytes):
        raise ValueError("fetch_into: the destination's size differs from the data's")
    if not out.nbytes:
        return
    runs = _runs(out) if isinstance(item, Offer) else None
    if runs is None:
        data = fetch([item])[0]
        out[...] = np.frombuffer(data, out.dtype).reshape(out.shape)
        return
    _pull(item.pid, item.pieces(), runs)


#: pieces of a strided destination shorter than this are not pulled one by one
_RUN_MIN = 4096


def _runs(a: np.ndarray) -> list[tuple[int, int]] | None:
    """``a``'s memory as contiguous runs in C order, or None if they would be short."""
    if a.flags.c_contiguous:
        return [(a.ctypes.data, a.nbytes)]
    return _pieces(a.ctypes.data, a.shape, a.strides, a.itemsize)


def _pieces(address: int, shape: tuple, strides: tuple,
            itemsize: int) -> list[tuple[int, int]] | None:
    """The memory of an array of that layout at ``address`` as contiguous runs in C
    order, or None if the runs would be shorter than _RUN_MIN (or go backwards).

    >>> _pieces(1000, (2, 3), (8192, 8), 8) is None  # runs of 24 bytes
    True
    >>> _pieces(1000, (2, 1024), (16384, 8), 8)
    [(1000, 8192), (17384, 8192)]
    """
    k, run = len(shape), itemsize
    while k and (shape[k - 1] == 1 or strides[k - 1] == run):  # the contiguous tail
        run *= shape[k - 1]
        k -= 1
    if run < _RUN_MIN or any(s < 0 for n, s in zip(shape[:k], strides[:k], strict=True)
                             if n > 1):
        return None
    offsets = np.zeros(1, dtype=np.intp)
    for n, stride in zip(shape[:k], strides[:k], strict=True):
        offsets = (offsets[:, None] + np.arange(n, dtype=np.intp) * stride).ravel()
    return [(address + int(o), run) for o in offsets]


def _pull(pid: int, remote: list, local: list) -> None:
    """cma.pull, by two or more threads when there is enough to copy; then the
    session's nonce, from the same address there, must be ours: else ``pid`` is
    no longer the maker (it died, and its pid went to another process: with
    SIGCHLD ignored, nothing keeps a dead child's pid), and what was read is
    not its data."""
    total = sum(n for _, n in local)
    parts = min(len(os.sched_getaffinity(0)), 4)
    if total < _PARALLEL_MIN or parts < 2:
        cma.pull(pid, remote, local)
    else:
        _pull_parallel(pid, remote, local, total, parts)
    theirs = bytearray(16)
    cma.pull(pid, [(_address(memoryview(_nonce)), 16)], [(_address(memoryview(theirs)), 16)])
    if theirs != _nonce:
        raise cma.MakerGone(pid, errno.ESRCH)


def _pull_parallel(pid: int, remote: list, local: list, total: int, parts: int) -> None:
    """cma.pull of ``parts`` equal shares, each by a thread (the call releases the GIL)."""
    rs, ls = _split(remote, parts, total), _split(local, parts, total)
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            cma.pull(pid, rs[k], ls[k])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(1, parts)]
    for t in threads:
        t.start()
    run(0)
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _split(pieces: list, parts: int, total: int) -> list[list]:
    """Cut a stream of pieces into ``parts`` streams of (nearly) equal bytes."""
    out: list[list] = [[] for _ in range(parts)]
    bounds = [total * (k + 1) // parts for k in range(parts)]
    k = done = 0
    for addr, n in pieces:
        while n:
            take = min(n, bounds[k] - done)
            if take:
                out[k].append((addr, take))
            addr, n, done = addr + take, n - take, done + take
            if done == bounds[k] and k < parts - 1:
                k += 1
    return out
