"""Start one job attempt as a subprocess in its own process group and watch it until it ends.

The daemon calls `run_job` from a huey worker thread. It renews the lease, enforces the job's
timeout and a cancel request (SIGTERM to the whole group, `kill_grace_seconds`, then SIGKILL), and
on daemon shutdown past the deadline kills the attempt and puts the job back in the queue. When
the process ends without having recorded its own outcome, the reason is recorded here: the signal
name, the exit code, the timeout or the cancel.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import config
from store import Store


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group; /proc where it exists."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except (ProcessLookupError, PermissionError):
            return []
    out = []
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may hold spaces, so split after the last ')'
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(d.name))
    return out


def kill_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the group, up to `grace` seconds for all of it to end, then SIGKILL."""
    pgid = proc.pid
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc.poll() is not None and not group_members(pgid):
            return
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    if rc == 0:
        return "exited with code 0 without recording a result"
    return f"exited with code {rc}"


def job_env(job: dict[str, Any], db: str, runs: Path, host: str) -> dict[str, str]:
    return lane_env(job["lane"], db, runs, host)


def lane_env(lane: str, db: str, runs: Path, host: str) -> dict[str, str]:
    env = dict(os.environ, LAB_DB=db, LAB_RUNS=str(runs), LAB_HOST=host, PYTHONUNBUFFERED="1")
    # A job never talks to GitHub; the bridge does, in the daemon. None of the token's sources
    # reaches a job (the descriptor itself is /dev/null by now: the daemon read it at start).
    for name in ("GITHUB_TOKEN", "GITHUB_TOKEN_FD", "GITHUB_TOKEN_FILE", "CREDENTIALS_DIRECTORY"):
        env.pop(name, None)
    if lane == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU job never touches the card
    return env


class ProcessPool:
    """Job processes started ahead of time (`workers.run --standby`), per lane: when a job comes,
    python and the imports are already loaded, which is most of the GPU lane's dead time between
    two jobs. A standby holds no lock and no job; it exits when its stdin closes (also when the
    daemon dies)."""

    def __init__(self, db: str, runs: Path, host: str):
        self.db, self.runs, self.host = db, runs, host
        self._ready: dict[str, list[subprocess.Popen]] = {}
        self._lock = threading.Lock()
        self.closed = False

    def _spawn(self, lane: str) -> subprocess.Popen:
        with open(self.runs / "workers.log", "ab") as log:  # start-up errors before a job is assigned
            return subprocess.Popen(
                [sys.executable, "-m", "workers.run", "--standby"], stdin=subprocess.PIPE, stdout=log,
                stderr=subprocess.STDOUT, env=lane_env(lane, self.db, self.runs, self.host),
                start_new_session=True)

    @staticmethod
    def size(lane: str) -> int:
        q = config.queue_config()
        return q.standby_gpu if lane == "gpu" else q.standby_cpu

    def warm(self, lane: str) -> None:
        with self._lock:
            ready = self._ready.setdefault(lane, [])
            ready[:] = [p for p in ready if p.poll() is None]
            while not self.closed and len(ready) < self.size(lane):
                ready.append(self._spawn(lane))

    def take(self, job: dict[str, Any], log_path: Path) -> subprocess.Popen:
        """A process running `job`: the oldest standby if one is alive, else a fresh one."""
        with self._lock:
            ready = self._ready.get(job["lane"], [])
            proc = ready.pop(0) if ready else None
        line = f"{job['id']} {job['attempts']} {log_path}\n".encode()
        for _ in range(2):
            if proc is None or proc.poll() is not None:
                proc = self._spawn(job["lane"])
            try:
                assert proc.stdin is not None
                proc.stdin.write(line)
                proc.stdin.close()
                break
            except (BrokenPipeError, OSError):
                proc = None
        self.warm(job["lane"])  # the next job's process starts while this one runs
        assert proc is not None
        return proc

    def close(self) -> None:
        with self._lock:
            self.closed = True
            procs = [p for ready in self._ready.values() for p in ready]
            self._ready = {}
        for proc in procs:
            try:
                if proc.stdin is not None:
                    proc.stdin.close()
                proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()


def run_job(store: Store, job: dict[str, Any], *, db: str, runs: Path, host: str,
            stop_deadline: Callable[[], float | None], pool: ProcessPool | None = None) -> str:
    """Run one claimed attempt to its end; returns what became of it: succeeded, failed,
    cancelled or requeued (daemon shutdown)."""
    q = config.queue_config()
    job_id, attempt = job["id"], job["attempts"]
    run_dir = Path(job["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    if pool is not None:
        proc = pool.take(job, run_dir / "log.txt")
    else:
        with open(run_dir / "log.txt", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "workers.run", str(job_id), str(attempt)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=job_env(job, db, runs, host), start_new_session=True)
    store.set_pid(job_id, attempt, proc.pid)
    ended_by: tuple[str, str] | None = None  # (status, reason) when we stopped it
    next_beat = next_check = time.monotonic()
    db_down = False
    while True:
        try:
            proc.wait(timeout=0.05)
            break
        except subprocess.TimeoutExpired:
            pass
        t = time.monotonic()
        try:
            if t >= next_beat:
                next_beat = t + q.heartbeat_seconds
                store.heartbeat(job_id, attempt, q.lease_seconds)
            if t < next_check:
                continue
            next_check = t + min(0.5, q.heartbeat_seconds)
            row = store.get(job_id)
        except Exception as e:  # a database blip: keep watching (the job's own watchdog fences it)
            if not db_down:
                with open(run_dir / "log.txt", "a") as f:
                    f.write(f"lab: supervisor cannot reach the database ({type(e).__name__}); watching on\n")
            db_down = True
            continue
        db_down = False
        if row is None or row["status"] != "running" or row["attempts"] != attempt:
            if row is not None and row["status"] in ("succeeded", "failed", "cancelled"):
                continue  # the job recorded its end and is exiting: wait for it
            ended_by = ("lost", "the job was requeued or removed by someone else")
        elif row["cancel_requested"]:
            ended_by = ("cancelled", f"cancelled: {row['cancel_reason'] or 'by request'}")
        elif row["started_at"] is not None and time.time() - row["started_at"] > row["timeout_s"]:
            ended_by = ("failed", f"timed out after {row['timeout_s']:g} s")
        else:
            deadline = stop_deadline()
            if deadline is not None and t > deadline:
                ended_by = ("requeued", "daemon shut down before the job finished")
        if ended_by is not None:
            with open(run_dir / "log.txt", "a") as f:
                f.write(f"lab: {ended_by[1]}; stopping the process group\n")
            kill_group(proc, q.kill_grace_seconds)
            break
    rc = proc.returncode
    leftovers = group_members(proc.pid)
    if leftovers:  # a child that outlived the job process: no job leaves processes behind
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    row = store.get(job_id)
    if row is None or row["status"] != "running" or row["attempts"] != attempt:
        return row["status"] if row else "lost"
    if ended_by is not None and ended_by[0] == "requeued":
        store.release(job_id, attempt, ended_by[1])
        return "requeued"
    if ended_by is not None and ended_by[0] in ("cancelled", "failed"):
        store.finish(job_id, attempt, ended_by[0], exit_code=rc, error=ended_by[1])
        return ended_by[0]
    store.finish(job_id, attempt, "failed", exit_code=rc, error=describe_exit(rc))
    return "failed"
