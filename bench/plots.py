"""PNG plots of a bench report: overhead per workload next to the physical bound, and one step's timeline.

The timeline shows, for each mode, what the client saw during the first layers of one FlexGen token:
the host inside SDK calls, the modelled link and compute, and the crypto workers' CPU activity (sampled
from /proc while the step ran). In naive mode encryption sits inside the host's SDK calls and the device
waits for it; in PipeLLM mode the workers encrypt the next layer while the current one is on the link.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLORS = {"naive": "#d62728", "pipellm": "#2ca02c", "plain": "#7f7f7f", "bound": "#1f77b4"}


def overhead(report: dict[str, Any], path: Path) -> Path:
    res = report["workloads"]
    regimes = sorted({v["regime"] for v in res.values()}, key=lambda r: (r != "testbed", r))
    fig, axes = plt.subplots(len(regimes), 1, figsize=(12, 4.2 * len(regimes)), squeeze=False)
    for ax, regime in zip(axes[:, 0], regimes, strict=True):
        items = [(v["workload"], v) for v in res.values() if v["regime"] == regime]
        xs = range(len(items))
        w = 0.38
        naive = [v["overhead_pct"]["naive"] for _n, v in items]
        pllm = [v["overhead_pct"]["pipellm"] for _n, v in items]
        ax.bar([x - w / 2 for x in xs], naive, w, label="naive CC", color=COLORS["naive"])
        ax.bar([x + w / 2 for x in xs], pllm, w, label="PipeLLM", color=COLORS["pipellm"])
        for x, (_n, v) in zip(xs, items, strict=True):
            ax.hlines(v["bound_pct"], x - 0.45, x + 0.45, colors=COLORS["bound"], linewidth=2.5)
            ax.hlines(v["target_pct"], x + 0.02, x + 0.45, colors="k", linestyles="dotted", linewidth=1)
        ax.plot([], [], color=COLORS["bound"], linewidth=2.5, label="physical bound (B/C)")
        ax.plot([], [], color="k", linestyle="dotted", label="target")
        ax.set_xlim(-0.6, max(len(items), 4) - 0.4)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([n for n, _v in items], rotation=25, ha="right", fontsize=8)
        ax.set_ylabel("throughput drop vs plain (%)")
        ax.set_ylim(min(0, *pllm, *naive) - 2, 115)
        ax.set_yticks(range(0, 101, 20))
        ax.axhline(0, color="k", linewidth=0.6)
        ax.set_title(f"{regime} regime ({report['machine']['cores']} cores; {report['size']} run)", fontsize=10)
        ax.legend(fontsize=8, loc="upper center", ncol=4, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _busy(samples: list[tuple[float, float]], workers: int) -> list[tuple[float, float, float]]:
    """(start, end, fraction of the workers running) from (time, workers running) samples."""
    out = []
    for (t0, n), (t1, _n) in itertools.pairwise(samples):
        if t1 > t0:
            out.append((t0, t1, min(1.0, n / max(1, workers))))
    return out


def timeline(data: dict[str, Any], path: Path, layers: int = 6, workers: int = 2) -> Path:
    modes = [m for m in ("plain", "naive", "pipellm") if m in data]
    lanes = ["host", "link H2D", "compute", "workers"]
    fig, axes = plt.subplots(len(modes), 1, figsize=(12, 1.7 * len(modes) + 0.6), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes, strict=True):
        spans = data[mode]["spans"]
        computes = [s for s in spans if s.lane == "compute"]
        end = computes[min(layers, len(computes)) - 1].end if computes else max((s.end for s in spans), default=1)
        for s in spans:
            if s.lane not in lanes or s.start > end:
                continue
            y = lanes.index(s.lane)
            color = {"host": "#9467bd", "link H2D": COLORS["bound"], "compute": "#ff7f0e"}[s.lane]
            ax.barh(y, max(s.end - s.start, end / 2000) * 1e3, left=s.start * 1e3, height=0.6, color=color)
        for t0, t1, f in _busy(data[mode]["samples"], workers):
            if t0 <= end and f > 0.05:
                ax.barh(3, (t1 - t0) * 1e3, left=t0 * 1e3, height=0.6 * f, color=COLORS["pipellm"])
        ax.set_yticks(range(len(lanes)))
        ax.set_yticklabels(lanes, fontsize=8)
        ax.set_xlim(0, end * 1e3)
        ax.invert_yaxis()
        ax.set_title(f"{mode}: first {layers} layers of a FlexGen token ({data[mode]['regime']} regime)", fontsize=9)
    axes[-1, 0].set_xlabel("model time (ms); workers: bar height = share of crypto workers on a CPU (sampled)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(report: dict[str, Any], tl: dict[str, Any], out: Path, stamp: str) -> list[Path]:
    paths = [overhead(report, out / f"{stamp}-overhead.png")]
    if tl:
        paths.append(timeline(tl, out / f"{stamp}-timeline.png", workers=report["workers"]["pipellm"]))
    for p in list(paths):
        latest = out / p.name.replace(stamp, "latest")
        latest.write_bytes(p.read_bytes())
    return paths


__all__ = ["overhead", "render", "timeline"]
