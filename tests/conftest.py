"""Shared fixtures: the leak check every pool, MapReduce and scheduler test uses.

``no_leaks`` compares what this process owns before and after a test:

* its child processes (running or zombie): every worker must be reaped.
  Workers of sessions that closed normally are reaped lazily (by the next
  session, see pool.py), so both snapshots first wait for those: what is
  left is a leak;
* its open file descriptors: sockets, memfds, epoll objects must be closed;
* its live shared-memory segments (``memory._SEGMENTS``, after a garbage
  collection): shared memory must be freed once nothing refers to it;
* what it keeps for other processes to fetch (``channel._KEPT``).

Use it with ``pytestmark = pytest.mark.usefixtures("no_leaks")``.  A test
that already failed (or xfailed) is not checked: pytest keeps its traceback,
so its frames and their arrays, alive.
"""

from __future__ import annotations

import contextlib
import copyreg
import gc
import os
import signal
import textwrap
import threading

import pytest

from dask_sharedmem import channel, memory, pool

# A shell without job control starts background commands (``.ci/run &``) with
# SIGINT ignored, which every process it starts inherits: Python then has no
# KeyboardInterrupt, and the Ctrl-C tests (here and in their subprocesses, which
# inherit a handler as SIG_DFL) would wait for one.  Restore what a terminal gives.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def children(pid: int | None = None) -> dict[int, str]:
    """The child processes of ``pid`` (default: this process) -> their state letter.

    Zombies (state ``Z``) count: a child that exited but was not reaped is a leak.
    """
    pid = os.getpid() if pid is None else pid
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:  # it ended while we looked
            continue
        state, ppid = stat[stat.rindex(")") + 2:].split()[:2]  # the name may hold spaces
        if int(ppid) == pid:
            out[int(name)] = state
    return out


def subprocess_script(body: str) -> str:
    """A script for ``python -c`` that can use this module's helpers (``children()``)."""
    return (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
            "from conftest import children\n" + textwrap.dedent(body))


@contextlib.contextmanager
def ended(proc):
    """``with ended(subprocess.Popen(...)) as proc:`` -- on the way out, however
    the test went, a process still running is SIGKILLed (with its process group,
    if it leads one: its workers) and waited for.  ``with proc:`` alone only
    waits: a test that failed while its subprocess ignored a signal left it, and
    its workers, running after the suite."""
    try:
        with proc:
            try:
                yield proc
            finally:
                if proc.poll() is None:
                    try:
                        if os.getpgid(proc.pid) == proc.pid:
                            os.killpg(proc.pid, signal.SIGKILL)
                        else:
                            proc.kill()
                    except ProcessLookupError:
                        pass
    finally:
        proc.wait()


def status(field: str) -> int:
    """A field of /proc/self/status in bytes (e.g. VmRSS, VmHWM, RssAnon)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


class Unpicklable(Exception):
    """An exception that pickle refuses (it holds a lock)."""

    def __init__(self, msg):
        super().__init__(msg)
        self.lock = threading.Lock()


class TwoArgs(Exception):
    """An exception whose pickle does not rebuild (its __init__ wants two arguments)."""

    def __init__(self, a, b):
        super().__init__(f"{a} and {b}")


class Formatted(Exception):
    """An exception whose plain pickle rebuilds it wrong (its __init__ formats its argument)."""

    def __init__(self, value):
        super().__init__(f"bad value {value}")
        self.value = value


class BadStr(Exception):
    """An exception whose ``str()`` raises."""

    def __str__(self):
        raise RuntimeError("BadStr has no str()")


class _SlottedBase(Exception):
    __slots__ = ("code",)


class Slotted(_SlottedBase):
    """An exception that keeps its fields in ``__slots__`` of two classes, as
    numpy's AxisError keeps its own, and needs them for ``str()``.  Its
    ``__init__`` does not call the base's (neither does AxisError's): ``args``
    are what it was called with.  ``unset`` is never set; ``__private`` is
    mangled to ``_Slotted__private``."""

    __slots__ = ("detail", "unset", "__private")

    def __init__(self, code, detail):
        self.code, self.detail, self.__private = code, detail, [code]

    def __str__(self):
        return f"code {self.code}: {self.detail} {self.__private}"


class SlottedWithDict(Slotted):
    """Fields in ``__slots__`` and in ``__dict__`` too."""

    __slots__ = ("more",)

    def __init__(self, code, detail):
        super().__init__(code, detail)
        self.more = "a slot"
        self.note = "in __dict__"


class SlotHoldsLock(Exception):
    """An exception that pickle refuses: one of its slots holds a lock."""

    __slots__ = ("lock", "kept")

    def __init__(self, msg):
        super().__init__(msg)
        self.lock = threading.Lock()
        self.kept = "kept"


def slots(exc):
    """The ``__slots__`` of ``exc``'s classes that are set -> their values."""
    return {name: getattr(exc, name) for name in copyreg._slotnames(type(exc))
            if hasattr(exc, name)}


def seen(exc, cause=None, top=True):
    """What a caller can see of an exception: type, args, str(), attributes (in
    ``__dict__`` and in ``__slots__``), its chain.

    ``cause`` stands for the top one's ``__cause__``: an exception rebuilt from
    a worker has the worker's traceback there, and its original cause next.
    """
    if exc is None:
        return None
    try:
        text = str(exc)
    except Exception as e:
        text = f"str() raises {e!r}"
    return (type(exc), exc.args, text, vars(exc), slots(exc),
            seen(cause if top else exc.__cause__, top=False), seen(exc.__context__, top=False),
            None if top else exc.__suppress_context__)


def running(pid: int) -> bool:
    """Whether ``pid`` exists and has not ended (a zombie has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def open_fds() -> dict[int, str]:
    """This process's open file descriptors -> what they point to."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the descriptor listdir itself used
            continue
    return out


def live_segments() -> int:
    gc.collect()
    return len(memory._SEGMENTS)


def snapshot() -> dict:
    # workers that closed normally exit on their own and are reaped lazily: wait for them
    pool._reap_finished(block=True)
    segments = live_segments()
    return {"children": children(), "fds": open_fds(), "segments": segments,
            "kept": len(channel._KEPT)}


def leaks(before: dict, after: dict) -> list[str]:
    """Describe what ``after`` holds that ``before`` did not."""
    problems = []
    new_children = {p: s for p, s in after["children"].items() if p not in before["children"]}
    if new_children:
        problems.append(f"child processes left behind (pid: state): {new_children}")
    if after["kept"] > before["kept"]:
        problems.append(f"values kept for other processes grew from {before['kept']} to "
                        f"{after['kept']}")
    new_fds = {fd: t for fd, t in after["fds"].items() if before["fds"].get(fd) != t}
    if len(after["fds"]) > len(before["fds"]):
        problems.append(f"open file descriptors grew from {len(before['fds'])} to "
                        f"{len(after['fds'])}; new: {new_fds}")
    if after["segments"] > before["segments"]:
        problems.append(f"live shared segments grew from {before['segments']} "
                        f"to {after['segments']}")
    return problems


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item._call_failed = not report.passed  # an xfail too: its traceback is kept


@pytest.fixture
def no_leaks(request):
    """Fail the test if it leaves child processes, file descriptors or shared memory behind."""
    before = snapshot()
    yield before
    if getattr(request.node, "_call_failed", False):
        return
    problems = leaks(before, snapshot())
    assert not problems, "\n".join(problems)


# -- measurements ------------------------------------------------------------------

#: lines that tests add with :func:`measured`; printed in pytest's terminal summary
MEASUREMENTS: list[str] = []


def measured(line: str) -> None:
    """Print ``line`` now (``pytest -s``) and again in the summary at the end of the run.

    The fault, soak and scale tests use it for their numbers (time to error,
    resources before and after, peak memory), so that a plain ``pytest`` run
    still shows them together, without -s.
    """
    print("\n" + line)
    MEASUREMENTS.append(line)


def pytest_terminal_summary(terminalreporter):
    if MEASUREMENTS:
        terminalreporter.section("dask_sharedmem measurements")
        for line in MEASUREMENTS:
            terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def fresh_durations():
    """Each test starts with no task durations measured (scheduler.py runs a
    graph in the caller once its key names are known to be quick): tests
    reuse key names such as ``"a"``, and a graph of another test must not
    decide where this test's first call runs."""
    from dask_sharedmem import inline

    inline._DURATIONS.clear()
    inline._BY_PREFIX.clear()
    yield


@pytest.fixture
def always_fork():
    """Every scheduler call forks, even one that ran before and was quick
    (scheduler.py would run it in the caller): for tests about workers."""
    import dask

    with dask.config.set({"sharedmem.inline": 0}):
        yield


@pytest.fixture
def sessions(monkeypatch):
    """The list of worker sessions started during the test (their worker counts):
    how a test sees whether a call forked or ran in the caller."""
    started = []
    start = pool.Workers.start
    monkeypatch.setattr(pool.Workers, "start", lambda self: started.append(self.n) or start(self))
    return started
