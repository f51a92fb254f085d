"""Faults a chaos run found, each with real processes and signals on a real SQLite queue: a job
frozen (SIGSTOP) past its lease, a job killed by a signal while its daemon lives, a job that stops
itself because the database is out of reach, a full disk (the guard on both lanes; a log that
cannot be written), and the ETA of early progress.

The retry policy under test (README "Reliability"): a death by a signal the lab did not send, or a
job that stopped itself, is requeued with attempts + 1 up to max_attempts, then failed, as the
lease sweep does when nobody watched; a nonzero exit of the job's own fails at once; a timeout or
a cancel is final."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers_daemon import (
    lab,
    pid_alive,
    queue_env,
    set_env,
    start_daemon,
    stop_daemon,
    wait_for,
    wait_jobs,
)

from daemon import service
from store import Store
from workers.run import WorkerContext
from workers.supervise import run_job

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    e = queue_env(tmp_path)  # lease 3 s, heartbeat 0.2 s
    set_env(monkeypatch, e)
    return e


@pytest.fixture
def daemons() -> Iterator[list[subprocess.Popen]]:
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def submit(store: Store, seconds: float, max_attempts: int = 3, **spec: Any) -> int:
    return store.submit("sleep", "cpu", {"seconds": seconds, **spec}, timeout_s=60,
                        max_attempts=max_attempts)


def started_pid(store: Store, job_id: int, attempt: int = 1) -> int:
    def pid() -> int | None:
        row = store.get(job_id)
        ok = row["status"] == "running" and row["attempts"] == attempt and row["started_at"]
        return row["pid"] if ok else None
    return wait_for(pid, 30, f"job {job_id} attempt {attempt} to start")


def messages(store: Store, job_id: int) -> list[str]:
    return [e["message"] for e in store.events(job_id)]


def log_text(row: dict[str, Any]) -> str:
    return (Path(row["run_dir"]) / "log.txt").read_text()


# --- 10: a frozen job ------------------------------------------------------------------------


def test_a_frozen_job_goes_on_when_the_daemon_kept_its_lease(env, daemons) -> None:
    """SIGSTOP past the lease: the daemon renews the lease all along, so after SIGCONT the job's
    watchdog finds the lease kept in the store and the job finishes its own attempt."""
    store = Store(env["LAB_DB"])
    job_id = submit(store, 4.0)
    daemons.append(start_daemon(env))
    pid = started_pid(store, job_id)
    lease = float(env["LAB_QUEUE_LEASE_SECONDS"])
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(1.7 * lease)  # past the lease and far past the job's own fence (3/4 of it)
        row = store.get(job_id)
        assert row["status"] == "running" and row["lease_expires_at"] > time.time(), \
            "the daemon should have kept the lease of the frozen job"
    finally:
        os.kill(pid, signal.SIGCONT)
    row = wait_jobs(store, [job_id], 30)[0]
    assert (row["status"], row["attempts"]) == ("succeeded", 1), row["error"]
    assert "stopping" not in log_text(row)
    assert stop_daemon(daemons[0]) < 30


def test_a_frozen_orphan_whose_lease_was_lost_stops_itself_and_says_why(env, daemons) -> None:
    """Its daemon killed, the job frozen past its lease: another daemon sweeps and reruns it.
    After SIGCONT the old attempt finds the lease gone, stops at once, and an event says so."""
    store = Store(env["LAB_DB"])
    job_id = submit(store, 6.0)
    first = start_daemon(env)
    daemons.append(first)
    pid = started_pid(store, job_id)
    first.kill()
    first.wait()
    os.kill(pid, signal.SIGSTOP)
    try:
        daemons.append(start_daemon(env))
        started_pid(store, job_id, attempt=2)
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: not pid_alive(pid), 10, "the old attempt to stop itself")
    row = wait_jobs(store, [job_id], 30)[0]
    assert (row["status"], row["attempts"]) == ("succeeded", 2)
    said = [m for m in messages(store, job_id) if m.startswith("attempt 1 stopped itself")]
    assert said and "no longer" in said[0], messages(store, job_id)
    assert stop_daemon(daemons[1]) < 30


def test_a_job_that_stops_itself_records_why_and_is_requeued(env) -> None:
    """The database out of the job's reach (another connection holds SQLite's write lock, so no
    lease renewal gets through): past 3/4 of the lease the job stops itself so that it cannot run
    twice, the supervisor records the job's own reason, and the job is requeued."""
    store = Store(env["LAB_DB"])
    job_id = submit(store, 30.0)
    job = store.claim_next("cpu", "test", "testhost", Path(env["LAB_RUNS"]), 30)
    outcome: list[str] = []
    t = threading.Thread(target=lambda: outcome.append(run_job(
        store, job, db=env["LAB_DB"], runs=Path(env["LAB_RUNS"]), host="testhost",
        stop_deadline=lambda: None)))
    t.start()
    pid = started_pid(store, job_id)
    lock = sqlite3.connect(env["LAB_DB"], isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")
        wait_for(lambda: not pid_alive(pid), 20, "the job to stop itself")
    finally:
        lock.rollback()
        lock.close()
    t.join(30)
    assert outcome == ["requeued"]
    row = store.get(job_id)
    assert row["status"] == "queued" and row["attempts"] == 1
    assert row["error"].startswith("stopped itself: no lease renewal for "), row["error"]
    assert row["error"].endswith("; requeued (attempt 2 of 3)")
    assert row["error"] in messages(store, job_id)


# --- 11: one retry policy --------------------------------------------------------------------


def test_a_job_killed_by_a_signal_is_retried_while_the_daemon_lives(env, daemons) -> None:
    """An OOM kill, say: SIGKILL of the job process, not from the lab. The same death with the
    daemon down is requeued by the lease sweep; with the daemon alive it is requeued too."""
    store = Store(env["LAB_DB"])
    job_id = submit(store, 3.0)
    daemons.append(start_daemon(env))
    os.kill(started_pid(store, job_id), signal.SIGKILL)
    row = wait_jobs(store, [job_id], 30)[0]
    assert (row["status"], row["attempts"]) == ("succeeded", 2), row["error"]
    assert "killed by signal SIGKILL; requeued (attempt 2 of 3)" in messages(store, job_id)
    out = lab(env, "show", str(job_id))
    assert out.returncode == 0, out.stderr
    assert "killed by signal SIGKILL; requeued (attempt 2 of 3)" in out.stdout
    assert stop_daemon(daemons[0]) < 30


def test_signal_deaths_retry_up_to_max_attempts_and_own_exit_codes_fail_at_once(env) -> None:
    store = Store(env["LAB_DB"])
    runs = Path(env["LAB_RUNS"])

    def attempt() -> str:
        job = store.claim_next("cpu", "test", "testhost", runs, 30)
        assert job is not None
        return run_job(store, job, db=env["LAB_DB"], runs=runs, host="testhost", stop_deadline=lambda: None)

    killed = submit(store, 0.1, max_attempts=2, signal="SIGKILL")  # dies by a signal each time
    assert [attempt(), attempt()] == ["requeued", "failed"]
    row = store.get(killed)
    assert (row["attempts"], row["exit_code"]) == (2, -9)
    assert row["error"] == "killed by signal SIGKILL; failed after 2 attempts"
    assert messages(store, killed)[-1] == row["error"]

    exits = submit(store, 0.1, max_attempts=3, exit_code=3)  # the job's own exit: not retried
    assert attempt() == "failed"
    row = store.get(exits)
    assert (row["attempts"], row["error"]) == (1, "exited with code 3")


# --- 12: a full disk -------------------------------------------------------------------------


def test_disk_guard_holds_both_lanes_and_says_why(env, daemons) -> None:
    e = dict(env, LAB_QUEUE_DISK_MIN_FREE_GB="99999")
    store = Store(env["LAB_DB"])
    gpu = service.submit("sleep", {"seconds": 0.1}, lane="gpu")["id"]
    cpu = service.submit("sleep", {"seconds": 0.1}, lane="cpu")["id"]
    daemons.append(start_daemon(e))
    wait_for(lambda: any(d["paused"] for d in store.daemons(alive_within=5)), 30, "the daemon to pause")
    time.sleep(1.0)
    assert [(store.get(i)["status"], store.get(i)["attempts"]) for i in (gpu, cpu)] == [("queued", 0)] * 2
    out = lab(e, "status", "--json")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert "no new job starts on the GPU or the CPU lane" in status["daemons"][0]["paused"]
    assert "disk guard" in status["lanes"]["gpu"]["paused"]
    assert status["disk"]["ok"] is False
    stop_daemon(daemons[0])


def test_status_shows_the_disk_guard_on_the_cpu_lane_too(env, monkeypatch) -> None:
    monkeypatch.setenv("LAB_QUEUE_DISK_MIN_FREE_GB", "99999")
    assert "disk guard" in (service.status()["lanes"]["cpu"]["paused"] or "")


def test_a_log_that_cannot_be_written_is_recorded_as_the_reason(env, tmp_path) -> None:
    """A run dir whose parent is a file (ENOTDIR): the supervisor says so in the store instead
    of failing without a word."""
    store = Store(env["LAB_DB"])
    not_a_dir = tmp_path / "runs-is-a-file"
    not_a_dir.write_text("")
    job_id = submit(store, 0.1, max_attempts=1)
    job = store.claim_next("cpu", "test", "testhost", not_a_dir, 30)
    outcome = run_job(store, job, db=env["LAB_DB"], runs=Path(env["LAB_RUNS"]), host="testhost",
                      stop_deadline=lambda: None)
    assert outcome == "failed"
    row = store.get(job_id)
    log = not_a_dir / str(job_id) / "log.txt"
    assert row["error"] == f"cannot write {log}: Not a directory; failed after 1 attempt"


def test_a_standby_that_cannot_open_its_log_records_why(env, tmp_path, monkeypatch) -> None:
    """The daemon's ready-made job process (`workers.run --standby`) gets the log path on stdin;
    when it cannot open it, the store says why (here the run dir's parent is a file)."""
    import io

    from workers import run as worker

    store = Store(env["LAB_DB"])
    job_id = submit(store, 0.1, max_attempts=2)
    job = store.claim_next("cpu", "test", "testhost", Path(env["LAB_RUNS"]), 30)
    log = tmp_path / "a-file" / "log.txt"
    (tmp_path / "a-file").write_text("")
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{job_id} {job['attempts']} {log}\n"))
    assert worker.standby(store) is None
    row = store.get(job_id)
    assert (row["status"], row["error"]) == (
        "queued", f"cannot write {log}: Not a directory; requeued (attempt 2 of 2)")


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB tmpfs, filled up (needs mount privileges: root in the sandbox and CI container)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {(r.stderr or r.stdout).strip()[:120]}")
    try:
        (mnt / "runs").mkdir()
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 65536)
        except OSError:
            pass  # ENOSPC: full
        finally:
            os.close(fd)
        yield mnt / "runs"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_fails_jobs_with_the_reason_not_an_empty_log(env, daemons, full_disk) -> None:
    """A real full file system as LAB_RUNS, the guard off: each job's log cannot be written; the
    store says why, the same for the daemon's standby processes and a fresh one."""
    e = dict(env, LAB_RUNS=str(full_disk))
    store = Store(env["LAB_DB"])
    ids = [submit(store, 0.1, max_attempts=2) for _ in range(2)]
    daemons.append(start_daemon(e))
    rows = wait_jobs(store, ids, 60)
    for row in rows:
        assert row["status"] == "failed" and row["attempts"] == 2
        assert row["error"] == (f"cannot write {full_disk}/{row['id']}/log.txt: No space left on device; "
                                "failed after 2 attempts"), row["error"]
    stop_daemon(daemons[0])


# --- ETA -------------------------------------------------------------------------------------


class _Progress:
    """Stands in for the store: keeps what set_progress wrote."""

    def __init__(self) -> None:
        self.written: list[dict[str, Any]] = []

    def set_progress(self, job_id: int, attempt: int, progress: dict[str, Any]) -> bool:
        self.written.append(progress)
        return True


def test_eta_is_none_early_and_then_follows_the_recent_rate(tmp_path) -> None:
    """The clock of the ablation the chaos run saw: 12 s of start-up (imports, data, compile)
    before the first step, then 0.2 s a step for 100 steps, done 32 s after the start. Counting
    the start-up, step 1 showed an ETA of ~20 min."""
    now = [0.0]
    store = _Progress()
    ctx = WorkerContext(store, 1, 1, tmp_path, "cpu", clock=lambda: now[0])  # type: ignore[arg-type]
    seen: dict[int, float | None] = {}
    for step in range(1, 101):
        now[0] = 12.0 + 0.2 * (step - 1)
        ctx.progress(step, 100)
        if store.written and store.written[-1]["step"] == step:
            seen[step] = store.written[-1]["eta_s"]
    early = {s: eta for s, eta in seen.items() if 12.0 + 0.2 * (s - 1) < 12.0 + 3.0}
    assert early and all(eta is None for eta in early.values()), early
    later = {s: eta for s, eta in seen.items() if s not in early and s < 100}
    assert later
    for s, eta in later.items():
        truth = 0.2 * (100 - s)
        assert eta is not None and abs(eta - truth) <= 0.1 * truth + 0.5, (s, eta, truth)
    assert seen[100] == 0.0


def test_eta_follows_a_change_of_pace(tmp_path) -> None:
    """Steps slow from 0.1 s to 1 s (say, a bigger arm): within the window the ETA follows."""
    now = [0.0]
    store = _Progress()
    ctx = WorkerContext(store, 1, 1, tmp_path, "cpu", clock=lambda: now[0])  # type: ignore[arg-type]
    step = 0
    for _ in range(100):
        step += 1
        now[0] += 0.1
        ctx.progress(step, 1000)
    for _ in range(60):
        step += 1
        now[0] += 1.0
        ctx.progress(step, 1000)
    eta = store.written[-1]["eta_s"]
    assert eta is not None and abs(eta - (1000 - step)) < 0.2 * (1000 - step), eta
