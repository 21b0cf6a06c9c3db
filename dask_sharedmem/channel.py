"""Parent <-> worker messages: framed pickles over a Unix socket, with shared
memory passed alongside as file descriptors.

One message on the wire::

    +-------------------+----------------------+-----------------------------+
    | header (16 bytes) | segment table        | pickle of the object        |
    | body len, n segs  | n x (token, size)    | (protocol 5, in band)       |
    +-------------------+----------------------+-----------------------------+
      SCM_RIGHTS: the n memfds of the segments ride on the header's bytes

Pickling is done by :class:`_Pickler`, which differs from ``pickle.dumps`` in
one way: numpy arrays that live in shared memory -- and plain numpy arrays of
at least ``threshold`` bytes, which it first copies into a fresh segment --
are written as *handles* (see ``memory.py``) and their segments' memfds are
attached to the message.  The receiver maps every attached segment it does
not know yet and registers it *before* unpickling, so every handle in the
body resolves to a view of shared memory: large data never crosses the
socket, only its file descriptor does.

A pickle larger than 64 KiB (large bytes, lists, dataframes: anything that
is not a numpy array) does not cross the socket either: it is written to a
memfd of its own, sent as one more row of the segment table (token all
zeros) with an empty body in the socket.  Every message in a socket is then
small, so a sender never blocks waiting for the other side to read -- which
could deadlock, since the parent and a worker may send to each other at once.

A class or function that pickle cannot find by its name (one defined inside
a function, a lambda) crosses *by identity*: a process forked after it was
made has it at the same address, so the receiver takes its own, as threads
would hand over the very object (see :func:`_reduce_by_identity`).  One
made after the fork (a class defined inside a task) is not there: it is
rebuilt from its cloudpickle, which travels beside, as dask's ``processes``
scheduler sends it.

Reading is incremental (:meth:`Channel.feed`), so the parent can multiplex
many workers with ``selectors`` and read each socket as it becomes readable;
workers use the blocking :meth:`Channel.recv`.  End of file raises
``EOFError``: that is how the parent learns, at once, that a worker died.
"""

from __future__ import annotations

import array
import contextlib
import copyreg
import errno
import gc
import io
import mmap
import operator
import os
import pickle
import socket
import struct
import sys
import types
import weakref
from collections import deque
from collections.abc import Iterator
from typing import Any

import cloudpickle
import numpy as np

from . import memory

_HEADER = struct.Struct("=QQ")  # body length, number of segments
_SEGMENT = struct.Struct("=24sQ")  # token, size
_RECV_SIZE = 1 << 18
_MAX_FDS_PER_READ = 253  # SCM_MAX_FD on Linux

#: numpy arrays at least this large travel in shared memory, not in the pickle
DEFAULT_THRESHOLD = 64 * 1024

#: message bodies larger than this travel in a memfd of their own, not in the socket
_INLINE_MAX = 64 * 1024
_SPILLED = b"\0" * 24  # its token in the segment table (real tokens are hex digits)


#: at most this many descriptors (and a quarter of the limit on open files) ride
#: on one message; further segments in it travel by value, so a receiver never
#: holds more than this many unmapped ones
_MAX_FDS_PER_MESSAGE = 1024

#: plain arrays smaller than this that travel in the same message are copied
#: into one shared segment (a *pack*) rather than one segment each
_PACK_ITEM_MAX = 1 << 20
#: ... as long as the pack stays this small (then the next pack begins)
_PACK_MAX = 4 << 20
_PACK_ALIGN = 64


class _Pickler(pickle.Pickler):
    """A pickler that sends shared (and large) numpy arrays as handles.

    A plain array of at least ``threshold`` bytes is copied into shared memory
    first.  Arrays under 1 MiB in one message share a segment (a *pack*): a
    batch of a thousand results costs one descriptor and one mapping, not a
    thousand; the pack's memory returns when the last of them is dropped.
    Pack offsets are given out while pickling and the pack is filled after.

    A segment the receiver already knows (``inherited``: it existed when the
    receiver was forked) goes as a bare handle.  A segment whose descriptor
    was closed (see ``memory._trim_fds``), or one past the message's share of
    descriptors, goes as a handle with its data beside it: the receiver maps
    the token if it knows it, else copies the data into a segment of its own.
    A plain array past that share travels in the pickle.
    """

    def __init__(self, file: io.BytesIO, threshold: int | None, inherited: int = 0):
        super().__init__(file, protocol=5)
        self.threshold = threshold
        self.inherited = inherited
        self.segments: list[memory._Segment] = []
        self.tokens: set[str] = set()
        self.packs: list[tuple[str, int, list]] = []  # (token, size, [(handle, array)])
        self.max_fds = max(1, min(_MAX_FDS_PER_MESSAGE, memory._fd_budget // 2))

    def reducer_override(self, obj: Any) -> Any:
        if not isinstance(obj, np.ndarray):
            return _reduce_by_identity(obj) if isinstance(obj, _BY_IDENTITY) else NotImplemented
        seg = memory._segment_of(obj)
        if seg is None:
            if (self.threshold is None or obj.nbytes < self.threshold
                    or obj.dtype.hasobject or type(obj) is not np.ndarray
                    or len(self.tokens) + len(self.packs) >= self.max_fds):
                return NotImplemented
            if obj.nbytes < _PACK_ITEM_MAX:
                return memory._rebuild, (self._pack(obj), None, np.ndarray)
            obj = memory.copy(obj)  # keeps a Fortran-ordered array's order
            seg = _segment(obj)
            cls = np.ndarray
        else:
            cls = type(obj) if isinstance(obj, memory.SharedArray) else np.ndarray
        # the receiver knows it: it forked after it was made, or (in a worker) it
        # is the parent's memory lent to this worker for its results (memory.py)
        if seg.serial <= self.inherited or seg.token in memory._lent_tokens:
            return memory._rebuild, (memory._handle(obj, seg), None, cls)
        if seg.token not in self.tokens:
            if seg.fd < 0 or len(self.tokens) + len(self.packs) >= self.max_fds:
                return memory._rebuild, (memory._handle(obj, seg), memory._pickle_data(obj), cls)
            self.tokens.add(seg.token)
            self.segments.append(seg)
        return memory._rebuild, (memory._handle(obj, seg), None, cls)

    def _pack(self, a: np.ndarray) -> tuple:
        """Give ``a`` a place in the current pack; return its handle there."""
        if not self.packs or self.packs[-1][1] + a.nbytes > _PACK_MAX:  # caller checked max_fds
            self.packs.append((os.urandom(12).hex(), 0, []))
        token, size, items = self.packs[-1]
        order = "F" if a.flags.f_contiguous and not a.flags.c_contiguous else "C"
        handle = (token, size, a.shape, _strides(a.shape, a.itemsize, order), a.dtype)
        items.append((handle, a))
        self.packs[-1] = (token, -(-(size + a.nbytes) // _PACK_ALIGN) * _PACK_ALIGN, items)
        return handle

    def fill_packs(self) -> None:
        """Make the packs handed out while pickling and copy their arrays in."""
        for token, size, items in self.packs:
            seg = memory._new_segment(size, token)
            memory._populate(np.asarray(seg))
            for handle, a in items:
                np.copyto(memory._rebuild(handle, None, np.ndarray), a)
            self.segments.append(seg)
        self.packs = []


#: what :func:`_reduce_by_identity` takes: the kinds of object pickle writes by name
_BY_IDENTITY = (type, types.FunctionType)
#: the classes that pickle writes by a rule of their own, not by name (``save_type``)
_NAMELESS = (type(None), type(NotImplemented), type(...))

#: (address, module, qualname) -> the class or function there, in this process: found
#: by :func:`_by_identity`, or sent by :func:`_reduce_by_identity` (then a round trip
#: in this process, as pool.py's check of an exception's pickle, never searches)
_known: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
#: (address, module, qualname) searched for here and not found.  An object that this
#: process makes later can be another process's only if that process forks from
#: this one afterwards, so the set is emptied at every fork
_missing: set[tuple[int, str | None, str]] = set()
_MISSING_MAX = 10_000
os.register_at_fork(before=_missing.clear)


def _reduce_by_identity(obj: Any) -> Any:
    """How a class or function that pickle cannot find by name crosses: by identity.

    Plain pickle writes a class or function as its module and qualified name,
    which fails for one defined inside a function (``f.<locals>.Local``), a
    lambda, or one defined again since (the name gives another object).
    Threads hand over the very object; so can a forked process, since every
    object the caller had at the fork is at the same address in the workers:
    the object is written as ``(address, module, qualname)`` and the receiver
    takes its own object there (:func:`_by_identity`), so that ``type(r) is
    Local`` holds in the caller as with threads.  An object made after the
    fork (a class defined inside a task) is in the sender only: its
    cloudpickle travels beside and rebuilds it, as dask's ``processes``
    scheduler would.  The sender cannot tell which case it is in, so it always
    pays for the cloudpickle (a quarter of a millisecond for a NamedTuple,
    once per message).  ``NotImplemented`` (plain pickle) for what pickle
    finds by name, or pickles by a rule of its own or a ``copyreg`` reducer.

    >>> square = lambda v: v * v
    >>> make, (address, module, qualname, by_value) = _reduce_by_identity(square)
    >>> make(address, module, qualname, by_value) is square  # found where it is
    True
    >>> copy = make(0, module, qualname, by_value)  # not there: rebuilt by value
    >>> copy is square, copy(3)
    (False, 9)
    >>> _reduce_by_identity(np.ndarray), _reduce_by_identity(type(None))
    (NotImplemented, NotImplemented)
    """
    module, qualname = getattr(obj, "__module__", None), obj.__qualname__
    found = sys.modules.get(module) if isinstance(module, str) else None
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if found is obj or any(obj is t for t in _NAMELESS) or type(obj) in copyreg.dispatch_table:
        return NotImplemented
    try:
        by_value: bytes | str = cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:  # fine if the receiver has it; it says so if not
        by_value = f"{type(e).__name__}: {e}"
    _known[id(obj), module, qualname] = obj
    return _by_identity, (id(obj), module, qualname, by_value)


def _by_identity(address: int, module: str | None, qualname: str, by_value: bytes | str) -> Any:
    """The class or function that :func:`_reduce_by_identity` wrote, in this process.

    It is this process's own object at ``address``, if it is a class or
    function of the same module and qualified name; else the one rebuilt from
    its cloudpickle ``by_value`` (a str: why the sender could not make one).
    Nothing but the garbage collector's list leads safely from an address to
    an object: searching it costs 25-90 ms per million objects, so it is done
    only for these objects, once per address: what was found is remembered
    while it lives, what was not until this process forks.

    The object found is the sender's unless this process let its own copy
    die and made another of the same name at the same address, or (for one
    the sender made after the fork) made one of the same name where the sender
    did: then it is this process's object of that name, as if defined again.
    Objects hidden from the collector by ``gc.freeze()`` are not found: they
    are rebuilt by value.
    """
    key = (address, module, qualname)
    obj = _known.get(key)
    if obj is None and key not in _missing:
        objects = gc.get_objects()
        with contextlib.suppress(ValueError):  # not there
            obj = objects[operator.indexOf(map(id, objects), address)]
        del objects
        if not (isinstance(obj, _BY_IDENTITY) and obj.__module__ == module
                and obj.__qualname__ == qualname):
            obj = None
            if len(_missing) >= _MISSING_MAX:
                _missing.clear()
            _missing.add(key)
        else:
            _known[key] = obj
    if obj is not None:
        return obj
    if isinstance(by_value, str):
        raise pickle.UnpicklingError(
            f"{module}.{qualname} is not in this process (the process that sent it made it "
            f"after the fork), and it could not be pickled by value there: {by_value}")
    return cloudpickle.loads(by_value)


def _strides(shape: tuple, itemsize: int, order: str) -> tuple:
    """The strides of a contiguous array of this shape in this order."""
    strides = []
    step = itemsize
    for n in (reversed(shape) if order == "C" else shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides)) if order == "C" else tuple(strides)


def _segment(shared: memory.SharedArray) -> memory._Segment:
    seg = memory._segment_of(shared)
    assert seg is not None  # memory.empty_like always makes one
    return seg


def dumps(obj: Any, threshold: int | None = DEFAULT_THRESHOLD,
          inherited: int = 0) -> tuple[bytes, list]:
    """Pickle ``obj`` for a channel; return the body and the segments it uses."""
    buf = io.BytesIO()
    p = _Pickler(buf, threshold, inherited)
    with _pinned():
        p.dump(obj)
        p.fill_packs()
    if memory._in_worker:  # to the parent, which may keep them: never reused here
        memory._given.update(s.token for s in p.segments)
    return buf.getvalue(), p.segments


@contextlib.contextmanager
def _pinned() -> Iterator[None]:
    """Keep every segment's descriptor open meanwhile (see memory._trim_fds)."""
    with memory._FDS_LOCK:
        memory._pinned += 1
    try:
        yield
    finally:
        with memory._FDS_LOCK:
            memory._pinned -= 1


class Channel:
    """One end of a parent<->worker socket (see the module docstring)."""

    def __init__(self, sock: socket.socket, threshold: int | None = DEFAULT_THRESHOLD):
        self.sock = sock
        self.threshold = threshold
        #: segments numbered up to this are known to the other end (it was
        #: forked after they were made): they cross without their descriptor
        self.inherited = 0
        self._buf = bytearray()
        self._fds: deque[int] = deque()

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()
        while self._fds:
            os.close(self._fds.popleft())

    # -- sending -----------------------------------------------------------
    def send(self, obj: Any) -> None:
        """Pickle ``obj`` and send it (raises what pickling raises, sends nothing then)."""
        with _pinned():
            body, segments = dumps(obj, self.threshold, self.inherited)
            self.send_bytes(body, segments)
        memory._trim_fds()  # what segments made while pinned left over the budget

    def send_bytes(self, body: bytes, segments: list) -> None:
        unique = list({s.token: s for s in segments}.values())
        rows = [_SEGMENT.pack(s.token.encode(), len(s)) for s in unique]
        fds = [s.fd for s in unique]
        if min(fds, default=0) < 0:
            raise ValueError("a segment's descriptor was closed between dumps() and send_bytes()")
        memory._recently_used(s.token for s in unique)  # the last to be closed
        spilled = None
        if len(body) > _INLINE_MAX:
            # a large body would block sendall until the other side reads it, and
            # the other side may be blocked sending to us (the parent sends a batch
            # with large inputs while the worker sends a large result): a deadlock.
            # In a memfd it costs one descriptor, and every message stays small
            spilled = _spill(body)
            rows.append(_SEGMENT.pack(_SPILLED, len(body)))
            fds.append(spilled)
            body = b""
        try:
            self._send_parts(_HEADER.pack(len(body), len(rows)), rows, fds, body)
        finally:
            if spilled is not None:
                os.close(spilled)

    def _send_parts(self, head: bytes, rows: list, fds: list, body: bytes) -> None:
        if not fds:
            self.sock.sendall(head + body)
            return
        # the kernel takes at most SCM_MAX_FD descriptors per sendmsg: each group
        # of descriptors rides on its own rows of the segment table
        for k in range(0, len(fds), _MAX_FDS_PER_READ):
            group = array.array("i", fds[k:k + _MAX_FDS_PER_READ])
            part = (head if k == 0 else b"") + b"".join(rows[k:k + _MAX_FDS_PER_READ])
            sent = self.sock.sendmsg([part], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, group)])
            if sent < len(part):
                self.sock.sendall(part[sent:])
        if body:  # a spilled message is complete: its reader may have left already
            self.sock.sendall(body)

    # -- receiving ---------------------------------------------------------
    def _read(self) -> None:
        data, anc, flags, _addr = self.sock.recvmsg(
            _RECV_SIZE, socket.CMSG_SPACE(_MAX_FDS_PER_READ * 4), socket.MSG_CMSG_CLOEXEC)
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                self._fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            # the kernel dropped descriptors it could not install: the segment
            # table would pair the next ones with the wrong segments (or none)
            raise OSError(errno.EMFILE, "shared memory sent to this process was lost: too "
                          "many open files. Raise the limit (ulimit -n) or keep fewer "
                          "shared arrays alive at once")
        if not data:
            raise EOFError("the other end of the channel closed")
        self._buf += data

    def _pop(self) -> tuple[bool, Any]:
        """Take one complete message off the buffer, if there is one."""
        if len(self._buf) < _HEADER.size:
            return False, None
        size, nseg = _HEADER.unpack_from(self._buf)
        start = _HEADER.size + nseg * _SEGMENT.size
        if len(self._buf) < start + size:
            return False, None
        segments = []
        spilled = None
        for k in range(nseg):
            token, length = _SEGMENT.unpack_from(self._buf, _HEADER.size + k * _SEGMENT.size)
            fd = self._fds.popleft()
            if token == _SPILLED:
                spilled = (fd, length)
            else:
                segments.append(memory._adopt_segment(fd, length, token.decode()))
        body: Any = bytes(self._buf[start:start + size])
        del self._buf[:start + size]
        if spilled is None:
            return True, _loads(body)  # ``segments`` keeps the mappings alive until here
        fd, length = spilled
        try:
            with mmap.mmap(fd, length, prot=mmap.PROT_READ) as body:
                return True, _loads(body)
        finally:
            os.close(fd)

    def feed(self) -> list:
        """Read what is available (one ``recv``) and return the complete messages."""
        self._read()
        out: list = []
        while True:
            ok, msg = self._pop()
            if not ok:
                return out
            out.append(msg)

    def recv(self) -> Any:
        """Block until one message has arrived and return it."""
        while True:
            ok, msg = self._pop()
            if ok:
                return msg
            self._read()


def _spill(body: bytes) -> int:
    """A memfd holding ``body``, for :meth:`Channel.send_bytes`."""
    fd = os.memfd_create("dask_sharedmem-message", os.MFD_CLOEXEC)
    try:
        view = memoryview(body)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        raise
    return fd


def _loads(body: Any) -> Any:
    try:
        return pickle.loads(body)
    except MemoryError:
        raise
    except Exception as e:
        # it pickled on the other side but does not rebuild here (a __reduce__
        # or __setstate__ that fails, a class this process cannot import):
        # raise one type that says so, whatever the reconstructor raised
        raise pickle.UnpicklingError(f"{type(e).__name__}: {e}") from e


def pair(threshold: int | None = DEFAULT_THRESHOLD) -> tuple[Channel, Channel]:
    """Two connected channels (parent end, worker end).

    >>> a, b = pair()
    >>> a.send({'x': 1}); b.recv()
    {'x': 1}
    >>> a.close(); b.close()
    """
    s1, s2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return Channel(s1, threshold), Channel(s2, threshold)
