"""workers/: one job attempt as a real subprocess in its own process group, without a daemon.

Each test claims a job in a real SQLite queue and calls `workers.supervise.run_job`, which starts
`python -m workers.run` exactly as the daemon does."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from helpers_daemon import gpu_lock_holder, pid_alive, queue_env, set_env, wait_for

from store import Store
from workers import gpu_lock
from workers.supervise import describe_exit, run_job


@pytest.fixture
def queue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Store, dict[str, str]]:
    env = queue_env(tmp_path)
    set_env(monkeypatch, env)
    return Store(env["LAB_DB"]), env


def claim(store: Store, env: dict[str, str], lane: str = "cpu", timeout_s: float = 60, **spec: Any) -> dict:
    store.submit("sleep", lane, {"seconds": 0.2, **spec}, timeout_s=timeout_s, max_attempts=1)
    job = store.claim_next(lane, "test", "testhost", Path(env["LAB_RUNS"]), 30)
    assert job is not None
    return job


def run(store: Store, env: dict[str, str], job: dict) -> str:
    return run_job(store, job, db=env["LAB_DB"], runs=Path(env["LAB_RUNS"]), host="testhost",
                   stop_deadline=lambda: None)


def test_success_records_result_progress_and_log(queue) -> None:
    store, env = queue
    job = claim(store, env)
    assert run(store, env, job) == "succeeded"
    row = store.get(job["id"])
    assert row["status"] == "succeeded" and row["exit_code"] == 0
    assert row["result"]["slept"] == 0.2
    assert row["progress"]["step"] == row["progress"]["total"] == 10
    assert row["started_at"] is not None and row["finished_at"] >= row["started_at"]
    log = (Path(row["run_dir"]) / "log.txt").read_text()
    assert "slept 0.2 s" in log and "succeeded" in log


@pytest.mark.parametrize("spec, error, exit_code", [
    ({"fail": True}, "RuntimeError: failed on purpose after 0.2 s", 1),
    ({"exit_code": 3}, "exited with code 3", 3),
    # a signal the lab did not send is retried up to max_attempts (here 1), then failed
    ({"signal": "SIGKILL"}, "killed by signal SIGKILL; failed after 1 attempt", -9),
])
def test_failures_are_recorded_with_the_reason(queue, spec, error, exit_code) -> None:
    store, env = queue
    job = claim(store, env, **spec)
    assert run(store, env, job) == "failed"
    row = store.get(job["id"])
    assert (row["status"], row["error"], row["exit_code"]) == ("failed", error, exit_code)


def test_describe_exit() -> None:
    assert describe_exit(-15) == "killed by signal SIGTERM"
    assert describe_exit(2) == "exited with code 2"


def _pids(job: dict) -> dict[str, int]:
    path = Path(job["run_dir"]) / "pids.json"
    return json.loads(path.read_text()) if path.exists() else {}


def test_timeout_kills_the_process_group(queue) -> None:
    store, env = queue
    job = claim(store, env, timeout_s=1.0, seconds=30.0, child=True)
    assert run(store, env, job) == "failed"
    row = store.get(job["id"])
    assert row["error"] == "timed out after 1 s"
    pids = _pids(job)
    assert set(pids) == {"job", "child"}
    assert not any(pid_alive(p) for p in pids.values())


def test_cancel_kills_the_whole_process_group(queue) -> None:
    store, env = queue
    job = claim(store, env, seconds=30.0, child=True)
    outcome: list[str] = []
    t = threading.Thread(target=lambda: outcome.append(run(store, env, job)))
    t.start()
    pids = wait_for(lambda: len(_pids(job)) == 2 and _pids(job), 20, "the job and its child to start")
    assert all(pid_alive(p) for p in pids.values())
    assert store.cancel(job["id"], "changed my mind") == "running"
    t.join(20)
    assert outcome == ["cancelled"]
    row = store.get(job["id"])
    assert row["status"] == "cancelled" and row["error"] == "cancelled: changed my mind"
    assert not any(pid_alive(p) for p in pids.values()), pids


def test_cpu_job_sees_no_cuda_devices_and_no_github_token(queue, monkeypatch) -> None:
    store, env = queue
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_secret_daemon_token")  # the daemon's, for the bridge
    job = claim(store, env, seconds=3.0)
    t = threading.Thread(target=run, args=(store, env, job))
    t.start()
    pid = wait_for(lambda: _pids(job).get("job"), 20, "the job to start")
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    t.join(20)
    assert b"CUDA_VISIBLE_DEVICES=" in environ
    assert not any(v.startswith(b"GITHUB_TOKEN=") for v in environ), "a job must never see the token"


def test_gpu_job_waits_for_the_lock_held_by_another_process(queue, tmp_path) -> None:
    """The holder stands for an orphaned job still on the card, or a job of another daemon with
    its own LAB_RUNS: the lock is the card's (LAB_GPU_LOCK_DIR), not the runs directory's."""
    store, env = queue
    elsewhere = {**env, "LAB_RUNS": str(tmp_path / "other-daemon-runs")}
    with gpu_lock_holder(elsewhere) as holder:
        job = claim(store, env, lane="gpu", seconds=0.1)
        t = threading.Thread(target=run, args=(store, env, job))
        t.start()
        waiting = wait_for(lambda: [e for e in store.events(job["id"]) if e["kind"] == "waiting"], 20,
                           "the job to report that it waits for the GPU lock")
        assert waiting[0]["message"] == f"pid {holder} holds the GPU lock"
        assert store.get(job["id"])["started_at"] is None
        assert gpu_lock.is_held()
    t.join(20)
    row = store.get(job["id"])
    assert row["status"] == "succeeded"
    assert f"pid {holder}" in (Path(row["run_dir"]) / "log.txt").read_text()
    assert not gpu_lock.is_held()  # released when the job process exited
    assert not (Path(env["LAB_RUNS"]) / "gpu.lock").exists()  # the old per-runs-directory lock is gone


def test_stale_attempt_does_not_run(queue) -> None:
    store, env = queue
    job = claim(store, env)
    store.finish(job["id"], 1, "cancelled", error="cancelled before it ran")
    assert run(store, env, job) == "cancelled"
    assert not (Path(job["run_dir"]) / "times.json").exists()
