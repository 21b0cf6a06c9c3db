"""dask's clients: a dask.bag and a dask.dataframe computation on the scheduler peers.

Registered with the suite (``python benchmarks/run.py --only clients``):

* ``bag``: a word count, ``db.from_sequence(lines).str.split().flatten()
  .frequencies()``: pure-Python work on strings, which holds the GIL, so
  processes should beat threads;
* ``dataframe``: ``dd.from_pandas(df).groupby("key").agg({"x": "sum", "y":
  "mean"})``: mostly pandas' compiled code on numeric columns.

Both run on the five peers of bench_scheduler.py, with the scheduler passed
explicitly (a bag's default scheduler is processes, a dataframe's threads).
The collection is built once in the setup, its data in this process's memory
as a user's would be (``from_sequence`` and ``from_pandas`` embed the
partitions in the graph); threads' answer, computed there untimed, is what
every peer must return.  A plain-Python or pandas row without dask gives
the floor.
"""

from __future__ import annotations

import collections
import string
import types
from typing import Any

import dask
import numpy as np
from bench_scheduler import SYNC, THREADS, compute_kwargs, each_scheduler
from harness import Config, Plot, Workload, runner, speedup, speedup_bar, workload

GROUP = "dask's clients"


def _clear(ctx: Any) -> None:
    """Drop the data and graphs before the suite trims the heap."""
    ctx.__dict__.clear()

# --------------------------------------------------------------------------
# dask.bag: word count
# --------------------------------------------------------------------------

_VOCABULARY = 5_000
_WORDS_PER_LINE = 80
_BAG_PARTITIONS = 32


def text_lines(nbytes: int, seed: int = 0) -> list[str]:
    """About ``nbytes`` of text: lines of 80 words drawn from 5,000 random
    lowercase words of 2 to 9 letters; the same lines for the same arguments.

    Long lines keep the parent's share small: dask walks every element of a
    ``from_sequence`` partition in the parent when it converts the graph, the
    same for every peer (12 MB took 1.15 s with the sync scheduler in lines
    of 10 words, 0.65 s in lines of 80).

    >>> lines = text_lines(10_000)
    >>> len(lines[0].split()), 8_000 < sum(map(len, lines)) < 12_000
    (80, True)
    """
    rng = np.random.default_rng(seed)
    letters = np.array(list(string.ascii_lowercase))
    vocabulary = ["".join(rng.choice(letters, k)) for k in rng.integers(2, 10, _VOCABULARY)]
    per_line = (np.mean([len(w) for w in vocabulary]) + 1) * _WORDS_PER_LINE
    words = rng.integers(0, _VOCABULARY, (max(1, round(nbytes / per_line)), _WORDS_PER_LINE))
    return [" ".join(vocabulary[i] for i in row) for row in words.tolist()]


def _bag_setup(cfg: Config) -> Any:
    import dask.bag as db

    lines = text_lines(cfg.text_bytes)
    bag = (db.from_sequence(lines, npartitions=_BAG_PARTITIONS)
           .str.split().flatten().frequencies())
    expected = dict(dask.compute(bag, **compute_kwargs("threads", cfg))[0])
    return types.SimpleNamespace(lines=lines, bag=bag, expected=expected,
                                 nbytes=sum(map(len, lines)), words=len(lines) * _WORDS_PER_LINE)


def _bag_check(ctx: Any, result: Any) -> str | None:
    pairs = list(result.items() if isinstance(result, dict) else result)
    if len(pairs) != len(ctx.expected) or dict(pairs) != ctx.expected:
        return "the word counts differ from dask threads'"
    return None


#: both workloads: speed-ups over threads and sync, plotted over threads
_COLUMNS = [speedup(THREADS, "speed-up vs threads"), speedup(SYNC, "speed-up vs sync")]
_PLOT = Plot("speed-up over dask threads (log)", value=speedup_bar(THREADS), ref=1.0, log=True)


workload(Workload(
    name="bag",
    label="9a",
    group=GROUP,
    title=lambda cfg, ctx: (
        f"dask.bag word count: `db.from_sequence(lines, npartitions={_BAG_PARTITIONS})"
        ".str.split().flatten().frequencies()` on "
        f"{ctx.nbytes / 2**20:.2g} MB of text ({len(ctx.lines):,} lines of "
        f"{_WORDS_PER_LINE} words from a {_VOCABULARY:,}-word vocabulary, {ctx.words:,} "
        f"words): pure-Python work that holds the GIL; {cfg.workers} workers"),
    setup=_bag_setup,
    check=_bag_check,
    columns=_COLUMNS,
    plot=_PLOT,
    teardown=_clear,
    needs_cluster=True,
))


@runner("bag", "plain Python (reference, no dask)",
        note="`collections.Counter` over `line.split()` of every line, in this process")
def _bag_plain(ctx, cfg):
    lines = ctx.lines
    return lambda: collections.Counter(w for line in lines for w in line.split())


def _bag_make(key, ctx, cfg):
    kw = compute_kwargs(key, cfg)
    return lambda: dask.compute(ctx.bag, **kw)[0]


each_scheduler("bag", _bag_make)

# --------------------------------------------------------------------------
# dask.dataframe: groupby-aggregate
# --------------------------------------------------------------------------

_KEYS = 1_000
_FRAME_PARTITIONS = 16
_AGG = {"x": "sum", "y": "mean"}


def frame(rows: int, seed: int = 0) -> Any:
    """A pandas DataFrame: ``key`` (int64, 1,000 values) and two float64
    columns of small integers, so that every sum is exact in any order and
    all peers must agree to the last bit."""
    import pandas as pd

    i = np.arange(rows)
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"key": rng.integers(0, _KEYS, rows),
                         "x": (i % 1000).astype("f8"), "y": (i % 7).astype("f8")})


def _frame_setup(cfg: Config) -> Any:
    ctx = types.SimpleNamespace(rows=cfg.frame_rows, error=None, nbytes=cfg.frame_rows * 24)
    try:
        import dask.dataframe as dd
    except ImportError as e:  # pandas and pyarrow: dask[dataframe], not in the bench extra
        ctx.error = e
        return ctx
    ctx.df = frame(cfg.frame_rows)
    ctx.agg = dd.from_pandas(ctx.df, npartitions=_FRAME_PARTITIONS).groupby("key").agg(_AGG)
    ctx.expected = dask.compute(ctx.agg, **compute_kwargs("threads", cfg))[0].sort_index()
    return ctx


def _frame_check(ctx: Any, result: Any) -> str | None:
    if not hasattr(result, "sort_index") or not result.sort_index().equals(ctx.expected):
        return "the aggregate differs from dask threads'"
    return None


def _frame_footer(ctx: Any, results: dict) -> str:
    return ("`dd.from_pandas` embeds the frame's partitions in the graph: dask processes "
            "and distributed pickle each partition to the process that runs its task; "
            "threads and forked workers read them where they are.")


workload(Workload(
    name="dataframe",
    label="9b",
    group=GROUP,
    title=lambda cfg, ctx: (
        f"dask.dataframe groupby-aggregate: `dd.from_pandas(df, npartitions="
        f"{_FRAME_PARTITIONS}).groupby('key').agg({_AGG})` on {ctx.rows:,} rows (an int64 "
        f"key of {_KEYS:,} values, two float64 columns: {ctx.nbytes / 2**20:.0f} MB); "
        f"{cfg.workers} workers"),
    setup=_frame_setup,
    check=_frame_check,
    columns=_COLUMNS,
    plot=_PLOT,
    teardown=_clear,
    needs_cluster=True,
    footer=_frame_footer,
))


@runner("dataframe", "pandas (reference, no dask)",
        note="`df.groupby('key').agg(...)` on the whole frame, in this process")
def _frame_pandas(ctx, cfg):
    if ctx.error:
        raise ctx.error
    return lambda: ctx.df.groupby("key").agg(_AGG)


def _frame_make(key, ctx, cfg):
    if ctx.error:
        raise ctx.error
    kw = compute_kwargs(key, cfg)
    return lambda: dask.compute(ctx.agg, **kw)[0]


each_scheduler("dataframe", _frame_make)
