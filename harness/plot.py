"""accuracy.png of an ablation: accuracy against test depth and against difficulty (split) per
arm with interval bars, and the training curves. Matplotlib's Agg backend: no display needed."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402


def _bar(iv: dict[str, float]) -> tuple[float, float]:
    """(lower, upper) error lengths; zero where the interval is undefined (one seed)."""
    m, lo, hi = iv["mean"], iv["low"], iv["high"]
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return 0.0, 0.0
    return m - lo, hi - m


def plot_accuracy(record: dict[str, Any], path: Path) -> None:
    summary = record["summary"]
    splits, primary = record["task"]["splits"], summary["primary"]
    fig, (ax_depth, ax_split, ax_curve) = plt.subplots(1, 3, figsize=(15, 4.2))
    for a in summary["arms"]:
        depths = sorted(int(d) for d in a["by_depth"])
        ivs = [a["by_depth"][str(d)][primary] for d in depths]
        if depths:
            err = np.array([_bar(iv) for iv in ivs]).T
            ax_depth.errorbar(depths, [iv["mean"] for iv in ivs], yerr=err, marker="o", capsize=3,
                              label=a["name"])
        ivs = [a["splits"][s] for s in splits]
        err = np.array([_bar(iv) for iv in ivs]).T
        ax_split.errorbar(range(len(splits)), [iv["mean"] for iv in ivs], yerr=err, marker="o", capsize=3,
                          label=a["name"])
    for name, value in summary["baselines"].get(primary, {}).items():
        if isinstance(value, float) and not math.isnan(value):  # trivial predictors, for scale
            ax_depth.axhline(value, ls=":", lw=1, color="grey")
            ax_depth.text(1.01, value, name, transform=ax_depth.get_yaxis_transform(), fontsize=7,
                          color="grey", va="center")
    ax_depth.set(xscale="log", xlabel="test depth", ylabel=f"accuracy on {primary}",
                 title="accuracy vs test depth", ylim=(-0.02, 1.02))
    ax_depth.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax_depth.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
    ax_split.set(xlabel="split (harder to the right)", ylabel="accuracy", title="accuracy vs difficulty",
                 ylim=(-0.02, 1.02))
    ax_split.set_xticks(range(len(splits)), splits)
    arm_names = [a["name"] for a in summary["arms"]]
    for name in arm_names:
        curves = [r["curve"] for r in record["per_seed"] if r["arm"] == name and r["curve"]]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        steps = [c[i][0] for i, c in zip(range(n), [curves[0]] * n, strict=True)]
        mean = np.mean([[c[i][1] for i in range(n)] for c in curves], axis=0)
        ax_curve.plot(steps, mean, label=name)
    ax_curve.set(xlabel="step", ylabel="train loss (smoothed, mean over seeds)", title="training",
                 yscale="log")
    for ax in (ax_depth, ax_split, ax_curve):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{record['task']['name']}: verdict {summary['verdict']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
