"""dask's real clients on the scheduler: dask.dataframe, dask.bag and xarray.

Every workload runs twice, with dask's threads and with ``dask_sharedmem.get``
(2 workers), and the answers must be the same.  These are the programs users
run; they exercise what dask.array's tests do not (pandas objects and Python
objects as results, disk shuffles, files read and written by tasks).
"""

import os

import dask
import dask.bag as db
import numpy as np
import pytest

import dask_sharedmem

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_leaks")]

pd = pytest.importorskip("pandas")
dd = pytest.importorskip("dask.dataframe")


def both(compute):
    """``compute(scheduler)`` with threads and with sharedmem (2 workers)."""
    out = []
    for scheduler in ("threads", dask_sharedmem.get):
        # computes made while the graph is built (dask.bag's take) use it too
        with dask.config.set(num_workers=2, scheduler=scheduler):
            out.append(compute(scheduler))
    return tuple(out)


def canonical(obj):
    """A frame's or series' rows in one order, whichever partition each came from."""
    df = obj.to_frame() if isinstance(obj, pd.Series) else obj
    df = df.reset_index(drop=df.index.name is None and df.index.nlevels == 1)
    return df.sort_values(list(df.columns)).reset_index(drop=True)


# -- dask.dataframe ------------------------------------------------------------

def frames():
    rng = np.random.default_rng(0)
    n = 20_000  # columns of 160 kB: partitions travel in shared memory
    left = pd.DataFrame({"k": rng.integers(0, 50, n), "x": rng.random(n),
                         "y": rng.integers(0, 1000, n), "s": rng.choice(["a", "b", "c"], n)})
    right = pd.DataFrame({"k": np.arange(50), "w": np.arange(50) * 10.0})
    return dd.from_pandas(left, npartitions=8), dd.from_pandas(right, npartitions=3)


DATAFRAME = {
    "merge": lambda df, other: df.merge(other, on="k"),
    "merge_self": lambda df, other: df.merge(df[["k", "y"]].head(500, npartitions=-1), on="k"),
    "join": lambda df, other: df.set_index("k").join(other.set_index("k")),
    "set_index": lambda df, other: df.set_index("y"),
    "shuffle": lambda df, other: df.shuffle("k"),
    "sort_values": lambda df, other: df.sort_values(["y", "x"]),
    "groupby_agg": lambda df, other: df.groupby("k").agg({"x": ["sum", "mean"], "y": "max"}),
    "groupby_apply": lambda df, other: df.groupby("k").apply(
        lambda g: (g.x * g.y).sum() / len(g), meta=("v", "f8")),
    "drop_duplicates": lambda df, other: df[["k", "s"]].drop_duplicates(),
    "value_counts": lambda df, other: df.s.value_counts(),
    "rolling": lambda df, other: df.x.rolling(5).mean(),
    "cumsum": lambda df, other: df.y.cumsum(),
    "describe": lambda df, other: df[["x", "y"]].describe(),
    "nunique": lambda df, other: df.groupby("s").k.nunique(),
}


@pytest.mark.parametrize("method", ["disk", "tasks"])
@pytest.mark.parametrize("name", sorted(DATAFRAME))
def test_dataframe_matches_threads(name, method):
    if method == "tasks" and name not in ("merge", "set_index", "shuffle", "sort_values",
                                          "join", "drop_duplicates"):
        pytest.skip("no shuffle in this workload")
    with dask.config.set({"dataframe.shuffle.method": method}):
        threads, here = both(lambda s: DATAFRAME[name](*frames()).compute(scheduler=s))
    assert len(here) == len(threads) > 0
    if name in ("rolling", "cumsum", "sort_values", "describe"):  # the order is the answer
        pd.testing.assert_frame_equal(pd.DataFrame(here), pd.DataFrame(threads))
    else:
        pd.testing.assert_frame_equal(canonical(here), canonical(threads))


def test_dataframe_csv_round_trip(tmp_path):
    left, _ = frames()
    left.to_csv(str(tmp_path / "part-*.csv"), index=False, compute_kwargs={
        "scheduler": dask_sharedmem.get})
    assert len(os.listdir(tmp_path)) == left.npartitions
    threads, here = both(
        lambda s: dd.read_csv(str(tmp_path / "part-*.csv")).groupby("s").x.sum().compute(
            scheduler=s))
    pd.testing.assert_series_equal(here.sort_index(), threads.sort_index())


def test_large_numeric_columns_arrive_as_plain_numpy():
    left, _ = frames()
    out = left.compute(scheduler=dask_sharedmem.get)
    assert len(out) == 20_000
    for column in ("x", "y", "k"):
        assert type(out[column].to_numpy()) is np.ndarray


# -- dask.bag ------------------------------------------------------------------

WORDS = ("the quick brown fox jumps over the lazy dog and the dog sleeps " * 50).split()


BAG = {
    "map_filter": lambda b: b.map(lambda w: w.upper()).filter(lambda w: "O" in w),
    "frequencies": lambda b: b.frequencies(sort=True),
    "foldby": lambda b: b.foldby(len, lambda acc, w: acc + 1, 0, lambda a, c: a + c, 0),
    "groupby": lambda b: b.groupby(lambda w: w[0]).map(lambda kv: (kv[0], sorted(kv[1]))),
    "distinct": lambda b: b.distinct(),
    "pluck_sum": lambda b: b.map(lambda w: {"w": w, "n": len(w)}).pluck("n").sum(),
    "to_dataframe": lambda b: b.map(lambda w: {"w": w, "n": len(w)}).to_dataframe(),
}


@pytest.mark.parametrize("name", sorted(BAG))
def test_bag_matches_threads(name):
    threads, here = both(lambda s: BAG[name](db.from_sequence(WORDS, npartitions=6))
                         .compute(scheduler=s))
    if isinstance(threads, pd.DataFrame):
        pd.testing.assert_frame_equal(canonical(here), canonical(threads))
    elif isinstance(threads, list):
        assert sorted(map(repr, here)) == sorted(map(repr, threads))
    else:
        assert here == threads


def test_bag_word_count_of_text_files(tmp_path):
    for i in range(4):
        (tmp_path / f"{i}.txt").write_text("\n".join(" ".join(WORDS[i::4]) for _ in range(20)))
    threads, here = both(lambda s: db.read_text(str(tmp_path / "*.txt"))
                         .str.split().flatten().frequencies().compute(scheduler=s))
    assert sorted(here) == sorted(threads)
    assert dict(here)["the"] == WORDS.count("the") * 20


def test_bag_to_textfiles(tmp_path):
    with dask.config.set(scheduler=dask_sharedmem.get):
        db.from_sequence(WORDS, npartitions=3).map(str.upper).to_textfiles(
            str(tmp_path / "*.txt"))
    written = sorted(w for f in tmp_path.iterdir() for w in f.read_text().split())
    assert written == sorted(w.upper() for w in WORDS)


# -- xarray --------------------------------------------------------------------

def make_dataset():
    """Climate-like data on a shared array (a function, not a fixture: pytest would
    keep the fixture's shared memory alive past the leak check)."""
    xr = pytest.importorskip("xarray")
    rng = np.random.default_rng(1)
    temp = dask_sharedmem.empty((365, 40, 30))
    temp[...] = rng.random(temp.shape)
    return xr.Dataset(
        {"temp": (("time", "y", "x"), temp), "rain": (("time", "y", "x"), rng.random(temp.shape))},
        coords={"time": pd.date_range("2000-01-01", periods=365), "y": np.arange(40),
                "x": np.arange(30)},
    ).chunk({"time": 73})


XARRAY = {
    "mean": lambda ds: ds.mean("time"),
    "monthly": lambda ds: ds.groupby("time.month").mean(),
    "rolling": lambda ds: ds.rolling(time=7).mean(),
    "resample": lambda ds: ds.resample(time="MS").max(),
    "anomaly": lambda ds: ds.groupby("time.month") - ds.groupby("time.month").mean(),
}


@pytest.mark.parametrize("name", sorted(XARRAY))
def test_xarray_matches_threads(name):
    xr = pytest.importorskip("xarray")
    dataset = make_dataset()
    threads, here = both(lambda s: XARRAY[name](dataset).compute(scheduler=s))
    xr.testing.assert_allclose(here, threads)


@pytest.mark.parametrize("engine", ["netcdf4", "scipy"])
def test_xarray_netcdf_round_trip(tmp_path, engine):
    xr = pytest.importorskip("xarray")
    dataset = make_dataset()
    pytest.importorskip({"netcdf4": "netCDF4", "scipy": "scipy"}[engine])
    path = tmp_path / "d.nc"
    with dask.config.set(scheduler=dask_sharedmem.get):
        dataset.to_netcdf(path, engine=engine)
    with xr.open_dataset(path, engine=engine, chunks={"time": 73}) as back:
        threads, here = both(lambda s: back.groupby("time.month").mean().compute(scheduler=s))
        xr.testing.assert_allclose(here, threads)
        xr.testing.assert_allclose(here, dataset.groupby("time.month").mean().compute())
