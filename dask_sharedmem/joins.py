"""The join of a dask array's chunks, in the caller: each chunk pulled into its slot.

``x.compute()`` ends with one task, ``dask.array.core.finalize``, that joins
the chunks into the caller's array (``concatenate3``).  Threads copy twice:
each chunk as it is computed, then all of them into the joined array.  Here
the chunks stay in the workers that made them (``channel.Held``) and each is
pulled once, by ``process_vm_readv``, straight into its slot of the joined
array, which is new memory of this process (never a page the workers share
copy-on-write).  When the layout is known before the chunks arrive, each is
pulled as it arrives, while the workers compute the others::

    get(): dask's collection annotations        finish(): a chunk arrives
      layer "add-..." chunks ((30, 30, 10),)      Early.place(key, held)
      -> Early: chunk key -> (join key, slot)       out = np.empty(shape)  (once)
                                                    held.into(out[slot])   (one copy)
    run_here(join key): Early.result(key) or join(task, data)

The layout comes from the high-level graph that dask hands the scheduler:
each array layer carries its ``chunks`` and ``dtype`` (``collection_
annotations``).  A chunk whose shape or dtype differs from its slot's, or a
graph without annotations (a plain dict), leaves the join to the end, where
:func:`join` lays the chunks out as ``concatenate3`` does, from their shapes,
and pulls them into their slots by as many threads as CPUs.  Anything that
is not a plain numpy array runs ``finalize`` itself, on the values.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Mapping
from itertools import product
from types import SimpleNamespace
from typing import Any

import numpy as np
from dask._task_spec import GraphNode, Task
from dask.core import flatten

from .channel import Held

__all__ = ["Early", "join", "join_keys", "layouts"]


def join_keys(dsk: Mapping, wanted: set) -> set:
    """The wanted keys that join dask.array chunks into the caller's result.

    They run in the caller's process, where the joined array is made in
    private memory (huge pages), as with threads.
    """
    finalize = getattr(sys.modules.get("dask.array.core"), "finalize", None)
    if finalize is None:
        return set()
    return {k for k in wanted if isinstance(dsk.get(k), Task) and dsk[k].func is finalize}


def layouts(graph: Any, depth: int = 0) -> dict[str, tuple[tuple, np.dtype]]:
    """Array layer name -> (chunks, dtype), from the annotations of a dask graph
    (a HighLevelGraph, or an expression that holds one), for numpy chunks.

    >>> import dask.array as da
    >>> x = da.ones(10, chunks=4) + 1
    >>> layouts(x.__dask_graph__())[x.name]
    (((4, 4, 2),), dtype('float64'))
    """
    out: dict[str, tuple[tuple, np.dtype]] = {}
    layers = getattr(graph, "layers", None)
    if isinstance(layers, Mapping):
        for name, layer in layers.items():
            note = getattr(layer, "collection_annotations", None) or {}
            if (note.get("type") == "dask.array.core.Array"
                    and note.get("chunk_type") == "numpy.ndarray"
                    and "chunks" in note and "dtype" in note):
                out[name] = (tuple(map(tuple, note["chunks"])), np.dtype(note["dtype"]))
    elif depth < 8:  # an expression (dask >= 2025): its graph is among its operands
        for operand in getattr(graph, "operands", ()):
            if hasattr(operand, "layers") or hasattr(operand, "operands"):
                out.update(layouts(operand, depth + 1))
    return out


class Early:
    """Joins whose layout is known before their chunks arrive (see the module docstring).

    ``slots``: chunk key -> (join key, index of its slot in the joined array).
    """

    def __init__(self, dsk: Mapping, joins: set, known: dict):
        self.slots: dict[Any, tuple[Any, tuple]] = {}
        #: join key -> [shape, dtype, the joined array or None, chunks left to place]
        self.outputs: dict[Any, list] = {}
        for key in joins if known else ():
            found = _slots(dsk[key], known)
            if found is not None:
                shape, dtype, slots = found
                self.outputs[key] = [shape, dtype, None, len(slots)]
                self.slots.update((chunk, (key, index)) for chunk, index in slots.items())

    def place(self, key: Any, value: Any) -> None:
        """Put the chunk ``key`` in its slot now, if it fits it (else its join waits):
        pulled from its worker if held there, else copied (a small one came whole)."""
        join_key, index = self.slots.pop(key)
        entry = self.outputs.get(join_key)
        if entry is None:
            return
        shape, dtype, out, _ = entry
        if out is None:
            out = entry[2] = np.empty(shape, dtype)
        slot = out[index]
        if isinstance(value, Held):
            fits = value.into(slot)
        else:
            fits = type(value) is np.ndarray and (value.shape, value.dtype) == (slot.shape,
                                                                             slot.dtype)
            if fits:
                slot[...] = value
        if fits:
            entry[3] -= 1
        else:  # another shape or dtype than the annotations said: join at the end
            del self.outputs[join_key]

    def result(self, key: Any) -> np.ndarray | None:
        """The joined array, if every chunk was placed; else None."""
        entry = self.outputs.pop(key, None)
        if entry is None or entry[3] or entry[2] is None:
            return None
        return entry[2]


def _slots(task: Task, known: dict) -> tuple[tuple, np.dtype, dict] | None:
    """The joined array's shape and dtype, and each chunk key's slot, if all its chunks
    are of one annotated layer, in the nesting finalize gives them."""
    arg = task.args[0] if len(task.args) == 1 and not task.kwargs else None
    if not isinstance(arg, GraphNode):
        return None
    nested = arg({k: k for k in arg.dependencies})
    keys = list(flatten(nested, container=list))
    if not keys or not all(type(k) is tuple and len(k) > 1 for k in keys):
        return None
    name = keys[0][0]
    if name not in known or any(k[0] != name for k in keys):
        return None
    chunks, dtype = known[name]
    grid = tuple(len(c) for c in chunks)
    if len(keys) != int(np.prod(grid)) or any(len(k) != len(grid) + 1 for k in keys):
        return None
    starts = [np.cumsum((0, *c)) for c in chunks]
    slots = {}
    for k, idx in zip(keys, product(*(range(n) for n in grid)), strict=True):
        if k[1:] != idx:  # not the C-ordered grid finalize is given
            return None
        slots[k] = tuple(slice(int(s[i]), int(s[i + 1])) for s, i in zip(starts, idx, strict=True))
    return tuple(int(s[-1]) for s in starts), dtype, slots


def join(task: Any, data: dict) -> Any:
    """Run a join task (``finalize``) here: chunks that workers hold are pulled
    straight into their slots of the joined array; other values as they are."""
    arg = task.args[0] if len(task.args) == 1 and not task.kwargs else None
    if isinstance(arg, GraphNode):
        joined = _in_place(arg(data))
        if joined is not None:
            return joined
    return task({k: v.value() if isinstance(v, Held) else v for k, v in data.items()})


def _in_place(arrays: Any) -> np.ndarray | None:
    """``dask.array.core.concatenate3`` of chunks, each fetched into its slot; or
    None where that function must run itself (chunks that are not plain numpy
    arrays, of other dimensions than the nesting, or a single chunk)."""
    from dask.array.core import chunks_from_arrays, slices_from_chunks

    leaves = list(flatten(arrays, container=list))
    if len(leaves) == 1 and isinstance(leaves[0], Held) and leaves[0].meta:
        return leaves[0].value()  # fetched into new memory: finalize's copy, made once
    ndim, inner = 0, arrays
    while isinstance(inner, list) and inner:
        ndim, inner = ndim + 1, inner[0]
    metas = []
    for x in leaves:
        meta = x.meta if isinstance(x, Held) else (
            (x.shape, x.dtype, None) if type(x) is np.ndarray else None)
        if meta is None or len(meta[0]) != ndim:
            return None
        metas.append(meta)
    if len(leaves) < 2:
        return None
    shapes = _nested([SimpleNamespace(shape=m[0]) for m in metas], arrays)
    chunks = chunks_from_arrays(shapes)
    out = np.empty(tuple(map(sum, chunks)), dtype=metas[0][1])
    pulls = []
    for idx, leaf in zip(slices_from_chunks(chunks), leaves, strict=True):
        if isinstance(leaf, Held):
            pulls.append((leaf, out[idx]))
        else:
            out[idx] = leaf
    _pull_all(pulls)
    return out


def _nested(flat: list, like: Any) -> Any:
    """``flat`` arranged in the nesting of lists ``like``."""
    items = iter(flat)

    def build(node: Any) -> Any:
        return [build(n) for n in node] if isinstance(node, list) else next(items)

    return build(like)


def _pull_all(pulls: list) -> None:
    """Put each held array in its slot, by as many threads as CPUs (up to 4): each
    pull releases the GIL, and a join at the end is the only work left."""
    parts = min(len(pulls), len(os.sched_getaffinity(0)), 4)
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            for held, slot in pulls[k::parts]:
                if not held.into(slot):
                    slot[...] = held.value()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(1, parts)]
    for t in threads:
        t.start()
    if parts:
        run(0)
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
