"""Draw a benchmark run (the JSON of ``run.py --json``) as one PNG, a panel per workload.

Usage: ``python benchmarks/plot.py results.json results.png``.  Needs matplotlib;
without it ``plot()`` returns a message and draws nothing.

Bars are medians with min-max whiskers; a dashed line marks a reference
(speed-up 1, the 10 ms start-up target, parallel efficiency 1).
"""

from __future__ import annotations

import json
import math
import sys
import textwrap


def plot(doc: dict, path: str) -> str:
    """Draw ``doc`` into ``path``; return what happened, in one line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    panels = [w for w in doc["workloads"] if w.get("plot")]
    if not panels:
        return "nothing to plot"
    cols = 2
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(16, 4.2 * rows), squeeze=False)
    for ax, w in zip(axes.flat, panels):
        data = w["plot"]
        if data["kind"] == "lines":
            _lines(ax, data)
        else:
            _bars(ax, data)
        ax.set_title("\n".join(textwrap.wrap(f"{w['label']}. {_short(w['title'])}", 70)),
                     fontsize=9, loc="left")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    m = doc["machine"]
    fig.suptitle(f"dask_sharedmem benchmarks: {m['usable_cpus']} CPUs, {m['memory_gib']} GiB, "
                 f"Python {m['python']}, numpy {m['numpy']}, dask {m['dask']}; "
                 f"{doc['config']['workers']} workers"
                 f"{' (--quick)' if doc['config']['quick'] else ''}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return f"Plot written to {path}"


def _short(title: str) -> str:
    return title.split(":")[0].replace("`", "")


def _bars(ax, data: dict) -> None:
    bars = [b for b in data["bars"] if b["value"] is not None]
    missing = [b["peer"] for b in data["bars"] if b["value"] is None]
    labels = [textwrap.shorten(b["peer"], 48) for b in bars] + [
        textwrap.shorten(p, 40) + " (n/a)" for p in missing]
    ys = range(len(labels))
    med = [b["value"][0] for b in bars]
    lo = [b["value"][0] - b["value"][1] for b in bars]
    hi = [b["value"][2] - b["value"][0] for b in bars]
    colors = ["tab:red" if "sharedmem" in b["peer"] and "0.3.8" not in b["peer"]
              else "tab:blue" for b in bars]
    ax.barh(list(ys)[:len(bars)], med, xerr=[lo, hi], color=colors, capsize=2, height=0.6)
    ax.set_yticks(list(ys), labels, fontsize=7)
    ax.invert_yaxis()
    if data["log"]:
        ax.set_xscale("log")
    if data.get("ref") is not None:
        ax.axvline(data["ref"], color="gray", linestyle="--", linewidth=1)
    for y, b in zip(ys, bars):
        text = f"{b['value'][0]:.3g}" + (f"  {b['text']}" if b.get("text") else "")
        ax.annotate(text, (b["value"][2], y), xytext=(4, -3), textcoords="offset points",
                    fontsize=7)
    ax.set_xlabel(data["xlabel"], fontsize=8)
    ax.margins(x=0.25)


def _lines(ax, data: dict) -> None:
    for peer, points in data["series"].items():
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        err = [[p[1] - p[2] for p in points], [p[3] - p[1] for p in points]]
        ours = "sharedmem" in peer
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=peer,
                    linewidth=2.5 if ours else 1.2, linestyle="-" if ours else "--")
    if data.get("ref") is not None:
        ax.axhline(data["ref"], color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel(data["xlabel"], fontsize=8)
    ax.set_ylabel("parallel efficiency (speed-up / workers)", fontsize=8)
    ax.set_ylim(0, 1.15)
    xs = sorted({p[0] for pts in data["series"].values() for p in pts})
    if xs:
        ax.set_xticks(xs)
    ax.legend(fontsize=7, loc="lower left")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.split("\n\n")[1])
    with open(sys.argv[1]) as f:
        print(plot(json.load(f), sys.argv[2]))
