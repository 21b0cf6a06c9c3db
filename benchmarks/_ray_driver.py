"""Dask-on-Ray's rows, timed in a process of their own: ``ray.init`` once, then calls on request.

Usage: ``python _ray_driver.py CONFIG_JSON`` (``bench_ray.RayDriver`` starts it).
It answers ``{"init": seconds}`` once Ray is up, then one JSON line per request
read from stdin (the protocol is drawn in bench_ray.py), and shuts Ray down
when stdin closes.  Answers go to the stdout it was started with; Ray's own
output and its workers' (Ray forwards their prints to its driver) go to stderr.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    def answer(reply: dict) -> None:
        answers.write(json.dumps(reply) + "\n")
        answers.flush()

    # Before ray.init: Ray gives its workers the driver's sys.path, and they
    # import the work functions (_work.py) from here.
    sys.path.insert(0, HERE)
    from harness import Config, why

    cfg = Config(**json.loads(sys.argv[1]))
    try:
        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=cfg.workers, include_dashboard=False, logging_level=logging.WARNING)
        init = time.perf_counter() - t0
    except Exception as e:
        answer({"error": f"ray.init failed: {why(e)}"})
        return
    answer({"init": init})
    try:
        _serve(cfg, answer)
    finally:
        ray.shutdown()


def _serve(cfg: Any, answer: Callable[[dict], None]) -> None:
    """Answer requests until stdin closes; one workload set up at a time."""
    from bench_scheduler import CALLS
    from harness import WORKLOADS, Run, why

    state: dict = {}

    def teardown() -> None:
        if "ctx" in state:
            state["workload"].teardown(state["ctx"])
        state.clear()
        gc.collect()

    def setup(name: str) -> None:
        teardown()
        w = WORKLOADS[name]
        state.update(workload=w, ctx=w.setup(cfg))
        try:
            made = CALLS[name][0]("ray", state["ctx"], cfg)
        except Exception:  # the row is n/a: free the workload's arrays now
            teardown()
            raise
        state["run"] = made if isinstance(made, Run) else Run(made)

    try:
        for line in sys.stdin:
            request = json.loads(line)
            try:
                if request["op"] == "setup":
                    setup(request["workload"])
                    answer({})
                else:
                    answer(_time(state["workload"], state["ctx"], state["run"]))
            except Exception as e:
                answer({"error": why(e)})
    finally:
        teardown()


def _time(w: Any, ctx: Any, run: Any) -> dict:
    """One call of ``run`` as harness.measure makes it, within the workload's probe."""
    if run.before is not None:
        run.before()
    probe = w.probe or (lambda: contextlib.nullcontext({}))
    with probe() as metrics:
        t0 = time.perf_counter()
        result = run.call()
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "metrics": metrics, "wrong": w.check(ctx, result)}


if __name__ == "__main__":
    main()
