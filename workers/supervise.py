"""Start one job attempt as a subprocess in its own process group and watch it until it ends.

The daemon calls `run_job` from a huey worker thread. It renews the lease, enforces the job's
timeout and a cancel request (SIGTERM to the whole group, `kill_grace_seconds`, then SIGKILL), and
on daemon shutdown past the deadline kills the attempt and puts the job back in the queue. When
the process ends without having recorded its own outcome, the reason is recorded here (the signal
name, the exit code, the job's own reason for stopping itself, the timeout or the cancel), and
what follows is the one retry policy of `run_job`. Its own writes to the job's log are best
effort: on a full disk the reason must still reach the store.
"""

from __future__ import annotations

import json
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

# Written into the run dir by a job that stops itself (workers.run.LeaseKeeper.stop_self), for
# this supervisor: the database may be what the job cannot reach, so its reason goes to a file.
STOPPED_FILE = "stopped-itself.json"


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


def _note(run_dir: Path, message: str) -> None:
    """A line in the job's log from the supervisor; best effort: on a full disk the store, not
    the log, must get the reason, and the supervisor must go on watching."""
    try:
        with open(run_dir / "log.txt", "a") as f:
            f.write(message + "\n")
    except OSError:
        pass


def _stopped_itself(run_dir: Path, attempt: int) -> str | None:
    """The reason the job process gave when it stopped itself (workers.run.LeaseKeeper), if it
    did in this attempt."""
    try:
        said = json.loads((run_dir / STOPPED_FILE).read_text())
    except (OSError, ValueError):
        return None
    return str(said["reason"]) if isinstance(said, dict) and said.get("attempt") == attempt else None


def could_not_start(store: Store, job: dict[str, Any], reason: str) -> str:
    """The lab could not start this attempt (its log cannot be written, no process): not the
    job's fault, so it is requeued like a death by signal, and the reason is in the store."""
    status = store.requeue_or_fail(job["id"], job["attempts"], reason)
    if status is None:
        row = store.get(job["id"])
        return row["status"] if row else "lost"
    return "requeued" if status == "queued" else status


def _open_log(run_dir: Path, line: str) -> None:
    """Create the run dir and append `line` to its log.txt, raising OSError when it cannot be
    written (ENOSPC, ENOTDIR, EACCES): a write, not just an open, since a full disk lets a file
    be created and refuses its first byte."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        pass  # a file where the run dir should be: the open below names the error (ENOTDIR)
    fd = os.open(run_dir / "log.txt", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def run_job(store: Store, job: dict[str, Any], *, db: str, runs: Path, host: str,
            stop_deadline: Callable[[], float | None], pool: ProcessPool | None = None) -> str:
    """Run one claimed attempt to its end; returns what became of it: succeeded, failed,
    cancelled, or requeued (daemon shutdown; or a death the retry policy requeues).

    The retry policy (README "Reliability"), the same as the lease sweep's when nobody watched:
    a death by a signal the lab did not send (an OOM kill, a segfault), a job that stopped itself
    (its lease watchdog), and an attempt the lab could not start are requeued with attempts + 1
    up to max_attempts, then failed; a nonzero exit of the job's own fails at once; a timeout
    or a cancel is final; a daemon shutdown requeues without counting the attempt."""
    q = config.queue_config()
    job_id, attempt = job["id"], job["attempts"]
    run_dir = Path(job["run_dir"])
    log_path = run_dir / "log.txt"
    try:
        _open_log(run_dir, f"lab: attempt {attempt} of {job['max_attempts']} on {host}\n")
    except OSError as e:
        return could_not_start(store, job, f"cannot write {log_path}: {e.strerror}")
    try:
        (run_dir / STOPPED_FILE).unlink(missing_ok=True)  # an earlier attempt's (lab retry counts from 1)
    except OSError:
        pass
    try:
        if pool is not None:
            proc = pool.take(job, log_path)
        else:
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "workers.run", str(job_id), str(attempt)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=job_env(job, db, runs, host), start_new_session=True)
    except OSError as e:  # no process (EAGAIN, ENOMEM), or the log went away meanwhile
        return could_not_start(store, job, f"cannot start the job process: {e.strerror or e}")
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
                _note(run_dir, f"lab: supervisor cannot reach the database ({type(e).__name__}); watching on")
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
            _note(run_dir, f"lab: {ended_by[1]}; stopping the process group")
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
        if row is None:
            return "lost"
        return "requeued" if row["status"] == "queued" else row["status"]
    if ended_by is not None and ended_by[0] == "requeued":
        store.release(job_id, attempt, ended_by[1])
        return "requeued"
    if ended_by is not None and ended_by[0] in ("cancelled", "failed"):
        store.finish(job_id, attempt, ended_by[0], exit_code=rc, error=ended_by[1])
        return ended_by[0]
    # Ended by itself without a recorded outcome.
    said = _stopped_itself(run_dir, attempt)
    if said is not None or rc < 0:
        # Not from the lab (we sent nothing: ended_by is None), not the job's own verdict: the
        # same death with the daemon down is requeued by the lease sweep, so it is here too.
        why = f"stopped itself: {said}" if said is not None else describe_exit(rc)
        status = store.requeue_or_fail(job_id, attempt, why, exit_code=rc)
        if status is None:  # someone else ended or requeued it meanwhile
            row = store.get(job_id)
            return "lost" if row is None else ("requeued" if row["status"] == "queued" else row["status"])
        return "requeued" if status == "queued" else status
    store.finish(job_id, attempt, "failed", exit_code=rc, error=describe_exit(rc))
    return "failed"
