"""jobs/train.py on a harness task: the full run of an ablation's question. Its config is the
ablation arm's (and resolves without torch), the run writes what a token run writes, measures
the grid, the primary cell and the trivial baselines, and a killed run resumes to exactly where
an uninterrupted one ends."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import config
import jobs
from config import ConfigError
from harness.ablate import arm_config, parse_spec
from harness.tasks import make_task
from jobs.context import LocalContext
from jobs.train import resolve_config
from models.train import BEST, LAST, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
# A budget of seconds on one core: the ablation preset at d_model 32, 24 steps of 16 lines.
SMALL = {"d_model": 32, "batch_size": 16, "max_steps": 24, "warmup_steps": 4, "log_interval": 4,
         "eval_interval": 8, "ckpt_interval": 8, "eval_batches": 2}


class Interrupted(Exception):
    """Stands in for a kill: raised from inside the loop, after some steps."""


class Recorder(LocalContext):
    """A quiet context that records progress and can interrupt the run at a given step."""

    def __init__(self, run_dir: Path, stop_at: int | None = None):
        super().__init__(run_dir, echo=lambda s: None)
        self.steps: list[int] = []
        self.stop_at = stop_at

    def progress(self, step: int, total: int, **metrics: float) -> None:
        super().progress(step, total, **metrics)
        self.steps.append(step)
        if step == self.stop_at:
            raise Interrupted(step)


def task_spec(**values: Any) -> Any:
    base: dict[str, Any] = {"task": "chase", "preset": "ablation", "arch": "refiner", "n_steps": 4,
                            "primary": "sparse:3-4@8", "eval_depths": [1, 8], "eval_examples": 20,
                            "set": dict(SMALL)}
    return jobs.parse_spec("train", {**base, **values})


def records(run_dir: Path, event: str) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def test_the_config_is_the_ablation_arms_and_resolves_without_torch() -> None:
    spec = task_spec(arch="reasoner", n_steps=3, set={"d_model": 32})
    ablation = parse_spec({"task": "chase", "seeds": 1, "why": "a config check", "baseline": "a",
                           "primary": "sparse", "arms": [{"name": "a", "arch": "reasoner", "n_steps": 3,
                                                          "set": {"d_model": 32}},
                                                         {"name": "b", "arch": "refiner"}]})
    task = make_task("chase")
    assert resolve_config(spec) == arm_config(ablation, ablation.arms[0], task)
    m = resolve_config(spec).model
    assert (m.vocab_size, m.block_size) == (task.vocab_size, task.block_size)
    assert m.n_layers == m.depth_min == m.depth_max == m.depth_eval == 3  # flat-3
    # the card's task preset: its dims, the task's vocabulary and length
    big = resolve_config(jobs.parse_spec("train", {"task": "khop", "preset": "rtx2060_task"}))
    assert (big.model.d_model, big.model.n_heads, big.model.n_prelude) == (768, 12, 6)
    assert (big.model.vocab_size, big.model.block_size, big.train.batch_size) == (6, 54, 64)
    # the daemon validates specs and resolves their config without loading torch
    code = ("import sys, jobs; from jobs.train import resolve_config; "
            "s = jobs.parse_spec('train', {'task': 'chase', 'preset': 'rtx2060_task', 'arch': 'reasoner', "
            "'n_steps': 7, 'primary': 'sparse:7-8'}); resolve_config(s); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_task_run_writes_everything_and_measures_the_grid(tmp_runs: Path) -> None:
    spec = task_spec()
    run_dir = tmp_runs / "task"
    ctx = Recorder(run_dir)
    result = jobs.get_kind("train").run(spec, ctx)

    json.dumps(result)  # JSON-able, for the queue
    assert result["task"] == "chase" and result["arch"] == "refiner" and result["preset"] == "ablation"
    assert result["steps"] == 24 and result["skipped_steps"] == 0 and result["device"] == "cpu"
    assert 10_000 < result["params"] < 200_000 and math.isfinite(result["final_loss"])
    assert set(result["grid"]) == {"1", "4", "8"}  # eval depths, the arm's own (4), the cell's (8)
    for row in result["grid"].values():
        assert set(row) == {"test", "sparse"}
        assert set(row["sparse"]) == {"all", "1-2", "3-4", "5-6", "7-8", "9-12", "13+"}
    assert result["primary"] == {"cell": "sparse:3-4@8", "depth": 8,
                                 "accuracy": result["grid"]["8"]["sparse"]["3-4"]}
    assert set(result["trivial"]) == {"chance", "majority", "nearest_terminal", "as_deep_as_trained"}
    assert result["trivial"]["chance"] == pytest.approx(0.25)
    assert result["counts"]["sparse"]["all"] > 0 and result["overlap"]["sparse"]["in_train"] == 0

    assert ctx.steps == [1, 4, 8, 12, 16, 20, 24]
    assert [r["step"] for r in records(run_dir, "train")] == [1, 4, 8, 12, 16, 20, 24]
    evals = records(run_dir, "eval")
    assert [r["step"] for r in evals] == [8, 16, 24] and evals[-1]["val_loss"] == result["val_loss"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]  # it learns
    info = json.loads((run_dir / "config.json").read_text())
    assert config.Config.from_dict(info["config"]) == resolve_config(spec)
    assert info["task"]["name"] == "chase" and info["params"] == result["params"]
    saved = json.loads((run_dir / "spec.json").read_text())
    assert saved["kind"] == "train" and saved["task"] == "chase" and saved["primary"] == "sparse:3-4@8"
    assert json.loads((run_dir / "summary.json").read_text()) == result
    assert load_checkpoint(run_dir / LAST)["step"] == load_checkpoint(run_dir / BEST)["step"] == 24


def test_a_killed_task_run_resumes_to_where_an_uninterrupted_one_ends(tmp_runs: Path) -> None:
    spec = task_spec(arch="reasoner", n_steps=2, primary="test:1-2")
    straight = tmp_runs / "straight"
    expected = jobs.get_kind("train").run(spec, Recorder(straight))

    broken = tmp_runs / "broken"
    with pytest.raises(Interrupted):
        jobs.get_kind("train").run(spec, Recorder(broken, stop_at=20))  # last checkpoint: step 16
    assert load_checkpoint(broken / LAST)["step"] == 16
    with open(broken / "metrics.jsonl", "a") as f:
        f.write('{"event": "train", "step": 24, "lo')  # a line torn by the kill
    resumed = jobs.get_kind("train").run(spec, Recorder(broken))  # resume is on by default

    assert resumed["resumed_from_step"] == 16
    assert [r["loss"] for r in records(broken, "train")] == [r["loss"] for r in records(straight, "train")]
    evals = [r["val_loss"] for r in records(straight, "eval")]
    assert [r["val_loss"] for r in records(broken, "eval")] == evals
    same = ("final_loss", "val_loss", "grid", "counts", "overlap", "primary", "trivial", "steps", "params")
    assert {k: resumed[k] for k in same} == {k: expected[k] for k in same}
    a, b = load_checkpoint(straight / LAST)["model"], load_checkpoint(broken / LAST)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(json.loads((broken / "config.json").read_text())["resumes"]) == 1


def test_a_bring_your_own_task_runs_by_generation(tmp_runs: Path, tmp_path: Path) -> None:
    task = tmp_path / "copy"
    task.mkdir()
    lines = [json.dumps({"input": f"{a}{b}:", "target": f"{a}{b}", "difficulty": 1 + (a == b)})
             for a in "abc" for b in "abc"]
    (task / "train.jsonl").write_text("\n".join(lines) + "\n")
    (task / "test_all.jsonl").write_text("\n".join(lines[:4]) + "\n")
    spec = jobs.parse_spec("train", {"task_dir": str(task), "preset": "ablation", "arch": "reasoner",
                                     "n_steps": 2, "primary": "test_all:2", "eval_depths": [1],
                                     "set": {**SMALL, "max_steps": 8}})
    result = jobs.get_kind("train").run(spec, Recorder(tmp_runs / "byo"))
    assert result["task"] == "dir:copy" and set(result["grid"]) == {"1", "2"}
    assert result["primary"]["cell"] == "test_all:2" and 0.0 <= result["primary"]["accuracy"] <= 1.0
    assert set(result["trivial"]) == {"majority_target"}


@pytest.mark.parametrize("values, field", [
    ({"task": "chase", "task_dir": "harness/specs"}, "train.task_dir"),
    ({"task": "chase", "data": "books"}, "train.data"),
    ({"task": "nosuch"}, "train.task"),
    ({"task": ""}, "train.task"),
    ({"task_dir": ""}, "train.task_dir"),
    ({"task_dir": "/nonexistent/task"}, "train.task_dir"),
    ({"task_dir": "a\0b"}, "train.task_dir"),
    ({"n_steps": 4}, "train.n_steps"),
    ({"primary": "test"}, "train.primary"),
    ({"seed": 3}, "train.seed"),
    ({"task": "chase", "primary": "nosplit"}, "train.primary"),
    ({"task": "chase", "primary": "sparse:99"}, "train.primary"),
    ({"task": "chase", "primary": "a b"}, "train.primary"),
    ({"task": "chase", "eval_depths": []}, "train.eval_depths"),
    ({"task": "chase", "eval_depths": [0]}, "train.eval_depths"),
    ({"task": "chase", "eval_examples": 5}, "train.eval_examples"),
    ({"task": "chase", "n_steps": 0}, "train.n_steps"),
    ({"task": "chase", "arch": "reasoner", "n_steps": 9, "set": {"n_layers": 4}}, "train.n_steps"),
    ({"task": "chase", "set": {"vocab_size": 99}}, "train.set.vocab_size"),
    ({"task": "chase", "set": {"seed": 1}}, "train.set.seed"),
    ({"task": "chase", "set": {"no_such_key": 1}}, "train.set.no_such_key"),
    ({"task": "chase", "preset": "huge"}, "train.preset"),
    ({"task": "chase", "seed": -1}, "train.seed"),
])
def test_bad_task_fields_are_refused_naming_the_field(values: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as e:
        jobs.parse_spec("train", values)
    assert str(e.value).startswith(field) and "\n" not in str(e.value), str(e.value)
