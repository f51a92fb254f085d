"""Chaos run of the queue: mixed GPU and CPU `sleep` jobs through `lab submit` while, at random
moments (random.Random(seed)), the daemon is killed, job processes are killed or frozen past
their lease, a second daemon joins the queue, and bursts of concurrent submits hit the store.

    .venv/bin/python bench/chaos.py [--jobs 60] [--actions 20] [--seed 7] [--backend sqlite|postgres]
                                    [--lease 6] [--tmp DIR] [--no-disk]

Actions (one drawn per moment):
- kill_daemon: `kill -9` of the daemon, restarted 0.5-2 s later (its running jobs are orphans
  that keep their own lease and finish);
- kill_job: `kill -9` of a started job's process (the store's `pid`, the group leader);
- stop_job: SIGSTOP of a started job's process for lease + 1-3 s, then SIGCONT;
- second_daemon: another `lab daemon` on the same queue and host (same LAB_RUNS, same GPU lock
  dir), stopped with SIGTERM 4-10 s later;
- burst: 20 concurrent `lab submit` (SQLite: writers queue on the busy timeout).

What is counted, and from where. The store's bookkeeping is what is under test, so overlap is
measured by the jobs themselves: a probe (a `sitecustomize` on the daemons' PYTHONPATH, which
job processes inherit) wraps `jobs.sleep.run` and appends one line per event to a journal:
`start` when the job's code begins (after the GPU lock), `tick` at each progress step, `end`
when it returns or raises. An attempt's execution interval is [start, last line]: a process
killed or frozen stops writing, so the interval covers exactly the time its code ran. A frozen
process that resumes and runs another step after a second attempt started shows as an overlap;
one that is stopped on resume before running any job code does not (it did nothing twice).
- run twice: two attempts (or pids) of one job whose intervals overlap;
- GPU overlaps: two GPU-lane attempts whose intervals overlap (the lane's one-card rule);
- lost: jobs not final by the deadline;
- lab errors: a `lab` call (submit, status, daemon) with an unexpected exit code or a traceback.
No GitHub is involved, so duplicate result comments are 0 by construction (printed for the
format). The last line:

    chaos seed 7 sqlite: 146 submitted, 140 succeeded, 0 lost, 0 run twice, 0 GPU overlaps,
    0 duplicate comments, 0 lab errors

Then a disk case (skipped with the reason where `mount -t tmpfs` is not allowed): LAB_RUNS on an
8 MiB tmpfs; one job saves a checkpoint (models.train.save_atomic), fills the disk, and tries
to save again; it must fail with the reason, the old checkpoint must stay readable, and the
lanes must go on (while full, and once space is freed).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import heapq
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ACTIONS = ("kill_daemon", "kill_job", "stop_job", "second_daemon", "burst")

# --- the probe (runs inside job processes) --------------------------------------------------

# Written as sitecustomize.py into a private dir on PYTHONPATH: every python process of the run
# imports it; only one that imports jobs.sleep gets the wrapper, and only when CHAOS_JOURNAL is
# set. No product file changes.
SITECUSTOMIZE = f"""\
import os, sys
if os.environ.get("CHAOS_JOURNAL"):
    sys.path.insert(0, {str(ROOT / "bench")!r})
    import chaos
    sys.path.pop(0)  # bench/ only for this import: its scripts must not shadow other modules
    chaos.install_probe()
"""


def _journal(**rec: Any) -> None:
    # One os.write of one short line on an O_APPEND fd: lines from concurrent processes do not
    # interleave (local file system, well under PIPE_BUF).
    rec["t"] = time.time()
    fd = os.open(os.environ["CHAOS_JOURNAL"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(rec) + "\n").encode())
    finally:
        os.close(fd)


def install_probe() -> None:
    """Wrap jobs.sleep.run when (if) jobs.sleep is imported in this process."""
    import importlib.abc
    import importlib.util

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
            if name != "jobs.sleep":
                return None
            sys.meta_path.remove(self)  # let the normal finders find it
            spec = importlib.util.find_spec(name)
            if spec is None or spec.loader is None:
                return spec
            loader: Any = spec.loader
            exec_module = loader.exec_module

            def exec_and_wrap(module: Any) -> None:
                exec_module(module)
                module.run = _probed(module.run)
            loader.exec_module = exec_and_wrap
            return spec

    sys.meta_path.insert(0, Finder())


def _probed(run: Callable[[Any, Any], dict[str, Any]]) -> Callable[[Any, Any], dict[str, Any]]:
    def probed(spec: Any, ctx: Any) -> dict[str, Any]:
        ids = {"job": getattr(ctx, "job_id", None), "attempt": getattr(ctx, "attempt", None),
               "pid": os.getpid(), "lane": getattr(ctx, "lane", None)}
        _journal(ev="start", **ids)
        progress = ctx.progress

        def ticked(step: int, total: int, **metrics: float) -> None:
            _journal(ev="tick", **ids)
            progress(step, total, **metrics)
        ctx.progress = ticked
        try:
            control = Path(os.environ.get("CHAOS_CONTROL", "/nonexistent"))
            if (control / f"fill-{ids['job']}").exists():
                _fill_disk(ctx.run_dir, control)
            return run(spec, ctx)
        finally:
            _journal(ev="end", **ids)
    return probed


def _fill_disk(run_dir: Path, control: Path) -> None:
    """The disk case's job: a good checkpoint, then a disk filled to ENOSPC, then a second
    checkpoint save, which must fail (and leave the first readable)."""
    import torch

    from models.train import save_atomic

    ckpt = run_dir / "last.pt"
    save_atomic({"step": 1, "w": torch.ones(64 * 1024)}, ckpt)
    (control / "checkpoint-saved").write_text(str(ckpt))
    with open(run_dir / "junk.bin", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (256 * 1024))
                f.flush()
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
    save_atomic({"step": 2, "w": torch.zeros(64 * 1024)}, ckpt)  # raises ENOSPC: the job fails


# --- the run --------------------------------------------------------------------------------

def _helpers() -> Any:
    # tests/helpers_daemon.py: the private queue env, real daemons, fresh Postgres databases.
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    import helpers_daemon

    return helpers_daemon


@dataclass
class Report:
    seed: int
    backend: str
    submitted: int = 0
    succeeded: int = 0
    lost: int = 0
    run_twice: int = 0
    gpu_overlaps: int = 0
    duplicate_comments: int = 0  # no GitHub in this run
    lab_errors: int = 0
    final: bool = False
    actions: list[dict[str, Any]] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)  # error -> count
    errors: list[str] = field(default_factory=list)  # what the lab errors were
    daemon_tracebacks: int = 0
    details: list[str] = field(default_factory=list)
    jobs: dict[int, dict[str, Any]] = field(default_factory=dict)

    def line(self) -> str:
        return (f"chaos seed {self.seed} {self.backend}: {self.submitted} submitted, {self.succeeded} "
                f"succeeded, {self.lost} lost, {self.run_twice} run twice, {self.gpu_overlaps} GPU "
                f"overlaps, {self.duplicate_comments} duplicate comments, {self.lab_errors} lab errors")


class Chaos:
    def __init__(self, env: dict[str, str], tmp: Path, seed: int, lease: float, log: Callable[[str], None]):
        self.h = _helpers()
        from store import Store

        self.env, self.tmp, self.lease, self.log = env, tmp, lease, log
        self.rng = random.Random(seed)
        self.store = Store(env["LAB_DB"])
        self.daemon: subprocess.Popen | None = None
        self.extra: list[subprocess.Popen] = []  # second daemons
        self.logs: dict[int, Path] = {}  # daemon pid -> its log
        self.backlog: list[tuple[str, float]] = []  # planned submits waiting for a free slot
        self.notes: list[str] = []  # what happened that is not an error
        self.pending: list[tuple[str, subprocess.Popen]] = []  # lab calls not yet reaped
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self.stopped: set[int] = set()  # pids under SIGSTOP
        self.errors: list[str] = []
        self.actions: list[dict[str, Any]] = []
        self._n = 0

    # lab calls, never waited on in the loop (a `lab submit` is ~0.5 s of python start-up)
    def lab_async(self, what: str, *args: str) -> None:
        proc = subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=ROOT, env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.pending.append((what, proc))

    def reap(self, block: bool = False) -> None:
        keep = []
        for what, proc in self.pending:
            if not block and proc.poll() is None:
                keep.append((what, proc))
                continue
            try:
                out, err = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                self.errors.append(f"{what}: hung for 120 s")
                continue
            if proc.returncode != 0 or "Traceback" in err or "Traceback" in out:
                tail = (err.strip().splitlines() or ["(no output)"])[-1][:200]
                self.errors.append(f"{what}: exit {proc.returncode}: {tail}")
        self.pending = keep

    def submit(self, lane: str, seconds: float, what: str = "submit") -> None:
        self.lab_async(f"{what} {lane} {seconds:g}", "submit", "sleep", "--lane", lane,
                       "--set", f"seconds={seconds:g}", "--json")

    def in_flight(self, what: str) -> int:
        return sum(1 for w, _ in self.pending if w.split(" ", 1)[0] == what)

    def start_daemon(self) -> subprocess.Popen:
        log = self.tmp / f"daemon-{time.monotonic_ns()}.log"
        proc = self.h.start_daemon(self.env, "--lanes", "gpu,cpu", "--cpu-workers", "2", log=log)
        self.logs[proc.pid] = log
        return proc

    def after(self, seconds: float, fn: Callable[[], None]) -> None:
        self._n += 1
        heapq.heappush(self.timers, (time.monotonic() + seconds, self._n, fn))

    def run_timers(self) -> None:
        while self.timers and self.timers[0][0] <= time.monotonic():
            heapq.heappop(self.timers)[2]()

    def victim(self) -> dict[str, Any] | None:
        """A job whose code runs now (started, with a live pid), not already frozen."""
        rows = [j for j in self.store.list_jobs(statuses=["running"])
                if j["started_at"] and j["pid"] and j["pid"] not in self.stopped
                and self.h.pid_alive(j["pid"])]
        return self.rng.choice(rows) if rows else None

    # --- actions --------------------------------------------------------------------------

    def act(self, kind: str) -> bool:
        """Do one action; False when it has no victim yet (retried a little later)."""
        rec: dict[str, Any] = {"action": kind, "at": round(time.time(), 3)}
        if kind == "kill_daemon":
            if self.daemon is None:
                return False  # killed a moment ago and not restarted yet: kill the restarted one
            self.daemon.send_signal(signal.SIGKILL)
            self.daemon.wait()
            pause = self.rng.uniform(0.5, 2.0)
            self.daemon = None

            def restart() -> None:
                self.daemon = self.start_daemon()
            self.after(pause, restart)
            rec["restart_after_s"] = round(pause, 2)
        elif kind in ("kill_job", "stop_job"):
            job = self.victim()
            if job is None:
                return False
            rec.update(job=job["id"], attempt=job["attempts"], pid=job["pid"], lane=job["lane"])
            pid = job["pid"]
            if kind == "kill_job":
                os.kill(pid, signal.SIGKILL)
            else:
                frozen = self.lease + self.rng.uniform(1.0, 3.0)
                os.kill(pid, signal.SIGSTOP)
                self.stopped.add(pid)

                def resume(pid: int = pid) -> None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)
                    self.stopped.discard(pid)
                self.after(frozen, resume)
                rec["frozen_s"] = round(frozen, 2)
        elif kind == "second_daemon":
            proc = self.start_daemon()
            self.extra.append(proc)
            life = self.rng.uniform(4.0, 10.0)
            self.after(life, lambda: proc.poll() is None and proc.send_signal(signal.SIGTERM))
            rec["stopped_after_s"] = round(life, 2)
        elif kind == "burst":
            # One burst at a time: 20 python start-ups are ~10 CPU-s; stacked bursts on 2 cores
            # starve everything (daemon start-ups took 30-60 s) and measure the box, not the queue.
            if self.in_flight("burst"):
                return False
            for _ in range(20):
                self.submit(self.rng.choice(["cpu", "cpu", "gpu"]), round(self.rng.uniform(0.1, 0.5), 2),
                            what="burst")
        self.actions.append(rec)
        self.log(f"action {json.dumps(rec)}")
        if not self.in_flight("status"):
            self.lab_async(f"status after {kind}", "status", "--json")  # the CLI answers mid-chaos
        return True

    # --- the whole run --------------------------------------------------------------------

    def run(self, n_jobs: int, kinds: list[str], deadline_s: float,
            seconds: tuple[float, float] = (0.5, 3.0)) -> None:
        window = max(10.0, 0.6 * n_jobs)  # submits and actions are spread over this many seconds
        submit_at = sorted(self.rng.uniform(0, window) for _ in range(n_jobs))
        act_at = sorted(self.rng.uniform(1.0, window) for _ in kinds)
        # (when to try, first try or None, kind): an action without a victim is retried for 30 s
        # from its first try; a waiting one does not hold up those due after it
        todo: list[tuple[float, float | None, str]] = [
            (at, None, kind) for at, kind in zip(act_at, kinds, strict=True)]
        self.daemon = self.start_daemon()
        t0 = time.monotonic()
        while submit_at or self.backlog or todo or self.timers:
            t = time.monotonic() - t0
            while submit_at and submit_at[0] <= t:
                submit_at.pop(0)
                # GPU jobs a third of the time: the one-card lane is the bottleneck
                lane, secs = self.rng.choice(["gpu", "cpu", "cpu"]), round(self.rng.uniform(*seconds), 2)
                self.backlog.append((lane, secs))
            while self.backlog and self.in_flight("submit") < 3:  # the steady stream, not a herd
                self.submit(*self.backlog.pop(0))
            if todo and todo[0][0] <= t:
                _, first, kind = todo.pop(0)
                first = t if first is None else first
                if not self.act(kind):
                    # no victim now (the daemon may be restarting), or a burst still runs: retry
                    if t - first < 30 or kind == "burst":
                        todo.append((t + 0.5, first, kind))
                        todo.sort(key=lambda x: x[0])
                    else:
                        self.actions.append({"action": kind, "skipped": "no started job for 30 s"})
                        self.log(f"action {kind} skipped: no started job for 30 s")
            self.run_timers()
            self.reap()
            if self.daemon is not None and self.daemon.poll() is not None:
                self.errors.append(f"daemon {self.daemon.pid} exited by itself with {self.daemon.returncode}")
                self.daemon = self.start_daemon()
            time.sleep(0.05)
        self.reap(block=True)
        self.wait_final(deadline_s - (time.monotonic() - t0))

    def wait_final(self, seconds: float) -> None:
        from store import FINAL

        deadline = time.monotonic() + max(seconds, 30.0)
        while time.monotonic() < deadline:
            if all(j["status"] in FINAL for j in self.store.list_jobs()):
                return
            time.sleep(0.2)

    def log_of(self, proc: subprocess.Popen) -> str:
        log = self.logs.get(proc.pid)
        return log.read_text(errors="replace") if log and log.exists() else ""

    def close(self) -> None:
        for pid in list(self.stopped):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        for proc in [*self.extra, *([self.daemon] if self.daemon else [])]:
            if proc.poll() is None:
                try:
                    self.h.stop_daemon(proc, timeout=30)
                except AssertionError as e:
                    self.errors.append(str(e))
            elif proc.returncode == -signal.SIGTERM and " lanes " not in self.log_of(proc):
                # SIGTERM before `lab daemon` installed its handler (still importing under load):
                # python's default action; it had registered nothing, so nothing is left behind.
                self.notes.append(f"daemon {proc.pid} got SIGTERM during its start-up: exit -15")
            elif proc.returncode not in (0, -signal.SIGKILL):
                self.errors.append(f"daemon {proc.pid} exited with {proc.returncode}")
        for what, proc in self.pending:
            proc.kill()
            proc.wait()
            self.errors.append(f"{what}: still running at the end")
        self.pending = []


def _attempts(journal: Path) -> dict[tuple[int, int, int], dict[str, Any]]:
    """(job, attempt, pid) -> {lane, start, end}: when the job's code ran, by its own clock."""
    out: dict[tuple[int, int, int], dict[str, Any]] = {}
    if not journal.exists():
        return out
    for line in journal.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        key = (r["job"], r["attempt"], r["pid"])
        a = out.setdefault(key, {"lane": r["lane"], "start": None, "end": r["t"]})
        if r["ev"] == "start":
            a["start"] = r["t"]
        a["end"] = max(a["end"], r["t"])
    return {k: a for k, a in out.items() if a["start"] is not None}


def _overlapping(spans: list[tuple[float, float, Any]]) -> list[tuple[Any, Any]]:
    spans = sorted(spans, key=lambda s: s[0])
    pairs = []
    for i, (_s1, e1, k1) in enumerate(spans):
        for s2, _e2, k2 in spans[i + 1:]:
            if s2 >= e1:
                break
            pairs.append((k1, k2))
    return pairs


def analyse(store: Any, journal: Path, report: Report) -> None:
    from store import FINAL

    rows = store.list_jobs()
    report.submitted = len(rows)
    report.succeeded = sum(j["status"] == "succeeded" for j in rows)
    report.lost = sum(j["status"] not in FINAL for j in rows)
    report.final = report.lost == 0
    for j in rows:
        report.jobs[j["id"]] = {"status": j["status"], "error": j["error"], "attempts": j["attempts"],
                                "lane": j["lane"]}
        if j["status"] == "failed":
            why = (j["error"] or "?").split(" (attempt")[0]
            report.failures[why] = report.failures.get(why, 0) + 1
    attempts = _attempts(journal)
    by_job: dict[int, list[tuple[float, float, Any]]] = {}
    for (job, attempt, pid), a in attempts.items():
        by_job.setdefault(job, []).append((a["start"], a["end"], (job, attempt, pid)))
    for job, spans in by_job.items():
        for k1, k2 in _overlapping(spans):
            report.run_twice += 1
            report.details.append(f"job {job} ran twice at once: attempts/pids {k1[1:]} and {k2[1:]}")
    gpu = [(a["start"], a["end"], k) for k, a in attempts.items() if a["lane"] == "gpu"]
    for k1, k2 in _overlapping(gpu):
        report.gpu_overlaps += 1
        report.details.append(f"GPU overlap: job {k1[0]} (attempt {k1[1]}) and job {k2[0]} (attempt {k2[1]})")


def daemon_tracebacks(tmp: Path) -> list[str]:
    out = []
    for f in sorted(tmp.glob("daemon-*.log")):
        lines = f.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            if line.startswith("Traceback"):
                tail = next((x for x in lines[i + 1:] if x and not x.startswith(" ")), "?")
                out.append(f"{f.name}: {tail[:200]}")
    return out


@contextlib.contextmanager
def backend_env(tmp: Path, backend: str, lease: float,
                log: Callable[[str], None]) -> Iterator[dict[str, str]]:
    """The private queue: tests/helpers_daemon.queue_env (LAB_DB, LAB_RUNS, LAB_GPU_LOCK_DIR under
    tmp), with the chaos probe on PYTHONPATH; Postgres gets a fresh database per run (dropped
    after) and Redis as broker when it answers (huey queue names are per daemon instance, so
    runs never share one)."""
    h = _helpers()
    site = tmp / "site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    control = tmp / "control"
    control.mkdir(exist_ok=True)
    extra = {
        "LAB_QUEUE_LEASE_SECONDS": f"{lease:g}",
        # heartbeats a tenth of the lease: the job's watchdog fences at 3/4 of it
        "LAB_QUEUE_HEARTBEAT_SECONDS": f"{lease / 10:g}",
        "CHAOS_JOURNAL": str(tmp / "journal.jsonl"),
        "CHAOS_CONTROL": str(control),
        "PYTHONPATH": os.pathsep.join(p for p in (str(site), str(ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    if backend == "sqlite":
        yield h.queue_env(tmp, **extra)
        return
    import pytest

    try:
        with h.fresh_postgres() as url:
            extra["LAB_DB"] = url
            try:
                extra["LAB_BROKER"] = h.redis_broker()
            except pytest.skip.Exception as e:
                log(f"redis not reachable ({e}); SqliteHuey beside LAB_RUNS as broker")
            log(f"postgres database {url.rsplit('/', 1)[1]} (fresh), "
                f"broker {extra.get('LAB_BROKER', 'sqlite')}")
            yield h.queue_env(tmp, **extra)
    except pytest.skip.Exception as e:
        raise SystemExit(f"chaos: postgres not available: {e}") from None


def run_chaos(tmp: Path, *, jobs: int, kinds: list[str] | None = None, actions: int = 20, seed: int = 7,
              backend: str = "sqlite", lease: float = 6.0, deadline_s: float | None = None,
              seconds: tuple[float, float] = (0.5, 3.0), log: Callable[[str], None] = print) -> Report:
    """One chaos run in `tmp`; `kinds` fixes the actions (else `actions` are drawn by the seed)."""
    rng = random.Random(seed)
    kinds = list(kinds) if kinds is not None else [rng.choice(ACTIONS) for _ in range(actions)]
    report = Report(seed=seed, backend=backend)
    with backend_env(tmp, backend, lease, log) as env:
        chaos = Chaos(env, tmp, seed, lease, log)
        try:
            chaos.run(jobs, kinds, deadline_s or 120.0 + 3.0 * jobs, seconds)
        finally:
            chaos.close()
            analyse(chaos.store, Path(env["CHAOS_JOURNAL"]), report)
            chaos.store.dispose()
        report.actions = chaos.actions
        report.errors = chaos.errors
        report.details += chaos.notes
        report.lab_errors = len(chaos.errors)
        tbs = daemon_tracebacks(tmp)
        report.daemon_tracebacks = len(tbs)
        report.details += [f"daemon log traceback: {t}" for t in tbs]
    return report


# --- the disk case --------------------------------------------------------------------------

def disk_case(tmp: Path, log: Callable[[str], None] = print) -> str:
    """LAB_RUNS on an 8 MiB tmpfs: the job that fills it, the checkpoint it had, the lanes after."""
    h = _helpers()
    runs = tmp / "tmpfs-runs"
    runs.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(runs)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return f"disk: skipped (mount -t tmpfs failed: {r.stderr.strip() or r.returncode})"
    try:
        with backend_env(tmp, "sqlite", 6.0, log) as env:
            # the disk guard at 1 MB: a full tmpfs is under it (no new GPU job), an empty one is not
            env.update(LAB_RUNS=str(runs), LAB_QUEUE_DISK_MIN_FREE_GB="0.001")
            from store import FINAL, Store

            store = Store(env["LAB_DB"])
            control = Path(env["CHAOS_CONTROL"])

            def submit(lane: str, seconds: float, priority: int = 0) -> int:
                res = h.lab(env, "submit", "sleep", "--lane", lane, "--set", f"seconds={seconds:g}",
                            "--priority", str(priority), "--json")
                assert res.returncode == 0, res.stderr
                return int(json.loads(res.stdout)["id"])

            filler = submit("cpu", 0.2)
            (control / f"fill-{filler}").write_text("")
            daemon = h.start_daemon(env, "--lanes", "gpu,cpu", "--cpu-workers", "1",
                                    log=tmp / "daemon-disk.log")
            try:
                job = h.wait_jobs(store, [filler], 120)[0]
                # jobs queued once the disk is full (its junk stays): 20 s to show what they do
                cpu_during = [submit("cpu", 0.3) for _ in range(4)]
                gpu_during = [submit("gpu", 0.3) for _ in range(2)]
                during = cpu_during + gpu_during
                t_end = time.monotonic() + 20
                while time.monotonic() < t_end and not all(
                        store.get(i)["status"] in FINAL for i in cpu_during):
                    time.sleep(0.2)
                full = {i: (store.get(i)["status"], store.get(i)["error"]) for i in during}
                free_full = shutil.disk_usage(runs).free
                paused = sorted({str(d['paused']) for d in store.daemons(alive_within=5)})
                ckpt = Path(job["run_dir"]) / "last.pt"
                import torch

                try:
                    step = torch.load(ckpt, weights_only=True)["step"]
                    readable = f"last.pt readable (step {step})"
                except Exception as e:  # noqa: BLE001 - the finding is what went wrong
                    readable = f"last.pt NOT readable ({type(e).__name__}: {e})"
                torn = sorted(p.name for p in Path(job["run_dir"]).glob(".last.pt.tmp-*"))
                # an operator frees the space: the lanes must go on
                (Path(job["run_dir"]) / "junk.bin").unlink(missing_ok=True)
                after = [submit("cpu", 0.3), submit("gpu", 0.3)]
                rows = h.wait_jobs(store, [*during, *after], 60)
            finally:
                h.stop_daemon(daemon)
                store.dispose()
    finally:
        subprocess.run(["umount", "-l", str(runs)], check=False)

    def summary(ids: list[int], table: dict[int, tuple[str, str | None]]) -> str:
        out: dict[str, int] = {}
        for i in ids:
            s, e = table[i]
            key = f"{s}: {e.splitlines()[0][:90]}" if e else s
            out[key] = out.get(key, 0) + 1
        return "; ".join(f"{n} {k}" for k, n in out.items())

    final = {r["id"]: (r["status"], r["error"]) for r in rows}
    log(f"disk: filler job {filler}: {job['status']}, error {job['error']!r}")
    log(f"disk: free while full: {free_full} bytes; daemon paused: {paused}")
    log(f"disk: while full, cpu jobs {summary(cpu_during, full)}; gpu jobs {summary(gpu_during, full)}")
    log(f"disk: in the end, queued-while-full jobs {summary(during, final)}; "
        f"submitted after freeing {summary(after, final)}")
    reason_ok = job["status"] == "failed" and "No space left" in (job["error"] or "")
    return (f"disk: filler {'failed with the reason' if reason_ok else 'did NOT fail with the reason'} "
            f"({job['error']!r}); {readable}{', torn temp files ' + str(torn) if torn else ''}; "
            f"while full: cpu {summary(cpu_during, full)}, gpu {summary(gpu_during, full)}; "
            f"after freeing: {summary(after, final)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=60, help="jobs submitted at random moments (bursts add more)")
    ap.add_argument("--actions", type=int, default=20, help="chaos actions")
    ap.add_argument("--seed", type=int, default=None, help="random.Random seed (default: drawn, printed)")
    ap.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--lease", type=float, default=6.0,
                    help="LAB_QUEUE_LEASE_SECONDS (short: frozen jobs outlive it)")
    ap.add_argument("--tmp", type=Path, default=None, help="keep the run's files here (default: a temp dir)")
    ap.add_argument("--no-disk", action="store_true", help="skip the full-disk case")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10_000)
    tmp = args.tmp or Path(tempfile.mkdtemp(prefix="lab-chaos-"))
    tmp.mkdir(parents=True, exist_ok=True)
    print(f"chaos: seed {seed}, backend {args.backend}, files in {tmp}", flush=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    disk = "disk: skipped (--no-disk)"
    if not args.no_disk:
        disk = disk_case(tmp / "disk", log)
    report = run_chaos(tmp / "chaos", jobs=args.jobs, actions=args.actions, seed=seed,
                       backend=args.backend, lease=args.lease, log=log)
    for why, n in sorted(report.failures.items(), key=lambda x: -x[1]):
        print(f"failed: {n} x {why}")
    print(f"actions: {len([a for a in report.actions if 'skipped' not in a])} done, "
          f"{len([a for a in report.actions if 'skipped' in a])} skipped: "
          + ", ".join(f"{k} {sum(a['action'] == k for a in report.actions if 'skipped' not in a)}"
                      for k in ACTIONS))
    for a in report.actions:
        if "job" in a:
            j = report.jobs.get(a["job"], {})
            print(f"{a['action']} job {a['job']} ({a['lane']}): then {j.get('status')} after "
                  f"{j.get('attempts')} attempt(s): {j.get('error')}")
    for d in report.details:
        print(d)
    for e in report.errors:
        print(f"lab error: {e}")
    print(disk)
    print(report.line(), flush=True)
    return 0 if (report.lost == report.run_twice == report.gpu_overlaps == report.lab_errors == 0) else 1


if __name__ == "__main__":
    raise SystemExit(main())
