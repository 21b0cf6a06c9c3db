"""Small graphs run in the caller: forking costs more than the fork itself.

After a fork, every page the caller or a worker writes (and Python writes a
reference count with every object it touches) is copied once, about 1,400
pages in the caller and 2,300 in each worker for a 32 MB ``(x + 1).sum()``
-- 20-25 ms on a VM whose page faults cost 3-4 us, 5-10 ms on bare metal.
So a graph whose tasks, as measured in earlier calls, add up to less than
dask config ``sharedmem.inline`` seconds (20 ms; 0 turns it off) runs here,
one task after another, as dask's ``sync`` scheduler would: a worker could
not return its result sooner.  The rule: **a wrong guess may cost one
fork, never a serial run of parallel work.**  Three things keep it:

* Each key name keeps an estimate of its tasks (``_estimate``), never
  its fastest task alone, which said that four chunks of 0.5 s beside a
  chunk of one element were quick.  From a run here: the median, and at
  least a tenth of the mean (the first writes after a fork, or another
  process, delay a task or two; ten times the others is work); from a run
  here that overran: the mean of all of them; from workers, whose tasks
  pay for their first touches of pages after the fork: a range, at least
  the fastest (a warm task) and a tenth of the mean, at most the mean.
* A key is known by its name with dask's token; by the name without it
  (``key_split``) only where ``compute`` renamed the same task (its final
  keys, ``finalize-hlgfinalizecompute-<uuid>``): a task that waits for
  tasks known so.  Never a root: dask names a fused task from its first
  and last layers, and a new ``x.map_blocks(slow).sum()`` has the
  ``array-sum`` roots of a trivial ``x.sum()`` (``runs_here``).
* A run here that has taken twice ``sharedmem.inline`` (``OVERRUN``)
  while tasks that workers would run are left stops, and forks workers for
  them: the state dict goes on, the results made here are in the workers'
  memory as the graph's data is (never sent), callbacks see one compute.
  A wrong estimate thus costs about twice the limit, or one task that is
  longer, and one fork -- where forking is safe: a graph whose partd store
  (dask's disk shuffle) was made here finishes here (forksafe.py).

The first call of a new graph forks; each call measures what it ran, so
that a graph which ran slower here than estimated forks next time.
"""

from __future__ import annotations

import math
import numbers
import statistics
import time
from collections.abc import Mapping, Sequence
from itertools import chain
from typing import Any

import dask
from dask.local import finish_task
from dask.utils import key_split

from . import joins

PER_TASK = 20e-6  # seconds of bookkeeping per task run in the caller
OVERRUN = 2  # times sharedmem.inline after which a run in the caller forks for the rest

#: key name (a tuple key's first element) -> seconds that one of its tasks is
#: expected to take here (see _estimate); and the same by the name without dask's token
_DURATIONS: dict[Any, float] = {}
_BY_PREFIX: dict[str, float] = {}
_DURATIONS_MAX = 10_000
#: how many times a name's mean task may exceed its typical task before that is its work:
#: more than page faults after a fork (in workers) or delays (here) explain
_SLOWDOWN = 10


def key_name(key: Any) -> Any:
    """The name that a task's time is remembered by: a tuple key's first element.

    >>> key_name(("sum-1a2b", 0, 3)), key_name("x")
    ('sum-1a2b', 'x')
    """
    return key[0] if type(key) is tuple and key else key


class Timings:
    """Seconds of each task of one call, by key name: run here, or in a worker."""

    __slots__ = ("here", "overran", "there")

    def __init__(self) -> None:
        self.here: dict[Any, list[float]] = {}
        self.there: dict[Any, list[float]] = {}
        self.overran = False  # the run here took longer than estimated, see OVERRUN


def remember(timings: Timings) -> None:
    """Update each key name's estimate with this call's tasks (see :func:`_estimate`).

    Each is also kept by its name without the token (dask's ``key_split``:
    ``sum``, ``finalize-hlgfinalizecompute``), for names that dask makes anew
    for every ``compute`` (see :func:`_runs_here`).
    """
    names = timings.here.keys() | timings.there.keys()
    if len(_DURATIONS) + len(names) > _DURATIONS_MAX:
        _DURATIONS.clear()
        _BY_PREFIX.clear()
    for name in names:
        here, there = timings.here.get(name, ()), timings.there.get(name, ())
        _DURATIONS[name] = _estimate(_DURATIONS.get(name), here, there, timings.overran)
        prefix = _prefix(name)
        if prefix is not None:
            _BY_PREFIX[prefix] = _estimate(_BY_PREFIX.get(prefix), here, there,
                                           timings.overran)


def _estimate(old: float | None, here: Sequence[float], there: Sequence[float],
              overran: bool) -> float:
    """Seconds that a task of a name will take here, from this call's tasks of
    it (run ``here``, or ``there`` in workers) and the estimate before (``old``).

    * Tasks that ran here, in a run that finished here: their median, robust
      to a task that something else delayed (the caller's first writes after
      a fork copy its pages: 6.9 and 2.2 ms for the first two 0.9 ms chunks
      of a 32 MB ``(x + 1).sum()``; another process got the core), and at
      least their mean over ``_SLOWDOWN``: a few tasks much slower than the
      others are work, not delays.
    * A call whose run here ``overran`` its estimate and forked for the
      rest: the mean of all the name's tasks, here and in workers, the most
      they cost; it showed the estimate wrong.
    * Tasks that ran only in workers, where each pays for the pages it
      touches first after the fork (copies of the caller's heap, its shared
      inputs): for those chunks 2.5 to 3.5 times the caller's time on
      average, single ones up to 10 times.  So workers give a range: at most
      their mean; at least their fastest (taken as a warm task) and their
      mean over ``_SLOWDOWN``, which page faults do not explain (four chunks
      of 0.5 s beside a last chunk of 0.1 ms are slow work, not a 0.1 ms
      name).  An estimate within the range stays (what was measured here is
      not undone by the workers); one outside it was wrong, or the tasks
      changed: the low end, which a run here corrects if need be.

    >>> _estimate(None, [], [0.5, 0.5, 0.5, 0.5, 0.0001], False)  # not 0.0001
    0.040...
    >>> _estimate(0.0015, [], [0.003, 0.0011, 0.0012], False)  # measured here before: kept
    0.0015
    >>> _estimate(0.01, [], [0.003, 0.0011, 0.0012], False)  # a delay here: forgotten
    0.0011
    """
    if here and (there or overran):
        return (sum(here) + sum(there)) / (len(here) + len(there))
    if here:
        return max(statistics.median(here), sum(here) / len(here) / _SLOWDOWN)
    mean = sum(there) / len(there)
    low = max(min(there), mean / _SLOWDOWN)
    return old if old is not None and low <= old <= mean else low


def _prefix(name: Any) -> str | None:
    """``name`` without dask's token (``sum-1a2b...`` -> ``sum``), None if it has none:
    a key named by hand (``"x"``, ``0``) is only ever known by itself."""
    if type(name) is not str:
        return None
    prefix = key_split(name)
    return prefix if prefix != name else None


def limit() -> float:
    value = dask.config.get("sharedmem.inline", 0.02)
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value < 0:
        raise ValueError("dask config sharedmem.inline must be a number of seconds >= 0 "
                         f"(0: always fork), not {value!r}")
    return float(value)


def runs_here(state: dict, ntasks: int, limit: float, keyorder: dict) -> bool:
    """Whether the graph's tasks, as measured in earlier calls, take less than ``limit``.

    A task is known by its key's name; by the name without dask's token only
    where that is dask renaming the same task for each ``compute``
    (``finalize-hlgfinalizecompute-<uuid>``, ``sum-aggregate-finalize-...``):
    a task that waits for other tasks, each of them known.  A root (a task
    whose inputs are all data) is known only by its own name: under a known
    name without the token it may do new work, since dask names fused tasks
    from their first and last layers (the ``array-sum-<token>`` of a new,
    slow ``x.map_blocks(f).sum()`` is the ``array-sum`` of a trivial
    ``x.sum()`` measured before).
    """
    estimate = ntasks * PER_TASK
    if estimate >= limit:
        return False
    waiting = state["waiting"]
    renamed = []
    for keys in (state["ready"], waiting):
        for key in keys:
            name = key_name(key)
            seconds = _DURATIONS.get(name)
            if seconds is None:
                prefix = _prefix(name)
                if prefix is None or key not in waiting or prefix not in _BY_PREFIX:
                    return False
                seconds = _BY_PREFIX[prefix]
                renamed.append(key)
            estimate += seconds
            if estimate >= limit:
                return False
    known: set = set()
    for key in sorted(renamed, key=keyorder.__getitem__):  # a task after its dependencies
        if not all(d in known or key_name(d) in _DURATIONS for d in waiting[key]):
            return False
        known.add(key)
    return True


def run(dsk: Mapping, state: dict, wanted: set, keyorder: dict,
                pretask_cbs: list, posttask_cbs: list, timings: Timings, until: float) -> bool:
    """Run the graph in this process, in dask's order, as dask's sync scheduler would.

    Past ``until`` (``time.perf_counter()``) it stops, and says so (False),
    if tasks are left that workers would run.
    """
    cache = state["cache"]
    ready = state["ready"]
    dependencies = state["dependencies"]
    while ready:
        if time.perf_counter() > until:
            if not joins.join_keys(dsk, wanted).issuperset(chain(ready, state["waiting"])):
                return False
            until = math.inf  # what is left would run here anyway
        key = ready.pop()
        state["running"].add(key)
        for f in pretask_cbs:
            f(key, dsk, state)
        data = {d: cache[d] for d in dependencies[key]}
        t0 = time.perf_counter()
        res = dsk[key](data)
        timings.here.setdefault(key_name(key), []).append(time.perf_counter() - t0)
        cache[key] = res
        finish_task(dsk, key, state, wanted, keyorder.get)
        for f in posttask_cbs:
            f(key, res, dsk, state, 0)
        del res, data
    return True
