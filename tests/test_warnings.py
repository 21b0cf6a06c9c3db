"""Warnings issued in workers reach the caller, as they do with threads.

Each case runs the same work with threads (dask's threaded scheduler, or
``MapReduceByThread``) and with processes, under the same filters, and the
caller must see the same warnings the same number of times.
"""

import subprocess
import sys
import warnings

import dask.array as da
import numpy as np
import pytest

import dask_sharedmem
from dask_sharedmem import MapReduce, MapReduceByThread

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_leaks")]


def negative_roots():
    """A dask array whose sqrt warns in every chunk (numpy's RuntimeWarning)."""
    return da.sqrt(da.from_array(np.array([-1.0, 4.0] * 50), chunks=10))


def user_warning(i):
    warnings.warn(f"careful with {i % 3}", UserWarning)
    return i


def seen(record):
    return sorted((w.category.__name__, str(w.message), w.filename, w.lineno) for w in record)


def record(run, action=None):
    with warnings.catch_warnings(record=True) as caught:
        if action:
            warnings.simplefilter(action)
        run()
    return seen(caught)


def test_pytest_warns_around_a_compute_and_a_map():
    with pytest.warns(RuntimeWarning, match="invalid value encountered in sqrt"):
        negative_roots().compute(scheduler=dask_sharedmem.get)
    with MapReduce(np=2) as pool, pytest.warns(UserWarning) as caught:
        assert pool.map(user_warning, range(6)) == list(range(6))
    assert {str(w.message) for w in caught} == {"careful with 0", "careful with 1",
                                                "careful with 2"}


@pytest.mark.parametrize("action", [None, "always", "once", "module"])
def test_compute_shows_each_warning_as_often_as_threads(action):
    threads = record(lambda: negative_roots().compute(scheduler="threads"), action)
    here = record(lambda: negative_roots().compute(scheduler=dask_sharedmem.get,
                                                   num_workers=2), action)
    assert here == threads and here


@pytest.mark.parametrize("action", [None, "always", "once"])
def test_map_shows_each_warning_as_often_as_threads(action):
    with MapReduceByThread(np=2) as pool:
        threads = record(lambda: pool.map(user_warning, range(12)), action)
    with MapReduce(np=2) as pool:
        here = record(lambda: pool.map(user_warning, range(12)), action)
    assert here == threads and here


def test_a_location_already_warned_in_the_caller_stays_quiet():
    """The default filter shows a location once: the caller's registry decides."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        user_warning(0)
        with MapReduce(np=2) as pool:
            pool.map(user_warning, [3, 6])
    assert len(caught) == 1


def test_ignored_warnings_stay_ignored():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        negative_roots().compute(scheduler=dask_sharedmem.get)
    assert caught == []


def test_background_warnings_come_home():
    with pytest.warns(UserWarning, match="careful with 1"):
        assert dask_sharedmem.background(user_warning, 4).wait() == 4


def test_warning_of_a_category_that_cannot_be_pickled_arrives_as_user_warning():
    def work(i):
        class Local(UserWarning):
            pass

        warnings.warn("only here", Local)
        return i

    with MapReduce(np=2) as pool, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pool.map(work, range(2))
    assert {(w.category, str(w.message).split(".")[-1]) for w in caught} == {
        (UserWarning, "Local: only here")}


def test_warnings_before_an_error_arrive_too():
    def work(i):
        warnings.warn("first this", UserWarning)
        raise ValueError("then this")

    with pytest.warns(UserWarning, match="first this"), pytest.raises(ValueError):
        dask_sharedmem.get({"x": (work, 1)}, "x")


def test_error_filter_raises_in_the_task_with_the_task_named():
    script = """
import dask, dask.array as da, numpy as np, dask_sharedmem
x = da.sqrt(da.from_array(np.array([-1.0, 4.0] * 50), chunks=50))
try:
    x.compute(scheduler=dask_sharedmem.get, num_workers=2)
except RuntimeWarning as e:
    print(type(e).__name__, "|", e, "|", e.__cause__)
"""
    out = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", script],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    name, message, cause = out.stdout.split(" | ", 2)
    assert name == "RuntimeWarning" and message == "invalid value encountered in sqrt"
    assert "in a worker process, in task (" in cause and "sqrt" in cause
    assert "Traceback" not in out.stderr


@pytest.mark.skipif(sys.version_info < (3, 12), reason="Python 3.12 added the warning")
def test_forks_with_other_threads_alive_warn_only_where_the_user_forks():
    """Python 3.12+ warns at every os.fork() while another thread runs.  Ours are
    filtered (pool._fork): a compute or a map with dask's threads pool alive (as
    after any compute with scheduler="threads") shows what threads show, nothing
    more; an os.fork() of the user's still warns, and no filter is left behind."""
    import os
    import threading

    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    filters = list(warnings.filters)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert da.ones(10, chunks=5).sum().compute(scheduler="sharedmem") == 10
            with MapReduce(np=2) as pool:
                assert pool.map(abs, [-1, -2]) == [1, 2]
            assert dask_sharedmem.background(abs, -3).wait() == 3
            assert caught == []
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
        assert [(w.category, w.filename) for w in caught] == [(DeprecationWarning, __file__)]
        assert "is multi-threaded, use of fork() may lead to deadlocks" in str(caught[0].message)
        assert warnings.filters == filters
    finally:
        stop.set()
        thread.join()
