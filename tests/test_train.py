"""models/train.py, the train and eval jobs, and `lab train` / `lab eval`: a complete run,
exact resume, NaN stop, wall-clock budget, atomic checkpoints, the schedule."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import config
from cli import main
from jobs.context import LocalContext
from models.data import TokenData, ensure_sample_data
from models.train import (
    BEST,
    LAST,
    TrainingDiverged,
    evaluate,
    load_checkpoint,
    load_model,
    lr_at,
    make_optimizer,
    save_atomic,
    train,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_sample_data(tmp_path_factory.mktemp("runs"))


class Interrupted(Exception):
    """Stands in for a kill: raised from inside the loop, after some steps."""


class Recorder(LocalContext):
    """A quiet context that records progress and can interrupt the run at a given step."""

    def __init__(self, run_dir: Path, stop_at: int | None = None):
        super().__init__(run_dir, echo=lambda s: None)
        self.steps: list[tuple[int, int]] = []
        self.stop_at = stop_at

    def progress(self, step: int, total: int, **metrics: float) -> None:
        super().progress(step, total, **metrics)
        self.steps.append((step, total))
        if step == self.stop_at:
            raise Interrupted(step)


def tiny(arch: str = "refiner", **overrides: Any) -> config.Config:
    base: dict[str, Any] = dict(block_size=32, batch_size=4, max_steps=8, warmup_steps=2, log_interval=1,
                                eval_interval=4, ckpt_interval=3, eval_batches=2, threads=1)
    return config.preset("tiny", arch, **{**base, **overrides})


def records(run_dir: Path, event: str) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def test_a_run_writes_everything(sample: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    ctx = Recorder(run_dir)
    summary = train(tiny(), sample, run_dir, ctx)

    assert summary["status"] == "finished" and summary["stop_reason"] == "max_steps"
    assert summary["steps"] == 8 and summary["tokens"] == 8 * 4 * 32
    assert summary["skipped_steps"] == 0 and summary["peak_mem_mb"] > 0
    assert ctx.steps == [(s, 8) for s in range(1, 9)]
    train_records = records(run_dir, "train")
    assert [r["step"] for r in train_records] == list(range(1, 9))
    assert all(math.isfinite(r["loss"]) for r in train_records)
    evals = records(run_dir, "eval")
    assert [r["step"] for r in evals] == [4, 8] and evals[-1]["val_loss"] == summary["val_loss"]
    meta = json.loads((sample / "meta.json").read_text())
    bits_per_byte = summary["val_loss"] / math.log(2) * meta["tokens"] / meta["bytes"]
    assert summary["val_bpb"] == pytest.approx(bits_per_byte, rel=1e-9)
    assert summary["best_val_loss"] == min(r["val_loss"] for r in evals)

    info = json.loads((run_dir / "config.json").read_text())
    assert config.Config.from_dict(info["config"]) == tiny()
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", info["git_commit"])
    assert info["versions"]["torch"] == torch.__version__ and "tiktoken" in info["versions"]
    assert json.loads((run_dir / "summary.json").read_text()) == summary

    tail = (run_dir / "log.txt").read_text().splitlines()[-10:]
    block = dict(line.split(": ", 1) for line in tail[tail.index("---") + 1 :])
    for key in ("val_loss", "val_bpb", "steps", "tokens", "skipped_steps", "peak_mem_mb", "wall_s"):
        assert key in block, key
    assert float(block["val_loss"]) == pytest.approx(summary["val_loss"], abs=1e-6)

    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []  # no temp files
    model, cfg, ckpt = load_model(run_dir / LAST)
    assert ckpt["step"] == 8
    data = TokenData(sample, cfg.model.vocab_size, cfg.train.val_fraction)
    assert evaluate(model, data, cfg, torch.device("cpu"))["val_loss"] == summary["val_loss"]
    assert load_checkpoint(run_dir / BEST)["best_val_loss"] == summary["best_val_loss"]


@pytest.mark.parametrize("arch", ["refiner", "reasoner"])
def test_resume_after_a_kill_gives_the_same_losses(sample: Path, tmp_path: Path, arch: str) -> None:
    straight = tmp_path / "straight"
    expected = train(tiny(arch), sample, straight, Recorder(straight))

    broken = tmp_path / "broken"
    with pytest.raises(Interrupted):
        train(tiny(arch), sample, broken, Recorder(broken, stop_at=7))  # last checkpoint: step 6
    assert load_checkpoint(broken / LAST)["step"] == 6
    with open(broken / "metrics.jsonl", "a") as f:
        f.write('{"event": "train", "step": 8, "lo')  # a line torn by the kill
    resumed = train(tiny(arch), sample, broken, Recorder(broken), resume=True)

    assert resumed["resumed_from_step"] == 6
    assert [r["loss"] for r in records(broken, "train")] == [r["loss"] for r in records(straight, "train")]
    assert [r["step"] for r in records(broken, "train")] == list(range(1, 9))  # step 7 not logged twice
    assert resumed["val_loss"] == expected["val_loss"]
    a, b = load_checkpoint(straight / LAST)["model"], load_checkpoint(broken / LAST)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_mid_run_then_lab_train_resume_matches(sample: Path, tmp_runs: Path) -> None:
    sets = dict(block_size=32, batch_size=4, max_steps=60, warmup_steps=2, log_interval=1, eval_interval=20,
                ckpt_interval=10, eval_batches=2, threads=1)
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    proc = subprocess.Popen([sys.executable, "-m", "cli", "train", "--preset", "tiny", "--arch", "refiner",
                             "--device", "cpu", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_runs.glob("train-*/ckpt_last.pt")) and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before the kill"
    (run_dir,) = [p.parent for p in tmp_runs.glob("train-*/ckpt_last.pt")]
    saved = load_checkpoint(run_dir / LAST)["step"]
    assert saved % 10 == 0 and saved <= max(r["step"] for r in records(run_dir, "train")) < 60

    resumed = CliRunner().invoke(main, ["train", "--resume", run_dir.name, "--device", "cpu", "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["resumed_from_step"] == saved
    straight = tmp_runs / "straight"
    train(config.preset("tiny", "refiner", **sets), sample, straight, Recorder(straight))
    assert [r["loss"] for r in records(run_dir, "train")] == [r["loss"] for r in records(straight, "train")]


def test_resume_refuses_a_model_change_and_a_missing_checkpoint(sample: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train(tiny(max_steps=3), sample, run_dir, Recorder(run_dir))
    with pytest.raises(config.ConfigError, match="^d_model: cannot change on resume"):
        train(tiny(max_steps=6, d_model=32), sample, run_dir, Recorder(run_dir), resume=True)
    with pytest.raises(FileNotFoundError, match="resume"):
        train(tiny(), sample, tmp_path / "empty", Recorder(tmp_path / "empty"), resume=True)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(sample: Path, tmp_path: Path) -> None:
    # Decoupled weight decay of lr * wd = 100 flips and multiplies every matrix by -99 per step:
    # the weights overflow within a few dozen steps, an honest divergence.
    cfg = tiny(max_steps=200, lr=10.0, weight_decay=10.0, grad_clip=0.0, warmup_steps=0,
               ckpt_interval=1, eval_interval=1000)
    run_dir = tmp_path / "run"
    stop = r"training diverged: .* at step \d+; the last good checkpoint"
    with pytest.raises(TrainingDiverged, match=stop):
        train(cfg, sample, run_dir, Recorder(run_dir))
    diverged = records(run_dir, "diverged")
    assert len(diverged) == 1 and diverged[0]["step"] < 200
    ckpt = load_checkpoint(run_dir / LAST)
    assert ckpt["step"] == diverged[0]["step"]
    assert all(t.isfinite().all() for t in ckpt["model"].values())
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "diverged"
    assert "status: diverged" in (run_dir / "log.txt").read_text()


def test_max_seconds_stops_early(sample: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    summary = train(tiny(max_steps=100_000, max_seconds=0.3, eval_interval=100_000, ckpt_interval=100_000),
                    sample, run_dir, Recorder(run_dir))
    assert summary["stop_reason"] == "max_seconds"
    assert 1 <= summary["steps"] < 100_000 and summary["train_s"] >= 0.3
    assert load_checkpoint(run_dir / LAST)["step"] == summary["steps"]


def test_learning_rate_schedule() -> None:
    t = config.TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, t) == pytest.approx(1 / 11)
    assert lr_at(9, t) == pytest.approx(10 / 11)
    assert lr_at(10, t) == pytest.approx(1.0)
    assert lr_at(60, t) == pytest.approx(0.55)
    assert lr_at(110, t) == pytest.approx(0.1)
    timed = config.TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=0, max_steps=1000, max_seconds=10.0)
    assert lr_at(1, timed, elapsed_s=10.0) == pytest.approx(0.1)  # the time budget is spent


def test_weight_decay_only_on_matrices() -> None:
    from models import build_model

    model = build_model(tiny())
    decay, no_decay = make_optimizer(model, tiny().train).param_groups
    assert decay["params"] and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_a_failed_save_leaves_the_old_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    save_atomic({"step": 1, "w": torch.ones(3)}, path)
    with pytest.raises(Exception):  # noqa: B017 - whatever pickling raises
        save_atomic({"step": 2, "fn": lambda: 0}, path)
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_lab_train_resume_and_eval(tmp_runs: Path) -> None:
    runner = CliRunner()
    common = ["--preset", "tiny", "--set", "block_size=32", "--set", "batch_size=4", "--set", "threads=1",
              "--set", "eval_batches=2", "--set", "eval_interval=3", "--set", "ckpt_interval=3"]
    first = runner.invoke(main, ["train", *common, "--arch", "reasoner", "--set", "max_steps=3", "--json"])
    assert first.exit_code == 0, first.output
    run = json.loads(first.stdout)
    run_id = Path(run["run_dir"]).name
    assert re.fullmatch(r"train-\d{8}-\d{6}-[0-9a-f]{6}", run_id)
    assert run["arch"] == "reasoner" and run["steps"] == 3

    more = runner.invoke(main, ["train", "--resume", run_id, "--set", "max_steps=5", "--json"])
    assert more.exit_code == 0, more.output
    resumed = json.loads(more.stdout)
    assert resumed["resumed_from_step"] == 3 and resumed["steps"] == 5 and resumed["arch"] == "reasoner"

    ev = runner.invoke(main, ["eval", run_id, "--checkpoint", "last", "--json"])
    assert ev.exit_code == 0, ev.output
    result = json.loads(ev.stdout)
    assert result["step"] == 5 and result["n_steps"] == 3  # the reasoner's depth_eval in tiny
    assert result["val_loss"] == resumed["val_loss"]
    deeper = json.loads(runner.invoke(main, ["eval", run_id, "--checkpoint", "last", "--n-steps", "1",
                                             "--json"]).stdout)
    assert deeper["n_steps"] == 1 and deeper["val_loss"] != result["val_loss"]


def test_lab_train_bad_input_exits_2(tmp_runs: Path) -> None:
    runner = CliRunner()
    bad_key = runner.invoke(main, ["train", "--set", "bogus_key=1"])
    assert bad_key.exit_code == 2 and "bogus_key" in bad_key.output
    bad_value = runner.invoke(main, ["train", "--set", "d_model=big"])
    assert bad_value.exit_code == 2 and "d_model" in bad_value.output
    no_data = runner.invoke(main, ["train", "--data", "nonexistent", "--set", "max_steps=1"])
    assert no_data.exit_code == 2 and "nonexistent" in no_data.output
    no_run = runner.invoke(main, ["eval", "no-such-run"])
    assert no_run.exit_code == 2 and "no-such-run" in no_run.output
    # a run id only: a path (even to a real run directory) is refused before anything is looked up
    by_path = runner.invoke(main, ["eval", str(tmp_runs)])
    assert by_path.exit_code == 2 and "give the run id" in by_path.output
    no_resume = runner.invoke(main, ["train", "--resume", "no-such-run"])
    assert no_resume.exit_code == 2 and "--resume" in no_resume.output


class CardHolder(Recorder):
    """A context that, like a queue job's, can give the card back; it notes what was on disk then."""

    def __init__(self, run_dir: Path):
        super().__init__(run_dir)
        self.at_release: list[tuple[list[int], bool]] = []

    def release_card(self) -> None:
        self.at_release.append(([r["step"] for r in records(self.run_dir, "eval")],
                                (self.run_dir / "curves.png").exists()))


def test_train_gives_the_card_back_after_the_final_eval_and_before_the_plot(
        sample: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    ctx = CardHolder(run_dir)
    summary = train(tiny(), sample, run_dir, ctx)
    assert ctx.at_release == [([4, 8], False)]  # once, with every eval done and no plot yet
    assert (run_dir / "curves.png").exists() and (run_dir / LAST).exists()
    assert json.loads((run_dir / "summary.json").read_text()) == summary
