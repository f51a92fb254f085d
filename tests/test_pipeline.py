"""daemon/pipeline.py: an idea carried through smoke -> ablation -> full run by real daemons, from
an issue on the stand-in GitHub (real PyGithub over HTTP) and from `lab submit idea`; the stop
with a drafted finding; exactly one next stage under concurrent deciders and kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from github_server import FakeGitHub
from helpers_daemon import ROOT, lab, queue_env, set_env, start_daemon, stop_daemon, wait_for
from test_github import FAST_GITHUB, TOKEN, spec_body

from bridge import github, render
from bridge.outbox import Outbox
from config import ConfigError
from daemon import pipeline
from store import FINAL, Store

# Two ablations measured before these tests were written (about 12 s each on 2 cores): `WINS` says
# better for flat-1 against a 8-wide model (on a shortcut: the verdict line says so), `TIES` says
# inconclusive for an init change. Both deterministic: the harness seeds every arm. `TIES` trains
# 20 steps, not 60: measured, inconclusive at 20, 30 and 60 steps (+0.019, +0.017, +0.002, each
# interval across zero), and its 6 runs are a third of the CPU. `WINS` keeps 60 for its margin (+0.238
# [+0.139, +0.338]; at 30 steps the interval's low end was +0.010).
ABLATION_BASE = """
task = "khop"
seeds = 3
steps = 60
primary = "test"
eval_depths = [1]
eval_examples = 120
"""
WINS = ABLATION_BASE + """
baseline = "narrow"
[[ablation.arms]]
name = "narrow"
arch = "reasoner"
n_steps = 1
set = { d_model = 8, n_heads = 2 }
[[ablation.arms]]
name = "flat-1"
arch = "reasoner"
n_steps = 1
"""
TIES = ABLATION_BASE.replace("steps = 60", "steps = 20") + """
baseline = "flat-1"
[[ablation.arms]]
name = "flat-1"
arch = "reasoner"
n_steps = 1
[[ablation.arms]]
name = "flat-1-init"
arch = "reasoner"
n_steps = 1
set = { init_std = 0.03 }
"""


# The full run's budget: 10 steps. What is tested of it is that the gate let it run, on the GPU
# lane, with the idea's task and primary cell, and that its result has the grid; not how far it learns.
def idea_toml(ablation: str, arm: str, full: str = 'preset = "ablation", steps = 10') -> str:
    """An Idea issue's spec block: the idea's words, its arm, the stages' budgets, the ablation."""
    return (f'kind = "idea"\nhypothesis = "A wider model reads the pointer"\n'
            f'kill = "{arm} is not better than the baseline on test"\narm = "{arm}"\n'
            f"smoke = {{ steps = 20 }}\nfull = {{ {full} }}\n\n[ablation]\n{ablation.strip()}\n")


def idea_values(ablation: str, arm: str, **full: Any) -> dict[str, Any]:
    import tomllib

    values = tomllib.loads(idea_toml(ablation, arm))
    values.pop("kind")
    if full:
        values["full"] = full
    return values


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    e = queue_env(tmp_path)
    set_env(monkeypatch, e)
    return e


def test_the_idea_toml_helper_makes_a_valid_idea(env: dict[str, str]) -> None:
    idea = pipeline.parse_idea(idea_values(WINS, "flat-1"))
    assert pipeline.idea_arm(idea).name == "flat-1"
    assert pipeline.resolved_ablation(idea).baseline == "narrow"


@pytest.mark.parametrize("change, message", [
    ({"hypothesis": " "}, "idea.hypothesis: say what the idea claims"),
    ({"arm": "nosuch"}, "idea.arm: 'nosuch' is not an arm of the ablation"),
    ({"arm": "narrow"}, "idea.arm: 'narrow' is the ablation's baseline"),
    ({"full": {"set": {"depth_max": 9}}}, "idea.full.set.depth_max: a full run scales only size keys"),
    ({"full": {"step": 3}}, "idea.full.step: unknown key (did you mean steps?)"),
    ({"controls": ["negatve"]}, "idea.controls: 'negatve' is not a control"),
    ({"ablation_lane": "tpu"}, "idea.ablation_lane: 'tpu' is not a lane"),
    ({"hypotesis": "x"}, "idea.hypotesis: unknown key"),
])
def test_a_bad_idea_is_refused_naming_the_field(env: dict[str, str], change: dict[str, Any],
                                                message: str) -> None:
    values = {**idea_values(WINS, "flat-1"), **change}
    with pytest.raises(ConfigError) as e:
        pipeline.parse_idea(values)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_dry_run_shows_every_stage_with_its_cost_and_queues_nothing(env: dict[str, str],
                                                                   tmp_path: Path) -> None:
    path = tmp_path / "idea.toml"
    path.write_text(idea_toml(WINS, "flat-1"))
    r = lab(env, "submit", "idea", "--spec", str(path), "--lane", "cpu", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["queued"] is False and plan["primary"] == "test" and plan["arm"] == "flat-1"
    stages = {s["stage"]: s["jobs"] for s in plan["stages"]}
    assert [j["kind"] for j in stages["smoke"]] == ["smoke"] and stages["smoke"][0]["spec"]["arms"] == [
        "flat-1", "narrow"]
    assert stages["ablation"][0]["cost"]["flops"] > stages["smoke"][0]["cost"]["flops"] > 0
    full = stages["full"][0]
    assert full["lane"] == "gpu" and full["spec"]["task"] == "khop" and full["spec"]["primary"] == "test"
    assert "only if the ablation says better for flat-1" in full["gate"]
    assert Store(env["LAB_DB"]).list_jobs() == [] and Store(env["LAB_DB"]).list_pipelines() == []


def _finish(store: Store, job_id: int, status: str, result: dict[str, Any] | None = None) -> None:
    job = store.get(job_id)
    claimed = store.claim_next(job["lane"], "test", "testhost", os.environ["LAB_RUNS"], 30)
    assert claimed["id"] == job_id
    store.finish(job_id, claimed["attempts"], status, exit_code=0 if status == "succeeded" else 1,
                 result=result, error=None if status == "succeeded" else "boom")


# Four deciders, each its own process with its own connection, forked from one interpreter once
# everything `advance` imports is loaded: four interpreters importing torch, scipy and the harness
# took ~12 s of this test on 2 cores, and they reached `advance` seconds apart, not at one instant.
# Each child builds its Store after the fork, waits for the common start, and reports what it did.
_ADVANCE = """
import json, os, sys, time, traceback
from store import Store
from daemon import pipeline
# what advance imports on its way, loaded once before the fork
import daemon.admission, harness.ablate, jobs.ablation, jobs.paths, models.flops, records
start, children = time.time() + 0.5, []
for _ in range(4):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 0
        try:
            s = Store(sys.argv[1])
            while time.time() < start:
                time.sleep(0.001)
            out = repr(pipeline.advance(s))
        except BaseException:
            code, out = 1, traceback.format_exc()
        os.write(w, out.encode())
        os._exit(code)
    os.close(w)
    children.append((pid, r))
results = []
for pid, r in children:
    with os.fdopen(r) as f:
        out = f.read()
    results.append([os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), out])
print(json.dumps(results))
"""


def test_many_deciders_at_once_make_exactly_one_next_stage(env: dict[str, str]) -> None:
    """Every daemon on every host calls advance on every tick: four processes deciding the same
    finished smoke stage at the same instant insert one ablation job between them."""
    store = Store(env["LAB_DB"])
    view = pipeline.submit_idea(idea_values(WINS, "flat-1"), lane="cpu", store=store)
    smoke = view["stages"][0]["jobs"][0]["id"]
    _finish(store, smoke, "succeeded", {"ok": True, "reason": "both arms learned"})
    proc = subprocess.run([sys.executable, "-c", _ADVANCE, env["LAB_DB"]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    outs = json.loads(proc.stdout)
    assert len(outs) == 4 and all(code == 0 for code, _ in outs), outs
    assert sum("'ablation'" in out for _, out in outs) == 1, outs
    after = pipeline.view(view["id"], store)
    assert after["stage"] == "ablation" and len(store.list_jobs(kind="ablation")) == 1
    assert store.pipeline(view["id"])["version"] == 2


def test_a_failed_stage_stops_the_pipeline_and_rerun_starts_that_stage_again(env: dict[str, str]) -> None:
    store = Store(env["LAB_DB"])
    view = pipeline.submit_idea(idea_values(WINS, "flat-1"), lane="cpu", store=store)
    smoke = view["stages"][0]["jobs"][0]["id"]
    _finish(store, smoke, "failed")
    assert pipeline.advance(store) == [(view["id"], "stopped")]
    stopped = pipeline.view(view["id"], store)
    assert stopped["status"] == "stopped" and f"smoke job {smoke} (main) failed: boom" in stopped["reason"]
    assert pipeline.advance(store) == [] and store.list_jobs(kind="ablation") == []
    again = pipeline.rerun(view["id"], store)
    assert again["status"] == "running" and again["stage"] == "smoke" and again["round"] == 2
    assert len(store.list_jobs(kind="smoke")) == 2
    with pytest.raises(ConfigError, match="only a stopped or cancelled pipeline runs again"):
        pipeline.rerun(view["id"], store)
    cancelled = pipeline.cancel(view["id"], "not now", store)
    assert cancelled["status"] == "cancelled"
    assert all(j["status"] == "cancelled" for j in store.list_jobs(kind="smoke")[1:])


def _wait_pipeline(store: Store, pid: int, timeout: float) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        p = store.pipeline(pid)
        return p if p and p["status"] != "running" else None

    return wait_for(ended, timeout, f"pipeline {pid} to end")


def test_an_inconclusive_idea_stops_with_a_drafted_finding(env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "idea.toml"
    path.write_text(idea_toml(TIES, "flat-1-init"))
    r = lab(env, "submit", "idea", "--spec", str(path), "--lane", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    pid = json.loads(r.stdout)["id"]
    store = Store(env["LAB_DB"])
    daemon = start_daemon(env, "--cpu-workers", "2")
    try:
        p = _wait_pipeline(store, pid, 240)
    finally:
        stop_daemon(daemon)
    assert p["status"] == "stopped" and p["stage"] == "ablation", p["reason"]
    assert "flat-1-init vs flat-1 on test: inconclusive" in p["reason"] and "only `better`" in p["reason"]
    assert store.list_jobs(kind="train") == []  # no full run was earned
    outcome = p["outcome"]
    draft = Path(outcome["finding_draft"])
    text = draft.read_text()
    assert draft.name == "finding-draft.md" and "inconclusive" in text and "## What this cannot show" in text
    assert outcome["graveyard"].startswith("- ") and "A wider model reads the pointer" in outcome["graveyard"]
    assert f"lab finding {outcome['ablation']}" in outcome["publish"]
    shown = lab(env, "pipeline", str(pid))
    assert shown.returncode == 0 and "graveyard line for docs/ROADMAP.md" in shown.stdout
    status = json.loads(lab(env, "status", "--json").stdout)
    assert [x["id"] for x in status["pipelines"]] == [pid]


class IdeaWorld:
    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch):
        self.gh = FakeGitHub(TOKEN).start()
        self.gh.add_user("alice", "write")
        self.env = {**queue_env(tmp, **FAST_GITHUB), "GITHUB_TOKEN": TOKEN,
                    "GITHUB_REPOSITORY": self.gh.repo, "GITHUB_API_URL": self.gh.url}
        for k in ("LAB_ALLOWED_USERS", "LAB_GITHUB_POLL"):
            self.env.pop(k, None)
            monkeypatch.delenv(k, raising=False)
        for k, v in self.env.items():
            if k.startswith(("LAB_", "GITHUB_")):
                monkeypatch.setenv(k, v)
        self.store = Store(self.env["LAB_DB"])
        self.outbox = Outbox(self.store)

    def sync(self) -> dict[str, Any]:
        return github.sync_once(store=self.store)

    def close(self) -> None:
        self.gh.stop()
        self.store.dispose()


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    w = IdeaWorld(tmp_path, monkeypatch)
    yield w
    w.close()


def test_an_idea_issue_goes_from_label_to_the_earned_full_run(world: IdeaWorld) -> None:
    gh = world.gh
    n = gh.open_issue("Idea: width reads the pointer", spec_body(idea_toml(WINS, "flat-1")), ("cpu",),
                      user="alice")
    world.sync()
    [p] = world.store.list_pipelines(issue=n)
    daemon_env = {k: v for k, v in world.env.items() if not k.startswith("GITHUB_")}
    daemon = start_daemon(daemon_env, "--cpu-workers", "2")
    try:
        wait_for(lambda: world.sync() and world.store.pipeline(p["id"])["status"] != "running", 300,
                 "the pipeline to end")
    finally:
        stop_daemon(daemon)
    done = world.store.pipeline(p["id"])
    assert done["status"] == "succeeded", done["reason"]
    links = world.store.pipeline_jobs(p["id"])
    assert [(x["stage"], x["role"]) for x in links] == [("smoke", "main"), ("ablation", "main"),
                                                        ("full", "main")]
    smoke, abl, full = (world.store.get(x["job_id"]) for x in links)
    assert (smoke["kind"], smoke["lane"]) == ("smoke", "cpu")
    assert (abl["kind"], abl["lane"]) == ("ablation", "cpu")
    assert (full["kind"], full["lane"], full["earned_by"]) == ("train", "gpu", abl["id"])
    assert all(j["status"] == "succeeded" and j["issue"] == n for j in (smoke, abl, full))
    arm = next(a for a in abl["result"]["arms"] if a["name"] == "flat-1")
    assert arm["verdict"] == "better"
    assert full["spec"]["task"] == "khop" and full["spec"]["primary"] == "test"
    assert full["result"]["primary"]["cell"] == "test" and "grid" in full["result"]
    assert done["outcome"]["ablation"]["job"] == abl["id"]

    def settled() -> bool:
        world.sync()
        return world.outbox.counts()["pending"] == 0

    wait_for(settled, 60, "every comment and label sent")
    status = [c for c in gh.comments_on(n) if render.key_marker(f"pipeline:{p['id']}") in c["body"]]
    assert len(status) == 1, "one status comment for the whole pipeline"
    body = status[0]["body"]
    assert "Idea pipeline" in body and "**succeeded**" in body and "**full**" in body
    for job in (smoke, abl, full):
        results = [c for c in gh.comments_on(n) if render.result_marker(job["id"]) in c["body"]]
        assert len(results) == 1 and "of idea pipeline" in results[0]["body"]
        assert not [c for c in gh.comments_on(n) if render.status_marker(job["id"]) in c["body"]]
    labels = set(gh.labels_on(n))
    assert {"succeeded", "stage:full"} <= labels and not {"running", "stage:smoke", "stage:ablation"} & labels
    # The full run's result comment and its model card set its grid beside the ablation arm's.
    [result] = [c["body"] for c in gh.comments_on(n) if render.result_marker(full["id"]) in c["body"]]
    assert "**Primary cell** `test`" in result and "Split `test`" in result
    assert f"ablation arm `flat-1`'s (job {abl['id']}" in result
    card = lab({**world.env, "LAB_DOCS": str(Path(world.env["LAB_RUNS"]).parent / "docs")},
               "register", str(full["id"]), "--name", "flat-1-khop", "--json")
    assert card.returncode == 0, card.stderr
    text = Path(json.loads(card.stdout)["path"]).read_text()
    assert "## Task grid" in text and f"(job {abl['id']}" in text


def test_closing_an_idea_issue_cancels_its_pipeline(world: IdeaWorld) -> None:
    gh = world.gh
    n = gh.open_issue("Idea", spec_body(idea_toml(WINS, "flat-1")), ("cpu",), user="alice")
    world.sync()
    [p] = world.store.list_pipelines(issue=n)
    assert world.store.pipeline_jobs(p["id"])[0]["stage"] == "smoke"
    gh.close(n)
    world.sync()
    assert world.store.pipeline(p["id"])["status"] == "cancelled"
    assert all(j["status"] == "cancelled" for j in world.store.list_jobs(issue=n))
    assert pipeline.advance(world.store) == []  # a cancelled pipeline decides nothing more


def test_kill_9_between_two_stages_leaves_exactly_one_next_stage(env: dict[str, str]) -> None:
    """The daemon is killed -9 the moment the smoke job has ended, before (or while) it decides;
    the daemons started after it decide the ablation stage once between them."""
    store = Store(env["LAB_DB"])
    view = pipeline.submit_idea(idea_values(WINS, "flat-1"), lane="cpu", store=store)
    smoke = view["stages"][0]["jobs"][0]["id"]
    daemon = start_daemon(env, "--cpu-workers", "2")
    try:
        wait_for(lambda: store.get(smoke)["status"] in FINAL, 120, "the smoke job to end")
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert store.get(smoke)["status"] == "succeeded"
    before = len(store.list_jobs(kind="ablation"))
    assert before <= 1
    # The two after it only decide: they offer the GPU lane alone, so the ablation they insert stays
    # queued (it is a CPU job) and its 6 seed runs do not take the 2 cores while they tick.
    two = [start_daemon(env, "--lanes", "gpu") for _ in range(2)]
    try:
        wait_for(lambda: store.list_jobs(kind="ablation"), 60, "the ablation stage")
        import time

        time.sleep(2.0)  # both daemons have ticked many times since
        assert len(store.list_jobs(kind="ablation")) == 1
        assert pipeline.view(view["id"], store)["stage"] == "ablation"
        pipeline.cancel(view["id"], "test over", store)
    finally:
        for d in two:
            stop_daemon(d)


def test_a_stopped_idea_shows_why_on_its_issue_and_rerun_starts_the_stage_again(world: IdeaWorld) -> None:
    gh = world.gh
    n = gh.open_issue("Idea", spec_body(idea_toml(WINS, "flat-1")), ("cpu",), user="alice")
    world.sync()
    [p] = world.store.list_pipelines(issue=n)
    smoke = world.store.pipeline_jobs(p["id"])[0]["job_id"]
    _finish(world.store, smoke, "failed")
    assert pipeline.advance(world.store) == [(p["id"], "stopped")]
    world.sync()
    [status] = [c for c in gh.comments_on(n) if render.key_marker(f"pipeline:{p['id']}") in c["body"]]
    assert "**stopped**" in status["body"] and f"smoke job {smoke} (main) failed: boom" in status["body"]
    assert "`/rerun`" in status["body"]
    assert {"stopped", "stage:smoke"} <= set(gh.labels_on(n))
    gh.comment(n, "/rerun", user="alice")
    world.sync()
    again = world.store.pipeline(p["id"])
    assert (again["status"], again["stage"], again["round"]) == ("running", "smoke", 2)
    assert len(world.store.list_pipelines(issue=n)) == 1  # the same pipeline, its stage again
    assert len(world.store.list_jobs(kind="smoke")) == 2
    world.sync()
    assert "running" in gh.labels_on(n) and "stopped" not in gh.labels_on(n)
