"""Test helpers for the queue: a private queue (LAB_DB, LAB_RUNS, LAB_GPU_LOCK_DIR) with fast lease
settings, real `lab daemon` subprocesses, and waiting on jobs through the real store."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from store import FINAL, Store

ROOT = Path(__file__).resolve().parent.parent

# Short leases so the kill -9 and sweep tests take seconds; still generous for a loaded box.
FAST = {
    "LAB_QUEUE_HEARTBEAT_SECONDS": "0.2",
    "LAB_QUEUE_LEASE_SECONDS": "3",
    "LAB_QUEUE_SWEEP_SECONDS": "0.5",
    "LAB_QUEUE_POLL_SECONDS": "0.1",
    "LAB_QUEUE_KILL_GRACE_SECONDS": "1",
    "LAB_QUEUE_SHUTDOWN_SECONDS": "3",
    # A preloading standby takes ~3.5 CPU-s beside the job it waits behind: on 2 cores that slows
    # every daemon test's jobs. Its own tests turn it on (tests/test_workers.py, bench/card_idle.py).
    "LAB_QUEUE_STANDBY_PRELOAD": "false",
    # One standby per lane, not three: each is a python (~0.4 CPU-s) that most tests' one or two
    # jobs never use. The pool's own tests (tests/test_workers.py) size it as they need.
    "LAB_QUEUE_STANDBY_GPU": "1",
}


def queue_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("LAB_BROKER", "GITHUB_TOKEN", "GITHUB_REPOSITORY"):  # a private, offline queue
        env.pop(name, None)
    env.update(FAST)
    # LAB_GPU_LOCK_DIR: the GPU lock is machine-wide; a private one per queue, so tests neither
    # wait for a real GPU lane (or another test run) nor block it, and each simulated host has its own.
    env.update(LAB_DB=str(tmp / "queue.db"), LAB_RUNS=str(tmp / "runs"), LAB_HOST="testhost",
               LAB_QUEUE_DISK_MIN_FREE_GB="0", LAB_GPU_LOCK_DIR=str(tmp / "gpu-lock"))
    env.update(extra)
    return env


def set_env(monkeypatch: Any, env: dict[str, str]) -> None:
    for k, v in env.items():
        if k.startswith("LAB_"):
            monkeypatch.setenv(k, v)


def start_daemon(env: dict[str, str], *args: str, log: Path | None = None) -> subprocess.Popen:
    log = log or Path(env["LAB_RUNS"]).parent / f"daemon-{time.monotonic_ns()}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "cli", "daemon", *args], cwd=ROOT, env=env,
                                stdout=f, stderr=subprocess.STDOUT)


def stop_daemon(proc: subprocess.Popen, timeout: float = 30.0) -> float:
    """SIGTERM and wait; returns the seconds it took to exit."""
    t0 = time.monotonic()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"daemon {proc.pid} did not exit within {timeout} s of SIGTERM") from None
    return time.monotonic() - t0


def lab(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def wait_jobs(store: Store, ids: list[int], timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = [store.get(i) for i in ids]
        if all(r is not None and r["status"] in FINAL for r in rows):
            return rows  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError("jobs did not finish: " + ", ".join(
                f"{r['id']}={r['status']}" for r in rows if r is not None))
        time.sleep(0.1)


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def job_times(job: dict[str, Any]) -> tuple[float, float]:
    """(start, end) wall-clock times the sleep job wrote itself."""
    t = json.loads((Path(job["run_dir"]) / "times.json").read_text())
    return t["start"], t["end"]


def assert_no_overlap(intervals: list[tuple[float, float]]) -> None:
    ordered = sorted(intervals)
    for (s1, e1), (s2, e2) in zip(ordered, ordered[1:], strict=False):
        assert e1 <= s2, f"GPU jobs overlap: [{s1:.3f}, {e1:.3f}] and [{s2:.3f}, {e2:.3f}]"


# A real process that takes the GPU lock, says "held", and keeps it until its stdin closes.
_HOLD_GPU = ("import sys\nfrom workers import gpu_lock\ngpu_lock.acquire()\nprint('held', flush=True)\n"
             "sys.stdin.read()\n")


@contextlib.contextmanager
def gpu_lock_holder(env: dict[str, str]) -> Iterator[int]:
    """The GPU lock held by another process (an orphaned job, another daemon's job, a foreground
    cuda run) for the duration of the block; yields its pid. Uses env's LAB_GPU_LOCK_DIR."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_GPU], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        if proc.stdin is not None:
            proc.stdin.close()  # the holder exits; the kernel releases its lock
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def pid_alive(pid: int) -> bool:
    """True if `pid` runs (zombies count as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# --- back ends (issue: the same queue on Postgres and Redis) -------------------------------------

PG_ADMIN_URL = os.environ.get("LAB_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("LAB_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _unavailable(what: str, err: Exception) -> None:
    import pytest

    msg = f"{what} is not reachable ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    if os.environ.get("LAB_REQUIRE_SERVICES") == "1":
        pytest.fail(msg + " and LAB_REQUIRE_SERVICES=1")
    pytest.skip(msg)


@contextlib.contextmanager
def fresh_postgres() -> Iterator[str]:
    """A new, empty Postgres database for one test; dropped afterwards. Skips (or fails when
    LAB_REQUIRE_SERVICES=1) if the server is not reachable."""
    import sqlalchemy as sa

    name = f"lab_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT",
                                 connect_args={"connect_timeout": 3})
        with admin.connect() as c:
            c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except Exception as e:  # noqa: BLE001 - any failure to reach the server means "not available"
        _unavailable("PostgreSQL", e)
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def redis_broker() -> str:
    """The Redis URL for RedisHuey, or skip/fail like fresh_postgres."""
    try:
        import redis

        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except Exception as e:  # noqa: BLE001
        _unavailable("Redis", e)
    return REDIS_URL
