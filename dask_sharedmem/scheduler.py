"""A dask scheduler on the fork worker pool: ``dask.compute(x, scheduler="sharedmem")``.

The algorithm is dask's own (``dask.local``): the same state dict, the same
``order`` priorities, the same ``finish_task``/``release_data`` bookkeeping
and the same callbacks.  What differs is where tasks run and how data moves:

* Workers are forked *inside* :func:`get`, after the graph exists, so every
  task -- closures, lambdas, functions over unpicklable objects -- is found
  in the workers' own memory.  The parent sends keys, never tasks.
* A task's result stays with the worker that made it: what crosses to the
  parent is a ``channel.Held`` (its pickle, and stand-ins for its large
  buffers).  The parent keeps that in its cache; a task that needs it gets
  it in its batch and its worker fetches the buffers from the maker
  (``transports``: one ``process_vm_readv``), or uses the object itself if
  it made it.  The parent fetches only what the caller gets -- the chunks
  of a dask array straight into their slots of the joined array when the
  last is in (joins.py), other values as they arrive -- and what a callback
  looks at.
* Of the next ``_LOCALITY_WINDOW`` ready tasks, a worker is given the first
  (in dask's order) whose large inputs it holds, or else the one that pulls
  the fewest bytes from other workers: a rechunk of 512 MB went from 1.60-1.71x
  threads' time to 1.33-1.44x, the per-task rows did not move.  A chunk of a shared
  input array is a view of that array and crosses as a handle.
* ``finish_task`` drops each held result as soon as no remaining task
  needs it, and its worker is told to drop it (``channel.on_drop``, acks);
  everything goes when ``get`` returns or fails.

Dispatch::

    parent                                         worker r
    ------                                         --------
    ready.pop() -> key; pretask callbacks
    send [(n, key, {dep: cache[dep]}), ...] ---->  for n, key, data in batch:
                                                       current[r] = n
                                                       result = dsk[key](data)
    cache[key] = result; finish_task;   <--------  send ("done", [(key, result)..])
    posttask callbacks; dispatch more

Before the fork, ``forksafe.prepare`` rewrites what the graph holds that
would go silently wrong in a forked worker (dask's partd shuffle buffers,
``da.store`` into private memory: see forksafe.py); the writes that a store
leaves for the caller come back with the batch's results and are applied
before its tasks count as done.  A task that it ran in the caller (the partd
store, a ``Delayed`` store target) is data in its graph: done before the
fork, its value is in every worker's memory, never sent.  The join of a
dask array's chunks (the wanted key whose task is
``dask.array.core.finalize``) runs in the caller, into private memory, as
threads would.  Warnings that tasks issue come back
before the results and are re-issued here (pool.py).

Small graphs run in the caller (inline.py): a graph whose tasks, as
measured in earlier calls, add up to less than dask config
``sharedmem.inline`` seconds runs here, as dask's ``sync`` scheduler would,
and a run here that overruns forks workers for the rest.

Each worker has up to two batches in flight, so it never waits for the
parent between tasks -- for slow tasks only while many are ready, since a
second batch queued behind a slow one near the end leaves the other workers
idle; a batch holds one task until the measured task time says that several
fit in ``_BATCH_SECONDS`` (tiny tasks), and never more than a fair share of
the ready tasks.  A worker's death is seen at once
(EOF on its socket); the shared ``current`` array names the task it was
running.
"""

from __future__ import annotations

import math
import numbers
import pickle
import time
from collections import deque
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import dask
import numpy as np
from dask._task_spec import DataNode, convert_legacy_graph
from dask.callbacks import Callback, local_callbacks, normalize_callback, unpack_callbacks
from dask.core import flatten
from dask.local import finish_task, nested_get, start_state_from_dask
from dask.order import order

from . import channel, forksafe, inline, joins, memory, transports
from .pool import UnreadableResult, WorkerDied, Workers, cpu_count, worker_count
from .remote import pack_exception, unpack_exception

__all__ = ["get"]

_BATCH_SECONDS = 0.005
_PREFETCH_BELOW = 0.005  # seconds a batch takes, under which a worker always gets two at once
_CHAIN_MAX = 1000  # tasks of a linear chain sent to a worker at once
_LOCALITY_WINDOW = 8  # ready tasks looked at for one whose inputs the worker holds
dask.config.update_defaults({"sharedmem": {"num-workers": None, "inline": 0.02,
                                           "threshold": channel.DEFAULT_THRESHOLD,
                                           "transport": "auto"}})


def _num_workers(num_workers: Any) -> int:
    n = num_workers
    if n is None:
        n = dask.config.get("num_workers", None)
    if n is None:
        n = dask.config.get("sharedmem.num-workers", None)
    if n is None:
        return cpu_count()
    return worker_count(n, "num_workers", "a positive int", "at least 1")


def _check_arguments(dsk: Any, keys: Any, threshold: Any, cache: Any) -> set:
    """Say which argument is wrong before anything runs; return the wanted keys.

    Without this, each of these surfaces later as an error about something
    else: an AttributeError inside dask, or a TypeError in a worker when the
    first large array is compared with a threshold that is not a number.
    """
    if not isinstance(dsk, Mapping):
        raise TypeError("dsk must be a dask graph (a Mapping of keys to tasks, or an object "
                        f"with __dask_graph__), not {type(dsk).__name__}")
    if threshold is not None and (isinstance(threshold, bool)
                                  or not isinstance(threshold, numbers.Integral)):
        raise TypeError(f"threshold must be an int (bytes) or None, not {threshold!r}")
    if threshold is not None and threshold < 0:
        raise ValueError(f"threshold must be >= 0 bytes, not {threshold}")
    if cache is not None and not isinstance(cache, MutableMapping):
        raise TypeError("cache must be a dict of precomputed values (key -> value) or None, "
                        f"not {type(cache).__name__}")
    try:
        return set(flatten(keys)) if isinstance(keys, list) else {keys}
    except TypeError:
        raise TypeError(f"keys must be a key of the graph or a (nested) list of keys, "
                        f"not {keys!r}") from None


def _normalize_callbacks(callbacks: Any) -> list | None:
    """``callbacks`` as dask's local schedulers take them: a list of 5-tuples.

    dask's ``Callback`` objects (``ProgressBar()``, ...) are accepted too.
    """
    if callbacks is None:
        return None
    if isinstance(callbacks, Callback):
        callbacks = [callbacks]
    try:
        out = [normalize_callback(c) for c in callbacks]
        ok = all(len(c) == 5 for c in out)
    except TypeError:
        ok = False
    if not ok:
        raise TypeError("callbacks must be a list of dask Callback objects or of (start, "
                        f"start_state, pretask, posttask, finish) tuples, not {callbacks!r}")
    return out


def get(dsk: Mapping, keys: Sequence | Any, num_workers: int | None = None,
        callbacks: Any = None, threshold: int | None = None, cache: dict | None = None,
        **kwargs: Any) -> Any:
    """Compute ``keys`` of the dask graph ``dsk`` on forked worker processes.

    A graph whose tasks were all measured in earlier calls as quicker, in
    all, than dask config ``sharedmem.inline`` seconds (0.02; 0 turns this
    off) runs in this process instead, as dask's ``sync`` scheduler would:
    forking would cost more.  If it takes twice that long here, workers are
    forked for the tasks left (see the module docstring).

    Parameters
    ----------
    dsk : Mapping, HighLevelGraph, or object with ``__dask_graph__``
        The graph.
    keys : key or (nested) list of keys
        What to compute; lists in ``keys`` become tuples in the result, as
        with dask's other schedulers.
    num_workers : int, optional
        Number of worker processes.  Default: dask config ``num_workers``,
        then ``sharedmem.num-workers``, then :func:`cpu_count`.
    callbacks : tuple or list of tuples, optional
        dask callbacks, as for ``dask.local.get_async``; those registered with
        ``dask.callbacks.Callback`` (ProgressBar, Profiler) are used too.
    threshold : int, optional
        numpy arrays of at least this many bytes travel between processes in
        shared memory.  Default: config ``sharedmem.threshold`` (64 KiB).
    cache : dict, optional
        Precomputed values of keys, as for dask's local schedulers.
    **kwargs
        Ignored (dask passes scheduler options of other schedulers).

    Returns
    -------
    The values of ``keys``.

    Raises
    ------
    Exception
        A task's own exception, of its own type, with the worker's traceback
        as its ``__cause__``.
    WorkerDied
        A worker ended unexpectedly (signal, ``os._exit``, the OOM killer);
        the message names the task and the signal.

    Examples
    --------
    >>> import dask, dask.array as da, dask_sharedmem
    >>> x = da.arange(10, chunks=5)
    >>> int(x.sum().compute(scheduler=dask_sharedmem.get))
    45
    >>> int(x.sum().compute(scheduler="sharedmem"))
    45
    """
    nworkers = _num_workers(num_workers)
    if threshold is None:
        threshold = dask.config.get("sharedmem.threshold", channel.DEFAULT_THRESHOLD)
    if not isinstance(dsk, Mapping) and hasattr(dsk, "__dask_graph__"):
        dsk = dsk.__dask_graph__()
    wanted = _check_arguments(dsk, keys, threshold, cache)
    limit = inline.limit()
    callbacks = _normalize_callbacks(callbacks)
    dsk = convert_legacy_graph(dsk)
    if cache is None:
        cache = {}
    missing = [k for k in wanted if k not in dsk and k not in cache]
    if missing:
        raise KeyError(f"keys not in the graph: {missing[:10]!r}")

    with local_callbacks(callbacks) as cbs:
        start_cbs, start_state_cbs, pretask_cbs, posttask_cbs, finish_cbs = unpack_callbacks(cbs)
        state: dict = {}
        started: list = []
        timings = inline.Timings()
        ntasks = 0
        succeeded = False
        try:
            while True:
                keyorder = order(dsk)
                state = start_state_from_dask(dsk, cache=cache, keys=wanted,
                                              sortkey=keyorder.get)
                if state["waiting"] and not state["ready"]:
                    raise ValueError("Found no accessible jobs in dask")
                ntasks = len(state["ready"]) + len(state["waiting"])
                if not ntasks:
                    for f in start_cbs:
                        f(dsk)
                        started.append(f)
                    break
                if inline.runs_here(state, ntasks, limit, keyorder):
                    if not started:
                        before = dict(dsk) if start_cbs else None
                        for f in start_cbs:
                            f(dsk)
                            started.append(f)
                        if _changed(before, dsk):
                            continue
                    for f in start_state_cbs:
                        f(dsk, state)
                    if inline.run(dsk, state, wanted, keyorder, pretask_cbs, posttask_cbs,
                                   timings, time.perf_counter() + inline.OVERRUN * limit):
                        break
                    timings.overran = True
                    prepared = forksafe.prepare(dsk)
                    if prepared.pickled & state["finished"]:
                        # a result made here from the graph as it was (a buffered partd
                        # store that tasks here wrote to) would go wrong in workers
                        inline.run(dsk, state, wanted, keyorder, pretask_cbs, posttask_cbs,
                                    timings, math.inf)
                    else:  # slower than estimated: workers for the rest, callbacks as they are
                        left = len(state["ready"]) + len(state["waiting"])
                        _run(dsk, prepared, state, wanted, keyorder, min(nworkers, left),
                             threshold, [], [], pretask_cbs, posttask_cbs, started, timings)
                    break
                prepared = forksafe.prepare(dsk)
                try:
                    _run(dsk, prepared, state, wanted, keyorder,
                         min(nworkers, ntasks), threshold, start_cbs if not started else [],
                         start_state_cbs, pretask_cbs, posttask_cbs, started, timings)
                except _GraphChanged:  # fork again, with what the callbacks put in
                    continue
                break
            succeeded = True
        finally:
            if ntasks * inline.PER_TASK < limit:  # else it could never run here
                inline.remember(timings)
            if started:
                for f in finish_cbs:
                    f(dsk, state, not succeeded)
    try:
        return nested_get(keys, _plain(state["cache"], wanted))
    finally:
        state.clear()


class _GraphChanged(Exception):
    """A ``start`` callback changed the graph after the workers were forked."""


def _changed(before: dict | None, dsk: Mapping) -> bool:
    """Whether ``start`` callbacks changed the graph (``before`` is a copy, or None)."""
    return before is not None and (len(before) != len(dsk) or any(
        dsk.get(k, before) is not v for k, v in before.items()))


def _plain(cache: dict, wanted: set) -> dict:
    """Results as ordinary numpy arrays (views of their shared memory)."""
    for key in wanted:
        if isinstance(cache.get(key), memory.SharedArray):
            cache[key] = cache[key].view(np.ndarray)
    return cache


def _run(dsk: Mapping, prepared: forksafe.Prepared, state: dict, wanted: set,
         keyorder: dict, nworkers: int, threshold: int | None, start_cbs: list,
         start_state_cbs: list, pretask_cbs: list, posttask_cbs: list, started: list,
         timings: inline.Timings) -> None:
    """Fork the workers and run the graph on them (``prepared``: ``dsk`` as
    ``forksafe.prepare`` makes it safe to fork with, the stores' targets, and
    those left out of the workers' memory while they live).

    ``start`` callbacks run after the fork, since they may start threads
    (ProgressBar) or processes (ResourceProfiler) that forked workers must not
    inherit; one that changes the graph (``dask.cache.Cache`` puts cached
    values in) raises :class:`_GraphChanged`, so that the caller forks again
    with the new graph, as dask's own schedulers would run it.
    """
    before = dict(dsk) if start_cbs else None
    runnable, targets = prepared.graph, prepared.targets
    here = joins.join_keys(runnable, wanted)
    cache = state["cache"]
    ready = state["ready"]
    running = state["running"]
    # what prepare ran here (a store's target) is data, as start_state_from_dask makes a
    # DataNode: in the cache before the fork, every worker has that very object
    # (timed as a task run here: a graph run here makes it here, as cheaply)
    made = [key for key in ready if isinstance(runnable[key], DataNode)]
    for key in made:
        ready.remove(key)
        running.add(key)
        began = time.perf_counter()
        cache[key] = runnable[key]()
        timings.here.setdefault(inline.key_name(key), []).append(time.perf_counter() - began)
        finish_task(dsk, key, state, wanted, keyorder.get)
    waiting = state["waiting"]
    dependents = state["dependents"]
    current = memory.full(nworkers, -1, dtype="i8")  # the task number each worker runs
    inflight: list[deque] = [deque() for _ in range(nworkers)]  # batches of task numbers
    numbered: dict[int, Any] = {}  # task number -> key, while in flight
    counter = 0
    per_task: float | None = None
    # values in the cache before the fork (the graph's data, precomputed keys)
    # are in every worker's own memory: sending them would copy large arrays
    # into new shared memory for every task that reads them
    forked = frozenset(cache)
    dependencies = state["dependencies"]

    def worker_main(chan: channel.Channel, rank: int) -> None:
        sending = 0.0  # the last send's time: pickling results is work too
        while True:
            batch = chan.recv()
            t0 = time.perf_counter()
            out = []
            res = None
            for number, key, data, chained, keep in batch:
                current[rank] = number
                if channel._KEPT:
                    chan.take_acks()
                try:
                    _values(data)
                except transports.cma.MakerGone as e:
                    chan.send(("lost", key, e.pid))
                    return
                except Exception as e:
                    chan.send(("error", key, pack_exception(e)))
                    return
                if chained is not None:  # the previous task's result is this one's input
                    data[chained] = res
                if forked:
                    data.update((d, cache[d]) for d in dependencies[key] if d in forked)
                began = time.perf_counter()
                try:
                    res = runnable[key](data)
                except BaseException as e:
                    chan.send(("error", key, pack_exception(e)))
                    return
                out.append((key, res if keep else None, time.perf_counter() - began))
            t1 = time.perf_counter()
            _send_results(chan, out, t1 - t0 + sending, forksafe.take_writes(), threshold)
            sending = time.perf_counter() - t1
            del batch, out, data, res

    def start(key: Any) -> None:
        running.add(key)
        for f in pretask_cbs:
            f(key, dsk, state)

    def follow(key: Any) -> Any:
        """The task that can run right after ``key`` on the same worker, if any.

        That is ``key``'s only dependent when it waits for nothing else:
        running it in the same batch saves a round trip through the parent
        and keeps ``key``'s result in the worker.
        """
        after = dependents[key]
        if len(after) != 1 or key in wanted:
            return None
        (nxt,) = after
        return nxt if waiting.get(nxt) == {key} else None

    def pick(rank: int) -> Any:
        """The next ready task for worker ``rank``: dask's next (the last of
        ``ready``), unless one of the next ``_LOCALITY_WINDOW`` would pull fewer
        bytes of large results from other workers (see the module docstring)."""
        if nworkers < 2 or len(ready) < 2:
            return ready.pop()
        pid = w.pids[rank]
        best, fewest = len(ready) - 1, -1
        for i in range(len(ready) - 1, max(-1, len(ready) - 1 - _LOCALITY_WINDOW), -1):
            away = 0
            for d in dependencies[ready[i]]:
                v = cache.get(d)
                if type(v) is channel.Held and v.pid != pid:
                    away += v.nbytes
            if fewest < 0 or away < fewest:
                best, fewest = i, away
                if not away:
                    break
        return ready.pop(best)

    def dispatch(rank: int) -> None:
        nonlocal counter
        size = 1
        if per_task is not None and per_task < _BATCH_SECONDS:
            size = max(1, min(len(ready) // (2 * nworkers),
                              int(_BATCH_SECONDS / max(per_task, 1e-7))))
        batch: list = []
        numbers = []
        while ready and len(batch) < size:
            key = pick(rank)
            start(key)
            if key in here:
                run_here(key)
                continue
            chained = None
            while True:
                deps = state["dependencies"][key]
                data = {d: cache[d] for d in deps if d != chained and d not in forked}
                # posttask callbacks (dask.cache.Cache, CacheProfiler) are shown every
                # result, which a chain keeps in the worker: no chains for them
                nxt = follow(key) if len(batch) < _CHAIN_MAX and not posttask_cbs else None
                if nxt in here:
                    nxt = None
                batch.append((counter, key, data, chained, nxt is None))
                numbered[counter] = key
                numbers.append(counter)
                counter += 1
                if nxt is None:
                    break
                chained, key = key, nxt
        if batch:
            inflight[rank].append(numbers)
            w.send(rank, batch)

    def fetch(held: channel.Held, key: Any, rank: int) -> Any:
        """The value of a held result, as the caller would get it from threads."""
        try:
            with memory.plain_arrivals():
                return held.value()
        except transports.cma.MakerGone as e:
            raise _lost(w.died(e.pid), {key: held}) from None
        except pickle.UnpicklingError as e:
            raise UnreadableResult(rank, w.pids[rank], str(e)).about(
                f"result of task {key!r}") from e.__cause__

    def run_here(key: Any) -> None:
        """Run ``key`` in this process: its inputs are here, and so is the caller."""
        data = {d: cache[d] for d in state["dependencies"][key]}
        began = time.perf_counter()
        try:
            with memory.plain_arrivals():
                res = joins.join(runnable[key], data)
        except transports.cma.MakerGone as e:
            raise _lost(w.died(e.pid), data, key) from None
        except pickle.UnpicklingError as e:
            raise pickle.UnpicklingError(f"a result that task {key!r} joins could not be "
                                         f"unpickled in the parent: {e}") from e.__cause__
        timings.here.setdefault(inline.key_name(key), []).append(time.perf_counter() - began)
        finish(key, res, nworkers)

    def finish(key: Any, res: Any, rank: int) -> None:
        if key not in running:  # a chained task: its input was made in the worker
            # finish_task of its input just made it ready, appending it last
            if ready[-1] == key:
                ready.pop()
            else:
                ready.remove(key)
            start(key)
        if isinstance(res, channel.Held) and rank < nworkers:
            channel.on_drop(res, w.channels[rank].acks)
            # what the caller gets is fetched as it arrives, while other tasks run;
            # so are the values that callbacks look at (dask.cache.Cache keeps them)
            if key in wanted or values_seen:
                res = fetch(res, key, rank)
        cache[key] = forksafe.resolve(targets, res)
        finish_task(dsk, key, state, wanted, keyorder.get)
        for f in posttask_cbs:
            f(key, res, dsk, state, rank)

    values_seen = _values_seen(posttask_cbs)
    with forksafe.unmapped(prepared.unmapped), Workers(nworkers, worker_main, threshold) as w:
        for f in start_cbs:
            f(dsk)
            started.append(f)
        if _changed(before, dsk):
            for key in made:  # made again from the new graph, with the stores' new targets
                del cache[key]
            raise _GraphChanged
        for f in start_state_cbs:
            f(dsk, state)
        for _ in range(2):
            for rank in range(nworkers):
                dispatch(rank)
        while waiting or ready or running:
            try:
                events = w.poll()
            except WorkerDied as e:
                number = int(current[e.rank])
                if number in numbered:
                    e.doing = f"task {numbered[number]!r}"
                    e.args = (f"{e} while running task {numbered[number]!r}",)
                else:  # the result of its last task had arrived: do not blame it
                    e.args = (f"{e} while waiting for work",)
                if prepared.unmapped and "SIGSEGV" in e.status:
                    e.args = (f"{e.args[0]}; the numpy array that da.store writes into is not "
                              "in the workers' memory during the compute (it would cost a copy "
                              "of each of its pages): a task that reads it dies. Store into a "
                              "shared array (dask_sharedmem.empty), or use scheduler='threads'",)
                _lost(e, cache)  # results it held that nobody had copied out
                raise
            except UnreadableResult as e:
                keys = [numbered[n] for n in inflight[e.rank][0]]
                raise e.about(f"result of task {keys[0]!r}" if len(keys) == 1
                              else f"results of tasks {keys!r}") from e.__cause__
            for rank, msg in events:
                if msg[0] == "error":
                    exc, lost = unpack_exception(msg[2], f"task {msg[1]!r}")
                    if lost:
                        exc.args = (f"task {msg[1]!r} failed: {exc.args[0]}",)
                    raise exc
                if msg[0] == "lost":  # an input's maker died before it could be read
                    raise _lost(w.died(msg[2]), {d: cache.get(d) for d in dependencies[msg[1]]},
                                msg[1])
                _, out, seconds, writes = msg
                if writes:
                    try:
                        forksafe.apply(targets, writes)
                    except transports.cma.MakerGone as e:
                        died = w.died(e.pid)
                        died.args = (f"{died}; a chunk that task {out[-1][0]!r} stored was lost "
                                     "with it",)
                        raise died from None
                for number in inflight[rank].popleft():
                    del numbered[number]
                per_task = seconds / max(len(out), 1)
                # a second batch in flight hides the round trip; for slow tasks it
                # could leave a worker idle at the end, so only while many are ready
                depth = 2 if seconds < _PREFETCH_BELOW or len(ready) >= 4 * nworkers else 1
                for key, res, took in out:
                    timings.there.setdefault(inline.key_name(key), []).append(took)
                    finish(key, res, rank)
                del out, key, res
                for other in range(nworkers):
                    while len(inflight[other]) < depth and ready:
                        dispatch(other)


def _send_results(chan: channel.Channel, out: list, seconds: float, writes: list,
                  threshold: int | None) -> None:
    """Send a batch's results (and its stores' writes, see forksafe.py), each held
    here until someone needs it (channel.hold); name the task whose result cannot
    be pickled."""
    held = []
    for key, res, took in out:
        try:
            held.append((key, res if _small(res, threshold) else
                         channel.hold(res, threshold=threshold), took))
        except Exception as e:
            err = TypeError(f"the result of task {key!r} (of type "
                            f"{type(res).__module__}.{type(res).__qualname__}) cannot "
                            f"be pickled to send it to the parent: {e}")
            chan.send(("error", key, pack_exception(err)))
            return
    writes = [(ident, index, channel.hold(x, threshold=threshold))
              for ident, index, x in writes]
    chan.send(("done", held, seconds, writes))


_SCALARS = (int, float, complex, bool, str, type(None), np.generic)


def _small(res: Any, threshold: int | None) -> bool:
    """Whether a result crosses as it is: a scalar, or a small plain numpy array
    (holding it would pickle it twice, for nothing to keep; most tasks of large
    graphs return these).

    >>> _small(3, 65536), _small(np.zeros(10), 65536), _small(np.zeros(10**5), 65536)
    (True, True, False)
    """
    if type(res) in _SCALARS or isinstance(res, np.generic):
        return type(res) is not str or len(res) < 4096
    return (type(res) is np.ndarray and not res.dtype.hasobject
            and res.nbytes < (threshold or 0) and memory._segment_of(res) is None)


def _lost(e: WorkerDied, values: Mapping, needed_by: Any = None) -> WorkerDied:
    """``e``, saying which results were lost with its worker: those among ``values``
    (key -> value) that it held and that nobody had copied out of its memory yet
    (cma offers: shared memory outlives it); ``needed_by``, the task that needed them.

    >>> e = _lost(WorkerDied(0, 42, "was killed by SIGKILL"), {"a": 1}, needed_by="b")
    >>> str(e)
    "worker 0 (pid 42) was killed by SIGKILL; a result that task 'b' needed was lost with it"
    """
    keys = [k for k, v in values.items() if isinstance(v, channel.Held) and v.pid == e.pid
            and any(isinstance(i, transports.Offer) for i in v.items)]
    need = "" if needed_by is None else f", which task {needed_by!r} needed,"
    if len(keys) == 1:
        what = f"the result of task {keys[0]!r}{need} was"
    elif keys:
        more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
        what = f"the results of tasks {keys[:3]!r}{more}{need} were"
    elif needed_by is not None:
        what = f"a result that task {needed_by!r} needed was"
    else:
        return e
    e.args = (f"{e}; {what} lost with it",)
    return e


def _values(data: dict) -> None:
    """In a worker: the inputs of a task, each held value replaced by the value."""
    for key, value in data.items():
        if isinstance(value, channel.Held):
            data[key] = value.value()


#: posttask callbacks of dask's diagnostics that never look at a task's value:
#: with only these, a held result is not fetched into the caller for them
_VALUE_BLIND = {"dask.diagnostics.progress.ProgressBar", "dask.diagnostics.profile.Profiler",
                "dask.diagnostics.profile.ResourceProfiler"}


def _values_seen(posttask_cbs: list) -> bool:
    """Whether a posttask callback may look at the values (dask.cache.Cache does)."""
    for f in posttask_cbs:
        owner = getattr(f, "__self__", None)
        if owner is None or f"{type(owner).__module__}.{type(owner).__name__}" not in _VALUE_BLIND:
            return True
    return False


def _register() -> None:
    from dask.base import named_schedulers

    named_schedulers.setdefault("sharedmem", get)


_register()
