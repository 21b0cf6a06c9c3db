"""Shared arrays: numpy arrays in anonymous shared memory.

Every shared array lives in a *segment*: an anonymous memory file
(``memfd_create``) mapped ``MAP_SHARED`` into this process.  A forked child
inherits the mapping, so parent and children read and write the same pages.

::

    empty((3, 4)) --> SharedArray --.base--> ... --> _Segment (libc mmap)
                                                      .token  random id
                                                      .fd     the memfd, or -1

Segments are found again by token in ``_SEGMENTS`` (a weak dictionary that a
forked child inherits).  That is what pickling uses:

* A shared array pickles as a *handle*: (token, offset, shape, strides,
  dtype).  Unpickled where the token is known -- this process or a forked
  child of the process that made it -- the handle becomes a view of the same
  memory, never a copy.
* With pickle protocol 5 the data also travels beside the handle (out of
  band if the pickler has a ``buffer_callback``, as dask.distributed does), so
  an unrelated process gets a private shared array holding the right values.
  The data travels as unsigned bytes, reinterpreted on arrival: pickle's
  buffers cannot carry every dtype (datetime64 and timedelta64 have no
  buffer format).
* With older protocols an unrelated process gets a clear error instead of a
  stale address.
* An array of zero bytes (``empty((5, 0))``, ``a[3:3]``) has no values to
  lose: where its segment is unknown -- another process, or the original is
  gone -- it unpickles as a new empty shared array, with any protocol.

When the last view of a segment is gone, a ``weakref.finalize`` unmaps it
and closes its memfd: the memory returns to the system once no process maps
it.  It is never handed out again while another process may still see it --
a worker, a process that a task forked, a child of the user's -- so ``zeros``
are zeros and ``empty`` is zero-filled, as fresh anonymous memory always is.
(A cache of freed segments once made results in shared memory cheaper; it
needed a rule for every process that might still map what it reused, and
got some wrong.  Large results no longer live in shared memory -- see
``transports`` -- so it went.)  The file descriptor is kept open while the
segment lives because ``channel.py`` passes it to other processes
(``SCM_RIGHTS``) so that a shared array made in one process can be mapped by
the others -- but only up to half the limit on open files: past that the
oldest descriptors are closed (the mappings stay), so tens of thousands of
live arrays never exhaust descriptors.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import math
import mmap
import operator
import os
import pickle
import resource
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "SharedArray",
    "copy",
    "empty",
    "empty_like",
    "fromiter",
    "full",
    "full_like",
    "ones",
    "ones_like",
    "zeros",
    "zeros_like",
]

#: set in pool workers (forksafe.py writes through the parent from there)
_in_worker = False

#: .on while the dask scheduler's parent reads results: the arrays in them are plain
#: numpy arrays (views of their shared memory) at any depth, as threads would give,
#: and pickle by value wherever the caller sends them (see :func:`plain_arrivals`)
_arrivals = threading.local()

#: token -> live segment of this process (inherited by forked children).
_SEGMENTS: weakref.WeakValueDictionary[str, _Segment] = weakref.WeakValueDictionary()

#: token -> the open memfd of a live segment, oldest (least recently sent) first.
#: A segment's mapping outlives its descriptor: when more than half the limit on
#: open files is held here, :func:`_trim_fds` closes the oldest ones (such a
#: segment then crosses a channel by value, see channel.py)
_FDS: OrderedDict[str, int] = OrderedDict()
#: guards _FDS and the closing of its descriptors (reentrant: a segment's
#: finalizer may run, through the garbage collector, while it is held)
_FDS_LOCK = threading.RLock()

#: how many descriptors _FDS may hold before _trim_fds closes some (half the limit)
_fd_budget = resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2

#: numbers segments in the order this process made or mapped them (a forked child
#: knows every segment its parent had when it forked: see channel.Channel.inherited)
_serial = 0

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long)
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.madvise.restype = ctypes.c_int
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_MAP_FAILED = ctypes.c_void_p(-1).value
_libc.mincore.restype = ctypes.c_int
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_MADV_POPULATE_READ = 22  # Linux 5.14
_MADV_POPULATE_WRITE = 23
_PAGE = mmap.PAGESIZE
#: segments at least this large that are about to be written whole are populated first
_POPULATE_MIN = 1 << 20
_can_populate = True
_MADV_HUGEPAGE = 14
#: segments at least this large are advised to use huge pages, where the kernel allows
_HUGE_MIN = 4 << 20


def shmem_huge_pages() -> str:
    """The kernel's policy for transparent huge pages of shared memory.

    The bracketed word of ``/sys/kernel/mm/transparent_hugepage/shmem_enabled``
    (it governs memfd segments): ``always``, ``within_size``, ``advise`` and
    ``force`` give large segments 2 MiB pages -- a worker maps one with a
    single fault where 4 KiB pages take 512 (0.06 against 0.3-2 us per 4 KiB
    on the development VM) -- ``never`` and ``deny`` do not (the usual
    default); ``unavailable`` without THP.  Segments of 4 MiB or more are
    advised (``MADV_HUGEPAGE``) in every process that maps them, which
    ``advise`` needs and the others ignore.  Reserved hugetlb pages are not
    used: a segment would die with SIGBUS, not MemoryError, once they run out.

    >>> shmem_huge_pages() in ("always", "within_size", "advise", "force", "never",
    ...                        "deny", "unavailable")
    True
    """
    try:
        with open("/sys/kernel/mm/transparent_hugepage/shmem_enabled") as f:
            text = f.read()
    except OSError:
        return "unavailable"
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else "unavailable"


_huge = shmem_huge_pages() in ("always", "within_size", "advise", "force")


class _Segment:
    """A shared mapping of one memfd; the root ``base`` of every shared array.

    It exposes its bytes through ``__array_interface__`` (``np.asarray(seg)``
    is a uint8 view).  The mapping is made with libc's ``mmap`` rather than
    Python's ``mmap.mmap``, which would keep a second descriptor (a ``dup``)
    for every segment; here a segment costs one descriptor at most, and none
    once :func:`_trim_fds` has closed it.
    """

    __slots__ = ("__array_interface__", "__weakref__", "address", "fresh", "serial", "size",
                 "token")

    def __init__(self, fd: int, size: int, token: str, fresh: bool = True):
        #: True while its pages have never been written (a new memfd reads as zeros)
        self.fresh = fresh
        address = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED,
                             fd, 0)
        if address in (None, _MAP_FAILED):
            err = ctypes.get_errno()
            raise OSError(err, f"mmap of {size} bytes of shared memory failed: "
                               f"{os.strerror(err)}")
        if _huge and size >= _HUGE_MIN:  # see shmem_huge_pages
            _libc.madvise(address, size, _MADV_HUGEPAGE)
        global _serial
        _serial += 1
        self.token = token
        self.address = address
        self.size = size
        self.serial = _serial
        self.__array_interface__ = {"data": (address, False), "shape": (size,),
                                    "typestr": "|u1", "version": 3}
        # not at exit: arrays still referenced then (module globals) must stay mapped
        weakref.finalize(self, _release, token, fd, address, size).atexit = False
        if fd >= 0:
            with _FDS_LOCK:
                _FDS[token] = fd
        _SEGMENTS[token] = self
        _trim_fds()

    def __len__(self) -> int:
        return self.size

    @property
    def fd(self) -> int:
        """The open memfd, or -1 if :func:`_trim_fds` has closed it."""
        return _FDS.get(self.token, -1)


_A = TypeVar("_A", bound=np.ndarray)


def _populate(a: _A) -> _A:
    """Map the pages of ``a``'s segment into this process at once, before writing all of it.

    One ``madvise`` maps every page in one system call instead of one page
    fault per 4 KiB page (see :func:`_populate_range`).  Kernels before 5.14
    refuse it; then the pages fault in as they are written.
    """
    seg = _segment_of(a)
    if seg is not None and seg.size >= _POPULATE_MIN:
        _populate_range(seg.address, seg.size, seg.fresh)
        seg.fresh = False
    return a


def _populate_range(address: int, length: int, fresh: bool | None = None) -> None:
    """Map the pages of ``[address, address + length)`` of a shared segment, to write them.

    Measured per 4 KiB page on the development VM: new pages cost 3.6 us with
    ``MADV_POPULATE_WRITE`` (4.4 us by write faults; 18 us with
    ``MADV_POPULATE_READ``, which maps the zero page first); pages that exist
    (a reused segment, a store target, in a forked worker) cost 1.0 us with
    ``MADV_POPULATE_READ`` (a read fault on a shared writable mapping maps the
    page writable), 2.2 us with ``POPULATE_WRITE`` and 4.5 us by write faults.
    ``fresh=None``: ask the kernel (``mincore``) whether the first page exists.
    """
    global _can_populate
    if not _can_populate or length <= 0:
        return
    start = address - address % _PAGE
    length += address - start
    if fresh is None:
        vec = ctypes.c_ubyte(0)
        fresh = _libc.mincore(start, _PAGE, ctypes.byref(vec)) != 0 or not vec.value & 1
    advice = _MADV_POPULATE_WRITE if fresh else _MADV_POPULATE_READ
    if _libc.madvise(start, length, advice) != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM):
            _can_populate = False
        elif err == errno.ENOMEM:  # the write would fail the same way: numpy's error
            raise MemoryError(f"Unable to allocate {length} bytes of shared memory")


def _release(token: str, fd: int, address: int, size: int) -> None:
    """The last view of a segment in this process is gone: unmap it, close its memfd."""
    with _FDS_LOCK:
        if _FDS.get(token) == fd:  # else _trim_fds closed it already
            del _FDS[token]
            os.close(fd)
    _libc.munmap(address, size)


#: while > 0, a channel is about to send descriptors: _trim_fds leaves them open
_pinned = 0


def _trim_fds() -> None:
    """Close the oldest segments' descriptors when more than half the limit is held.

    Runs when a segment is made or mapped, and after a channel has sent.
    The mappings stay; only sending such a segment to a process that does not
    know it costs a copy (channel.py).
    """
    global _fd_budget
    if len(_FDS) <= _fd_budget or _pinned:
        return
    _raise_fd_limit()
    _fd_budget = resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2
    with _FDS_LOCK:
        while len(_FDS) > _fd_budget:
            _token, fd = _FDS.popitem(last=False)
            os.close(fd)


def _recently_used(tokens: Iterable[str]) -> None:
    """Move these segments' descriptors to the end of the queue that _trim_fds closes from."""
    with _FDS_LOCK:
        for token in tokens:
            if token in _FDS:
                _FDS.move_to_end(token)


def _after_fork_in_child() -> None:
    global _pinned, _FDS_LOCK
    _pinned = 0  # another thread of the parent may have been sending
    _FDS_LOCK = threading.RLock()  # ... or holding the lock


os.register_at_fork(after_in_child=_after_fork_in_child)


def _new_segment(nbytes: int, token: str | None = None) -> _Segment:
    """A new segment of at least ``nbytes`` (>= 1) bytes; it reads as zeros."""
    size = max(int(nbytes), 1)  # mmap refuses length 0; zero-size arrays need a home too
    try:
        fd = os.memfd_create("dask_sharedmem", os.MFD_CLOEXEC)
    except OSError as e:
        if e.errno != errno.EMFILE:
            raise
        _raise_fd_limit()
        _trim_fds()
        fd = os.memfd_create("dask_sharedmem", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        return _Segment(fd, size, token or os.urandom(12).hex())
    except BaseException as e:
        os.close(fd)
        if isinstance(e, OSError) and e.errno == errno.ENOMEM:
            # numpy.empty raises MemoryError here; callers catch that, not OSError
            raise MemoryError(f"Unable to allocate {size} bytes of shared memory") from e
        raise


def _raise_fd_limit() -> bool:
    """Lift the soft limit on open files to the hard one; say if it rose.

    Thousands of live arrays need more descriptors than the usual soft limit
    of 1024.  Raising the soft limit up to the hard one needs no privilege.
    """
    global _fd_budget
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft >= hard:
        return False
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    _fd_budget = resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2
    return True


def _adopt_segment(fd: int, size: int, token: str) -> _Segment:
    """Map a segment received from another process (we now own ``fd``)."""
    seg = _SEGMENTS.get(token)
    if seg is not None:
        os.close(fd)
        return seg
    try:
        return _Segment(fd, size, token, fresh=False)
    except BaseException:
        os.close(fd)
        raise


def _segment_of(a: Any) -> _Segment | None:
    """The segment whose memory ``a`` (an array or buffer) views, or None."""
    base = a
    while base is not None:
        if isinstance(base, _Segment):
            return base
        if isinstance(base, memoryview):
            base = base.obj
        else:
            base = getattr(base, "base", None)
    return None


def _handle(a: np.ndarray, seg: _Segment) -> tuple:
    offset = a.__array_interface__["data"][0] - seg.address if a.size else 0
    return (seg.token, offset, a.shape, a.strides, a.dtype)


def _view(seg: _Segment, offset: int, shape: tuple, strides: tuple | None, dtype: np.dtype,
          cls: type | None = None) -> np.ndarray:
    if not math.prod(shape):
        offset, strides = 0, None
    return np.ndarray.__new__(cls or SharedArray, shape, dtype, buffer=np.asarray(seg),
                              offset=offset, strides=strides)


def _rebuild(handle: tuple, data: Any = None, cls: type | None = None) -> np.ndarray:
    """Unpickle a shared array: a view where the segment is known, else by value."""
    token, offset, shape, strides, dtype = handle
    seg = _SEGMENTS.get(token)
    if getattr(_arrivals, "plain", False):
        cls = np.ndarray
    if seg is not None:
        return _view(seg, offset, shape, strides, dtype, cls)
    nbytes = math.prod(shape) * dtype.itemsize
    if data is not None or not nbytes:
        out = _populate(empty(shape, dtype))
        if nbytes:  # the bytes of the C-ordered values (see _pickle_data)
            out.reshape(-1).view(np.uint8)[...] = np.frombuffer(data, np.uint8)
        return out if cls in (None, SharedArray) else out.view(cls)
    raise pickle.UnpicklingError(
        f"this shared array ({shape}, {dtype}) refers to shared memory that does "
        f"not exist in process {os.getpid()}: it was pickled as a handle "
        "(pickle protocol < 5) and can only be unpickled by the process that made "
        "it or its forked children. To send the data by value, pickle with "
        "protocol=5 (pickle.dumps(a, protocol=5)) or send numpy.array(a)."
    )


@contextlib.contextmanager
def plain_arrivals() -> Iterator[None]:
    """Meanwhile, shared arrays unpickled in this thread are plain ``numpy.ndarray`` views.

    >>> import pickle
    >>> a = zeros(3)
    >>> with plain_arrivals():
    ...     type(pickle.loads(pickle.dumps(a)))
    <class 'numpy.ndarray'>
    """
    outer = getattr(_arrivals, "plain", False)
    _arrivals.plain = True
    try:
        yield
    finally:
        _arrivals.plain = outer


def _pickle_data(a: np.ndarray) -> pickle.PickleBuffer:
    """The values of ``a`` in C order, as bytes: a buffer of any dtype can carry them.

    (``PickleBuffer`` of the array itself refuses datetime64 and timedelta64,
    which have no buffer format; :func:`_rebuild` reinterprets the bytes.)
    """
    data: Any = np.ascontiguousarray(a).reshape(-1).view(np.uint8)  # numpy's stubs vary
    return pickle.PickleBuffer(data)


_NUMPY_1 = np.lib.NumpyVersion(np.__version__) < "2.0.0"


class SharedArray(np.ndarray):
    """A numpy array in anonymous shared memory (see :func:`empty`).

    Forked processes read and write it in place.  Pickling it costs a handle,
    not a copy, inside the process that made it and its forked children.
    Results of arithmetic, ufuncs and reductions are ordinary numpy arrays and
    scalars: only the memory you allocate with this module is shared.

    Examples
    --------
    >>> import os, numpy as np, dask_sharedmem as sharedmem
    >>> a = sharedmem.zeros(3)
    >>> pid = os.fork()
    >>> if pid == 0:
    ...     a[1] = 42
    ...     os._exit(0)
    >>> _ = os.waitpid(pid, 0)
    >>> a
    SharedArray([ 0., 42.,  0.])
    >>> type(a + 1)
    <class 'numpy.ndarray'>
    """

    def __array_wrap__(self, obj, context=None, return_scalar=False):
        if _segment_of(obj) is not None:  # e.g. ``out=shared``: stay shared
            return obj.view(SharedArray) if type(obj) is not SharedArray else obj
        obj = obj.view(np.ndarray)
        # numpy 1.x has no return_scalar: it gives a plain array's 0-d results as scalars
        return obj[()] if return_scalar or (_NUMPY_1 and not obj.ndim) else obj

    def __array_function__(self, func, types, args, kwargs):
        # numpy functions other than ufuncs (dot, sort, ...) would give our
        # type to results in private memory: only views stay shared
        return _plain_unless_shared(super().__array_function__(func, types, args, kwargs))

    def copy(self, order: Any = "C") -> SharedArray:
        """A copy in new shared memory: a SharedArray is always shared.

        (``numpy.ndarray.copy`` would give our type over private memory;
        dask's ``from_array`` copies its input this way.)
        """
        return copy(self, order)

    def __copy__(self) -> SharedArray:
        return self.copy()

    def __deepcopy__(self, memo: Any = None) -> SharedArray:
        return self.copy()

    def __reduce_ex__(self, protocol):
        seg = _segment_of(self)
        if seg is None:  # a copy that numpy made with our type: plain data
            return np.asarray(self).__reduce_ex__(protocol)
        data = _pickle_data(self) if protocol >= 5 and self.nbytes else None
        return _rebuild, (_handle(self, seg), data)

    def __reduce__(self):
        return self.__reduce_ex__(pickle.DEFAULT_PROTOCOL)


def _plain_unless_shared(obj: Any) -> Any:
    if isinstance(obj, SharedArray):
        return obj if _segment_of(obj) is not None else obj.view(np.ndarray)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_plain_unless_shared(o) for o in obj)
    return obj


def _check_dtype(dtype: np.dtype) -> np.dtype:
    if dtype.hasobject:
        raise TypeError(
            f"dtype {dtype} holds Python objects, whose pointers mean nothing in "
            "another process; shared arrays need a plain dtype. Use numpy.empty "
            "for object arrays."
        )
    return dtype


def _order_of(prototype: np.ndarray, order: str) -> str:
    if order in ("K", "A"):
        return "F" if prototype.flags.f_contiguous and not prototype.flags.c_contiguous else "C"
    return order


def empty(shape: int | Iterable[int], dtype: Any = float, order: str = "C") -> SharedArray:
    """Return a new shared array of the given shape and type, without initialising it.

    Same signature as :func:`numpy.empty`.  The memory is shared with every
    process forked afterwards; it is in fact zero-filled, as fresh anonymous
    memory always is.

    Examples
    --------
    >>> import dask_sharedmem as sharedmem
    >>> a = sharedmem.empty((2, 3), dtype='i4')
    >>> a.shape, a.dtype
    ((2, 3), dtype('int32'))
    """
    dtype = _check_dtype(np.dtype(dtype))
    shape = _normalize_shape(shape)
    order = "C" if order is None else str(order).upper()  # numpy takes 'c', 'f' and None
    if order not in ("C", "F"):
        raise ValueError(f"order must be one of 'C', 'F' (numpy.empty's choices), not {order!r}")
    # exact integers: np.prod wraps around, and the limit is on bytes, not items
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > np.iinfo(np.intp).max:
        raise ValueError("array is too big; `arr.size * arr.dtype.itemsize` "
                         "is larger than the maximum possible size.")
    seg = _new_segment(nbytes)
    return np.ndarray.__new__(SharedArray, shape, dtype, buffer=np.asarray(seg),
                              order=order)  # type: ignore[arg-type]


def _normalize_shape(shape: Any) -> tuple[int, ...]:
    """Validate a shape the way numpy does, with numpy's error messages."""
    if np.ndim(shape) == 0:
        shape = (shape,)
    shape = tuple(operator.index(n) for n in shape)
    if any(n < 0 for n in shape):
        raise ValueError("negative dimensions are not allowed")
    return shape


def empty_like(prototype: Any, dtype: Any = None, order: str = "K",
               shape: int | Iterable[int] | None = None) -> SharedArray:
    """Return a new shared array with the shape and type of ``prototype``.

    Same signature as :func:`numpy.empty_like` (without ``subok``: the result
    is always a :class:`SharedArray`).  ``order='K'`` and ``'A'`` keep a
    Fortran-ordered prototype Fortran-ordered, otherwise C order is used.

    Examples
    --------
    >>> import numpy as np, dask_sharedmem as sharedmem
    >>> sharedmem.empty_like(np.ones((2, 2), dtype='f4')).dtype
    dtype('float32')
    """
    prototype = np.asanyarray(prototype)
    return empty(prototype.shape if shape is None else shape,
                 prototype.dtype if dtype is None else dtype,
                 _order_of(prototype, order))


def zeros(shape: int | Iterable[int], dtype: Any = float, order: str = "C") -> SharedArray:
    """Return a new shared array of zeros (same signature as :func:`numpy.zeros`).

    Examples
    --------
    >>> import dask_sharedmem as sharedmem
    >>> sharedmem.zeros(3)
    SharedArray([0., 0., 0.])
    """
    return empty(shape, dtype, order)  # new shared memory reads as zeros


def zeros_like(prototype: Any, dtype: Any = None, order: str = "K",
               shape: int | Iterable[int] | None = None) -> SharedArray:
    """Return a shared array of zeros like ``prototype`` (see :func:`numpy.zeros_like`).

    New shared memory reads as zeros: it is never memory freed earlier.

    Examples
    --------
    >>> import dask_sharedmem as sharedmem
    >>> sharedmem.zeros_like([1, 2])
    SharedArray([0, 0])
    """
    return empty_like(prototype, dtype, order, shape)


def full(shape: int | Iterable[int], fill_value: Any, dtype: Any = None,
         order: str = "C") -> SharedArray:
    """Return a new shared array filled with ``fill_value`` (see :func:`numpy.full`).

    As in numpy, the dtype defaults to that of ``fill_value`` (sharedmem 0.3.8
    always used float64).

    Examples
    --------
    >>> import dask_sharedmem as sharedmem
    >>> sharedmem.full(2, 7)
    SharedArray([7, 7])
    """
    if dtype is None:
        dtype = np.asarray(fill_value).dtype
    out = _populate(empty(shape, dtype, order))
    out[...] = fill_value
    return out


def full_like(prototype: Any, fill_value: Any, dtype: Any = None, order: str = "K",
              shape: int | Iterable[int] | None = None) -> SharedArray:
    """Return a shared array like ``prototype`` filled with ``fill_value``.

    Same signature as :func:`numpy.full_like`.

    Examples
    --------
    >>> import dask_sharedmem as sharedmem
    >>> sharedmem.full_like([1.0, 2.0], 3)
    SharedArray([3., 3.])
    """
    out = _populate(empty_like(prototype, dtype, order, shape))
    out[...] = fill_value
    return out


def ones(shape: int | Iterable[int], dtype: Any = float, order: str = "C") -> SharedArray:
    """Return a new shared array of ones (same signature as :func:`numpy.ones`).

    Examples
    --------
    >>> import dask_sharedmem as sharedmem
    >>> sharedmem.ones(2, dtype=int)
    SharedArray([1, 1])
    """
    return full(shape, 1, dtype if dtype is not None else float, order)


def ones_like(prototype: Any, dtype: Any = None, order: str = "K",
              shape: int | Iterable[int] | None = None) -> SharedArray:
    """Return a shared array of ones like ``prototype`` (see :func:`numpy.ones_like`).

    Examples
    --------
    >>> import dask_sharedmem as sharedmem
    >>> sharedmem.ones_like([[0, 0]])
    SharedArray([[1, 1]])
    """
    return full_like(prototype, 1, dtype, order, shape)


def copy(a: Any, order: str = "K") -> SharedArray:
    """Return a copy of ``a`` in shared memory (see :func:`numpy.copy`).

    Examples
    --------
    >>> import numpy as np, dask_sharedmem as sharedmem
    >>> b = sharedmem.copy(np.arange(3))
    >>> b
    SharedArray([0, 1, 2])
    """
    a = np.asanyarray(a)
    out = _populate(empty_like(a, order=order))
    out[...] = a
    return out


def fromiter(iter: Iterable, dtype: Any, count: int = -1) -> SharedArray:
    """Build a shared array from an iterable (see :func:`numpy.fromiter`).

    Examples
    --------
    >>> import dask_sharedmem as sharedmem
    >>> sharedmem.fromiter(range(3), dtype='i8')
    SharedArray([0, 1, 2])
    """
    return copy(np.fromiter(iter, dtype, count))
