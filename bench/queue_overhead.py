"""Dead time of the GPU lane: 20 back-to-back trivial GPU jobs through a real `lab daemon`.

Dead time = the next job's start minus the previous job's end, as the jobs themselves record
them (sleep's times.json: when `run` began and ended), so it counts everything in between: the
result write, process exit, the daemon noticing, the next claim, huey's enqueue/dequeue, the
new process's start-up and the GPU lock. The same jobs are then run by a bare huey consumer
(same storage kind, one worker, same polling) whose task only claims the job and runs the same
`python -m workers.run` subprocess: the difference is what the daemon adds.

    python bench/queue_overhead.py [--db URL] [--broker redis://...] [--jobs 20]

The daemon's gaps are also split into phases (`phases`), so a slow one says where.

Last line: `dead_time_median_s: 0.12 (bare huey: 0.05)`. Target: <= 0.05 s (it was 0.25 s).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from store import FINAL, Store  # noqa: E402

FAST = {"LAB_QUEUE_POLL_SECONDS": "0.5", "LAB_QUEUE_DISK_MIN_FREE_GB": "0"}


def submit_all(store: Store, n: int) -> list[int]:
    return [store.submit("sleep", "gpu", {"seconds": 0.0, "fail": False, "exit_code": 0, "signal": "",
                                          "child": False}, timeout_s=60, max_attempts=1) for _ in range(n)]


def wait_all(store: Store, ids: list[int], timeout: float = 300) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = [store.get(i) for i in ids]
        if all(r["status"] in FINAL for r in rows):
            bad = [r for r in rows if r["status"] != "succeeded"]
            if bad:
                raise SystemExit(f"job {bad[0]['id']} {bad[0]['status']}: {bad[0]['error']}")
            return rows
        time.sleep(0.2)
    raise SystemExit("jobs did not finish in time")


def dead_times(rows: list[dict]) -> list[float]:
    spans = sorted(tuple(json.loads((Path(r["run_dir"]) / "times.json").read_text()).values())
                   for r in rows)
    return [s2 - e1 for (_, e1), (s2, _) in zip(spans, spans[1:], strict=False)]


PHASES = ("record", "exit+claim", "handover", "to_run")


def phases(rows: list[dict]) -> dict[str, float]:
    """Median of each part of a gap, from the store's times: the previous job's end -> its
    recorded outcome (record) -> the next job's claim (process exit, the supervisor noticing,
    the claim) -> its mark_started (huey, the hand-over to a standby, the GPU lock) -> its run."""
    spans = sorted(((json.loads((Path(r["run_dir"]) / "times.json").read_text()), r) for r in rows),
                   key=lambda x: x[0]["start"])
    parts: dict[str, list[float]] = {p: [] for p in PHASES}
    for (t1, r1), (t2, r2) in zip(spans, spans[1:], strict=False):
        bounds = (t1["end"], r1["finished_at"], r2["claimed_at"], r2["started_at"], t2["start"])
        for name, a, b in zip(PHASES, bounds, bounds[1:], strict=False):
            parts[name].append(b - a)
    return {p: statistics.median(v) for p, v in parts.items()}


def through_daemon(env: dict[str, str], n: int) -> list[float]:
    store = Store(env["LAB_DB"])
    ids = submit_all(store, n)
    log = open(Path(env["LAB_RUNS"]) / "daemon.log", "ab")
    daemon = subprocess.Popen([sys.executable, "-m", "cli", "daemon", "--lanes", "gpu"], cwd=ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        rows = wait_all(store, ids)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
    print("daemon phases (median s): " + ", ".join(f"{k} {v:.3f}" for k, v in phases(rows).items()),
          flush=True)
    return dead_times(rows)


def through_bare_huey(env: dict[str, str], n: int) -> list[float]:
    os.environ.update(env)
    from huey.consumer import Consumer

    from daemon.scheduler import make_huey
    from workers.supervise import job_env

    runs = Path(env["LAB_RUNS"])
    store = Store(env["LAB_DB"])
    ids = submit_all(store, n)
    huey = make_huey("bare-bench", env["LAB_DB"], runs, env.get("LAB_BROKER"))
    huey.storage.flush_queue()  # a shared broker may hold an interrupted run's messages

    @huey.task()
    def execute(job_id: int) -> None:
        job = store.claim_next("gpu", "bare-huey", "bench", runs, 60)
        assert job is not None and job["id"] == job_id
        Path(job["run_dir"]).mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "workers.run", str(job_id), str(job["attempts"])], cwd=ROOT,
                       env=job_env(job, env["LAB_DB"], runs, "bench"), check=True,
                       stdout=subprocess.DEVNULL, start_new_session=True)

    for job_id in ids:
        execute(job_id)
    consumer = Consumer(huey, workers=1, periodic=False, initial_delay=0.01, backoff=1.5, max_delay=0.1)
    consumer.start()
    try:
        rows = wait_all(store, ids)
    finally:
        consumer.stop(graceful=True)
    return dead_times(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", default=None, help="SQLAlchemy URL (default: a fresh SQLite file)")
    ap.add_argument("--broker", default=None, help="redis:// URL for RedisHuey (default: SqliteHuey)")
    ap.add_argument("--jobs", type=int, default=20)
    args = ap.parse_args()
    results = {}
    for name, fn in (("daemon", through_daemon), ("bare", through_bare_huey)):
        tmp = Path(tempfile.mkdtemp(prefix=f"lab-bench-{name}-"))
        env = dict(os.environ, **FAST, LAB_RUNS=str(tmp / "runs"), LAB_HOST="bench",
                   LAB_GPU_LOCK_DIR=str(tmp / "gpu-lock"))
        env["LAB_DB"] = args.db if args.db else str(tmp / "queue.db")
        if args.broker:
            env["LAB_BROKER"] = args.broker
        else:
            env.pop("LAB_BROKER", None)
        (tmp / "runs").mkdir()
        if args.db:  # never on a live queue: the bench's daemon would run its jobs (and it on them)
            from store import ACTIVE

            busy = Store(args.db).list_jobs(ACTIVE, limit=1)
            if busy:
                raise SystemExit(f"--db: the queue has active jobs (job {busy[0]['id']} is "
                                 f"{busy[0]['status']}); use an empty database")
        gaps = fn(env, args.jobs)
        results[name] = statistics.median(gaps)
        print(f"{name}: {len(gaps)} gaps, median {results[name]:.3f} s, min {min(gaps):.3f}, "
              f"max {max(gaps):.3f}", flush=True)
    print(f"dead_time_median_s: {results['daemon']:.3f} (bare huey: {results['bare']:.3f})")


if __name__ == "__main__":
    main()
