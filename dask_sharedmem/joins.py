"""The join of a dask array's chunks, in the caller: each chunk pulled into its slot.

``x.compute()`` ends with one task, ``dask.array.core.finalize``, that joins
the chunks into the caller's array (``concatenate3``).  Threads copy twice:
each chunk as it is computed, then all of them into the joined array, one
thread for the join.  Here the chunks stay in the workers that made them
(``channel.Held``) and each is pulled once, by ``process_vm_readv``,
straight into its slot of the joined array -- new memory of this process,
never a page the workers share copy-on-write -- by as many threads as CPUs,
once the last chunk is in::

    run_here(join key): join(task, data)
      layout from the chunks' shapes, as concatenate3 lays them out
      out = np.empty(shape, dtype of the first chunk)
      held.into(out[slot]) for each chunk, CPUs threads at once (one copy each)

Anything that is not a plain numpy array runs ``finalize`` itself, on the
values.  (Pulling each chunk as it arrives, with the layout from dask's
annotations, was tried: with as many workers as CPUs it slowed the workers
more than it saved, 438 against 367 ms for a 512 MB result on 2 CPUs.)
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import numpy as np
from dask._task_spec import GraphNode, Task
from dask.core import flatten

from .channel import Held

__all__ = ["join", "join_keys"]


def join_keys(dsk: Mapping, wanted: set) -> set:
    """The wanted keys that join dask.array chunks into the caller's result.

    They run in the caller's process, where the joined array is made in
    private memory (huge pages), as with threads.
    """
    finalize = getattr(sys.modules.get("dask.array.core"), "finalize", None)
    if finalize is None:
        return set()
    return {k for k in wanted if isinstance(dsk.get(k), Task) and dsk[k].func is finalize}


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
    """``flat`` arranged in the nesting of lists ``like``.

    >>> _nested([1, 2, 3, 4], [[0, 0], [0, 0]])
    [[1, 2], [3, 4]]
    """
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
