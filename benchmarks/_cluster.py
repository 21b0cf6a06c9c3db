"""Run a ``distributed.LocalCluster`` until stdin closes; print its address first.

Usage: ``python _cluster.py WORKERS``.  The suite connects a ``Client`` to it
from its own process.  A LocalCluster's scheduler and nannies run in the
process that creates it: in the benchmark's own process they would compete
for the GIL with every other peer's calls and keep large graphs in its memory.
"""

import logging
import sys


def main() -> None:
    import distributed

    workers = int(sys.argv[1])
    with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                  dashboard_address=None,
                                  silence_logs=logging.ERROR) as cluster:
        print(cluster.scheduler_address, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
