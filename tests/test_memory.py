"""Tests for dask_sharedmem.memory: shared arrays, fork, pickling, freeing.

Every sharing claim is checked with real processes: a forked child writes and
the parent reads (or the other way round, synchronised by a pipe), and an
"unrelated process" is a fresh ``sys.executable`` started by subprocess.
Parametrised cases are Python expressions, so a test id says what was run.
"""

import copy
import gc
import os
import pickle
import subprocess
import sys
import traceback
import warnings

import numpy as np
import pytest

import dask_sharedmem as sm
from dask_sharedmem import SharedArray, memory

pytestmark = pytest.mark.timeout(60)

MB = 2**20
STRUCT = np.dtype([("id", "i4"), ("pos", "f8", (3,)), ("name", "U5")])


def fork(fn):
    """Run ``fn()`` in a forked child that exits 0 if it returned, 1 if it raised."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(code)
    return pid


def wait(pid):
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def in_child(fn):
    return wait(fork(fn))


def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def nfds():
    return len(os.listdir("/proc/self/fd"))


def memfds():
    """How many fds of this process point at our memfd segments."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:dask_sharedmem")
        except OSError:  # the fd that listdir used, closed by now
            pass
    return n


def evaluate(expr, **names):
    return eval(expr, {"np": np, "STRUCT": STRUCT, **names})


def structured():
    s = sm.zeros(5, STRUCT)
    s["id"], s["pos"], s["name"] = range(5), np.arange(15.0).reshape(5, 3), list("abcde")
    return s


# Views are expressions on a base array named by their first letter.
BASES = {"a": lambda: sm.copy(np.arange(24.0).reshape(4, 6)), "s": structured,
         "f": lambda: sm.copy(np.asfortranarray(np.arange(12.0).reshape(3, 4)))}


def view_of(base, view):
    return evaluate(view, **{view[0]: base})


def marked(base, view):
    """A plain copy of ``base`` with ``view`` of it set to 7: what writing 7 through it gives."""
    expected = np.array(base)
    view_of(expected, view)[...] = 7
    return expected


CONSTRUCTORS = [
    "empty((3, 4), dtype='i4')", "empty(5)", "empty((3, 4), order='F')",
    "empty_like(np.ones((2, 3), 'f4'))", "empty_like(np.ones((2, 3), order='F'))",
    "zeros((2, 3), 'u2')", "zeros(4)", "zeros_like(np.arange(6).reshape(2, 3), dtype='f4')",
    "zeros_like([1, 2], shape=(2, 2))", "ones(3)", "ones((2, 3), 'i2', order='F')",
    "ones_like([[1.5, 2.0]])", "full(3, 7)", "full((2, 2), 7.5)", "full(2, True)",
    "full(2, 1 + 2j)", "full(2, 'ab')", "full((2, 3), 7, dtype='f4', order='F')",
    "full_like(np.arange(4), 9)", "full_like(np.ones((2, 3), order='F'), 2.5)",
    "copy(np.arange(6).reshape(2, 3))", "copy(np.asfortranarray(np.arange(6.0).reshape(2, 3)))",
    "copy(np.asfortranarray(np.arange(6.0).reshape(2, 3)), order='C')", "copy([[1, 2], [3, 4]])",
    "copy(np.array([(1, (1, 2, 3), 'a')], STRUCT))", "fromiter((i * i for i in range(5)), 'i8')",
    "fromiter(iter(range(10)), dtype=float, count=3)",
]


@pytest.mark.parametrize("expr", CONSTRUCTORS)
def test_constructor_matches_numpy(expr):
    """Each constructor gives a SharedArray with numpy's shape, dtype, order and values."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, want = evaluate("m." + expr, m=sm), evaluate("m." + expr, m=np)
    assert type(got) is SharedArray and isinstance(got, np.ndarray)
    assert (got.shape, got.dtype) == (want.shape, want.dtype)
    assert (got.flags.c_contiguous, got.flags.f_contiguous) == \
        (want.flags.c_contiguous, want.flags.f_contiguous)
    if not expr.startswith("empty"):  # numpy.empty's values are arbitrary
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("expr", CONSTRUCTORS)
def test_constructor_result_is_written_in_place_by_fork_child(expr):
    """A forked child's write into any constructor's result is seen by the parent."""
    a = evaluate("sm." + expr, sm=sm)
    n = np.arange(a.size).reshape(a.shape)
    expected = (n % 2 == 0 if a.dtype == bool else n + 40).astype(a.dtype)
    assert not np.array_equal(a, expected)
    assert in_child(lambda: a.__setitem__(..., expected)) == 0
    np.testing.assert_array_equal(a, expected)


def test_fork_children_write_parent_sees():
    """Children's writes (os._exit, reaped by waitpid) reach the parent; to a plain array not."""
    shared, plain = sm.zeros((4, 1000)), np.zeros((4, 1000))
    pids = [fork(lambda i=i: (shared[i].fill(i + 1), plain[i].fill(i + 1))) for i in range(4)]
    assert [wait(pid) for pid in pids] == [0] * 4
    np.testing.assert_array_equal(shared, np.repeat([[1.0], [2], [3], [4]], 1000, axis=1))
    assert not plain.any()  # the control: fork alone shares nothing (copy-on-write)


def test_child_reads_writes_made_by_parent_after_fork():
    """The child reads the parent's writes made after the fork (synchronised by a pipe)."""
    a = sm.zeros(1000)
    r, w = os.pipe()

    def child():
        os.close(w)
        assert os.read(r, 1) == b"x" and (a == 5).all()

    pid = fork(child)
    os.close(r)
    a[...] = 5
    os.write(w, b"x")
    os.close(w)
    assert wait(pid) == 0


OPS = ["x + 1", "1 - x", "x * x", "x / 2", "x ** 2", "-x", "abs(x)", "x > 3", "np.sqrt(x)",
       "np.add(x, x)", "np.maximum(x, 4)", "np.modf(x)", "x.sum()", "np.sum(x)", "x.mean()",
       "x.std()", "x.max()", "np.prod(x)", "np.any(x)", "x.argmax()", "np.add.reduce(x, None)",
       "np.cumsum(x)", "np.median(x)", "x[(0,) * x.ndim]", "x.sum(axis=0)", "x.min(axis=-1)",
       "x.var(axis=1)", "x @ x.T"]


@pytest.mark.parametrize("op, shape", [
    (op, shape) for op in OPS for shape in ["2d", "0d"]
    if shape == "2d" or not ("axis" in op or "@" in op)  # these need dimensions
])
def test_results_are_plain_numpy(op, shape):
    """Arithmetic, ufuncs and reductions give plain numpy arrays and scalars, warning-free."""
    plain = np.arange(12.0).reshape(3, 4) + 1 if shape == "2d" else np.array(2.5)
    shared = sm.copy(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, want = evaluate(op, x=shared), evaluate(op, x=plain)
    for g, w in zip(got, want) if isinstance(want, tuple) else [(got, want)]:
        assert type(g) is type(w) and isinstance(g, (np.ndarray, np.generic))
        assert not np.shares_memory(g, shared)
        np.testing.assert_array_equal(g, w)


def test_non_ufunc_results_are_plain():
    """numpy functions never give a SharedArray in private memory; views stay shared."""
    a = sm.ones((2, 2))
    for x in (np.dot(a, a), np.concatenate([a, a]), np.linalg.inv(a + np.eye(2))):
        assert type(x) is np.ndarray
    s = np.sort(a)  # sorts a.copy(), and SharedArray.copy is shared
    assert type(s) is np.ndarray or memory._segment_of(s) is not None
    for v in (np.transpose(a), np.reshape(a, 4), np.split(a, 2)[0]):
        assert type(v) is SharedArray and np.shares_memory(v, a)


def test_copy_method_gives_new_shared_memory():
    """a.copy(), copy.copy and copy.deepcopy give new shared arrays, not views."""
    a = sm.ones((2, 3))
    for c in (a.copy(), copy.copy(a), copy.deepcopy(a), a.T.copy(), a[:, ::-2].copy()):
        assert type(c) is SharedArray and not np.shares_memory(c, a)
        assert in_child(lambda: c.__setitem__(..., 5)) == 0
        assert (c == 5).all()
    assert (a == 1).all()


def test_out_keeps_array_shared():
    """np.add(a, 1, out=a) and a += 1 give ``a`` itself, still shared with children."""
    a = sm.zeros(6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.add(a, 1, out=a) is a
        b = a
        b += 1
        tail = np.multiply(a[3:], 10, out=a[3:])
    assert b is a and type(tail) is SharedArray and np.shares_memory(tail, a)
    assert in_child(lambda: a.__setitem__(0, -1)) == 0
    np.testing.assert_array_equal(a, [-1, 2, 2, 20, 20, 20])


def test_zero_size_and_0d():
    """Zero-size arrays work (reductions too); a 0-d array is shared with children."""
    for e in (sm.empty(0), sm.zeros((3, 0)), sm.ones_like(np.empty((0, 2))), sm.copy([])):
        assert type(e) is SharedArray and e.size == 0
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert type(e.sum()) is np.float64 and e.sum() == 0 and type(e + 1) is np.ndarray
    z = sm.zeros(())
    assert type(z) is SharedArray and z.shape == ()
    assert in_child(lambda: z.__setitem__((), 5)) == 0
    assert z[()] == 5 and type(z + 1) is np.float64


def test_structured_dtype():
    """Structured arrays (subarrays, strings, aligned) are shared field by field."""
    for dt in (STRUCT, np.dtype(STRUCT.descr, align=True)):
        a = sm.zeros(4, dt)

        def child():
            a["id"][2] = 7
            a[1] = (5, (1, 2, 3), "ab")
            a["pos"][3, 1] = 9

        assert in_child(child) == 0
        assert a["id"].tolist() == [0, 5, 7, 0] and a["name"].tolist() == ["", "ab", "", ""]
        assert a["pos"][1].tolist() == [1, 2, 3] and a["pos"][3, 1] == 9


VIEWS = ["a", "a[1:]", "a[::-1]", "a.T", "a[::2, 1::3]", "a.reshape(2, 2, 6)", "a[:, 5]",
         "a[None, ..., None]", "a[1, 2, ...]", "a.view(np.uint8)[3:60:7]"]


@pytest.mark.parametrize("view", VIEWS)
def test_views_are_shared(view):
    """A fork child writing through a view or slice is seen by the parent."""
    a = BASES["a"]()
    v = view_of(a, view)
    assert type(v) is SharedArray and np.shares_memory(v, a)
    expected = marked(a, view)
    assert in_child(lambda: v.__setitem__(..., 7)) == 0
    assert a.tobytes() == expected.tobytes()


PICKLED = VIEWS + ["a[2:2, ::-1]", "f[:, 1:]", "s['pos'][::-2]", "s[1:]"]
PROTOCOLS = [None, 2, 4, 5, "5-out-of-band"]


def dumps(x, protocol):
    """Pickle ``x``: (data, out-of-band buffers or None)."""
    if protocol == "5-out-of-band":
        buffers = []
        return pickle.dumps(x, protocol=5, buffer_callback=buffers.append), buffers
    return pickle.dumps(x, *[protocol] if protocol else []), None


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("view", PICKLED)
def test_pickle_in_process_is_a_view(view, protocol):
    """In-process unpickling gives a view of the same memory, for every view and protocol."""
    a = BASES[view[0]]()
    v = view_of(a, view)
    data, buffers = dumps(v, protocol)
    b = pickle.loads(data, buffers=buffers)
    assert type(b) is SharedArray and (b.shape, b.dtype) == (v.shape, v.dtype)
    if v.size:
        assert b.strides == v.strides and np.shares_memory(b, v)
        expected = marked(a, view)
        b[...] = 7
        assert a.tobytes() == expected.tobytes()


@pytest.mark.parametrize("protocol", [None, 2, 4, 5])
def test_fork_child_unpickles_parents_bytes(protocol):
    """A child unpickles bytes the parent dumped after the fork, and writes through them."""
    a = sm.zeros(10)
    r, w = os.pipe()

    def child():
        os.close(w)
        with os.fdopen(r, "rb") as f:
            pickle.loads(f.read())[...] = 3

    pid = fork(child)
    os.close(r)
    with os.fdopen(w, "wb") as f:
        f.write(dumps(a[::-2], protocol)[0])
    assert wait(pid) == 0
    assert a.tolist() == [0, 3] * 5


def test_handle_of_freed_segment_is_refused():
    """Once the segment is freed, a protocol-4 handle is refused; protocol 5 gives values."""
    a = sm.full(5, 2.0)
    old, new = pickle.dumps(a, protocol=4), pickle.dumps(a, protocol=5)
    del a
    gc.collect()
    with pytest.raises(pickle.UnpicklingError, match="protocol=5"):
        pickle.loads(old)
    b = pickle.loads(new)
    assert type(b) is SharedArray and b.tolist() == [2.0] * 5


UNRELATED = r"""
import pickle, sys
import numpy as np
data, buffers = pickle.loads(sys.stdin.buffer.read())
try:
    x = pickle.loads(data, buffers=buffers)
except pickle.UnpicklingError as e:
    print("UnpicklingError:", e)
    sys.exit(3)
x[...] = x  # writable
sys.stdout.buffer.write(pickle.dumps((type(x).__name__, np.array(x)), protocol=4))
"""


def unrelated(x, protocol):
    """Unpickle ``x`` in a fresh interpreter; return the CompletedProcess."""
    data, buffers = dumps(x, protocol)
    buffers = buffers and [b.raw().tobytes() for b in buffers]
    blob = pickle.dumps((data, buffers), protocol=4)
    return subprocess.run([sys.executable, "-c", UNRELATED], input=blob, capture_output=True)


@pytest.mark.parametrize("protocol", [5, "5-out-of-band"])
@pytest.mark.parametrize("view", PICKLED)
def test_unrelated_process_protocol5_gets_values(view, protocol):
    """Protocol 5 carries the data: an unrelated process gets the right values."""
    v = view_of(BASES[view[0]](), view)
    proc = unrelated(v, protocol)
    assert proc.returncode == 0, proc.stderr.decode()
    kind, values = pickle.loads(proc.stdout)
    assert kind == "SharedArray" and (values.shape, values.dtype) == (v.shape, v.dtype)
    assert values.tobytes() == np.array(v).tobytes()


@pytest.mark.parametrize("protocol", [None, 0, 2, 4])
@pytest.mark.parametrize("expr", ["sm.ones((3, 3)).T[::2]", "sm.full((), 2.5)"])
def test_unrelated_process_old_protocol_clear_error(expr, protocol):
    """Protocols < 5 carry only a handle: an unrelated process gets UnpicklingError."""
    proc = unrelated(evaluate(expr, sm=sm), protocol)
    out = proc.stdout.decode()
    assert proc.returncode == 3, proc.stderr.decode()
    assert out.startswith("UnpicklingError:") and "protocol=5" in out


def detached(x, protocol):
    """``dumps(x, protocol)`` with out-of-band buffers copied: they hold no array alive."""
    data, buffers = dumps(x, protocol)
    return data, buffers and [b.raw().tobytes() for b in buffers]


# Shared arrays of every kind of dtype, in every layout.
DTYPES = [
    "sm.copy(np.arange(10).astype('M8[s]'))", "sm.copy(np.arange(-5, 5).astype('m8[ms]'))",
    "sm.copy(np.array(['2024-02-29', 'NaT', '1970-01-01'], 'M8[D]'))",
    "sm.copy(np.arange(12).astype('M8[us]').reshape(3, 4))[:, ::-2]",
    "sm.copy(np.asfortranarray(np.arange(12).astype('m8[h]').reshape(3, 4)))",
    "sm.full((), np.datetime64('2024-02-29T12:00'))", "sm.empty((0, 3), 'M8[s]')",
    "sm.copy(np.array([(1, '2024-01-01'), (2, 'NaT')], [('i', 'i4'), ('t', 'M8[s]')]))",
    "sm.copy(np.array([(1, (1, 2, 3), 'abcde')] * 3, STRUCT))[::-2]",
    "sm.copy(np.array(['', 'ab', 'çé∂']))", "sm.copy(np.array([True, False, True]))",
    "sm.copy(np.arange(4) * (1 - 2j))", "sm.full((2, 3), 7.5)[:, 1:].T", "sm.empty(3, 'V0')",
]


@pytest.mark.parametrize("protocol", [5, "5-out-of-band"])
@pytest.mark.parametrize("expr", DTYPES)
def test_protocol5_carries_every_dtype_in_process(expr, protocol):
    """With protocol 5 every dtype pickles: a view while the segment lives, values after."""
    x = evaluate(expr, sm=sm)
    expected, token = np.array(x), memory._segment_of(x).token
    data, buffers = detached(x, protocol)
    b = pickle.loads(data, buffers=buffers)
    assert type(b) is SharedArray and (b.shape, b.dtype) == (x.shape, x.dtype)
    assert np.shares_memory(b, x) or not x.nbytes
    del x, b
    gc.collect()
    assert token not in memory._SEGMENTS
    b = pickle.loads(data, buffers=buffers)
    assert type(b) is SharedArray and (b.shape, b.dtype) == (expected.shape, expected.dtype)
    assert np.array(b).tobytes() == expected.tobytes()


@pytest.mark.parametrize("protocol", [5, "5-out-of-band"])
@pytest.mark.parametrize("expr", DTYPES)
def test_protocol5_carries_every_dtype_to_an_unrelated_process(expr, protocol):
    """With protocol 5 an unrelated process gets every dtype's values, shape and dtype."""
    x = evaluate(expr, sm=sm)
    proc = unrelated(x, protocol)
    assert proc.returncode == 0, proc.stderr.decode()
    kind, values = pickle.loads(proc.stdout)
    assert kind == "SharedArray" and (values.shape, values.dtype) == (x.shape, x.dtype)
    assert values.tobytes() == np.array(x).tobytes()


# Arrays of zero bytes, made new or as views of a live array ``a``.
ZERO_BYTES = ["sm.empty((5, 0))", "sm.zeros(0, 'M8[s]')", "sm.empty((0, 2), STRUCT)",
              "sm.empty((2, 0, 3), order='F')", "a[3:3]", "a[:, :0]", "a[::-1, 4:1]",
              "sm.empty(3, 'V0')"]
ALL_PROTOCOLS = [0, 1, 2, 3, 4, 5, "5-out-of-band"]


@pytest.mark.parametrize("protocol", ALL_PROTOCOLS)
@pytest.mark.parametrize("expr", ZERO_BYTES)
def test_zero_byte_array_unpickles_after_its_memory_is_gone(expr, protocol):
    """An array of zero bytes needs no memory: with its segment freed, it comes back new."""
    x = evaluate(expr, sm=sm, a=BASES["a"]())
    shape, dtype, token = x.shape, x.dtype, memory._segment_of(x).token
    data, buffers = detached(x, protocol)
    del x
    gc.collect()
    assert token not in memory._SEGMENTS
    b = pickle.loads(data, buffers=buffers)
    assert type(b) is SharedArray and (b.shape, b.dtype) == (shape, dtype)
    assert memory._segment_of(b) is not None  # shared, so it pickles again as a shared array
    c = pickle.loads(pickle.dumps(b, protocol=4))
    assert type(c) is SharedArray and (c.shape, c.dtype) == (shape, dtype)


@pytest.mark.parametrize("protocol", ALL_PROTOCOLS)
@pytest.mark.parametrize("expr", ZERO_BYTES)
def test_zero_byte_array_unpickles_in_a_child_forked_before_it_was_made(expr, protocol):
    """A child that never knew the array's segment unpickles it from the parent's bytes."""
    r, w = os.pipe()

    def child():
        os.close(w)
        with os.fdopen(r, "rb") as f:
            data, buffers, shape, dtype = pickle.load(f)
        b = pickle.loads(data, buffers=buffers)
        assert type(b) is SharedArray and (b.shape, b.dtype) == (shape, dtype)

    pid = fork(child)
    os.close(r)
    x = evaluate(expr, sm=sm, a=BASES["a"]())
    with os.fdopen(w, "wb") as f:
        pickle.dump((*detached(x, protocol), x.shape, x.dtype), f)
    assert wait(pid) == 0


@pytest.mark.parametrize("protocol", ALL_PROTOCOLS)
@pytest.mark.parametrize("expr", ZERO_BYTES)
def test_zero_byte_array_unpickles_in_an_unrelated_process(expr, protocol):
    """Even a handle alone (protocol < 5) is enough: there are no values to miss."""
    x = evaluate(expr, sm=sm, a=BASES["a"]())
    proc = unrelated(x, protocol)
    assert proc.returncode == 0, proc.stderr.decode()
    kind, values = pickle.loads(proc.stdout)
    assert kind == "SharedArray" and (values.shape, values.dtype) == (x.shape, x.dtype)


@pytest.mark.parametrize("protocol", ALL_PROTOCOLS)
@pytest.mark.parametrize("expr", ["sm.full((), 2.5)", "a[1, 2, ...]", "a[1:, ::-2]",
                                  "sm.full((), np.datetime64('2024-02-29'))"])
def test_array_with_bytes_needs_its_memory_or_its_data(expr, protocol):
    """Arrays that hold bytes, 0-d ones too, need their segment or their data.

    While the segment lives they unpickle as views of it; once it is freed,
    protocol 5 gives the values and older ones the error that says to use 5.
    """
    x = evaluate(expr, sm=sm, a=BASES["a"]())
    data, buffers = detached(x, protocol)
    b = pickle.loads(data, buffers=buffers)
    assert type(b) is SharedArray and np.shares_memory(b, x)
    expected, token = np.array(x), memory._segment_of(x).token
    del x, b
    gc.collect()
    assert token not in memory._SEGMENTS
    if protocol not in (5, "5-out-of-band"):
        with pytest.raises(pickle.UnpicklingError, match=r"pickle with protocol=5"):
            pickle.loads(data, buffers=buffers)
        return
    b = pickle.loads(data, buffers=buffers)
    assert type(b) is SharedArray and (b.shape, b.dtype) == (expected.shape, expected.dtype)
    assert np.array(b).tobytes() == expected.tobytes()


@pytest.mark.parametrize("expr, error", [
    ("empty(-1)", ValueError), ("zeros((2, -3))", ValueError), ("full(-1, 0)", ValueError),
    ("ones_like([1], shape=(-1,))", ValueError), ("empty(3, 'foo')", TypeError),
    ("zeros(3, dtype='foo')", TypeError), ("empty(2.5)", TypeError), ("ones((2, 3.0))", TypeError),
    ("empty(3, order='X')", ValueError), ("empty((2**40, 2**40))", ValueError),
    ("empty(2**62)", ValueError), ("empty(2**45)", MemoryError),
])
def test_bad_input_raises_numpys_error(expr, error):
    """Bad arguments raise the exception type numpy raises, and leak no fd."""
    with pytest.raises(error):
        evaluate("m." + expr, m=np)
    before = nfds()
    with pytest.raises(error):
        evaluate("m." + expr, m=sm)
    assert nfds() == before


@pytest.mark.parametrize("expr", [
    "empty(3, object)", "zeros(2, [('a', 'O')])", "full(3, None)",
    "copy(np.array([{}, []], dtype=object))", "fromiter([1], object)",
])
def test_object_dtype_refused_helpfully(expr):
    """Object dtypes are refused with a TypeError that says what to use instead."""
    with pytest.raises(TypeError, match=r"Python objects.*numpy\.empty"):
        evaluate("sm." + expr, sm=sm)


def test_order_fromiter_and_fortran_copy():
    """order='F' is F-contiguous; copy keeps a Fortran array's order and values."""
    src = np.asfortranarray(np.arange(12).reshape(3, 4))
    for f in (sm.empty((3, 4), order="F"), sm.full((3, 4), 2, order="F"), sm.copy(src)):
        assert f.flags.f_contiguous and not f.flags.c_contiguous
    assert (sm.copy(src) == src).all()
    assert sm.fromiter((x / 2 for x in range(4)), "f4").tolist() == [0, 0.5, 1, 1.5]


def test_view_keeps_memory_alive():
    """A view keeps the segment mapped after the original is gone; the last one frees it."""
    gc.collect()
    rss0, fds0 = rss(), memfds()
    a = sm.full(32 * MB, 3.0)  # 256 MB, every page touched
    v = a[-10:]
    del a
    gc.collect()
    assert memfds() > fds0 and rss() - rss0 > 200 * MB
    assert (v == 3.0).all() and np.shares_memory(pickle.loads(pickle.dumps(v)), v)
    assert in_child(lambda: v.__setitem__(..., 4.0)) == 0  # noqa: F821 (deleted below)
    assert (v == 4.0).all()
    del v
    assert memfds() == fds0 and rss() - rss0 < 50 * MB


@pytest.mark.timeout(300)
def test_memory_returned_to_os():
    """1 GiB allocated, partly touched and dropped 50 times: RSS and open fds stay flat.

    Every 16th page is touched (64 MiB a round): kept memory would add up to
    3 GiB, and touching all of it costs 2-3 s a round on VMs where the first
    touch of a page is slow.
    """
    gc.collect()
    rss0, fds0, peak = rss(), nfds(), 0
    for i in range(50):
        a = sm.empty(2**27)  # 1 GiB of float64
        a.view(np.uint8)[::16 * 4096] = 1
        v = pickle.loads(pickle.dumps(a[::-512]))  # a handle's view holds it too
        peak = max(peak, rss())
        del a, v  # no gc.collect(): reference counting alone must free it
        assert rss() - rss0 < 100 * MB, f"round {i}: RSS grew by {(rss() - rss0) / MB:.0f} MB"
        assert nfds() == fds0, f"round {i}: a leaked memfd would keep its GiB"
    rss1, fds1 = rss(), nfds()
    print(f"\nRSS before {rss0 / MB:.1f} MB, peak {peak / MB:.1f} MB, after 50 x 1 GiB "
          f"{rss1 / MB:.1f} MB ({(rss1 - rss0) / MB:+.1f} MB); open fds {fds0} -> {fds1}")
    assert peak - rss0 > 60 * MB  # the pages really were touched, so the check can fail
    assert fds1 == fds0


def test_populating_new_memory_is_skipped_where_the_kernel_refuses_it(monkeypatch):
    monkeypatch.setattr(memory, "_MADV_POPULATE_WRITE", 12345)  # an advice no kernel knows
    monkeypatch.setattr(memory, "_can_populate", True)
    a = sm.full(1 << 20, 3.0)  # 8 MB: populated first, if the kernel lets us
    assert memory._can_populate is False and a.sum() == 3.0 * (1 << 20)
    assert sm.copy(a)[-1] == 3.0


def resident_bytes(address):
    """Rss of the mapping that starts at ``address`` (from /proc/self/smaps)."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            if "-" in line.split()[0] and ":" not in line.split()[0]:
                inside = int(line.split("-")[0], 16) == address
            elif inside and line.startswith("Rss:"):
                return int(line.split()[1]) * 1024
    raise LookupError(hex(address))


def test_populating_maps_every_page_of_a_new_segment_without_writing():
    a = sm.empty(4 << 20, "u1")  # 4 MB, never touched
    seg = memory._segment_of(a)
    assert resident_bytes(seg.address) == 0
    memory._populate(a)
    if memory._can_populate:  # kernels before 5.14 refuse; then nothing to check
        assert resident_bytes(seg.address) == seg.size
    assert not a.any()  # still zeros


# -- memory handed out is never someone else's --------------------------------------
#
# Freed shared memory returns to the system; new arrays get new memory.  (A cache
# of freed memory once handed it out again: each test below failed with it.)

BIG = 4 * MB // 8  # float64 items in 4 MiB


def test_zeros_like_is_zero_after_a_freed_array_of_that_size():
    prev = sm.full(1 << 18, 7.0)
    del prev
    z = sm.zeros_like(np.empty(1 << 18))
    assert not z.any()
    assert not sm.zeros(1 << 18).any()


def test_empty_is_zero_filled_as_sharedmem_promised():
    """sharedmem 0.3.8's users accumulate into empty(): it was, and is, zero-filled."""
    old = sm.full(1 << 18, 7.0)
    del old
    hist = sm.empty(1 << 18)
    with sm.MapReduce(np=2) as pool:
        def work(i):
            hist[i::2] += 1

        pool.map(work, range(2))
    assert (hist == 1.0).all()


def test_a_pickled_handle_never_sees_new_memory():
    a = sm.full(BIG, 1.0)
    blob = pickle.dumps(a[10:20], protocol=4)
    del a
    b = sm.full(BIG, 2.0)
    with pytest.raises(pickle.UnpicklingError, match="refers to shared memory that does not"):
        pickle.loads(blob)
    assert (b == 2.0).all()


def _child_sees(start_child, expected):
    """Free an array that a child still views, allocate again, and ask the child what it sees.

    ``start_child(a, go)`` starts a process holding a view of ``a`` that waits
    on the pipe ``go`` and then returns ``a.sum()`` (how depends on the kind
    of child).  Memory handed out again would give it the new array's values.
    """
    a = sm.full(BIG, 1.0)
    r, w = os.pipe()
    finish = start_child(a, r)
    del a
    b = sm.full(BIG, 2.0)
    os.write(w, b"x")
    seen = finish()
    os.close(r)
    os.close(w)
    assert seen == expected * BIG
    assert (b == 2.0).all()


def test_memory_a_background_child_views_is_never_handed_out():
    def start(a, r):
        bg = sm.background(lambda: (os.read(r, 1), float(a.sum()))[1])
        return bg.wait

    _child_sees(start, 1.0)


def test_memory_a_users_fork_child_views_is_never_handed_out():
    def start(a, r):
        out_r, out_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.read(r, 1)
            os.write(out_w, str(float(a.sum())).encode())
            os._exit(0)

        def finish():
            value = float(os.read(out_r, 100))
            os.waitpid(pid, 0)
            os.close(out_r)
            os.close(out_w)
            return value
        return finish

    _child_sees(start, 1.0)


@pytest.mark.parametrize("engine", ["get", "map"])
def test_a_child_of_a_task_sees_its_own_data_after_other_computes(engine):
    """A task starts a process that reads its input a moment later (a helper that
    saves its chunk): the caller frees the input and computes more meanwhile."""
    parts = [sm.full(BIG, float(k)) for k in range(4)]
    pipes = [os.pipe() for _ in parts]
    results = [os.pipe() for _ in parts]

    def helper(k, chunk):
        pid = os.fork()
        if pid == 0:
            os.read(pipes[k][0], 1)
            os.write(results[k][1], str(float(chunk.sum())).encode())
            os._exit(0)
        return pid

    if engine == "get":
        dsk = {("h", k): (helper, k, parts[k]) for k in range(4)}
        pids = sm.get(dsk, list(dsk), num_workers=2)
        del dsk
    else:
        items = list(enumerate(parts))
        with sm.MapReduce(np=2) as pool:
            pids = pool.map(helper, items, star=True)
        del items
    del parts
    assert sm.get({"x": (abs, -1)}, "x") == 1  # a session starts: finished workers reaped
    others = [sm.full(BIG, 9.0) for _ in range(4)]  # would reuse the inputs' memory
    with sm.MapReduce(np=2) as pool:
        pool.map(lambda k: others[k].sum(), range(4))
    seen = []
    for k in range(4):
        os.write(pipes[k][1], b"x")
        seen.append(float(os.read(results[k][0], 100)))
        for fd in (*pipes[k], *results[k]):
            os.close(fd)
    assert seen == [k * BIG for k in range(4)]
    del pids


@pytest.mark.parametrize("engine", ["get", "map"])
def test_results_after_freeing_a_large_scratch_array(engine):
    """A work function frees a shared scratch array of 1 MiB or more, then returns
    several arrays of 64 KiB to 1 MiB (they once landed in the freed memory's
    pack, and the worker died)."""
    def work(k):
        scratch = sm.zeros(187_500)  # 1.5 MB: about the size of the results together
        scratch += k
        del scratch
        return [np.full(n, float(k)) for n in (8_192, 50_000, 120_000)]

    if engine == "get":
        out = sm.get({("w", k): (work, k) for k in range(3)}, [("w", k) for k in range(3)],
                     num_workers=2)
    else:
        with sm.MapReduce(np=2) as pool:
            out = pool.map(work, range(3))
    for k, arrays in enumerate(out):
        assert [a.shape for a in arrays] == [(8_192,), (50_000,), (120_000,)]
        assert all((a == k).all() for a in arrays)


def _vm_flags(address):
    """The VmFlags of this process's mapping that starts at ``address``."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            if "-" in line.split()[0] and not line.startswith("VmFlags"):
                start = int(line.split("-")[0], 16)
                inside = start == address
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise AssertionError(f"no mapping starts at {address:#x}")


@pytest.mark.parametrize("allowed", [True, False])
def test_large_segments_ask_for_huge_pages_where_the_kernel_allows(monkeypatch, allowed):
    monkeypatch.setattr(memory, "_huge", allowed)
    big = sm.empty(8 * MB, dtype="u1")
    small = sm.empty(MB, dtype="u1")
    assert memory._segment_of(big).fresh
    assert ("hg" in _vm_flags(memory._segment_of(big).address)) is allowed
    assert "hg" not in _vm_flags(memory._segment_of(small).address)
    big[...] = 7  # and it works as memory
    assert big.sum() == 7 * 8 * MB


def test_shmem_huge_pages_reads_the_kernels_policy():
    mode = memory.shmem_huge_pages()
    assert mode in ("always", "within_size", "advise", "force", "never", "deny", "unavailable")
    assert memory._huge == (mode in ("always", "within_size", "advise", "force"))
