"""The GitHub bridge against the stand-in GitHub (tests/github_server.py) over real HTTP, with the
real PyGithub, a real SQLite queue, and jobs run by a real `lab daemon` subprocess."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from github_server import FAULT_KINDS, FakeGitHub
from helpers_daemon import ROOT, lab, queue_env, start_daemon, stop_daemon, wait_for
from sqlalchemy import text

import jobs
from bridge import github, render
from bridge.outbox import Outbox
from store import FINAL, Store

TOKEN = "ghp_TESTtoken0123456789abcdefSECRET"
FAST_GITHUB = {
    "LAB_QUEUE_GITHUB_SECONDS_BETWEEN_REQUESTS": "0",
    "LAB_QUEUE_GITHUB_SECONDS_BETWEEN_WRITES": "0",
    "LAB_QUEUE_GITHUB_TIMEOUT_SECONDS": "1",
    "LAB_QUEUE_GITHUB_BACKOFF_SECONDS": "0.05",
    "LAB_QUEUE_GITHUB_BACKOFF_MAX_SECONDS": "0.5",
}


def spec_body(toml: str, prose: str = "An experiment.") -> str:
    return f"{prose}\n\n```toml\n{toml.strip()}\n```\n"


class World:
    """One private queue + one stand-in GitHub + (optionally) a daemon that runs the jobs."""

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch):
        self.tmp = tmp
        self.gh = FakeGitHub(TOKEN).start()
        self.gh.add_user("alice", "write")
        self.gh.add_user("mallory", None)  # a GitHub user without access
        self.base_env = queue_env(tmp, **FAST_GITHUB)
        for k in ("GITHUB_TOKEN", "GITHUB_REPOSITORY", "GITHUB_API_URL", "LAB_ALLOWED_USERS",
                  "LAB_GITHUB_POLL"):
            self.base_env.pop(k, None)
            monkeypatch.delenv(k, raising=False)
        self.env = {**self.base_env, "GITHUB_TOKEN": TOKEN, "GITHUB_REPOSITORY": self.gh.repo,
                    "GITHUB_API_URL": self.gh.url}
        for k, v in self.env.items():
            if k.startswith(("LAB_", "GITHUB_")):
                monkeypatch.setenv(k, v)
        self.store = Store(self.env["LAB_DB"])
        self.outbox = Outbox(self.store)
        self.daemons: list[subprocess.Popen] = []
        self.outputs: list[str] = []  # every stdout/stderr we saw, for the token check

    def sync(self) -> dict[str, Any]:
        summary = github.sync_once(store=self.store)
        self.outputs.append(json.dumps(summary))
        return summary

    def sync_until(self, done: Any, timeout: float, what: str) -> int:
        deadline, cycles = time.monotonic() + timeout, 0
        while True:
            self.sync()
            cycles += 1
            if done():
                return cycles
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what} after {cycles} cycles")
            time.sleep(0.05)

    def daemon(self, with_github: bool = False, token_file: bool = False, **extra: str) -> subprocess.Popen:
        env = {**(self.env if with_github else self.base_env), **extra}
        if token_file:  # the token in a chmod-600 file, in no process environment
            path = self.tmp / "github-token"
            path.write_text(env.pop("GITHUB_TOKEN") + "\n")
            path.chmod(0o600)
            env["GITHUB_TOKEN_FILE"] = str(path)
        proc = start_daemon(env, "--cpu-workers", "2", log=self.tmp / f"daemon-{len(self.daemons)}.log")
        self.daemons.append(proc)
        return proc

    def lab(self, *args: str) -> subprocess.CompletedProcess:
        r = lab(self.env, *args)
        self.outputs += [r.stdout, r.stderr]
        return r

    def jobs(self, issue: int | None = None) -> list[dict[str, Any]]:
        return self.store.list_jobs(issue=issue)

    def comments(self, n: int, marker: str = "") -> list[dict[str, Any]]:
        return [c for c in self.gh.comments_on(n) if marker in c["body"]]

    def reported(self, job_ids: list[int]) -> bool:
        """Every job finished, its result comment sent, and nothing left in the outbox."""
        jobs = [self.store.get(j) for j in job_ids]
        if not all(j and j["status"] in FINAL for j in jobs):
            return False
        results = {r["job_id"]: r for r in self.outbox.rows(kind="result")}
        return all(j["id"] in results and results[j["id"]]["status"] == "done"
                   and results[j["id"]]["source_at"] == j["finished_at"] for j in jobs) \
            and self.outbox.counts()["pending"] == 0

    def close(self) -> None:
        for p in self.daemons:
            stop_daemon(p)
        self.gh.stop()
        self.store.dispose()

    def assert_no_token(self) -> None:
        """The token is nowhere: outputs, daemon and job logs, comments, any database row."""
        seen = list(self.outputs)
        seen += [p.read_text(errors="replace") for p in self.tmp.rglob("*") if p.is_file()
                 and p.suffix in (".log", ".txt", ".json", ".jsonl", ".md")]
        seen += [c["body"] for c in self.gh.comments.values()]
        with self.store.engine.connect() as c:
            for table in ("lab_jobs", "lab_events", "lab_outbox", "lab_github_runs", "lab_github_state",
                          "lab_github_issues", "lab_leases"):
                seen += [repr(tuple(r)) for r in c.execute(text(f"SELECT * FROM {table}"))]
        assert seen and not [s for s in seen if TOKEN in s]


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    w = World(tmp_path, monkeypatch)
    yield w
    w.close()
    w.assert_no_token()


# --- issues -> jobs -------------------------------------------------------------------------


def test_labelled_issues_become_jobs_in_their_lane_and_answer_once(world: World,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    gh = world.gh
    gh.add_user("bob", "maintain")
    gh.add_user("dave", None)
    monkeypatch.setenv("LAB_ALLOWED_USERS", "Dave, erin")
    cpu = gh.open_issue("cpu sleep", spec_body('kind = "sleep"\nseconds = 0.3'), ("cpu",), user="alice")
    gpu = gh.open_issue("gpu sleep", spec_body('kind = "sleep"\nseconds = 0.2'), ("gpu", "ideas"), user="bob")
    pr = gh.open_issue("a PR", spec_body('kind = "sleep"'), ("gpu",), user="alice", pull_request=True)
    stranger = gh.open_issue("from a stranger", spec_body('kind = "sleep"'), ("cpu",), user="mallory")
    allowed = gh.open_issue("allowed by list", spec_body('kind = "sleep"\nseconds = 0.1'), (), user="dave")
    gh.label(allowed, "cpu", actor="dave")  # no repository permission, but in LAB_ALLOWED_USERS
    plain = gh.open_issue("no lane label", spec_body('kind = "sleep"'), ("bug",), user="alice")
    broken = gh.open_issue("fails", spec_body('kind = "sleep"\nseconds = 0.1\nfail = true'), ("cpu",),
                           user="alice")

    first = world.sync()
    assert first["errors"] == []
    by_issue = {j["issue"]: j for j in world.jobs()}
    failing = by_issue.pop(broken)
    assert sorted(by_issue) == [cpu, gpu, allowed]
    assert [by_issue[n]["lane"] for n in (cpu, gpu, allowed)] == ["cpu", "gpu", "cpu"]
    assert by_issue[cpu]["source"] == "github" and by_issue[cpu]["spec"]["seconds"] == 0.3
    # the status comment exists as soon as the job is queued, with the queued label
    assert len(world.comments(cpu, render.status_marker(by_issue[cpu]["id"]))) == 1
    assert "queued" in gh.labels_on(cpu)

    world.daemon()
    ids = [j["id"] for j in by_issue.values()] + [failing["id"]]
    world.sync_until(lambda: world.reported(ids), 40, "four results")
    for n, job in by_issue.items():
        assert world.store.get(job["id"])["status"] == "succeeded"
        status = world.comments(n, render.status_marker(job["id"]))
        result = world.comments(n, render.result_marker(job["id"]))
        assert len(status) == 1 and len(result) == 1
        assert "succeeded" in status[0]["body"] and "succeeded" in result[0]["body"]
        assert "| slept |" in result[0]["body"] and f"runs/{job['id']}" in result[0]["body"]
        assert "succeeded" in gh.labels_on(n) and "queued" not in gh.labels_on(n)
        assert "running" not in gh.labels_on(n)
    # the pull request and the unlabelled issue are left alone; the stranger gets one polite word
    assert gh.comments_on(pr) == [] and gh.labels_on(pr) == ["gpu"] and gh.comments_on(plain) == []
    polite = gh.comments_on(stranger)
    assert len(polite) == 1 and "write access" in polite[0]["body"]
    assert "@mallory" not in polite[0]["body"] and "`mallory`" in polite[0]["body"]  # named, not pinged
    # nothing changes on GitHub any more: once our own last writes are read back (two cycles),
    # a quiet cycle is one conditional request answered 304
    world.sync()
    world.sync()
    before = gh.count()
    again = world.sync()
    assert again["submitted"] == [] and again["sent"] == 0 and again["requests"] == 1
    assert gh.count() == before + 1 and gh.requests[-1].status == 304
    assert len(gh.comments_on(stranger)) == 1 and len(world.jobs()) == 4
    # that daemon had no GitHub settings: it said so once and polled nothing
    log = (world.tmp / "daemon-0.log").read_text()
    assert log.count("GitHub bridge off") == 1 and "CLI only" in log
    # a failure says why, with the log tail; retried, it ends again: the same comment is edited
    [result] = world.comments(broken, render.result_marker(failing["id"]))
    assert "### ❌ Job" in result["body"] and "failed on purpose" in result["body"]
    assert "**Log tail**" in result["body"] and "failed" in gh.labels_on(broken)
    world.store.retry(failing["id"])
    world.sync_until(lambda: world.reported([failing["id"]]), 30, "the retried job reported")
    [again_result] = world.comments(broken, render.result_marker(failing["id"]))
    assert again_result["id"] == result["id"] and again_result["body"] != result["body"]
    # a maintainer takes over the stranger's issue by labelling it again: now it runs
    gh.unlabel(stranger, "cpu", actor="bob")
    gh.label(stranger, "cpu", actor="bob")
    assert world.sync()["submitted"] == [world.jobs(stranger)[0]["id"]]


def test_issue_form_and_readme_example_produce_valid_specs() -> None:
    """The issue form's spec field, rendered as GitHub renders forms, and the README's example."""
    lines = (ROOT / ".github/ISSUE_TEMPLATE/experiment.yml").read_text().splitlines()
    start = lines.index("    id: spec")
    block = lines[start:]
    assert "      render: toml" in block
    value_at = block.index("      value: |")
    value = []
    for line in block[value_at + 1:]:
        if line.strip() and not line.startswith("        "):
            break
        value.append(line[8:])
    top_labels = next(x for x in lines if x.startswith("labels:"))
    assert "gpu" not in top_labels and "cpu" not in top_labels  # only a maintainer's label starts work
    body = "### Hypothesis\n\nIt works.\n\n### Spec\n\n```toml\n" + "\n".join(value).strip() + "\n```\n\n" \
           "### Lane you suggest\n\ncpu"
    for lane in ("cpu", "gpu"):
        assert github.parse_issue_spec(body, [lane], 1).kind == "sleep"
    readme = (ROOT / "README.md").read_text().split("## From issue to result")[1].split("\n## ")[0]
    example = "\n".join(x[4:] if x.startswith("    ") else x for x in readme.splitlines())
    spec = github.parse_issue_spec(example, ["cpu"], 1)
    assert spec.kind == "ablation" and spec.spec["baseline"] == "flat-2" and spec.spec["primary"] == "hops3"
    from jobs.ablation import resolve

    resolve(jobs.parse_spec("ablation", spec.spec))  # the harness accepts it: primary names a cell


def test_the_idea_form_and_the_readme_idea_produce_valid_ideas() -> None:
    """The Idea issue form's spec, as GitHub renders it, and the README's idea example are ideas
    the pipeline accepts, their full run included (the same spec_file, pre-registered)."""
    from daemon import pipeline

    lines = (ROOT / ".github/ISSUE_TEMPLATE/idea.yml").read_text().splitlines()
    block = lines[lines.index("    id: spec"):]
    value = []
    for line in block[block.index("      value: |") + 1:]:
        if line.strip() and not line.startswith("        "):
            break
        value.append(line[8:])
    body = "### Spec\n\n```toml\n" + "\n".join(value).strip() + "\n```\n"
    readme = (ROOT / "README.md").read_text().split("## Ideas: one issue, one pipeline")[1].split("\n## ")[0]
    example = "\n".join(x[4:] if x.startswith("    ") else x for x in readme.splitlines())
    for issue_body in (body, example):
        spec = github.parse_issue_spec(issue_body, ["cpu"], 1)
        assert spec.kind == "idea" and spec.spec["arm"] == "refiner-wide"
        idea = pipeline.parse_idea(spec.spec)
        assert pipeline.resolved_ablation(idea).primary == "sparse:7-8@16"
        full = pipeline.full_spec(idea)
        assert full["preset"] == "rtx2060_task" and full["task"] == "chase"
        jobs.parse_spec("train", full)


BAD_SPECS = [
    ("no block", "Please run a sleep, seconds = 1", ("cpu",), "`toml`", "no fenced"),
    ("bad toml", spec_body('kind = "sleep"\nseconds = = 1'), ("cpu",), "`toml`", "invalid TOML"),
    ("no kind", spec_body("seconds = 1"), ("cpu",), "`kind`", "missing"),
    ("unknown kind", spec_body('kind = "rm -rf /"'), ("cpu",), "`kind`", "is not a job kind"),
    ("unknown key", spec_body('kind = "sleep"\nsecs = 1'), ("cpu",), "`sleep.secs`", "unknown key"),
    ("wrong type", spec_body('kind = "sleep"\nseconds = "long"'), ("gpu",), "`sleep.seconds`",
     "expected float"),
    ("out of range", spec_body('kind = "sleep"\nseconds = -4'), ("gpu",), "`sleep.seconds`", "out of range"),
    ("wrong lane", spec_body('kind = "tokenize"\nname = "x"\nsrc = ["a.txt"]'), ("gpu",), "`lane`",
     "cannot run in lane"),
    ("two lanes", spec_body('kind = "sleep"'), ("gpu", "cpu"), "`label`", "both lane labels"),
    ("bad depends-on", spec_body('kind = "sleep"\ndepends-on = "#3"'), ("cpu",), "`depends-on`",
     "not another"),
    ("absolute path", spec_body('kind = "tokenize"\nname = "x"\nsrc = ["/etc/hostname"]'), ("cpu",),
     "`tokenize.src`", "outside the lab"),
    ("path upwards", spec_body('kind = "ablation"\nspec_file = "../../x.toml"'), ("cpu",),
     "`ablation.spec_file`", "outside the lab"),
]


def test_each_bad_spec_gets_one_answer_naming_the_field_and_nothing_runs(world: World) -> None:
    gh = world.gh
    issues = {name: gh.open_issue(name, body, labels, user="alice") for name, body, labels, _, _ in BAD_SPECS}
    summary = world.sync()
    assert summary["answered"] == len(BAD_SPECS) and summary["submitted"] == []
    for name, _, _, field, words in BAD_SPECS:
        n = issues[name]
        answers = gh.comments_on(n)
        assert len(answers) == 1, name
        body = answers[0]["body"]
        assert body.startswith(render.INVALID_MARKER), name
        assert f"**Field:** {field}" in body and words in body and "**Fix:**" in body, (name, body)
        assert "needs-fix" in gh.labels_on(n), name
    assert world.jobs() == []
    # the same bad spec is not answered twice, however often the issue changes around it
    for n in issues.values():
        gh.comment(n, "any news?", user="alice")
    world.sync()
    world.sync()
    assert all(len(gh.comments_on(n)) == 2 for n in issues.values())
    # a fixed spec runs, and the needs-fix label goes away
    n = issues["unknown key"]
    gh.edit_body(n, spec_body('kind = "sleep"\nseconds = 0.1'))
    fixed = world.sync()
    assert fixed["submitted"] == [world.jobs(n)[0]["id"]]
    assert "needs-fix" not in gh.labels_on(n) and "queued" in gh.labels_on(n)
    # a new mistake in the same issue is a new answer
    gh.edit_body(n, spec_body('kind = "sleep"\nseconds = true'))
    world.sync()
    assert len(world.comments(n, render.INVALID_MARKER)) == 2 and "needs-fix" in gh.labels_on(n)


def test_close_and_unlabel_cancel_running_and_queued_jobs(world: World) -> None:
    gh = world.gh
    running = gh.open_issue("long gpu", spec_body('kind = "sleep"\nseconds = 60'), ("gpu",), user="alice")
    queued = gh.open_issue("waits behind it", spec_body('kind = "sleep"\nseconds = 60'), ("gpu",),
                           user="alice")
    world.sync()
    jr, jq = world.jobs(running)[0]["id"], world.jobs(queued)[0]["id"]
    world.daemon()
    wait_for(lambda: world.store.get(jr)["status"] == "running", 20, "the first GPU job to run")
    assert world.store.get(jq)["status"] == "queued"  # the GPU lane runs one job at a time
    world.sync()
    assert "running" in gh.labels_on(running)
    gh.close(running)
    gh.unlabel(queued, "gpu", actor="alice")
    summary = world.sync()
    assert sorted(summary["cancelled"]) == sorted([jr, jq])
    world.sync_until(lambda: world.reported([jr, jq]), 30, "both cancellations reported")
    for n, j in ((running, jr), (queued, jq)):
        assert world.store.get(j)["status"] == "cancelled"
        result = world.comments(n, render.result_marker(j))
        assert len(result) == 1 and "cancelled" in result[0]["body"]
        assert not {"queued", "running"} & set(gh.labels_on(n))
    assert "closed" in world.store.get(jr)["error"] and "lane label" in world.store.get(jq)["error"]
    # labelling it again brings the same spec back
    gh.label(queued, "gpu", actor="alice")
    assert len(world.sync()["submitted"]) == 1 and len(world.jobs(queued)) == 2


def test_blocked_label_rerun_edit_and_depends_on(world: World) -> None:
    gh = world.gh
    held = gh.open_issue("held", spec_body('kind = "sleep"\nseconds = 0.1'), ("cpu", "blocked"), user="alice")
    world.sync()
    job = world.jobs(held)[0]
    assert job["status"] == "blocked" and "blocked" in job["held"]
    world.daemon()
    time.sleep(1.0)
    assert world.store.get(job["id"])["status"] == "blocked"  # the daemon does not touch it
    gh.unlabel(held, "blocked", actor="alice")
    world.sync_until(lambda: world.reported([job["id"]]), 20, "the released job")
    assert world.store.get(job["id"])["status"] == "succeeded"

    # /rerun by someone with write access runs it again; by a stranger, a polite no
    gh.comment(held, "/rerun please", user="alice")
    gh.comment(held, "/rerun", user="mallory")
    world.sync()
    assert len(world.jobs(held)) == 2
    assert len(world.comments(held, "lab:key unauthorised")) == 1
    # editing the spec runs the new spec
    gh.edit_body(held, spec_body('kind = "sleep"\nseconds = 0.2'))
    world.sync()
    jobs = world.jobs(held)
    assert len(jobs) == 3 and jobs[-1]["spec"]["seconds"] == 0.2

    # depends-on: waits for the other issue's latest job to succeed
    dep = gh.open_issue("after it", spec_body(f'kind = "sleep"\nseconds = 0.1\ndepends-on = {held}'),
                        ("cpu",), user="alice")
    world.sync()
    after = world.jobs(dep)[0]
    assert after["after_id"] == jobs[-1]["id"]
    ids = [j["id"] for j in world.jobs()]
    world.sync_until(lambda: world.reported(ids), 30, "all jobs reported")
    assert world.store.get(after["id"])["started_at"] >= world.store.get(jobs[-1]["id"])["finished_at"]
    assert all(len(world.comments(j["issue"], render.result_marker(j["id"]))) == 1 for j in world.jobs())
    # an issue that depends on one without a job waits (one notice) and starts when it gets one
    later = gh.open_issue("later", "", (), user="alice")
    waits = gh.open_issue("waits", spec_body(f'kind = "sleep"\nseconds = 0.1\ndepends-on = {later}'),
                          ("cpu",), user="alice")
    world.sync()
    world.sync()
    assert world.jobs(waits) == [] and len(gh.comments_on(waits)) == 1
    gh.edit_body(later, spec_body('kind = "sleep"\nseconds = 0.1'))
    gh.label(later, "cpu", actor="alice")
    world.sync()
    assert world.jobs(waits)[0]["after_id"] == world.jobs(later)[0]["id"]


# --- exactly once under faults ----------------------------------------------------------------


def test_thirty_percent_faults_on_every_endpoint_leave_exactly_one_comment_per_job(world: World) -> None:
    gh = world.gh
    issues = [gh.open_issue(f"job {i}", spec_body(f'kind = "sleep"\nseconds = 0.{i + 1}'),
                            ("gpu" if i % 2 else "cpu",), user="alice") for i in range(6)]
    gh.fault_rate = 0.30
    # besides the random faults, comment creations that GitHub applies but whose answer is lost
    gh.force_fault("POST", r"/comments$", "ambiguous_timeout")
    gh.force_fault("POST", r"/comments$", "ambiguous_error")
    gh.force_fault("GET", r"/issues$", "timeout")  # and at least one of each other kind
    gh.force_fault("GET", r"/events$", "secondary_rate")
    gh.force_fault("GET", r"/permission$", "error")
    gh.timeout_sleep = 1.3  # past the client's 1 s timeout
    # every kind of fault; timeouts and Retry-After (the slow kinds, a second each) a little rarer
    gh.fault_kinds = ("error",) * 3 + ("ambiguous_error",) * 3 + ("secondary_rate", "timeout",
                                                                   "ambiguous_timeout")
    world.daemon()
    world.sync_until(lambda: len(world.jobs()) == len(issues), 60, "every issue enqueued")
    ids = [j["id"] for j in world.jobs()]
    world.sync_until(lambda: world.reported(ids), 90, "every result posted through the faults")
    gh.fault_rate = 0.0
    world.sync()  # a last clean cycle: nothing more may be posted
    assert world.outbox.counts()["pending"] == 0 and world.outbox.counts()["dead"] == 0

    bodies = [c["body"] for c in gh.comments.values()]
    markers = Counter(m for b in bodies for m in re.findall(r"<!-- lab:(?:status|result) \d+ -->", b))
    duplicates = sum(n - 1 for n in markers.values())
    for n in issues:
        job = world.jobs(n)
        assert len(job) == 1, f"issue {n} enqueued {len(job)} times"
        assert len(world.comments(n, render.result_marker(job[0]["id"]))) == 1
        assert len(world.comments(n, render.status_marker(job[0]["id"]))) == 1
    assert duplicates == 0
    faults = Counter(r.fault for r in gh.requests if r.fault)
    created = sum(1 for r in gh.requests if r.method == "POST" and r.path.endswith("/comments") and r.applied)
    ambiguous_posts = sum(1 for r in gh.requests if r.method == "POST" and r.path.endswith("/comments")
                          and r.applied and r.fault)
    assert ambiguous_posts >= 2 and set(faults) == set(FAULT_KINDS)
    assert created == len(bodies) == 2 * len(issues)
    print(f"\nfault test: {len(gh.requests)} requests, {sum(faults.values())} faults injected "
          f"({dict(faults)}; {ambiguous_posts} comment creations applied but answered with a fault), "
          f"{created} comments posted, duplicates: {duplicates}")


def _sync_process(world: World) -> subprocess.Popen:
    with open(world.tmp / f"sync-{time.monotonic_ns()}.log", "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "cli", "github", "sync", "--once", "--json"], cwd=ROOT,
                                env=world.env, stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.parametrize("poster, landed", [("daemon", True), ("sync-once", False)],
                         ids=["daemon-killed-after-github-applied", "sync-killed-before-it-landed"])
def test_kill_9_mid_post_then_restart_leaves_exactly_one_result(world: World, poster: str,
                                                                 landed: bool) -> None:
    """A poster killed with -9 between the job's end and its result post: after GitHub applied the
    POST (the answer never came back), or before; the next poster leaves exactly one comment."""
    gh = world.gh
    n = gh.open_issue("to kill", spec_body('kind = "sleep"\nseconds = 0.1'), ("cpu",), user="alice")
    hold = gh.hold("POST", rf"/issues/{n}/comments$", after_apply=landed, body_contains="lab:result")
    if poster == "daemon":  # the daemon runs the job and polls GitHub itself
        proc = world.daemon(with_github=True, LAB_GITHUB_POLL="1")
    else:
        world.sync()
        world.daemon()
        wait_for(lambda: world.jobs(n)[0]["status"] in FINAL, 20, "the job to end")
        proc = _sync_process(world)
    assert hold.reached.wait(30), "the result was never posted"
    job_id = world.jobs(n)[0]["id"]
    assert world.store.get(job_id)["status"] == "succeeded"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    gh.release()
    assert len(world.comments(n, render.result_marker(job_id))) == (1 if landed else 0)
    if poster == "daemon":
        world.daemons.remove(proc)
        again = world.daemon(with_github=True, LAB_GITHUB_POLL="1")
        wait_for(lambda: world.reported([job_id]), 90, "the restarted daemon to finish the post")
        stop_daemon(again)
    else:
        # someone pastes the marker meanwhile: it must neither stop nor receive the real post
        gh.comment(n, f"copied {render.result_marker(job_id)}", user="mallory")
        out = world.lab("github", "sync", "--once", "--json")
        assert out.returncode == 0 and json.loads(out.stdout)["errors"] == [], out.stderr
        assert [c["body"] for c in gh.comments_on(n) if c["user"]["login"] == "mallory"] == [
            f"copied {render.result_marker(job_id)}"]
    results = [c for c in world.comments(n, render.result_marker(job_id)) if c["user"]["login"] == gh.bot]
    assert len(results) == 1 and len(world.comments(n, render.status_marker(job_id))) == 1
    row = world.outbox.rows(kind="result")[0]
    assert row["status"] == "done" and row["comment_id"] == results[0]["id"] and row["posts"] >= 1
    posts = [r for r in gh.requests if r.method == "POST" and r.path.endswith(f"/issues/{n}/comments")]
    assert len(posts) == (2 if landed else 3)  # status, result (+ the lost one when it never landed)


def test_rate_limit_pauses_the_bridge_until_reset(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    gh = world.gh
    monkeypatch.setenv("LAB_QUEUE_GITHUB_RATE_RESERVE", "0")
    gh.rate_limit, gh.rate_window_s = 3, 3.0
    gh.rate_remaining, gh.rate_reset = 3, time.time() + 3.0
    n = gh.open_issue("rate", spec_body('kind = "sleep"\nseconds = 0.1'), ("cpu",), user="alice")
    reset = int(gh.rate_reset) + 1  # what X-RateLimit-Reset says
    first = world.sync()
    assert first.get("paused_until"), first
    assert gh.requests[-1].status == 403
    asked = gh.count()
    paused = world.sync()  # paused: not one request until the reset
    assert paused["requests"] == 0 and gh.count() == asked
    gh.rate_limit = 5000

    def resumed() -> bool:
        jobs = world.jobs(n)
        return bool(jobs) and len(world.comments(n, render.status_marker(jobs[0]["id"]))) == 1

    world.sync_until(resumed, 20, "the bridge to resume after the reset")
    assert len(world.jobs(n)) == 1
    assert min(r.at for r in gh.requests[asked:]) >= reset  # nothing asked before the reset


def test_a_spent_rate_limit_pauses_the_poller_and_it_resumes_after_the_reset(world: World) -> None:
    """The default reserve (200): GitHub answers 403 with X-RateLimit-Remaining 0 and a reset 3 s
    ahead. The count the bridge last saw stays 0 after the reset; it must ask GET /rate_limit
    (free) instead of pausing until a time already past, forever, as it used to."""
    gh = world.gh
    world.daemon(with_github=True, LAB_GITHUB_POLL="1")
    # Spent once the bridge polls (a daemon's start takes seconds on a loaded box; the window
    # must not end before its first request), the window ending 3 s later.
    wait_for(lambda: gh.requests, 60, "the bridge's first request")
    with gh.lock:
        spent_at = time.time()
        gh.rate_remaining, gh.rate_reset = 0, spent_at + 3.0
    reset = int(gh.rate_reset) + 1  # what X-RateLimit-Reset says
    issues = [gh.open_issue(f"rate {i}", spec_body('kind = "sleep"\nseconds = 0.1'), ("cpu",), user="alice")
              for i in range(3)]

    def answered() -> bool:
        jobs = world.jobs()
        return len(jobs) == len(issues) and world.reported([j["id"] for j in jobs])

    wait_for(answered, 30, "every result after the reset")
    results = [c for n in issues for c in world.comments(n, "<!-- lab:result ")]
    assert len(results) == len(issues)
    posted = max(gh.comments[c["id"]]["created_at"] for c in results)
    print(f"\nthe last result came {posted - reset:.1f} s after the reset")
    assert posted < reset + 10, f"the last result came {posted - reset:.1f} s after the reset"
    early = [r for r in gh.requests if spent_at <= r.at < reset]
    assert early and all(r.status == 403 or r.path == "/rate_limit" for r in early)  # paused meanwhile
    assert gh.count("GET", r"^/rate_limit$") >= 1
    log = (world.tmp / "daemon-0.log").read_text()
    world.outputs.append(log)
    assert log.count("paused until") <= 2, log


# --- GitHub's pace: few writes per job ---------------------------------------------------------


def _writes(gh: FakeGitHub, since: int = 0) -> list[str]:
    """The REST writes after request `since`, as `METHOD /shape` (GraphQL queries are reads)."""
    out = []
    for r in gh.requests[since:]:
        if r.method != "GET" and r.path != "/graphql":
            out.append(f"{r.method} " + re.sub(r"/\d+", "/N", r.path.split(gh.repo, 1)[-1]))
    return sorted(out)


def test_a_label_change_is_one_request_that_keeps_peoples_labels(world: World) -> None:
    """queued -> running -> succeeded, all between two syncs: one label write (a PUT of the full
    set, the person's labels kept), one status edit, one result comment."""
    gh = world.gh
    n = gh.open_issue("few writes", spec_body('kind = "sleep"\nseconds = 0.3'), ("cpu", "ideas"),
                      user="alice")
    world.sync()
    assert _writes(gh) == ["POST /issues/N/comments", "POST /issues/N/labels"]  # status comment, `queued`
    gh.label(n, "bug", actor="alice")  # a person's label, set after the bridge last read the issue
    job = world.jobs(n)[0]
    world.daemon()
    wait_for(lambda: world.store.get(job["id"])["status"] in FINAL, 20, "the job to end")
    before = len(gh.requests)
    world.sync_until(lambda: world.reported([job["id"]]), 20, "the result")
    world.sync()
    assert _writes(gh, before) == ["PATCH /issues/comments/N", "POST /issues/N/comments",
                                   "PUT /issues/N/labels"]
    assert sorted(gh.labels_on(n)) == ["bug", "cpu", "ideas", "succeeded"]
    assert gh.count("DELETE") == 0
    quiet = len(gh.requests)
    world.sync()
    assert _writes(gh, quiet) == []  # no write that changes nothing


def test_a_running_jobs_status_comment_is_edited_at_most_once_per_interval(world: World) -> None:
    """A sleep reports progress ten times; polled every 0.1 s, its status comment used to be
    edited for each step. Now: the running state waits STATUS_EDIT_SECONDS after the last edit,
    and the end goes at once."""
    gh = world.gh
    n = gh.open_issue("progress", spec_body('kind = "sleep"\nseconds = 3'), ("cpu",), user="alice")
    world.sync()
    job = world.jobs(n)[0]
    [status] = world.comments(n, render.status_marker(job["id"]))
    world.daemon()
    world.sync_until(lambda: world.reported([job["id"]]), 30, "the result")
    edits = gh.count("PATCH", rf"/issues/comments/{status['id']}$")
    # the end, and a running state only if the job outlasted an interval (a slow machine)
    took = time.time() - gh.comments[status["id"]]["created_at"]
    assert edits <= 1 + int(took // github.STATUS_EDIT_SECONDS), f"{edits} edits in {took:.1f} s"
    assert "succeeded" in world.comments(n, render.status_marker(job["id"]))[0]["body"]


def test_results_go_before_labels_and_status_edits_at_githubs_pace(world: World,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The default pace (one write a second): a job's result waits for its status comment only,
    not for every other job's labels and edits; GraphQL reads are not paced as writes."""
    monkeypatch.setenv("LAB_QUEUE_GITHUB_SECONDS_BETWEEN_WRITES", "0.25")
    gh = world.gh
    issues = [gh.open_issue(f"pace {i}", spec_body('kind = "sleep"\nseconds = 0.1'), ("cpu",), user="alice")
              for i in range(4)]
    world.sync()  # four status comments (queued) and four `queued` labels
    world.daemon()
    wait_for(lambda: all(j["status"] in FINAL for j in world.jobs()), 20, "the jobs to end")
    before = len(gh.requests)
    world.sync()
    kinds = ["label" if r.path.endswith("/labels") else "edit" if r.method == "PATCH" else "post"
             for r in gh.requests[before:] if r.method != "GET" and r.path != "/graphql"]
    assert kinds == ["post"] * 4 + ["edit"] * 4 + ["label"] * 4, kinds  # results first, labels last
    ids = [j["id"] for j in world.jobs()]
    assert world.reported(ids) and all(len(world.comments(n, "lab:result")) == 1 for n in issues)
    graphql = [r.at for r in gh.requests if r.path == "/graphql"]
    assert max(graphql) - min(graphql) < 0.5  # four reads, not four write slots


# --- wiring, labels, token --------------------------------------------------------------------


def test_daemon_polls_github_when_configured(world: World) -> None:
    gh = world.gh
    n = gh.open_issue("via the daemon", spec_body('kind = "sleep"\nseconds = 0.1'), ("cpu",), user="alice")
    discussion = gh.open_issue("a question, no lane label", "What does depth buy us?", (), user="alice")
    polling = world.daemon(with_github=True, LAB_GITHUB_POLL="1")
    # a job submitted from the command line, linked to an issue, answers there too
    cli = world.lab("submit", "sleep", "--lane", "cpu", "--set", "seconds=0.1", "--issue", str(discussion),
                    "--json")
    assert cli.returncode == 0, cli.stderr
    cli_job = json.loads(cli.stdout)["id"]

    def answered() -> bool:
        jobs = world.jobs(n)
        return bool(jobs) and len(world.comments(n, render.result_marker(jobs[0]["id"]))) == 1 \
            and len(world.comments(discussion, render.result_marker(cli_job))) == 1

    wait_for(answered, 40, "the daemon to answer both issues by itself")
    assert len(world.comments(discussion, render.status_marker(cli_job))) == 1
    stop_daemon(polling)
    log = (world.tmp / "daemon-0.log").read_text()
    assert "GitHub bridge on: lab/reasoning-lab every 1 s" in log and "bridge off" not in log
    world.outputs.append(log)
    shown = world.lab("show", str(world.jobs(n)[0]["id"]), "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["issue"] == n


def test_labels_sync_creates_and_updates_every_label(world: World) -> None:
    gh = world.gh
    gh.create_label("bug", "000000", "old words")
    first = world.lab("labels", "sync", "--json")
    assert first.returncode == 0, first.stderr
    actions = {x["label"]: x["action"] for x in json.loads(first.stdout)}
    assert actions["bug"] == "updated" and actions["gpu"] == "created" and set(actions) == set(github.LABELS)
    for name, (color, description) in github.LABELS.items():
        assert gh.labels[name]["color"] == color and gh.labels[name]["description"] == description
    second = world.lab("labels", "sync", "--json")
    assert {x["action"] for x in json.loads(second.stdout)} == {"unchanged"}


def test_lab_status_shows_the_bridge_its_pause_and_the_rows_it_gave_up_on(world: World) -> None:
    gh = world.gh
    never = world.lab("status", "--json")
    assert never.returncode == 0 and "bridge" not in json.loads(never.stdout)  # it never ran here
    n = gh.open_issue("gone", spec_body('kind = "sleep"\nseconds = 60'), ("cpu",), user="alice")
    world.sync()
    job = world.jobs(n)[0]
    [status] = world.comments(n, render.status_marker(job["id"]))
    del gh.comments[status["id"]]  # a person deleted the status comment: its edit answers 404
    world.store.cancel(job["id"], "no longer wanted")
    world.sync()
    out = world.lab("status", "--json")
    assert out.returncode == 0, out.stderr
    bridge = json.loads(out.stdout)["bridge"]
    assert bridge["repository"] == gh.repo and bridge["last_sync"] and bridge["paused_until"] is None
    assert 0 < bridge["requests_left"] <= 5000 and bridge["rate_limit"] == 5000
    [dead] = bridge["gave_up"]
    assert dead["key"] == f"status:{job['id']}" and dead["issue"] == n
    assert dead["reason"].startswith("gave up: GitHub answered 404"), dead
    text = world.lab("status")
    assert text.returncode == 0 and "gave up: GitHub answered 404" in text.stdout, text.stdout
    assert f"status:{job['id']}" in text.stdout and "last sync" in text.stdout
    # the rate limit spent: the pause and its reason are shown
    gh.rate_remaining, gh.rate_reset = 0, time.time() + 600
    gh.edit_body(n, spec_body('kind = "sleep"\nseconds = 0.1'))
    world.sync()
    bridge = json.loads(world.lab("status", "--json").stdout)["bridge"]
    assert bridge["paused_until"] and "rate limit" in bridge["paused_because"], bridge
    text = world.lab("status").stdout
    assert "paused until" in text and "rate limit" in text, text


def test_token_never_leaks_from_errors(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    gh = world.gh
    gh.open_issue("x", spec_body('kind = "sleep"'), ("cpu",), user="alice")
    gh.token = "another-token"  # GitHub now refuses ours: 401 Bad credentials
    out = world.lab("github", "sync", "--once", "--json")
    assert out.returncode == 0 and "401" in out.stdout and "paused_until" in out.stdout
    bad = world.lab("labels", "sync")
    assert bad.returncode == 1 and "401" in bad.stderr
    # an unreachable server: the error names the problem, not the token
    dead_env = {**world.env, "GITHUB_API_URL": "http://127.0.0.1:9"}
    r = lab(dead_env, "labels", "sync")
    world.outputs += [r.stdout, r.stderr]
    assert r.returncode == 1 and "no answer from GitHub" in r.stderr
    # an exception that carries the token is scrubbed on its way out
    assert TOKEN not in github.classify(RuntimeError(f"boom {TOKEN}"), TOKEN).args[0]
    settings = github.Settings.from_env()
    assert "***" in settings.scrub(f"x {TOKEN}") and TOKEN not in repr(settings)


# --- rendering ---------------------------------------------------------------------------------


def _job(**kw: Any) -> dict[str, Any]:
    base = dict(id=7, kind="train", lane="gpu", status="succeeded", created_at=1.0e9, started_at=1.0e9 + 5,
                finished_at=1.0e9 + 65, attempts=1, max_attempts=3, host="box", run_dir=None, result=None,
                error=None, exit_code=0, progress=None, held=None, after_id=None)
    return {**base, **kw}


def test_result_comment_fits_github_limit_with_curve_log_tail_and_ablation_report(tmp_path: Path) -> None:
    run = tmp_path / "7"
    run.mkdir()
    (run / "log.txt").write_text("".join(f"line {i} ``` " + "x" * 300 + "\n" for i in range(5000)))
    (run / "report.md").write_text("| arm | acc |\n|---|---|\n" + "| a | 0.5 |\n" * 20_000)
    points = [{"event": "train", "step": s, "loss": 5.0 / (s + 1)} for s in range(0, 20_000, 50)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(p) + "\n" for p in points))
    arms = [{"name": f"arm{i}", "params": 12345, "flops_per_token": 1e6, "mean": 0.5, "ci_low": 0.4,
             "ci_high": 0.6, "verdict": "better"} for i in range(3)]
    failed = _job(status="failed", run_dir=str(run), error="NaN loss at step 40", exit_code=1,
                  result={"verdict": "better", "arms": arms, "val_loss": 1.25, "steps": 1000,
                          "primary": "sparse:7-8@16",
                          "verdict_line": "better on sparse:7-8@16 (arm0 0.9 vs arm1 0.5, ...)"})
    body = render.result_comment(failed)
    assert "**Verdict: better** on primary cell `sparse:7-8@16`" in body  # the comment names the cell
    assert "verdict: better on sparse:7-8@16 (arm0 0.9 vs arm1 0.5, ...)" in body
    assert len(body) <= render.COMMENT_LIMIT
    assert body.startswith(render.result_marker(7)) and "### ❌ Job 7 failed" in body
    assert "**Verdict: better**" in body and "| arm2 |" in body and "report.md" in body
    assert "NaN loss at step 40" in body and "line 4999" in body and "line 10 " not in body
    assert "````" in body  # the log's own ``` cannot close the fence
    assert "```mermaid\nxychart-beta" in body and 'x-axis "step"' in body
    curve = body.split("```mermaid")[1].split("```")[0]
    xs = re.search(r"x-axis \"step\" \[(.*)\]", curve).group(1).split(", ")
    assert len(xs) == render.CURVE_POINTS and xs[-1] == "19950"  # plain numbers, no thousands commas
    assert len(re.search(r"line \[(.*)\]", curve).group(1).split(",")) == render.CURVE_POINTS
    assert "| val_loss | 1.25 |" in body and f"`{run}`" in body and "host `box`" in body
    huge = render.fit("y" * 100_000, where="runs/7")
    assert len(huge) <= render.COMMENT_LIMIT and huge.endswith("the full text is in runs/7.")


def test_status_comment_shows_progress_eta_and_latest_metric() -> None:
    progress = {"step": 30, "total": 120, "eta_s": 125.0, "metrics": {"loss": 2.345678}}
    job = _job(status="running", progress=progress, finished_at=None)
    body = render.status_comment(job)
    assert body.startswith(render.status_marker(7)) and "**running**" in body
    assert "30 / 120 (25 %)" in body and "2 min 5 s" in body and "loss = 2.346" in body
    assert render.status_comment(job) == body  # no clock in the body: unchanged job, no edit
    blocked = render.status_comment(_job(status="blocked", held="issue #3 has the `blocked` label",
                                         finished_at=None, attempts=0))
    assert "blocked" in blocked and "issue #3 has the `blocked` label" in blocked


def test_a_failure_says_it_is_final_and_how_to_run_it_again() -> None:
    """A failed job is not retried (only an expired lease is): its comments must not read
    "attempt 1 of 3" as if two more were coming, and they name `/rerun`."""
    approval = {"spec_hash": "0123456789abcdef", "reason": "spec", "actor": "alice"}
    failed = _job(status="failed", error="boom", exit_code=1, attempts=1, max_attempts=3)
    for body in (render.result_comment(failed, approval), render.status_comment(failed, None, approval)):
        assert "1 of 3" not in body, body
        assert "not retried" in body and "`/rerun`" in body, body
    cancelled = render.result_comment(_job(status="cancelled", error="issue #3 was closed"), approval)
    assert "not retried" in cancelled and "`/rerun`" in cancelled
    # a job from the command line has no spec on its issue to rerun: `lab retry` says how
    cli = render.result_comment(failed)
    assert "`/rerun`" not in cli and "`lab retry 7`" in cli
    # while it runs, the attempt count is true: an expired lease does requeue it
    running = render.status_comment(_job(status="running", finished_at=None, attempts=1, max_attempts=3))
    assert "1 of 3" in running
    succeeded = render.result_comment(_job(), approval)
    assert "not retried" not in succeeded


def test_disk_guard_is_said_on_the_issue_of_the_waiting_gpu_job(world: World) -> None:
    """A GPU job held back by the disk guard says why on its issue, and runs once space is back."""
    gh = world.gh
    n = gh.open_issue("gpu waits", spec_body('kind = "sleep"\nseconds = 0.1'), ("gpu",), user="alice")
    world.sync()
    job_id = world.jobs(n)[0]["id"]
    full = world.daemon(LAB_QUEUE_DISK_MIN_FREE_GB="100000")  # no disk here has 100 TB free
    world.sync_until(lambda: "disk guard" in world.comments(n, render.status_marker(job_id))[0]["body"],
                     20, "the disk guard on the issue")
    assert world.store.get(job_id)["status"] == "queued"
    stop_daemon(full)
    world.daemons.remove(full)
    world.daemon()
    world.sync_until(lambda: world.reported([job_id]), 30, "the job to run once space is back")
    status = world.comments(n, render.status_marker(job_id))
    assert len(status) == 1 and "disk guard" not in status[0]["body"]


# --- security: approval of an exact spec, one issue never stops the bridge --------------------


def _after_a_second() -> None:
    time.sleep(1.1)  # GitHub's times have one-second resolution: order two acts unambiguously


def test_an_edit_after_the_label_does_not_run_under_the_labellers_authority(world: World) -> None:
    """The TOCTOU: a maintainer labels a stranger's harmless spec; the stranger edits the body.
    Through the real daemon's poller, the edited spec never runs until a writer approves it."""
    gh = world.gh
    world.daemon(with_github=True, LAB_GITHUB_POLL="1")
    harmless = spec_body('kind = "sleep"\nseconds = 0.1')
    n = gh.open_issue("a harmless sleep", harmless, (), user="mallory")
    gh.label(n, "cpu", actor="alice")
    wait_for(lambda: len(world.jobs(n)) == 1, 30, "the labelled spec to be queued")
    first = world.jobs(n)[0]
    assert first["spec"]["seconds"] == 0.1
    wait_for(lambda: bool(world.comments(n, render.status_marker(first["id"]))), 30, "the status comment")
    hashes = re.findall(r"`([0-9a-f]{16})`", world.comments(n, render.status_marker(first["id"]))[0]["body"])
    assert hashes, "the status comment shows the spec's hash"

    # the author edits the approved issue: the new spec is held, with a note saying why
    gh.edit_body(n, spec_body('kind = "sleep"\nseconds = 3'))
    wait_for(lambda: bool(world.comments(n, "lab:key held:")), 30, "the held note")
    time.sleep(2.5)  # two more polls: still nothing queued
    assert len(world.jobs(n)) == 1
    note = world.comments(n, "lab:key held:")[0]["body"]
    new_hash = github.parse_issue_spec(gh.issues[n]["body"], ["cpu"], n).hash
    assert f"/run {new_hash}" in note and "mallory" in note and "@mallory" not in note
    # a writer's /rerun from before the edit does not cover it either; a stranger's /run is refused
    gh.comment(n, f"/run {new_hash}", user="mallory")
    wait_for(lambda: bool(world.comments(n, "lab:key unauthorised")), 30, "the refusal")
    assert len(world.jobs(n)) == 1
    # a writer approves the exact spec by its hash
    gh.comment(n, f"/run {new_hash}", user="alice")
    wait_for(lambda: len(world.jobs(n)) == 2, 30, "the approved spec to be queued")
    assert world.jobs(n)[1]["spec"]["seconds"] == 3


def test_a_spec_edited_between_label_and_poll_never_runs_and_a_relabel_approves_it(world: World) -> None:
    gh = world.gh
    n = gh.open_issue("label, then edit, before any poll", spec_body('kind = "sleep"\nseconds = 0.1'),
                      (), user="mallory")
    gh.label(n, "cpu", actor="alice")
    _after_a_second()
    gh.edit_body(n, spec_body('kind = "sleep"\nseconds = 0.2'))
    world.sync()
    world.sync()
    assert world.jobs(n) == [] and len(world.comments(n, "lab:key held:")) == 1
    _after_a_second()
    gh.unlabel(n, "cpu", actor="alice")
    gh.label(n, "cpu", actor="alice")  # re-adding the label after reading the body approves it
    world.sync()
    assert [j["spec"]["seconds"] for j in world.jobs(n)] == [0.2]
    # a writer's edit is the writer's own: it runs under the label
    _after_a_second()
    gh.edit_body(n, spec_body('kind = "sleep"\nseconds = 0.3'), editor="alice")
    world.sync()
    assert [j["spec"]["seconds"] for j in world.jobs(n)] == [0.2, 0.3]
    # /rerun by a writer after a stranger's edit: held (the body is not the one the writer saw)
    gh.comment(n, "/rerun", user="alice")
    _after_a_second()
    gh.edit_body(n, spec_body('kind = "sleep"\nseconds = 0.4'))
    world.sync()
    assert len(world.jobs(n)) == 2 and len(world.comments(n, "lab:key held:")) == 2


def test_a_writers_rerun_after_the_last_edit_runs_the_current_spec(world: World) -> None:
    gh = world.gh
    n = gh.open_issue("rerun", spec_body('kind = "sleep"\nseconds = 0.1'), (), user="mallory")
    gh.label(n, "cpu", actor="alice")
    world.sync()
    _after_a_second()
    gh.edit_body(n, spec_body('kind = "sleep"\nseconds = 0.2'))
    world.sync()
    assert len(world.jobs(n)) == 1 and world.comments(n, "lab:key held:")
    _after_a_second()
    gh.comment(n, "/rerun", user="alice")
    world.sync()
    assert [j["spec"]["seconds"] for j in world.jobs(n)] == [0.1, 0.2]


POISON = {
    "huge integer": ('kind = "sleep"\nseconds = ' + "9" * 400, "sleep.seconds"),
    "a table where a string belongs": (
        'kind = "ablation"\ntask = "khop"\nprimary = "hops3"\nsteps = 20\n'
        '[[arms]]\nname = "a"\nbaseline = true\nset = {name = "x"}\n[[arms]]\nname = "b"\n', "ablation"),
    "nested 400 deep": ('kind = "sleep"\nseconds = ' + "[" * 400 + "]" * 400, "toml"),
    "nan": ('kind = "sleep"\nseconds = nan', "sleep.seconds"),
}


def test_poison_specs_get_answers_and_the_bridge_goes_on(world: World) -> None:
    """One malformed spec used to raise out of the cycle (OverflowError, TypeError, RecursionError)
    and stop every other issue. Through the real daemon: each gets an answer naming a field, and
    the good issue opened after them is run and reported."""
    gh = world.gh
    poisoned = {name: gh.open_issue(name, spec_body(toml), ("cpu",), user="alice")
                for name, (toml, _) in POISON.items()}
    unclosed = gh.open_issue("unclosed fence at the size limit", "```toml\n" * 8000 + "x" * 1000, ("cpu",),
                             user="alice")
    good = gh.open_issue("a good one", spec_body('kind = "sleep"\nseconds = 0.1'), ("cpu",), user="alice")
    world.daemon(with_github=True, token_file=True, LAB_GITHUB_POLL="1")
    wait_for(lambda: bool(world.jobs(good)) and world.reported([world.jobs(good)[0]["id"]]), 60,
             "the good issue's result, past the poison")
    for name, (_, field) in POISON.items():
        answers = world.comments(poisoned[name], render.INVALID_MARKER)
        assert len(answers) == 1, name
        assert field in answers[0]["body"], (name, answers[0]["body"])
        assert world.jobs(poisoned[name]) == [], name
    assert "never closed" in world.comments(unclosed, render.INVALID_MARKER)[0]["body"]
    log = (world.tmp / "daemon-0.log").read_text()
    world.outputs.append(log)
    assert "cycle failed" not in log


def test_an_unexpected_error_on_one_issue_is_numbered_and_the_cycle_goes_on(world: World) -> None:
    gh = world.gh
    bad = gh.open_issue("a comment count of a strange shape", spec_body('kind = "sleep"\nseconds = 0.1'),
                        ("cpu",), user="alice")
    gh.issues[bad]["comments"] = "many"  # GitHub would never send this: it stands for any surprise
    good = gh.open_issue("fine", spec_body('kind = "sleep"\nseconds = 0.1'), ("cpu",), user="alice")
    summary = world.sync()
    assert len(world.jobs(good)) == 1
    assert any(f"issue #{bad}" in e and "error E-" in e for e in summary["errors"]), summary["errors"]


def test_a_quoted_marker_is_never_taken_for_the_status_comment(world: World) -> None:
    """An invalid `kind` that carries a status marker and a mention: after an ambiguous 502 on the
    status comment's creation, the bot must not take its own invalid-spec answer for it."""
    gh = world.gh
    n = gh.open_issue("forged marker", spec_body('kind = "<!-- lab:status 1 --> @octocat <!--"'), ("cpu",),
                      user="alice")
    world.sync()
    invalid = world.comments(n, render.INVALID_MARKER)
    assert len(invalid) == 1 and "@octocat" not in invalid[0]["body"]
    before = invalid[0]["body"]
    gh.edit_body(n, spec_body('kind = "sleep"\nseconds = 0.1'))
    gh.force_fault("POST", r"/comments$", "ambiguous_error")
    world.sync()
    world.sync()
    job = world.jobs(n)[0]
    assert job["id"] == 1
    statuses = [c for c in gh.comments_on(n) if c["body"].startswith(render.status_marker(1))]
    assert len(statuses) == 1
    assert world.comments(n, render.INVALID_MARKER)[0]["body"] == before


def test_a_strangers_reruns_get_one_refusal(world: World) -> None:
    gh = world.gh
    n = gh.open_issue("spam", spec_body('kind = "sleep"\nseconds = 0.1'), ("cpu",), user="alice")
    world.sync()
    for _ in range(5):
        gh.comment(n, "/rerun", user="mallory")
        world.sync()
    assert len(world.comments(n, "lab:key unauthorised")) == 1 and len(world.jobs(n)) == 1


def test_toml_blocks_reads_fences_as_commonmark_does() -> None:
    body = ("prose\n````markdown\n```toml\nkind = 'x'\n```\n````\n\n"
            "```toml\nkind = \"sleep\"\n```\n~~~python\n```toml\n~~~\n")
    assert github.toml_blocks(body) == ['kind = "sleep"\n']
    with pytest.raises(github.SpecProblem, match="never closed"):
        github.toml_blocks("```toml\nkind = 1\n")
    with pytest.raises(github.SpecProblem) as e:
        github.parse_issue_spec("```toml\n" * 8000, ["cpu"], 1)
    assert e.value.field == "toml"
