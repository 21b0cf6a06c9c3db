"""The work that the benchmarks time, in a module of its own.

Peers that pickle functions (multiprocessing, concurrent.futures, joblib,
mpire, dask's ``processes`` scheduler, dask.distributed) pickle these by
reference, so their workers import this module: it imports only numpy, so
that spawned workers start quickly.

The globals are set by a workload's setup before any pool starts, so that
fork-based pools inherit them (spawned workers do not: they get the chunk
itself as an argument instead).
"""

from __future__ import annotations

import numpy as np

ARRAY: np.ndarray | None = None  # the GIL-bound workloads' shared array
CHUNK = 0  # elements per chunk
STEP = 1  # every STEP-th element is summed in Python


def identity(x):
    return x


def inc(x):
    return x + 1


def gil_sum(chunk: np.ndarray, step: int) -> float:
    """Pure-Python work that holds the GIL: a for loop over a subsample."""
    # A plain ndarray view: iterating an np.memmap (what loky workers get)
    # goes through its Python-level __getitem__ and would be several times slower.
    chunk = np.asarray(chunk)
    s = 0.0
    for v in chunk[::step]:
        s += v
    return float(s)


def chunk_sum(i: int) -> float:
    """Chunk ``i`` of the fork-inherited global array."""
    return gil_sum(ARRAY[i * CHUNK:(i + 1) * CHUNK], STEP)


def block_sum(block: np.ndarray, step: int) -> np.ndarray:
    """``gil_sum`` for ``map_blocks``: one block in, a one-element block out."""
    return np.array([gil_sum(block, step)])


def memmap_sum(path: str, offset: int, count: int, step: int) -> float:
    """Map the shared array's memory by path (no copy) and sum a chunk of it."""
    a = np.memmap(path, dtype="f8", mode="r", offset=offset, shape=(count,))
    return gil_sum(a, step)


def fill(a: np.ndarray, chunk: int) -> None:
    """Fill ``a`` with ``arange % 1000``, ``chunk`` elements at a time.

    Small integers keep every partial sum exact, so all peers must agree to
    the last bit whatever order they add in.  Done once, before any timing:
    first-touch page faults are expensive and would otherwise land on
    whichever peer runs first.
    """
    for lo in range(0, a.size, chunk):
        hi = min(lo + chunk, a.size)
        a[lo:hi] = np.arange(lo, hi) % 1000


def sqrt_chunk(i: int) -> np.ndarray:
    """``np.sqrt(c) + 1`` of chunk ``i`` of ARRAY: the large-results workload."""
    return np.sqrt(ARRAY[i * CHUNK:(i + 1) * CHUNK]) + 1
