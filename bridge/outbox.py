"""The GitHub bridge's tables: every write to GitHub is an outbox row first, sent later.

`lab_outbox` holds one row per thing the bridge wants to be true on an issue: a comment (created
once, then edited in place when its body changes) or a set of labels. A row is keyed by what it
means (`status:17`, `result:17`, `labels:12`, `invalid:12:ab12...`), so asking twice for the same
comment updates one row instead of adding a second; that is what makes "exactly once" a SQL
query (`SELECT job_id, count(*) FROM lab_outbox WHERE kind = 'result' GROUP BY job_id`).

Sending (bridge/github.py) counts the attempt BEFORE the request goes out: a process killed
mid-POST leaves `attempts > 0` and no comment id, and the next sender then looks for the row's
marker among the issue's comments before posting again.

The other tables: `lab_github_runs` ((issue, spec hash) -> job: what was enqueued and why),
`lab_github_issues` (per-issue cursors), `lab_github_state` (the issue list's ETag and
watermark, a pause after a rate limit and why, the last cycle's figures for `lab status`) and
`lab_leases` (one bridge at a time). All are defined
on `store.metadata`, so `Store.create_tables()` creates them.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    Integer,
    String,
    Table,
    Text,
    and_,
    delete,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from store import ACTIVE, Store, jobs, metadata, now

outbox = Table(
    "lab_outbox", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key", String(200), nullable=False, unique=True),  # what the write means
    Column("kind", String(16), nullable=False, index=True),  # status, result, labels, invalid, notice
    Column("op", String(16), nullable=False),  # "comment" or "labels"
    Column("issue", Integer, nullable=False, index=True),
    Column("job_id", Integer, index=True),
    Column("marker", Text),  # an HTML comment inside the body that finds it again on GitHub
    Column("source_at", Float),  # result rows: the job's finished_at they report (a retried job ends again)
    Column("body", Text),
    Column("labels_add", JSON),
    Column("labels_remove", JSON),
    Column("version", Integer, nullable=False),  # bumps whenever body or labels change
    Column("sent_version", Integer, nullable=False),  # the version GitHub has
    Column("comment_id", BigInteger),
    Column("status", String(16), nullable=False, index=True),  # pending, done, dead
    Column("attempts", Integer, nullable=False),  # requests started for the current version
    Column("posts", Integer, nullable=False),  # comment creations ever started: > 0 means look first
    Column("next_attempt_at", Float, nullable=False),
    Column("last_error", Text),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("sent_at", Float),
)

runs = Table(
    "lab_github_runs", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("issue", Integer, nullable=False, index=True),
    Column("spec_hash", String(64), nullable=False),
    Column("job_id", Integer),  # None between "decided to run" and "submitted" (see adopt_undecided)
    Column("reason", String(32), nullable=False),  # spec, rerun
    Column("actor", String(100)),
    Column("withdrawn", Boolean, nullable=False),  # cancelled by close/unlabel: a relabel runs it again
    Column("created_at", Float, nullable=False),
)

issues = Table(
    "lab_github_issues", metadata,
    Column("issue", Integer, primary_key=True),
    Column("comments_seen", Integer, nullable=False),  # the issue's comment count when last read
    Column("last_comment_id", BigInteger, nullable=False),  # `/rerun` comments up to here are handled
    Column("waiting", Text),  # a spec hash waiting for its `depends-on` issue to get a job
    Column("updated_at", Float, nullable=False),
)

state = Table(
    "lab_github_state", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

leases = Table(
    "lab_leases", metadata,
    Column("role", String(64), primary_key=True),
    Column("owner", String(200), nullable=False),
    Column("host", String(128), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("expires_at", Float, nullable=False),
)


class Outbox:
    """Rows of `lab_outbox` and the bridge's bookkeeping, over one Store's engine."""

    def __init__(self, store: Store):
        self.store = store
        store.create_tables()

    # --- queueing writes ---------------------------------------------------------------------

    def put_comment(self, key: str, kind: str, issue: int, marker: str, body: str,
                    job_id: int | None = None, editable: bool = True, source_at: float | None = None,
                    min_edit_interval: float = 0.0) -> bool:
        """Want a comment `body` on `issue`. A new key -> a pending row; an existing editable
        row whose body differs -> the new body, pending again; otherwise nothing. True if changed.

        `min_edit_interval`: an edit is due no sooner than this long after the last send. Bodies
        that arrive meanwhile replace each other in the row, so GitHub gets only the latest."""
        t = now()
        with self.store.transaction() as c:
            row = c.execute(select(outbox).where(outbox.c.key == key)).mappings().first()
            if row is None:
                c.execute(insert(outbox).values(
                    key=key, kind=kind, op="comment", issue=issue, job_id=job_id, marker=marker, body=body,
                    source_at=source_at, version=1, sent_version=0, status="pending", attempts=0, posts=0,
                    next_attempt_at=t, created_at=t, updated_at=t))
                return True
            if not editable or row["body"] == body:
                return False
            due = t
            if min_edit_interval and row["sent_at"] is not None:
                due = max(t, row["sent_at"] + min_edit_interval)
            c.execute(update(outbox).where(outbox.c.id == row["id"]).values(
                body=body, source_at=source_at, version=row["version"] + 1, status="pending", attempts=0,
                next_attempt_at=due, updated_at=t))
            return True

    def put_labels(self, key: str, issue: int, add: list[str], remove: list[str],
                   job_id: int | None = None) -> bool:
        """Want labels `add` on `issue` and `remove` off it. Replaces the wish of a previous call
        with the same key; labels the previous wish added and this one does not want are removed."""
        t = now()
        add, remove = sorted(set(add)), sorted(set(remove) - set(add))
        with self.store.transaction() as c:
            row = c.execute(select(outbox).where(outbox.c.key == key)).mappings().first()
            if row is None:
                c.execute(insert(outbox).values(
                    key=key, kind="labels", op="labels", issue=issue, job_id=job_id, labels_add=add,
                    labels_remove=remove, version=1, sent_version=0, status="pending", attempts=0, posts=0,
                    next_attempt_at=t, created_at=t, updated_at=t))
                return True
            old_add, old_remove = list(row["labels_add"] or []), list(row["labels_remove"] or [])
            if old_add == add and (row["status"] == "done" or old_remove == remove):
                return False
            # Undo what the old wish added (it may have reached GitHub even if unconfirmed).
            carried = old_add if row["status"] == "done" else old_add + old_remove
            remove = sorted((set(remove) | set(carried)) - set(add))
            c.execute(update(outbox).where(outbox.c.id == row["id"]).values(
                labels_add=add, labels_remove=remove, version=row["version"] + 1, status="pending",
                attempts=0, next_attempt_at=t, updated_at=t, job_id=job_id))
            return True

    def row(self, key: str) -> dict[str, Any] | None:
        with self.store.reading() as c:
            found = c.execute(select(outbox).where(outbox.c.key == key)).mappings().first()
        return dict(found) if found else None

    def dead(self, limit: int = 20) -> list[dict[str, Any]]:
        """Rows the sender gave up on (a 404, a 422, too many attempts), newest first."""
        q = select(outbox).where(outbox.c.status == "dead").order_by(outbox.c.updated_at.desc()).limit(limit)
        with self.store.reading() as c:
            return [dict(r) for r in c.execute(q).mappings()]

    def has(self, key: str) -> bool:
        with self.store.reading() as c:
            return c.execute(select(outbox.c.id).where(outbox.c.key == key)).first() is not None

    # --- sending -----------------------------------------------------------------------------

    def due(self, at: float | None = None, limit: int = 500) -> list[dict[str, Any]]:
        at = now() if at is None else at
        with self.store.reading() as c:
            rows = c.execute(select(outbox)
                             .where(outbox.c.status == "pending", outbox.c.next_attempt_at <= at)
                             .order_by(outbox.c.id).limit(limit)).mappings().all()
        return [dict(r) for r in rows]

    def next_due_at(self) -> float | None:
        with self.store.reading() as c:
            rows = c.execute(select(outbox.c.next_attempt_at).where(outbox.c.status == "pending")
                             .order_by(outbox.c.next_attempt_at).limit(1)).first()
        return rows[0] if rows else None

    def begin_attempt(self, row_id: int, creating: bool) -> None:
        """Count the attempt before the request leaves: a crash mid-request stays visible."""
        values: dict[str, Any] = dict(attempts=outbox.c.attempts + 1, updated_at=now())
        if creating:
            values["posts"] = outbox.c.posts + 1
        with self.store.transaction() as c:
            c.execute(update(outbox).where(outbox.c.id == row_id).values(**values))

    def forget_comment(self, row_id: int) -> None:
        """The comment is gone from GitHub (deleted by a person): create it again."""
        with self.store.transaction() as c:
            c.execute(update(outbox).where(outbox.c.id == row_id).values(comment_id=None, posts=0))

    def set_comment_id(self, row_id: int, comment_id: int) -> None:
        with self.store.transaction() as c:
            c.execute(update(outbox).where(outbox.c.id == row_id).values(comment_id=comment_id))

    def mark_sent(self, row_id: int, version: int, comment_id: int | None = None) -> None:
        """GitHub has `version`; the row is done unless a newer version arrived meanwhile."""
        t = now()
        values: dict[str, Any] = dict(sent_version=version, sent_at=t, updated_at=t, last_error=None)
        if comment_id is not None:
            values["comment_id"] = comment_id
        with self.store.transaction() as c:
            c.execute(update(outbox).where(outbox.c.id == row_id).values(**values))
            c.execute(update(outbox).where(outbox.c.id == row_id, outbox.c.version == version)
                      .values(status="done", attempts=0))

    def mark_failed(self, row_id: int, error: str, retry_at: float, give_up: bool) -> None:
        with self.store.transaction() as c:
            c.execute(update(outbox).where(outbox.c.id == row_id).values(
                last_error=error[:2000], next_attempt_at=retry_at, updated_at=now(),
                status="dead" if give_up else "pending"))

    def rows(self, issue: int | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        q = select(outbox).order_by(outbox.c.id)
        if issue is not None:
            q = q.where(outbox.c.issue == issue)
        if kind is not None:
            q = q.where(outbox.c.kind == kind)
        with self.store.reading() as c:
            return [dict(r) for r in c.execute(q).mappings()]

    def counts(self) -> dict[str, int]:
        out = {"pending": 0, "done": 0, "dead": 0}
        for r in self.rows():
            out[r["status"]] = out.get(r["status"], 0) + 1
        return out

    # --- (issue, spec hash) -> job -------------------------------------------------------------

    def ran(self, issue: int, spec_hash: str) -> bool:
        """Was this spec of this issue enqueued (and not withdrawn by close/unlabel)?"""
        with self.store.reading() as c:
            return c.execute(select(runs.c.id).where(runs.c.issue == issue, runs.c.spec_hash == spec_hash,
                                                     runs.c.withdrawn.is_(False))).first() is not None

    def decide_run(self, issue: int, spec_hash: str, reason: str, actor: str | None,
                   cursor: dict[str, Any] | None = None) -> int:
        """Record "this issue runs this spec" BEFORE submitting, in one transaction with the
        issue's comment cursor, so a crash between the two can neither lose nor double a run."""
        t = now()
        with self.store.transaction() as c:
            run_id = c.execute(insert(runs).values(
                issue=issue, spec_hash=spec_hash, job_id=None, reason=reason, actor=actor, withdrawn=False,
                created_at=t)).inserted_primary_key[0]
            if cursor:
                if not c.execute(update(issues).where(issues.c.issue == issue)
                                 .values(updated_at=t, **cursor)).rowcount:
                    row = {"comments_seen": 0, "last_comment_id": 0, "waiting": None, **cursor}
                    c.execute(insert(issues).values(issue=issue, updated_at=t, **row))
        return int(run_id)

    def set_run_job(self, run_id: int, job_id: int) -> None:
        with self.store.transaction() as c:
            c.execute(update(runs).where(runs.c.id == run_id).values(job_id=job_id))

    def undecided_runs(self) -> list[dict[str, Any]]:
        """Runs decided but not known to be submitted (a crash in between)."""
        with self.store.reading() as c:
            return [dict(r) for r in c.execute(select(runs).where(runs.c.job_id.is_(None))).mappings()]

    def drop_run(self, run_id: int) -> None:
        with self.store.transaction() as c:
            c.execute(delete(runs).where(runs.c.id == run_id))

    def withdraw(self, issue: int) -> None:
        with self.store.transaction() as c:
            c.execute(update(runs).where(runs.c.issue == issue).values(withdrawn=True))

    def run_of_job(self, job_id: int) -> dict[str, Any] | None:
        """The run that started `job_id`: its spec hash, why (spec, rerun, run) and who approved it."""
        q = select(runs.c.spec_hash, runs.c.reason, runs.c.actor).where(runs.c.job_id == job_id)
        with self.store.reading() as c:
            row = c.execute(q).first()
        return dict(row._mapping) if row else None

    def issue_jobs(self, issue: int) -> list[int]:
        """Jobs the bridge started for `issue`, oldest first."""
        q = select(runs.c.job_id).where(runs.c.issue == issue, runs.c.job_id.is_not(None)).order_by(runs.c.id)
        with self.store.reading() as c:
            return [r[0] for r in c.execute(q)]

    def jobs_to_report(self) -> list[dict[str, Any]]:
        """Jobs linked to an issue that are active, or finished without a result row for this
        finish (a retried job finishes again: its result comment is then edited in place)."""
        r = outbox.alias("r")
        q = (select(jobs).select_from(jobs.outerjoin(r, and_(r.c.job_id == jobs.c.id, r.c.kind == "result")))
             .where(jobs.c.issue.is_not(None),
                    or_(jobs.c.status.in_(ACTIVE), r.c.id.is_(None),
                        r.c.source_at.is_distinct_from(jobs.c.finished_at)))
             .order_by(jobs.c.id))
        with self.store.reading() as c:
            return [dict(row) for row in c.execute(q).mappings()]

    # --- per-issue cursors -------------------------------------------------------------------

    def issue_state(self, issue: int) -> dict[str, Any]:
        with self.store.reading() as c:
            row = c.execute(select(issues).where(issues.c.issue == issue)).mappings().first()
        if row is None:
            return {"issue": issue, "comments_seen": 0, "last_comment_id": 0, "waiting": None}
        return dict(row)

    def set_issue_state(self, issue: int, **values: Any) -> None:
        t = now()
        with self.store.transaction() as c:
            n = c.execute(update(issues).where(issues.c.issue == issue)
                          .values(updated_at=t, **values)).rowcount
            if not n:
                row = {"comments_seen": 0, "last_comment_id": 0, "waiting": None, **values}
                c.execute(insert(issues).values(issue=issue, updated_at=t, **row))

    def waiting_issues(self) -> list[int]:
        with self.store.reading() as c:
            return [r[0] for r in c.execute(select(issues.c.issue).where(issues.c.waiting.is_not(None)))]

    # --- small key/value state -------------------------------------------------------------------

    def get_state(self, key: str, default: Any = None) -> Any:
        with self.store.reading() as c:
            row = c.execute(select(state.c.value).where(state.c.key == key)).first()
        return json.loads(row[0]) if row else default

    def set_state(self, key: str, value: Any) -> None:
        text = json.dumps(value)
        with self.store.transaction() as c:
            if not c.execute(update(state).where(state.c.key == key).values(value=text)).rowcount:
                c.execute(insert(state).values(key=key, value=text))

    # --- one bridge at a time --------------------------------------------------------------------

    def acquire_lease(self, role: str, owner: str, ttl: float, host: str | None = None) -> bool:
        """Take or renew `role` for `owner`. A lease is free when it expired, or when its holder
        was a process on this host that no longer exists (a kill -9 frees it at once)."""
        host = host or socket.gethostname()
        t = now()
        values = dict(owner=owner, host=host, pid=os.getpid(), expires_at=t + ttl)
        with self.store.transaction() as c:
            row = c.execute(select(leases).where(leases.c.role == role)).mappings().first()
            if row is None:
                try:
                    with c.begin_nested():
                        c.execute(insert(leases).values(role=role, **values))
                    return True
                except IntegrityError:
                    return False
            free = (row["owner"] == owner or row["expires_at"] < t
                    or (row["host"] == host and not _pid_alive(row["pid"])))
            if not free:
                return False
            same = and_(leases.c.role == role, leases.c.owner == row["owner"],
                        leases.c.expires_at == row["expires_at"])
            n = c.execute(update(leases).where(same).values(**values)).rowcount
            return bool(n)

    def release_lease(self, role: str, owner: str) -> None:
        with self.store.transaction() as c:
            c.execute(delete(leases).where(leases.c.role == role, leases.c.owner == owner))

    def lease(self, role: str) -> dict[str, Any] | None:
        with self.store.reading() as c:
            row = c.execute(select(leases).where(leases.c.role == role)).mappings().first()
        return dict(row) if row else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

