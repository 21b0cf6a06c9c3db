"""Classes and functions that pickle cannot find by name cross by identity.

A class or function that pickle cannot find by its name (one defined inside
a function, a lambda) crosses *by identity*: a process forked after it was
made has it at the same address, so the receiver takes its own, as threads
would hand over the very object (see :func:`reduce`).  One
made after the fork (a class defined inside a task) is not there: it is
rebuilt from its cloudpickle, which travels beside, as dask's ``processes``
scheduler sends it.
"""

from __future__ import annotations

import contextlib
import copyreg
import gc
import operator
import os
import pickle
import sys
import types
import weakref
from typing import Any

import cloudpickle

#: what :func:`reduce` takes: the kinds of object pickle writes by name
KINDS = (type, types.FunctionType)
#: the classes that pickle writes by a rule of their own, not by name (``save_type``)
_NAMELESS = (type(None), type(NotImplemented), type(...))

#: (address, module, qualname) -> the class or function there, in this process: found
#: by :func:`rebuild`, or sent by :func:`reduce` (then a round trip
#: in this process, as pool.py's check of an exception's pickle, never searches)
_known: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
#: (address, module, qualname) searched for here and not found.  An object that this
#: process makes later can be another process's only if that process forks from
#: this one afterwards, so the set is emptied at every fork
_missing: set[tuple[int, str | None, str]] = set()
_MISSING_MAX = 10_000
os.register_at_fork(before=_missing.clear)


def reduce(obj: Any) -> Any:
    """How a class or function that pickle cannot find by name crosses: by identity.

    Plain pickle writes a class or function as its module and qualified name,
    which fails for one defined inside a function (``f.<locals>.Local``), a
    lambda, or one defined again since (the name gives another object).
    Threads hand over the very object; so can a forked process, since every
    object the caller had at the fork is at the same address in the workers:
    the object is written as ``(address, module, qualname)`` and the receiver
    takes its own object there (:func:`rebuild`), so that ``type(r) is
    Local`` holds in the caller as with threads.  An object made after the
    fork (a class defined inside a task) is in the sender only: its
    cloudpickle travels beside and rebuilds it, as dask's ``processes``
    scheduler would.  The sender cannot tell which case it is in, so it always
    pays for the cloudpickle (a quarter of a millisecond for a NamedTuple,
    once per message).  ``NotImplemented`` (plain pickle) for what pickle
    finds by name, or pickles by a rule of its own or a ``copyreg`` reducer.

    >>> square = lambda v: v * v
    >>> make, (address, module, qualname, by_value) = reduce(square)
    >>> make(address, module, qualname, by_value) is square  # found where it is
    True
    >>> copy = make(0, module, qualname, by_value)  # not there: rebuilt by value
    >>> copy is square, copy(3)
    (False, 9)
    >>> import numpy as np
    >>> reduce(np.ndarray), reduce(type(None))
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
    return rebuild, (id(obj), module, qualname, by_value)


def rebuild(address: int, module: str | None, qualname: str, by_value: bytes | str) -> Any:
    """The class or function that :func:`reduce` wrote, in this process.

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
        if not (isinstance(obj, KINDS) and obj.__module__ == module
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
