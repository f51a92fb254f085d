"""workers/: one job attempt as a real subprocess in its own process group, without a daemon.

Each test claims a job in a real SQLite queue and calls `workers.supervise.run_job`, which starts
`python -m workers.run` exactly as the daemon does."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers_daemon import gpu_lock_holder, pid_alive, queue_env, set_env, wait_for

from common import git_commit
from store import Store
from workers import gpu_lock
from workers.run import WorkerContext
from workers.supervise import ProcessPool, describe_exit, run_job


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


# --- standbys: what they load, and from which commit ------------------------------------------


def _pool(env: dict[str, str], head: Any = git_commit) -> ProcessPool:
    runs = Path(env["LAB_RUNS"])
    runs.mkdir(parents=True, exist_ok=True)
    return ProcessPool(env["LAB_DB"], runs, "testhost", head=head)


def _standbys(pool: ProcessPool, lane: str, n: int = 1) -> list[Any]:
    """The lane's `n` standbys once there are that many: a light lane's come from its fork server,
    which is ready a python's start-up after the first `warm`."""
    wait_for(lambda: len(pool._ready.get(lane, [])) >= n, 30, f"{n} standbys on lane {lane}")
    return list(pool._ready[lane])


def test_progress_records_when_the_first_step_ended(queue) -> None:
    """bench/card_idle.py reads the card's idle time from these, not from logs."""
    store, env = queue
    job = claim(store, env, lane="gpu")
    ctx = WorkerContext(store, job["id"], job["attempts"], Path(job["run_dir"]), "gpu")
    ctx.progress(0, 4)
    assert store.get(job["id"])["progress"]["first_step_at"] is None  # step 0: nothing trained yet
    before = time.time()
    ctx.progress(1, 4)
    ctx.progress(4, 4)  # the last step is always written (the rate limit spares it)
    progress = store.get(job["id"])["progress"]
    assert before <= progress["first_step_at"] <= progress["step_at"] <= time.time()


@pytest.mark.parametrize("fork", [True, False], ids=["forked", "python"])
def test_the_pool_retires_standbys_of_an_older_commit(queue, monkeypatch, fork) -> None:
    """After a `git commit` the daemon's next `warm` (every heartbeat) replaces the standbys that
    imported the old code: forked by the lane's light fork server (the default; the server of the
    old commit is retired with them) or started with python. HEAD is a parameter here: a test
    must not commit to the checkout."""
    store, env = queue
    monkeypatch.setenv("LAB_QUEUE_STANDBY_GPU", "1")
    monkeypatch.setenv("LAB_QUEUE_STANDBY_FORK", str(fork).lower())
    head = ["a" * 40]
    pool = _pool(env, head=lambda: head[0])
    try:
        pool.warm("gpu")
        (old,) = _standbys(pool, "gpu")
        assert old.forked == fork and not old.heavy
        server = pool._servers.get("gpu")
        assert (server is not None and not server.heavy) == fork
        pool.warm("gpu")
        assert pool._ready["gpu"] == [old]  # HEAD unchanged: kept
        head[0] = "b" * 40
        pool.warm("gpu")
        (new,) = _standbys(pool, "gpu")
        assert new.commit == "b" * 40 and new.proc.pid != old.proc.pid and new.forked == fork
        assert old.proc.wait(20) == 0  # told it is not needed (stdin closed): it left by itself
        if fork:
            assert pool._servers["gpu"] is not server and pool._servers["gpu"].commit == "b" * 40
            assert server.proc.wait(20) == 0  # retired, it left once its child had
    finally:
        pool.close()


def test_after_a_training_jobs_hand_over_its_lane_starts_no_standby_for_a_while(queue, monkeypatch) -> None:
    """A training job's start (data, model, baseline eval) has the cores to itself for
    QUEUE.handover_train_seconds: the heartbeat's `warm` in that window starts no standby, the
    hand-over's own refill then tops the lane up (a light job's window is handover_seconds)."""
    store, env = queue
    monkeypatch.setenv("LAB_QUEUE_STANDBY_GPU", "1")
    monkeypatch.setenv("LAB_QUEUE_HANDOVER_TRAIN_SECONDS", "1.5")
    pool = _pool(env)
    try:
        t0 = time.monotonic()
        pool.refill("gpu", training=True)  # as run_job does once it has handed a smoke over
        pool.warm("gpu")  # the heartbeat's, inside the window
        assert pool._ready.get("gpu", []) == []
        wait_for(lambda: len(pool._ready.get("gpu", [])) == 1, 20, "the refill after the window")
        assert time.monotonic() - t0 >= 1.5
    finally:
        pool.close()


def test_light_jobs_faster_than_the_quiet_time_do_not_use_the_lane_up(queue, monkeypatch) -> None:
    """Within a light job's quiet time (QUEUE.handover_seconds) the lane starts no standby while
    one is left; once a hand-over takes the last one it starts one at once, not after the window:
    trivial jobs handed over faster than the window each found the lane empty and waited for a
    start of their own (bench/queue_overhead.py: gaps of 0.06-0.1 s every few jobs)."""
    store, env = queue
    monkeypatch.setenv("LAB_QUEUE_STANDBY_GPU", "2")
    monkeypatch.setenv("LAB_QUEUE_HANDOVER_SECONDS", "10")
    pool = _pool(env)
    procs = []
    try:
        pool.warm("gpu")
        _standbys(pool, "gpu", 2)
        for expect_left in (1, 0):  # as run_job hands a sleep over: take, then refill
            # The lane claims one job at a time: the one before must have ended (0.1 s, well
            # inside the 10 s window) before the next is claimed.
            assert all(proc.wait(20) == 0 for proc in procs)
            job = claim(store, env, lane="gpu", seconds=0.1)
            procs.append(pool.take(job, Path(job["run_dir"]) / "log.txt"))
            pool.refill("gpu")
            assert len(pool._ready["gpu"]) == expect_left
        t0 = time.monotonic()
        (new,) = _standbys(pool, "gpu")
        assert time.monotonic() - t0 < 5 and new.forked  # not the window's 10 s
        time.sleep(0.5)
        assert len(pool._ready["gpu"]) == 1  # one, not the lane's size, inside the window
    finally:
        pool.close()
    for proc in procs:
        assert proc.wait(20) == 0


def test_a_stale_standby_runs_its_job_as_a_fresh_process(queue, monkeypatch) -> None:
    """A standby started before a commit and handed a job after it (before the pool's next warm)
    re-executes itself: same pid, which the supervisor watches on, and the new code runs."""
    store, env = queue
    monkeypatch.setenv("LAB_QUEUE_STANDBY_GPU", "1")
    pool = _pool(env, head=lambda: "0" * 40)  # what the daemon saw as HEAD when it started it
    try:
        pool.warm("gpu")
        (standby,) = _standbys(pool, "gpu")
        job = claim(store, env, lane="gpu", seconds=0.1)
        outcome = run_job(store, job, db=env["LAB_DB"], runs=Path(env["LAB_RUNS"]), host="testhost",
                          stop_deadline=lambda: None, pool=pool)
    finally:
        pool.close()
    row = store.get(job["id"])
    assert outcome == "succeeded" and row["pid"] == standby.proc.pid
    log = (Path(row["run_dir"]) / "log.txt").read_text()
    assert f"loaded commit {'0' * 12}, HEAD is now {git_commit()[:12]}; restarting as a fresh process" in log
    assert "(loaded before the job came)" not in log  # the fresh process is not a standby


def test_a_current_standby_records_its_commit(queue, monkeypatch) -> None:
    store, env = queue
    monkeypatch.setenv("LAB_QUEUE_STANDBY_GPU", "1")
    pool = _pool(env)
    try:
        pool.warm("gpu")
        (standby,) = _standbys(pool, "gpu")
        # Forked from the lane's light server: the queue's code, not torch (~0.5 GB, seconds)
        assert "libtorch" not in Path(f"/proc/{standby.proc.pid}/maps").read_text()
        job = claim(store, env, lane="gpu", seconds=0.1)
        assert run_job(store, job, db=env["LAB_DB"], runs=Path(env["LAB_RUNS"]), host="testhost",
                       stop_deadline=lambda: None, pool=pool) == "succeeded"
    finally:
        pool.close()
    assert store.get(job["id"])["pid"] == standby.proc.pid and standby.forked
    log = (Path(job["run_dir"]) / "log.txt").read_text()
    assert f"code of commit {git_commit()} (loaded before the job came)" in log
    assert "restarting" not in log


def test_a_training_lane_standby_preloads_torch_and_runs_a_smoke(queue, monkeypatch) -> None:
    """A lane that trains gets standbys with torch, the models and the sample data loaded; the
    smoke handed to one trains, and its first step is in the store."""
    store, env = queue
    monkeypatch.setenv("LAB_QUEUE_STANDBY_GPU", "1")
    monkeypatch.setenv("LAB_QUEUE_STANDBY_PRELOAD", "true")  # the suite's daemons run without it
    monkeypatch.setenv("LAB_QUEUE_STANDBY_FORK", "false")  # each standby preloads for itself
    pool = _pool(env)
    try:
        pool.expect("gpu", "smoke")
        pool.warm("gpu")
        (standby,) = pool._ready["gpu"]
        assert standby.heavy
        workers_log = Path(env["LAB_RUNS"]) / "workers.log"
        wait_for(lambda: workers_log.exists() and "preloaded torch in" in workers_log.read_text(), 120,
                 "the standby to preload torch")
        store.submit("smoke", "gpu", {"preset": "tiny", "steps": 4}, timeout_s=300, max_attempts=1)
        job = store.claim_next("gpu", "test", "testhost", Path(env["LAB_RUNS"]), 30)
        assert run_job(store, job, db=env["LAB_DB"], runs=Path(env["LAB_RUNS"]), host="testhost",
                       stop_deadline=lambda: None, pool=pool) == "succeeded"
    finally:
        pool.close()
    row = store.get(job["id"])
    assert row["pid"] == standby.proc.pid
    assert row["started_at"] < row["progress"]["first_step_at"] <= row["progress"]["step_at"]


# --- the card given back before the job's CPU-only tail ---------------------------------------


def claim_smoke(store: Store, env: dict[str, str], **spec: Any) -> dict:
    store.submit("smoke", "gpu", {"steps": 40, **spec}, timeout_s=120, max_attempts=1)
    job = store.claim_next("gpu", "test", "testhost", Path(env["LAB_RUNS"]), 60)
    assert job is not None
    return job


def test_a_gpu_job_gives_the_card_back_before_its_tail_and_succeeds_after_it(queue) -> None:
    """The smoke's last step and final eval are card work; curves.png and the result are not: the
    supervisor hears "released" while the job still runs, the GPU lock free, the plot not yet
    drawn; the record becomes succeeded only after the tail, with curves.png there."""
    store, env = queue
    job = claim_smoke(store, env)
    run_dir = Path(job["run_dir"])
    seen: list[tuple[str, bool, bool]] = []

    def released() -> None:
        seen.append((store.get(job["id"])["status"], gpu_lock.is_held(), (run_dir / "curves.png").exists()))
    outcome = run_job(store, job, db=env["LAB_DB"], runs=Path(env["LAB_RUNS"]), host="testhost",
                      stop_deadline=lambda: None, on_card_released=released)
    assert outcome == "succeeded", store.get(job["id"])["error"]
    assert seen == [("running", False, False)]
    row = store.get(job["id"])
    assert row["progress"]["step_at"] <= row["progress"]["card_released_at"] <= row["finished_at"]
    assert (run_dir / "curves.png").exists() and row["result"]["ok"]
    assert "card released" in (run_dir / "log.txt").read_text()


def test_a_tail_that_fails_after_the_card_is_given_back_fails_the_job(queue) -> None:
    """At lr 0 the loss cannot fall: the smoke's verdict, reached after the release, fails it as
    before; nothing is recorded as succeeded."""
    store, env = queue
    job = claim_smoke(store, env, steps=8, set={"lr": 0.0, "min_lr": 0.0})
    seen: list[str] = []
    outcome = run_job(store, job, db=env["LAB_DB"], runs=Path(env["LAB_RUNS"]), host="testhost",
                      stop_deadline=lambda: None,
                      on_card_released=lambda: seen.append(store.get(job["id"])["status"]))
    row = store.get(job["id"])
    assert outcome == "failed" and seen == ["running"]
    assert row["status"] == "failed" and "the loss did not fall" in row["error"]
    assert (Path(job["run_dir"]) / "curves.png").exists()


def test_a_cpu_job_has_no_card_to_give_back(queue) -> None:
    store, env = queue
    job = claim(store, env, lane="cpu")
    seen: list[int] = []
    outcome = run_job(store, job, db=env["LAB_DB"], runs=Path(env["LAB_RUNS"]), host="testhost",
                      stop_deadline=lambda: None, on_card_released=lambda: seen.append(1))
    assert outcome == "succeeded" and seen == []
    assert "card_released_at" not in store.get(job["id"])["progress"]
