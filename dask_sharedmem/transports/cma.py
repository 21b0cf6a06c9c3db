"""Cross Memory Attach: copy bytes straight out of another process's memory.

``process_vm_readv(2)`` (Linux 3.2+) copies from another process's address
space into ours in one pass, at memcpy speed: what Open MPI's smsc/cma
component and MPICH use for large messages inside one node.  A worker's
large result stays where numpy made it, in the worker's private memory (on
huge pages), and whoever needs it pulls it, into memory it allocates fresh
or straight into the place where the data ends up::

    maker (worker)                        receiver (parent, or another worker)
    --------------                        ------------------------------------
    result in private memory
    offer: (pid, address, nbytes) ---->   pull(pid, [(address, n)], [(dest, n)])
    keeps it alive ...                      one syscall per 1024 pieces, GIL released
    ... until the receiver says so  <----   "done with it"

Who may read whom is the kernel's ptrace rule (``PTRACE_MODE_ATTACH``): the
same user, a *dumpable* target, and Yama's ``ptrace_scope``: 0 lets any
process of the user read any other; 1 (Ubuntu's default) only its
descendants, or a process that declared it with ``prctl(PR_SET_PTRACER,
pid)`` -- which lets ``pid`` and all its descendants in.  So the caller may
read its workers (its children), and each worker declares the caller
(:func:`allow_family`) so that its siblings may read it too; nothing is
declared for any process outside the caller's family, and the caller's own
process is never changed.  Scope 2 needs ``CAP_SYS_PTRACE``, 3 forbids it;
a seccomp profile may refuse the call outright.  :func:`available` tells
which holds, once per process, without forking.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Sequence
from typing import Any

__all__ = ["CmaError", "MakerGone", "allow_family", "available", "pull"]

_libc = ctypes.CDLL(None, use_errno=True)


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_readv: Any
try:
    _readv = _libc.process_vm_readv
    _readv.argtypes = (ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong,
                       ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.c_ulong)
    _readv.restype = ctypes.c_ssize_t
except AttributeError:  # not Linux, or a libc without it
    _readv = None

#: pieces per call: the kernel refuses more than IOV_MAX on either side
_IOV_MAX = 1024
#: bytes per call: the kernel moves at most MAX_RW_COUNT (2 GiB - 4 KiB) at once
_MAX_BYTES = (1 << 31) - (1 << 12)
_PR_SET_PTRACER = 0x59616D61


class CmaError(OSError):
    """A pull the kernel refused for a reason other than the maker being gone."""


class MakerGone(CmaError):
    """The process that held the data has ended (or unmapped it) before it was pulled."""

    def __init__(self, pid: int, err: int):
        self.pid = pid
        super().__init__(err, f"the process {pid} that held the data is gone "
                              f"({os.strerror(err)}) before it was copied out")


def pull(pid: int, remote: Sequence[tuple[int, int]], local: Sequence[tuple[int, int]]) -> None:
    """Copy the ``remote`` pieces of process ``pid`` into the ``local`` ones of this process.

    Both are lists of ``(address, length)``, read and written in order as
    one stream of bytes (their totals must match).  Splits the work into
    calls of at most 1024 pieces and 2 GiB a side, and resumes after a
    partial copy.  The GIL is released during each call.

    Raises :class:`MakerGone` if the process has ended or the memory is no
    longer mapped there, :class:`CmaError` if the kernel refuses.

    >>> import numpy as np
    >>> src, dst = np.arange(5.0), np.zeros(5)
    >>> pull(os.getpid(), [(src.ctypes.data, src.nbytes)], [(dst.ctypes.data, dst.nbytes)])
    >>> dst
    array([0., 1., 2., 3., 4.])
    """
    total = sum(n for _, n in remote)
    if total != sum(n for _, n in local):
        raise ValueError("pull: the remote and local pieces differ in length")
    li = loff = ri = roff = 0  # the next piece on each side, and how far into it
    while total:
        liov = _window(local, li, loff, _MAX_BYTES)
        riov = _window(remote, ri, roff, sum(n for _, n in liov))
        done = _call(pid, liov, riov)
        if done == 0:
            raise MakerGone(pid, errno.EFAULT)
        total -= done
        li, loff = _advance(local, li, loff, done)
        ri, roff = _advance(remote, ri, roff, done)


def _window(pieces: Sequence[tuple[int, int]], k: int, off: int,
            budget: int) -> list[tuple[int, int]]:
    """At most ``_IOV_MAX`` pieces and ``budget`` bytes, from piece ``k``, ``off`` bytes in."""
    out: list[tuple[int, int]] = []
    while k < len(pieces) and len(out) < _IOV_MAX and budget:
        addr, n = pieces[k]
        take = min(n - off, budget)
        out.append((addr + off, take))
        budget -= take
        k, off = k + 1, 0
    return out


def _advance(pieces: Sequence[tuple[int, int]], k: int, off: int, n: int) -> tuple[int, int]:
    """Move the position (piece ``k``, ``off`` bytes in) ``n`` bytes on."""
    while n:
        left = pieces[k][1] - off
        if n < left:
            return k, off + n
        n -= left
        k, off = k + 1, 0
    return k, off


def _call(pid: int, liov: list, riov: list) -> int:
    if _readv is None:
        raise CmaError(errno.ENOSYS, "process_vm_readv is not available on this system")
    lv = (_Iovec * len(liov))(*liov)
    rv = (_Iovec * len(riov))(*riov)
    got = _readv(pid, lv, len(liov), rv, len(riov), 0)
    if got >= 0:
        return got
    err = ctypes.get_errno()
    if err in (errno.ESRCH, errno.EFAULT):
        raise MakerGone(pid, err)
    raise CmaError(err, f"process_vm_readv from process {pid} failed: {os.strerror(err)}; "
                        "set dask config sharedmem.transport to 'shm' to move large "
                        "arrays through shared memory instead")


def _ptrace_scope() -> int:
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0  # no Yama: the classic rule (same user, dumpable) applies


def _has_cap_sys_ptrace() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> 19 & 1)
    except (OSError, ValueError):
        pass
    return False


_available: tuple[bool, str] | None = None


def available() -> tuple[bool, str]:
    """Whether this process and its forked workers may pull from each other; and why not.

    Decided once per process (a forked worker inherits the answer), without
    forking: the call must exist and not be refused by seccomp (a pull from
    this process itself), the process must be dumpable (its children are
    too), and Yama's ``ptrace_scope`` must be 0 or 1 (2 with
    ``CAP_SYS_PTRACE``).

    >>> ok, why = available()
    >>> isinstance(ok, bool) and isinstance(why, str)
    True
    """
    global _available
    if _available is None:
        _available = _probe()
    return _available


def _probe() -> tuple[bool, str]:
    src = ctypes.create_string_buffer(b"dask_sharedmem", 16)
    dst = ctypes.create_string_buffer(16)
    try:
        pull(os.getpid(), [(ctypes.addressof(src), 16)], [(ctypes.addressof(dst), 16)])
    except OSError as e:
        return False, f"process_vm_readv is refused here ({os.strerror(e.errno or 0)})"
    if dst.raw != src.raw:
        return False, "process_vm_readv copied the wrong bytes"
    dumpable = _libc.prctl(3, 0, 0, 0, 0)  # PR_GET_DUMPABLE
    if dumpable != 1:
        return False, "this process is not dumpable (prctl PR_SET_DUMPABLE 0)"
    scope = _ptrace_scope()
    if scope >= 3 or (scope == 2 and not _has_cap_sys_ptrace()):
        return False, f"Yama's ptrace_scope is {scope} (/proc/sys/kernel/yama/ptrace_scope)"
    yama = (f"Yama ptrace_scope {scope}" if os.path.exists("/proc/sys/kernel/yama/ptrace_scope")
            else "no Yama")
    return True, f"process_vm_readv ({yama})"


def allow_family(caller: int) -> None:
    """In a worker: let ``caller`` and its other descendants (our siblings) read us.

    Needed under Yama's ``ptrace_scope`` 1, where a process may otherwise
    read only its own descendants; a no-op without Yama.  ``caller`` is the
    process that forked the workers: the declaration names it, never "any".
    """
    if _ptrace_scope() == 1:
        _libc.prctl(_PR_SET_PTRACER, caller, 0, 0, 0)
