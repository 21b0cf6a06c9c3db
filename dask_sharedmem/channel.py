"""Parent <-> worker messages: framed pickles over a Unix socket; large buffers
cross beside them (``transports``), never through the socket.

One message on the wire::

    +--------------------+----------------+--------+-----------+---------------+
    | header (32 bytes)  | segment table  | acks   | stand-ins | body          |
    | lengths and counts | n x (token,    | n x u64| (pickle)  | (pickle, pro- |
    |                    |  size)         |        |           | tocol 5)      |
    +--------------------+----------------+--------+-----------+---------------+
      SCM_RIGHTS: the memfds of the segment table ride on the header's bytes

The *body* is the object, pickled by :class:`_ValuePickler` with protocol 5:
every numpy array of at least ``threshold`` bytes (and every pickle buffer
that large: pandas and xarray objects carry their arrays that way) is taken
out of band and *offered* to the transport (``transports.Outbox``), which
gives a small stand-in: an ``Offer(pid, address, nbytes)`` that the receiver
pulls from the sender's memory (cma), or a view of a new shared segment
(shm).  Shared arrays are views of their segments: the segment itself is the
stand-in, so they cross as handles, never copied.  The *stand-ins* are
pickled by :class:`_HandlePickler`, which writes segments as handles
(``memory.py``) and attaches the memfds of those the receiver may not know.
The receiver maps the segments, fetches the offers (one ``process_vm_readv``
per sender for all of its pieces) and unpickles the body with the fetched
buffers: one copy of each large array, straight out of the maker's memory.

A sender keeps what it offered by cma alive until the receiver says it has
fetched it: each message's offers (and each :class:`Held` value's) get a
*keep* number, and the receiver returns the numbers it is done with as
*acks* on its next message (:meth:`Channel.flush` sends them alone).

:func:`hold` is the lazy form, for the dask scheduler: a worker's task result
is pickled at once, but its buffers stay with the worker, and the parent
keeps the :class:`Held` (body and stand-ins: a few hundred bytes) in its
cache.  Whoever needs the value fetches it then -- the parent only for what
the caller gets (straight into a joined array's slots, :meth:`Held.into`),
another worker for a task's input, the maker itself without a copy -- and
the maker drops it when the parent acks it.

A body larger than 64 KiB (large bytes, lists of many objects) does not
cross the socket either: it is written to a memfd of its own, one more row
of the segment table (token all zeros).  Every message in a socket is then
small, so a sender never blocks waiting for the other side to read -- which
could deadlock, since the parent and a worker may send to each other at once.

Reading is incremental (:meth:`Channel.feed`), so the parent can multiplex
many workers with ``selectors``; workers use the blocking
:meth:`Channel.recv`.  End of file raises ``EOFError``: that is how the
parent learns, at once, that a worker died.
"""

from __future__ import annotations

import array
import contextlib
import errno
import functools
import io
import itertools
import mmap
import os
import pickle
import socket
import struct
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from . import identity, memory, transports

_HEADER = struct.Struct("=QQQQ")  # stand-ins length, body length, segments, acks
_SEGMENT = struct.Struct("=24sQ")  # token, size
_ACK = struct.Struct("=Q")
_RECV_SIZE = 1 << 18
_MAX_FDS_PER_READ = 253  # SCM_MAX_FD on Linux

#: numpy arrays at least this large cross beside the message, not in it
DEFAULT_THRESHOLD = 64 * 1024

#: message bodies larger than this travel in a memfd of their own, not in the socket
_INLINE_MAX = 64 * 1024
_SPILLED = b"\0" * 24  # its token in the segment table (real tokens are hex digits)

#: at most this many descriptors (and a quarter of the limit on open files) ride
#: on one message; further segments in it travel by value, so a receiver never
#: holds more than this many unmapped ones
_MAX_FDS_PER_MESSAGE = 1024

#: keep number -> (the held value, what its stand-ins need alive), in the maker
_KEPT: dict[int, tuple[Any, list]] = {}
_numbers = itertools.count(1)


def _forget_kept() -> None:
    _KEPT.clear()  # a forked child's copies are its own: nobody will ack them


os.register_at_fork(after_in_child=_forget_kept)


def drop_kept() -> None:
    """Let go of everything this process kept for others (a worker about to exit)."""
    _KEPT.clear()


# -- pickling ------------------------------------------------------------------

class _ValuePickler(pickle.Pickler):
    """Pickles a value with its large buffers out of band, offered to ``outbox``.

    * a shared array: its whole segment (a uint8 view) is the buffer, offered
      as itself (it is its own stand-in), and the array rebuilds as a view;
    * a plain array of at least ``threshold`` bytes: numpy's own protocol-5
      buffer (after a contiguous copy, if it is not contiguous; as bytes,
      if its dtype has no buffer format: datetime64, timedelta64);
    * any other pickle buffer of at least ``threshold`` bytes (pandas,
      xarray), as it comes.
    """

    def __init__(self, file: io.BytesIO, outbox: transports.Outbox, threshold: int | None):
        # the callback must not refer to the pickler: a cycle would keep its memo,
        # and every value in it (held results, for one), alive until a collection
        segments: set[int] = set()
        super().__init__(file, protocol=5, buffer_callback=functools.partial(
            _buffer, outbox, threshold, segments))
        self.outbox = outbox
        self.threshold = threshold
        #: token -> a segment pickled here (once: pickle's memo writes it once,
        #: however many arrays view it)
        self.wholes: dict[str, _Whole] = {}
        #: ids of the segments' uint8 views (held by ``wholes``: no id is reused)
        self.segments = segments

    def reducer_override(self, obj: Any) -> Any:
        if not isinstance(obj, np.ndarray):
            return identity.reduce(obj) if isinstance(obj, identity.KINDS) else NotImplemented
        seg = memory._segment_of(obj)
        if seg is not None:
            if not obj.nbytes:
                return NotImplemented if type(obj) is np.ndarray else (
                    memory._rebuild, (memory._handle(obj, seg), None, type(obj)))
            whole = self.wholes.get(seg.token)
            if whole is None:
                view = np.asarray(seg)
                self.segments.add(id(view))
                whole = self.wholes[seg.token] = _Whole(view)
            offset = obj.__array_interface__["data"][0] - seg.address
            cls = type(obj) if isinstance(obj, memory.SharedArray) else np.ndarray
            return _view_of, (whole, offset, obj.shape, obj.strides, obj.dtype, cls)
        if (self.threshold is None or obj.nbytes < self.threshold or obj.dtype.hasobject
                or type(obj) is not np.ndarray):
            return NotImplemented
        if obj.dtype.kind in "mM":  # no buffer format: as bytes, retyped on arrival
            data = np.ascontiguousarray(obj).reshape(-1).view(np.uint8)
            return _retyped, (pickle.PickleBuffer(data), obj.dtype, obj.shape)  # type: ignore[arg-type]
        if not (obj.flags.c_contiguous or obj.flags.f_contiguous):
            # a slice of a larger array (dask's rechunk splits): its rows are pulled
            # where they lie; else (short runs, or shm) a contiguous copy crosses
            k = self.outbox.offer_strided(obj)
            if k is None:
                return np.ascontiguousarray(obj).__reduce_ex__(5)
            return _from_item, (_Slot(k), obj.shape, obj.dtype)
        return NotImplemented



def _buffer(outbox: transports.Outbox, threshold: int | None, segments: set[int],
            buf: pickle.PickleBuffer) -> bool:
    """The buffer_callback of :class:`_ValuePickler`: False takes ``buf`` out of band
    (a segment as itself, else offered), True keeps it in the pickle."""
    view = buf.raw()
    if id(view.obj) in segments:
        outbox.items.append(view.obj)
        return False
    if threshold is None or view.nbytes < threshold:
        return True
    outbox.offer(buf)
    return False


class _Slot:
    """Stands, in a pickle, for the stand-in ``k`` of the message: its fetched buffer."""

    __slots__ = ("k",)

    def __init__(self, k: int):
        self.k = k

    def __reduce__(self) -> tuple:
        return _fetched_item, (self.k,)


def _fetched_item(k: int) -> Any:
    return _loading.buffers[k]


def _from_item(buf: Any, shape: tuple, dtype: np.dtype) -> np.ndarray:
    """A strided array, pulled into new memory in C order."""
    return np.frombuffer(buf, np.uint8).view(dtype).reshape(shape)


#: .buffers: the fetched stand-ins of the value being unpickled in this thread
_loading = threading.local()


class _Whole:
    """A segment's bytes, as one object that pickle's memo writes once."""

    __slots__ = ("view",)

    def __init__(self, view: np.ndarray):
        self.view = view

    def __reduce__(self) -> tuple:
        view: Any = self.view  # numpy's stubs vary on the buffer protocol
        return _same, (pickle.PickleBuffer(view),)


def _same(x: Any) -> Any:
    return x


def _view_of(buf: Any, offset: int, shape: tuple, strides: tuple, dtype: np.dtype,
             cls: type) -> np.ndarray:
    """A shared array, rebuilt as a view of its segment (fetched: mapped here)."""
    if getattr(memory._arrivals, "plain", False):
        cls = np.ndarray
    return np.ndarray.__new__(cls, shape, dtype, buffer=np.asarray(buf), offset=offset,
                              strides=strides)


def _retyped(buf: Any, dtype: np.dtype, shape: tuple) -> np.ndarray:
    return np.frombuffer(buf, np.uint8).view(dtype).reshape(shape)


class _HandlePickler(pickle.Pickler):
    """Pickles stand-ins: shared segments as handles, their memfds attached.

    A segment the receiver already knows (``inherited``: it existed when the
    receiver was forked) goes as a bare handle.  A segment whose descriptor
    was closed (see ``memory._trim_fds``), or one past the message's share of
    descriptors, goes with its data (in band): the receiver maps the token
    if it knows it, else copies the data into a segment of its own.
    """

    def __init__(self, file: io.BytesIO, inherited: int = 0):
        super().__init__(file, protocol=5)
        self.inherited = inherited
        self.segments: dict[str, memory._Segment] = {}
        self.max_fds = max(1, min(_MAX_FDS_PER_MESSAGE, memory._fd_budget // 2))

    def reducer_override(self, obj: Any) -> Any:
        if not isinstance(obj, np.ndarray):
            return NotImplemented
        seg = memory._segment_of(obj)
        if seg is None:
            return NotImplemented
        handle = memory._handle(obj, seg)
        if seg.serial <= self.inherited or seg.token in self.segments:
            return memory._rebuild, (handle, None, np.ndarray)
        if seg.fd < 0 or len(self.segments) >= self.max_fds:
            return memory._rebuild, (handle, bytes(memory._pickle_data(obj)), np.ndarray)
        self.segments[seg.token] = seg
        return memory._rebuild, (handle, None, np.ndarray)


def _dumps_value(obj: Any, room: str, threshold: int | None) -> tuple[bytes, transports.Outbox]:
    outbox = transports.Outbox(room)
    buf = io.BytesIO()
    _ValuePickler(buf, outbox, threshold).dump(obj)
    outbox.close()
    return buf.getvalue(), outbox


def dumps(obj: Any, threshold: int | None = DEFAULT_THRESHOLD) -> bytes:
    """Pickle ``obj`` as a message body would be (large buffers described, not
    copied); raises what pickling raises.  For finding what cannot be sent."""
    return _dumps_value(obj, "cma", threshold)[0]


def _keep(obj: Any, outbox: transports.Outbox, reuse: bool = False) -> int:
    """Keep what ``outbox``'s stand-ins need until the receiver acks the number
    (``reuse``: and ``obj`` itself, for this process to use without a copy)."""
    if not (outbox.keep or (reuse and outbox.items)):
        return 0
    number = next(_numbers)
    _KEPT[number] = (obj, outbox.keep)
    return number


def _fetched(body: Any, items: list) -> Any:
    try:
        buffers = transports.fetch(items)
        outer, _loading.buffers = getattr(_loading, "buffers", None), buffers
        try:
            # out-of-band buffers are consumed in order; a strided offer is not one of
            # them (its _Slot names its stand-in): it is skipped here
            return pickle.loads(body, buffers=[b for b, i in zip(buffers, items, strict=True)
                                               if not _strided(i)])
        finally:
            _loading.buffers = outer
    except (MemoryError, transports.cma.CmaError):
        raise
    except Exception as e:
        # it pickled on the other side but does not rebuild here (a __reduce__
        # or __setstate__ that fails, a class this process cannot import):
        # raise one type that says so, whatever the reconstructor raised
        raise pickle.UnpicklingError(f"{type(e).__name__}: {e}") from e


def _strided(item: Any) -> bool:
    return isinstance(item, transports.Offer) and item.layout is not None


# -- held values ---------------------------------------------------------------

class Held:
    """A value whose large buffers stay with the process that made it until needed.

    ``pid`` made it; ``keep`` is its number there (0: nothing kept);
    ``body`` its pickle, ``items`` the stand-ins of its buffers; ``meta`` is
    ``(shape, dtype, order, direct)`` when the value is a plain numpy array,
    so that :meth:`into` can put it in place: ``direct`` when its one buffer
    holds its data in that order (a pull straight into the place).

    >>> h = hold([1, 2])
    >>> h.value()
    [1, 2]
    """

    __slots__ = ("__weakref__", "_value", "body", "items", "keep", "meta", "nbytes", "pid")

    def __init__(self, pid: int, keep: int, body: bytes, items: list, meta: tuple | None):
        self.pid, self.keep, self.body, self.items, self.meta = pid, keep, body, items, meta
        self.nbytes = len(body) + sum(getattr(i, "nbytes", 0) for i in items)
        self._value: Any = _UNSET

    def __reduce__(self) -> tuple:
        return Held, (self.pid, self.keep, self.body, self.items, self.meta)

    def __repr__(self) -> str:
        return f"<Held {self.nbytes} bytes of process {self.pid}, keep {self.keep}>"

    def value(self) -> Any:
        """The value: the maker's own object in the maker, else fetched and unpickled once."""
        if self._value is _UNSET:
            kept = _KEPT.get(self.keep) if self.pid == os.getpid() else None
            self._value = kept[0] if kept is not None else _fetched(self.body, self.items)
        return self._value

    def into(self, out: np.ndarray) -> bool:
        """Put a plain array's data straight into ``out``, if it fits as is; whether it did."""
        if self.meta is None:
            return False
        shape, dtype, order, direct = self.meta
        if out.shape != shape or out.dtype != dtype:
            return False
        kept = _KEPT.get(self.keep) if self.pid == os.getpid() else None
        if self._value is _UNSET and kept is None and direct:
            transports.fetch_into(self.items[0], out if order == "C" else out.T)
        else:  # here already, small, or a view of shared memory: one copy from it
            out[...] = self.value()
        return True


_UNSET = object()


def hold(obj: Any, room: str | None = None, threshold: int | None = DEFAULT_THRESHOLD) -> Held:
    """Pickle ``obj`` now, keep its large buffers here: a :class:`Held` to send instead.

    ``room``: the transport of the offers (default: this worker's, see
    ``transports.room``).
    """
    body, outbox = _dumps_value(obj, room or transports.room(True), threshold)
    meta = None
    if type(obj) is np.ndarray:
        # the one buffer holds the data in C order, but for an F-contiguous array
        # (numpy pickles it as it lies) of a dtype with a buffer format
        fortran = (obj.flags.f_contiguous and not obj.flags.c_contiguous
                   and obj.dtype.kind not in "mM")
        direct = len(outbox.items) == 1 and memory._segment_of(obj) is None
        meta = (obj.shape, obj.dtype, "F" if fortran else "C", direct)
    return Held(os.getpid(), _keep(obj, outbox, reuse=True), body, outbox.items, meta)


def on_drop(held: Held, acks: list) -> None:
    """When the last reference to ``held`` goes, put its keep number in ``acks``."""
    if held.keep:
        weakref.finalize(held, acks.append, held.keep)


# -- the channel ---------------------------------------------------------------

class Channel:
    """One end of a parent<->worker socket (see the module docstring)."""

    def __init__(self, sock: socket.socket, threshold: int | None = DEFAULT_THRESHOLD,
                 to_parent: bool = False):
        self.sock = sock
        self.threshold = threshold
        self.to_parent = to_parent
        #: segments numbered up to this are known to the other end (it was
        #: forked after they were made): they cross without their descriptor
        self.inherited = 0
        #: keep numbers of the other end that this end is done with (see flush)
        self.acks: list[int] = []
        #: what each message received carried: called with its keep number
        self.received: Callable[[int], None] = self.acks.append
        self._buf = bytearray()
        self._fds: deque[int] = deque()
        self._early: deque[Any] = deque()  # messages read by take_acks

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
            body, outbox = _dumps_value(obj, transports.room(self.to_parent), self.threshold)
            number = _keep(obj, outbox)
            try:
                self._send(body, (number, outbox.items) if outbox.items else None)
            except BaseException:
                _KEPT.pop(number, None)
                raise
        memory._trim_fds()  # what segments made while pinned left over the budget

    def flush(self) -> None:
        """Send the pending acks now, in a message of their own, if there are any."""
        if self.acks:
            self._send(b"", None)

    def _send(self, body: bytes, standins: tuple | None) -> None:
        head = b""
        segments: list[memory._Segment] = []
        if standins is not None:
            buf = io.BytesIO()
            p = _HandlePickler(buf, self.inherited)
            p.dump(standins)
            head = buf.getvalue()
            segments = list(p.segments.values())
        rows = [_SEGMENT.pack(s.token.encode(), len(s)) for s in segments]
        fds = [s.fd for s in segments]
        if min(fds, default=0) < 0:
            raise ValueError("a segment's descriptor was closed while the message was made")
        memory._recently_used(s.token for s in segments)  # the last to be closed
        acks, self.acks[:] = self.acks[:], []
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
            self._send_parts(_HEADER.pack(len(head), len(body), len(rows), len(acks)), rows,
                             fds, b"".join(_ACK.pack(a) for a in acks) + head + body)
        except BaseException:
            self.acks[:0] = acks
            raise
        finally:
            if spilled is not None:
                os.close(spilled)

    def _send_parts(self, head: bytes, rows: list, fds: list, rest: bytes) -> None:
        if not fds:
            self.sock.sendall(head + rest)
            return
        # the kernel takes at most SCM_MAX_FD descriptors per sendmsg: each group
        # of descriptors rides on its own rows of the segment table
        for k in range(0, len(fds), _MAX_FDS_PER_READ):
            group = array.array("i", fds[k:k + _MAX_FDS_PER_READ])
            part = (head if k == 0 else b"") + b"".join(rows[k:k + _MAX_FDS_PER_READ])
            sent = self.sock.sendmsg([part], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, group)])
            if sent < len(part):
                self.sock.sendall(part[sent:])
        if rest:  # a spilled message is complete: its reader may have left already
            self.sock.sendall(rest)

    # -- receiving ---------------------------------------------------------
    def _read(self, wait: bool = True) -> None:
        data, anc, flags, _addr = self.sock.recvmsg(
            _RECV_SIZE, socket.CMSG_SPACE(_MAX_FDS_PER_READ * 4),
            socket.MSG_CMSG_CLOEXEC | (0 if wait else socket.MSG_DONTWAIT))
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
        """Take one complete message off the buffer, if there is one.

        A message that only carries acks is consumed here: (True, _NOTHING).
        """
        if len(self._buf) < _HEADER.size:
            return False, None
        nhead, size, nseg, nack = _HEADER.unpack_from(self._buf)
        start = _HEADER.size + nseg * _SEGMENT.size
        end = start + nack * _ACK.size + nhead + size
        if len(self._buf) < end:
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
        for k in range(nack):
            _KEPT.pop(_ACK.unpack_from(self._buf, start + k * _ACK.size)[0], None)
        start += nack * _ACK.size
        head = bytes(self._buf[start:start + nhead])
        body: Any = bytes(self._buf[start + nhead:end])
        del self._buf[:end]
        try:
            if spilled is not None:
                fd, length = spilled
                with mmap.mmap(fd, length, prot=mmap.PROT_READ) as m:
                    body = bytes(m)
            elif not body:
                return True, _NOTHING
            if not head:
                return True, _fetched(body, [])  # ``segments`` keeps the mappings alive
            number, items = _fetched(head, [])
            msg = _fetched(body, items)
            if number:
                self.received(number)
            return True, msg
        finally:
            if spilled is not None:
                os.close(spilled[0])

    def feed(self) -> list:
        """Read what is available (one ``recv``) and return the complete messages."""
        self._read()
        out: list = []
        while True:
            ok, msg = self._pop()
            if not ok:
                return out
            if msg is not _NOTHING:
                out.append(msg)

    def take_acks(self) -> None:
        """Drop what the other end is done with, if its acks have arrived, without
        waiting (a worker between tasks: acks that wait for the next batch would
        keep results alive for the whole batch); messages read meanwhile wait
        for :meth:`recv`."""
        try:
            self._read(wait=False)
        except BlockingIOError:
            return
        while True:
            ok, msg = self._pop()
            if not ok:
                return
            if msg is not _NOTHING:
                self._early.append(msg)

    def recv(self) -> Any:
        """Block until one message has arrived and return it."""
        if self._early:
            return self._early.popleft()
        while True:
            ok, msg = self._pop()
            if ok and msg is not _NOTHING:
                return msg
            if not ok:
                self._read()


_NOTHING = object()


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


def _spill(body: bytes) -> int:
    """A memfd holding ``body``, for :meth:`Channel._send`."""
    fd = os.memfd_create("dask_sharedmem-message", os.MFD_CLOEXEC)
    try:
        view = memoryview(body)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        raise
    return fd


def pair(threshold: int | None = DEFAULT_THRESHOLD) -> tuple[Channel, Channel]:
    """Two connected channels (parent end, worker end).

    >>> a, b = pair()
    >>> a.send({'x': 1}); b.recv()
    {'x': 1}
    >>> a.close(); b.close()
    """
    s1, s2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return Channel(s1, threshold), Channel(s2, threshold, to_parent=True)
