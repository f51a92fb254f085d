"""The plots a person reads: accuracy.png of a real (tiny) ablation and curves.png of a real
training run. What was wrong before: baseline labels written on top of each other, log axes
labelled `2x10^0`, the primary cell only in the verdict text, and bands that could leave [0, 1]."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

import config  # noqa: E402
from harness import ablate  # noqa: E402
from harness.plot import figure, plot_accuracy, primary_label  # noqa: E402
from jobs.context import LocalContext  # noqa: E402

SPEC = {"task": "khop", "seeds": 3, "why": "a plotting test, not a claim", "steps": 12, "eval_examples": 10,
        "eval_depths": [1, 2, 4], "baseline": "flat-1", "primary": "hops2",
        "arms": [{"name": "refiner-k2", "arch": "refiner", "n_steps": 2, "set": {"d_model": 32}},
                 {"name": "flat-1", "arch": "reasoner", "n_steps": 1}]}


@pytest.fixture(scope="module")
def record(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One real ablation (2 arms x 3 seeds x 12 steps, a few seconds): its ablation.json."""
    import torch

    root = tmp_path_factory.mktemp("plot")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    mp = pytest.MonkeyPatch()
    try:
        mp.setenv("LAB_RUNS", str(root))
        ablate.run_ablation(ablate.parse_spec(SPEC), LocalContext(root / "abl", echo=lambda s: None))
    finally:
        mp.undo()
        torch.set_num_threads(before)
    return json.loads((root / "abl" / "ablation.json").read_text())


def test_the_title_names_the_primary_cell(record: dict) -> None:
    fig = figure(record)
    title = fig._suptitle.get_text()
    assert "primary cell hops2" in title and record["summary"]["verdict"] in title
    assert primary_label({"split": "sparse", "bucket": "7-8", "depth": 16}) == "sparse:7-8@16"


def test_one_heatmap_per_arm_with_the_cell_boxed(record: dict) -> None:
    fig = figure(record)
    heatmaps = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title().split(":")[0] for ax in heatmaps] == ["refiner-k2", "flat-1"]
    assert all(any(isinstance(p, matplotlib.patches.Rectangle) and p.get_edgecolor()[0] == 1.0
                   for p in ax.patches) for ax in heatmaps)  # the red box on the cell the verdict reads


def test_baselines_are_in_the_legend_not_written_over_each_other(record: dict) -> None:
    fig = figure(record)
    ax = next(ax for ax in fig.axes if ax.get_title().startswith("primary bucket"))
    assert not ax.texts  # no free-floating labels that could overlap
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    for name in record["summary"]["baselines"]["hops2"]:
        assert any(name in lab for lab in labels), (name, labels)


def test_ticks_are_plain_numbers(record: dict) -> None:
    fig = figure(record)
    fig.canvas.draw()
    for ax in fig.axes:
        for tick in [*ax.get_xticklabels(), *ax.get_yticklabels(),
                     *ax.get_xticklabels(minor=True), *ax.get_yticklabels(minor=True)]:
            text = tick.get_text()
            assert "times" not in text and "^" not in text and "×" not in text, (ax.get_title(), text)
    depth_ax = next(ax for ax in fig.axes if ax.get_title().startswith("primary bucket"))
    assert [t.get_text() for t in depth_ax.get_xticklabels()] == ["1", "2", "4"]


def test_seed_bands_stay_inside_zero_one(record: dict) -> None:
    fig = figure(record)
    ax = next(ax for ax in fig.axes if ax.get_title().startswith("primary bucket"))
    bands = [c for c in ax.collections if hasattr(c, "get_paths")]
    assert bands  # 3 seeds: every arm has a band
    for band in bands:
        for path in band.get_paths():
            ys = path.vertices[:, 1]
            assert ys.min() >= 0.0 and ys.max() <= 1.0


def test_plot_accuracy_writes_a_png(record: dict, tmp_path: Path) -> None:
    plot_accuracy(record, tmp_path / "accuracy.png")
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_training_run_writes_curves(trained_run: Path) -> None:
    """conftest's trained_run is a real 5-step train(): curves.png sits beside metrics.jsonl."""
    png = trained_run / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_a_failed_plot_does_not_fail_the_run(tmp_path: Path) -> None:
    """A run whose metrics cannot be read (here: none at all) still returns; the log says why."""
    from models.train import write_curves

    said: list[str] = []
    assert write_curves(tmp_path, LocalContext(tmp_path, echo=said.append)) is None
    assert any("curves.png not written" in s for s in said) or \
        "curves.png not written" in (tmp_path / "log.txt").read_text()
    assert config.preset("tiny")  # the config module still imports cleanly after matplotlib
