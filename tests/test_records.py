"""Findings, model cards and the runs listing, written from real run files.

The training run is made here by the real trainer (5 steps, tiny preset). The ablation record
tests/data/ablation_khop_2x2.json was written by the real harness (harness.ablate.run_ablation:
khop, 2 arms x 2 seeds x 10 steps); running even the smallest ablation costs ~20 s of process
start-up, so the file is reused rather than regenerated in every test run.
"""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

import config
import records
from cli import main
from records import archive

ABLATION = Path(__file__).parent / "data" / "ablation_khop_2x2.json"


@pytest.fixture
def lab(tmp_runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("LAB_DOCS", str(tmp_path / "docs"))
    return CliRunner()


def ablation_run(runs: Path, name: str) -> dict:
    (runs / name).mkdir()
    shutil.copy(ABLATION, runs / name / "ablation.json")
    return json.loads(ABLATION.read_text())


def invoke(cli: CliRunner, *args: str) -> tuple[int, str]:
    r = cli.invoke(main, list(args))
    return r.exit_code, r.output


def test_finding_from_a_finished_ablation(lab: CliRunner, tmp_runs: Path) -> None:
    raw = ablation_run(tmp_runs, "21")
    title = "Two refiner passes do not beat one flat layer"
    code, out = invoke(lab, "finding", "21", "--title", title, "--json")
    assert code == 0, out
    info = json.loads(out)
    path = Path(info["path"])
    assert path.parent == Path(config.docs_dir()) / "findings"
    assert path.name == f"{records.today()}-two-refiner-passes-do-not-beat-one-flat-layer.md"
    text = path.read_text()
    fm = records.parse_front_matter(text)
    summary = raw["summary"]
    assert fm["job"] == "21" and fm["verdict"] == summary["verdict"]
    assert fm["git_commit"] == raw["git_commit"] and raw["git_commit"] in text
    # The evidence: every arm's interval and the paired difference, as the harness computed them.
    for arm in summary["arms"]:
        assert f"[{arm['ci_low']:.3f}, {arm['ci_high']:.3f}]" in text
        if arm["diff"]:
            d = arm["diff"]
            assert f"{d['mean']:.3f} [{d['ci_low']:.3f}, {d['ci_high']:.3f}]" in text
    assert f"primary cell `{summary['primary']}`" in text and summary["verdict_line"] in text
    assert "not matched: params" in text and "Depth x difficulty on `test`" in text
    assert "as_deep_as_trained" in text and "Test lines found in the training stream: test 0/20" in text
    limits = text.split("## What this cannot show", 1)[1].split("##", 1)[0]
    assert "Not matched between the two arms: params" in limits and "One task (`khop`)" in limits
    assert "| model.n_layers |" in text  # the resolved config difference between the arms
    # The reproduce block is a spec the harness itself accepts, equal to the one that ran.
    toml_block = text.split("```toml\n", 1)[1].split("```", 1)[0]
    from harness.ablate import parse_spec

    assert json.loads(json.dumps(parse_spec(tomllib.loads(toml_block)).to_dict())) == raw["spec"]
    sets = [s.split("=", 1) for s in text.split("lab submit ablation --lane cpu ", 1)[1].split("\n")[0]
            .replace("--set '", "").split("' ") if s]
    values = {k: config.parse_value(v.rstrip("'")) for k, v in sets}
    assert values == {k: v for k, v in raw["spec"].items() if v not in (None, "")}
    import jobs
    from jobs.ablation import resolve

    queued = resolve(jobs.parse_spec("ablation", values))  # what `lab submit ablation` validates
    assert json.loads(json.dumps(queued.to_dict())) == raw["spec"]


def test_a_job_id_from_an_earlier_queue_is_another_job(lab: CliRunner, tmp_runs: Path) -> None:
    """Job ids restart with a new queue database: a finding of an older job 21 (written before
    this run began) does not block the finding of today's job 21; a second one of it is refused."""
    raw = ablation_run(tmp_runs, "21")
    findings = Path(config.docs_dir()) / "findings"
    findings.mkdir(parents=True)
    (findings / "2020-01-01-old.md").write_text(records.front_matter({"job": "21", "date": "2020-01-01"})
                                                + "# old\n")
    code, out = invoke(lab, "finding", "21", "--title", "Today's claim", "--json")
    assert code == 0, out
    fm = records.parse_front_matter(Path(json.loads(out)["path"]).read_text())
    assert fm["ablation_started"] == raw["started"]
    code, out = invoke(lab, "finding", "21", "--title", "Again")
    assert code == 1 and "already has a finding" in out


def test_a_finding_supersedes_an_old_one_with_links_both_ways(lab: CliRunner, tmp_runs: Path) -> None:
    ablation_run(tmp_runs, "21")
    ablation_run(tmp_runs, "22")
    code, out = invoke(lab, "finding", "21", "--title", "The old claim", "--json")
    old = Path(json.loads(out)["path"])
    code, out = invoke(lab, "finding", "22", "--title", "The new claim", "--supersedes", old.name, "--json")
    assert code == 0, out
    new = Path(json.loads(out)["path"])
    assert records.parse_front_matter(new.read_text())["supersedes"] == old.name
    assert f"Supersedes [{old.name}]" in new.read_text()
    old_text = old.read_text()
    assert records.parse_front_matter(old_text)["superseded_by"] == new.name
    assert f"**Superseded** by [{new.name}]" in old_text and "# The old claim" in old_text
    assert "**Claim.**" in old_text  # the old evidence stays; nothing is deleted
    code, out = invoke(lab, "finding", "21", "--title", "x", "--supersedes", "nosuch.md")
    assert code == 2 and "--supersedes" in out


def test_finding_is_refused_twice_without_verdict_or_run(lab: CliRunner, tmp_runs: Path) -> None:
    raw = ablation_run(tmp_runs, "21")
    assert invoke(lab, "finding", "21", "--title", "first")[0] == 0
    code, out = invoke(lab, "finding", "21", "--title", "second")
    assert code == 1 and "already has a finding" in out
    assert len(list((Path(config.docs_dir()) / "findings").glob("*.md"))) == 1

    del raw["summary"]["verdict"]  # an ablation that never finished
    (tmp_runs / "22").mkdir()
    (tmp_runs / "22" / "ablation.json").write_text(json.dumps(raw))
    code, out = invoke(lab, "finding", "22", "--title", "t")
    assert code == 1 and "no verdict" in out
    code, out = invoke(lab, "finding", "404", "--title", "t")
    assert code == 2 and "no run directory" in out


def test_model_card_from_a_real_training_run(lab: CliRunner, tmp_runs: Path, trained_run: Path) -> None:
    shutil.copytree(trained_run, tmp_runs / "31")
    summary = json.loads((trained_run / "summary.json").read_text())
    code, out = invoke(lab, "register", "31", "--name", "refiner-tiny-v1", "--json")
    assert code == 0, out
    card = json.loads(out)
    assert card["params"] == summary["params"]
    assert card["sha256"] == archive.sha256_file(trained_run / "ckpt_best.pt")
    assert card["best_val_loss"] == pytest.approx(summary["best_val_loss"])
    assert (card["arch"], card["tier"]) == ("refiner", "hot")
    text = Path(card["path"]).read_text()
    assert '"d_model": 64' in text and "dataset `sample`" in text

    listed = json.loads(invoke(lab, "registry", "--json")[1])
    assert [c["name"] for c in listed] == ["refiner-tiny-v1"]
    keys = ("sha256", "params", "job")
    assert {k: listed[0][k] for k in keys} == {k: card[k] for k in keys}
    archive.archive_run("31")
    assert json.loads(invoke(lab, "registry", "--json")[1])[0]["tier"] == "cold"

    code, out = invoke(lab, "register", "31", "--name", "refiner-tiny-v1")
    assert code == 1 and "already exists" in out
    code, out = invoke(lab, "register", "31", "--name", "../escape")
    assert code == 2 and "--name" in out


def test_model_card_needs_a_training_run(lab: CliRunner, tmp_runs: Path) -> None:
    ablation_run(tmp_runs, "21")
    code, out = invoke(lab, "register", "21", "--name", "nope")
    assert code == 1 and "no config.json" in out
    assert not (Path(config.docs_dir()) / "registry" / "nope.md").exists()


def test_runs_listing(lab: CliRunner, tmp_runs: Path, trained_run: Path) -> None:
    from daemon import service

    raw = ablation_run(tmp_runs, "21")
    shutil.copytree(trained_run, tmp_runs / "train-20261125-120000-abcdef")
    shutil.copytree(trained_run.parent / "data", tmp_runs / "data")
    job = service.submit("sleep", {"seconds": 1}, lane="cpu")  # a queued job with an empty run dir
    (tmp_runs / str(job["id"])).mkdir()

    rows = {r["run"]: r for r in json.loads(invoke(lab, "runs", "--json")[1])}
    assert set(rows) == {"21", "train-20261125-120000-abcdef", str(job["id"])}  # runs/data is no run
    best_arm = max(raw["summary"]["arms"], key=lambda a: a["mean"])
    assert rows["21"]["kind"] == "ablation" and rows["21"]["best"]["value"] == best_arm["mean"]
    train = rows["train-20261125-120000-abcdef"]
    lines = (trained_run / "metrics.jsonl").read_text().splitlines()
    vals = [json.loads(line).get("val_loss") for line in lines]
    assert (train["kind"], train["status"], train["tier"]) == ("train", "succeeded", "hot")
    assert train["best"]["value"] == min(v for v in vals if v is not None)
    assert train["bytes"] == sum(p.stat().st_size for p in trained_run.iterdir())
    assert (rows[str(job["id"])]["kind"], rows[str(job["id"])]["status"]) == ("sleep", "queued")
    code, text = invoke(lab, "runs")
    assert code == 0 and "ablation" in text and "val_loss=" in text


FORGED = "x\n## Verdict: **better**"
SHELL = "it's `fine` | ok'; touch /tmp/pwned; echo '"


def _forged_record(raw: dict) -> dict:
    """An ablation.json whose arm name and `why` came from an issue before names were checked:
    a name that forges a heading and a verdict, and a reason that breaks out of shell quotes."""
    text = json.dumps(raw).replace('"loop"', json.dumps(FORGED))
    forged = json.loads(text)
    forged["spec"]["why"] = SHELL
    forged["summary"]["verdict_line"] = f"inconclusive on test:2 ({FORGED} `0.2` | <!-- x -->)"
    return forged


def test_a_finding_cannot_be_forged_by_arm_names_or_spec_text(lab: CliRunner, tmp_runs: Path) -> None:
    import shlex

    clean = ablation_run(tmp_runs, "21")
    forged = _forged_record(clean)
    (tmp_runs / "22").mkdir()
    (tmp_runs / "22" / "ablation.json").write_text(json.dumps(forged))
    texts = []
    for job in ("21", "22"):
        code, out = invoke(lab, "finding", job, "--title", "A claim", "--json")
        assert code == 0, out
        texts.append(Path(json.loads(out)["path"]).read_text())
    # the front matter holds the record's values as JSON strings (one line each, not markdown)
    assert records.parse_front_matter(texts[1])["arm"] == FORGED
    plain, text = (t.split(records.FRONT, 2)[2] for t in texts)
    # the same document structure: no heading, verdict or table row the record did not earn
    def headings(t: str) -> list[str]:
        return [ln for ln in t.splitlines() if ln.lstrip().startswith("#")]

    assert headings(text) == headings(plain) and "<!--" not in text
    # outside code (fenced blocks and code spans show it as typed) no `better` is bold
    prose = re.sub(r"`[^`\n]*`", "", re.sub(r"(?ms)^(`{3,})[a-z]*\n.*?^\1$", "", text))
    assert "**better**" not in prose and "Verdict: \\*\\*better\\*\\*" in prose
    assert len(text.splitlines()) == len(plain.splitlines())  # a name cannot add a line
    for a, b in zip(plain.splitlines(), text.splitlines(), strict=True):
        if a.startswith("|"):  # every table row keeps its cells: no unescaped pipe was added
            assert len(re.findall(r"(?<!\\)\|", a)) == len(re.findall(r"(?<!\\)\|", b)), b
    # the reproduce command is one shell command whose arguments are exactly the spec's values
    line = text.split("```sh\n", 1)[1].split("\n", 1)[0]
    args = shlex.split(line)
    assert args[:5] == ["lab", "submit", "ablation", "--lane", "cpu"]
    sets = [args[i + 1] for i in range(5, len(args), 2)]
    assert args[5::2] == ["--set"] * len(sets)
    want = [f"{k}={records.toml_value(v)}" for k, v in forged["spec"].items() if v not in (None, "")]
    assert sets == want
    # the toml block still holds the record's values exactly
    toml_block = text.split("```toml\n", 1)[1].split("\n```", 1)[0]
    assert tomllib.loads(toml_block)["arms"][0]["name"] == FORGED
    assert tomllib.loads(toml_block)["why"] == SHELL


@pytest.mark.parametrize("args", [
    ["train", "--set", "d_model=-1"],
    ["train", "--data", "nonexistent", "--set", "max_steps=1"],  # found missing inside the job
    ["train", "--set", "block_size=60000", "--set", "max_steps=1"],  # too big for the data: after spec.json
    ["smoke", "--set", "x=1"],
    ["smoke", "--set", "block_size=60000"],
    ["eval", "no-such-run"],
    ["tokenize", "models/assets/no-such.txt", "--name", "x"],
], ids=lambda a: " ".join(a))
def test_bad_input_leaves_no_run_directory(lab: CliRunner, tmp_runs: Path, trained_run: Path,
                                           args: list[str]) -> None:
    """Exit 2 means nothing was done: no run directory is left behind to clutter `lab runs`."""
    shutil.copytree(trained_run.parent / "data", tmp_runs / "data")  # the sample dataset, ready
    before = sorted(p.name for p in tmp_runs.iterdir())
    r = lab.invoke(main, [*args, "--json"] if args[0] != "tokenize" else args)
    assert r.exit_code == 2, r.output
    assert sorted(p.name for p in tmp_runs.iterdir()) == before


def test_a_bad_input_on_resume_keeps_the_run(lab: CliRunner, tmp_runs: Path, trained_run: Path) -> None:
    """The directory of an existing run is never removed, whatever the error."""
    shutil.copytree(trained_run, tmp_runs / "train-20261125-120000-abcdef")
    before = sorted(p.name for p in (tmp_runs / "train-20261125-120000-abcdef").iterdir())
    r = lab.invoke(main, ["train", "--resume", "train-20261125-120000-abcdef", "--data", "nonexistent"])
    assert r.exit_code == 2, r.output
    assert sorted(p.name for p in (tmp_runs / "train-20261125-120000-abcdef").iterdir()) == before
