"""The machinery of the benchmark suite: registry, timing, tables, machine.

How it is organised, so that workloads and peers slot in without touching
the machinery::

    WORKLOADS  name -> Workload: title, setup(cfg) -> ctx, check(ctx, result),
               derived columns (us/task, speed-up over a baseline peer, ...),
               an optional probe (peak RSS) and what to plot
    RUNNERS    workload name -> [Runner(peer, make, note)], filled in
               registration order by the @runner("workload", "peer") decorator;
               make(ctx, cfg) returns the callable to time (or a Run with an
               untimed `before` hook) and may raise: the peer shows "n/a";
               a workload whose rows depend on the configuration gives
               them as Workload.rows(cfg) instead
    measure()  the one timing helper: warm each peer up, then time every
               peer `repeats` times round-robin (so that load from other
               processes on the machine spreads over all peers rather than
               hitting one), and report median, min and max per peer
    run_workload()  setup, measure, derived columns, table, load and pressure

A timed call may return ``Timed(seconds, result, metrics)`` to report a time
it measured itself (the first call in a fresh subprocess) and other figures.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import importlib.metadata
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
# --------------------------------------------------------------------------
# Configuration and registry
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Config:
    workers: int
    quick: bool
    repeats: int
    warmup: int
    timeout: float
    budget: float  # seconds of timed calls after which a slow peer stops at min_runs
    min_runs: int
    tasks: int = 5_000  # per-task overhead workloads
    overhead_items: int = 5_000  # MapReduce per-item overhead
    array_bytes: int = 512 * 2**20  # GIL-bound and large in/out workloads
    small_bytes: int = 32 * 2**20  # interactive-size compute (4b), --quick too
    chunks: int = 64
    step: int = 4  # every step-th element is summed in Python (serial ~2-4 s on 512 MB)
    text_bytes: int = 8 * 2**20  # dask.bag word count
    frame_rows: int = 2_000_000  # dask.dataframe groupby-aggregate
    scaling: list[int] = dataclasses.field(default_factory=list)  # worker counts
    only: list[str] = dataclasses.field(default_factory=list)  # workloads to run
    json: str | None = None
    plot: str | None = None


@dataclasses.dataclass
class Column:
    """A derived column: ``value(ctx, stats, results, peer)`` -> float or None."""

    header: str
    value: Callable[[Any, dict, dict, str], float | None]
    fmt: str = "{:.2f}"


@dataclasses.dataclass
class Plot:
    """One panel of the PNG.

    ``kind="barh"``: one bar per peer, ``value(ctx, stats, results)`` ->
    (median, low, high) in the axis' unit, or None.  ``kind="lines"``:
    ``series(ctx, results)`` -> {label: [(x, median, low, high), ...]}.
    """

    xlabel: str
    value: Callable[[Any, dict, dict], tuple[float, float, float] | None] | None = None
    series: Callable[[Any, dict], dict] | None = None
    kind: str = "barh"
    log: bool = False
    ref: float | None = None  # a vertical (barh) or horizontal (lines) reference line
    annotate: Callable[[Any, dict, dict], str | None] | None = None  # text beside a bar


@dataclasses.dataclass
class Workload:
    name: str
    label: str  # its number in the output, e.g. "1a"
    group: str  # heading it is listed under
    title: Callable[[Config, Any], str]  # heading with the sizes, given cfg and ctx
    setup: Callable[[Config], Any]  # -> ctx (sizes, data, expected result)
    check: Callable[[Any, Any], str | None]  # (ctx, result) -> None or what is wrong
    columns: list[Column] = dataclasses.field(default_factory=list)
    plot: Plot | None = None
    probe: Callable[[], Any] | None = None  # context manager around each timed call
    after: Callable[[Any, dict, dict], None] | None = None  # (ctx, results, notes): add rows
    teardown: Callable[[Any], None] = lambda ctx: None
    needs_cluster: bool = False  # uses the distributed LocalCluster
    footer: Callable[[Any, dict], str] | None = None  # text below the table
    rows: Callable[[Config], list[Runner]] | None = None  # peers that depend on the
    # configuration (sizes skipped by --quick), instead of the @runner-registered ones


@dataclasses.dataclass
class Runner:
    peer: str
    make: Callable[[Any, Config], Any]
    note: str | Callable[[Config], str] = ""  # a callable is given the configuration


@dataclasses.dataclass
class Run:
    """A timed call, an optional untimed hook run before each call, whether
    to warm up (not for calls that start a fresh process each time), and
    whether to check the result (not when the call checked it in the process
    that made it, and raises if it was wrong)."""

    call: Callable[[], Any]
    before: Callable[[], None] | None = None
    warmup: bool = True
    check: bool = True


@dataclasses.dataclass
class Timed:
    """What a call returns to report its own time (and other figures)."""

    seconds: float
    result: Any
    metrics: dict = dataclasses.field(default_factory=dict)


WORKLOADS: dict[str, Workload] = {}
RUNNERS: dict[str, list[Runner]] = {}


def workload(w: Workload) -> Workload:
    WORKLOADS[w.name] = w
    RUNNERS.setdefault(w.name, [])
    return w


def runner(workload_name: str, peer: str, note: str | Callable[[Config], str] = "") -> Callable:
    """Register ``make(ctx, cfg) -> callable | Run`` as ``peer`` for a workload."""

    def register(make: Callable) -> Callable:
        RUNNERS.setdefault(workload_name, []).append(Runner(peer, make, note))
        return make

    return register


class NotApplicable(Exception):
    """Raised by ``make`` when a peer cannot do the workload; the table says why."""


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise _Timeout in this process after ``seconds`` (timers do not survive fork)."""

    def expire(signum, frame):
        raise _Timeout(f"timed out after {seconds:g} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def why(e: BaseException) -> str:
    if isinstance(e, ImportError):
        return f"not installed ({e})"
    if isinstance(e, (_Timeout, NotApplicable)):
        return str(e)
    text = " ".join(str(e).split())
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@contextlib.contextmanager
def _no_probe() -> Iterator[dict]:
    yield {}


def _once(run: Run, timeout: float, probe: Callable[[], Any]
          ) -> tuple[float, float, Any, dict]:
    """Call once: (reported seconds, wall seconds, result, metrics)."""
    if run.before is not None:
        run.before()
    with _deadline(timeout), probe() as metrics:
        t0 = time.perf_counter()
        result = run.call()
        seconds = wall = time.perf_counter() - t0
    if isinstance(result, Timed):
        seconds, metrics = result.seconds, {**metrics, **result.metrics}
        result = result.result
    return seconds, wall, result, metrics


def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": values}


def measure(runs: dict[str, Run], cfg: Config,
            check: Callable[[Any], str | None] = lambda r: None,
            probe: Callable[[], Any] | None = None) -> dict[str, dict]:
    """Time each run: ``cfg.warmup`` untimed calls each, then ``cfg.repeats`` rounds.

    Every round calls every peer once, in registration order.  A peer whose
    timed calls took more than ``cfg.budget`` seconds in all (wall time)
    stops once it has ``cfg.min_runs`` of them (slow peers would otherwise
    dominate the run time).  A peer that raises, times out or returns a wrong result is
    dropped with the reason (``{"error": reason}``); the others go on.
    Returns, per peer, its median, min, max and all run times in seconds,
    and the same for every metric the probe or the call reported.
    """
    probe = probe or _no_probe
    times: dict[str, list[float]] = {peer: [] for peer in runs}
    spent = dict.fromkeys(runs, 0.0)
    metrics: dict[str, dict[str, list]] = {peer: {} for peer in runs}
    errors: dict[str, str] = {}

    def attempt(peer: str, timed: bool) -> None:
        try:
            seconds, wall, result, m = _once(runs[peer], cfg.timeout, probe)
            wrong = check(result) if runs[peer].check else None
            del result
            if wrong:
                raise ValueError(f"wrong result: {wrong}")
        except Exception as e:
            errors[peer] = why(e)
            print(f"  {peer}: n/a ({errors[peer]})", file=sys.stderr)
            return
        if timed:
            times[peer].append(seconds)
            spent[peer] += wall
            for k, v in m.items():
                metrics[peer].setdefault(k, []).append(v)

    def done(peer: str) -> bool:
        return peer in errors or (len(times[peer]) >= cfg.min_runs
                                  and spent[peer] > cfg.budget)

    for _ in range(cfg.warmup):
        for peer in runs:
            if peer not in errors and runs[peer].warmup:
                attempt(peer, timed=False)
    for r in range(cfg.repeats):
        for peer in runs:
            if not done(peer):
                attempt(peer, timed=True)
        print(f"  round {r + 1}/{cfg.repeats} done", file=sys.stderr)
    out = {}
    for peer in runs:
        if peer in errors:
            out[peer] = {"error": errors[peer]}
        else:
            out[peer] = stats(times[peer])
            ms = {k: stats(v) for k, v in metrics[peer].items()
                  if v and all(x is not None for x in v)}
            if ms:
                out[peer]["metrics"] = ms
    return out


# --------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


@contextlib.contextmanager
def peak_rss() -> Iterator[dict]:
    """Record ``peak_rss_increase``: this process's peak RSS during the block, in
    bytes, above its RSS just before.

    The kernel's high-water mark (VmHWM) is reset to the current RSS by
    writing 5 to ``/proc/self/clear_refs`` (Linux 4.0+); memory of worker
    processes is not counted.
    """
    gc.collect()
    m: dict = {}
    try:
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except (OSError, KeyError):
        before = None
    yield m
    m["peak_rss_increase"] = (None if before is None
                              else (_status_kib("VmHWM") - before) * 1024)


# --------------------------------------------------------------------------
# The distributed cluster: one for the whole run, started outside the timings
# --------------------------------------------------------------------------


class Cluster:
    """A ``distributed.LocalCluster`` (worker processes, one thread each) in a
    helper process (``_cluster.py``), and a ``Client`` to it in this one,
    started on first use and kept for every workload that needs it.

    ``startup`` is the seconds from starting the helper until the client is
    connected and every worker has joined.  The cluster runs apart because a
    LocalCluster's scheduler and nannies live in the process that creates
    it: here they would compete for the GIL with the other peers' calls
    (dask_sharedmem.get of a one-task graph went from 9 to 15 ms) and keep
    part of every large graph in this process's memory.
    """

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.client: Any = None
        self.startup: float | None = None
        self.error: str | None = None

    def get_client(self, cfg: Config) -> Any:
        if self.error:
            raise NotApplicable(f"the LocalCluster did not start: {self.error}")
        if self.client is None:
            import distributed

            print(f"  starting distributed.LocalCluster(n_workers={cfg.workers}) "
                  "in a helper process", file=sys.stderr)
            t0 = time.perf_counter()
            try:
                with _deadline(min(cfg.timeout, 120)):
                    self.proc = subprocess.Popen(
                        [sys.executable, os.path.join(HERE, "_cluster.py"), str(cfg.workers)],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                    assert self.proc.stdout is not None
                    address = self.proc.stdout.readline().strip()
                    if not address:
                        raise RuntimeError(f"exit status {self.proc.wait()}")
                    self.client = distributed.Client(address, set_as_default=False)
                    self.client.wait_for_workers(cfg.workers)
            except Exception as e:
                self.error = why(e)
                self.close()
                raise
            self.startup = time.perf_counter() - t0
        return self.client

    def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()
        if self.proc is not None:
            with contextlib.suppress(Exception):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self.client = self.proc = None


CLUSTER = Cluster()


# --------------------------------------------------------------------------
# Derived columns
# --------------------------------------------------------------------------


def per_unit(header: str, count: Callable[[Any], int], scale: float = 1e6,
             fmt: str = "{:.1f}") -> Column:
    """Median time per unit of work (µs per task, per item)."""
    return Column(header, lambda ctx, s, res, peer: s["median"] / count(ctx) * scale, fmt)


def speedup(peer: str, header: str | None = None) -> Column:
    """``peer``'s median time / this row's: above 1 means this row is faster."""

    def value(ctx, s, results, row):
        base = results.get(peer)
        if not base or "median" not in base:
            return None
        return base["median"] / s["median"]

    return Column(header or f"speed-up vs {peer}", value, "{:.2f}x")


def metric(name: str, header: str, scale: float = 1.0, fmt: str = "{:.0f}") -> Column:
    """The median of a metric the probe or the call recorded."""

    def value(ctx, s, results, peer):
        m = s.get("metrics", {}).get(name)
        return None if m is None else m["median"] * scale

    return Column(header, value, fmt)


def time_bar(scale: float = 1.0) -> Callable:
    """Plot value: the row's median, min and max time times ``scale``."""
    return lambda ctx, s, res: (s["median"] * scale, s["min"] * scale, s["max"] * scale)


def speedup_bar(peer: str) -> Callable:
    """Plot value: speed-up over ``peer``'s median; the whiskers use this row's max and min."""

    def value(ctx, s, results):
        base = results.get(peer)
        if not base or "median" not in base:
            return None
        b = base["median"]
        return b / s["median"], b / s["max"], b / s["min"]

    return value


# --------------------------------------------------------------------------
# Machine and reporting
# --------------------------------------------------------------------------


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict:
    import numpy as np

    import dask_sharedmem

    return {
        "cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "memory_gib": round(dask_sharedmem.total_memory() / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "dask": version("dask"),
        "dask_sharedmem": dask_sharedmem.__version__,
        "peers": {d: version(d) for d in ("distributed", "joblib", "mpire", "sharedmem",
                                          "ray")},
        "loadavg_at_start": round(os.getloadavg()[0], 2),
        "shmem_huge_pages": dask_sharedmem.memory.shmem_huge_pages(),
    }


def machine_line(m: dict) -> str:
    peers = ", ".join(f"{k} {v}" for k, v in m["peers"].items())
    return (f"Machine: {m['cpus']} CPUs ({m['usable_cpus']} usable), "
            f"{m['memory_gib']} GiB RAM, {m['platform']}; Python {m['python']}, "
            f"numpy {m['numpy']}, dask {m['dask']}, dask_sharedmem {m['dask_sharedmem']}; "
            f"{peers}; load average {m['loadavg_at_start']} at start; huge pages for "
            f"shared memory: {m.get('shmem_huge_pages', 'not recorded')} (the kernel's "
            "shmem_enabled: with never, shared memory has 4 KiB pages)")


def fmt_seconds(seconds: float) -> str:
    return f"{seconds:.3g}"


def table(w: Workload, results: dict[str, dict], derived: dict[str, dict],
          notes: dict[str, str], cfg: Config) -> str:
    heads = "".join(f" {c.header} |" for c in w.columns)
    lines = [f"| peer | median (s) | min (s) | max (s) |{heads} notes |",
             "|---|---:|---:|---:|" + "---:|" * len(w.columns) + "---|"]
    for peer, s in results.items():
        if "error" in s:
            na = " n/a |" * len(w.columns)
            lines.append(f"| {peer} | n/a | n/a | n/a |{na} {s['error']} |")
            continue
        cells = ""
        for c in w.columns:
            v = derived[peer].get(c.header)
            cells += f" {'n/a' if v is None else c.fmt.format(v)} |"
        note = notes.get(peer, "")
        if len(s["runs"]) != cfg.repeats:
            extra = f"median of {len(s['runs'])} runs"
            note = f"{note}; {extra}" if note else extra
        lines.append(f"| {peer} | {fmt_seconds(s['median'])} | {fmt_seconds(s['min'])} | "
                     f"{fmt_seconds(s['max'])} |{cells} {note} |")
    return "\n".join(lines)


def _cpu_stall_us() -> int | None:
    """Microseconds some runnable task has waited for a CPU since boot (Linux PSI)."""
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().rsplit("total=", 1)[1])
    except (OSError, IndexError, ValueError):
        return None


def contention(report: dict, cpus: int) -> str:
    """One sentence on how busy the machine was while a workload ran."""
    before, after = report["loadavg"]
    text = f"1-minute load average {before} before, {after} after"
    pressure = report["cpu_pressure"]
    if pressure is not None:
        text += (f"; CPU pressure {pressure:.0%} (the share of the time "
                 "some runnable task waited for a CPU)")
    if (max(before, after) > cpus) if pressure is None else (pressure > 0.1):
        text += (". Tasks waited for the CPUs -- other programs', or this benchmark's "
                 "own when a parent and its workers outnumber the CPUs -- and speed-ups "
                 "are capped by that")
    text += f". This process's RSS before the setup: {report['rss_before'] / 2**20:.0f} MB"
    return text + "."


def _trim() -> None:
    """Give freed heap memory back to the system (glibc's ``malloc_trim``).

    After a workload frees its arrays, glibc keeps much of that memory
    mapped (its mmap threshold grows as large blocks are freed, so later
    ones come from the heap): 360 MB of RSS stayed after ``compute``, every
    later fork copied its page tables, and a one-task dask_sharedmem.get
    took 16 to 22 ms instead of 13.  Each workload starts from a clean process.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def run_workload(w: Workload, cfg: Config) -> dict:
    """Set up, time every peer, compute derived columns and plot data, tear down."""
    print(f"[{w.name}] setting up", file=sys.stderr)
    t_start = time.perf_counter()
    gc.collect()
    rss = _status_kib("VmRSS") * 1024  # forks copy page tables: a large parent forks slower
    ctx = w.setup(cfg)
    runners = RUNNERS[w.name] if w.rows is None else w.rows(cfg)
    load_before = os.getloadavg()[0]
    stall_before, t_before = _cpu_stall_us(), time.perf_counter()
    try:
        title = w.title(cfg, ctx)
        runs: dict[str, Run] = {}
        results: dict[str, dict] = {}
        notes = {}
        for r in runners:
            notes[r.peer] = r.note(cfg) if callable(r.note) else r.note
            try:
                made = r.make(ctx, cfg)
                runs[r.peer] = made if isinstance(made, Run) else Run(made)
            except Exception as e:
                results[r.peer] = {"error": why(e)}
                print(f"  {r.peer}: n/a ({results[r.peer]['error']})", file=sys.stderr)
        print(f"[{w.name}] {len(runs)} peers, {cfg.warmup} warm-up + {cfg.repeats} runs each",
              file=sys.stderr)
        results.update(measure(runs, cfg, check=lambda res: w.check(ctx, res), probe=w.probe))
        results = {r.peer: results[r.peer] for r in runners}  # registration order
        if w.after is not None:
            w.after(ctx, results, notes)
        derived = {p: ({} if "error" in s else
                       {c.header: c.value(ctx, s, results, p) for c in w.columns})
                   for p, s in results.items()}
        plot = _plot_data(w, ctx, results)
        text = table(w, results, derived, notes, cfg)
        if w.footer is not None:
            text += "\n\n" + w.footer(ctx, results)
    finally:
        w.teardown(ctx)
        gc.collect()
        _trim()
    load = (round(load_before, 2), round(os.getloadavg()[0], 2))
    stall = _cpu_stall_us()
    pressure = (None if stall is None or stall_before is None else
                (stall - stall_before) / 1e6 / (time.perf_counter() - t_before))
    return {"name": w.name, "label": w.label, "group": w.group, "title": title,
            "columns": [c.header for c in w.columns], "results": results,
            "derived": derived, "notes": notes, "plot": plot, "table": text,
            "loadavg": load, "cpu_pressure": pressure, "rss_before": rss,
            "seconds": time.perf_counter() - t_start}


def _plot_data(w: Workload, ctx: Any, results: dict) -> dict | None:
    """What plot.py draws, computed now (the ctx is gone once the workload ends)."""
    p = w.plot
    if p is None:
        return None
    data: dict = {"kind": p.kind, "xlabel": p.xlabel, "log": p.log, "ref": p.ref}
    if p.kind == "lines":
        assert p.series is not None
        data["series"] = p.series(ctx, results)
        return data
    assert p.value is not None
    bars = []
    for peer, s in results.items():
        v = None if "error" in s else p.value(ctx, s, results)
        text = None if "error" in s or p.annotate is None else p.annotate(ctx, s, results)
        bars.append({"peer": peer, "value": v, "text": text})
    data["bars"] = bars
    return data
