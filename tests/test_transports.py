"""How a large buffer crosses between processes (dask_sharedmem/transports).

The cma room pulls with process_vm_readv: pieces split by the kernel's limits,
strided destinations, a maker that is gone or whose pid went to another
process; the shm room copies into new segments, small buffers packed; the
choice between them.
"""

from __future__ import annotations

import errno
import os

import dask
import numpy as np
import pytest

from dask_sharedmem import transports
from dask_sharedmem.transports import Offer, cma, shm

pytestmark = pytest.mark.timeout(60)

needs_cma = pytest.mark.skipif(not cma.available()[0], reason="process_vm_readv is refused here")


def offer(a):
    return Offer(os.getpid(), a.ctypes.data, a.nbytes)


@needs_cma
def test_pieces_are_split_by_the_kernels_limits(monkeypatch):
    """More than IOV_MAX pieces a side and more bytes than one call moves (made small)."""
    monkeypatch.setattr(cma, "_IOV_MAX", 5)
    monkeypatch.setattr(cma, "_MAX_BYTES", 1000)
    calls = []
    real = cma._call
    monkeypatch.setattr(cma, "_call", lambda pid, mine, theirs: calls.append(
        (len(mine), len(theirs))) or real(pid, mine, theirs))
    src = np.arange(10_000, dtype=np.uint8)
    dst = np.zeros_like(src)
    remote = [(src.ctypes.data + k, min(7, src.nbytes - k)) for k in range(0, src.nbytes, 7)]
    local = [(dst.ctypes.data + k, min(3, dst.nbytes - k)) for k in range(0, dst.nbytes, 3)]
    cma.pull(os.getpid(), remote, local)
    np.testing.assert_array_equal(dst, src)
    assert all(mine <= 5 and theirs <= 5 for mine, theirs in calls) and len(calls) >= 10


@needs_cma
@pytest.mark.parametrize("slot", ["row", "block", "fortran", "thin columns"])
def test_fetch_into_any_slot_of_a_joined_array(slot):
    out = np.zeros((64, 256))
    view = {"row": lambda: out[3], "block": lambda: out[8:40, 16:200],
            "fortran": lambda: out[8:40, 16:200].T, "thin columns": lambda: out[:, 5:7]}[slot]()
    data = np.arange(view.size, dtype="f8").reshape(view.shape)
    transports.fetch_into(offer(data), view)
    np.testing.assert_array_equal(view, data)
    assert out.sum() == data.sum()  # nothing outside the slot was written


@needs_cma
def test_a_large_fetch_is_split_over_threads_and_is_exact(monkeypatch):
    monkeypatch.setattr(transports, "_PARALLEL_MIN", 1 << 16)
    parts = []
    real = transports._pull_parallel
    monkeypatch.setattr(transports, "_pull_parallel",
                        lambda *a: parts.append(a[-1]) or real(*a))
    src = [np.random.default_rng(k).random(10_000 + k) for k in range(5)]
    got = transports.fetch([offer(a) for a in src])
    for a, b in zip(src, got, strict=True):
        np.testing.assert_array_equal(b.view("f8"), a)
    assert parts and parts[0] >= 2


@needs_cma
def test_a_maker_that_is_gone_is_said_so():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    a = np.ones(1000)
    with pytest.raises(cma.MakerGone, match=f"the process {pid} that held the data is gone"):
        transports.fetch([Offer(pid, a.ctypes.data, a.nbytes)])


@needs_cma
def test_a_pid_that_went_to_another_process_is_no_maker():
    """A process of another session (another nonce) at the maker's pid: what it holds
    at that address is not the maker's data, whatever it is."""
    a = np.full(1000, 7.0)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.read(r, 1)
        os._exit(0)
    try:
        transports.new_session()  # the child has the old nonce
        with pytest.raises(cma.MakerGone):
            transports.fetch([Offer(pid, a.ctypes.data, a.nbytes)])
    finally:
        os.write(w, b"x")
        os.waitpid(pid, 0)
        os.close(r)
        os.close(w)


def test_shm_packs_small_buffers_and_gives_large_ones_a_segment_each():
    from dask_sharedmem import memory

    small = [memoryview(np.full(1000, k, np.uint8)) for k in range(3)]
    large = memoryview(np.full(shm.PACK_ITEM_MAX, 9, np.uint8))
    out = shm.copy(small) + shm.copy([large])
    tokens = [memory._segment_of(o).token for o in out]
    assert len(set(tokens[:3])) == 1 and tokens[3] != tokens[0]
    assert [int(o[0]) for o in out] == [0, 1, 2, 9]


def test_the_room_is_chosen_by_config_and_by_what_the_kernel_allows(monkeypatch):
    with dask.config.set({"sharedmem.transport": "shm"}):
        assert transports.choose() == "shm"
    with dask.config.set({"sharedmem.transport": "cma"}):
        assert transports.choose() == "cma"
    with dask.config.set({"sharedmem.transport": "carrier pigeon"}), \
            pytest.raises(ValueError, match="sharedmem.transport must be one of"):
        transports.choose()
    monkeypatch.setattr(cma, "_available", (False, "process_vm_readv is refused here (...)"))
    assert transports.choose() == "shm"
    assert transports.describe().startswith("shm: process_vm_readv is refused")


def test_the_probe_says_why_not(monkeypatch):
    def refused(pid, liov, riov):
        raise cma.CmaError(errno.EPERM, "refused")

    monkeypatch.setattr(cma, "_call", refused)
    ok, why = cma._probe()
    assert not ok and "refused" in why


@needs_cma
def test_workers_of_a_session_read_each_other():
    """A worker pulls another worker's result (a task's input), under the rule
    that lets the caller's descendants read a worker (cma.allow_family)."""
    import dask_sharedmem

    def make():
        return np.full(1 << 17, float(os.getpid()))

    def use(a, b):
        return (float(a[0]), float(b[0]), os.getpid())

    dsk = {"a": (make,), "b": (make,), "c": (use, "a", "b")}
    with dask.config.set({"sharedmem.inline": 0, "sharedmem.transport": "cma"}):
        a, b, here = dask_sharedmem.get(dsk, "c", num_workers=2)
    assert a != b and here in (a, b)  # one input was made by the other worker


@needs_cma
def test_a_slice_of_a_larger_array_is_pulled_where_its_rows_lie():
    """A strided result (dask's rechunk splits) is offered as it lies: the receiver
    pulls its rows, with no contiguous copy made in the maker first."""
    from dask_sharedmem import channel

    a = np.arange(64 * 8192.0).reshape(64, 8192)
    view = a[::2, 1024:5000]
    body, outbox = channel._dumps_value({"v": view, "w": a[:, ::3]}, "cma", 65536)
    strided = [i for i in outbox.items if i.layout is not None]
    assert len(strided) == 1 and strided[0].address == view.ctypes.data
    got = channel._fetched(body, outbox.items)
    np.testing.assert_array_equal(got["v"], view)  # rows of 8 KB: pulled as they lie
    np.testing.assert_array_equal(got["w"], a[:, ::3])  # 8-byte runs: a copy crossed
    assert got["v"].flags.c_contiguous
    slot = np.zeros((40, 3976))[4:36]
    transports.fetch_into(strided[0], slot)
    np.testing.assert_array_equal(slot, view)
    _, shm_box = channel._dumps_value(view, "shm", 65536)
    assert all(getattr(i, "layout", None) is None for i in shm_box.items)
