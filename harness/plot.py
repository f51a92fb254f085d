"""accuracy.png of an ablation, read in a second: the verdict and its primary cell in the title;
top row, one depth x difficulty heatmap per arm on the primary split (the box marks the cell
the verdict reads); bottom, the primary bucket's accuracy against test depth for every arm (a
band of its 95% interval over seeds, clipped to [0, 1]) beside the trivial baselines (in the
legend, so their labels never overlap), and the training curves. Ticks are plain numbers.
Matplotlib's Agg backend: no display."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _value(v: Any) -> float:
    return float("nan") if v is None else float(v)


def primary_label(cell: dict[str, Any]) -> str:
    """split[:bucket][@depth], as the spec's `primary` is written."""
    out = cell["split"] + (f":{cell['bucket']}" if cell.get("bucket") not in (None, "all") else "")
    return out + (f"@{cell['depth']}" if cell.get("depth") else "")


def _seed_band(record: dict[str, Any], arm: str, split: str, bucket: str,
               depths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """A 95% t interval of the mean over seeds at each depth, clipped to [0, 1] (an accuracy
    cannot leave it, and an unclipped band drew below zero at few seeds); nan under 2 seeds."""
    from scipy import stats

    lo, hi = np.full(len(depths), np.nan), np.full(len(depths), np.nan)
    for i, d in enumerate(depths):
        vals = [r["grid"].get(str(d), {}).get(split, {}).get(bucket) for r in record["per_seed"]
                if r["arm"] == arm]
        vals = [float(v) for v in vals if v is not None]
        if len(vals) < 2:
            continue
        m, se = float(np.mean(vals)), float(np.std(vals, ddof=1) / np.sqrt(len(vals)))
        half = float(stats.t.ppf(0.975, len(vals) - 1)) * se
        lo[i], hi[i] = max(0.0, m - half), min(1.0, m + half)
    return lo, hi


def plot_accuracy(record: dict[str, Any], path: Path) -> None:
    fig = figure(record)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def figure(record: dict[str, Any]) -> Any:
    """The whole figure (a matplotlib Figure), unsaved: tests read its axes."""
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
        depths = sorted(int(d) for d in a["grid"][split])
        ys = [_value(a["grid"][split][str(d)].get(bucket)) for d in depths]
        line, = ax_depth.plot(depths, ys, marker="o", label=a["name"])
        lo, hi = _seed_band(record, a["name"], split, bucket, depths)
        if np.isfinite(lo).any():
            ax_depth.fill_between(depths, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
    levels: dict[float, list[str]] = {}  # baselines at one level share one line and one label
    for name, cells in summary["baselines"].get(split, {}).items():
        v = cells.get(bucket)
        if v is not None:
            key = next((k for k in levels if abs(k - v) < 0.015), round(v, 3))
            levels.setdefault(key, []).append(name)
    # Baselines go in the legend, each with its own dash pattern: labels written beside the lines
    # overlapped whenever two baselines sat close together.
    dashes = [(0, (1, 1)), (0, (4, 2)), (0, (6, 2, 1, 2)), (0, (2, 3)), (0, (8, 3))]
    for i, (v, names) in enumerate(sorted(levels.items())):
        ax_depth.axhline(v, ls=dashes[i % len(dashes)], lw=1.2, color="grey",
                         label=f"{', '.join(names)} ({v:.2f})")
    if cell.get("depth"):
        ax_depth.axvline(cell["depth"], color="red", lw=1, alpha=0.5)
    ax_depth.set(xscale="log", xlabel="test depth (log scale)", ylabel=f"accuracy on {split} / {bucket}",
                 title="primary bucket vs depth (band: 95% over seeds)", ylim=(-0.02, 1.02))
    ax_depth.set_xscale("log", base=2)
    ax_depth.set_xticks(sorted({int(d) for a in arms for d in a["grid"][split]}))
    # Plain integers at the tested depths and no minor labels: matplotlib's default log
    # formatter writes minor ticks as `2x10^0`, which nobody reads as "depth 2".
    ax_depth.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _pos: f"{x:g}"))
    ax_depth.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax_curve = fig.add_subplot(grid[1, 1:])
    for a in arms:
        curves = [r["curve"] for r in record["per_seed"] if r["arm"] == a["name"] and r["curve"]]
        if not curves:
            continue
        k = min(len(c) for c in curves)
        mean = np.mean([[c[j][1] for j in range(k)] for c in curves], axis=0)
        ax_curve.plot([curves[0][j][0] for j in range(k)], mean, label=a["name"],
                      marker="o" if k < 5 else None)  # a curve of one or two points is a dot, not nothing
    # Linear: the loss falls by a few units, and a log axis only added unreadable minor labels.
    ax_curve.set(xlabel="step", ylabel="train loss (smoothed, mean over seeds)", title="training")
    for ax in (ax_depth, ax_curve):
        handles, _labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=8, loc="best")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{record['task']['name']}, primary cell {primary_label(cell)}: "
                 f"{summary.get('verdict_line', summary['verdict'])}", fontsize=10, wrap=True)
    fig.tight_layout()
    return fig
