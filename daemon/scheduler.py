"""The daemon: lanes, leases, the sweep, dependencies, the disk guard, and the huey wiring.

One `Daemon` per host process. Its main thread is the scheduler loop: every `poll_seconds` (or
at once when woken) it moves blocked jobs whose dependency succeeded to queued, and CLAIMS jobs
in the store for the lanes it has capacity in (GPU: one job per host; CPU: `cpu_workers`), then
enqueues "execute job N, attempt A" on that lane's huey queue. huey's consumer threads (one for
the GPU lane, N for the CPU lane) dequeue it and run `workers.supervise.run_job`, which starts
the job's own process and watches it. When a job ends, its worker thread claims the next one at
once, so the GPU lane does not wait a poll interval between jobs, and the next job's process is
already started and imported (`workers.supervise.ProcessPool`; for a lane that trains, torch and
the models too), so it does not wait for python. Every heartbeat the pool retires standbys
started at an older commit than HEAD.

The GPU lane's room is the card's: a GPU job that gave the card back (its card work is over,
workers.run WorkerContext.release_card) no longer counts, so the next GPU job is claimed and
started at that moment while the first finishes its CPU-only tail (curves.png, its result) in
a thread of its own; its attempt is watched and recorded as any other. One such tail at a time
(GPU_TAILS): each still holds its process's CUDA context. Two jobs never hold the card at once:
besides this count, each job process takes the card's GPU lock (workers.gpu_lock) before it
starts, and a tail has let it go.

Why claim before enqueueing: huey forgets a message when it is dequeued, so the store's row (with
a lease) is the truth. A daemon killed with claimed messages still in huey leaves leases that
expire and get swept back to queued by any daemon; its huey queues (named after the daemon
instance, so no other daemon ever reads them) are flushed when a later daemon finds it dead.

huey storage: SqliteHuey in a file beside the queue database (`<LAB_DB>.huey`, or
`$LAB_RUNS/huey.db` when LAB_DB is a URL); RedisHuey when `LAB_BROKER=redis://...`.

The sweep (requeue expired leases) runs at start-up and every `sweep_seconds` in the scheduler
loop (huey's periodic tasks have minute resolution, too coarse for leases of seconds).

Shutdown (SIGTERM/SIGINT): no new claims; running jobs get `shutdown_seconds` to finish, then
their groups are killed (SIGTERM, grace, SIGKILL) and the jobs requeued; claimed jobs that never
started are requeued at once. The daemon exits within shutdown_seconds + kill_grace_seconds + ~2s.

The daemon process never imports torch: job kinds import it inside `run`, in the job's process.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from huey import RedisHuey, SqliteHuey
from huey.api import Huey
from huey.consumer import Consumer

import config
from daemon.disk import disk_status
from daemon.pipeline import advance as advance_pipelines
from store import Store, db_url
from workers.supervise import ProcessPool, run_job

log = logging.getLogger("lab.daemon")

# GPU jobs past their card work, finishing on the CPU, that may run beside the card's job.
GPU_TAILS = 1


def broker_url() -> str | None:
    return os.environ.get("LAB_BROKER") or None


def huey_file(db: str, runs: Path) -> str:
    if "://" in db:
        return str(runs / "huey.db")
    return str(Path(db).expanduser().resolve()) + ".huey"


def make_huey(name: str, db: str, runs: Path, broker: str | None) -> Huey:
    if broker:
        return RedisHuey(name, url=broker, results=False, utc=True)
    return SqliteHuey(name, filename=huey_file(db, runs), results=False, utc=True)


def queue_name(daemon_id: str, lane: str) -> str:
    return "lab-" + "".join(ch if ch.isalnum() else "-" for ch in f"{daemon_id}-{lane}")


class _Consumer(Consumer):
    def _set_signal_handlers(self) -> None:
        pass  # the daemon owns SIGTERM/SIGINT (and runs two consumers in one process)


class Stoppable(Protocol):
    def stop(self) -> None: ...


# Started beside the lanes with (db, say) and stopped first at shutdown; None means "not on".
Companion = Callable[[str, Callable[[str], None]], Stoppable | None]


class Daemon:
    def __init__(self, lanes: tuple[str, ...] = ("gpu", "cpu"), cpu_workers: int | None = None,
                 db: str | None = None, runs: str | None = None, host: str | None = None,
                 broker: str | None = None, companion: Companion | None = None):
        self.q = config.queue_config()
        self.companion_factory = companion
        self.companion: Any = None
        p = config.paths()
        self.lanes = lanes
        self.cpu_workers = cpu_workers or self.q.cpu_workers
        db = db or p.db
        self.db = db if "://" in db else str(Path(db).expanduser().resolve())
        self.runs = Path(runs or p.runs).expanduser().resolve()
        self.host = host or p.host
        self.broker = broker if broker is not None else broker_url()
        self.id = f"{self.host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.store = Store(self.db)
        self.runs.mkdir(parents=True, exist_ok=True)
        self.hueys = {lane: make_huey(queue_name(self.id, lane), self.db, self.runs, self.broker)
                      for lane in lanes}
        self.tasks = {lane: h.task(name="execute")(self._execute) for lane, h in self.hueys.items()}
        self.consumers = {
            lane: _Consumer(h, workers=1 if lane == "gpu" else self.cpu_workers, periodic=False,
                            initial_delay=0.01, backoff=1.5, max_delay=0.1, check_worker_health=True,
                            shutdown_timeout=2.0)
            for lane, h in self.hueys.items()}
        self.pool = ProcessPool(self.db, self.runs, self.host)
        self.active: dict[int, str] = {}  # claimed job id -> lane
        self.started: set[int] = set()  # claimed jobs whose supervisor has begun
        self.released: set[int] = set()  # active GPU jobs that gave the card back (in their tail)
        self.lock = threading.RLock()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.stop_deadline: float | None = None
        self.paused: str | None = None

    # --- the loop --------------------------------------------------------------------------

    def request_stop(self, *_: Any) -> None:
        self.stopping.set()
        self.wake.set()

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        self.store.register_daemon(self.id, self.host, os.getpid(), ",".join(self.lanes), self.cpu_workers)
        log.info("daemon %s: lanes %s, cpu workers %d, db %s, runs %s, broker %s", self.id,
                 ",".join(self.lanes), self.cpu_workers, db_url(self.db).split("@")[-1], self.runs,
                 "redis" if self.broker else "sqlite")
        self._reap_dead_daemons()
        self._sweep()
        for lane in self.lanes:
            # The lane's standbys preload torch when what waits trains (workers.supervise).
            waiting = self.store.list_jobs(["queued"], lane=lane, limit=1)
            if waiting:
                self.pool.expect(lane, waiting[0]["kind"])
            self.pool.warm(lane)
        for c in self.consumers.values():
            c.start()
        # Side by side with the lanes: the GitHub bridge, which `lab daemon` hands in (the
        # scheduler does not import it; bridge/ sits above the daemon).
        if self.companion_factory is not None:
            self.companion = self.companion_factory(self.db, lambda m: log.info("%s", m))
        next_beat = next_sweep = 0.0
        while not self.stopping.is_set():
            t = time.monotonic()
            try:
                if t >= next_beat:
                    next_beat = t + self.q.heartbeat_seconds
                    self._check_disk()
                    self.store.daemon_heartbeat(self.id, self.paused)
                    self._reap_dead_daemons()
                    for lane in self.lanes:
                        self.pool.warm(lane)  # retires standbys of an older commit than HEAD
                if t >= next_sweep:
                    next_sweep = t + self.q.sweep_seconds
                    self._sweep()
                self.tick()
            except Exception:  # a database hiccup must not kill the daemon: log and go on
                log.exception("scheduler loop error")
            self.wake.wait(self.q.poll_seconds)
            self.wake.clear()
        self.shutdown()

    def tick(self) -> None:
        """Unblock what may run, then claim and dispatch jobs while lanes have room."""
        with self.lock:
            if self.stopping.is_set():
                return
            self.store.resolve_blocked()
            # An idea's next stage is decided here, on every host; the store makes it once.
            for pid, what in advance_pipelines(self.store):
                log.info("pipeline %d: %s", pid, what)
            self.store.resolve_blocked()
            # Both lanes hold on a full disk: a CPU job cannot write its log or its results
            # either, and would fail in a blink, one after another, through the whole queue.
            if self._check_disk():
                return
            self._dispatch(self.lanes)

    def _dispatch(self, lanes: tuple[str, ...]) -> None:
        """Claim and enqueue jobs while `lanes` have room (the caller holds the lock and has
        checked the disk guard)."""
        for lane in lanes:
            while self._room(lane) > 0:
                job = self.store.claim_next(lane, self.id, self.host, self.runs, self.q.lease_seconds,
                                            released=self.released if lane == "gpu" else ())
                if job is None:
                    break
                self.active[job["id"]] = lane
                log.info("job %d (%s) claimed for lane %s, attempt %d", job["id"], job["kind"],
                         lane, job["attempts"])
                self.tasks[lane](job["id"], job["attempts"])

    def _room(self, lane: str) -> int:
        busy = [j for j, v in self.active.items() if v == lane]
        if lane != "gpu":
            return self.cpu_workers - len(busy)
        holding = sum(1 for j in busy if j not in self.released)
        return min(1 - holding, 1 + GPU_TAILS - len(busy))

    def _check_disk(self) -> bool:
        """True when the disk guard holds the lanes (both: see tick)."""
        was = self.paused
        self.paused = disk_status(self.runs, self.q)["reason"]
        if self.paused != was:
            log.warning("%s", self.paused or "disk guard lifted: the lanes take jobs again")
            self.store.daemon_heartbeat(self.id, self.paused)
        return self.paused is not None

    def _sweep(self) -> None:
        for job_id, status in self.store.sweep_expired():
            log.warning("job %d: lease expired -> %s", job_id, status)

    def _reap_dead_daemons(self) -> None:
        for d in self.store.reap_daemons(older_than=max(3 * self.q.heartbeat_seconds, self.q.lease_seconds)):
            log.warning("daemon %s (pid %s on %s) stopped heartbeating; flushing its huey queues",
                        d["id"], d["pid"], d["host"])
            for lane in d["lanes"].split(","):
                try:
                    dead = make_huey(queue_name(d["id"], lane), self.db, self.runs, self.broker)
                    dead.storage.flush_queue()
                except Exception:
                    log.exception("could not flush the huey queue of %s", d["id"])

    # --- one job (in a huey worker thread) -------------------------------------------------

    def _execute(self, job_id: int, attempt: int) -> None:
        try:
            with self.lock:
                job = self.store.get(job_id)
                if (job is None or job["status"] != "running" or job["attempts"] != attempt
                        or job["lease_owner"] != self.id):
                    job = None
                elif self.stopping.is_set():
                    self.store.release(job_id, attempt, "daemon shut down before the job started")
                    job = None
                else:
                    self.started.add(job_id)
        except Exception:
            log.exception("job %d: supervisor error", job_id)
            job = None
        if job is None:
            self._ended(job_id)
            return
        if job["lane"] != "gpu":
            self._supervise(job, None)
            return
        # The lane's one worker thread stands for the card: it is free again when the job gives
        # the card back or ends, whichever comes first, and then dequeues the next job at once.
        card_back, lane_free = threading.Event(), threading.Event()

        def released() -> None:
            card_back.set()
            lane_free.set()
        watcher = threading.Thread(target=self._supervise, args=(job, released, lane_free),
                                   name=f"job-{job_id}", daemon=True)
        watcher.start()
        lane_free.wait()
        if card_back.is_set():
            with self.lock:
                if job_id in self.active:  # not ended meanwhile (its own end dispatched then)
                    self.released.add(job_id)
                    log.info("job %d gave the card back; its tail runs on the CPU", job_id)
                    if not self.stopping.is_set() and self.paused is None:
                        try:
                            # Only the claim: nothing was unblocked by a job still running.
                            self._dispatch(("gpu",))
                        except Exception:
                            log.exception("dispatch after job %d gave the card back failed", job_id)

    def _supervise(self, job: dict[str, Any], on_card_released: Callable[[], None] | None,
                   ended: threading.Event | None = None) -> None:
        job_id, attempt = job["id"], job["attempts"]
        try:
            outcome = run_job(self.store, job, db=self.db, runs=self.runs, host=self.host,
                              stop_deadline=lambda: self.stop_deadline, pool=self.pool,
                              on_card_released=on_card_released)
            log.info("job %d (%s) attempt %d: %s", job_id, job["kind"], attempt, outcome)
        except Exception:
            log.exception("job %d: supervisor error", job_id)
        finally:
            self._ended(job_id)
            if ended is not None:
                ended.set()

    def _ended(self, job_id: int) -> None:
        with self.lock:
            self.active.pop(job_id, None)
            self.started.discard(job_id)
            self.released.discard(job_id)
        if not self.stopping.is_set():
            try:
                self.tick()  # the next job of this lane starts now, not at the next poll
            except Exception:
                log.exception("dispatch after job %d failed", job_id)
        self.wake.set()

    # --- stopping --------------------------------------------------------------------------

    def shutdown(self) -> None:
        log.info("daemon %s: stopping; running jobs get %.0f s to finish", self.id, self.q.shutdown_seconds)
        if self.companion is not None:  # the bridge stops polling first
            self.companion.stop()
        with self.lock:
            self.stop_deadline = time.monotonic() + self.q.shutdown_seconds
            for h in self.hueys.values():
                h.storage.flush_queue()
            for job_id, _lane in list(self.active.items()):
                if job_id not in self.started:
                    job = self.store.get(job_id)
                    if job is not None:
                        self.store.release(job_id, job["attempts"], "daemon shut down before the job started")
                    self.active.pop(job_id, None)
        limit = self.stop_deadline + self.q.kill_grace_seconds + 1.0
        while self.active and time.monotonic() < limit:
            time.sleep(0.05)
        for c in self.consumers.values():
            c.stop(graceful=True)
        self.pool.close()
        self.store.daemon_stopped(self.id)
        log.info("daemon %s: stopped (%d job(s) still active)", self.id, len(self.active))


def run_daemon(lanes: tuple[str, ...], cpu_workers: int | None, companion: Companion | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("huey").setLevel(logging.WARNING)
    Daemon(lanes=lanes, cpu_workers=cpu_workers, companion=companion).run()
