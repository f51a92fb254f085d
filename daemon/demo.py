"""`make demo`: the queue end to end on the embedded defaults (SQLite + SqliteHuey, CPU only).

Starts `lab daemon` in the background, submits a `smoke` job to the GPU lane (it runs on the CPU
when there is no card) and a `tokenize` job (a `sleep` if that kind is missing) to the CPU lane,
shows `lab status` while they run, waits, prints the results, and stops the daemon with SIGTERM.
Everything goes to a fresh directory `runs/demo-<time>/` (queue.db, runs/, daemon.log) unless
LAB_DB / LAB_RUNS are set. Exit 0 only if every job succeeded and the daemon stopped cleanly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jobs

ROOT = Path(__file__).resolve().parent.parent


def lab(env: dict[str, str], *args: str, quiet: bool = False) -> subprocess.CompletedProcess:
    if not quiet:
        print(f"$ lab {' '.join(args)}", flush=True)
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True)


def cpu_job() -> list[str]:
    if "tokenize" in jobs.kind_names():
        from models.tokenizer import SAMPLE_TEXT

        return ["tokenize", "--lane", "cpu", "--set", f"src=[{json.dumps(str(SAMPLE_TEXT))}]",
                "--set", f"name=demo{int(time.time())}"]
    return ["sleep", "--lane", "cpu", "--set", "seconds=5"]


def main() -> int:
    env = dict(os.environ)
    if "LAB_DB" not in env or "LAB_RUNS" not in env:
        base = ROOT / "runs" / time.strftime("demo-%Y%m%d-%H%M%S", time.gmtime())
        env.setdefault("LAB_DB", str(base / "queue.db"))
        env.setdefault("LAB_RUNS", str(base / "runs"))
    Path(env["LAB_RUNS"]).mkdir(parents=True, exist_ok=True)
    Path(env["LAB_DB"]).parent.mkdir(parents=True, exist_ok=True)
    daemon_log = Path(env["LAB_DB"]).parent / "daemon.log"
    print(f"queue: LAB_DB={env['LAB_DB']}\nruns:  LAB_RUNS={env['LAB_RUNS']}\ndaemon log: {daemon_log}\n")

    with open(daemon_log, "ab") as f:
        daemon = subprocess.Popen([sys.executable, "-m", "cli", "daemon"], cwd=ROOT, env=env, stdout=f,
                                  stderr=subprocess.STDOUT)
    print(f"started `lab daemon` (pid {daemon.pid})")
    ids: list[int] = []
    ok = True
    try:
        for args in (["smoke", "--lane", "gpu"], cpu_job()):
            r = lab(env, "submit", *args, "--json")
            if r.returncode != 0:
                print(r.stderr, file=sys.stderr)
                return 1
            job = json.loads(r.stdout)
            ids.append(job["id"])
            print(f"  -> job {job['id']}: {job['kind']} on lane {job['lane']} ({job['status']})")
        deadline = time.monotonic() + 600
        while True:
            time.sleep(3)
            r = lab(env, "status")
            print(r.stdout, flush=True)
            status = json.loads(lab(env, "status", "--json", quiet=True).stdout)
            if not any(j["status"] in ("queued", "blocked", "running") for j in status["jobs"]):
                break
            if daemon.poll() is not None:
                print("the daemon exited early; see", daemon_log, file=sys.stderr)
                return 1
            if time.monotonic() > deadline:
                print("the demo jobs took longer than 10 minutes", file=sys.stderr)
                return 1
        for job_id in ids:
            r = lab(env, "wait", str(job_id), "--json")
            job = json.loads(r.stdout)
            ok &= r.returncode == 0
            print(f"job {job_id} ({job['kind']}, lane {job['lane']}): {job['status']}"
                  f"{'' if job['status'] == 'succeeded' else ' - ' + str(job['error'])}")
            print("  result: " + json.dumps(job["result"], default=str)[:600])
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(40)
            except subprocess.TimeoutExpired:
                daemon.kill()
                ok = False
        print(f"daemon stopped (exit code {daemon.returncode})")
    ok &= daemon.returncode == 0
    print("demo: " + ("all jobs succeeded" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
