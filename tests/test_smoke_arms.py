"""jobs/smoke.py with `ablation`: each named arm of an inline ablation spec trains a few steps on
its task, at its own config, and must keep every loss finite and lower its held-out loss."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

import config
import jobs
from config import ConfigError
from harness.ablate import SPECS_DIR
from jobs.context import LocalContext
from jobs.smoke import SmokeFailed, check_arms

pytestmark = pytest.mark.usefixtures("one_thread")


def quiet(run_dir: Path) -> LocalContext:
    return LocalContext(run_dir, echo=lambda s: None)


def chase_ablation(**arm_set: Any) -> dict[str, Any]:
    """The pre-registered chase spec, its arms narrowed to d_model 32 so a smoke takes seconds."""
    values = tomllib.loads((SPECS_DIR / "chase_depth.toml").read_text())
    for arm in values["arms"]:
        arm["set"] = {**arm.get("set", {}), "d_model": 32, **arm_set}
    return values


def test_the_named_arms_of_an_ablation_learn(tmp_runs: Path) -> None:
    spec = jobs.parse_spec("smoke", {"ablation": chase_ablation(), "arms": ["refiner-today", "flat-2"],
                                     "steps": 24})
    result = jobs.get_kind("smoke").run(spec, quiet(tmp_runs / "arms"))
    json.dumps(result)  # JSON-able, for the queue
    assert result["ok"] and result["steps"] == 24 and result["device"] == "cpu"
    assert list(result["arms"]) == ["refiner-today", "flat-2"]  # the ablation's order, only those named
    for arm in result["arms"].values():
        assert set(arm) == {"ok", "reason", "first_loss", "last_loss", "params", "seconds"}
        assert arm["ok"] and arm["last_loss"] < arm["first_loss"] * (1 - config.SMOKE_MIN_DROP)
        assert 10_000 < arm["params"] < 100_000 and arm["seconds"] > 0
    # the same spec smokes the same way: the verdict compares the same held-out batch
    again = check_arms(spec, quiet(tmp_runs / "again"))
    assert {n: a["last_loss"] for n, a in again["arms"].items()} == \
        {n: a["last_loss"] for n, a in result["arms"].items()}


def test_an_arm_that_cannot_learn_fails_the_smoke(tmp_runs: Path) -> None:
    ablation = chase_ablation()
    ablation["arms"][3]["set"].update(lr=0.0, min_lr=0.0)  # flat-7 never moves
    spec = jobs.parse_spec("smoke", {"ablation": ablation, "arms": ["flat-2", "flat-7"], "steps": 8})
    result = check_arms(spec, quiet(tmp_runs / "flat"))
    assert not result["ok"] and result["arms"]["flat-2"]["ok"]
    flat = result["arms"]["flat-7"]
    assert not flat["ok"] and "did not fall" in flat["reason"] and flat["last_loss"] == flat["first_loss"]
    assert result["reason"].startswith("flat-7: the loss did not fall")
    with pytest.raises(SmokeFailed, match="flat-7"):
        jobs.get_kind("smoke").run(spec, quiet(tmp_runs / "flat2"))


@pytest.mark.parametrize("values, field", [
    ({"arms": ["flat-2"]}, "smoke.arms"),
    ({"ablation": "ABLATION", "arms": ["flat-3"]}, "smoke.arms"),
    ({"ablation": "ABLATION", "arms": []}, "smoke.arms"),
    ({"ablation": "ABLATION", "arms": [1]}, "smoke.arms"),
    ({"ablation": "ABLATION", "preset": "ablation"}, "smoke.preset"),
    ({"ablation": "ABLATION", "arch": "refiner"}, "smoke.arch"),
    ({"ablation": "ABLATION", "set": {"d_model": 32}}, "smoke.set"),
    ({"ablation": {"task": "chase"}}, "smoke.ablation.arms"),
    ({"ablation": {"nosuchkey": 1}}, "smoke.ablation.nosuchkey"),
    ({"ablation": [1, 2]}, "smoke.ablation"),
    ({"ablation": "ABLATION", "steps": config.SMOKE_MAX_STEPS + 1}, "smoke.steps"),
    ({"steps": 3}, "smoke.steps"),
])
def test_bad_smoke_of_arms_is_refused_naming_the_field(values: dict[str, Any], field: str) -> None:
    values = {k: chase_ablation() if v == "ABLATION" else v for k, v in values.items()}
    with pytest.raises(ConfigError) as e:
        jobs.parse_spec("smoke", values)
    assert str(e.value).startswith(field) and "\n" not in str(e.value), str(e.value)


def test_an_ablation_field_is_named_inside_the_smoke(tmp_path: Path) -> None:
    bad_arm = chase_ablation()
    bad_arm["arms"][0]["set"]["max_steps"] = 5  # the harness decides the budget
    with pytest.raises(ConfigError, match=r"^smoke\.ablation\.arms\[0\]\.set\.max_steps"):
        jobs.parse_spec("smoke", {"ablation": bad_arm})
    missing = {**chase_ablation(), "task_dir": str(tmp_path / "none")}
    with pytest.raises(ConfigError, match=r"^smoke\.ablation\.task_dir"):
        jobs.parse_spec("smoke", {"ablation": missing})
