"""harness/ablate.py, jobs/ablation.py and `lab ablate`: spec validation (one-line errors, exit
2, nothing trained), and real runs through the real code path: the negative control (the
slowest test of this file, ~1 minute on 2 cores) and a bring-your-own task directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import jobs
from cli import main
from config import ConfigError
from harness.ablate import control_spec, load_spec_file, parse_spec

LAB = str(Path(sys.executable).parent / "lab")
DEFAULT_SPEC = Path(__file__).resolve().parent.parent / "harness" / "specs" / "khop_default.toml"

GOOD = {
    "task": "khop", "seeds": 3, "steps": 10, "baseline": "flat-1",
    "arms": [{"name": "refiner-k4", "arch": "refiner", "n_steps": 4, "set": {"d_model": 32}},
             {"name": "flat-1", "arch": "reasoner", "n_steps": 1}],
}


def _with(**changes):
    spec = json.loads(json.dumps(GOOD))
    spec.update(changes)
    return spec


def test_shipped_specs_parse():
    spec = load_spec_file(DEFAULT_SPEC)
    assert [a.name for a in spec.arms] == ["refiner-k4", "flat-1"] and spec.baseline == "flat-1"
    for name in ("negative", "positive"):
        assert len(control_spec(name).arms) == 2


@pytest.mark.parametrize("spec, field", [
    (_with(task="chess"), "ablation.task"),
    (_with(primary="hops99"), "ablation.primary"),
    (_with(preset="huge"), "ablation.preset"),
    (_with(arms=GOOD["arms"][:1]), "ablation.arms"),
    (_with(baseline="flat-9"), "ablation.baseline"),
    (_with(seeds=2), "ablation.seeds"),
    (_with(colour="red"), "ablation.colour"),
    (_with(task_dir="/nonexistent/dir"), "task_dir"),
    (_with(arms=[GOOD["arms"][0], {"name": "flat-1", "arch": "reasoner", "depth": 1}]),
     "ablation.arms[1].depth"),
    (_with(arms=[GOOD["arms"][0], {"name": "flat-1", "arch": "mamba"}]), "ablation.arms[1].arch"),
    (_with(arms=[GOOD["arms"][0], {"name": "flat-1", "arch": "reasoner", "set": {"d_modle": 8}}]),
     "ablation.arms[1].set.d_modle"),
    (_with(arms=[GOOD["arms"][0], {"name": "flat-1", "arch": "reasoner", "set": {"d_model": -3}}]),
     "ablation.arms[1]"),
])
def test_bad_spec_is_one_line_naming_the_field(spec, field):
    with pytest.raises(ConfigError) as e:
        parse_spec(spec)
    assert str(e.value).startswith(field) and "\n" not in str(e.value)


def test_flat_n_rule_and_queue_kind():
    spec = parse_spec(GOOD)
    assert spec.arms[1].n_steps == 1
    job_spec = jobs.parse_spec("ablation", {"spec_file": str(DEFAULT_SPEC), "steps": 50})
    from jobs.ablation import resolve

    resolved = resolve(job_spec)
    assert resolved.steps == 50 and resolved.baseline == "flat-1"
    assert jobs.check_lane("ablation", None) == "cpu" and jobs.check_lane("ablation", "gpu") == "gpu"
    with pytest.raises(ConfigError, match="ablation.baseline"):
        jobs.parse_spec("ablation", {"spec_file": str(DEFAULT_SPEC), "baseline": "nobody"})


def test_cli_bad_input_exits_2_and_trains_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_RUNS", str(tmp_path / "runs"))
    bad = tmp_path / "bad.toml"
    bad.write_text(DEFAULT_SPEC.read_text().replace('task = "khop"', 'task = "sudoku"'))
    runner = CliRunner()
    for args in (["ablate", "--spec", str(bad)], ["ablate", "--spec", str(tmp_path / "missing.toml")],
                 ["ablate"], ["ablate", "--control", "negative", "--set", "primary=nope"]):
        result = runner.invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        assert result.output.strip().startswith("Error:") and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_negative_control_end_to_end(tmp_path):
    """The real CLI in a real process: trains 2 identical arms x 3 seeds in seed processes and
    must not find a difference. Also checks the files and the summary an agent reads."""
    env = {**os.environ, "LAB_RUNS": str(tmp_path)}
    proc = subprocess.run([LAB, "ablate", "--control", "negative", "--json"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["verdict"] == "inconclusive"
    assert "arm=flat-2-a" in proc.stderr and "eta=" in proc.stderr  # progress: arm, seed, step, ETA
    run_dir = Path(summary["run_dir"])
    assert run_dir.parent == tmp_path and run_dir.name.startswith("ablate-")
    a, b = summary["arms"]
    assert a["params"] == b["params"] > 0 and a["flops_per_token"] == b["flops_per_token"] > 0
    assert len(a["per_seed"]) == 3 and a["ci_low"] <= a["mean"] <= a["ci_high"]
    assert a["per_seed"] != b["per_seed"]  # other init seeds: the runs really differ
    assert set(a["by_depth"]) == {"1", "2"}  # a 2-layer reasoner cannot be run deeper
    assert summary["baselines"]["test"]["one_hop"] > summary["baselines"]["test"]["chance"]
    record = json.loads((run_dir / "ablation.json").read_text())
    assert record["git_commit"] and record["versions"]["torch"]
    assert len(record["per_seed"]) == 6 and record["spec"]["baseline"] == "flat-2-b"
    assert (run_dir / "accuracy.png").stat().st_size > 10_000
    assert "inconclusive" in (run_dir / "report.md").read_text()
    assert (run_dir / "log.txt").read_text().strip().splitlines()[-1] == "verdict: inconclusive"


def test_task_dir_ablation_runs_by_generation(tmp_path):
    """Bring-your-own: a tiny copy task, one seed (with its reason), evaluated by greedy
    generation per test file."""
    task = tmp_path / "task"
    task.mkdir()
    lines = [json.dumps({"input": f"{a}{b}:", "target": f"{a}{b}"}) for a in "abc" for b in "abc"]
    (task / "train.jsonl").write_text("\n".join(lines) + "\n")
    (task / "test_all.jsonl").write_text("\n".join(lines[:4]) + "\n")
    spec = tmp_path / "spec.toml"
    spec.write_text('task_dir = "task"\nseeds = 1\nwhy = "a plumbing check"\nsteps = 20\n'
                    'baseline = "flat-1"\n[[arms]]\nname = "flat-2"\narch = "reasoner"\nn_steps = 2\n'
                    '[[arms]]\nname = "flat-1"\narch = "reasoner"\nn_steps = 1\n')
    env = {**os.environ, "LAB_RUNS": str(tmp_path / "runs")}
    proc = subprocess.run([LAB, "ablate", "--spec", str(spec), "--json"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["primary"] == "test_all" and summary["verdict"] == "inconclusive"  # one seed
    assert all(0.0 <= a["mean"] <= 1.0 for a in summary["arms"])
    assert "majority_target" in summary["baselines"]["test_all"]
