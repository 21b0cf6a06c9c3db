"""Time the first call of a scheduler's ``get`` on a one-task graph, in a fresh process.

Usage: ``python _first_call.py SCHEDULER WORKERS`` with SCHEDULER one of sync,
threads, processes, distributed, sharedmem.  Prints one JSON line: the
seconds of the imports, of the first call, and for distributed of starting
the LocalCluster and its Client (between the imports and the call).
"""

import functools
import json
import logging
import sys
import time


def main() -> None:
    key, workers = sys.argv[1], int(sys.argv[2])
    out = {}
    t0 = time.perf_counter()
    import dask
    import dask.multiprocessing
    import dask.threaded
    from _work import inc

    client = cluster = None
    if key == "sync":
        get = dask.get
    elif key == "threads":
        get = functools.partial(dask.threaded.get, num_workers=workers)
    elif key == "processes":
        get = functools.partial(dask.multiprocessing.get, num_workers=workers)
    elif key == "sharedmem":
        import dask_sharedmem

        get = functools.partial(dask_sharedmem.get, num_workers=workers)
    elif key == "distributed":
        import distributed

        out["import"] = time.perf_counter() - t0
        t = time.perf_counter()
        cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1,
                                           processes=True, dashboard_address=None,
                                           silence_logs=logging.ERROR)
        client = distributed.Client(cluster, set_as_default=False)
        client.wait_for_workers(workers)
        out["cluster_start"] = time.perf_counter() - t
        get = client.get
    else:
        raise SystemExit(f"unknown scheduler {key!r}")
    out.setdefault("import", time.perf_counter() - t0)
    t = time.perf_counter()
    out["result"] = get({"x": (inc, 1)}, "x")
    out["first"] = time.perf_counter() - t
    if client is not None:
        client.close()
        cluster.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
