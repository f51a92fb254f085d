"""accuracy.png of an ablation, read in a second: the verdict and its primary cell in the title;
top row, one depth x difficulty heatmap per arm on the primary split (the box marks the cell
the verdict reads); bottom, the primary bucket's accuracy against test depth for every arm
beside the trivial baselines, and the training curves. Matplotlib's Agg backend: no display."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _value(v: Any) -> float:
    return float("nan") if v is None else float(v)


def plot_accuracy(record: dict[str, Any], path: Path) -> None:
    summary = record["summary"]
    cell = summary["primary_cell"]
    split, bucket = cell["split"], cell["bucket"]
    arms = summary["arms"]
    held = [b for b in record["task"].get("buckets", [])
            if any(a["grid"][split][d].get(b) is not None for a in arms for d in a["grid"][split])]
    buckets = ["all", *held] if len(held) > 1 else ["all"]  # one bucket is the same row as "all"
    if bucket not in buckets:
        buckets.append(bucket)
    never = set(summary.get("never_trained") or [])
    n = len(arms)
    fig = plt.figure(figsize=(max(12, 3.6 * n), 8.5))
    grid = fig.add_gridspec(2, max(n, 2), height_ratios=[1.1, 1])
    for i, a in enumerate(arms):
        ax = fig.add_subplot(grid[0, i])
        depths = list(a["grid"][split])
        data = np.array([[_value(a["grid"][split][d].get(b)) for d in depths] for b in buckets])
        ax.imshow(np.ma.masked_invalid(data), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for (r, c), v in np.ndenumerate(data):
            if not np.isnan(v):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if v > 0.6 else "white")
        if str(a["read_depth"]) in depths and bucket in buckets:
            c, r = depths.index(str(a["read_depth"])), buckets.index(bucket)
            ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, ec="red", lw=2))
        ax.set_xticks(range(len(depths)), depths, fontsize=8)
        ax.set_yticks(range(len(buckets)), [b + (" *" if b in never else "") for b in buckets], fontsize=8)
        ax.set_xlabel("test depth (passes / layers)")
        if i == 0:
            ax.set_ylabel(f"difficulty on {split} (* never trained)")
        ax.set_title(f"{a['name']}: {a['verdict']}", fontsize=10)

    ax_depth = fig.add_subplot(grid[1, 0])
    for a in arms:
        depths = [int(d) for d in a["grid"][split]]
        ys = [_value(a["grid"][split][str(d)].get(bucket)) for d in depths]
        ax_depth.plot(depths, ys, marker="o", label=a["name"])
    levels: dict[float, list[str]] = {}  # baselines at one level share one line and one label
    for name, cells in summary["baselines"].get(split, {}).items():
        v = cells.get(bucket)
        if v is not None:
            key = next((k for k in levels if abs(k - v) < 0.015), round(v, 3))
            levels.setdefault(key, []).append(name)
    for v, names in levels.items():
        ax_depth.axhline(v, ls=":", lw=1, color="grey")
        ax_depth.text(1.01, v, ", ".join(names), transform=ax_depth.get_yaxis_transform(), fontsize=7,
                      color="grey", va="center")
    if cell.get("depth"):
        ax_depth.axvline(cell["depth"], color="red", lw=1, alpha=0.5)
    ax_depth.set(xscale="log", xlabel="test depth", ylabel=f"accuracy on {split} / {bucket}",
                 title="primary bucket vs depth", ylim=(-0.02, 1.02))
    ax_depth.set_xticks(sorted({int(d) for a in arms for d in a["grid"][split]}))
    ax_depth.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax_curve = fig.add_subplot(grid[1, 1:])
    for a in arms:
        curves = [r["curve"] for r in record["per_seed"] if r["arm"] == a["name"] and r["curve"]]
        if not curves:
            continue
        k = min(len(c) for c in curves)
        mean = np.mean([[c[j][1] for j in range(k)] for c in curves], axis=0)
        ax_curve.plot([curves[0][j][0] for j in range(k)], mean, label=a["name"])
    ax_curve.set(xlabel="step", ylabel="train loss (smoothed, mean over seeds)", title="training",
                 yscale="log")
    for ax in (ax_depth, ax_curve):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{record['task']['name']}: {summary.get('verdict_line', summary['verdict'])}", fontsize=10,
                 wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
