"""records.compare against real runs: two tiny training runs of the real trainer that differ in
one override (lr), and two tiny ablations of the real harness that differ in one spec key
(seed_offset), made once for the module in the foreground with a LocalContext."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import config
from jobs.context import LocalContext
from records.compare import compare, compare_text

LR_A, LR_B = 1e-3, 3e-3


def _ablation_spec(seed_offset: int) -> dict:
    return {"task": "khop", "seeds": 1, "seed_offset": seed_offset, "why": "a test of compare, not a claim",
            "steps": 20, "eval_examples": 10, "eval_depths": [1, 2], "baseline": "flat-1", "primary": "hops3",
            "arms": [{"name": "flat-2", "arch": "reasoner", "n_steps": 2},
                     {"name": "flat-1", "arch": "reasoner", "n_steps": 1}]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/1 and runs/2: training runs (lr 1e-3, 3e-3); runs/3 and runs/4: ablations (seed_offset
    0, 1). Made once: the four real jobs take ~15 s together, every test then only reads them."""
    import torch

    import harness.ablate as ablate
    from models.data import ensure_sample_data
    from models.train import train

    root = tmp_path_factory.mktemp("compare")
    runs = root / "runs"
    data = ensure_sample_data(root)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    mp = pytest.MonkeyPatch()
    try:
        mp.setenv("LAB_RUNS", str(runs))
        mp.setenv("LAB_DB", str(root / "no-queue.db"))
        mp.setenv("LAB_ARCHIVE", str(root / "archive"))
        for name, lr in (("1", LR_A), ("2", LR_B)):
            cfg = config.preset("tiny", arch="refiner", max_steps=6, eval_interval=2, eval_batches=1,
                                log_interval=1, lr=lr)
            train(cfg, data, runs / name, LocalContext(runs / name, echo=lambda s: None))
        for name, offset in (("3", 0), ("4", 1)):
            ablate.run_ablation(ablate.parse_spec(_ablation_spec(offset)),
                                LocalContext(runs / name, echo=lambda s: None))
    finally:
        mp.undo()
        torch.set_num_threads(before)
    return runs


@pytest.fixture
def lab_runs(runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LAB_RUNS", str(runs))
    monkeypatch.setenv("LAB_DB", str(tmp_path / "queue.db"))  # no queue: kinds come from the files
    monkeypatch.setenv("LAB_ARCHIVE", str(tmp_path / "archive"))
    return runs


def _metrics(result: dict) -> dict[str, dict]:
    return {m["name"]: m for m in result["metrics"]}


def _rows(path: Path, event: str) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("event") == event]


def test_two_training_runs_differ_in_exactly_the_changed_override(lab_runs: Path) -> None:
    result = compare("1", "2")
    assert result["kind"] == "train" and result["a"]["run"] == "1" and result["b"]["run"] == "2"
    assert result["a"]["kind"] == "train" and result["b"]["status"] == "succeeded"
    assert result["config_diff"] == {"train.lr": [LR_A, LR_B]}  # the one key, nothing else
    assert result["verdicts"] == {"a": None, "b": None} and result["arms"] is None
    m = _metrics(result)
    assert list(m) == ["best_val_loss", "last_val_loss", "last_train_loss", "steps", "params", "tokens_per_s"]
    evals = {n: _rows(lab_runs / n / "metrics.jsonl", "eval") for n in ("1", "2")}
    trains = {n: _rows(lab_runs / n / "metrics.jsonl", "train") for n in ("1", "2")}
    for name, read in (("best_val_loss", lambda n: min(r["val_loss"] for r in evals[n])),
                       ("last_val_loss", lambda n: evals[n][-1]["val_loss"]),
                       ("last_train_loss", lambda n: trains[n][-1]["loss"])):
        assert m[name]["a"] == read("1") and m[name]["b"] == read("2")
        assert m[name]["delta"] == pytest.approx(read("2") - read("1"))
    assert m["steps"]["a"] == m["steps"]["b"] == 6 and m["steps"]["delta"] == 0
    assert m["params"]["a"] == m["params"]["b"] > 0 and m["params"]["delta"] == 0
    assert m["tokens_per_s"]["a"] > 0 and m["tokens_per_s"]["delta"] is not None
    assert m["last_val_loss"]["a"] != m["last_val_loss"]["b"]  # the lr did change the training

    text = compare_text(result)
    lines = text.splitlines()
    assert lines[0].startswith("compare train: A = run 1 (train, succeeded), B = run 2")
    header = next(ln for ln in lines if ln.startswith("METRIC"))
    assert header.split() == ["METRIC", "A", "B", "B-A"]
    row = next(ln for ln in lines if ln.startswith("last_val_loss"))
    assert row.index(f"{m['last_val_loss']['a']:#.3g}") == header.index("A")  # aligned under its header
    assert f"{m['last_val_loss']['delta']:+#.3g}" in row
    assert next(ln for ln in lines if ln.startswith("train.lr")).split() == ["train.lr", "0.00100", "0.00300"]


def test_two_ablations_side_by_side(lab_runs: Path) -> None:
    result = compare("3", "4")
    assert result["kind"] == "ablation" and result["a"]["kind"] == "ablation"
    assert result["config_diff"] == {"spec.seed_offset": [0, 1]}  # arms' configs are the same
    abl = {n: json.loads((lab_runs / n / "ablation.json").read_text())["summary"] for n in ("3", "4")}
    assert result["verdicts"] == {"a": abl["3"]["verdict"], "b": abl["4"]["verdict"]}
    m = _metrics(result)
    assert m["primary"] == {"name": "primary", "a": "hops3", "b": "hops3", "delta": None}
    assert m["verdict"]["a"] == abl["3"]["verdict"]
    arms = result["arms"]
    assert [r["name"] for r in arms["both"]] == ["flat-2", "flat-1"]
    assert arms["only_a"] == arms["only_b"] == []
    for row in arms["both"]:
        mine = {n: next(a for a in abl[n]["arms"] if a["name"] == row["name"]) for n in ("3", "4")}
        assert row["a"]["mean"] == mine["3"]["mean"] and row["b"]["mean"] == mine["4"]["mean"]
        assert row["delta_mean"] == pytest.approx(mine["4"]["mean"] - mine["3"]["mean"])
    tested, base = arms["both"]
    assert tested["a"]["diff"] == abl["3"]["arms"][0]["diff"]["mean"]
    assert tested["delta_diff"] == pytest.approx(abl["4"]["arms"][0]["diff"]["mean"]
                                                 - abl["3"]["arms"][0]["diff"]["mean"])
    assert base["a"]["diff"] is None and base["delta_diff"] is None and base["a"]["verdict"] == "baseline"
    text = compare_text(result)
    assert "ARM" in text and "spec.seed_offset" in text and "only in" not in text


def test_an_arm_in_one_ablation_only_is_listed(lab_runs: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    mine = tmp_path / "mine"
    shutil.copytree(lab_runs, mine)
    monkeypatch.setenv("LAB_RUNS", str(mine))
    path = mine / "4" / "ablation.json"
    raw = json.loads(path.read_text())
    raw["summary"]["arms"][0]["name"] = "flat-2-wide"  # as if B had tested another arm
    raw["spec"]["arms"][0]["name"] = "flat-2-wide"
    path.write_text(json.dumps(raw))
    result = compare("3", "4")
    assert [r["name"] for r in result["arms"]["both"]] == ["flat-1"]
    assert result["arms"]["only_a"] == ["flat-2"] and result["arms"]["only_b"] == ["flat-2-wide"]
    assert "spec.arms.flat-2.n_steps" in result["config_diff"]  # the arm B lacks is a difference
    assert "only in A: flat-2" in compare_text(result) and "only in B: flat-2-wide" in compare_text(result)


def test_like_with_like_and_runs_that_exist(lab_runs: Path) -> None:
    with pytest.raises(config.ConfigError,
                       match=r"^compare: run 3 is an ablation, run 1 a train run: compare like with like$"):
        compare("1", "3")
    with pytest.raises(config.ConfigError, match="compare: run 2 is a train run, run 3 an ablation"):
        compare("3", "2")
    with pytest.raises(config.ConfigError, match="compare: run 99 does not exist"):
        compare("1", "99")
    with pytest.raises(config.ConfigError, match="compare: run 98 does not exist"):
        compare("98", "1")
    with pytest.raises(config.ConfigError, match=r"compare: run '\.\.'"):
        compare("..", "1")
    (lab_runs / "empty").mkdir()
    try:
        with pytest.raises(config.ConfigError, match="run empty is neither a training run nor an ablation"):
            compare("empty", "1")
    finally:
        (lab_runs / "empty").rmdir()
