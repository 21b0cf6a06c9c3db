"""forksafe.py: graphs whose objects rely on pickling, or that write to private memory.

Each case here gave a silently wrong answer before forksafe.py (0 rows from a
dataframe shuffle, a store that wrote nothing): every answer is compared with
dask's threads scheduler, with real forked workers, real files, real locks.
"""

import os
import pickle
import subprocess
import sys
import threading
import time

import dask
import dask.array as da
import numpy as np
import pytest
from conftest import subprocess_script
from dask.callbacks import Callback

import dask_sharedmem
from dask_sharedmem import forksafe

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_leaks")]

pd = pytest.importorskip("pandas")
dd = pytest.importorskip("dask.dataframe")


def both(compute):
    """``compute(scheduler)`` with threads and with sharedmem."""
    return compute("threads"), compute(dask_sharedmem.get)


def canonical(df):
    """Rows in one order, whichever partition each came from (a named index is a column)."""
    df = df.reset_index(drop=df.index.name is None)
    return df.sort_values(list(df.columns)).reset_index(drop=True)


def frame(n=100, parts=4):
    df = pd.DataFrame({"a": np.arange(n) % 10, "b": np.arange(n), "c": np.arange(n) * 0.5})
    return dd.from_pandas(df, npartitions=parts)


# -- objects that prepare for another process only when pickled ----------------------

@pytest.mark.parametrize("make", [
    lambda d: d.merge(d, on="a"),
    lambda d: d.set_index("a"),
    lambda d: d.shuffle("a"),
], ids=["merge", "set_index", "shuffle"])
def test_disk_shuffle_gives_every_row(make):
    """dask's disk shuffle goes through a partd store that buffers unless pickled."""
    with dask.config.set({"dataframe.shuffle.method": "disk"}):
        threads, here = both(lambda s: make(frame()).compute(scheduler=s))
    assert len(here) == len(threads) > 0
    pd.testing.assert_frame_equal(canonical(here), canonical(threads))


def test_a_partd_store_made_in_the_caller_keeps_its_graph_there(sessions):
    """A graph run in the caller forks for the rest when it overruns its estimate
    (scheduler.py), but not once a partd store of dask's disk shuffle was made
    here: buffered, as it is in one process, workers would write into private
    copies of its buffer, and rows would be lost.  (``compute`` names the store
    anew for every call, and a shuffle's tasks take 10-80 ms in workers: the
    graph here, a shuffle's shape, is given again by hand.)"""
    from dask.dataframe.shuffle import maybe_buffered_partd

    delay = [0.0]

    def append(p, i):
        time.sleep(delay[0])
        p.append({"rows": pd.DataFrame({"i": [i]})})

    def collect(p, done):
        return sorted(p.get("rows")["i"])

    dsk = {"p": (maybe_buffered_partd(),)}
    dsk.update({("append", i): (append, "p", i) for i in range(8)})
    dsk["rows"] = (collect, "p", [("append", i) for i in range(8)])
    with dask.config.set({"sharedmem.inline": 0.05}):
        assert dask_sharedmem.get(dsk, "rows", num_workers=2) == list(range(8))
        assert dask_sharedmem.get(dsk, "rows", num_workers=2) == list(range(8))
        assert len(sessions) == 1  # the second call ran here
        delay[0] = 0.05  # 0.4 s here: past twice sharedmem.inline after two appends
        assert dask_sharedmem.get(dsk, "rows", num_workers=2) == list(range(8))
    assert len(sessions) == 1


def test_disk_shuffle_leaves_no_files_after_the_caller_exits(tmp_path):
    """The partd store is the caller's: its files go when the caller exits, as with threads."""
    script = subprocess_script(f"""
        import dask, numpy as np, pandas as pd, dask.dataframe as dd, dask_sharedmem
        dask.config.set({{"temporary_directory": {str(tmp_path)!r},
                          "dataframe.shuffle.method": "disk"}})
        df = pd.DataFrame({{"a": np.arange(100) % 10, "b": np.arange(100)}})
        out = dd.from_pandas(df, npartitions=4).set_index("a").compute(
            scheduler=dask_sharedmem.get)
        assert len(out) == 100, len(out)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=100)
    assert os.listdir(tmp_path) == []


def test_prepare_leaves_a_graph_without_hazards_alone():
    x = da.ones(10, chunks=5) + 1
    dsk = dict(x.__dask_graph__())
    from dask._task_spec import convert_legacy_graph
    dsk = convert_legacy_graph(dsk)
    assert forksafe.prepare(dsk) == (dsk, [], set(), [])


# -- writes to memory that is private to the caller -----------------------------------

def source():
    return da.arange(10_000, chunks=1000).reshape(100, 100).rechunk(25) + 0.5


def test_store_into_a_numpy_array():
    threads, here = np.zeros((100, 100)), np.zeros((100, 100))
    da.store(source(), threads, scheduler="threads")
    da.store(source(), here, scheduler=dask_sharedmem.get)
    np.testing.assert_array_equal(here, threads)
    assert here.sum() > 0


def test_store_into_regions_of_a_numpy_array():
    out = np.full((300, 100), -1.0)
    regions = [(slice(0, 100), slice(None)), (slice(200, 300), slice(None))]
    da.store([source(), source() * 2], [out, out], regions=regions,
             scheduler=dask_sharedmem.get)
    np.testing.assert_array_equal(out[:100], source().compute())
    np.testing.assert_array_equal(out[200:], source().compute() * 2)
    assert (out[100:200] == -1).all()


def test_store_return_stored_gives_the_stored_values():
    out = np.zeros((100, 100), dtype="f4")
    stored = da.store(source(), out, return_stored=True, compute=False)
    values = stored.compute(scheduler=dask_sharedmem.get)
    np.testing.assert_array_equal(values, source().compute().astype("f4"))
    np.testing.assert_array_equal(out, values)

    out2 = np.zeros((100, 100))
    persisted = da.store(source(), out2, return_stored=True, scheduler=dask_sharedmem.get)
    np.testing.assert_array_equal(out2, source().compute())
    np.testing.assert_array_equal(persisted.compute(scheduler=dask_sharedmem.get), out2)


def test_store_into_a_shared_array_is_written_in_place_by_the_workers(monkeypatch):
    applied = []
    monkeypatch.setattr(forksafe, "apply", lambda t, w: applied.append(w))
    out = dask_sharedmem.zeros((100, 100))
    da.store(source(), out, scheduler=dask_sharedmem.get)
    np.testing.assert_array_equal(out, source().compute())
    assert applied == []  # no chunk went through the parent


@pytest.mark.parametrize("mode, in_place", [("r+", True), ("c", False)])
def test_store_into_a_memmap(tmp_path, mode, in_place):
    path = tmp_path / "m.dat"
    np.zeros((100, 100)).tofile(path)
    out = np.memmap(path, dtype="f8", mode=mode, shape=(100, 100))
    assert forksafe._in_place(out) is in_place
    da.store(source(), out, scheduler=dask_sharedmem.get)
    np.testing.assert_array_equal(out, source().compute())


class Recorder:
    """A target that records its writes and whether two ever overlapped."""

    shape, dtype, ndim = (100, 100), np.dtype("f8"), 2

    def __init__(self):
        self.data = np.zeros(self.shape)
        self.inside = 0
        self.overlapped = False
        self.pids = set()
        self.guard = threading.Lock()

    def __setitem__(self, index, value):
        with self.guard:
            self.inside += 1
            self.overlapped |= self.inside > 1
        threading.Event().wait(0.002)
        self.data[index] = value
        self.pids.add(os.getpid())
        with self.guard:
            self.inside -= 1


def test_store_into_an_object_is_written_by_the_caller_under_the_lock():
    target = Recorder()
    da.store(source(), target, lock=True, scheduler=dask_sharedmem.get)
    np.testing.assert_array_equal(target.data, source().compute())
    assert target.pids == {os.getpid()}
    assert not target.overlapped


def test_store_error_in_the_target_is_raised():
    class Refuses(Recorder):
        def __setitem__(self, index, value):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        da.store(source(), Refuses(), scheduler=dask_sharedmem.get)


def store_delayed_target(scheduler):
    """dask's dask/array/tests/test_array_core.py::test_store_delayed_target, computed
    with ``scheduler``; returns what was stored and what store returned, to compare."""
    from dask.array.utils import assert_eq
    from dask.delayed import delayed
    from dask.highlevelgraph import MaterializedLayer

    def assert_has_persisted_data(arr):  # dask's, without distributed's futures
        assert any(isinstance(layer, MaterializedLayer)
                   and any(isinstance(obj, np.ndarray) for obj in layer.mapping.values())
                   for layer in arr.dask.layers.values())

    out = []
    with dask.config.set(scheduler=scheduler):
        d = da.ones((4, 4), chunks=(2, 2))
        a, b = d + 1, d + 2

        # empty buffers to be used as targets
        targs = {}

        def make_target(key):
            a = np.empty((4, 4))
            targs[key] = a
            return a

        # delayed calls to these targets
        atd = delayed(make_target)("at")
        btd = delayed(make_target)("bt")

        # test not keeping result
        st = da.store([a, b], [atd, btd])

        at = targs["at"]
        bt = targs["bt"]

        assert st is None
        assert_eq(at, a)
        assert_eq(bt, b)
        out.append((at, bt))

        # test keeping result
        for st_compute in [False, True]:
            targs.clear()
            st = da.store([a, b], [atd, btd], return_stored=True, compute=st_compute)
            if st_compute:
                for arr in st:
                    assert_has_persisted_data(arr)

            st = dask.compute(*st)

            at = targs["at"]
            bt = targs["bt"]

            assert st is not None
            assert isinstance(st, tuple)
            assert all([isinstance(v, np.ndarray) for v in st])
            assert_eq(at, a)
            assert_eq(bt, b)
            assert_eq(st[0], a)
            assert_eq(st[1], b)
            out.append((at, bt, *st))

            pytest.raises(ValueError, lambda at=at, bt=bt: da.store([a], [at, bt]))
            pytest.raises(ValueError, lambda at=at: da.store(at, at))
    return out


def test_store_into_a_delayed_target(always_fork):
    """A target made by a task that depends on nothing is made by the caller, before the fork."""
    threads, here = both(store_delayed_target)
    assert len(here) == len(threads) == 3
    for ours, theirs in zip(here, threads, strict=True):
        for x, y in zip(ours, theirs, strict=True):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("return_stored", [False, True])
def test_store_into_a_delayed_target_fused_with_its_only_store(always_fork, return_stored):
    """One chunk: dask fuses the target's task, the store and the join into one task."""
    def store(scheduler):
        made = []

        def make_target():
            made.append(np.zeros((4, 4)))
            return made[-1]

        stored = da.store(da.ones((4, 4), chunks=4) + 1, dask.delayed(make_target)(),
                          return_stored=return_stored, compute=False)
        return made, dask.compute(stored, scheduler=scheduler)[0]

    (threads, threads_stored), (here, stored) = both(store)
    assert len(here) == len(threads) == 1
    np.testing.assert_array_equal(here[0], threads[0])
    np.testing.assert_array_equal(stored, threads_stored)


def test_a_delayed_target_that_is_wanted_is_the_object_written(always_fork):
    made = []

    def make_target():
        made.append(np.zeros((100, 100)))
        return made[-1]

    target = dask.delayed(make_target)()
    stored = da.store(source(), target, compute=False)
    threads = dask.compute(target, stored, scheduler="threads")
    assert len(made) == 1 and threads[0] is made[0]
    made.clear()
    here = dask.compute(target, stored, scheduler=dask_sharedmem.get)
    assert len(made) == 1 and here[0] is made[0]
    np.testing.assert_array_equal(here[0], source().compute())
    np.testing.assert_array_equal(here[1], threads[1])


def test_store_into_a_target_the_graph_computes_from_other_tasks_is_a_clear_error(always_fork):
    x = da.ones((4, 4), chunks=2)
    # made from a reduction of every chunk, which is not fused into the target's task;
    # small, so that it reaches the workers in their private memory (a large one comes
    # from its worker in shared memory, where the stores write in place)
    target = dask.delayed(lambda total: np.zeros((4, 4)) + 0 * total)(x.sum())
    with pytest.raises(RuntimeError, match="that the graph computes from other tasks"):
        da.store(x, target, scheduler=dask_sharedmem.get)


def test_to_hdf5(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "x.h5"
    with dask.config.set(scheduler=dask_sharedmem.get):
        da.to_hdf5(str(path), "/x", source())
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["/x"][...], source().compute())


@pytest.mark.parametrize("engine", ["netcdf4", "h5netcdf", "scipy"])
def test_xarray_to_netcdf(tmp_path, engine):
    xr = pytest.importorskip("xarray")
    pytest.importorskip({"netcdf4": "netCDF4", "h5netcdf": "h5netcdf", "scipy": "scipy"}[engine])
    values = np.random.default_rng(0).random((200, 50))
    ds = xr.Dataset({"t": (("x", "y"), values)}).chunk({"x": 50})
    path = tmp_path / "t.nc"
    with dask.config.set(scheduler=dask_sharedmem.get):
        ds.to_netcdf(path, engine=engine)
    with xr.open_dataset(path, engine=engine) as back:
        np.testing.assert_array_equal(back.t.values, values)


# -- callbacks see what dask's own schedulers show them -------------------------------

def test_posttask_sees_every_result_of_a_chain():
    seen = {}

    class Results(Callback):
        def _posttask(self, key, result, dsk, state, worker_id):
            seen[key] = result

    dsk = {"a": 1, "b": (lambda x: x + 1, "a"), "c": (lambda x: x * 10, "b"),
           "d": (lambda x: x - 1, "c")}
    with Results():
        assert dask_sharedmem.get(dsk, "d", num_workers=2) == 19
    assert seen == {"b": 2, "c": 20, "d": 19}


def test_dask_cache_serves_cached_results_without_running_them_again(tmp_path):
    pytest.importorskip("cachey")
    from dask.cache import Cache

    calls = dask_sharedmem.zeros((), dtype="i8")

    def slow(x):
        calls[...] += 1
        threading.Event().wait(0.05)
        return np.full(1000, x)

    parts = [dask.delayed(slow, pure=True)(i) for i in range(4)]
    total = dask.delayed(sum)(parts)
    cache = Cache(10**8)
    with cache:
        first = total.compute(scheduler=dask_sharedmem.get)
        assert calls == 4
        assert all(v is not None for v in cache.cache.data.values())
        again = total.compute(scheduler=dask_sharedmem.get)
    np.testing.assert_array_equal(again, first)
    assert calls == 4  # everything came from the cache


def test_start_callback_that_changes_the_graph_reaches_the_workers():
    class Replace(Callback):
        def _start(self, dsk):
            dsk["x"] = 41

    with Replace():
        assert dask_sharedmem.get({"x": (os.getpid,), "y": (lambda x: x + 1, "x")}, "y",
                                  num_workers=2) == 42


def test_start_callback_that_changes_a_delayed_target_gets_the_new_one_written(always_fork):
    """The target made before the fork is dropped with the old graph (it is made, and
    wasted, once: threads make only the new one)."""
    from dask._task_spec import Task

    made = []

    def make_target(name):
        made.append((name, np.zeros((100, 100))))
        return made[-1][1]

    target = dask.delayed(make_target)("old")

    class Replace(Callback):
        def _start(self, dsk):
            dsk[target.key] = Task(target.key, make_target, "new")

    stored = da.store(source(), target, compute=False)
    with Replace():
        value, _ = dask.compute(target, stored, scheduler=dask_sharedmem.get)
    assert [name for name, _ in made] == ["old", "new"]
    assert value is made[1][1]
    np.testing.assert_array_equal(value, source().compute())


def test_results_survive_pickling_outside_the_process():
    """A computed result must load in a process that never saw our shared memory."""
    big = dask_sharedmem.ones(100_000)
    nested = dask.delayed(lambda a: {"data": [a * 2, (a,)]})(big).compute(
        scheduler=dask_sharedmem.get)
    frame_result = frame(20_000, 4).compute(scheduler=dask_sharedmem.get)
    for value in (nested, frame_result):
        blob = pickle.dumps(value)
        out = subprocess.run(
            [sys.executable, "-c", "import pickle, sys; v = pickle.loads(sys.stdin.buffer.read());"
             "print(type(v).__name__)"], input=blob, capture_output=True, timeout=60)
        assert out.returncode == 0, out.stderr.decode()
    assert type(nested["data"][0]) is np.ndarray and type(nested["data"][1][0]) is np.ndarray
    assert all(type(b.values) is np.ndarray for b in frame_result._mgr.blocks)


# -- state every worker inherits -------------------------------------------------------

def test_workers_do_not_share_numpy_random_state():
    """np.random's global state is re-seeded in each worker (threads share one stream)."""
    np.random.seed(0)
    draws = dask.compute([dask.delayed(np.random.random, pure=False)() for _ in range(8)],
                         scheduler=dask_sharedmem.get, num_workers=2)[0]
    assert len(set(draws)) == 8
    with dask_sharedmem.MapReduce(np=2) as pool:
        pairs = pool.map(lambda i: (pool.local.rank, np.random.random()), range(8))
    assert len({v for _, v in pairs}) == 8


# -- a numpy target is left out of the workers' memory ------------------------------

def _dontfork_spans():
    """Start addresses of this process's mappings marked MADV_DONTFORK ("dc")."""
    spans, start = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                start = int(head.split("-")[0], 16)
            elif line.startswith("VmFlags:") and "dc" in line.split()[1:]:
                spans.append(start)
    return spans


@pytest.mark.usefixtures("always_fork")
def test_a_numpy_store_target_is_not_in_the_workers_memory():
    """The parent writes it: shared copy-on-write with the workers, every page it writes
    would be copied first.  Workers do not map it at all meanwhile; afterwards they do."""
    out = np.zeros((1024, 1024))  # 8 MB, made before the fork
    seen = []

    class Watch(Callback):
        def _start_state(self, dsk, state):
            seen.append(_dontfork_spans())

    x = da.from_array(np.arange(1024 * 1024.0).reshape(1024, 1024), chunks=256)
    with Watch():
        da.store(x + 1, out, scheduler=dask_sharedmem.get, num_workers=2, lock=False)
    np.testing.assert_array_equal(out, np.arange(1024 * 1024.0).reshape(1024, 1024) + 1)
    assert seen and seen[0], "the target should be left out of the workers' memory"
    assert _dontfork_spans() == []  # and given back to later forks


@pytest.mark.usefixtures("always_fork")
@pytest.mark.parametrize("how", ["return_stored", "read by another task"])
def test_a_numpy_store_target_that_a_task_reads_stays_in_their_memory(how):
    out = np.zeros(1 << 20)
    x = da.ones(1 << 20, chunks=1 << 18)
    seen = []

    class Watch(Callback):
        def _start_state(self, dsk, state):
            seen.append(_dontfork_spans())

    with Watch():
        if how == "return_stored":
            stored = da.store(x, out, return_stored=True, lock=False)
            assert stored.sum().compute(scheduler=dask_sharedmem.get, num_workers=2) == 1 << 20
        else:
            total = dask.delayed(lambda a: float(a.sum()))(out)
            task = da.store(x, out, compute=False, lock=False)
            dask.compute(task, total, scheduler=dask_sharedmem.get, num_workers=2)
    assert seen and seen[0] == []
    assert (out == 1).all()


@pytest.mark.usefixtures("always_fork")
def test_a_task_that_reads_an_unmapped_target_through_a_closure_is_told_why():
    out = np.zeros(1 << 20)
    x = da.ones(1 << 20, chunks=1 << 18)
    peek = da.ones(4, chunks=4).map_blocks(lambda b: b + out[1 << 19])  # unseen by the audit
    task = da.store(x, out, compute=False, lock=False)
    with pytest.raises(dask_sharedmem.WorkerDied, match="SIGSEGV.*not in the workers' memory"):
        dask.compute(task, peek, scheduler=dask_sharedmem.get, num_workers=2)
