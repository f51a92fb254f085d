"""How fast does the GitHub bridge answer a burst of labelled issues at GitHub's own pace?

N issues (default 18), each a ```toml block of a 0.1 s sleep job labelled `cpu` by a writer, are
opened at once on the stand-in GitHub (tests/github_server.py, real HTTP) while a real
`lab daemon` subprocess runs the jobs and polls GitHub with the bridge on. Pacing is the
DEFAULT (QueueConfig.github_seconds_between_writes, one second between writes, as GitHub asks),
so the figure is what a person waits for, not what a zeroed test setting allows.

It waits until every job has its result comment and the outbox is empty (final status edits
and labels included), then reads the stand-in's request log:

- writes/job: POST, PATCH, PUT and DELETE requests to the REST API (comments, labels), per job;
  GraphQL queries (POST /graphql, a read) are counted apart;
- latency: per issue, from its `labeled` event to the bot's result comment, median and max.

The last line is `bridge: 18 issues, 3.0 writes/job, median label->result 9.1 s`.

    .venv/bin/python bench/bridge.py                 # ~1 min
    .venv/bin/python bench/bridge.py --issues 6 --poll 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from github_server import FakeGitHub  # noqa: E402 - tests/ is on the path only now
from helpers_daemon import queue_env, start_daemon, stop_daemon  # noqa: E402

TOKEN = "ghp_BENCHtoken0123456789abcdef"
WRITES = ("POST", "PATCH", "PUT", "DELETE")


def settled(db: str, issues: int) -> bool:
    """Every issue has a finished job with its result sent, and the bridge has nothing left to send
    (a job can end between two cycles, before its result row exists)."""
    from bridge.outbox import Outbox
    from store import FINAL, Store

    store = Store(db)
    try:
        jobs, outbox = store.list_jobs(), Outbox(store)
        sent = {r["job_id"] for r in outbox.rows(kind="result") if r["status"] == "done"}
        return (len(jobs) == issues and all(j["status"] in FINAL and j["id"] in sent for j in jobs)
                and outbox.counts()["pending"] == 0)
    finally:
        store.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--issues", type=int, default=18)
    ap.add_argument("--seconds", type=float, default=0.1, help="each sleep job's length")
    ap.add_argument("--poll", type=float, default=1.0, help="LAB_GITHUB_POLL of the daemon")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--timeline", action="store_true", help="print every request, seconds after the burst")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-bridge-") as tmp:
        gh = FakeGitHub(TOKEN).start()
        gh.add_user("alice", "write")
        env = queue_env(Path(tmp), GITHUB_TOKEN=TOKEN, GITHUB_REPOSITORY=gh.repo, GITHUB_API_URL=gh.url,
                        LAB_GITHUB_POLL=f"{args.poll:g}")
        for k in [k for k in env if k.startswith("LAB_QUEUE_GITHUB_")]:
            del env[k]  # the default pacing: the point of the figure
        for k in ("GITHUB_TOKEN_FILE", "GITHUB_TOKEN_FD", "CREDENTIALS_DIRECTORY", "LAB_ALLOWED_USERS"):
            env.pop(k, None)
        daemon = start_daemon(env, "--cpu-workers", "2", log=Path(tmp) / "daemon.log")
        try:
            deadline = time.monotonic() + 60
            while gh.count() == 0:  # the bridge's first (empty) cycle: it is up
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise SystemExit("the daemon's bridge never polled:\n"
                                     + (Path(tmp) / "daemon.log").read_text()[-2000:])
                time.sleep(0.05)
            first = len(gh.requests)
            body = f'A burst.\n\n```toml\nkind = "sleep"\nseconds = {args.seconds:g}\n```\n'
            numbers = [gh.open_issue(f"bench {i}", body, ("cpu",), user="alice") for i in range(args.issues)]
            t0, t0_wall = time.monotonic(), time.time()
            deadline = t0 + args.timeout
            while not settled(env["LAB_DB"], args.issues):
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise SystemExit(f"not settled within {args.timeout:g} s:\n"
                                     + (Path(tmp) / "daemon.log").read_text()[-2000:])
                time.sleep(0.2)
            took = time.monotonic() - t0
        finally:
            stop_daemon(daemon)
            gh.stop()

        reqs = gh.requests[first:]
        if args.timeline:
            for r in reqs:
                print(f"  {r.at - t0_wall:7.2f} {r.status} {r.method} {_shape(r.path)}")
        kinds = Counter(f"{r.method} {_shape(r.path)}" for r in reqs if r.method != "GET")
        writes = sum(n for k, n in kinds.items() if k.split()[0] in WRITES and "/graphql" not in k)
        latencies = []
        for n in numbers:
            labelled = next(e["created_at"] for e in gh.events[n] if e["event"] == "labeled")
            results = [c["created_at"] for c in gh.comments.values()
                       if c["_issue"] == n and c["user"] == gh.bot and "<!-- lab:result" in c["body"]]
            latencies.append(min(results) - labelled)
        for k, v in sorted(kinds.items()):
            print(f"  {k}: {v}")
        print(f"requests: {len(reqs)} ({len(reqs) - sum(kinds.values())} GET); settled in {took:.1f} s; "
              f"label->result max {max(latencies):.1f} s")
        print(f"bridge: {args.issues} issues, {writes / args.issues:.1f} writes/job, "
              f"median label->result {statistics.median(latencies):.1f} s")


def _shape(path: str) -> str:
    """/repos/o/r/issues/12/comments -> /issues/N/comments: requests grouped by endpoint."""
    parts = path.split("/")
    if path.startswith("/repos/"):
        parts = parts[4:]
    return "/".join("N" if p.isdigit() else p for p in parts)


if __name__ == "__main__":
    os.environ.pop("GITHUB_TOKEN", None)  # the stand-in's token only
    main()
