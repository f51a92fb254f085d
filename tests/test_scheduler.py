"""The daemon as a real process on a real SQLite queue: lanes, kill -9, two daemons, SIGTERM,
dependencies, priorities, the lease sweep and the disk guard.

Jobs are `sleep` jobs that write their own wall-clock start and end (times.json), so overlap is
measured by the jobs themselves, not by the bookkeeping under test."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers_daemon import (
    assert_no_overlap,
    fresh_postgres,
    job_times,
    lab,
    pid_alive,
    queue_env,
    redis_broker,
    start_daemon,
    stop_daemon,
    wait_for,
    wait_jobs,
)

from daemon import service
from store import Store

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["sqlite", "postgres+redis"])
def env(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A private queue: SQLite + SqliteHuey (the embedded default), or a fresh Postgres database
    with RedisHuey (several hosts on one queue)."""
    with contextlib.ExitStack() as stack:
        e = queue_env(tmp_path)
        if request.param == "postgres+redis":
            e.update(LAB_DB=stack.enter_context(fresh_postgres()), LAB_BROKER=redis_broker())
        for k, v in e.items():
            if k.startswith("LAB_"):
                monkeypatch.setenv(k, v)
        yield e
        if request.param == "postgres+redis":
            Store(e["LAB_DB"]).dispose()


@pytest.fixture
def daemons():
    procs = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def sleep_job(lane: str, seconds: float, **kw) -> int:
    extra = kw.pop("spec", {})
    return service.submit("sleep", {"seconds": seconds, **extra}, lane=lane, **kw)["id"]


def test_gpu_jobs_never_overlap_while_cpu_jobs_do(env, daemons) -> None:
    store = Store(env["LAB_DB"])
    gpu = [sleep_job("gpu", 0.6) for _ in range(3)]
    cpu = [sleep_job("cpu", 2.0) for _ in range(2)]
    daemons.append(start_daemon(env, "--cpu-workers", "2"))
    rows = wait_jobs(store, gpu + cpu, 60)
    assert [r["status"] for r in rows] == ["succeeded"] * 5
    assert_no_overlap([job_times(r) for r in rows[:3]])
    (s1, e1), (s2, e2) = (job_times(r) for r in rows[3:])
    assert max(s1, s2) < min(e1, e2), "the two CPU jobs should have run at the same time"
    maps = Path(f"/proc/{daemons[0].pid}/maps").read_text()
    assert "libtorch" not in maps and "libcuda" not in maps, "the daemon process must not load torch"
    assert stop_daemon(daemons[0]) < 30


def test_kill_9_mid_job_then_restart(env, daemons) -> None:
    store = Store(env["LAB_DB"])
    ids = [sleep_job("gpu", 1.5) for _ in range(3)]
    first = start_daemon(env)
    daemons.append(first)
    wait_for(lambda: store.get(ids[0])["started_at"], 30, "the first GPU job to start")
    first.send_signal(signal.SIGKILL)
    first.wait()
    # The orphaned job process goes on and holds the GPU lock; the new daemon must wait for it.
    daemons.append(start_daemon(env))
    rows = wait_jobs(store, ids, 60)
    assert [r["status"] for r in rows] == ["succeeded"] * 3
    assert rows[0]["attempts"] == 1, "the orphan should have finished its own attempt"
    assert_no_overlap([job_times(r) for r in rows])
    assert stop_daemon(daemons[1]) < 30


def test_two_daemons_on_one_queue_never_double_run(env, daemons) -> None:
    store = Store(env["LAB_DB"])
    gpu = [sleep_job("gpu", 0.3) for _ in range(5)]
    cpu = [sleep_job("cpu", 0.5) for _ in range(5)]
    daemons += [start_daemon(env, "--cpu-workers", "2"), start_daemon(env, "--cpu-workers", "2")]
    rows = wait_jobs(store, gpu + cpu, 90)
    assert all(r["status"] == "succeeded" and r["attempts"] == 1 for r in rows)
    for r in rows:
        started = [e for e in store.events(r["id"]) if e["kind"] == "started"]
        assert len(started) == 1, f"job {r['id']} started {len(started)} times"
    assert_no_overlap([job_times(r) for r in rows[:5]])
    owners = {r["lease_owner"] for r in rows}
    assert len(owners) == 2, "both daemons should have taken work"
    for d in daemons:
        assert stop_daemon(d) < 30


def test_sigterm_lets_a_short_job_finish_and_requeues_a_long_one(env, daemons) -> None:
    store = Store(env["LAB_DB"])
    short = sleep_job("cpu", 1.0)
    long = sleep_job("gpu", 60.0, spec={"child": True})
    d = start_daemon(env)
    daemons.append(d)
    wait_for(lambda: store.get(short)["started_at"] and store.get(long)["started_at"], 30, "both to start")
    took = stop_daemon(d)
    assert took < 30
    assert store.get(short)["status"] == "succeeded"
    job = store.get(long)
    assert job["status"] == "queued" and job["attempts"] == 0  # a shutdown does not count
    assert any(e["kind"] == "requeued" for e in store.events(long))
    pids = json.loads((Path(job["run_dir"]) / "pids.json").read_text())
    assert not any(pid_alive(p) for p in pids.values()), "the requeued job's process group must be gone"
    assert not any(d["stopped_at"] is None for d in store.daemons())


def test_after_and_priority(env, daemons) -> None:
    store = Store(env["LAB_DB"])
    first = sleep_job("gpu", 0.2)
    doomed = sleep_job("gpu", 0.2, spec={"fail": True})
    low = sleep_job("gpu", 0.2, priority=0)
    high = sleep_job("gpu", 0.2, priority=9)
    mid = sleep_job("gpu", 0.2, priority=5)
    waits = sleep_job("cpu", 0.1, after=first)
    orphan = sleep_job("cpu", 0.1, after=doomed)
    assert store.get(waits)["status"] == "blocked"
    daemons.append(start_daemon(env))
    rows = {r["id"]: r for r in wait_jobs(store, [first, doomed, low, high, mid, waits, orphan], 60)}
    assert rows[waits]["status"] == "succeeded" and rows[waits]["started_at"] > rows[first]["finished_at"]
    assert rows[orphan]["status"] == "cancelled"
    assert f"dependency job {doomed} failed" in rows[orphan]["error"]
    started = sorted((rows[i]["started_at"], i) for i in (low, high, mid))
    assert [i for _, i in started] == [high, mid, low]
    stop_daemon(daemons[0])


def test_expired_lease_of_a_dead_owner_is_swept_and_rerun(env, daemons) -> None:
    store = Store(env["LAB_DB"])
    job_id = sleep_job("cpu", 0.1)
    ghost = store.claim_next("cpu", "ghost:1:dead", "elsewhere", Path(env["LAB_RUNS"]), 0.5)
    assert ghost["id"] == job_id
    daemons.append(start_daemon(env))
    row = wait_jobs(store, [job_id], 30)[0]
    assert row["status"] == "succeeded" and row["attempts"] == 2
    assert any("expired" in e["message"] for e in store.events(job_id))
    stop_daemon(daemons[0])


def test_disk_guard_holds_both_lanes_and_status_says_why(env, daemons, tmp_path) -> None:
    e = dict(env, LAB_QUEUE_DISK_MIN_FREE_GB="99999")
    store = Store(env["LAB_DB"])
    gpu = sleep_job("gpu", 0.1)
    cpu = sleep_job("cpu", 0.1)
    daemons.append(start_daemon(e))
    wait_for(lambda: any(d["paused"] for d in store.daemons(alive_within=5)), 30, "the daemon to pause")
    time.sleep(1.0)
    assert store.get(gpu)["status"] == "queued"
    assert store.get(cpu)["status"] == "queued", "a full disk holds the CPU lane too"
    out = lab(e, "status", "--json")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["daemon"]["alive"]
    assert "disk guard" in status["lanes"]["gpu"]["paused"]
    assert status["disk"]["ok"] is False
    stop_daemon(daemons[0])


def test_after_a_commit_jobs_run_the_new_code(tmp_path: Path, daemons) -> None:
    """Standbys import the code before their job comes; after a `git commit` a job must still run
    the code of the commit it records. A private copy of the checkout with a git repository of
    its own (a test never commits to the real one) runs the daemon; between two jobs its
    workers/run.py changes and is committed: the second job prints the new line, names the new
    commit, and no job process says the old one."""
    root = Path(__file__).resolve().parent.parent
    copy = tmp_path / "checkout"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "queue.db*", "__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info"))

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=copy, check=True, capture_output=True, text=True)
        return done.stdout.strip()

    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "empty")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    first = git("rev-parse", "HEAD")
    env = queue_env(tmp_path, LAB_QUEUE_STANDBY_GPU="1")
    store = Store(env["LAB_DB"])
    with open(tmp_path / "daemon.log", "ab") as log:
        daemons.append(subprocess.Popen([sys.executable, "-m", "cli", "daemon", "--lanes", "gpu"], cwd=copy,
                                        env=env, stdout=log, stderr=subprocess.STDOUT))
    one = store.submit("sleep", "gpu", {"seconds": 0.1}, timeout_s=60, max_attempts=1)
    wait_jobs(store, [one], 60)
    assert f"code of commit {first}" in (Path(store.get(one)["run_dir"]) / "log.txt").read_text()
    time.sleep(0.5)  # the used standby's replacement is up, with the first commit's code
    run_py = copy / "workers" / "run.py"
    run_py.write_text(run_py.read_text().replace('_say(f"lab: job {job_id} succeeded")',
                                                 '_say(f"lab: job {job_id} succeeded (new code)")'))
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-am", "two")
    second = git("rev-parse", "HEAD")
    two = store.submit("sleep", "gpu", {"seconds": 0.1}, timeout_s=60, max_attempts=1)
    rows = wait_jobs(store, [two], 60)
    assert rows[0]["status"] == "succeeded"
    text = (Path(rows[0]["run_dir"]) / "log.txt").read_text()
    assert f"lab: job {two} succeeded (new code)" in text
    # A standby started at the new commit (the heartbeat retired the old one), or the old one
    # re-executed itself: either way the code and the commit named are the second's.
    assert (f"code of commit {second} (loaded before the job came)" in text
            or f"HEAD is now {second[:12]}; restarting as a fresh process" in text), text
    assert f"code of commit {first}" not in text


@pytest.mark.parametrize("env", ["sqlite"], indirect=True)
def test_the_next_gpu_job_starts_while_the_last_one_finishes_off_the_card(env, daemons) -> None:
    """A smoke gives the card back after its final eval: the next GPU job is claimed and started
    then, before the first has drawn curves.png and recorded its result; yet never before the
    first gave the card (and its GPU lock) back. A claim about scheduling, run on SQLite; the SQL
    it rests on (claim_next's `released`) is tested on each backend in tests/test_store.py."""
    store = Store(env["LAB_DB"])
    ids = [service.submit("smoke", {"steps": 40}, lane="gpu")["id"] for _ in range(2)]
    daemons.append(start_daemon(env, "--lanes", "gpu"))
    first, second = wait_jobs(store, ids, 90)
    assert [first["status"], second["status"]] == ["succeeded", "succeeded"]
    released = first["progress"]["card_released_at"]
    assert first["progress"]["step_at"] <= released <= second["started_at"] < first["finished_at"]
    for row in (first, second):
        assert (Path(row["run_dir"]) / "curves.png").exists()
    assert stop_daemon(daemons[0]) < 30
