"""Bad input anywhere in the public API: a clear error that names the argument.

A table of calls with a wrong argument, each with the error it must raise
and a pattern its message must match (the argument's name, or what to do).
Every error must come before any worker is forked (``os.fork`` raises in
these tests).  Where the argument is one numpy also takes (shapes, dtypes,
orders), the error is the one numpy raises for the same input.

Graphs follow dask: missing keys raise ``KeyError`` (as ``dask.get`` does)
and cycles dask's own ``RuntimeError``; a tuple whose first element is not
callable is data, not a task, as in dask.
"""

import os

import dask
import numpy as np
import pytest
from dask.callbacks import Callback
from dask.diagnostics import ProgressBar
from dask.utils_test import inc

import dask_sharedmem as sharedmem
from dask_sharedmem import MapReduce, MapReduceByThread, background

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_leaks")]

DSK = {"x": 1, "y": (inc, "x")}


@pytest.fixture(autouse=True)
def no_fork(monkeypatch):
    def fork():
        raise AssertionError("forked before the bad argument was noticed")

    monkeypatch.setattr(os, "fork", fork)


def get(dsk=DSK, keys="y", **kwargs):
    kwargs.setdefault("num_workers", 2)
    return sharedmem.get(dsk, keys, **kwargs)


def with_config(call, **config):
    def run():
        with dask.config.set(**config):
            return call()
    return run


BAD = {
    # MapReduce and its relatives
    "MapReduce(np='2')": (lambda: MapReduce(np="2"), TypeError, "np must be an int"),
    "MapReduce(np=2.0)": (lambda: MapReduce(np=2.0), TypeError, "np must be an int"),
    "MapReduce(np=True)": (lambda: MapReduce(np=True), TypeError, "np must be an int"),
    "MapReduce(np=-1)": (lambda: MapReduce(np=-1), ValueError, "np must be >= 0"),
    "MapReduce(backend='mpi')": (lambda: MapReduce(backend="mpi"), ValueError,
                                 "backend must be 'process' or 'thread'"),
    "MapReduceByThread(np=-1)": (lambda: MapReduceByThread(np=-1), ValueError, "np must be"),
    "map(func=5)": (lambda: MapReduce(np=2).map(5, range(3)), TypeError, "func must be callable"),
    "map(func=None)": (lambda: MapReduce(np=2).map(None, range(3)), TypeError,
                       "func must be callable"),
    "map(reduce=3)": (lambda: MapReduce(np=2).map(abs, range(3), reduce=3), TypeError,
                      "reduce must be callable"),
    "map(sequence=5)": (lambda: MapReduce(np=2).map(abs, 5), TypeError,
                        "sequence must be a sequence or an iterable, not int"),
    "map(sequence=None)": (lambda: MapReduce(np=2).map(abs, None), TypeError,
                           "sequence must be"),
    "map(minlength='1')": (lambda: MapReduce(np=2).map(abs, range(3), minlength="1"),
                           TypeError, "minlength must be an int"),
    "background(5)": (lambda: background(5), TypeError, "function must be callable"),
    # get: workers
    "get(num_workers=0)": (lambda: get(num_workers=0), ValueError, "num_workers must be at least"),
    "get(num_workers=-1)": (lambda: get(num_workers=-1), ValueError, "num_workers"),
    "get(num_workers='2')": (lambda: get(num_workers="2"), TypeError, "num_workers must be"),
    "get(num_workers=2.0)": (lambda: get(num_workers=2.0), TypeError, "num_workers must be"),
    "get(num_workers=True)": (lambda: get(num_workers=True), TypeError, "num_workers must be"),
    "config num_workers='x'": (with_config(lambda: sharedmem.get(DSK, "y"), num_workers="x"),
                               TypeError, "num_workers must be"),
    "config sharedmem.num-workers=0": (
        with_config(lambda: sharedmem.get(DSK, "y"), **{"sharedmem.num-workers": 0}),
        ValueError, "num_workers must be at least 1"),
    "compute(num_workers=0)": (
        lambda: dask.delayed(inc)(1).compute(scheduler="sharedmem", num_workers=0),
        ValueError, "num_workers"),
    # get: the graph and the keys
    "get(dsk=[1, 2])": (lambda: get(dsk=[1, 2]), TypeError, "dsk must be a dask graph"),
    "get(dsk=None)": (lambda: get(dsk=None), TypeError, "dsk must be a dask graph"),
    "get(keys={})": (lambda: get(keys={}), TypeError, "keys must be a key"),
    "get(keys=[[{}]])": (lambda: get(keys=[["y", {}]]), TypeError, "keys must be a key"),
    "get(keys='nope')": (lambda: get(keys="nope"), KeyError, r"keys not in the graph: \['nope'\]"),
    "get(keys=[['y', 'nope']])": (lambda: get(keys=[["y", "nope"]]), KeyError,
                                  r"keys not in the graph: \['nope'\]"),
    "get(cycle)": (lambda: get({"a": (inc, "b"), "b": (inc, "a")}, "a"), RuntimeError,
                   "Cycle detected"),
    "get(self-cycle)": (lambda: get({"a": (inc, "a")}, "a"), RuntimeError, "Cycle detected"),
    "get(cycle beside the keys)": (lambda: get({**DSK, "a": (inc, "b"), "b": (inc, "a")}, "y"),
                                   RuntimeError, "Cycle detected"),
    # get: options
    "get(threshold='big')": (lambda: get(threshold="big"), TypeError, "threshold must be an int"),
    "get(threshold=1.5)": (lambda: get(threshold=1.5), TypeError, "threshold must be an int"),
    "get(threshold=-1)": (lambda: get(threshold=-1), ValueError, "threshold must be >= 0"),
    "config sharedmem.threshold='64k'": (
        with_config(lambda: get(), **{"sharedmem.threshold": "64k"}),
        TypeError, "threshold must be an int"),
    "get(cache=[])": (lambda: get(cache=[]), TypeError, "cache must be a dict"),
    "get(cache=5)": (lambda: get(cache=5), TypeError, "cache must be a dict"),
    "get(callbacks=5)": (lambda: get(callbacks=5), TypeError, "callbacks must be a list"),
    "get(callbacks=[5])": (lambda: get(callbacks=[5]), TypeError, "callbacks must be a list"),
    "get(callbacks=one 5-tuple)": (lambda: get(callbacks=(None, None, print, None, None)),
                                   TypeError, "callbacks must be a list"),
    # shared arrays: what numpy accepts but shared memory cannot hold
    "empty(dtype=object)": (lambda: sharedmem.empty(3, dtype=object), TypeError,
                            "dtype object holds Python objects.*Use numpy.empty"),
    "empty(dtype='O,i4')": (lambda: sharedmem.empty(3, dtype="O,i4"), TypeError, "plain dtype"),
    "copy(object array)": (lambda: sharedmem.copy(np.array([None, 1])), TypeError, "dtype"),
    "empty(order='A')": (lambda: sharedmem.empty(3, order="A"), ValueError,
                         "order must be one of 'C', 'F'"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input(case):
    call, kind, pattern = BAD[case]
    with pytest.raises(kind, match=pattern) as info:
        call()
    assert type(info.value) is kind, repr(info.value)


def test_cycle_is_dasks_own_error():
    dsk = {"a": (inc, "b"), "b": (inc, "a")}
    with pytest.raises(Exception) as theirs:
        dask.get(dsk, "a")
    with pytest.raises(type(theirs.value)):
        get(dsk, "a")


# -- what numpy rejects, rejected the same way -----------------------------------

NUMPY = {
    "negative dimension": ("empty", ((2, -1),), {}),
    "str shape": ("zeros", ("a",), {}),
    "float in shape": ("ones", ((2.5,),), {}),
    "None in shape": ("empty", ((2, None),), {}),
    "dict shape": ("zeros", ({1: 2},), {}),
    "unknown dtype": ("empty", (3,), {"dtype": "notadtype"}),
    "too big": ("zeros", (2**62,), {}),
    "too big in total": ("empty", ((2**31, 2**31, 4),), {}),
    "unknown order": ("ones", (3,), {"order": "X"}),
    "fill value of the wrong type": ("full", (3, "x"), {"dtype": int}),
    "like: negative shape": ("zeros_like", ([1, 2],), {"shape": -1}),
    "like: unknown order": ("full_like", ([1, 2], 1), {"order": "Q"}),
    "like: unknown dtype": ("empty_like", ([1, 2],), {"dtype": "notadtype"}),
    "fromiter: not iterable": ("fromiter", (5, int), {}),
    "fromiter: wrong items": ("fromiter", (["a", "b"], int), {}),
    "copy: ragged": ("copy", ([[1], [1, 2]],), {}),
}


@pytest.mark.parametrize("case", NUMPY)
def test_numpy_rejects_it_too(case):
    name, args, kwargs = NUMPY[case]
    with pytest.raises((TypeError, ValueError)) as theirs:
        getattr(np, name)(*args, **kwargs)
    with pytest.raises(type(theirs.value)) as ours:
        getattr(sharedmem, name)(*args, **kwargs)
    assert str(ours.value), "an error without a message"


# -- and what is fine ---------------------------------------------------------------

class Count(Callback):
    def __init__(self):
        super().__init__()
        self.n = 0

    def _posttask(self, *args):
        self.n += 1


def test_good_input_that_looks_odd(monkeypatch):
    """numpy integers count as ints; callbacks as Callback objects; an empty list."""
    monkeypatch.undo()  # these fork
    assert MapReduce(np=np.int64(2)).np == 2 and isinstance(MapReduce(np=np.int32(1)).np, int)
    assert get(num_workers=np.int64(2)) == 2
    assert get(threshold=np.int64(0)) == 2
    assert get(callbacks=[]) == 2
    count = Count()
    assert get(callbacks=count) == 2 and count.n == 1
    assert get(callbacks=[count, count._callback]) == 2 and count.n == 3
    with ProgressBar(out=open(os.devnull, "w")) as bar:  # noqa: SIM115
        assert get(callbacks=[bar]) == 2
    assert get({"t": (5, 1)}, "t") == (5, 1)  # not callable: data, as in dask
