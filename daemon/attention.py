"""`lab next`: what needs the agent's (or the person's) attention, ranked, each with the exact
command (and MCP call) that deals with it.

Rank 0 is what stops the lab (queued work and no daemon alive, the disk guard); then what the
lab asked a person to decide (a stopped idea, a spec marked needs-fix, GitHub writes the bridge
gave up on); then what failed; then records owed (a finished ablation without a finding). Items
come from the store alone, so the CLI, MCP and `lab agent` see the same list. An item stays
until what it points at changes (the job is retried, the finding written) or it is dismissed
(`lab next --dismiss KEY --reason TEXT`, recorded in `lab_dismissed`).

The bridge's tables (`lab_outbox`, `lab_github_runs`) belong to bridge/, which sits above this
room: they are read here by SQL, only when they exist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import inspect, text

import config
from store import ACTIVE, Store, iso


def _open() -> Store:
    return Store(config.paths().db)


def needs_attention(store: Store | None = None) -> dict[str, Any]:
    """{"items": [...] ranked, "running": [...], "empty": bool, "summary": str}."""
    from daemon import service

    store = store or _open()
    dismissed = store.dismissed()
    items: list[dict[str, Any]] = []
    items += _no_daemon(store)
    items += _disk(store)
    items += _stopped_pipelines(store)
    items += _needs_fix(store)
    items += _dead_outbox(store)
    items += _failed_jobs(store)
    items += _unrecorded_ablations(store)
    items = [i for i in items if i["key"] not in dismissed]
    items.sort(key=lambda i: (i["rank"], -(i.get("at") or 0)))
    for i in items:
        i["at"] = iso(i.get("at")) if isinstance(i.get("at"), (int, float)) else i.get("at")
    running = [service.summary(j) for j in store.list_jobs(("running",))]
    queued = len(store.list_jobs(("queued", "blocked")))
    if items:
        summary = f"{len(items)} item(s) need attention; the first: {items[0]['reason']}"
    elif running:
        ends = [_eta(j) for j in running]
        summary = "nothing needs attention; running: " + ", ".join(
            f"job {j['id']} {j['kind']}" + (f" (ends in ~{e:.0f} s)" if e is not None else "")
            for j, e in zip(running, ends, strict=True))
    else:
        summary = "nothing needs attention" + (f"; {queued} job(s) wait in the queue" if queued
                                               else "; the queue is empty")
    return {"items": items, "running": running, "queued": queued, "empty": not items, "summary": summary}


def _eta(job: dict[str, Any]) -> float | None:
    eta = (job.get("progress") or {}).get("eta_s")
    return float(eta) if isinstance(eta, (int, float)) else None


def _item(key: str, rank: int, kind: str, reason: str, command: str, tool: str,
          arguments: dict[str, Any], at: float | None = None, **extra: Any) -> dict[str, Any]:
    return {"key": key, "rank": rank, "kind": kind, "reason": reason, "command": command,
            "mcp": {"tool": tool, "arguments": arguments}, "at": at, **extra}


def _no_daemon(store: Store) -> list[dict[str, Any]]:
    from daemon.service import no_daemon_for

    waiting = store.list_jobs(ACTIVE)
    for job in waiting:
        why = no_daemon_for(job, store)
        if why:
            return [_item("daemon", 0, "no-daemon", f"{len(waiting)} job(s) wait and {why.split('; ')[0]}",
                          "lab daemon   # or: systemctl --user start lab  (ask the person)", "status", {})]
    return []


def _disk(store: Store) -> list[dict[str, Any]]:
    from daemon.disk import disk_status

    disk = disk_status(Path(config.paths().runs).expanduser().resolve(), config.queue_config())
    if disk["ok"]:
        return []
    return [_item("disk", 0, "disk-guard", disk["reason"],
                  "lab submit archive --set older_than_days=14 --json   # then lab next", "submit",
                  {"kind": "archive", "set": {"older_than_days": 14}})]


def _stopped_pipelines(store: Store) -> list[dict[str, Any]]:
    out = []
    for p in store.list_pipelines(("stopped",), limit=50):
        outcome = p["outcome"] or {}
        if outcome.get("graveyard"):
            reason = (f"idea pipeline {p['id']} stopped: {p['reason']}; publish its drafted finding and add "
                      "its graveyard line to docs/ROADMAP.md")
            command = (f"lab finding {outcome['ablation']} --title \"...\" --json   "
                       f"# see lab pipeline {p['id']}")
            tool, args = "finding", {"job_id": outcome["ablation"], "title": "..."}
        else:
            reason = f"idea pipeline {p['id']} stopped: {p['reason']}"
            command = f"lab pipeline {p['id']} --rerun --json   # once the cause is fixed"
            tool, args = "pipeline", {"pipeline_id": p["id"], "rerun": True}
        out.append(_item(f"pipeline:{p['id']}", 1, "pipeline-stopped", reason, command, tool, args,
                         at=p["finished_at"], pipeline=p["id"], issue=p["issue"]))
    return out


def _bridge_tables(store: Store) -> set[str]:
    return set(inspect(store.engine).get_table_names()) & {"lab_outbox", "lab_github_runs"}


def _needs_fix(store: Store) -> list[dict[str, Any]]:
    if "lab_outbox" not in _bridge_tables(store):
        return []
    q = text("SELECT o.issue, max(o.created_at) AS at FROM lab_outbox o WHERE o.kind = 'invalid' "
             "GROUP BY o.issue")
    with store.reading() as c:
        rows = c.execute(q).all()
        later = {}
        if "lab_github_runs" in _bridge_tables(store):
            runs = text("SELECT issue, max(created_at) FROM lab_github_runs GROUP BY issue")
            later = dict(c.execute(runs).all())
    out = []
    for issue, at in rows:
        if later.get(issue) is not None and later[issue] > at:
            continue  # fixed: a spec of that issue ran since
        out.append(_item(f"needs-fix:{issue}", 1, "needs-fix",
                         f"issue #{issue}'s spec is invalid (labelled needs-fix): its comment names "
                         "the field",
                         f"gh issue view {issue} --comments   # fix the spec block in the issue body",
                         "status", {}, at=at, issue=issue))
    return out


def _dead_outbox(store: Store) -> list[dict[str, Any]]:
    if "lab_outbox" not in _bridge_tables(store):
        return []
    q = text("SELECT id, key, issue, last_error, updated_at FROM lab_outbox WHERE status = 'dead' "
             "ORDER BY id DESC LIMIT 20")
    with store.reading() as c:
        rows = c.execute(q).all()
    return [_item(f"outbox:{row_id}", 1, "github-gave-up",
                  f"the bridge gave up writing {key} on issue #{issue}: {err}",
                  "lab status --json   # the bridge's state; fix the cause (token, permissions), then "
                  "lab github sync --once", "status", {}, at=at, issue=issue)
            for row_id, key, issue, err, at in rows]


def _failed_jobs(store: Store) -> list[dict[str, Any]]:
    import time

    since = time.time() - config.queue_config().attention_days * 86_400
    out = []
    for job in store.list_jobs(("failed",), newest_first=True, limit=100):
        if (job["finished_at"] or 0) < since or store.pipeline_of_job(job["id"]):
            continue  # a pipeline's failed stage is the pipeline's item
        error = (job["error"] or "no reason recorded").splitlines()[0][:300]
        out.append(_item(f"job:{job['id']}", 2, "job-failed",
                         f"job {job['id']} ({job['kind']}) failed: {error}",
                         f"lab logs {job['id']}   # then fix the cause and: lab retry {job['id']} --json",
                         "logs", {"job_id": job["id"]}, at=job["finished_at"], job=job["id"]))
    return out


def _unrecorded_ablations(store: Store) -> list[dict[str, Any]]:
    import time

    from records import finding_for_job

    since = time.time() - config.queue_config().attention_days * 86_400
    out = []
    for job in store.list_jobs(("succeeded",), kind="ablation", newest_first=True, limit=100):
        if (job["finished_at"] or 0) < since or (job["spec"] or {}).get("control"):
            continue  # a control checks the instrument; it is no finding
        if finding_for_job(str(job["id"])) is not None:
            continue
        verdict = (job["result"] or {}).get("verdict")
        out.append(_item(f"finding:{job['id']}", 3, "finding-owed",
                         f"ablation job {job['id']} ended ({verdict} on "
                         f"{(job['result'] or {}).get('primary')}) "
                         "and has no finding: every conclusion gets one, inconclusive ones too",
                         f"lab finding {job['id']} --title \"one claim\" --json", "finding",
                         {"job_id": job["id"], "title": "one claim"}, at=job["finished_at"], job=job["id"]))
    return out


def dismiss(key: str, reason: str, store: Store | None = None) -> dict[str, Any]:
    """Take an item off the list for good (until its key comes back with a new meaning)."""
    from config import ConfigError

    if not key or len(key) > 200 or not key.isprintable():
        raise ConfigError(f"--dismiss: {key!r} is not an item key (the `key` of a `lab next` item)")
    if not reason.strip():
        raise ConfigError("--reason: say why the item needs no action (it is recorded)")
    store = store or _open()
    store.dismiss(key, reason.strip())
    return {"dismissed": key, "reason": reason.strip()}
