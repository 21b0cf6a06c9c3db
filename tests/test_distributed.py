"""Graphs built on shared arrays run on dask.distributed, by value.

A ``LocalCluster`` with worker *processes* does not share our memory: shared
arrays cross to its workers by value (pickle protocol 5, the data out of band
beside the handle) and results come back as ordinary arrays.

The cluster runs in a subprocess of its own.  distributed keeps state for the
life of the interpreter (multiprocessing's resource tracker, its offload
thread, and a scheduler whose forgotten tasks -- shared arrays included --
are freed only when some later garbage collection gets to them), which the
``no_leaks`` check of this process would rightly count against the test.
"""

import json
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("distributed",
                    reason="dask.distributed is not installed (pip install distributed)")

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_leaks")]

SCRIPT = textwrap.dedent("""
    import json

    import dask
    import dask.array as da
    import distributed
    import numpy as np

    import dask_sharedmem


    def shared_arange(shape):
        a = dask_sharedmem.zeros(shape)
        a[...] = np.arange(a.size, dtype=float).reshape(shape)
        return a


    def main():
        a = shared_arange((200, 150))
        b = dask_sharedmem.full((200, 150), 2.0)
        x = da.from_array(a, chunks=(50, 75))
        y = da.from_array(b, chunks=(100, 50))
        expr = (x * y + 1).sum(axis=0)
        expected = (np.asarray(a) * 2.0 + 1).sum(axis=0)
        out = {}
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                      dashboard_address=None) as cluster, \\
                distributed.Client(cluster) as client:
            workers = client.run(lambda: __import__("os").getpid())
            out["worker_pids"] = sorted(workers.values())
            out["graph"] = bool(np.allclose(client.compute(expr).result(), expected))
            # the client is now dask's default scheduler
            out["default"] = bool(np.allclose(expr.compute(), expected))
            chunks = client.compute(x[::2, 1::3] * 1).result()
            out["chunks_type"] = type(chunks).__name__
            out["chunks"] = bool(np.array_equal(chunks, np.asarray(a)[::2, 1::3]))
            # a shared array passed to a task directly travels by value too
            out["submit"] = float(client.submit(np.sum, a).result()) == float(a.sum())
            parts = [dask.delayed(np.sum)(a[i:i + 50]) for i in range(0, 200, 50)]
            out["delayed"] = float(dask.compute(sum(parts))[0]) == float(a.sum())
        # the same graph, afterwards, on the sharedmem scheduler
        out["sharedmem"] = bool(np.allclose(
            expr.compute(scheduler="sharedmem", num_workers=2), expected))
        print(json.dumps(out), flush=True)


    if __name__ == "__main__":
        main()
""")


def test_graph_on_shared_arrays_runs_on_local_cluster(tmp_path):
    script = tmp_path / "on_cluster.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=100, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(set(out.pop("worker_pids"))) == 2
    assert out.pop("chunks_type") == "ndarray"
    assert out == {"graph": True, "default": True, "chunks": True, "submit": True,
                   "delayed": True, "sharedmem": True}
