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
    "task": "khop", "seeds": 3, "steps": 10, "baseline": "flat-1", "primary": "hops3",
    "arms": [{"name": "refiner-k4", "arch": "refiner", "n_steps": 4, "set": {"d_model": 32}},
             {"name": "flat-1", "arch": "reasoner", "n_steps": 1}],
}


def _with(**changes):
    spec = json.loads(json.dumps(GOOD))
    spec.update(changes)
    return spec


def test_shipped_specs_parse():
    spec = load_spec_file(DEFAULT_SPEC)
    # the matched arm that separates looping from size: a flat model with the refiner's 2 blocks
    assert [a.name for a in spec.arms] == ["refiner-k4", "flat-2", "flat-1"] and spec.baseline == "flat-2"
    assert spec.primary == "hops3" and set(spec.matched) == {"distinct_blocks", "params"}
    for name in ("negative", "positive"):
        assert len(control_spec(name).arms) == 2
    for path in DEFAULT_SPEC.parent.glob("*.toml"):
        assert load_spec_file(path).primary  # every shipped spec names its primary cell


def test_primary_is_required_and_names_a_cell():
    """Fault: a spec without `primary` got its verdict from the hardest (near-chance OOD) split."""
    spec = json.loads(json.dumps(GOOD))
    del spec["primary"]
    with pytest.raises(ConfigError, match="ablation.primary: required key is missing"):
        parse_spec(spec)
    cell = parse_spec(_with(primary="test:3@8")).cell
    assert (cell.split, cell.bucket, cell.depth) == ("test", "3", 8) and str(cell) == "test:3@8"
    for bad, why in (("test:9", "unknown bucket"), ("test:4", "has no answers in split 'test'"),
                     ("hops3@x", "is not split"), ("nosuch", "unknown split")):
        with pytest.raises(ConfigError, match=why) as e:
            parse_spec(_with(primary=bad))
        assert str(e.value).startswith("ablation.primary")


@pytest.mark.parametrize("key", ["max_seconds", "max_steps", "eval_interval", "seed", "block_size"])
def test_arm_key_the_harness_does_not_apply_is_refused(key):
    """Fault: an arm could `set` keys the harness ignored; the verdict then described a change
    that never ran. grad_accum and cuda_dtype are applied now (the shared TrainStep)."""
    arms = [GOOD["arms"][0], {"name": "flat-1", "arch": "reasoner", "n_steps": 1, "set": {key: 5}}]
    with pytest.raises(ConfigError, match=rf"ablation.arms\[1\].set.{key}: the harness does not apply"):
        parse_spec(_with(arms=arms))
    ok = [GOOD["arms"][0], {"name": "flat-1", "arch": "reasoner", "n_steps": 1,
                            "set": {"grad_accum": 2, "cuda_dtype": "float32"}}]
    parse_spec(_with(arms=ok))


def test_a_declared_match_is_checked():
    with pytest.raises(ConfigError, match=r"ablation.matched: distinct_blocks of refiner-k4 \(2\) .* 2.00x"):
        parse_spec(_with(matched=["distinct_blocks"]))  # 2 distinct blocks against 1
    with pytest.raises(ConfigError, match="ablation.matched: unknown axis"):
        parse_spec(_with(matched=["vibes"]))
    arms = [GOOD["arms"][0], {"name": "flat-2", "arch": "reasoner", "n_steps": 2, "set": {"d_model": 32}}]
    parse_spec(_with(arms=arms, baseline="flat-2", matched=["distinct_blocks", "params"]))


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
    assert resolved.steps == 50 and resolved.baseline == "flat-2"
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
    # 25 steps, not the shipped 100: what is checked here (identical arms -> inconclusive, the
    # files, the summary) does not depend on how far the arms learn (at 25 steps: 0.315 against
    # 0.310, paired +0.005 [-0.110, +0.120]; 24.9 s against 33.4 s at 50 steps, alone on 2 cores).
    # The control's calibration at its shipped budget is bench/controls.py's, not this test's.
    proc = subprocess.run([LAB, "ablate", "--control", "negative", "--set", "steps=25", "--json"],
                          capture_output=True, text=True, env=env, timeout=600)
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
    assert set(a["grid"]["test"]) == {"1", "2"}  # a 2-layer reasoner cannot be run deeper
    assert set(a["grid"]["test"]["2"]) == {"all", "1", "2", "3", "4", "6"}  # the depth x bucket grid
    assert summary["baselines"]["test"]["one_hop"]["all"] > summary["baselines"]["test"]["chance"]["all"]
    assert summary["primary"] == "test" and summary["correction"] == "none"
    assert all(o["in_train"] == 0 for o in summary["overlap"].values())
    record = json.loads((run_dir / "ablation.json").read_text())
    assert record["git_commit"] and record["versions"]["torch"]
    assert len(record["per_seed"]) == 6 and record["spec"]["baseline"] == "flat-2-b"
    assert (run_dir / "accuracy.png").stat().st_size > 10_000
    report = (run_dir / "report.md").read_text()
    assert "**inconclusive** on `test`" in report and "Depth x difficulty on `test`" in report
    last = (run_dir / "log.txt").read_text().strip().splitlines()[-1]
    assert last.startswith("verdict: inconclusive on test (")  # the verdict line names the cell


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
                    'baseline = "flat-1"\nprimary = "test_all"\n'
                    '[[arms]]\nname = "flat-2"\narch = "reasoner"\nn_steps = 2\n'
                    '[[arms]]\nname = "flat-1"\narch = "reasoner"\nn_steps = 1\n')
    env = {**os.environ, "LAB_RUNS": str(tmp_path / "runs")}
    proc = subprocess.run([LAB, "ablate", "--spec", str(spec), "--json"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["primary"] == "test_all" and summary["verdict"] == "inconclusive"  # one seed
    assert all(0.0 <= a["mean"] <= 1.0 for a in summary["arms"])
    assert "majority_target" in summary["baselines"]["test_all"]


def _fake_results(spec, primary_by_arm):
    """WorkResults whose primary cell holds the given per-seed values (the rest 0.5)."""
    from harness.tasks import make_task
    from harness.train_task import WorkResult

    task = make_task(spec.task)
    out = []
    for i, arm in enumerate(spec.arms):
        for j, seed in enumerate(spec.seed_list):
            depth = arm.n_steps
            grid = {depth: {sp: {c: 0.5 for c in ("all", *task.buckets)} for sp in task.splits}}
            grid[depth][spec.cell.split][spec.cell.bucket] = primary_by_arm[arm.name][j]
            def held_in(sp: str, b: str) -> int:  # khop: `test` holds k = 1..3, hopsK holds k
                return int(sp == "test" and b in "123" or sp == f"hops{b}")

            held = {sp: {"all": 1, **{b: held_in(sp, b) for b in task.buckets}} for sp in task.splits}
            out.append(WorkResult(arm_index=i, seed=seed, steps=1, wall_s=0.0, cpu_s=0.0, final_loss=1.0,
                                  curve=[], grid=grid, counts=held,
                                  overlap={sp: {"lines": 1, "in_train": 0} for sp in task.splits}))
    return out


def _summary(spec, values, one_hop):
    from harness.ablate import _summarise, arm_config, arm_sizes
    from harness.tasks import make_task

    task = make_task(spec.task)
    configs = [arm_config(spec, a, task) for a in spec.arms]
    sizes = [arm_sizes(c, a, spec.cell) for c, a in zip(configs, spec.arms, strict=True)]
    baselines = {sp: {"chance": {c: 0.25 for c in ("all", *task.buckets)},
                      "one_hop": {c: one_hop for c in ("all", *task.buckets)},
                      "as_deep_as_trained": {c: 1.0 for c in ("all", *task.buckets)}} for sp in task.splits}
    return _summarise(spec, task, configs, sizes, _fake_results(spec, values), baselines)


def test_holm_correction_and_the_verdict_line():
    arms = [{"name": "loop", "arch": "refiner", "n_steps": 4, "set": {"d_model": 32}},
            {"name": "wide", "arch": "reasoner", "n_steps": 2, "set": {"d_model": 32}},
            {"name": "flat-1", "arch": "reasoner", "n_steps": 1, "set": {"d_model": 32}}]
    spec = parse_spec(_with(arms=arms))
    values = {"loop": [0.60, 0.71, 0.80], "wide": [0.52, 0.50, 0.61], "flat-1": [0.50, 0.60, 0.71]}
    s = _summary(spec, values, one_hop=0.25)
    loop = s["arms"][0]
    assert s["correction"] == "holm" and s["tested_arms"] == 2
    assert loop["diff"]["p_holm"] >= loop["diff"]["p"] and loop["verdict"] == "better"
    assert s["verdict_line"].startswith("better on hops3 (loop 0.703 vs flat-1 0.603, paired +0.100")
    assert "Holm p" in s["verdict_line"] and "not matched: params" in s["verdict_line"]
    assert "shortcut" not in s["verdict_line"]  # as_deep_as_trained (1.0) is a reference, not trivial
    assert "reference" not in s["verdict_line"] and not s["extrapolation"]  # hops3 was trained
    deep = _summary(parse_spec(_with(arms=arms, primary="hops4")), values, one_hop=0.25)
    assert deep["extrapolation"] and deep["never_trained"] == ["4", "6"]
    assert "does not beat the reference as_deep_as_trained (1.000)" in deep["verdict_line"]
    # the same win, but the task's one-hop shortcut scores more than the winner
    shortcut = _summary(spec, values, one_hop=0.9)
    flagged = "does not clear the trivial baseline one_hop (0.900): a shortcut, not reasoning"
    assert flagged in shortcut["verdict_line"]


# --- names that reach report.md and the result comment ----------------------------------

FORGED = "x\n## Verdict: **better**"


@pytest.mark.parametrize("name", [FORGED, "a b", "<!-- lab:status 2 -->", "`x`", "@octocat", "", "n" * 65,
                                  "é", "a|b", "*bold*"])
def test_an_arm_name_cannot_carry_markdown(name):
    """Security review: an arm named "x\\n## Verdict: **better**" went raw into report.md and the
    result comment, forging a `better` heading in an inconclusive result."""
    arms = [{"name": name, "arch": "refiner", "n_steps": 4, "set": {"d_model": 32}}, GOOD["arms"][1]]
    with pytest.raises(ConfigError) as e:
        parse_spec(_with(arms=arms))
    assert str(e.value).startswith("ablation.arms[0].name: ") and "\n" not in str(e.value)


def test_plain_names_pass_and_the_report_keeps_its_one_heading():
    from harness.ablate import render_report
    from harness.tasks import make_task

    arms = [{"name": "refiner_k4.v2", "arch": "refiner", "n_steps": 4, "set": {"d_model": 32}},
            {"name": "F-1", "arch": "reasoner", "n_steps": 1, "set": {"d_model": 32}}]
    spec = parse_spec(_with(arms=arms, baseline="F-1"))
    s = _summary(spec, {"refiner_k4.v2": [0.6, 0.7, 0.8], "F-1": [0.5, 0.6, 0.7]}, one_hop=0.25)
    report = render_report(spec, make_task(spec.task), s)
    assert [ln for ln in report.splitlines() if ln.startswith("#")] == [report.splitlines()[0]]
    assert "| refiner_k4.v2 |" in report


def _task_dir(root: Path, *splits: str) -> Path:
    root.mkdir()
    lines = [json.dumps({"input": f"{a}:", "target": a}) for a in "abc"]
    for name in ("train", *splits):
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return root


FLAT_ARMS = [{"name": "flat-2", "arch": "reasoner", "n_steps": 2},
             {"name": "flat-1", "arch": "reasoner", "n_steps": 1}]


def test_task_names_cannot_carry_markdown(tmp_path):
    with pytest.raises(ConfigError, match=r"^ablation\.task: "):
        parse_spec(_with(task=FORGED))
    ok = _task_dir(tmp_path / "task", "test")
    parse_spec(_with(task_dir=str(ok), primary="test", arms=FLAT_ARMS))
    # with task_dir the `task` key is not looked up, but it is still recorded and shown
    with pytest.raises(ConfigError, match=r"^ablation\.task: ") as e:
        parse_spec(_with(task_dir=str(ok), task="<!-- lab:status 2 -->", primary="test", arms=FLAT_ARMS))
    assert "\n" not in str(e.value)
    # a task directory's split names (its test*.jsonl files) and its own name are in report.md too
    odd = _task_dir(tmp_path / "odd", "test", "test`## x")
    with pytest.raises(ConfigError, match=r"^ablation\.task_dir: "):
        parse_spec(_with(task_dir=str(odd), primary="test", arms=FLAT_ARMS))
    spaced = _task_dir(tmp_path / "my <b>task", "test")
    with pytest.raises(ConfigError, match=r"^ablation\.task_dir: "):
        parse_spec(_with(task_dir=str(spaced), primary="test", arms=FLAT_ARMS))
