"""Dask-on-Ray as a peer of the dask scheduler workloads, timed in a helper process.

``ray.util.dask.ray_dask_get`` as a dask scheduler, a row on workloads 1a,
1b, 1c (per-task overhead), 2 (GIL-bound) and 3a, 3b (large in and out),
where ray is installed (``pip install -e ".[ray]"``).  Where it is not, the
suite prints one line saying so (``skipped``) and runs without these rows.

``ray.init`` takes seconds, so it runs once, outside the timings, in a helper
process (``_ray_driver.py``) that stays up while workloads need it.  The
helper is Ray's driver (``ray_dask_get`` submits tasks from the process that
called ``ray.init``), so it also times the calls.  Not the suite's own
process: importing ray there added 133 MB to its RSS, every later fork
copies those page tables, and a one-task ``dask_sharedmem.get`` forked every
call went from 4.2-4.6 ms to 7.9-8.9 ms, for every workload after the first
Ray row.  The helper runs the workload's own setup, so its graph is the one
the other peers get, and the workload's probe and result check::

    run.py's process (RayDriver)            _ray_driver.py
      the first Ray row: start it    --->   import ray; ray.init(num_cpus=N)
                                     <---   {"init": seconds}
      Runner.make(ctx, cfg)          --->   {"op": "setup", "workload": name}:
                                            teardown the last, setup(cfg),
                                            CALLS[name]("ray", ctx, cfg)
                                     <---   {} or {"error": why it cannot}
      each warm-up and timed call    --->   {"op": "call"}: before(); time call()
                                            within the probe; check the result
                                     <---   {"seconds", "metrics", "wrong"}
      no later workload needs Ray:   --->   stdin closed: teardown, ray.shutdown()
      close()

A call that times out or is interrupted leaves the helper mid-call: it is
stopped, and the Ray rows after it show why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import json
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any

from bench_scheduler import CALLS, RAY
from harness import RUNNERS, WORKLOADS, Config, NotApplicable, Run, Runner, Timed, why

_DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ray_driver.py")

#: the workloads with a Ray row
RAY_WORKLOADS = ("tasks", "chain", "graph", "gil", "compute", "store")


class RayDriver:
    """The helper process ``_ray_driver.py``, started at the first Ray row.

    ``startup``: seconds from starting it until ``ray.init`` returned
    (imports included); ``init``: ``ray.init`` alone, timed in the helper.
    """

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.startup: float | None = None
        self.init: float | None = None
        self.error: str | None = None

    def prepare(self, name: str, cfg: Config) -> Run:
        """Set workload ``name`` up in the helper; the Run that times one call there."""
        if self.error:
            raise NotApplicable(f"the Ray helper stopped: {self.error}")
        if self.proc is None:
            self._start(cfg)
        self._ask({"op": "setup", "workload": name}, cfg.timeout)
        # The suite's deadline is around each call: no timeout of our own there.
        return Run(self._call, check=False)

    def _start(self, cfg: Config) -> None:
        print(f"  starting Ray (ray.init(num_cpus={cfg.workers})) in a helper process",
              file=sys.stderr)
        t0 = time.perf_counter()
        # A session of its own: Ctrl-C reaches this process only, which stops the
        # helper, and a kill reaches Ray's own processes too (close).
        self.proc = subprocess.Popen(
            [sys.executable, _DRIVER, json.dumps(dataclasses.asdict(cfg))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.init = self._ask(None, min(cfg.timeout, 120))["init"]
        self.startup = time.perf_counter() - t0

    def _call(self) -> Timed:
        reply = self._ask({"op": "call"}, None)
        if reply["wrong"]:
            raise ValueError(f"wrong result: {reply['wrong']}")
        return Timed(reply["seconds"], None, reply["metrics"])

    def _ask(self, request: dict | None, timeout: float | None) -> dict:
        """Send ``request`` (None: only read) and read the answer; stop the helper
        if it cannot answer, since it would answer the next request late."""
        try:
            assert self.proc is not None and self.proc.stdin and self.proc.stdout
            if request is not None:
                self.proc.stdin.write(json.dumps(request) + "\n")
                self.proc.stdin.flush()
            if timeout is not None and not select.select([self.proc.stdout], [], [], timeout)[0]:
                raise TimeoutError(f"no answer from the Ray helper in {timeout:g} s")
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the Ray helper exited with status {self.proc.wait()}")
            reply = json.loads(line)
        except BaseException as e:  # a timeout or Ctrl-C too: the helper is mid-call
            self.error = why(e)
            self.close(kill=True)
            raise
        if "error" in reply:
            if request is None:  # ray.init failed: no Ray row can run
                self.error = reply["error"]
                self.close()
            raise NotApplicable(reply["error"])
        return reply

    def close(self, kill: bool = False) -> None:
        """Stop the helper: it tears down, shuts Ray down and exits when stdin
        closes; ``kill``: at once, with Ray's processes (its process group)."""
        if self.proc is None:
            return
        try:
            if kill:
                raise subprocess.TimeoutExpired(self.proc.args, 0)
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            # Ray's agents outlive a killed driver by a minute or more: the whole group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


DRIVER = RayDriver()


def installed() -> bool:
    return importlib.util.find_spec("ray") is not None


def needed(names: list[str]) -> bool:
    """Whether any of the workloads ``names`` has a Ray row."""
    return installed() and any(n in RAY_WORKLOADS for n in names)


def skipped(names: list[str]) -> str | None:
    """The line to print when workloads ``names`` would have a Ray row but ray is missing."""
    if installed() or not any(n in RAY_WORKLOADS for n in names):
        return None
    return (f"The `{RAY}` peer (`ray.util.dask.ray_dask_get`, workloads "
            f"{', '.join(WORKLOADS[n].label for n in RAY_WORKLOADS)}) is skipped: ray is not "
            'installed (`pip install -e ".[ray]"`).')


def startup_line(cfg: Config) -> str:
    return (f"The `{RAY}` rows run in a helper process, Ray's driver, started before "
            f"their first call, outside the timings: `ray.init(num_cpus={cfg.workers})` "
            f"took {DRIVER.init:.2f} s, {DRIVER.startup:.2f} s with the helper's imports.")


def _make(name: str, ctx: Any, cfg: Config) -> Run:
    return DRIVER.prepare(name, cfg)


def _note(name: str, cfg: Config) -> str:
    return CALLS[name][1]("ray", cfg)


if installed():
    for _name in RAY_WORKLOADS:
        RUNNERS[_name].append(Runner(RAY, functools.partial(_make, _name),
                                     functools.partial(_note, _name)))
