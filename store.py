"""The queue's tables (`lab_*`) and the only code that writes them.

The `lab_jobs` row is the truth about a job; huey only carries "run job N now" messages, and it
forgets a message once dequeued. Every state change below is ONE transaction whose UPDATE checks
the state it comes from (`WHERE id = ? AND status = 'queued'`), so two daemons cannot both start
a job, and a stale process cannot overwrite a newer attempt (`AND attempts = ?` fences it).

States: queued -> running -> succeeded | failed | cancelled; blocked -> queued (the job it waits
on succeeded) or cancelled (it failed); a running job whose lease expired goes back to queued
(attempts counts the claims; at max_attempts it fails instead).

Lease: a running job holds (lease_owner, host, heartbeat_at, lease_expires_at). The daemon that
claimed it and the job's own process both renew it, so a job that outlives its daemon keeps its
lease and finishes; whoever finds an expired lease requeues the job (`sweep_expired`).

Times are float seconds since the epoch (UTC) in the database, which keeps lease arithmetic and
SQL portable; `public()` turns them into ISO 8601 UTC strings for people and agents. Hosts are
assumed to have synchronised clocks (NTP) when several share one database.

Engine: `LAB_DB` is a path (SQLite: WAL, a busy timeout, and write transactions that take the
write lock at BEGIN so two processes never deadlock on a lock upgrade) or a SQLAlchemy URL
(`postgresql+psycopg://...`). Nothing outside `make_engine` knows which. Other modules (the
GitHub bridge) add their own tables to `metadata` and call `Store.create_tables()`.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    create_engine,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

STATUSES = ("queued", "blocked", "running", "succeeded", "failed", "cancelled")
FINAL = ("succeeded", "failed", "cancelled")
ACTIVE = ("queued", "blocked", "running")

metadata = MetaData()

jobs = Table(
    "lab_jobs", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(64), nullable=False),
    Column("lane", String(8), nullable=False),
    Column("status", String(16), nullable=False, index=True),
    Column("spec", JSON, nullable=False),
    Column("priority", Integer, nullable=False, default=0),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("claimed_at", Float),  # the lease was taken (the process may still wait for the GPU lock)
    Column("started_at", Float),  # the job's process holds its lane (GPU lock) and runs
    Column("finished_at", Float),
    Column("attempts", Integer, nullable=False, default=0),  # claims so far
    Column("max_attempts", Integer, nullable=False),
    Column("exit_code", Integer),  # negative: killed by that signal
    Column("error", Text),
    Column("result", JSON),
    Column("progress", JSON),  # {"step", "total", "eta_s", "metrics", "at"}
    Column("after_id", Integer),  # run only after this job succeeded
    Column("timeout_s", Float, nullable=False),
    Column("lease_owner", String(160)),  # the daemon instance that claimed the running attempt
    Column("host", String(128)),  # where it runs / ran (run files stay there)
    Column("want_host", String(128)),  # only this host may claim it (None: any)
    Column("heartbeat_at", Float),
    Column("lease_expires_at", Float),
    Column("pid", Integer),  # the job's process (leader of its process group) on `host`
    Column("run_dir", Text),
    Column("issue", Integer),  # the GitHub issue the job answers to
    Column("source", String(32)),  # cli, github, mcp, ...
    Column("earned_by", Integer),  # the ablation job that earned a full GPU run
    Column("force_reason", Text),  # ... or why the gate was forced
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("cancel_reason", Text),
    Column("held", Text),  # a reason that keeps the job blocked (e.g. GitHub `blocked` label)
)

events = Table(
    "lab_events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", Integer, nullable=False, index=True),
    Column("at", Float, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("message", Text, nullable=False),
)

# One row per daemon process ever started: liveness for `lab status`, and which huey queues died.
daemons = Table(
    "lab_daemons", metadata,
    Column("id", String(160), primary_key=True),
    Column("host", String(128), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("lanes", String(32), nullable=False),
    Column("cpu_workers", Integer, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("heartbeat_at", Float, nullable=False),
    Column("stopped_at", Float),
    Column("paused", Text),  # why the GPU lane takes no new job (disk guard), None if it does
)

# One row per host: the row lock that serialises GPU claims on that host (Postgres row lock,
# SQLite write lock), so two daemons on one host cannot both see "no GPU job running".
# An idea's pipeline (daemon/pipeline.py): smoke -> ablation -> full run, one stage at a time.
# `version` fences every transition the way `status` fences a job's: the next stage is inserted
# in the same transaction that moves the pipeline on, so it exists exactly once.
pipelines = Table(
    "lab_pipelines", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("spec", JSON, nullable=False),  # the validated idea
    Column("spec_hash", String(64), nullable=False),
    Column("lane", String(8), nullable=False),  # the smoke stage's lane (the issue's label)
    Column("stage", String(16), nullable=False),  # smoke, ablation, full
    Column("round", Integer, nullable=False),  # 1, then + 1 each time a stage is run again
    Column("status", String(16), nullable=False, index=True),  # running, succeeded, stopped, cancelled
    Column("version", Integer, nullable=False),
    Column("reason", Text),  # what the last decision was, and why
    Column("outcome", JSON),  # a stop's drafted finding and graveyard line; a full run's grid
    Column("issue", Integer, index=True),
    Column("source", String(32)),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("finished_at", Float),
)

pipeline_jobs = Table(
    "lab_pipeline_jobs", metadata,
    Column("job_id", Integer, primary_key=True),
    Column("pipeline_id", Integer, nullable=False, index=True),
    Column("stage", String(16), nullable=False),
    Column("round", Integer, nullable=False),
    Column("role", String(32), nullable=False),  # main, or control:negative / control:positive
)

# Items of `lab next` (daemon/attention.py) someone said need no action, by the item's key.
dismissed = Table(
    "lab_dismissed", metadata,
    Column("key", String(200), primary_key=True),
    Column("reason", Text, nullable=False),
    Column("at", Float, nullable=False),
)

PIPELINE_STAGES = ("smoke", "ablation", "full")
PIPELINE_ACTIVE = ("running",)

hosts = Table(
    "lab_hosts", metadata,
    Column("host", String(128), primary_key=True),
    Column("gpu_claimed_at", Float),
)


def now() -> float:
    return time.time()


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def db_url(db: str) -> str:
    """A LAB_DB value -> a SQLAlchemy URL: URLs pass through, paths become sqlite:///ABS."""
    if "://" in db:
        return db
    return f"sqlite:///{Path(db).expanduser().resolve()}"


def make_engine(db: str) -> Engine:
    url = db_url(db)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _rec: Any) -> None:
            # Let SQLAlchemy's begin event (below) issue BEGIN itself, not the driver.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout = 30000")
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute("PRAGMA synchronous = NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            # Writers take the lock up front: a deferred transaction that reads and then writes
            # fails at once (SQLITE_BUSY) in WAL mode instead of waiting for the busy timeout.
            read_only = conn.get_execution_options().get("lab_read", False)
            conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True)


class StateError(ValueError):
    """The job is not in a state that allows this (cancel a finished job, retry a running one)."""


# The widest integer a job id column holds (SQLite and Postgres BIGINT: signed 64 bits). A larger
# id (`lab show 99999999999999999999`) names no job; handed to the driver it raises OverflowError.
MAX_ID = 2**63 - 1


def storable_id(job_id: int) -> bool:
    """Whether `job_id` could be a row's id at all (an int, not bool, within 64 bits)."""
    return isinstance(job_id, int) and not isinstance(job_id, bool) and -MAX_ID - 1 <= job_id <= MAX_ID


class Store:
    def __init__(self, db: str, create: bool = True):
        self.url = db_url(db)
        self.engine = make_engine(db)
        if create:
            self.create_tables()

    def create_tables(self) -> None:
        for attempt in range(5):
            try:
                metadata.create_all(self.engine)
                return
            except (OperationalError, ProgrammingError, IntegrityError):
                # Two processes creating the schema at once (Postgres): the loser retries.
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def dispose(self) -> None:
        self.engine.dispose()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A write transaction: every statement inside commits together or not at all. Tables
        defined beside the store (the GitHub outbox's) are written through it too."""
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        """A read-only transaction (a consistent snapshot; SQLite takes no write lock)."""
        with self.engine.connect() as conn:
            conn.execution_options(lab_read=True)
            with conn.begin():
                yield conn

    @staticmethod
    def _event(conn: Connection, job_id: int, kind: str, message: str) -> None:
        conn.execute(insert(events).values(job_id=job_id, at=now(), kind=kind, message=message))

    # --- submit and read -----------------------------------------------------------------

    def submit(self, kind: str, lane: str, spec: dict[str, Any], *, priority: int = 0,
               after: int | None = None, timeout_s: float, max_attempts: int,
               issue: int | None = None, earned_by: int | None = None,
               force_reason: str | None = None, want_host: str | None = None,
               source: str = "cli", held: str | None = None) -> int:
        """Insert a job (already validated by the caller): queued, or blocked when it waits on
        another job or is held."""
        with self.transaction() as c:
            return self._insert_job(c, kind, lane, spec, priority=priority, after=after,
                                    timeout_s=timeout_s, max_attempts=max_attempts, issue=issue,
                                    earned_by=earned_by, force_reason=force_reason,
                                    want_host=want_host, source=source, held=held)

    def _insert_job(self, c: Connection, kind: str, lane: str, spec: dict[str, Any], *, priority: int = 0,
                    after: int | None = None, timeout_s: float, max_attempts: int,
                    issue: int | None = None, earned_by: int | None = None,
                    force_reason: str | None = None, want_host: str | None = None,
                    source: str = "cli", held: str | None = None) -> int:
        t = now()
        status = "queued"
        if held:
            status = "blocked"
        elif after is not None:
            dep = c.execute(select(jobs.c.status).where(jobs.c.id == after)).scalar()
            if dep != "succeeded":
                status = "blocked"
        job_id = c.execute(insert(jobs).values(
            kind=kind, lane=lane, status=status, spec=spec, priority=priority, created_at=t,
            updated_at=t, attempts=0, max_attempts=max_attempts, after_id=after,
            timeout_s=timeout_s, issue=issue, earned_by=earned_by, force_reason=force_reason,
            want_host=want_host, source=source, cancel_requested=False, held=held,
        )).inserted_primary_key[0]
        self._event(c, job_id, "submitted", f"{kind} on lane {lane} ({status})")
        return int(job_id)

    def dismiss(self, key: str, reason: str) -> None:
        with self.transaction() as c:
            c.execute(delete(dismissed).where(dismissed.c.key == key))
            c.execute(insert(dismissed).values(key=key, reason=reason, at=now()))

    def dismissed(self) -> dict[str, str]:
        with self.reading() as c:
            return {k: r for k, r in c.execute(select(dismissed.c.key, dismissed.c.reason))}

    # --- pipelines (daemon/pipeline.py decides; these make each decision one transaction) ------

    def create_pipeline(self, spec: dict[str, Any], spec_hash: str, lane: str, stage: str,
                        stage_jobs: list[dict[str, Any]], issue: int | None = None,
                        source: str = "cli") -> tuple[int, list[int]]:
        """A pipeline and its first stage's jobs, in one transaction. Each of `stage_jobs` is
        `_insert_job`'s keywords plus `role`."""
        t = now()
        with self.transaction() as c:
            pid = int(c.execute(insert(pipelines).values(
                spec=spec, spec_hash=spec_hash, lane=lane, stage=stage, round=1, status="running",
                version=1, reason=f"{stage} started", issue=issue, source=source, created_at=t,
                updated_at=t)).inserted_primary_key[0])
            ids = self._insert_stage(c, pid, stage, 1, stage_jobs)
        return pid, ids

    def _insert_stage(self, c: Connection, pid: int, stage: str, round_: int,
                      stage_jobs: list[dict[str, Any]]) -> list[int]:
        ids = []
        for kw in stage_jobs:
            kw = dict(kw)
            role = kw.pop("role", "main")
            job_id = self._insert_job(c, **kw)
            c.execute(insert(pipeline_jobs).values(job_id=job_id, pipeline_id=pid, stage=stage,
                                                   round=round_, role=role))
            self._event(c, job_id, "pipeline", f"pipeline {pid}: stage {stage} ({role})")
            ids.append(job_id)
        return ids

    def move_pipeline(self, pid: int, version: int, *, stage: str | None = None,
                      stage_jobs: list[dict[str, Any]] | None = None, status: str = "running",
                      reason: str | None = None, outcome: dict[str, Any] | None = None,
                      from_statuses: tuple[str, ...] = PIPELINE_ACTIVE) -> list[int] | None:
        """Move pipeline `pid` on from `version`: to `stage` (its jobs inserted now, in a new
        round when the stage is run again), or to a final `status`. None when another process
        moved it first (its version is no longer `version`): the decision was made, once."""
        t = now()
        with self.transaction() as c:
            row = c.execute(select(pipelines).where(
                pipelines.c.id == pid, pipelines.c.version == version,
                pipelines.c.status.in_(list(from_statuses)))).mappings().first()
            if row is None:
                return None
            values: dict[str, Any] = {"version": version + 1, "status": status, "updated_at": t,
                                      "reason": reason}
            if outcome is not None:
                values["outcome"] = outcome
            if status != "running":
                values["finished_at"] = t
            else:
                values["finished_at"] = None
            ids: list[int] = []
            if stage is not None:
                last = c.execute(select(func.max(pipeline_jobs.c.round)).where(
                    pipeline_jobs.c.pipeline_id == pid, pipeline_jobs.c.stage == stage)).scalar()
                round_ = (last or 0) + 1
                values.update(stage=stage, round=round_)
                ids = self._insert_stage(c, pid, stage, round_, stage_jobs or [])
            n = c.execute(update(pipelines).where(pipelines.c.id == pid, pipelines.c.version == version)
                          .values(**values)).rowcount
            if not n:
                raise StateError(f"pipeline {pid} moved during its own transaction")
        return ids

    def pipeline(self, pid: int) -> dict[str, Any] | None:
        if not storable_id(pid):
            return None
        with self.reading() as c:
            row = c.execute(select(pipelines).where(pipelines.c.id == pid)).mappings().first()
        return dict(row) if row else None

    def list_pipelines(self, statuses: Iterable[str] | None = None, issue: int | None = None,
                       limit: int | None = None) -> list[dict[str, Any]]:
        q = select(pipelines).order_by(pipelines.c.id.desc())
        if statuses is not None:
            q = q.where(pipelines.c.status.in_(list(statuses)))
        if issue is not None:
            if not storable_id(issue):
                return []
            q = q.where(pipelines.c.issue == issue)
        if limit is not None:
            q = q.limit(limit)
        with self.reading() as c:
            return [dict(r) for r in c.execute(q).mappings()]

    def pipeline_jobs(self, pid: int) -> list[dict[str, Any]]:
        """The pipeline's jobs, oldest first: job_id, stage, round, role."""
        with self.reading() as c:
            rows = c.execute(select(pipeline_jobs).where(pipeline_jobs.c.pipeline_id == pid)
                             .order_by(pipeline_jobs.c.job_id)).mappings()
            return [dict(r) for r in rows]

    def pipeline_of_job(self, job_id: int) -> dict[str, Any] | None:
        """The job's link to a pipeline (pipeline_id, stage, round, role), or None."""
        if not storable_id(job_id):
            return None
        with self.reading() as c:
            row = c.execute(select(pipeline_jobs).where(pipeline_jobs.c.job_id == job_id)).mappings().first()
        return dict(row) if row else None

    def get(self, job_id: int) -> dict[str, Any] | None:
        if not storable_id(job_id):
            return None  # no row can have it
        with self.reading() as c:
            row = c.execute(select(jobs).where(jobs.c.id == job_id)).mappings().first()
        return dict(row) if row else None

    def list_jobs(self, statuses: Iterable[str] | None = None, lane: str | None = None,
                  kind: str | None = None, issue: int | None = None, limit: int | None = None,
                  newest_first: bool = False) -> list[dict[str, Any]]:
        q = select(jobs)
        if statuses is not None:
            q = q.where(jobs.c.status.in_(list(statuses)))
        if lane is not None:
            q = q.where(jobs.c.lane == lane)
        if kind is not None:
            q = q.where(jobs.c.kind == kind)
        if issue is not None:
            if not storable_id(issue):
                return []  # no row holds it (and the driver would raise OverflowError)
            q = q.where(jobs.c.issue == issue)
        q = q.order_by(jobs.c.id.desc() if newest_first else jobs.c.id)
        if limit is not None:
            q = q.limit(limit)
        with self.reading() as c:
            return [dict(r) for r in c.execute(q).mappings()]

    def events(self, job_id: int) -> list[dict[str, Any]]:
        if not storable_id(job_id):
            return []
        with self.reading() as c:
            rows = c.execute(select(events).where(events.c.job_id == job_id).order_by(events.c.id))
            return [dict(r) for r in rows.mappings()]

    def add_event(self, job_id: int, kind: str, message: str) -> None:
        with self.transaction() as c:
            self._event(c, job_id, kind, message)

    # --- the scheduler's transitions -------------------------------------------------------

    def resolve_blocked(self) -> list[tuple[int, str]]:
        """Blocked jobs whose dependency succeeded -> queued; failed/cancelled -> cancelled."""
        changed: list[tuple[int, str]] = []
        dep = jobs.alias("dep")
        with self.reading() as c:
            if not c.execute(select(jobs.c.id).where(jobs.c.status == "blocked", jobs.c.held.is_(None))
                             .limit(1)).first():
                return changed
        with self.transaction() as c:
            rows = c.execute(
                select(jobs.c.id, jobs.c.after_id, dep.c.status)
                .select_from(jobs.outerjoin(dep, dep.c.id == jobs.c.after_id))
                .where(jobs.c.status == "blocked", jobs.c.held.is_(None))
            ).all()
            t = now()
            for job_id, after_id, dep_status in rows:
                if after_id is None or dep_status == "succeeded":
                    new, reason = "queued", None
                elif dep_status in ("failed", "cancelled") or dep_status is None:
                    new = "cancelled"
                    reason = f"dependency job {after_id} {dep_status or 'does not exist'}"
                else:
                    continue
                n = c.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.status == "blocked")
                              .values(status=new, updated_at=t, error=reason,
                                      finished_at=t if new == "cancelled" else None)).rowcount
                if n:
                    self._event(c, job_id, new, reason or f"dependency job {after_id} succeeded")
                    changed.append((job_id, new))
        return changed

    def claim_next(self, lane: str, owner: str, host: str, runs_root: str | Path,
                   lease_seconds: float, released: Collection[int] = ()) -> dict[str, Any] | None:
        """Take the best queued job of `lane` (priority, then FIFO) for `owner`. On the GPU lane
        nothing is taken while any GPU job runs on `host`, but those in `released`: jobs whose
        process told the caller it gave the card back and now finishes on the CPU (the daemon's
        own; another daemon on the host, not told, still waits for them to end)."""
        try:
            return self._claim_next(lane, owner, host, runs_root, lease_seconds, released)
        except IntegrityError:  # two first-ever GPU claims of a new host raced to insert its row
            return self._claim_next(lane, owner, host, runs_root, lease_seconds, released)

    def _claim_next(self, lane: str, owner: str, host: str, runs_root: str | Path,
                    lease_seconds: float, released: Collection[int]) -> dict[str, Any] | None:
        with self.reading() as c:  # the common case, nothing to do, costs no write lock
            if not c.execute(select(jobs.c.id).where(jobs.c.lane == lane, jobs.c.status == "queued")
                             .limit(1)).first():
                return None
        t = now()
        with self.transaction() as c:
            if lane == "gpu":
                # Row lock on this host: concurrent GPU claims on one host run one after another.
                n = c.execute(update(hosts).where(hosts.c.host == host).values(gpu_claimed_at=t)).rowcount
                if not n:
                    c.execute(insert(hosts).values(host=host, gpu_claimed_at=t))
                holding = [jobs.c.lane == "gpu", jobs.c.status == "running", jobs.c.host == host]
                if released:
                    holding.append(jobs.c.id.notin_(list(released)))
                busy = c.execute(select(jobs.c.id).where(*holding).limit(1)).first()
                if busy:
                    return None
            candidates = c.execute(
                select(jobs.c.id, jobs.c.attempts).where(
                    jobs.c.lane == lane, jobs.c.status == "queued",
                    or_(jobs.c.want_host.is_(None), jobs.c.want_host == host))
                .order_by(jobs.c.priority.desc(), jobs.c.id).limit(5)
            ).all()
            for job_id, attempts in candidates:
                run_dir = str(Path(runs_root) / str(job_id))
                n = c.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.status == "queued").values(
                    status="running", attempts=attempts + 1, lease_owner=owner, host=host,
                    claimed_at=t, heartbeat_at=t, lease_expires_at=t + lease_seconds, updated_at=t,
                    run_dir=run_dir, pid=None, started_at=None, finished_at=None, exit_code=None,
                    error=None, result=None, progress=None,
                )).rowcount
                if n:
                    self._event(c, job_id, "claimed", f"attempt {attempts + 1} by {owner}")
                    return dict(c.execute(select(jobs).where(jobs.c.id == job_id)).mappings().one())
        return None

    def _mine(self, job_id: int, attempt: int) -> Any:
        return and_(jobs.c.id == job_id, jobs.c.status == "running", jobs.c.attempts == attempt)

    def mark_started(self, job_id: int, attempt: int, pid: int) -> bool:
        t = now()
        with self.transaction() as c:
            n = c.execute(update(jobs).where(self._mine(job_id, attempt))
                          .values(started_at=t, pid=pid, updated_at=t)).rowcount
            if n:
                self._event(c, job_id, "started", f"pid {pid}")
        return bool(n)

    def set_pid(self, job_id: int, attempt: int, pid: int) -> bool:
        with self.transaction() as c:
            return bool(c.execute(update(jobs).where(self._mine(job_id, attempt)).values(pid=pid)).rowcount)

    def heartbeat(self, job_id: int, attempt: int, lease_seconds: float) -> dict[str, Any] | None:
        """Renew the lease; returns the row (to read cancel_requested), None if no longer ours."""
        t = now()
        with self.transaction() as c:
            n = c.execute(update(jobs).where(self._mine(job_id, attempt))
                          .values(heartbeat_at=t, lease_expires_at=t + lease_seconds)).rowcount
            if not n:
                return None
            return dict(c.execute(select(jobs).where(jobs.c.id == job_id)).mappings().one())

    def set_progress(self, job_id: int, attempt: int, progress: dict[str, Any]) -> bool:
        with self.transaction() as c:
            return bool(c.execute(update(jobs).where(self._mine(job_id, attempt))
                                  .values(progress=progress)).rowcount)

    def finish(self, job_id: int, attempt: int, status: str, *, exit_code: int | None = None,
               error: str | None = None, result: Any = None, progress: dict[str, Any] | None = None) -> bool:
        """running -> succeeded/failed/cancelled for this attempt only; `progress`, when given,
        replaces the last progress in the same write."""
        assert status in FINAL
        t = now()
        values: dict[str, Any] = {} if progress is None else {"progress": progress}
        with self.transaction() as c:
            n = c.execute(update(jobs).where(self._mine(job_id, attempt)).values(
                status=status, exit_code=exit_code, error=error, result=result, finished_at=t,
                updated_at=t, lease_expires_at=None, **values)).rowcount
            if n:
                self._event(c, job_id, status, error or f"exit code {exit_code}")
        return bool(n)

    def release(self, job_id: int, attempt: int, reason: str) -> bool:
        """running -> queued without counting the attempt (daemon shutdown, never started)."""
        t = now()
        with self.transaction() as c:
            n = c.execute(update(jobs).where(self._mine(job_id, attempt)).values(
                status="queued", attempts=attempt - 1, lease_owner=None, lease_expires_at=None,
                pid=None, started_at=None, updated_at=t)).rowcount
            if n:
                self._event(c, job_id, "requeued", reason)
        return bool(n)

    def sweep_expired(self) -> list[tuple[int, str]]:
        """Running jobs whose lease expired: requeue (attempts < max) or fail; a job that was
        asked to cancel becomes cancelled."""
        t = now()
        changed: list[tuple[int, str]] = []
        with self.transaction() as c:
            rows = c.execute(select(jobs).where(jobs.c.status == "running",
                                                jobs.c.lease_expires_at < t)).mappings().all()
            for r in rows:
                why = f"lease of {r['lease_owner']} on {r['host']} expired (attempt {r['attempts']})"
                status = next_after_attempt(r["attempts"], r["max_attempts"], r["cancel_requested"])
                values: dict[str, Any] = dict(status=status, **_attempt_end(status, t))
                if status == "cancelled":
                    values["error"] = r["cancel_reason"] or "cancelled"
                elif status == "failed":
                    values["error"] = f"{why}; gave up after {r['attempts']} attempts"
                n = c.execute(update(jobs).where(jobs.c.id == r["id"], jobs.c.status == "running",
                                                 jobs.c.attempts == r["attempts"])
                              .values(updated_at=t, lease_expires_at=None, **values)).rowcount
                if n:
                    self._event(c, r["id"], values["status"], why)
                    changed.append((r["id"], values["status"]))
        return changed

    # --- people's transitions --------------------------------------------------------------

    def cancel(self, job_id: int, reason: str = "cancelled by user") -> str:
        """queued/blocked -> cancelled at once; running -> cancel_requested (its supervisor kills
        the process group). Returns the status after the call."""
        t = now()
        if not storable_id(job_id):
            raise StateError(f"job {job_id}: no such job")
        with self.transaction() as c:
            row = c.execute(select(jobs.c.status).where(jobs.c.id == job_id)).first()
            if row is None:
                raise StateError(f"job {job_id}: no such job")
            status = row[0]
            if status in ("queued", "blocked"):
                c.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.status == status).values(
                    status="cancelled", error=reason, cancel_reason=reason, finished_at=t, updated_at=t))
                self._event(c, job_id, "cancelled", reason)
                return "cancelled"
            if status == "running":
                c.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.status == "running").values(
                    cancel_requested=True, cancel_reason=reason, updated_at=t))
                self._event(c, job_id, "cancel_requested", reason)
                return "running"
            raise StateError(f"job {job_id}: already {status}, nothing to cancel")

    def retry(self, job_id: int) -> str:
        """failed/cancelled -> queued, or blocked behind its dependency or its hold; attempts
        from zero. A hold survives cancel and retry: `cancel` leaves `held` on the row, and the
        job comes back blocked with it, so a job held by the GitHub `blocked` label does not run
        while the label is still on (the bridge unholds it once the label is gone)."""
        t = now()
        if not storable_id(job_id):
            raise StateError(f"job {job_id}: no such job")
        with self.transaction() as c:
            row = c.execute(select(jobs.c.status, jobs.c.after_id, jobs.c.held)
                            .where(jobs.c.id == job_id)).first()
            if row is None:
                raise StateError(f"job {job_id}: no such job")
            status, after_id, held = row
            if status not in ("failed", "cancelled"):
                raise StateError(f"job {job_id}: is {status}; only failed or cancelled jobs can be retried")
            # resolve_blocked leaves a held job alone, and queues an unheld one whose dependency
            # succeeded (or which has none) on its next pass.
            new = "blocked" if held or after_id is not None else "queued"
            c.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.status == status).values(
                status=new, attempts=0, exit_code=None, error=None, result=None, progress=None,
                started_at=None, finished_at=None, claimed_at=None, lease_owner=None, pid=None,
                lease_expires_at=None, cancel_requested=False, cancel_reason=None, updated_at=t))
            self._event(c, job_id, "retried", f"{status} -> {new}" + (f" (held: {held})" if held else ""))
            return new

    def hold(self, job_id: int, reason: str) -> bool:
        """queued -> blocked with a reason (e.g. the issue got the `blocked` label)."""
        if not storable_id(job_id):
            return False
        with self.transaction() as c:
            n = c.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.status.in_(("queued", "blocked")))
                          .values(status="blocked", held=reason, updated_at=now())).rowcount
            if n:
                self._event(c, job_id, "held", reason)
        return bool(n)

    def unhold(self, job_id: int) -> bool:
        if not storable_id(job_id):
            return False
        with self.transaction() as c:
            n = c.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.held.is_not(None))
                          .values(held=None, updated_at=now())).rowcount
            if n:
                self._event(c, job_id, "unheld", "hold released")
        return bool(n)

    # --- daemons ---------------------------------------------------------------------------

    def register_daemon(self, daemon_id: str, host: str, pid: int, lanes: str, cpu_workers: int) -> None:
        t = now()
        with self.transaction() as c:
            c.execute(insert(daemons).values(id=daemon_id, host=host, pid=pid, lanes=lanes,
                                             cpu_workers=cpu_workers, started_at=t, heartbeat_at=t))

    def daemon_heartbeat(self, daemon_id: str, paused: str | None) -> None:
        with self.transaction() as c:
            # stopped_at=None: a daemon that was only slow, and got reaped, is alive again
            c.execute(update(daemons).where(daemons.c.id == daemon_id)
                      .values(heartbeat_at=now(), paused=paused, stopped_at=None))

    def daemon_stopped(self, daemon_id: str) -> None:
        with self.transaction() as c:
            c.execute(update(daemons).where(daemons.c.id == daemon_id).values(stopped_at=now()))

    def daemons(self, alive_within: float | None = None, since: float | None = None) -> list[dict[str, Any]]:
        """Daemon rows, newest first: all, those alive (not stopped, heartbeat within
        `alive_within` seconds), or those that heartbeat within `since` seconds, dead or alive."""
        q = select(daemons).order_by(daemons.c.started_at.desc())
        if alive_within is not None:
            q = q.where(daemons.c.stopped_at.is_(None), daemons.c.heartbeat_at >= now() - alive_within)
        if since is not None:
            q = q.where(daemons.c.heartbeat_at >= now() - since)
        with self.reading() as c:
            return [dict(r) for r in c.execute(q).mappings()]

    def reap_daemons(self, older_than: float) -> list[dict[str, Any]]:
        """Daemons that stopped heartbeating without saying so: mark them stopped, return them."""
        t = now()
        with self.transaction() as c:
            rows = c.execute(select(daemons).where(daemons.c.stopped_at.is_(None),
                                                   daemons.c.heartbeat_at < t - older_than)).mappings().all()
            for r in rows:
                c.execute(update(daemons).where(daemons.c.id == r["id"]).values(stopped_at=t))
            return [dict(r) for r in rows]

    def counts(self) -> dict[str, dict[str, int]]:
        with self.reading() as c:
            rows = c.execute(select(jobs.c.lane, jobs.c.status, func.count())
                             .group_by(jobs.c.lane, jobs.c.status)).all()
        out: dict[str, dict[str, int]] = {}
        for lane, status, n in rows:
            out.setdefault(lane, {})[status] = n
        return out

    def requeue_or_fail(self, job_id: int, attempt: int, reason: str, *,
                        exit_code: int | None = None) -> str | None:
        """running -> queued counting the attempt (the next claim is attempt + 1), or -> failed
        once attempts reached max_attempts: the rule sweep_expired applies to an expired lease,
        here for an end the supervisor saw (a signal the lab did not send, a job that stopped
        itself, a log it cannot write). A job asked to cancel becomes cancelled. The error and
        the event say what happened and what comes next. Returns the new status; None if this
        attempt is no longer the job's."""
        t = now()
        with self.transaction() as c:
            row = c.execute(select(jobs.c.max_attempts, jobs.c.cancel_requested, jobs.c.cancel_reason)
                            .where(self._mine(job_id, attempt))).first()
            if row is None:
                return None
            max_attempts, cancel_requested, cancel_reason = row
            status = next_after_attempt(attempt, max_attempts, cancel_requested)
            values = _attempt_end(status, t)
            why = {"cancelled": f"{reason}; cancelled: {cancel_reason or 'by request'}",
                   "failed": f"{reason}; failed after {attempt} attempt{'' if attempt == 1 else 's'}",
                   "queued": f"{reason}; requeued (attempt {attempt + 1} of {max_attempts})"}[status]
            n = c.execute(update(jobs).where(self._mine(job_id, attempt)).values(
                status=status, exit_code=exit_code, error=why, updated_at=t, lease_expires_at=None,
                **values)).rowcount
            if not n:
                return None
            self._event(c, job_id, "requeued" if status == "queued" else status, why)
        return status


def next_after_attempt(attempt: int, max_attempts: int, cancel_requested: bool) -> str:
    """The one retry policy for an attempt that ended without an outcome of its own (an expired
    lease, a signal the lab did not send, a job that stopped itself): cancelled if asked,
    failed once the attempts are spent, else queued again."""
    if cancel_requested:
        return "cancelled"
    return "failed" if attempt >= max_attempts else "queued"


def _attempt_end(status: str, t: float) -> dict[str, Any]:
    """What that end sets on the row besides its status: a final one its finish time; a requeue
    frees the job for the next claim."""
    if status == "queued":
        return {"lease_owner": None, "pid": None, "started_at": None}
    return {"finished_at": t}


_TIMES = ("created_at", "updated_at", "claimed_at", "started_at", "finished_at", "heartbeat_at",
          "lease_expires_at")


def public(job: dict[str, Any]) -> dict[str, Any]:
    """A job row as people and agents see it: ISO times, `after` for after_id."""
    out = {k: (iso(v) if k in _TIMES else v) for k, v in job.items() if k != "after_id"}
    out["after"] = job.get("after_id")
    out["cancel_requested"] = bool(job.get("cancel_requested"))
    return out
