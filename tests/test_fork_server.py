"""workers/fork_server.py and workers/forked.py: a training lane's standbys forked from one
process that preloaded once, run by the real supervisor against a real SQLite queue."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers_daemon import queue_env, set_env, wait_for

from common import git_commit
from store import Store
from workers.forked import EXIT_LOST, ForkedProcess, proc_stat
from workers.supervise import ProcessPool, describe_exit, run_job

# Two arms of one seed each, four steps: the seed pool's two processes, not what they learn.
ABLATION = {"task": "khop", "seeds": 1, "why": "a test", "steps": 4, "eval_examples": 20, "eval_depths": [1],
            "baseline": "flat-1", "primary": "test",
            "arms": [{"name": "flat-1", "arch": "reasoner", "n_steps": 1, "set": {"d_model": 16}},
                     {"name": "flat-2", "arch": "reasoner", "n_steps": 2, "set": {"d_model": 16}}]}


@pytest.fixture
def queue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Store, dict[str, str]]:
    env = queue_env(tmp_path)
    set_env(monkeypatch, env)
    monkeypatch.setenv("LAB_QUEUE_STANDBY_PRELOAD", "true")  # the suite's daemons run without it
    monkeypatch.setenv("LAB_QUEUE_STANDBY_FORK", "true")
    monkeypatch.setenv("LAB_QUEUE_STANDBY_GPU", "2")
    return Store(env["LAB_DB"]), env


def _pool(env: dict[str, str], head: Any = git_commit) -> ProcessPool:
    runs = Path(env["LAB_RUNS"])
    runs.mkdir(parents=True, exist_ok=True)
    return ProcessPool(env["LAB_DB"], runs, "testhost", head=head)


def _forked(pool: ProcessPool, lane: str, n: int) -> list[Any]:
    """Wait for the lane's server to be ready and `n` forked standbys (its on_ready tops up)."""
    wait_for(lambda: sum(s.forked for s in pool._ready.get(lane, [])) >= n, 120,
             f"{n} forked standbys on lane {lane}")
    return [s for s in pool._ready[lane] if s.forked]


def _run(store: Store, env: dict[str, str], pool: ProcessPool, kind: str, spec: dict[str, Any],
         lane: str = "gpu", **kw: Any) -> tuple[dict[str, Any], str]:
    store.submit(kind, lane, spec, timeout_s=300, max_attempts=1)
    job = store.claim_next(lane, "test", "testhost", Path(env["LAB_RUNS"]), 30)
    assert job is not None
    outcome = run_job(store, job, db=env["LAB_DB"], runs=Path(env["LAB_RUNS"]), host="testhost",
                      stop_deadline=lambda: None, pool=pool, **kw)
    return store.get(job["id"]), outcome


def test_forked_standbys_run_jobs_and_a_new_commit_retires_their_server(queue) -> None:
    """Until the server is ready the lane has light standbys; then forks of it replace them, and
    each smoke handed to one trains, gives the card back and succeeds; the server preloaded once,
    the forks never for themselves. A child is the server's, not the daemon's: its exit status
    comes from the server, so a job's own exit code and a death by signal are recorded as from a
    Popen. When HEAD moves while a forked job runs, the old server takes no more requests but
    stays until its child has exited (whose status it still reports); a new one serves the new
    commit. (One test: each server preloads torch, seconds of the suite's time.)"""
    store, env = queue
    head = [git_commit()]
    pool = _pool(env, head=lambda: head[0])
    try:
        pool.expect("gpu", "smoke")
        pool.warm("gpu")
        assert "gpu" in pool._servers and not any(s.heavy for s in pool._ready["gpu"])
        standbys = _forked(pool, "gpu", 2)
        old = pool._servers["gpu"]
        rows = []
        for _ in range(3):  # more jobs than standbys: the pool forks more as they are taken
            released: list[bool] = []
            row, outcome = _run(store, env, pool, "smoke", {"preset": "tiny", "steps": 4},
                                on_card_released=lambda released=released: released.append(True))
            assert outcome == "succeeded", row["error"]
            assert released == [True]
            rows.append(row)
        assert rows[0]["pid"] in {s.proc.pid for s in standbys}
        assert len({row["pid"] for row in rows} | {old.proc.pid}) == 4  # a process of its own each
        for row in rows:
            assert row["started_at"] < row["progress"]["first_step_at"] <= row["progress"]["step_at"]
            log = (Path(row["run_dir"]) / "log.txt").read_text()
            assert f"code of commit {git_commit()} (loaded before the job came)" in log
        workers_log = (Path(env["LAB_RUNS"]) / "workers.log").read_text()
        assert workers_log.count("preloaded torch in") == 1  # the server's, once
        assert f"fork server pid {old.proc.pid}: ready" in workers_log
        assert "python threads after the preload" not in workers_log  # it forks with one

        # An ablation's seeds run in child processes of the job (multiprocessing's own fork
        # server, harness/ablate.py): that works from a forked standby too.
        forks = {s.proc.pid for s in _forked(pool, "gpu", 1)}
        row, outcome = _run(store, env, pool, "ablation", ABLATION)
        assert outcome == "succeeded", row["error"]
        assert row["pid"] in forks and row["result"]["verdict"] in ("better", "worse", "inconclusive")
        log = (Path(row["run_dir"]) / "log.txt").read_text()
        assert "done flat-2 seed 0" in log and "grouped:" not in log  # the pool's path, not in-process

        row, outcome = _run(store, env, pool, "sleep", {"seconds": 0.1, "exit_code": 3})
        assert (outcome, row["exit_code"], row["error"]) == ("failed", 3, "exited with code 3")
        row, outcome = _run(store, env, pool, "sleep", {"seconds": 0.1, "signal": "SIGKILL"})
        assert (outcome, row["exit_code"]) == ("failed", -9)
        assert row["error"].startswith("killed by signal SIGKILL")

        store.submit("sleep", "gpu", {"seconds": 2}, timeout_s=60, max_attempts=1)
        job = store.claim_next("gpu", "test", "testhost", Path(env["LAB_RUNS"]), 30)
        Path(job["run_dir"]).mkdir(parents=True)
        proc = pool.take(job, Path(job["run_dir"]) / "log.txt")
        assert isinstance(proc, ForkedProcess) and proc.server_pid == old.proc.pid
        head[0] = "f" * 40
        pool.warm("gpu")  # the lane's last jobs were light: a light server for the new commit
        light = pool._servers["gpu"]
        assert light is not old and light.commit == "f" * 40 and not light.heavy
        light_forks = {s.proc.pid for s in _forked(pool, "gpu", 2)}
        pool.expect("gpu", "smoke")
        pool.warm("gpu")  # now it trains again: a server that preloads replaces the light one
        assert pool._servers["gpu"] not in (old, light) and pool._servers["gpu"].commit == "f" * 40
        assert pool._servers["gpu"].heavy
        # Until it is ready the light one's forks stay (it still reports their exits): no python
        # is started beside the preload.
        assert {s.proc.pid for s in pool._ready["gpu"]} == light_forks and light.proc.poll() is None
        time.sleep(0.5)
        assert old.proc.poll() is None  # its child still runs
        assert proc.wait(30) == 0 and store.get(job["id"])["status"] == "succeeded"
        assert old.proc.wait(20) == 0  # then it leaves by itself
    finally:
        pool.close()


def test_a_server_that_dies_loses_no_job(queue) -> None:
    """SIGKILL to the server: a standby it forked can no longer report an exit status
    (EXIT_LOST once it is gone, which the supervisor records as a death the job did not choose),
    and the pool starts a new server, and standbys started with python meanwhile for the next job."""
    store, env = queue
    pool = _pool(env)
    try:
        pool.expect("gpu", "smoke")
        pool.warm("gpu")
        (first, *_) = _forked(pool, "gpu", 2)
        server = pool._servers["gpu"]
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
        first.proc.kill()
        assert first.proc.wait(10) == EXIT_LOST
        assert "lost with its fork server" in describe_exit(EXIT_LOST)
        pool.warm("gpu")  # the dead server is replaced
        assert pool._servers["gpu"] is not server
        # Its orphans made way for standbys started with python while the new one preloads.
        assert not any(s.forked for s in pool._ready["gpu"]) and len(pool._ready["gpu"]) == 2
        row, outcome = _run(store, env, pool, "sleep", {"seconds": 0.1})
        assert outcome == "succeeded", row["error"]
    finally:
        pool.close()


def test_with_forking_off_a_training_standby_preloads_for_itself(queue, monkeypatch) -> None:
    store, env = queue
    monkeypatch.setenv("LAB_QUEUE_STANDBY_FORK", "false")
    pool = _pool(env)
    try:
        pool.expect("gpu", "smoke")
        pool.warm("gpu")
        assert pool._servers == {} and all(s.heavy and not s.forked for s in pool._ready["gpu"])
    finally:
        pool.close()


def test_proc_stat_reads_a_live_a_zombie_and_a_gone_process() -> None:
    me = proc_stat(os.getpid())
    assert me is not None and int(me[1]) == os.getppid()  # state, then ppid
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    wait_for(lambda: (proc_stat(child.pid) or ["?"])[0] == "Z", 10, "the child to exit unreaped")
    child.wait()
    assert proc_stat(child.pid) is None
