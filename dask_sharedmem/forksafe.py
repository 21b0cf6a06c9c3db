"""What fork skips, put right: a dask graph is audited before workers are forked.

Forked workers find the graph in their own memory, exactly as it is in the
parent.  Two things that give the right answer with dask's threads (and, by
pickling, with its ``processes`` scheduler and dask.distributed) would then
go silently wrong; :func:`prepare` rewrites the graph so that they do not:

1. **Objects that prepare for another process only when pickled.**  dask's
   disk shuffle (dask.dataframe's ``merge``, ``set_index``, ``shuffle``,
   ``sort_values`` without a distributed client) creates its partd store with
   ``maybe_buffered_partd``, which buffers in memory unless it was pickled:
   forked workers would each fill a private buffer that never reaches the
   files the others read.  Such objects are replaced by their own pickle
   round trip before the fork, so workers get what another process would;
   the partd store itself is made by the caller before the fork (its files
   are removed when the caller exits, as with threads).

2. **Writes to memory that is private to the parent.**  ``da.store`` (and
   through it ``to_hdf5``, ``to_zarr`` and xarray's ``to_netcdf``) writes
   each chunk into its target with ``dask.array.core.load_store_chunk``.  A
   worker writing into its copy-on-write copy of a numpy array, or through
   its inherited copy of an HDF5 or netCDF library's state, writes nothing
   the caller will see.  So the store function is swapped for
   :func:`_store_chunk`, which writes in place only where every process sees
   the write (a shared array, a ``numpy.memmap`` opened ``r+``/``w+``); for
   any other target the worker computes the chunk and hands it to the parent
   with the task's result, and the parent writes it into the real target
   under the store's own lock, before the task counts as done::

       parent                                   worker
       ------                                   ------
       prepare(): targets[i] = (out, lock)
                  load_store_chunk ->
                  partial(_store_chunk, i)
       fork ------------------------------------>  _store_chunk(i, x, out, ...)
                                                     out shared: out[index] = x
                                                     else: _WRITES.append((i, index, x))
       apply(targets, writes)  <-- "done" ------  take_writes()
         with lock: out[index] = x

   The chunk crosses in shared memory like any large result: one copy more
   than threads make, and the writes themselves run one at a time in the
   parent, which is also what the store's lock asks for.

A numpy target that existed before the fork is a copy-on-write page of the
workers' as long as they live: the parent writing 512 MB into it paid a
copy of every 4 KiB page (0.7-1.4 s on the development VM, against 0.15 s
into memory made after the fork).  So where no task reads it in a worker --
no task of the graph but the stores holds it, none of them returns what it
stored -- its pages are left out of the workers altogether
(``madvise(MADV_DONTFORK)`` on its page-aligned interior, see
:func:`unmapped`, undone after the session).  A task that reads it anyway
(through a closure, which no audit sees) dies by SIGSEGV, and the
scheduler's error says why.

A target that the graph computes (a ``Delayed`` target) does not exist in
the parent before the run.  If its task depends on nothing (dask's own test
``make_target(key)``: an ``np.empty`` it also records somewhere), the audit
runs that task here, once, before the fork, and puts its value in the graph
in its place, as it makes the partd store: every store task, and whatever
else refers to that key, sees the very object, the stores write it through
the parent as above, and the key's value is that object if it is wanted
(the scheduler takes such data as computed before it forks, as dask's
``start_state_from_dask`` takes a ``DataNode``).  One task found inside a
fused subgraph (one chunk: target, store and join in one task) is replaced
there.  A target computed from other tasks cannot be made before the fork;
a store into one that is not shared raises a clear error instead of writing
into a copy.  (A large one comes from its worker in shared memory, where the
stores write in place: the key's value is written, but what its task did
with it in its own memory, such as keeping it in a dict, stays there.)
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import pickle
import sys
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np
from dask._task_spec import Alias, DataNode, GraphNode, Task, TaskRef, _execute_subgraph

from . import memory

#: types whose objects are replaced by their pickle round trip before the fork
#: (module, qualified name): only the modules the graph can hold are imported
_PICKLE_FIRST = {("dask.dataframe.shuffle", "maybe_buffered_partd")}

#: writes a worker's store tasks left for the parent: (target id, index, value)
_WRITES: list[tuple[int, Any, Any]] = []


class _Stored:
    """What a store task with ``return_stored=True`` returns from a worker: the target."""

    __slots__ = ("ident",)

    def __init__(self, ident: int):
        self.ident = ident

    def __reduce__(self) -> tuple:
        return _Stored, (self.ident,)


class Prepared(NamedTuple):
    """What :func:`prepare` found: ``graph`` to fork with, the store ``targets``
    the parent writes for workers, the keys whose tasks hold objects replaced by
    their pickle, and the targets to leave out of the workers' memory."""

    graph: Mapping
    targets: list
    pickled: set
    unmapped: list


def prepare(dsk: Mapping) -> Prepared:
    """The graph to fork with, the store targets the parent writes for workers,
    and the keys whose tasks hold objects replaced by their pickle.

    The graph is copied only if something in it needs a change.  Targets are
    ``(target, lock)`` pairs, numbered as :func:`_store_chunk` names them.
    The keys say which results are unsafe in forked workers if the caller
    computed them before the fork from the graph as it was (a buffered partd
    store that tasks in the caller already wrote to).

    >>> import operator
    >>> dsk = {"x": Task("x", operator.add, 1, 2)}
    >>> prepare(dsk)[0] is dsk
    True
    """
    store = getattr(sys.modules.get("dask.array.core"), "load_store_chunk", None)
    pickled = tuple(t for t in (getattr(sys.modules.get(m), n, None) for m, n in _PICKLE_FIRST)
                    if isinstance(t, type))
    if store is None and not pickled:
        return Prepared(dsk, [], set(), [])
    audit = _Audit(dsk, store, pickled)
    changed = {}
    for key, node in dsk.items():
        audit.key = key
        new = audit.node(node, None)
        if new is not node:
            changed[key] = new
    for task, value in audit.made.values():  # stores' targets made here: data in their place
        if dsk.get(task.key) is task:
            changed[task.key] = DataNode(task.key, value)
    if not changed:
        return Prepared(dsk, [], set(), [])
    graph = {**dsk, **changed}
    return Prepared(graph, audit.targets, audit.pickled_keys,
                    _unread_targets(graph, audit.targets, audit.reading))


class _Audit:
    def __init__(self, dsk: Mapping, store: Any, pickled: tuple):
        self.dsk = dsk
        self.store = store
        self.pickled = pickled
        self.targets: list[tuple[Any, Any]] = []
        self.key: Any = None  # the key whose node is being audited
        self.pickled_keys: set = set()
        #: id(task) -> (task, its value): tasks run here for a store (see _resolve)
        self.made: dict[int, tuple[Task, Any]] = {}
        #: ids of the targets of stores that return what they stored (they read it)
        self.reading: set[int] = set()
        self.signature = inspect.signature(store) if store is not None else None

    def node(self, node: Any, scope: dict | None) -> Any:
        """``node`` with every hazard in it replaced (the same object if none).

        ``scope`` maps the keys of an enclosing subgraph to the nodes that give
        them their values, each with the scope it is read in (a subgraph's
        inputs are its caller's), so that a store's target can be found in the
        parent.
        """
        if isinstance(node, Task):
            func, args, kwargs = node.func, node.args, node.kwargs
            if func is _execute_subgraph:
                inner, _, inkeys, *deps = args
                inner_scope: dict = {k: (v, scope) for k, v in zip(inkeys, deps, strict=True)}
                inner_scope.update((k, (v, inner_scope)) for k, v in inner.items())
                new_inner = {k: self.node(v, inner_scope) for k, v in inner.items()}
                new_inner = {k: self.made_data(k, inner[k], v) for k, v in new_inner.items()}
                if any(new_inner[k] is not v for k, v in inner.items()):
                    args = (new_inner, *args[1:])
            else:
                new_args = tuple(self.node(a, scope) for a in args)
                if any(a is not b for a, b in zip(new_args, args, strict=True)):
                    args = new_args
            if kwargs:
                new_kwargs = {k: self.node(v, scope) for k, v in kwargs.items()}
                if any(new_kwargs[k] is not v for k, v in kwargs.items()):
                    kwargs = new_kwargs
            if func is self.store:
                func = self._store(node, scope)
            elif isinstance(func, self.pickled):
                func = self._value(func)
                if not args and not kwargs:
                    # a partd store made in a worker would be that worker's (its
                    # temporary directory is removed at its exit, which never
                    # comes): made here, it is the caller's, as with threads
                    return DataNode(node.key, func())
            if func is node.func and args is node.args and kwargs is node.kwargs:
                return node
            new = copy.copy(node)
            new.func, new.args, new.kwargs = func, args, kwargs
            new._token = new._repr = None
            return new
        if isinstance(node, DataNode):
            if isinstance(node.value, self.pickled):
                return DataNode(node.key, self._value(node.value))
            return node
        if isinstance(node, self.pickled):
            return self._value(node)
        return node

    def _value(self, obj: Any) -> Any:
        self.pickled_keys.add(self.key)
        return pickle.loads(pickle.dumps(obj))

    def _store(self, node: Task, scope: dict | None) -> functools.partial:
        """Register the target of a ``load_store_chunk`` task; the function that replaces it."""
        assert self.signature is not None
        bound = self.signature.bind(*node.args, **node.kwargs).arguments
        out = self._resolve(bound.get("out"), scope)
        lock = self._resolve(bound.get("lock"), scope)
        ident = None
        if out is not _UNKNOWN:
            ident = len(self.targets)
            self.targets.append((out, None if lock is _UNKNOWN else lock))
            if bound.get("return_stored") is not False:
                self.reading.add(id(out))
        return functools.partial(_store_chunk, ident)

    def _resolve(self, arg: Any, scope: dict | None, depth: int = 0) -> Any:
        """The value ``arg`` will have when the task runs, if the parent knows it now.

        A task of the graph that ``arg`` refers to is run here, once, if it
        depends on nothing (a ``Delayed`` target): then the parent knows its
        value, and so will the workers, forked after :func:`prepare` put the
        value in the graph in its place.
        """
        if depth > 100:
            return _UNKNOWN
        if isinstance(arg, DataNode):
            return arg.value
        if isinstance(arg, (TaskRef, Alias)):
            key = arg.target if isinstance(arg, Alias) else arg.key
            if scope is not None and key in scope:
                node, scope = scope[key]
            elif key in self.dsk:
                node, scope = self.dsk[key], None
            else:
                return _UNKNOWN
            if isinstance(node, Task) and not node.dependencies:
                if id(node) not in self.made:
                    self.made[id(node)] = (node, node())
                return self.made[id(node)][1]
            return self._resolve(node, scope, depth + 1)
        if isinstance(arg, GraphNode):  # computed while the graph runs
            return _UNKNOWN
        return arg

    def made_data(self, key: Any, node: Any, new: Any) -> Any:
        """A ``DataNode`` of the value if :meth:`_resolve` ran ``node`` here, else ``new``."""
        made = self.made.get(id(node))
        return DataNode(key, made[1]) if made is not None and made[0] is node else new


_UNKNOWN = object()

try:
    from numpy.lib.array_utils import byte_bounds as _byte_bounds
except ImportError:  # numpy < 2
    _byte_bounds = np.byte_bounds  # type: ignore[attr-defined]


def _in_place(out: Any) -> bool:
    """Whether a write into ``out`` in a worker is seen by every process."""
    if not isinstance(out, np.ndarray):
        return False
    if memory._segment_of(out) is not None:
        return True
    base: Any = out
    while base is not None:
        if isinstance(base, np.memmap):
            return base.mode in ("r+", "w+")
        base = getattr(base, "base", None)
    return False


def _store_chunk(ident: int | None, x: Any, out: Any, index: Any, region: Any, lock: Any,
                 return_stored: bool, load_stored: bool) -> Any:
    """``load_store_chunk`` in a worker: in place if shared, else through the parent."""
    from dask.array.core import fuse_slice, load_store_chunk

    if region:  # as load_store_chunk does, once for both ways below
        index = fuse_slice(region, index) if index else region
    if _in_place(out) or not memory._in_worker:
        if x is not None and getattr(x, "nbytes", 0) >= memory._POPULATE_MIN:
            _populate_target(out, index)
        return load_store_chunk(x, out, index, None, lock, return_stored, load_stored)
    if ident is None:
        raise RuntimeError(
            f"da.store into a {type(out).__module__}.{type(out).__qualname__} that the graph "
            "computes from other tasks: a worker process would write into its own copy, which "
            "nobody sees. Make the target before computing, or in a task that depends on "
            "nothing (it is then made and written by the calling process), or store into "
            "shared memory (dask_sharedmem.empty), or use scheduler='threads'.")
    if x is not None and x.size != 0:
        _WRITES.append((ident, index, x))
    if not return_stored:
        return None
    if not load_stored:
        return _Stored(ident)
    stored = np.array(out[index], copy=True)
    stored[...] = x
    return stored


def _populate_target(out: Any, index: Any) -> None:
    """Map the pages of ``out[index]`` before a store writes them (see memory._populate_range).

    The target's pages exist in the parent but not in this worker's page
    tables: mapped in one call they cost a quarter of a write fault each.
    """
    try:
        view = out[index] if index is not None else out
    except Exception:  # let the store itself raise, as it would
        return
    if not isinstance(view, np.ndarray) or memory._segment_of(view) is None:
        return  # a copy (fancy index), or not shared memory
    low, high = _byte_bounds(view)
    memory._populate_range(low, high - low)


def _unread_targets(graph: Mapping, targets: list, reading: set) -> list[np.ndarray]:
    """The numpy targets, written through the parent, that no task reads in a worker.

    Every array the graph holds (its data, its tasks' arguments, inside fused
    subgraphs too) is compared with them, but a store's ``out``: one that
    shares memory with a target, or a key of such data that a task reads
    other than as a store's ``out``, makes it read.
    """
    spans = {}
    for out, _ in targets:
        if (type(out) is np.ndarray and id(out) not in reading and not _in_place(out)
                and (out.flags.c_contiguous or out.flags.f_contiguous)
                and out.nbytes >= 2 * memory._PAGE):
            spans[id(out)] = (out, *_byte_bounds(out))
    if not spans:
        return []

    def overlapping(a: np.ndarray) -> set[int]:
        low, high = _byte_bounds(a)
        return {i for i, (_, lo, hi) in spans.items() if low < hi and lo < high}

    held: dict[Any, set[int]] = {}  # key of data that holds a target -> those targets
    read: set[int] = set()
    keys: set = set()
    for key, node in graph.items():
        if isinstance(node, DataNode):
            held[key] = {i for a in _arrays(node, keys) for i in overlapping(a)}
            continue
        for a in _arrays(node, keys):
            read |= overlapping(a)
    for key in keys & held.keys():
        read |= held[key]
    return [out for i, (out, _, _) in spans.items() if i not in read]


def _arrays(node: Any, keys: set, depth: int = 0) -> Iterator[np.ndarray]:
    """The numpy arrays ``node`` holds and may read (not as a store's ``out``); the
    keys it reads go into ``keys``."""
    if depth > 100:
        return
    if isinstance(node, np.ndarray):
        if node.nbytes:
            yield node
    elif isinstance(node, DataNode):
        yield from _arrays(node.value, keys, depth + 1)
    elif isinstance(node, (TaskRef, Alias)):
        keys.add(node.target if isinstance(node, Alias) else node.key)
    elif isinstance(node, Task):
        if node.func is _execute_subgraph:
            inner, _, inkeys, *deps = node.args
            for k, dep in zip(inkeys, deps, strict=True):
                if any(_reads_key(t, k) for t in inner.values()):
                    yield from _arrays(dep, keys, depth + 1)
            for t in inner.values():  # their references are to inner keys or inkeys
                yield from _arrays(t, set(), depth + 1)
            return
        args = list(node.args)
        if _is_store(node):
            args[1] = None  # the target itself: written, not read (return_stored is known)
        for a in (*args, *node.kwargs.values()):
            yield from _arrays(a, keys, depth + 1)
    elif isinstance(node, (list, tuple)):
        for a in node:
            yield from _arrays(a, keys, depth + 1)
    elif isinstance(node, dict):
        for a in node.values():
            yield from _arrays(a, keys, depth + 1)


def _is_store(node: Any) -> bool:
    return (isinstance(node, Task) and isinstance(node.func, functools.partial)
            and node.func.func is _store_chunk and len(node.args) > 1)


def _reads_key(task: Any, key: Any) -> bool:
    """Whether ``task`` uses ``key`` elsewhere than as a store's ``out``."""
    if not isinstance(task, Task) or key not in task.dependencies:
        return False
    if not _is_store(task):
        return True
    out = task.args[1]
    rest = [*task.args[:1], *task.args[2:], *task.kwargs.values()]
    return not (isinstance(out, TaskRef) and out.key == key) or any(
        isinstance(a, GraphNode) and key in a.dependencies for a in rest)


_MADV_DONTFORK = 10
_MADV_DOFORK = 11


@contextlib.contextmanager
def unmapped(arrays: list[np.ndarray]) -> Iterator[None]:
    """Meanwhile, processes forked here do not get the pages of ``arrays`` at all.

    The page-aligned interior of each (its partial first and last pages are
    shared with other memory) is advised ``MADV_DONTFORK``, and
    ``MADV_DOFORK`` afterwards.
    """
    spans = []
    for a in arrays:
        low, high = _byte_bounds(a)
        low = -(-low // memory._PAGE) * memory._PAGE
        high -= high % memory._PAGE
        if high > low and memory._libc.madvise(low, high - low, _MADV_DONTFORK) == 0:
            spans.append((low, high - low))
    try:
        yield
    finally:
        for low, length in spans:
            memory._libc.madvise(low, length, _MADV_DOFORK)


def take_writes() -> list:
    """The writes this worker's store tasks left for the parent since the last call."""
    writes = _WRITES[:]
    _WRITES.clear()
    return writes


def apply(targets: list, writes: list) -> None:
    """Write what workers computed into the parent's targets, each under its lock.

    A chunk that its worker holds (``channel.Held``) is pulled straight into
    a numpy target's region, where that region is a view (basic indexing).
    """
    from dask.array.core import load_store_chunk

    from .channel import Held

    for ident, index, x in writes:
        out, lock = targets[ident]
        if isinstance(x, Held):
            if isinstance(out, np.ndarray) and _basic(index):
                if lock:
                    lock.acquire()
                try:
                    if x.into(out[index]):
                        continue
                finally:
                    if lock:
                        lock.release()
            x = x.value()
        load_store_chunk(x, out, index, None, lock, False, False)


def _basic(index: Any) -> bool:
    """Whether ``out[index]`` is a view of ``out``: slices, integers, Ellipsis, None."""
    parts = index if isinstance(index, tuple) else (index,)
    return all(p is None or p is Ellipsis or isinstance(p, (slice, int, np.integer))
               for p in parts)


def resolve(targets: list, result: Any) -> Any:
    """A task's result as the parent must see it: a store's target, not its stand-in."""
    if isinstance(result, _Stored):
        return targets[result.ident][0]
    return result
