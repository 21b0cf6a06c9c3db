"""dask_sharedmem: one multi-core machine as one shared-memory computer.

Shared numpy arrays, a fork worker pool with MapReduce, and a dask scheduler,
all built on ``fork`` and anonymous shared memory.  A drop-in successor to
``sharedmem`` 0.3.8: ``import dask_sharedmem as sharedmem``.
"""

from .mapreduce import (
    LostExceptionType,
    MapReduce,
    MapReduceByThread,
    StopProcessGroup,
    WorkerException,
    background,
    get_debug,
    set_debug,
)
from .memory import (
    SharedArray,
    copy,
    empty,
    empty_like,
    fromiter,
    full,
    full_like,
    ones,
    ones_like,
    zeros,
    zeros_like,
)
from .pool import WorkerDied, cpu_count, total_memory
from .scheduler import get

Pool = MapReduce
TPool = MapReduceByThread

__version__ = "0.1.0"

__all__ = [
    "LostExceptionType",
    "MapReduce",
    "MapReduceByThread",
    "Pool",
    "SharedArray",
    "StopProcessGroup",
    "TPool",
    "WorkerDied",
    "WorkerException",
    "background",
    "copy",
    "cpu_count",
    "empty",
    "empty_like",
    "fromiter",
    "full",
    "full_like",
    "get",
    "get_debug",
    "ones",
    "ones_like",
    "set_debug",
    "total_memory",
    "zeros",
    "zeros_like",
]
