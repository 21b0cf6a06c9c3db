"""Shared memory: copy a buffer into a new memfd segment, whose descriptor rides
beside the message (``channel.py``); the receiver maps it.

The fallback room, where the kernel refuses ``process_vm_readv`` (see
cma.py), and the way a parent's large buffers reach its workers: a worker
may not read its parent.  One copy, into new shared memory (which costs
3.6-4.4 us per 4 KiB page on the development VM, and the receiver a fault
per page it reads), so cma is preferred wherever it is allowed.

Buffers under 1 MiB offered in one message share one segment (a *pack*,
4 MiB at most): a batch of a thousand results costs one descriptor and one
mapping, not a thousand.  The pack's memory returns when the last view of
it is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import memory

#: buffers smaller than this share a segment with others of the same message
PACK_ITEM_MAX = 1 << 20
#: ... as long as that segment stays this small
_PACK_MAX = 4 << 20
_ALIGN = 64


def copy(views: Sequence[memoryview]) -> list[Any]:
    """Copies of these byte buffers in new shared memory, in as few segments as
    :data:`PACK_ITEM_MAX` allows: uint8 shared arrays, in order.

    >>> [bytes(b) for b in copy([memoryview(b"ab"), memoryview(b"cde")])]
    [b'ab', b'cde']
    """
    out: list[Any] = []
    group: list[memoryview] = []
    size = 0
    for view in views:
        if group and size + view.nbytes > _PACK_MAX:
            out.extend(_pack(group))
            group, size = [], 0
        group.append(view)
        size += -(-view.nbytes // _ALIGN) * _ALIGN
    if group:
        out.extend(_pack(group))
    return out


def _pack(views: list[memoryview]) -> list[Any]:
    offsets, size = [], 0
    for view in views:
        offsets.append(size)
        size += -(-view.nbytes // _ALIGN) * _ALIGN
    seg = memory._populate(memory.empty(max(size, 1), np.uint8))
    out = []
    for view, offset in zip(views, offsets, strict=True):
        part = seg[offset:offset + view.nbytes]
        part[...] = np.frombuffer(view, np.uint8)
        out.append(part)
    return out
