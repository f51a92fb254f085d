"""Start one job attempt as a subprocess in its own process group and watch it until it ends.

The daemon calls `run_job` from a huey worker thread. It renews the lease, enforces the job's
timeout and a cancel request (SIGTERM to the whole group, `kill_grace_seconds`, then SIGKILL), and
on daemon shutdown past the deadline kills the attempt and puts the job back in the queue. When
the process ends without having recorded its own outcome, the reason is recorded here (the signal
name, the exit code, the job's own reason for stopping itself, the timeout or the cancel), and
what follows is the one retry policy of `run_job`. Its own writes to the job's log are best
effort: on a full disk the reason must still reach the store.

A GPU-lane job process gets the write end of a pipe (its fd in LAB_CARD_FD): it writes
"released" once its card work is over and it has given the GPU lock back (workers.run
WorkerContext.release_card), and `run_job` calls `on_card_released` at that moment, so the
daemon can start the next GPU job while this one finishes its CPU-only tail. This attempt is
still watched, timed and recorded as before until its process exits.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import config
from store import Store
from workers.forked import EXIT_LOST, PRELOAD_ENV, ForkedProcess, ForkServer, proc_stat

# A job's process: started with python, or forked by its lane's fork server (workers.forked).
JobProcess = subprocess.Popen | ForkedProcess

# Written into the run dir by a job that stops itself (workers.run.LeaseKeeper.stop_self), for
# this supervisor: the database may be what the job cannot reach, so its reason goes to a file.
STOPPED_FILE = "stopped-itself.json"
# The fd number of the write end of a GPU-lane job's "card released" pipe (see the docstring).
CARD_FD_ENV = "LAB_CARD_FD"
RELEASED = b"released\n"


def start_job_process(args: list[str], env: dict[str, str], log: Any, stdin: Any, gpu: bool
                      ) -> tuple[subprocess.Popen, int | None]:
    """`python -m workers.run ARGS` in a session of its own, its output in `log`; on the GPU lane
    with the write end of a new "card released" pipe (its number in env[CARD_FD_ENV]). Returns
    the process and the pipe's read end (None off the GPU lane), which the caller owns."""
    r, w = os.pipe() if gpu else (None, None)
    if w is not None:
        env[CARD_FD_ENV] = str(w)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "workers.run", *args], stdin=stdin, stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                pass_fds=() if w is None else (w,))
    except BaseException:
        if r is not None:
            os.close(r)
        raise
    finally:
        if w is not None:
            os.close(w)  # the child's alone: its exit is then an EOF here
    return proc, r


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group; /proc where it exists."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []  # nobody left: the common case after a job, without reading all of /proc (ms)
    except PermissionError:
        pass
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except (ProcessLookupError, PermissionError):
            return []
    out = []
    for d in proc.iterdir():
        fields = proc_stat(int(d.name)) if d.name.isdigit() else None
        if fields is not None and fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(d.name))
    return out


def kill_group(proc: JobProcess, grace: float) -> None:
    """SIGTERM to the group, up to `grace` seconds for all of it to end, then SIGKILL."""
    pgid = proc.pid
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc.poll() is not None and not group_members(pgid):
            return
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


class ExitWaiter:
    """waiter(timeout) -> True once `proc` has exited (and is reaped), waking the moment it exits:
    a pidfd on Linux. Popen.wait(timeout) polls with sleeps of up to 50 ms, and every ms of it
    between a job's exit and the next job's start is dead time on the GPU lane.

    With `card_fd` (the read end of the job's "card released" pipe, which it then owns) it also
    wakes the moment the job writes "released" and calls `on_released` once, from the waiting
    thread: the card is free then, seconds of tail before the exit."""

    def __init__(self, proc: JobProcess, card_fd: int | None = None,
                 on_released: Callable[[], None] | None = None):
        self.proc = proc
        self.fd: int | None = None
        self.card_fd, self.on_released = card_fd, on_released
        self._said = b""
        try:
            self.fd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):  # not Linux >= 5.3 (Popen.wait then), or already reaped
            pass

    def _read_card(self) -> None:
        assert self.card_fd is not None
        try:
            chunk = os.read(self.card_fd, 64)
        except OSError:
            chunk = b""
        self._said += chunk
        if RELEASED in self._said or not chunk:
            # Said, or EOF (the process exited or closed it unsaid): nothing more to read.
            os.close(self.card_fd)
            self.card_fd = None
            if RELEASED in self._said and self.on_released is not None:
                self.on_released()

    def __call__(self, timeout: float) -> bool:
        if self.proc.returncode is not None:
            return True
        if self.fd is None:
            if self.card_fd is not None:
                readable, _, _ = select.select([self.card_fd], [], [], timeout)
                if readable:
                    self._read_card()
                timeout = 0.0 if readable else 0.001
            try:
                self.proc.wait(timeout=timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        fds = [self.fd] if self.card_fd is None else [self.fd, self.card_fd]
        readable, _, _ = select.select(fds, [], [], timeout)
        if self.card_fd is not None and self.card_fd in readable:
            self._read_card()
        if self.fd in readable:
            self.proc.wait()
            return True
        return False

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.card_fd is not None:
            os.close(self.card_fd)
            self.card_fd = None


def describe_exit(rc: int) -> str:
    if rc == EXIT_LOST:
        return "ended; its exit status was lost with its fork server"
    if rc < 0:
        try:
            return f"killed by signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    if rc == 0:
        return "exited with code 0 without recording a result"
    return f"exited with code {rc}"


def job_env(job: dict[str, Any], db: str, runs: Path, host: str) -> dict[str, str]:
    return lane_env(job["lane"], db, runs, host)


def lane_env(lane: str, db: str, runs: Path, host: str) -> dict[str, str]:
    env = dict(os.environ, LAB_DB=db, LAB_RUNS=str(runs), LAB_HOST=host, PYTHONUNBUFFERED="1")
    # A job never talks to GitHub; the bridge does, in the daemon. None of the token's sources
    # reaches a job (the descriptor itself is /dev/null by now: the daemon read it at start).
    for name in ("GITHUB_TOKEN", "GITHUB_TOKEN_FD", "GITHUB_TOKEN_FILE", "CREDENTIALS_DIRECTORY"):
        env.pop(name, None)
    if lane == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU job never touches the card
    return env


# Kinds whose `run` trains or evaluates a model (imports torch, models/ and harness/): a standby
# for a lane that runs them imports all that ahead of time (workers.run.preload). The others
# (sleep, tokenize, archive) get a light standby, which starts in a tenth of the time and does
# not load the CPUs while short jobs follow each other.
TRAINING_KINDS = frozenset({"smoke", "train", "eval", "ablation"})
# Env of a standby: the commit whose code it loads (it re-executes itself if HEAD moved before
# its job came: workers.run.main); PRELOAD_ENV (workers.forked) says what it loads.
COMMIT_ENV = "LAB_STANDBY_COMMIT"


class HeadWatch:
    """The commit checked out now, and later: has HEAD moved since? Asking git (common.git_commit)
    costs 10-20 ms of a job's start on 2 cores, so the standby asks the files instead: HEAD, the
    branch's ref, packed-refs and a reftable's table list. git rewrites each by a rename, so a
    commit (or a checkout) changes the inode, mtime or size of one of them; only then is git
    asked. Where git cannot name those files (no git, an odd layout), git is asked every time.
    One git call names the files and the commit; they are stamped right after it (a commit
    landing in those microseconds is the one case missed)."""

    def __init__(self) -> None:
        here = Path(__file__).resolve().parent  # the checkout this code runs from, as git_commit
        self.paths: list[Path] | None = None
        self.commit = "unknown"
        try:
            out = subprocess.run(
                ["git", "rev-parse", "--git-common-dir", "--git-path", "HEAD", "--git-path", "packed-refs",
                 "--git-path", "reftable/tables.list", "HEAD", "--symbolic-full-name", "HEAD"],
                cwd=here, capture_output=True, text=True, timeout=10)
            lines = out.stdout.splitlines()
            if out.returncode == 0 and len(lines) == 6:
                common, head, packed, tables, self.commit, ref = lines
                self.paths = [here / head, here / packed, here / tables]
                if ref != "HEAD":  # on a branch (detached: HEAD holds the commit itself)
                    self.paths.append(here / common / ref)
        except (OSError, subprocess.SubprocessError):
            pass
        self.stamp = self._stamp(self.paths)

    @staticmethod
    def _stamp(paths: list[Path] | None) -> tuple[tuple[int, int, int] | None, ...] | None:
        if paths is None:
            return None
        out = []
        for path in paths:
            try:
                st = path.stat()
                out.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError:
                out.append(None)  # absent (a ref only in packed-refs): appearing is a change too
        return tuple(out)

    def moved(self) -> bool:
        return self.stamp is None or self._stamp(self.paths) != self.stamp


class Head:
    """HEAD's commit for the pool, asking git only when HeadWatch says it moved (the scheduler
    asks every heartbeat)."""

    def __init__(self) -> None:
        self.watch = HeadWatch()

    def __call__(self) -> str:
        if self.watch.moved():
            self.watch = HeadWatch()
        return self.watch.commit


def standby_state_path(runs: Path, pid: int, state: str) -> Path:
    """`runs/standby-<pid>.loading` while a standby preloads, `.ready` once it has: the pool
    hands a training job to the one furthest along."""
    return runs / f"standby-{pid}.{state}"


@dataclass
class Standby:
    proc: JobProcess
    commit: str  # HEAD when it was started, before it imported anything
    heavy: bool  # preloads torch and the training modules (or was forked with them loaded)
    card_fd: int | None = None  # the GPU lane's: the read end of its "card released" pipe
    forked: bool = False  # by the lane's fork server: everything is loaded already

    def close_pipe(self) -> None:
        if self.card_fd is not None:
            os.close(self.card_fd)
            self.card_fd = None


class ProcessPool:
    """Job processes started ahead of time (`workers.run --standby`), per lane: when a job comes,
    python and the imports are already loaded, which is most of the GPU lane's dead time between
    two jobs, and for a training job also torch, the models and the sample data (most of the
    card's idle time between two jobs). A standby holds no lock and no job; it exits when its
    stdin closes (also when the daemon dies).

    A standby's code is that of the commit it was started at: `warm` retires those whose commit
    is no longer HEAD (the scheduler calls it every heartbeat), and one handed a job after a
    commit re-executes itself before it starts, so a job never runs old code while its files
    record the new commit. `head` is a parameter so a test can move HEAD without a git commit.

    A lane forks its standbys from its fork server (workers.forked; one per lane and commit,
    QUEUE.standby_fork): the preload is paid once per commit, not once per job, so short jobs no
    longer outrun the supply. Where the lane trains the server preloads torch, and until it is
    ready the lane has light standbys (those its light server forked, else started with
    python); elsewhere it is light itself (the queue's code: ready in a python's start-up time)
    and the lane waits for its forks, not starting pythons beside it (a job that comes first
    gets a fresh one)."""

    def __init__(self, db: str, runs: Path, host: str, head: Callable[[], str] | None = None):
        self.db, self.runs, self.host = db, runs, host
        self.head = head if head is not None else Head()
        self._ready: dict[str, list[Standby]] = {}
        self._retired: list[JobProcess] = []  # stdin closed, not yet reaped
        self._pipes: dict[int, int] = {}  # pid of a handed-over GPU standby -> its card pipe's read end
        # The kinds of the lane's last jobs (or of its first queued one at start): whether its
        # next standbys preload torch.
        self._recent: dict[str, deque[str]] = {}
        # A lane forks its standbys from a process that loaded once per commit (torch where it trains).
        self._servers: dict[str, ForkServer] = {}
        self._old_servers: list[ForkServer] = []  # retired, exiting once their children have
        # (lane, heavy) -> the commit whose server of that kind died before it was ready
        self._server_failed: dict[tuple[str, bool], str] = {}
        # lane -> no standby start before (monotonic), but one if none is left; no start at all
        # before `_strict_until` (a training job's start: QUEUE.handover_train_seconds)
        self._quiet_until: dict[str, float] = {}
        self._strict_until: dict[str, float] = {}
        self._lock = threading.RLock()
        self.closed = False

    def _spawn(self, lane: str, commit: str) -> Standby:
        """A standby for `lane`: forked when its fork server is ready and has what the lane
        needs; else started with python, preloading for itself only where there is no fork
        server to wait for (QUEUE.standby_fork off), light otherwise (the server's forks replace
        it)."""
        heavy = self.wants_torch(lane)
        with self._lock:
            server = self._servers.get(lane)
            if (server is not None and server.commit == commit and server.ready.is_set()
                    and (server.heavy or not heavy)):
                try:
                    proc, r = server.fork(card=lane == "gpu")
                    return Standby(proc, commit, server.heavy, r, forked=True)
                except OSError as e:  # it died or hangs: retired; standbys start with python meanwhile
                    print(f"lab: the {lane} lane's fork server did not fork ({e}); starting a standby "
                          "with python", file=sys.stderr)
                    self._drop_server(lane)
            preloading = heavy and not self._can_fork(lane, commit, heavy)
        env = lane_env(lane, self.db, self.runs, self.host)
        env[COMMIT_ENV], env[PRELOAD_ENV] = commit, "torch" if preloading else "light"
        with open(self.runs / "workers.log", "ab") as log:  # start-up errors before a job is assigned
            proc, r = start_job_process(["--standby"], env, log, subprocess.PIPE, lane == "gpu")
        return Standby(proc, commit, preloading, r)

    def _server(self, lane: str, head: str, heavy: bool) -> ForkServer | None:
        """The lane's fork server for `head`, started if there is none or the lane now trains and
        it is light (it is ready some time later and then tops the lane up); a server that
        preloaded torch also serves light jobs. None when forking is off or the server for `head`
        died before it was ready (standbys then start with python until HEAD moves)."""
        if not config.queue_config().standby_fork:
            return None
        server = self._servers.get(lane)
        too_light = heavy and server is not None and not server.heavy
        if server is not None and (server.commit != head or not server.alive() or too_light):
            self._drop_server(lane)
            server = None
        if server is None and self._can_fork(lane, head, heavy) and not self.closed:
            env = lane_env(lane, self.db, self.runs, self.host)
            env[COMMIT_ENV] = head
            server = ForkServer(env, head, self.runs / "workers.log", on_ready=lambda: self._refill(lane),
                                heavy=heavy)
            self._servers[lane] = server
        return server

    def _can_fork(self, lane: str, commit: str, heavy: bool) -> bool:
        """Forking is on, and the lane's server of this kind for `commit` has not died before it
        was ready."""
        return config.queue_config().standby_fork and self._server_failed.get((lane, heavy)) != commit

    def _drop_server(self, lane: str) -> None:
        server = self._servers.pop(lane, None)
        if server is None:
            return
        if not server.ready.is_set() and server.proc.poll() is not None:
            # not again for this commit: it cannot load
            self._server_failed[(lane, server.heavy)] = server.commit
        server.retire()  # it exits once its children (running jobs among them) have
        self._old_servers.append(server)

    @staticmethod
    def size(lane: str) -> int:
        q = config.queue_config()
        return q.standby_gpu if lane == "gpu" else q.standby_cpu

    def expect(self, lane: str, kind: str) -> None:
        """The lane is about to run `kind` (the daemon's first queued job at start)."""
        with self._lock:
            self._recent.setdefault(lane, deque(maxlen=self.size(lane) + 1)).append(kind)

    def wants_torch(self, lane: str) -> bool:
        # Unknown (nothing ran or waits yet): light; the first training job after an idle start
        # is then cold, every one that follows it is not.
        if not config.queue_config().standby_preload:
            return False
        return any(k in TRAINING_KINDS for k in self._recent.get(lane, ()))

    def _progress(self, standby: Standby) -> int:
        for rank, state in ((2, "ready"), (1, "loading")):
            if standby_state_path(self.runs, standby.proc.pid, state).exists():
                return rank
        return 0

    def _forget(self, pid: int) -> None:
        for state in ("ready", "loading"):
            standby_state_path(self.runs, pid, state).unlink(missing_ok=True)

    def _retire(self, standby: Standby) -> None:
        self._forget(standby.proc.pid)
        standby.close_pipe()
        try:
            if standby.proc.stdin is not None:
                standby.proc.stdin.close()  # "not needed after all": it exits by itself
        except OSError:
            pass
        self._retired.append(standby.proc)

    def warm(self, lane: str) -> None:
        """Top the lane up to its size, first retiring standbys of an older commit and, when the
        lane now trains, light ones (they would import torch only once handed a job). Within a
        hand-over's quiet time (`refill`) it only retires, or after a light job's hand-over
        starts one standby where none is left."""
        head = self.head()  # a git subprocess: outside the lock, and never on a job's start path
        with self._lock:
            self._retired = [p for p in self._retired if p.poll() is None]
            self._old_servers = [s for s in self._old_servers if s.proc.poll() is None]
            ready = self._ready.setdefault(lane, [])
            heavy = self.wants_torch(lane)
            server = self._server(lane, head, heavy)
            # A light standby on a lane that trains makes way once a loaded one can be had now.
            loaded_now = heavy and (server is None or server.ready.is_set())
            # A retired server still reports its children's exit statuses until they are gone.
            reporting = {x.proc.pid for x in (server, *self._old_servers)
                         if x is not None and x.proc.poll() is None}
            keep = []
            for s in ready:
                if s.proc.poll() is not None:
                    s.close_pipe()
                    continue
                # Forked by a server that died: its exit status could be lost.
                orphan = s.forked and getattr(s.proc, "server_pid", None) not in reporting
                if s.commit != head or (loaded_now and not s.heavy) or orphan:
                    self._retire(s)
                else:
                    keep.append(s)
            ready[:] = keep
            now = time.monotonic()
            quiet = now < self._quiet_until.get(lane, 0.0)
            if now < self._strict_until.get(lane, 0.0) or (quiet and ready):
                return
            if server is not None and not server.heavy and not server.ready.is_set():
                return  # its on_ready tops the lane up with forks
            # Quiet, but none left: one now. Light jobs coming faster than the quiet time would
            # otherwise use the lane up and each wait for a start of its own, which costs the
            # next job more than sharing the cores with it costs this one.
            want = 1 if quiet else self.size(lane)
            while not self.closed and len(ready) < want:
                ready.append(self._spawn(lane, head))

    def take(self, job: dict[str, Any], log_path: Path) -> JobProcess:
        """A process running `job`: the oldest standby that preloaded what the job needs if one
        is alive, else the oldest, else a fresh one. The caller tops the pool up (`warm`) once
        the job is under way: a new python starting now would take CPU from this job's start."""
        heavy = job["kind"] in TRAINING_KINDS
        with self._lock:
            self._recent.setdefault(job["lane"], deque(maxlen=self.size(job["lane"]) + 1)).append(job["kind"])
            ready = []
            for s in self._ready.get(job["lane"], []):
                if s.proc.poll() is None:
                    ready.append(s)
                else:
                    s.close_pipe()
            pick = None
            if heavy:  # forked or preloaded, then preloading, then waiting for a slot; oldest first
                fit = [s for s in ready if s.heavy]
                pick = max(fit, key=lambda s: 2 if s.forked else self._progress(s), default=None)
            if pick is None and ready:
                pick = ready[0]
            if pick is not None:
                ready.remove(pick)
                self._forget(pick.proc.pid)
            self._ready[job["lane"]] = ready
        line = f"{job['id']} {job['attempts']} {log_path}\n".encode()
        for _ in range(2):
            if pick is None or pick.proc.poll() is not None:
                if pick is not None:
                    pick.close_pipe()
                pick = self._spawn(job["lane"], self.head())  # rare: none alive, or it died
            try:
                assert pick.proc.stdin is not None
                pick.proc.stdin.write(line)
                pick.proc.stdin.close()
                break
            except (BrokenPipeError, OSError):
                pick.close_pipe()
                pick = None
        assert pick is not None
        if pick.card_fd is not None:
            with self._lock:
                self._pipes[pick.proc.pid] = pick.card_fd
        return pick.proc

    def card_pipe(self, proc: JobProcess) -> int | None:
        """The read end of the "card released" pipe of a process `take` returned (the caller
        owns it now), or None off the GPU lane."""
        with self._lock:
            return self._pipes.pop(proc.pid, None)

    def refill(self, lane: str, training: bool = False) -> None:
        """`warm` a little later, in a thread of its own: after a hand-over, once the job's start
        is past (store read, GPU lock, mark started: QUEUE.handover_seconds; for a training job
        also its data, model and baseline eval: QUEUE.handover_train_seconds), so a new
        standby's start takes no CPU from it. Until then the lane's other refills (the
        heartbeat's `warm`, a fork server coming ready) start none either; `take` still starts
        one when no standby is left. A light job that took the lane's last standby has one
        started at once (`warm`: one if none is left), so short jobs do not use the lane up.
        The supervisor's thread goes back to watching at once."""
        q = config.queue_config()
        delay = max(q.handover_seconds, q.handover_train_seconds) if training else q.handover_seconds
        with self._lock:  # set before the timer starts, so its own warm comes after the window
            until = time.monotonic() + delay
            self._quiet_until[lane] = max(self._quiet_until.get(lane, 0.0), until)
            if training:
                self._strict_until[lane] = max(self._strict_until.get(lane, 0.0), until)
            used_up = not training and not self._ready.get(lane)
        for wait in (0.0, delay) if used_up else (delay,):
            timer = threading.Timer(wait, self._refill, args=(lane,))
            timer.daemon = True
            timer.start()

    def _refill(self, lane: str) -> None:
        try:
            self.warm(lane)
        except Exception as e:  # no process now (EAGAIN): the next take starts a fresh one
            print(f"lab: could not start a standby for lane {lane}: {e}", file=sys.stderr)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            servers = [*self._servers.values(), *self._old_servers]
            for server in servers:
                server.retire()
            self._servers, self._old_servers = {}, []
            # The servers last: a forked standby's exit status comes from its server. Closing a
            # server's stdin below makes it exit at once.
            procs = [s.proc for ready in self._ready.values() for s in ready] + self._retired
            procs += [server.proc for server in servers]
            for s in (s for ready in self._ready.values() for s in ready):
                s.close_pipe()
            for fd in self._pipes.values():
                os.close(fd)
            self._ready, self._retired, self._pipes = {}, [], {}
        for proc in procs:
            self._forget(proc.pid)
        for proc in procs:
            try:
                if proc.stdin is not None and not proc.stdin.closed:
                    proc.stdin.close()
                proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()


def _note(run_dir: Path, message: str) -> None:
    """A line in the job's log from the supervisor; best effort: on a full disk the store, not
    the log, must get the reason, and the supervisor must go on watching."""
    try:
        with open(run_dir / "log.txt", "a") as f:
            f.write(message + "\n")
    except OSError:
        pass


def _stopped_itself(run_dir: Path, attempt: int) -> str | None:
    """The reason the job process gave when it stopped itself (workers.run.LeaseKeeper), if it
    did in this attempt."""
    try:
        said = json.loads((run_dir / STOPPED_FILE).read_text())
    except (OSError, ValueError):
        return None
    return str(said["reason"]) if isinstance(said, dict) and said.get("attempt") == attempt else None


def could_not_start(store: Store, job: dict[str, Any], reason: str) -> str:
    """The lab could not start this attempt (its log cannot be written, no process): not the
    job's fault, so it is requeued like a death by signal, and the reason is in the store."""
    status = store.requeue_or_fail(job["id"], job["attempts"], reason)
    if status is None:
        row = store.get(job["id"])
        return row["status"] if row else "lost"
    return "requeued" if status == "queued" else status


def _open_log(run_dir: Path, line: str) -> None:
    """Create the run dir and append `line` to its log.txt, raising OSError when it cannot be
    written (ENOSPC, ENOTDIR, EACCES): a write, not just an open, since a full disk lets a file
    be created and refuses its first byte."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        pass  # a file where the run dir should be: the open below names the error (ENOTDIR)
    fd = os.open(run_dir / "log.txt", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _watch(store: Store, job: dict[str, Any], proc: JobProcess, ended: ExitWaiter,
           q: config.QueueConfig, stop_deadline: Callable[[], float | None]) -> tuple[str, str] | None:
    """Watch the attempt until its process exits: renew the lease, and stop its group on a
    cancel, a timeout, a lost lease or a shutdown past the deadline; returns (status, reason)
    when it stopped it, None when the process ended by itself."""
    job_id, attempt = job["id"], job["attempts"]
    run_dir = Path(job["run_dir"])
    ended_by: tuple[str, str] | None = None  # (status, reason) when we stopped it
    t0 = time.monotonic()
    # The claim renewed the lease a moment ago; the first look at the row (and the pid's write,
    # unless the job's mark_started wrote it) waits out the hand-over (QUEUE.handover_seconds).
    next_beat, next_check = t0 + q.heartbeat_seconds, t0 + q.handover_seconds
    pid_known = False
    db_down = False
    while not ended(0.05):
        t = time.monotonic()
        try:
            if t >= next_beat:
                next_beat = t + q.heartbeat_seconds
                store.heartbeat(job_id, attempt, q.lease_seconds)
            if t < next_check:
                continue
            next_check = t + min(0.5, q.heartbeat_seconds)
            row = store.get(job_id)
            if not pid_known and row is not None and row["attempts"] == attempt:
                # Known while the job waits for the GPU lock (lab show, a person's kill -9).
                pid_known = row["pid"] == proc.pid or store.set_pid(job_id, attempt, proc.pid)
        except Exception as e:  # a database blip: keep watching (the job's own watchdog fences it)
            if not db_down:
                _note(run_dir, f"lab: supervisor cannot reach the database ({type(e).__name__}); watching on")
            db_down = True
            continue
        db_down = False
        if row is None or row["status"] != "running" or row["attempts"] != attempt:
            if row is not None and row["status"] in ("succeeded", "failed", "cancelled"):
                continue  # the job recorded its end and is exiting: wait for it
            ended_by = ("lost", "the job was requeued or removed by someone else")
        elif row["cancel_requested"]:
            ended_by = ("cancelled", f"cancelled: {row['cancel_reason'] or 'by request'}")
        elif row["started_at"] is not None and time.time() - row["started_at"] > row["timeout_s"]:
            ended_by = ("failed", f"timed out after {row['timeout_s']:g} s")
        else:
            deadline = stop_deadline()
            if deadline is not None and t > deadline:
                ended_by = ("requeued", "daemon shut down before the job finished")
        if ended_by is not None:
            _note(run_dir, f"lab: {ended_by[1]}; stopping the process group")
            kill_group(proc, q.kill_grace_seconds)
            return ended_by
    return None


def run_job(store: Store, job: dict[str, Any], *, db: str, runs: Path, host: str,
            stop_deadline: Callable[[], float | None], pool: ProcessPool | None = None,
            on_card_released: Callable[[], None] | None = None) -> str:
    """Run one claimed attempt to its end; returns what became of it: succeeded, failed,
    cancelled, or requeued (daemon shutdown; or a death the retry policy requeues).
    `on_card_released` is called (from this thread) the moment a GPU-lane job says it gave the
    card back, before its tail; not at all if it never says so (it holds the card to its exit).

    The retry policy (README "Reliability"), the same as the lease sweep's when nobody watched:
    a death by a signal the lab did not send (an OOM kill, a segfault), a job that stopped itself
    (its lease watchdog), and an attempt the lab could not start are requeued with attempts + 1
    up to max_attempts, then failed; a nonzero exit of the job's own fails at once; a timeout
    or a cancel is final; a daemon shutdown requeues without counting the attempt."""
    q = config.queue_config()
    job_id, attempt = job["id"], job["attempts"]
    run_dir = Path(job["run_dir"])
    log_path = run_dir / "log.txt"
    try:
        _open_log(run_dir, f"lab: attempt {attempt} of {job['max_attempts']} on {host}\n")
    except OSError as e:
        return could_not_start(store, job, f"cannot write {log_path}: {e.strerror}")
    try:
        (run_dir / STOPPED_FILE).unlink(missing_ok=True)  # an earlier attempt's (lab retry counts from 1)
    except OSError:
        pass
    card_fd: int | None = None
    try:
        if pool is not None:
            proc = pool.take(job, log_path)
            card_fd = pool.card_pipe(proc)
        else:
            env = job_env(job, db, runs, host)
            with open(log_path, "ab") as log:
                proc, card_fd = start_job_process([str(job_id), str(attempt)], env, log, subprocess.DEVNULL,
                                                  job["lane"] == "gpu")
    except OSError as e:  # no process (EAGAIN, ENOMEM), or the log went away meanwhile
        return could_not_start(store, job, f"cannot start the job process: {e.strerror or e}")
    if pool is not None:
        pool.refill(job["lane"], training=job["kind"] in TRAINING_KINDS)
    ended = ExitWaiter(proc, card_fd, on_card_released)
    try:
        ended_by = _watch(store, job, proc, ended, q, stop_deadline)
    finally:
        ended.close()
    rc = proc.returncode
    leftovers = group_members(proc.pid)
    if leftovers:  # a child that outlived the job process: no job leaves processes behind
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    row = store.get(job_id)
    if row is None or row["status"] != "running" or row["attempts"] != attempt:
        if row is None:
            return "lost"
        return "requeued" if row["status"] == "queued" else row["status"]
    if ended_by is not None and ended_by[0] == "requeued":
        store.release(job_id, attempt, ended_by[1])
        return "requeued"
    if ended_by is not None and ended_by[0] in ("cancelled", "failed"):
        store.finish(job_id, attempt, ended_by[0], exit_code=rc, error=ended_by[1])
        return ended_by[0]
    # Ended by itself without a recorded outcome.
    said = _stopped_itself(run_dir, attempt)
    if said is not None or rc < 0:
        # Not from the lab (we sent nothing: ended_by is None), not the job's own verdict: the
        # same death with the daemon down is requeued by the lease sweep, so it is here too.
        why = f"stopped itself: {said}" if said is not None else describe_exit(rc)
        status = store.requeue_or_fail(job_id, attempt, why, exit_code=rc)
        if status is None:  # someone else ended or requeued it meanwhile
            row = store.get(job_id)
            return "lost" if row is None else ("requeued" if row["status"] == "queued" else row["status"])
        return "requeued" if status == "queued" else status
    store.finish(job_id, attempt, "failed", exit_code=rc, error=describe_exit(rc))
    return "failed"
