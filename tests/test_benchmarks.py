"""The benchmark suite runs end to end: ``benchmarks/run.py --quick``, once.

A smoke test of the suite's output, never of its timings: every workload
prints a table, the JSON holds what the README says it holds, the plot is
drawn when matplotlib is installed, and dask_sharedmem itself is never "n/a"
(a wrong result from it would show as n/a: the suite checks every result).
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
RUN = ROOT / "benchmarks" / "run.py"

pytestmark = pytest.mark.timeout(300)

#: every workload: its label in the output, the dask_sharedmem rows it must have
WORKLOADS = {
    "tasks": ("1a", ["dask_sharedmem.get"]),
    "chain": ("1b", ["dask_sharedmem.get"]),
    "graph": ("1c", ["dask_sharedmem.get"]),
    "gil": ("2", ["dask_sharedmem.get"]),
    "compute": ("3a", ["dask_sharedmem.get"]),
    "store": ("3b", ["dask_sharedmem.get"]),
    "store-numpy": ("3c", ["dask_sharedmem.get"]),
    "transpose": ("3d", ["dask_sharedmem.get"]),
    "rechunk": ("3e", ["dask_sharedmem.get"]),
    "startup": ("4", ["dask_sharedmem.get: first call, fresh process",
                      "dask_sharedmem.get: repeated call",
                      "dask_sharedmem.get: repeated call, forked every call"]),
    "small": ("4b", ["dask_sharedmem.get", "dask_sharedmem.get, forked every call"]),
    "scaling": ("5", ["dask_sharedmem.MapReduce, 1 worker", "dask_sharedmem.get, 1 worker"]),
    "mapreduce-overhead": ("6", ["dask_sharedmem.MapReduce"]),
    "mapreduce-gil": ("7", ["dask_sharedmem.MapReduce",  # and the machine's limit beside it
                            "forked processes running the serial loop, no pool "
                            "(the machine's limit)"]),
    "mapreduce-results": ("7b", ["dask_sharedmem.MapReduce"]),
    "startup-scaling": ("8", [f"0.1 GB caller, {n} worker{'s' if n > 1 else ''}"
                              for n in (1, 2, 8)]),
    "bag": ("9a", ["dask_sharedmem.get"]),
    # dask.dataframe needs pandas and pyarrow (dask[dataframe]), not in the bench extra
    "dataframe": ("9b", ["dask_sharedmem.get"] if importlib.util.find_spec("pandas")
                  and importlib.util.find_spec("pyarrow") else []),
}
SCHEDULER_PEERS = ["dask sync", "dask threads", "dask processes", "distributed LocalCluster",
                   "dask_sharedmem.get"]
#: the workloads with a Dask-on-Ray row where ray is installed (the ray extra)
RAY, RAY_WORKLOADS = "Dask-on-Ray", ["tasks", "chain", "graph", "gil", "compute", "store"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    json_path, png_path = out / "results.json", out / "results.png"
    p = subprocess.run([sys.executable, str(RUN), "--quick", "--workers", "2",
                        "--json", str(json_path), "--plot", str(png_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=290)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p, json_path, png_path


def test_output_starts_with_the_machine(quick_run):
    p, _, _ = quick_run
    first = p.stdout.splitlines()[0]
    for what in ("CPUs", "GiB RAM", "Python", "numpy", "dask "):
        assert what in first, first


def test_a_table_for_each_workload(quick_run):
    p, _, _ = quick_run
    sections = re.split(r"^### ", p.stdout, flags=re.M)[1:]
    labels = [s.split(".", 1)[0] for s in sections]
    assert labels == [label for label, _ in WORKLOADS.values()]
    for section in sections:
        table = section.split("\n\n")[1].splitlines()  # after the title
        header = table[0]
        assert header.startswith("| peer | median (s) | min (s) | max (s) |"), header
        assert len(table) >= 3, section
        assert all(row.count("|") == header.count("|") for row in table), section
        assert "load average" in section
    assert "## Targets" in p.stdout


def test_json_has_every_workload_and_peer(quick_run):
    _, json_path, _ = quick_run
    doc = json.loads(json_path.read_text())
    assert {"machine", "config", "workloads", "targets", "cluster_startup_seconds",
            "ray_init_seconds", "ray_startup_seconds", "total_seconds"} <= set(doc)
    assert doc["config"]["quick"] is True
    by_name = {w["name"]: w for w in doc["workloads"]}
    assert set(by_name) == set(WORKLOADS)
    for name, (label, ours) in WORKLOADS.items():
        w = by_name[name]
        assert w["label"] == label
        assert {"title", "columns", "results", "derived", "notes", "plot", "loadavg",
                "cpu_pressure"} <= set(w)
        for peer, s in w["results"].items():
            if "error" in s:
                assert isinstance(s["error"], str) and s["error"]
            else:
                assert s["min"] <= s["median"] <= s["max"]
                assert len(s["runs"]) >= 1
                assert set(w["derived"][peer]) == set(w["columns"])
        for peer in ours:
            assert "error" not in w["results"][peer], (name, peer, w["results"][peer])
        if name in ("tasks", "chain", "graph", "gil", "compute", "store", "small", "bag",
                    "dataframe"):
            assert set(SCHEDULER_PEERS) <= set(w["results"])
    for name in ("compute", "store"):
        s = by_name[name]["results"]["dask_sharedmem.get"]
        assert "peak_rss_increase" in s.get("metrics", {}), s
    for row in WORKLOADS["startup-scaling"][1]:
        s = by_name["startup-scaling"]["results"][row]
        assert {"repeated", "map", "threads", "rss"} <= set(s["metrics"]), s
    for t in doc["targets"]:
        assert set(t) == {"target", "measured", "met"}


def test_ray_rows_or_one_line_saying_why_not(quick_run):
    p, json_path, _ = quick_run
    by_name = {w["name"]: w for w in json.loads(json_path.read_text())["workloads"]}
    with_ray = [name for name, w in by_name.items() if RAY in w["results"]]
    skipped = [line for line in p.stdout.splitlines() if RAY in line and "skipped" in line]
    if importlib.util.find_spec("ray") is None:
        assert with_ray == []
        assert len(skipped) == 1 and "ray is not installed" in skipped[0], skipped
    else:
        assert with_ray == RAY_WORKLOADS
        assert skipped == []


def test_plot_is_drawn(quick_run):
    p, _, png_path = quick_run
    if importlib.util.find_spec("matplotlib") is None:
        assert not png_path.exists()
        assert "matplotlib is not installed" in p.stderr
    else:
        assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
