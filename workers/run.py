"""`python -m workers.run JOB_ID ATTEMPT`: the process of one job attempt.

(`python -m workers.run --standby` is the same process started ahead of time; it reads
"JOB_ID ATTEMPT LOG_PATH" from stdin, so the GPU lane does not wait for python's start-up and
imports between two jobs. One of a lane that trains (LAB_STANDBY_PRELOAD=torch, set by
workers.supervise.ProcessPool) also imports torch, the models and the harness, pays torch's
lazy first-use costs and tokenizes the sample while it waits (`preload`), so a training job's
first step follows its hand-over by little more than its model build. A standby records the
commit it was started at (LAB_STANDBY_COMMIT); handed a job after HEAD moved, it re-executes
itself as a fresh process first.)

Started by the daemon (workers.supervise) as the leader of its own process group, with stdout and
stderr going to `runs/<job_id>/log.txt`. In order it:
1. starts a lease keeper thread (heartbeats into the store, so a job that outlives its daemon
   keeps its lease and finishes; if the daemon is gone it also enforces cancel and timeout);
2. on the GPU lane takes the card's machine-wide GPU lock (workers.gpu_lock; blocking: an older
   job, another daemon's job or a foreground cuda run may still hold the card);
3. marks the job started, runs `jobs.get_kind(kind).run(spec, ctx)`, and records the result
   (succeeded) or the exception (failed, exit 1) for its own attempt only.
On the GPU lane the card is given back (WorkerContext.release_card: memory freed, GPU lock
released, the supervisor told through LAB_CARD_FD) as soon as the job's card work ends: by the
kind itself, before a CPU-only tail such as curves.png (models/train.py train), or else
when `run` returns, before the result is recorded. The next GPU job may start from then on; the
record becomes `succeeded` only once the result is, and a tail that fails fails the job.
A death by signal or an exit without a result is recorded by the supervisor, or, when nobody
supervises, by the lease sweep. This module imports no torch at import; a kind imports it
inside `run`, a training lane's standby in `preload`.

Its own writes to the log are best effort (`_say`): on a full disk a print must not keep the
outcome, or the reason, out of the store.
"""

from __future__ import annotations

import atexit
import importlib
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import config
import jobs
from common import git_commit, set_loaded_commit
from jobs.paths import check_spec_paths
from store import Store, iso
from workers import gpu_lock
from workers.eta import EtaEstimator
from workers.forked import PRELOAD_ENV
from workers.supervise import (
    CARD_FD_ENV,
    COMMIT_ENV,
    RELEASED,
    STOPPED_FILE,
    TRAINING_KINDS,
    HeadWatch,
    standby_state_path,
)


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0][:200]


def _say(message: str) -> None:
    """A line to the log (stdout); an OSError (ENOSPC) is dropped, so the store still gets told."""
    try:
        print(message, flush=True)
    except OSError:
        pass


def _bounded(fn: Any, timeout: float) -> tuple[bool, Any]:
    """fn() in a daemon thread, waited on for at most `timeout` s: (True, its value), or
    (False, the exception or None if it still runs). A statement can hang (a lock, a dead TCP
    connection); the caller must decide in time anyway."""
    out: list[tuple[bool, Any]] = []

    def call() -> None:
        try:
            out.append((True, fn()))
        except Exception as e:
            out.append((False, e))
    t = threading.Thread(target=call, name="lease-check", daemon=True)
    t.start()
    t.join(timeout)
    return out[0] if out else (False, None)


def record_outcome(store: Store, q: config.QueueConfig, job_id: int, attempt: int, status: str,
                   **values: Any) -> None:
    """store.finish, retried while the database is unreachable. Retrying longer than the lease
    is pointless: the lease expires (nobody renews it now) and the job is requeued, which
    fences this attempt's write out anyway."""
    deadline = time.monotonic() + q.lease_seconds
    delay = 0.1
    while True:
        try:
            store.finish(job_id, attempt, status, **values)
            return
        except Exception as e:
            if time.monotonic() + delay > deadline:
                raise
            _say(f"lab: recording the outcome failed ({type(e).__name__}: {_first_line(e)}); retrying")
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


class WorkerContext:
    """The JobContext of a queued job: progress and ETA go into the store, log lines to stdout
    (the run's log.txt)."""

    def __init__(self, store: Store, job_id: int, attempt: int, run_dir: Path, lane: str,
                 clock: Callable[[], float] = time.monotonic):
        self.store, self.job_id, self.attempt = store, job_id, attempt
        self.run_dir, self.lane = run_dir, lane
        self.clock = clock  # a parameter so a test can replay a real run's timings
        self.started = clock()
        self._last_write = -math.inf
        self._eta = EtaEstimator()
        self._device: str | None = None
        # Wall clock (epoch s) of the first report of a finished step: when the card first did
        # the job's work. Kept in every progress write, so bench/card_idle.py reads the lane's
        # idle time (previous job's last step -> this one's first) from the store, not from logs.
        self.first_step_at: float | None = None
        # Wall clock (epoch s) when release_card gave the card back; None while it holds it.
        self.card_released_at: float | None = None
        self._last_progress: dict[str, Any] | None = None

    @property
    def device(self) -> str:
        # Decided on first use so kinds that never touch torch (sleep) start in milliseconds.
        if self._device is None:
            self._device = "cpu"
            if self.lane == "gpu":
                import torch

                self._device = "cuda" if torch.cuda.is_available() else "cpu"
        return self._device

    def progress(self, step: int, total: int, **metrics: float) -> None:
        t = self.clock()
        wall = time.time()
        if self.first_step_at is None and step > 0:
            self.first_step_at = wall
        eta = self._eta.update(t, step, total)  # every report counts for the rate, written or not
        # At most two writes a second: a fast training loop must not hammer the database.
        if step < total and t - self._last_write < 0.5:
            return
        self._last_write = t
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in metrics.items()}
        self._last_progress = {
            "step": step, "total": total, "eta_s": None if eta is None else round(eta, 1),
            "metrics": clean, "at": iso(wall),
            # epoch seconds: `at` has millisecond text; these are for timing the lane
            "step_at": wall, "first_step_at": self.first_step_at}
        try:
            self.store.set_progress(self.job_id, self.attempt, self._last_progress)
        except Exception as e:  # a database blip must not kill a long run; the lease watchdog guards
            _say(f"lab: progress not recorded: {type(e).__name__}: {_first_line(e)}")

    def release_card(self) -> None:
        """The job's card work is over (its last step and final eval; the card is not used again
        in this process): free its memory, give the GPU lock back and tell the supervisor, so
        the daemon can start the next GPU job while this one finishes on the CPU (plots, the
        result). A no-op off the GPU lane and after the first call. The process keeps its CUDA
        context (a few hundred MB) until it exits; the daemon lets one such tail run beside the
        card's job, not more (daemon.scheduler)."""
        if self.lane != "gpu" or self.card_released_at is not None:
            return
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            import gc

            torch.cuda.synchronize()  # the last kernels are card work too
            gc.collect()  # the kind's dropped model and optimizer: their blocks go back below
            torch.cuda.empty_cache()
        gpu_lock.release()
        self.card_released_at = time.time()
        fd = os.environ.pop(CARD_FD_ENV, None)
        if fd is not None:
            try:
                os.write(int(fd), RELEASED)
                os.close(int(fd))
            except (OSError, ValueError):
                pass  # no supervisor listens (a run by hand): the lock alone frees the card
        _say("lab: card released; the rest of the job runs on the CPU")

    def final_progress(self) -> dict[str, Any] | None:
        """The progress the outcome's write records: the last one, with `card_released_at` for
        bench/card_idle.py (the card's part of the job ended then, not at `finished_at`); None
        when the card was not given back (the last progress stands). Not written at the release
        itself: a store write there would meet the next job's start on the database's lock."""
        if self.card_released_at is None:
            return None
        return {**(self._last_progress or {}), "card_released_at": self.card_released_at}

    def log(self, message: str) -> None:
        print(message.rstrip("\n"), flush=True)  # not _say: a kind that cannot log should know


class LeaseKeeper(threading.Thread):
    """Renews the lease every heartbeat; when the daemon that started us is gone (we were
    re-parented), it alone enforces cancel and the timeout."""

    def __init__(self, store: Store, job: dict[str, Any], q: config.QueueConfig):
        super().__init__(name="lease-keeper", daemon=True)
        self.store, self.job, self.q = store, job, q
        self.run_dir = Path(job["run_dir"])
        self.parent = os.getppid()
        self.started_at: float | None = None
        self.done = threading.Event()
        # The last renewal: the claim (or the daemon's latest heartbeat) until this process renews.
        since = max(0.0, time.time() - (job.get("heartbeat_at") or time.time()))
        self.renewed = time.monotonic() - since

    def run(self) -> None:
        job_id, attempt = self.job["id"], self.job["attempts"]
        threading.Thread(target=self.watchdog, name="lease-watchdog", daemon=True).start()
        while not self.done.wait(self.q.heartbeat_seconds):
            silent = time.monotonic() - self.renewed
            try:
                row = self.store.heartbeat(job_id, attempt, self.q.lease_seconds)
            except Exception as e:  # the database may be briefly unavailable; try again
                _say(f"lab: heartbeat failed: {type(e).__name__}: {_first_line(e)}")
                continue
            if self.done.is_set():
                return
            if row is None:
                # Finished or requeued by someone else: this attempt must not go on running.
                self.stop_self(f"its lease is no longer its own (requeued or ended by someone else; "
                               f"{silent:.1f} s since its last renewal)", reachable=True)
                return
            self.renewed = time.monotonic()
            if os.getppid() == self.parent:
                continue  # the daemon supervises: it does cancel and timeout itself
            over = self.started_at is not None and time.time() - self.started_at > row["timeout_s"]
            if row["cancel_requested"] or over:
                status = "cancelled" if row["cancel_requested"] else "failed"
                why = (f"cancelled: {row['cancel_reason']}" if row["cancel_requested"]
                       else f"timed out after {row['timeout_s']:g} s (no daemon; stopped by itself)")
                self.store.finish(job_id, attempt, status, exit_code=-signal.SIGKILL, error=why)
                _say(f"lab: {why}")
                os.killpg(os.getpgrp(), signal.SIGTERM)
                time.sleep(self.q.kill_grace_seconds)
                os.killpg(os.getpgrp(), signal.SIGKILL)

    def watchdog(self) -> None:
        """Self-fencing: past `fence_after` without a renewal the lease may be about to expire and
        the job be given to another host (a partition from the database, a frozen host, a
        heartbeat stuck in a dead TCP connection); stop first, so two attempts never run at once.
        A separate thread, because a heartbeat can hang. The margin (a quarter of the lease)
        also covers clock skew between hosts.

        Its own renewals are not the judge, the lease in the store is: a process frozen by
        SIGSTOP (or a stalled VM) renews nothing, yet its daemon kept the lease all along. From
        half the lease of silence on it asks the store itself, with a renewal that succeeds only
        while the attempt is still the job's (`Store.heartbeat`: the row is the fence, whoever's
        clock says what). Ours: go on. Someone else's: stop now. No answer in time: stop once
        past `fence_after`, which the short wake and bound keep under 0.9 of the lease."""
        lease = self.q.lease_seconds
        fence_after, ask_after = 0.75 * lease, 0.5 * lease
        bound = 0.1 * lease
        job_id, attempt = self.job["id"], self.job["attempts"]
        while not self.done.wait(min(self.q.heartbeat_seconds, 0.05 * lease)):
            if time.monotonic() - self.renewed <= ask_after:
                continue
            answered, value = _bounded(lambda: self.store.heartbeat(job_id, attempt, lease), bound)
            if self.done.is_set():
                return
            silent = time.monotonic() - self.renewed  # the keeper may have renewed meanwhile
            if answered and value is not None:
                self.renewed = time.monotonic()
            elif answered:
                self.stop_self(f"its lease is no longer its own (requeued or ended by someone else; "
                               f"{silent:.1f} s since its last renewal)", reachable=True)
            elif silent > fence_after:
                what = (f"{type(value).__name__}: {_first_line(value)}" if value is not None
                        else f"no answer within {bound:.1f} s")
                self.stop_self(f"no lease renewal for {silent:.1f} s and the database does not "
                               f"answer ({what})", reachable=False)

    def stop_self(self, reason: str, reachable: bool) -> None:
        """Kill our whole process group, having said why where it can be read: the log, a file
        in the run dir for the supervisor (the database may be the thing out of reach), and an
        event when the database answers. The supervisor records the outcome by the one retry
        policy (workers.supervise); a lost lease leaves the row to its new owner."""
        job_id, attempt = self.job["id"], self.job["attempts"]
        _say(f"lab: job {job_id} attempt {attempt}: {reason}; stopping so it cannot run twice at once")
        try:
            (self.run_dir / STOPPED_FILE).write_text(json.dumps({"attempt": attempt, "reason": reason}))
        except OSError:
            pass
        if reachable:
            # Bounded: the attempt runs on while it waits, beside the lease's new owner.
            _bounded(lambda: self.store.add_event(job_id, "stopped", f"attempt {attempt} stopped itself: "
                                                  f"{reason}"), min(1.0, 0.1 * self.q.lease_seconds))
        os.killpg(os.getpgrp(), signal.SIGKILL)


def standby(store: Store) -> tuple[int, int] | None:
    """`--standby`: started ahead of time with python and the imports ready; wait for
    "JOB_ID ATTEMPT LOG_PATH" on stdin, then send stdout and stderr to that log."""
    # Connect now, and compile the job's read (no row has id 0), not when the job is waiting:
    # 5-8 ms of a job's start otherwise.
    store.get(0)
    line = sys.stdin.readline()
    if not line.strip():
        return None  # the daemon closed the pipe: not needed after all
    job_id, attempt, log_path = line.rstrip("\n").split(" ", 2)
    try:
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        # No log to say it in (a full disk, a run dir gone): the store says it, by the policy the
        # supervisor applies to the same failure (workers.supervise.could_not_start).
        store.requeue_or_fail(int(job_id), int(attempt), f"cannot write {log_path}: {e.strerror}")
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return int(job_id), int(attempt)


def _warm_torch() -> None:
    import torch

    # The first optimizer made in a process imports torch._dynamo (~1 s here): paid now, on a
    # throwaway parameter, not between the job's model build and its first step.
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])


def _warm_plots() -> None:
    import matplotlib

    matplotlib.use("Agg")  # as the job's plots do: no display in the queue
    import matplotlib.pyplot as plt

    fig = plt.figure()
    fig.canvas.draw()  # the first draw loads the font cache
    plt.close(fig)


def _cuda_context() -> None:
    import torch

    if torch.cuda.is_available():
        torch.zeros(1, device="cuda")


def _sample_data() -> None:
    from jobs.train import data_dir_for

    data_dir_for(config.SAMPLE_DATASET)  # tokenized once per LAB_RUNS, on first use


# What the training kinds' `run` needs (jobs/smoke.py, train.py, eval.py, ablation.py), loaded by
# a standby of a lane that trains before it is handed a job, in the order a plain training run
# or smoke needs it, so a job that comes half-way finds the first part done. Measured on 2
# cores: torch ~1.7 s, its first optimizer ~1 s, matplotlib with its first draw ~0.5 s (a run
# draws curves.png after its last step: card time too), scipy.stats (the harness's) ~0.9 s.
PRELOAD: tuple[tuple[str, Callable[[], object]], ...] = (
    *((m, lambda m=m: importlib.import_module(m)) for m in (
        "numpy", "torch", "models", "models.step", "models.data", "models.train", "jobs.train",
        "jobs.smoke")),
    ("the first optimizer", _warm_torch),
    ("the sample data", _sample_data),
    ("matplotlib", _warm_plots),
    *((m, lambda m=m: importlib.import_module(m)) for m in (
        "harness.stats", "scipy.stats", "harness.tasks", "harness.ablate", "harness.train_task",
        "harness.batched", "harness.plot", "jobs.eval", "jobs.ablation")),
)


def _touch(path: Path) -> None:
    try:
        path.touch()
    except OSError:
        pass  # only a preference of the pool's is lost


def _take_slot(slots: list[Path]) -> IO[str] | None:
    """The first free one of `slots` (lock files), held until the file is closed; None if all
    are taken."""
    import fcntl

    for path in slots:
        try:
            f = open(path, "a")
        except OSError:
            continue
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except OSError:
            f.close()
    return None


def preload(lane: str, q: config.QueueConfig, stop: threading.Event, cuda: bool | None = None) -> None:
    """Everything a training job does before its first step that does not depend on the job:
    imports, torch's lazy first-use costs, the shipped sample's tokens, and (only if configured)
    the CUDA context. Errors are logged, never raised: the job meets the same fault itself and
    records it. `stop`: a job came; the module being imported is finished, the rest is left to
    the job.

    At most one standby per core but one preloads at a time (lock files in LAB_RUNS): three at
    once, 3-4 CPU-seconds each, took the running job's CPU on 2 cores and stretched its own steps
    and evals, which is card time lost too. (A nice'd thread was tried: a job handed to a standby
    half-way through then waited for the rest at the lowest priority, 4 s once.)

    `cuda`: make the CUDA context too; by default where QUEUE.standby_cuda_init says so (never
    in a fork server: a forked child cannot use its parent's context).
    """
    if cuda is None:
        cuda = lane == "gpu" and q.standby_cuda_init
    # A slot per core but one (that one is the running job's): one at a time on 2 cores.
    runs = Path(config.paths().runs)
    slots = [runs / f"standby-preload.{i}.lock" for i in range(max(1, (os.cpu_count() or 2) - 1))]
    lock = None
    while lock is None and runs.is_dir():  # no runs directory to hold the slots: preload at once
        lock = _take_slot(slots)
        if lock is None and stop.wait(0.05):
            return  # the job came first: it imports what it needs itself
    t0 = time.monotonic()
    state = standby_state_path(runs, os.getpid(), "loading")
    try:
        _touch(state)  # for ProcessPool.take: a standby that is further along is handed the job
        for kind in jobs.kind_names():
            jobs.get_kind(kind)  # the kinds' own modules (a light standby imports only its job's)
        steps = list(PRELOAD)
        if cuda:
            # QUEUE.standby_cuda_init: the context (its VRAM) is made by the first allocation;
            # held while this standby waits, beside the running job. Right after torch: the first
            # step needs it, the harness does not.
            at = next(i for i, (name, _) in enumerate(steps) if name == "the first optimizer")
            steps.insert(at + 1, ("the CUDA context", _cuda_context))
        for name, load in steps:
            if stop.is_set():
                _say(f"lab: standby pid {os.getpid()}: its job came {time.monotonic() - t0:.2f} s into "
                     f"the preload, before {name}")
                state.unlink(missing_ok=True)
                return
            load()
        _say(f"lab: standby pid {os.getpid()} preloaded torch{' and a CUDA context' if cuda else ''} "
             f"in {time.monotonic() - t0:.2f} s")
        try:
            if stop.is_set():  # handed a job meanwhile: the pool has forgotten this standby
                state.unlink(missing_ok=True)
            else:
                state.rename(standby_state_path(runs, os.getpid(), "ready"))
        except OSError:
            pass
    except Exception as e:
        _say(f"lab: standby pid {os.getpid()}: preload failed ({type(e).__name__}: {_first_line(e)})")
    finally:
        if lock is not None:
            lock.close()  # the next standby's turn (also when a job came half-way)


def fresh_code(job_id: int, attempt: int, loaded: str, head: str) -> None:
    """A standby that loaded an older commit than HEAD replaces itself with a fresh process for
    the job (same pid: the supervisor watches on), so the job runs the code its files record."""
    _say(f"lab: this standby loaded commit {loaded[:12]}, HEAD is now {head[:12]}; restarting as a "
         "fresh process")
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        pass
    os.execv(sys.executable, [sys.executable, "-m", "workers.run", str(job_id), str(attempt)])


def main(argv: list[str], watch: HeadWatch | None = None) -> int:
    """`watch`: a forked standby's, taken by its fork server (workers.fork_server) before it
    preloaded; a standby started with python takes its own."""
    q = config.queue_config()
    store = Store(config.paths().db, create=False)
    loaded = ""  # the commit a standby's code is from
    if argv and argv[0] == "--standby":
        # The commit the daemon saw before starting us, before any of our imports; checked now,
        # once, against git, and the watch taken: a commit meanwhile makes this standby stale.
        watch = watch if watch is not None else HeadWatch()
        loaded = os.environ.get(COMMIT_ENV) or watch.commit
        stale = watch.commit != loaded
        lane = "cpu" if os.environ.get("CUDA_VISIBLE_DEVICES") == "" else "gpu"
        if lane == "gpu":
            # A GPU-lane standby names its card now (nvidia-smi takes tens of ms, seconds without
            # persistence mode), not while the lane waits; a CPU lane's has CUDA_VISIBLE_DEVICES=""
            # (workers.supervise.lane_env) and never takes the lock.
            gpu_lock.lock_path()
        loader, stop = None, threading.Event()
        if os.environ.get(PRELOAD_ENV) == "torch":
            # A thread, so a light job handed over meanwhile need not wait for torch's import; a
            # training job waits for the module in progress below (then imports the rest itself).
            loader = threading.Thread(target=preload, args=(lane, q, stop), name="preload", daemon=True)
            loader.start()
        elif os.environ.get(PRELOAD_ENV) == "forked" and lane == "gpu" and q.standby_cuda_init:
            # Forked with everything but the CUDA context, which is per process.
            loader = threading.Thread(target=_cuda_context, name="cuda-context", daemon=True)
            loader.start()
        got = standby(store)
        if got is None:
            return 0
        job_id, attempt = got
        if stale or watch.moved():
            head = git_commit()
            if stale or head != loaded:
                fresh_code(job_id, attempt, loaded, head)
        set_loaded_commit(loaded)  # HEAD still: what the job's records name, without asking git
        job = store.get(job_id)
        if loader is not None:
            stop.set()
            if job is not None and job["kind"] in TRAINING_KINDS:
                loader.join()  # not two threads importing the same modules at once
    else:
        job_id, attempt = int(argv[0]), int(argv[1])
        job = store.get(job_id)
    if job is None or job["status"] != "running" or job["attempts"] != attempt:
        _say(f"lab: job {job_id} attempt {attempt} is not ours to run (status "
             f"{job and job['status']}); exiting")
        return 0
    run_dir = Path(job["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    keeper = LeaseKeeper(store, job, q)
    keeper.start()
    if job["lane"] == "gpu":
        def waiting() -> None:
            path = gpu_lock.lock_path()
            _say(f"lab: waiting for the GPU lock of {gpu_lock.card_name()}: "
                 f"{gpu_lock.describe_holder(path)} holds the card")
            # the event is shown by `lab show` and MCP: the pid only, not another user's command line
            pid = gpu_lock.holder_pid(path)
            store.add_event(job_id, "waiting", f"{'pid ' + str(pid) if pid else 'another process'} "
                            "holds the GPU lock")
        # Per card, machine-wide, not per LAB_RUNS: another daemon's job or a foreground cuda run
        # on this machine holds the same lock. Held until this process exits or gives the card back.
        gpu_lock.acquire(on_wait=waiting)
    if not store.mark_started(job_id, attempt, os.getpid()):
        _say(f"lab: job {job_id} attempt {attempt} was taken away before it started")
        return 0
    keeper.started_at = time.time()
    _say(f"lab: job {job_id} ({job['kind']}, lane {job['lane']}) attempt {attempt} started, "
         f"pid {os.getpid()}" + (f", code of commit {loaded} (loaded before the job came)" if loaded else ""))
    ctx = WorkerContext(store, job_id, attempt, run_dir, job["lane"])
    try:
        kind = jobs.get_kind(job["kind"])
        # Checked again here, where the files are read: a row written into the queue by hand (or
        # queued before a rule changed) meets the same paths rule as one `lab submit` queued.
        check_spec_paths(job["kind"], job["spec"])
        spec = jobs.parse_spec(job["kind"], job["spec"])
        result = kind.run(spec, ctx)
        # Its frames (the model) are gone: the result is formatted and recorded off the card. Not
        # on a failure: a traceback can still hold the model's memory until the exit.
        ctx.release_card()
        result = json.loads(json.dumps(result, default=str))  # JSON-able, or fail here, loudly
    except SystemExit as e:
        # sys.exit(n) in a kind is the job's own exit code: recorded here, so it fails at once
        # whether or not a daemon watches (a lease sweep would requeue it).
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        keeper.done.set()
        record_outcome(store, q, job_id, attempt, "failed", exit_code=code, progress=ctx.final_progress(),
                       error=f"exited with code {code}" + ("" if code else " without recording a result"))
        return code
    except Exception as e:
        try:
            traceback.print_exc()
            sys.stdout.flush()
        except OSError:
            pass  # a full disk: the store gets the reason below all the same
        keeper.done.set()
        record_outcome(store, q, job_id, attempt, "failed", exit_code=1, error=f"{type(e).__name__}: {e}",
                       progress=ctx.final_progress())
        return 1
    keeper.done.set()
    record_outcome(store, q, job_id, attempt, "succeeded", exit_code=0, result=result,
                   progress=ctx.final_progress())
    _say(f"lab: job {job_id} succeeded")
    return 0


def leave(code: int) -> None:
    """The outcome is in the store and the kind has closed its files: run the atexit handlers and
    leave without the interpreter's teardown (~0.1 s, all of it dead time on the GPU lane)."""
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        pass
    os._exit(code)


if __name__ == "__main__":
    leave(main(sys.argv[1:]))
