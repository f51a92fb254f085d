"""The queue's operations as the CLI, the GitHub bridge and the MCP server use them.

`submit` validates everything before a row is written (kind, spec keys and types through the
kind's Spec, lane, dependency, the rtx2060 gate); any problem is a `config.ConfigError` whose
one-line message names the field, and nothing is queued. `status`, `wait` and `kinds` read the
store; none of this needs a running daemon.
"""

from __future__ import annotations

import dataclasses
import time
import typing
from pathlib import Path
from typing import Any

import config
import jobs
from config import ConfigError
from jobs.paths import check_spec_paths
from store import ACTIVE, FINAL, Store, iso, public

# Priorities order jobs within a lane; a bound keeps one caller from outranking every job forever
# with a number no person would type.
PRIORITY_LIMIT = 1000


class GateError(ConfigError):
    """A full GPU run that was not earned by an ablation (nor forced with a reason)."""


class WaitTimeout(Exception):
    pass


def open_store() -> Store:
    return Store(config.paths().db)


def check_gate(store: Store, kind: str, lane: str, spec: dict[str, Any], earned_by: int | None,
               force: bool, reason: str | None) -> None:
    """A `train` job with the rtx2060 preset on the GPU lane must be earned: `earned_by` names a
    succeeded ablation whose verdict was `better`, or `force` comes with a reason."""
    if force and not (reason or "").strip():
        raise GateError("--force: needs --reason TEXT (it is recorded with the job)")
    if earned_by is not None:
        earner = store.get(earned_by)
        if earner is None:
            raise GateError(f"--earned-by: job {earned_by} does not exist")
    if not (kind == "train" and lane == "gpu" and spec.get("preset") == config.GATED_PRESET):
        return
    if force:
        return
    if earned_by is None:
        raise GateError(f"--earned-by: a train job with preset {config.GATED_PRESET} on the gpu lane must be "
                        "earned: give --earned-by ABLATION_JOB (a succeeded ablation with verdict "
                        "better) or --force --reason TEXT")
    if earner["kind"] != "ablation":  # type: ignore[index]
        raise GateError(f"--earned-by: job {earned_by} is a {earner['kind']} job, not an ablation")  # type: ignore[index]
    if earner["status"] != "succeeded":  # type: ignore[index]
        raise GateError(f"--earned-by: ablation {earned_by} is {earner['status']}, not succeeded")  # type: ignore[index]
    verdict = (earner["result"] or {}).get("verdict")  # type: ignore[index]
    if verdict != "better":
        raise GateError(f"--earned-by: ablation {earned_by} has verdict {verdict!r}, not 'better'")


def submit(kind: str, values: dict[str, Any], *, lane: str | None = None, after: int | None = None,
           priority: int = 0, timeout_s: float | None = None, issue: int | None = None,
           earned_by: int | None = None, force: bool = False, reason: str | None = None,
           host: str | None = None, source: str = "cli", held: str | None = None,
           store: Store | None = None) -> dict[str, Any]:
    """Validate and queue one job; returns it as `lab show` prints it."""
    store = store or open_store()
    q = config.queue_config()
    lane = jobs.check_lane(kind, lane)
    # Before the Spec looks at any file: only files in the checkout's allowed roots, never a
    # dotfile or the queue database, and runs by id (jobs/paths.py); the job checks it again.
    check_spec_paths(kind, values)
    spec = jobs.spec_to_dict(jobs.parse_spec(kind, values))
    if after is not None and store.get(after) is None:
        raise ConfigError(f"--after: job {after} does not exist")
    if isinstance(priority, bool) or not isinstance(priority, int) or abs(priority) > PRIORITY_LIMIT:
        raise ConfigError(f"--priority: {priority!r} is out of range (allowed: -{PRIORITY_LIMIT} to "
                          f"{PRIORITY_LIMIT})")
    if issue is not None and (isinstance(issue, bool) or not isinstance(issue, int) or not 0 < issue < 2**31):
        raise ConfigError(f"--issue: {issue!r} is not an issue number")
    if timeout_s is not None and not 0 < timeout_s <= 30 * 86_400:
        raise ConfigError(f"--timeout: {timeout_s!r} is out of range (allowed: (0, 2592000] seconds)")
    check_gate(store, kind, lane, spec, earned_by, force, reason)
    if host is not None:
        host = host.strip()
        if not host or len(host) > 128:
            raise ConfigError(f"--host: {host!r} is not a host name (LAB_HOST of a daemon, 1-128 characters)")
    job_id = store.submit(
        kind, lane, spec, priority=priority, after=after,
        timeout_s=timeout_s or q.default_timeout_seconds, max_attempts=q.max_attempts, issue=issue,
        earned_by=earned_by, force_reason=reason.strip() if force and reason else None,
        want_host=host, source=source, held=held)
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
    if events:
        out["events"] = [{"at": iso(e["at"]), "kind": e["kind"], "message": e["message"]}
                         for e in store.events(job_id)]
    return out


def summary(job: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "kind", "lane", "status", "priority", "progress", "host", "created_at", "started_at",
            "finished_at", "error", "after", "issue", "attempts")
    p = public(job)
    return {k: p.get(k) for k in keys}


def status(store: Store | None = None) -> dict[str, Any]:
    """What runs, what waits, progress and ETA, the daemons, the disk guard."""
    from daemon.scheduler import disk_status  # huey import only where status is asked for

    store = store or open_store()
    q = config.queue_config()
    active = store.list_jobs(ACTIVE)
    recent = store.list_jobs(FINAL, limit=10, newest_first=True)
    alive = store.daemons(alive_within=max(3 * q.heartbeat_seconds, q.lease_seconds))
    disk = disk_status(Path(config.paths().runs).expanduser().resolve(), q)
    paused = next((d["paused"] for d in alive if d["paused"]), None) or disk["reason"]
    lanes: dict[str, Any] = {}
    for lane in jobs.LANES:
        mine = [j for j in active if j["lane"] == lane]
        lanes[lane] = {
            "running": [summary(j) for j in mine if j["status"] == "running"],
            "queued": sum(j["status"] == "queued" for j in mine),
            "blocked": sum(j["status"] == "blocked" for j in mine),
            "paused": paused if lane == "gpu" else None,
        }
    daemons = [{"id": d["id"], "host": d["host"], "pid": d["pid"], "lanes": d["lanes"].split(","),
                "heartbeat": iso(d["heartbeat_at"]), "paused": d["paused"]} for d in alive]
    newest = alive[0] if alive else None
    daemon = {"alive": bool(alive), "host": newest and newest["host"], "pid": newest and newest["pid"],
              "heartbeat": newest and iso(newest["heartbeat_at"]), "count": len(alive)}
    return {"lanes": lanes, "jobs": [summary(j) for j in active + recent], "daemon": daemon,
            "daemons": daemons, "hosts": host_view(store, active, alive), "disk": disk}




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
         poll_s: float = 0.2) -> dict[str, Any]:
    """Block until the job is final; WaitTimeout after `timeout_s`."""
    store = store or open_store()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        job = store.get(job_id)
        if job is None:
            raise ConfigError(f"job {job_id}: no such job")
        if job["status"] in FINAL:
            return public(job)
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
