"""The queue's operations as the CLI, the GitHub bridge and the MCP server use them.

`submit` validates everything before a row is written (kind, spec keys and types through the
kind's Spec, lane, dependency, the rtx2060 gate); any problem is a `config.ConfigError` whose
one-line message names the field, and nothing is queued. `status`, `wait` and `kinds` read the
store; none of this needs a running daemon.
"""

from __future__ import annotations

import dataclasses
import math
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import config
import jobs
from config import ConfigError
from daemon.admission import (  # noqa: F401 (the service layer's names for its callers)
    PRIORITY_LIMIT,
    GateError,
    check_gate,
    check_host,
    check_job_ref,
    check_local_inputs,
    cost_of,
    dry_run_view,
    earned_match,
    prepare,
)
from store import ACTIVE, FINAL, Store, iso, public


class WaitTimeout(Exception):
    pass


class NoDaemon(WaitTimeout):
    """`wait` found no live daemon that could move the job on: waiting longer would hang
    (`lab wait` exits 3 with it, as for a timeout, unless told to keep waiting)."""


def open_store() -> Store:
    return Store(config.paths().db)


def submit(kind: str, values: dict[str, Any], *, lane: str | None = None, after: int | None = None,
           priority: int = 0, timeout_s: float | None = None, issue: int | None = None,
           earned_by: int | None = None, force: bool = False, reason: str | None = None,
           host: str | None = None, source: str = "cli", held: str | None = None,
           dry_run: bool = False, store: Store | None = None) -> dict[str, Any]:
    """Validate and queue one job; returns it as `lab show` prints it. `dry_run`: validate
    everything the same way and return what would be queued (spec, lane, cost, the gate's
    decision) without queueing it. Kind `idea` queues a pipeline (`submit_idea`)."""
    store = store or open_store()
    if kind == "idea":
        from daemon.pipeline import submit_idea

        return submit_idea(values, lane=lane, issue=issue, source=source, held=held, dry_run=dry_run,
                           store=store)
    plan = prepare(kind, values, lane=lane, after=after, priority=priority, timeout_s=timeout_s,
                   issue=issue, earned_by=earned_by, force=force, reason=reason, host=host,
                   source=source, held=held, store=store)
    if dry_run:
        return dry_run_view(plan)
    job_id = store.submit(**plan["row"])
    if plan["gate"]:
        store.add_event(job_id, "gate", plan["gate"])
    out = show(job_id, store)
    if host is not None and host not in {d["host"] for d in store.daemons()}:
        # Not an error: the host's daemon may start later. But a typo would wait forever.
        out["warning"] = f"no daemon has run on host {host!r} yet; the job waits until one does"
    return out


def check_tracked_issue(issue: int, store: Store | None = None) -> None:
    """The agent may link a job only to an issue the lab already tracks (one a job came from):
    its comments, log tails included, must not land on any issue it names."""
    store = store or open_store()
    if not any(j["source"] == "github" for j in store.list_jobs(issue=issue)):
        raise ConfigError(f"issue: #{issue} is not an issue the lab tracks (no job came from it); "
                          "label the issue `gpu` or `cpu` to start one there")


def show(job_id: int, store: Store | None = None, events: bool = False) -> dict[str, Any]:
    store = store or open_store()
    job = store.get(job_id)
    if job is None:
        raise ConfigError(f"job {job_id}: no such job")
    out = public(job)
    # Run files stay on the host that ran the job; say where, so `lab show` anywhere can point there.
    out["run_files"] = None if not job["run_dir"] else {
        "host": job["host"], "path": job["run_dir"], "here": job["host"] == config.paths().host}
    try:
        out["cost"] = cost_of(job["kind"], jobs.parse_spec(job["kind"], job["spec"]))
    except ConfigError:  # a spec file that changed since: the job's own run says what it cost
        out["cost"] = None
    link = store.pipeline_of_job(job_id)
    out["pipeline"] = None if link is None else {
        "id": link["pipeline_id"], "stage": link["stage"], "round": link["round"], "role": link["role"]}
    if events:
        out["events"] = [{"at": iso(e["at"]), "kind": e["kind"], "message": e["message"]}
                         for e in store.events(job_id)]
    return out


def parse_since(text: str | None) -> float | None:
    """`--since`: an ISO 8601 time (2026-12-01T10:00, UTC when no zone) or an age (90s, 30m, 6h,
    2d) -> epoch seconds; ConfigError naming --since otherwise."""
    import re
    from datetime import UTC, datetime

    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if m:
        return time.time() - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86_400}[m.group(2)]
    try:
        at = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"--since: {text!r} is neither an age (30m, 6h, 2d) nor an ISO time "
                          "(2026-12-01T10:00Z)") from None
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()


def list_jobs(status: str | None = None, kind: str | None = None, issue: int | None = None,
              since: str | None = None, limit: int = 50, store: Store | None = None) -> dict[str, Any]:
    """`lab jobs`: jobs newest first, filtered by status (or `active`/`final`), kind, issue and
    creation time, as summaries."""
    from store import STATUSES

    store = store or open_store()
    groups = {"active": ACTIVE, "final": FINAL}
    if status is not None and status not in STATUSES and status not in groups:
        allowed = ", ".join([*STATUSES, *groups])
        raise ConfigError(f"--status: {status!r} is not a status (allowed: {allowed})")
    if kind is not None and kind not in jobs.kind_names():
        raise ConfigError(f"--kind: {kind!r} is not a job kind (allowed: {', '.join(jobs.kind_names())})")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
        raise ConfigError(f"--limit: {config.show(limit)} is out of range (allowed: 1 to 10000)")
    after = parse_since(since)
    statuses = groups.get(status or "", (status,) if status else None)
    rows = store.list_jobs(statuses, kind=kind, issue=issue, newest_first=True,
                           limit=None if after is not None else limit)
    if after is not None:
        rows = [j for j in rows if j["created_at"] >= after][:limit]
    return {"jobs": [summary(j) for j in rows], "count": len(rows),
            "filters": {"status": status, "kind": kind, "issue": issue, "since": since, "limit": limit}}


def summary(job: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "kind", "lane", "status", "priority", "progress", "host", "created_at", "started_at",
            "finished_at", "error", "after", "issue", "attempts")
    p = public(job)
    return {k: p.get(k) for k in keys}


def status(store: Store | None = None) -> dict[str, Any]:
    """What runs, what waits, progress and ETA, the daemons, the disk guard."""
    from daemon.disk import disk_status

    store = store or open_store()
    q = config.queue_config()
    active = store.list_jobs(ACTIVE)
    recent = store.list_jobs(FINAL, limit=10, newest_first=True)
    alive = store.daemons(alive_within=alive_window(q))
    disk = disk_status(Path(config.paths().runs).expanduser().resolve(), q)
    paused = next((d["paused"] for d in alive if d["paused"]), None) or disk["reason"]
    lanes: dict[str, Any] = {}
    for lane in jobs.LANES:
        mine = [j for j in active if j["lane"] == lane]
        lanes[lane] = {
            "running": [summary(j) for j in mine if j["status"] == "running"],
            "queued": sum(j["status"] == "queued" for j in mine),
            "blocked": sum(j["status"] == "blocked" for j in mine),
            "paused": paused,  # the disk guard holds both lanes
        }
    daemons = [{"id": d["id"], "host": d["host"], "pid": d["pid"], "lanes": d["lanes"].split(","),
                "heartbeat": iso(d["heartbeat_at"]), "paused": d["paused"]} for d in alive]
    newest = alive[0] if alive else None
    daemon = {"alive": bool(alive), "host": newest and newest["host"], "pid": newest and newest["pid"],
              "heartbeat": newest and iso(newest["heartbeat_at"]), "count": len(alive)}
    from daemon.pipeline import list_views

    pipelines = list_views(store, ("running",), limit=None) + [
        p for p in list_views(store, limit=5) if p["status"] != "running"]
    return {"lanes": lanes, "jobs": [summary(j) for j in active + recent], "daemon": daemon,
            "daemons": daemons, "hosts": host_view(store, active, alive), "disk": disk,
            "pipelines": pipelines}




def alive_window(q: config.QueueConfig | None = None) -> float:
    """A daemon is alive when it has not stopped and heartbeat within this many seconds: three
    missed heartbeats, and never less than a lease (a daemon restarting within a lease counts)."""
    q = q or config.queue_config()
    return max(3 * q.heartbeat_seconds, q.lease_seconds)


def no_daemon_for(job: dict[str, Any], store: Store) -> str | None:
    """Why nothing will move `job` on, or None when something may: a live daemon serves its
    lane (on its host, when it names one), or it runs under a live lease (its own process renews
    it, and finishes without a daemon). A queued or blocked job needs a daemon to claim it or to
    resolve its dependency; a running one whose lease expired, one to requeue it."""
    if job["status"] in FINAL:
        return None
    if job["status"] == "running" and (job["lease_expires_at"] or 0) > time.time():
        return None
    lane, want = job["lane"], job.get("want_host")

    def serves(d: dict[str, Any]) -> bool:
        return lane in d["lanes"].split(",") and (want is None or d["host"] == want)

    if any(serves(d) for d in store.daemons(alive_within=alive_window())):
        return None
    where = f"lane {lane}" + (f" on host {want!r}" if want else "")
    seen = [d for d in store.daemons() if serves(d)]
    if seen:
        last = max(seen, key=lambda d: d["heartbeat_at"])
        since = (f"none seen since {iso(last['heartbeat_at'])}, the last heartbeat of "
                 f"{last['host']} pid {last['pid']}")
    else:
        since = "none has ever run on this queue"
    return (f"job {job['id']} is still {job['status']} and no daemon is alive for {where} ({since}); "
            "it will not move until one starts (`lab daemon`)")


def host_view(store: Store, active: list[dict[str, Any]],
              alive: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per host seen lately (or running something): alive or not, the lanes its live
    daemons offer (else those its last daemon offered), its last heartbeat, what it runs. A dead
    host's jobs stay `running` here until their leases expire and the sweep requeues them."""
    alive_ids = {d["id"] for d in alive}
    by_host: dict[str, dict[str, Any]] = {}
    for d in store.daemons(since=config.queue_config().hosts_seen_seconds):  # newest first
        h = by_host.setdefault(d["host"], {"host": d["host"], "alive": False, "lanes": [],
                                           "heartbeat_at": 0.0, "daemons": 0,
                                           "last_lanes": d["lanes"].split(",")})
        h["heartbeat_at"] = max(h["heartbeat_at"], d["heartbeat_at"])
        if d["id"] in alive_ids:
            h["alive"] = True
            h["daemons"] += 1
            h["lanes"] += [x for x in d["lanes"].split(",") if x not in h["lanes"]]
    for j in active:
        if j["status"] == "running" and j["host"] and j["host"] not in by_host:
            by_host[j["host"]] = {"host": j["host"], "alive": False, "lanes": [], "heartbeat_at": None,
                                  "daemons": 0, "last_lanes": []}
    out = []
    for name in sorted(by_host):
        h = by_host[name]
        running = [{"id": j["id"], "kind": j["kind"], "lane": j["lane"],
                    "lease_expires_at": iso(j["lease_expires_at"])}
                   for j in active if j["status"] == "running" and j["host"] == name]
        out.append({"host": name, "alive": h["alive"], "lanes": h["lanes"] if h["alive"] else h["last_lanes"],
                    "heartbeat": iso(h["heartbeat_at"]) if h["heartbeat_at"] else None,
                    "daemons": h["daemons"], "running": running})
    return out


def wait(job_id: int, timeout_s: float | None = None, store: Store | None = None,
         poll_s: float = 0.2, without_daemon: Literal["ignore", "fail", "warn"] = "ignore",
         say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Block until the job is final; WaitTimeout after `timeout_s` (None: no limit).

    With no live daemon to move the job on (`no_daemon_for`), `without_daemon` decides:
    "fail" raises NoDaemon at once (a caller in a loop must not hang on a queue nobody serves),
    "warn" tells `say` once and keeps waiting, "ignore" (the MCP tool, whose wait is bounded)
    does not look. The check runs on every poll, so a daemon that dies mid-wait is noticed."""
    if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                  or not math.isfinite(timeout_s) or timeout_s < 0):
        # A negative timeout would time out at once, nan never: refused like `lab submit --timeout`.
        raise ConfigError(f"--timeout: {config.show(timeout_s)} is not a number of seconds >= 0 "
                          "(leave it out to wait without a limit)")
    store = store or open_store()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    warned = False
    while True:
        job = store.get(job_id)
        if job is None:
            raise ConfigError(f"job {job_id}: no such job")
        if job["status"] in FINAL:
            return public(job)
        if without_daemon != "ignore" and not warned:
            why = no_daemon_for(job, store)
            if why is not None and without_daemon == "fail":
                raise NoDaemon(why)
            if why is not None:
                warned = True
                if say is not None:
                    say(why)
        if deadline is not None and time.monotonic() >= deadline:
            raise WaitTimeout(f"job {job_id} is still {job['status']} after {timeout_s:g} s")
        time.sleep(poll_s)


def kinds() -> list[dict[str, Any]]:
    out = []
    for name in jobs.kind_names():
        try:
            jk = jobs.get_kind(name)
        except Exception as e:  # a kind module under construction must not break the listing
            out.append({"kind": name, "error": f"{type(e).__name__}: {e}"})
            continue
        hints = typing.get_type_hints(jk.spec)
        fields = []
        for f in dataclasses.fields(jk.spec):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            default = None if required else (f.default if f.default is not dataclasses.MISSING
                                              else f.default_factory())
            fields.append({"name": f.name, "type": config.type_name(hints.get(f.name, Any)),
                           "default": default, "required": required,
                           "doc": (f.metadata or {}).get("doc", "")})
        summary_line = " ".join(jk.doc.split("\n\n")[0].split())  # the doc's first paragraph
        out.append({"kind": name, "lanes": list(jk.lanes), "doc": summary_line,
                    "fields": fields})
    return out


def log_path(job: dict[str, Any]) -> Path | None:
    return Path(job["run_dir"]) / "log.txt" if job.get("run_dir") else None


def logs(job_id: int, tail_lines: int | None = None, store: Store | None = None) -> dict[str, Any]:
    """A job's log as the adapters return it: id, status, host, path, line count and the text
    (its last `tail_lines` lines when given). A job that ran on another host has its log there."""
    job = show(job_id, store)
    path = log_path(job)
    text = path.read_text(errors="replace") if path is not None and path.exists() else ""
    lines = text.splitlines()
    if tail_lines is not None:
        text = "\n".join(lines[-tail_lines:])
    return {"id": job_id, "status": job["status"], "host": job.get("host"),
            "path": str(path) if path else None, "lines": len(lines), "log": text}


def cancel(job_id: int, reason: str, store: Store | None = None) -> dict[str, Any]:
    """Cancel a job: a waiting one at once, a running one by a request its supervisor acts on
    (SIGTERM to the process group, grace, SIGKILL). StateError for a job that already ended."""
    now = (store or open_store()).cancel(job_id, reason)
    return {"id": job_id, "status": now, "cancel_requested": now == "running"}


def retry(job_id: int, store: Store | None = None) -> dict[str, Any]:
    """Put a failed or cancelled job back in the queue (attempts from zero); the job as `show`."""
    store = store or open_store()
    store.retry(job_id)
    return show(job_id, store)
