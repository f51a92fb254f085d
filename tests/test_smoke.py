"""jobs/smoke.py and `lab smoke`: both architectures build and learn; failures are reported."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

import jobs
from cli import main
from jobs.context import LocalContext
from jobs.smoke import SmokeFailed, check

pytestmark = pytest.mark.usefixtures("one_thread")


def quiet(run_dir: Path) -> LocalContext:
    return LocalContext(run_dir, echo=lambda s: None)


@pytest.mark.parametrize("arch", ["refiner", "reasoner"])
def test_smoke_passes_for_both_archs(tmp_runs: Path, arch: str) -> None:
    spec = jobs.parse_spec("smoke", {"arch": arch, "steps": 20, "set": {"threads": 1}})
    result = jobs.get_kind("smoke").run(spec, quiet(tmp_runs / f"smoke-{arch}"))
    assert result["ok"] and result["arch"] == arch and result["steps"] == 20
    assert result["val_loss"] < 0.99 * result["val_loss_start"] and math.isfinite(result["val_loss"])
    assert result["late_mean"] < result["early_mean"]
    assert 10_000 < result["params"] < 1_000_000  # the tiny preset: well under 1M
    assert result["seconds"] > 0
    json.dumps(result)  # JSON-able, for the queue
    assert not list((tmp_runs / f"smoke-{arch}").glob("ckpt_*.pt"))  # smoke keeps no checkpoints


def test_smoke_reports_a_run_that_does_not_learn(tmp_runs: Path) -> None:
    # lr = 0: the weights never move, so the loss cannot fall; the job must fail, not pass.
    spec = jobs.parse_spec("smoke", {"steps": 8, "set": {"lr": 0.0, "min_lr": 0.0, "threads": 1,
                                                         "block_size": 32}})
    result = check(spec, quiet(tmp_runs / "flat"))
    assert not result["ok"] and "did not fall" in result["reason"]
    assert result["val_loss"] == result["val_loss_start"]
    with pytest.raises(SmokeFailed, match="did not fall"):
        jobs.get_kind("smoke").run(spec, quiet(tmp_runs / "flat2"))


def test_lab_smoke_json(tmp_runs: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(main, ["smoke", "--preset", "tiny", "--arch", "refiner", "--steps", "20",
                              "--set", "threads=1", "--json"])
    assert ok.exit_code == 0, ok.output
    result = json.loads(ok.stdout)
    assert result["ok"] is True and result["arch"] == "refiner"
    assert result["val_loss"] < result["val_loss_start"]

    flat = runner.invoke(main, ["smoke", "--steps", "6", "--set", "lr=0", "--set", "min_lr=0",
                                "--set", "threads=1", "--json"])
    assert flat.exit_code == 1 and json.loads(flat.stdout)["ok"] is False


def test_lab_smoke_bad_input_exits_2(tmp_runs: Path) -> None:
    runner = CliRunner()
    bad_key = runner.invoke(main, ["smoke", "--set", "no_such_key=3"])
    assert bad_key.exit_code == 2 and "no_such_key" in bad_key.output
    bad_arch = runner.invoke(main, ["smoke", "--arch", "lstm"])
    assert bad_arch.exit_code == 2 and "arch" in bad_arch.output
    bad_preset = runner.invoke(main, ["smoke", "--preset", "huge"])
    assert bad_preset.exit_code == 2 and "preset" in bad_preset.output
    assert not list(tmp_runs.iterdir())  # nothing ran
