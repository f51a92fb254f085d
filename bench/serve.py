"""How fast the dashboard's pages load with 10,000 jobs in the store.

A fresh SQLite queue gets `--jobs` rows (default 10,000) in one transaction, with the spread a
lab that ran for months has: mostly succeeded, some failed and cancelled, a few queued, blocked
and two running with progress, each with a submitted event. A real `lab serve --port 0` serves
it; every page is fetched over HTTP `--rounds` times after a warm-up, one request at a time.

    .venv/bin/python bench/serve.py [--jobs 10000] [--rounds 30]

Last line: `jobs_page_ms: median 18.3, p95 25.1 (10000 jobs; overview 35.0)`. Target: < 200 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import insert  # noqa: E402

from store import Store, events, jobs  # noqa: E402

SPREAD = [("succeeded", 0.85), ("failed", 0.08), ("cancelled", 0.04), ("queued", 0.02), ("blocked", 0.01)]


def fill(store: Store, n: int, seed: int = 0) -> None:
    """n job rows (and their submitted events) written directly: 10,000 `lab submit`s would take
    minutes and measure the submit path, not the pages."""
    rng = random.Random(seed)
    t0 = time.time() - 90 * 86_400
    rows = []
    for i in range(1, n + 1):
        status = rng.choices([s for s, _ in SPREAD], [w for _, w in SPREAD])[0]
        if i > n - 2:
            status = "running"
        kind = rng.choice(["sleep", "smoke", "train", "ablation", "tokenize", "eval"])
        created = t0 + i * (90 * 86_400 / n)
        done = status in ("succeeded", "failed", "cancelled")
        rows.append({
            "id": i, "kind": kind, "lane": "gpu" if kind in ("train", "smoke") else "cpu", "status": status,
            "spec": {"seconds": 1.0} if kind == "sleep" else {"preset": "tiny", "steps": 40},
            "priority": 0, "created_at": created, "updated_at": created + 60, "claimed_at": created + 1,
            "started_at": created + 2 if status != "queued" else None,
            "finished_at": created + 60 if done else None, "attempts": 1, "max_attempts": 3,
            "exit_code": 0 if status == "succeeded" else (1 if status == "failed" else None),
            "error": "RuntimeError: failed on purpose" if status == "failed" else None,
            "result": {"ok": True} if status == "succeeded" else None,
            "progress": {"step": 30, "total": 40, "eta_s": 12.0, "metrics": {"loss": 2.5}, "at": None}
            if status == "running" else None,
            "after_id": i - 1 if status == "blocked" else None, "timeout_s": 3600.0,
            "host": "benchhost" if status != "queued" else None, "source": "cli", "cancel_requested": False,
            "run_dir": None,
        })
    with store.transaction() as c:
        c.execute(insert(jobs), rows)
        c.execute(insert(events), [{"job_id": r["id"], "at": r["created_at"], "kind": "submitted",
                                    "message": f"{r['kind']} on lane {r['lane']}"} for r in rows])


def start_serve(env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--port", "0", "--json"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    text = ""
    while not text.rstrip().endswith("}"):
        line = proc.stdout.readline()
        if not line:
            raise SystemExit("lab serve exited before printing its URL")
        text += line
    return proc, json.loads(text)["url"].rstrip("/")


def timed(url: str, rounds: int) -> list[float]:
    for _ in range(3):  # warm-up: imports, the first connection, SQLite's page cache
        urllib.request.urlopen(url, timeout=30).read()
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        with urllib.request.urlopen(url, timeout=30) as r:
            r.read()
            assert r.status == 200
        out.append((time.perf_counter() - t) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "LAB_DB": str(Path(tmp) / "queue.db"), "LAB_RUNS": str(Path(tmp) / "runs"),
               "LAB_QUEUE_DISK_MIN_FREE_GB": "0", "LAB_DOCS": str(ROOT / "docs")}
        env.pop("LAB_SERVE_TOKEN", None)
        t = time.perf_counter()
        fill(Store(env["LAB_DB"]), args.jobs)
        print(f"filled {args.jobs} jobs in {time.perf_counter() - t:.1f} s", flush=True)
        proc, base = start_serve(env)
        try:
            results = {}
            for name, path in (("overview", "/"), ("jobs", "/jobs"), ("jobs_failed", "/jobs?status=failed"),
                               ("jobs_page_100", "/jobs?page=100"), ("job", f"/jobs/{args.jobs // 2}"),
                               ("research", "/research"), ("status_json", "/api/status.json")):
                ms = timed(base + path, args.rounds)
                results[name] = (statistics.median(ms), sorted(ms)[int(0.95 * (len(ms) - 1))])
                med, p95 = results[name]
                print(f"{name:14s} {path:22s} median {med:7.1f} ms  p95 {p95:7.1f} ms", flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
    med, p95 = results["jobs"]
    print(f"jobs_page_ms: median {med:.1f}, p95 {p95:.1f} "
          f"({args.jobs} jobs; overview {results['overview'][0]:.1f})")


if __name__ == "__main__":
    main()
