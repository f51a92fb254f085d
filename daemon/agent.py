"""`lab agent`: the agent's loop, around the clock, without a person keeping a session open.

Each turn runs Claude Code headless in the checkout,

    claude -p <AGENT_TURN.md> --output-format json --max-turns N --mcp-config <agent>/mcp.json
           --allowedTools ...

so the project's `.claude/settings.json` applies (the guard hook, CUDA_VISIBLE_DEVICES="") and
the lab's MCP server is on hand. One turn at a time (an flock on `$LAB_RUNS/agent/lock`), and
only when there is something to do: the lab's attention list (daemon/attention.py, `lab next`)
is not empty, or a job has ended since the last turn. Otherwise the loop sleeps on an Event
(woken by SIGTERM/SIGINT), never polling in a busy loop.

A turn is capped in wall time (SIGTERM to its process group, a grace, SIGKILL) and in agentic
turns (claude's own --max-turns). A failed turn (non-zero exit, `is_error`, no JSON result, the
time cap) is followed by an exponential backoff, capped, reset by the next success: a broken
key or an outage must not burn money in a tight loop. Every turn appends one JSON line to
`$LAB_RUNS/agent/turns.jsonl` and keeps its whole stdout in `turn-<n>.json` (stderr beside it).

Stopping: SIGTERM/SIGINT stops a running turn and exits 0; a stop file (default
`$LAB_RUNS/agent/STOP`) stops the loop before its next turn (a running turn finishes) and
stays until the person removes it, so a restarted service exits again at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import common
import config

ROOT = Path(__file__).resolve().parent.parent
PROMPT_FILE = "AGENT_TURN.md"
SETTINGS_FILE = Path(".claude") / "settings.json"
# The logged argv shows this in place of the prompt: the prompt has a field of its own.
PROMPT_SLOT = "<prompt>"
# The agent needs no GitHub token (the daemon's bridge talks to GitHub), so none reaches it.
SECRET_ENV = ("GITHUB_TOKEN", "GITHUB_TOKEN_FILE", "GITHUB_TOKEN_FD", "CREDENTIALS_DIRECTORY")
# Store paths the agent's own `lab` commands and the MCP server must resolve the same way as
# this process, whatever directory they run in.
PATH_ENV = ("LAB_DB", "LAB_RUNS", "LAB_ARCHIVE", "LAB_DOCS")
RESULT_FIELDS = ("subtype", "is_error", "num_turns", "duration_ms", "duration_api_ms", "total_cost_usd",
                 "session_id")

Attention = Callable[[], dict[str, Any]]
JobsMark = Callable[[], float | None]
Say = Callable[[str], None]


class AgentError(RuntimeError):
    """The loop cannot start as asked (no claude, no prompt, no settings): nothing was run."""


class AlreadyRunning(RuntimeError):
    """Another `lab agent` holds the lock."""

    def __init__(self, path: Path, pid: int | None):
        self.path, self.pid = path, pid
        holder = f"pid {pid}" if pid else "a process whose pid is not written yet"
        super().__init__(f"another lab agent is running ({holder} holds {path})")


def agent_home() -> Path:
    """$LAB_RUNS/agent: the lock, the turn log, each turn's output, the loop's state."""
    return Path(config.paths().runs).expanduser().resolve() / "agent"


def find_claude(explicit: str | None = None) -> str:
    """--claude, else $LAB_CLAUDE, else `claude` on PATH."""
    name = explicit or os.environ.get("LAB_CLAUDE") or "claude"
    found = shutil.which(name)
    if found is None:
        raise AgentError(f"--claude: {name!r} is not an executable (give --claude PATH or set LAB_CLAUDE)")
    return found


def read_prompt(path: Path, max_chars: int) -> str:
    """The turn prompt: the file's text, refused when empty or longer than the cap (a prompt
    that large is a mistake, and it is sent on every turn)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise AgentError(f"prompt: cannot read {path}: {e.strerror or e}") from None
    if not text.strip():
        raise AgentError(f"prompt: {path} is empty")
    if len(text) > max_chars:
        raise AgentError(f"prompt: {path} has {len(text):,} characters; at most {max_chars:,} "
                         "(config AGENT.prompt_max_chars)")
    return text


def default_attention() -> dict[str, Any]:
    """The lab's attention list (`lab next`). Imported here: the loop still runs (waking on
    ended jobs only) on a checkout that does not have daemon/attention.py yet."""
    try:
        from daemon.attention import needs_attention
    except ImportError as e:
        return {"items": [], "running": [], "empty": True, "unavailable": f"daemon.attention: {e}"}
    return needs_attention()


class FinishedJobs:
    """The newest finished_at among the most recent finished jobs, read from the store. Not just
    the newest id: CPU jobs run in parallel, so a lower id can end after a higher one."""

    def __init__(self, limit: int):
        self.limit = limit
        self.store: Any = None

    def __call__(self) -> float | None:
        from store import FINAL, Store

        if self.store is None:
            self.store = Store(config.paths().db)
        rows = self.store.list_jobs(FINAL, limit=self.limit, newest_first=True)
        times = [float(r["finished_at"]) for r in rows if r.get("finished_at") is not None]
        return max(times) if times else None


def attention_keys(attention: dict[str, Any]) -> list[str]:
    """The keys of the attention list's items, in its order."""
    return [str(i.get("key", "?")) if isinstance(i, dict) else "?" for i in attention.get("items") or []]


def _names(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")


def attention_reason(keys: list[str], seen: set[str], since_ok: float | None, revisit: float) -> str | None:
    """Why the attention list calls for a turn, or None. Only items that the last successful
    turn did not see count: an item the agent cannot clear (no daemon alive: "ask the person")
    would otherwise start a paid turn every idle period, forever. Items that stay open are
    looked at again once `revisit` seconds have passed since that turn."""
    if not keys:
        return None
    new = [k for k in keys if k not in seen]
    if new:
        return f"attention: {len(keys)} item(s), new: {_names(new)}"
    if since_ok is None or since_ok >= revisit:
        return f"attention: {len(keys)} item(s) still open: {_names(keys)}"
    return None


def backoff_seconds(failures: int, base: float, cap: float) -> float:
    """base, 2*base, 4*base ... after 1, 2, 3 ... failures in a row, at most `cap`; 0 after none."""
    if failures <= 0:
        return 0.0
    return min(cap, base * 2 ** min(failures - 1, 60))


def mcp_server_command() -> list[str]:
    """`lab mcp` from the venv this loop runs in (else `python -m cli mcp` in the checkout)."""
    lab = Path(sys.executable).parent / "lab"
    return [str(lab), "mcp"] if lab.exists() else [sys.executable, "-m", "cli", "mcp"]


def absolute_paths(env: dict[str, str]) -> dict[str, str]:
    """LAB_DB, LAB_RUNS ... made absolute (a database URL stays as it is): the agent's commands
    run in the checkout, and must see the queue this loop sees."""
    out = {}
    for name in PATH_ENV:
        value = env.get(name)
        if value:
            out[name] = value if "://" in value else str(Path(value).expanduser().resolve())
    if "LAB_DB" not in out:
        out["LAB_DB"] = str(Path(config.paths().db).expanduser().resolve())
    if "LAB_RUNS" not in out:
        out["LAB_RUNS"] = str(Path(config.paths().runs).expanduser().resolve())
    return out


def claude_env(base: dict[str, str]) -> dict[str, str]:
    """The turn's environment: ours, no GitHub token, absolute store paths, and no GPU (the
    settings file says the same for the agent's commands; this covers claude itself)."""
    env = {k: v for k, v in base.items() if k not in SECRET_ENV}
    env.update(absolute_paths(base))
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def tail(path: Path, chars: int) -> str:
    """The last `chars` characters of a file ("" when absent)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - chars * 4))  # utf-8: at most 4 bytes a character
            return f.read().decode("utf-8", errors="replace")[-chars:]
    except OSError:
        return ""


def parse_result(text: str) -> dict[str, Any] | None:
    """Claude's `--output-format json` result object: the whole stdout, or else its last line
    that parses as an object with type "result" (a warning printed before it is tolerated)."""
    candidates = [text, *reversed(text.strip().splitlines())]
    for chunk in candidates:
        try:
            data = json.loads(chunk)
        except ValueError:
            continue
        if isinstance(data, dict) and (chunk is text or data.get("type") == "result"):
            return data
    return None


def turn_error(exit_code: int | None, timed_out: bool, stopped: bool, timeout: float,
               result: dict[str, Any] | None) -> str | None:
    """Why a turn did not succeed, in words; None when it did."""
    if stopped:
        return "stopped by a signal to lab agent"
    if timed_out:
        return f"timed out after {timeout:g} s (--turn-timeout); its process group was killed"
    if exit_code != 0:
        return f"claude exited {exit_code}"
    if result is None:
        return "stdout holds no JSON result"
    if result.get("is_error"):
        return f"claude reported an error ({result.get('subtype', 'no subtype')})"
    return None


class Waker:
    """What the loop sleeps on: a timed wait that a signal or a finished turn cuts short. A pipe,
    not a threading.Event: a signal handler runs between two bytecodes of the main thread, which
    may be inside Event.wait() holding the Event's own non-reentrant lock, and set() from the
    handler would then deadlock. os.write takes no Python lock, so the handler may call wake()."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def wake(self) -> None:
        try:
            os.write(self.w, b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full: it is woken already

    def wait(self, seconds: float) -> None:
        """Block up to `seconds` (no polling) unless woken; then forget the wake-ups."""
        if seconds > 0:
            select.select([self.r], [], [], seconds)
        self.clear()

    def clear(self) -> None:
        try:
            while os.read(self.r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass


class AgentLock:
    """An exclusive flock on $LAB_RUNS/agent/lock for the loop's lifetime, holding its pid. The
    descriptor is close-on-exec, so a turn's processes (which may outlive a killed loop) never
    keep it; the kernel releases it when this process dies, however it dies."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> AgentLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise AlreadyRunning(self.path, pid) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *_: object) -> None:
        # The file stays: unlinking it would let a third agent lock a new file while a second
        # still waits on the old one.
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Due:
    """Why a turn is due (None: it is not), and the marks a successful turn will save: the
    newest finished job's time and the attention list's keys, read before the turn, so that
    what changes during the turn is news for the next one."""

    reason: str | None
    jobs_mark: float | None
    keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class AgentOptions:
    claude: str
    cwd: Path
    prompt_file: Path
    stop_file: Path
    home: Path
    idle_seconds: float = config.AGENT.idle_seconds
    turn_timeout: float = config.AGENT.turn_timeout_seconds
    max_turns: int = config.AGENT.max_turns
    backoff_base: float = config.AGENT.backoff_base_seconds
    backoff_max: float = config.AGENT.backoff_max_seconds
    stop_grace: float = config.AGENT.stop_grace_seconds
    allowed_tools: tuple[str, ...] = config.AGENT.allowed_tools
    once: bool = False


def options(claude: str | None = None, cwd: str | Path | None = None, stop_file: str | Path | None = None,
            idle_seconds: float | None = None, turn_timeout: float | None = None,
            max_turns: int | None = None, once: bool = False, prompt_file: str | Path | None = None,
            backoff_base: float | None = None, stop_grace: float | None = None) -> AgentOptions:
    """AgentOptions from the CLI's flags: the checkout (default this repo), its AGENT_TURN.md,
    the stop file (default $LAB_RUNS/agent/STOP), config AGENT for anything not given."""
    a = config.AGENT
    root = Path(cwd).expanduser().resolve() if cwd else ROOT
    if not (root / SETTINGS_FILE).is_file():
        raise AgentError(f"--cwd: {root} has no {SETTINGS_FILE}; the guard hook must apply to every turn")
    home = agent_home()
    base = a.backoff_base_seconds if backoff_base is None else backoff_base
    return AgentOptions(
        claude=find_claude(claude), cwd=root,
        prompt_file=Path(prompt_file) if prompt_file else root / PROMPT_FILE,
        stop_file=Path(stop_file).expanduser().resolve() if stop_file else home / "STOP", home=home,
        idle_seconds=a.idle_seconds if idle_seconds is None else idle_seconds,
        turn_timeout=a.turn_timeout_seconds if turn_timeout is None else turn_timeout,
        max_turns=a.max_turns if max_turns is None else max_turns,
        backoff_base=base, backoff_max=max(base, a.backoff_max_seconds),
        stop_grace=a.stop_grace_seconds if stop_grace is None else stop_grace, once=once)


class AgentLoop:
    """The loop: `run()` until stopped, one `turn()` at a time."""

    def __init__(self, opts: AgentOptions, attention: Attention | None = None,
                 jobs_mark: JobsMark | None = None, say: Say | None = None):
        self.opts = opts
        self.attention = attention or default_attention
        self.jobs_mark = jobs_mark or FinishedJobs(config.AGENT.recent_jobs)
        self.say = say or (lambda m: print(f"lab agent: {m}", file=sys.stderr, flush=True))
        self.prompt = read_prompt(opts.prompt_file, config.AGENT.prompt_max_chars)
        self.home = opts.home
        self.log_path = self.home / "turns.jsonl"
        self.state_path = self.home / "state.json"
        # Set by the signal handler; `_wake` cuts short any sleep or a turn's wait to re-check.
        self.stopping = False
        self._wake = Waker()
        self.failures = 0  # failed turns in a row: the backoff's exponent
        self.counts = {"turns": 0, "ok": 0, "failed": 0, "timed_out": 0, "idle_sleeps": 0, "backoffs": 0}
        self._warned: set[str] = set()

    # --- stopping ------------------------------------------------------------------------

    def request_stop(self, signum: int | None = None, frame: FrameType | None = None) -> None:
        """SIGTERM/SIGINT: stop the running turn, if any, and exit (see Waker for why this only
        sets a flag and writes to a pipe)."""
        self.stopping = True
        self._wake.wake()

    def _sleep(self, seconds: float) -> None:
        """Sleep (no polling) unless a signal wakes it. Old wake-ups are dropped first; the flag
        is read after that, so a signal that came before or comes during the sleep ends it."""
        self._wake.clear()
        if not self.stopping:
            self._wake.wait(seconds)

    # --- the loop ------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Turns until a signal, the stop file or (--once) one turn; returns a summary."""
        with AgentLock(self.home / "lock"):
            previous = self._install_signals()
            try:
                stopped_by = self._loop()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        self.say(f"stopped ({stopped_by}) after {self.counts['turns']} turn(s)")
        return {**self.counts, "stopped_by": stopped_by, "last_turn": self._state().get("turn", 0),
                "log": str(self.log_path), "pid": os.getpid()}

    def _install_signals(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}  # signals reach the main thread only; a caller in a thread stops us itself
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, self.request_stop)
        return previous

    def _loop(self) -> str:
        self.home.mkdir(parents=True, exist_ok=True)
        common.write_json_atomic(self.home / "mcp.json", self._mcp_config())
        self.say(f"pid {os.getpid()}: claude {self.opts.claude}, checkout {self.opts.cwd}, "
                 f"log {self.log_path}")
        while True:
            if self.stopping:
                return "signal"
            if self.opts.stop_file.exists():
                return "stop_file"
            due = self.due()
            if due.reason is None:
                if self.opts.once:
                    return "once"
                self.counts["idle_sleeps"] += 1
                self.say(f"nothing to do; sleeping {self.opts.idle_seconds:g} s")
                self._sleep(self.opts.idle_seconds)
                continue
            record = self.turn(due)
            if record["stopped"]:
                return "signal"
            if self.opts.once:
                return "once"
            if record["backoff_s"]:
                self.counts["backoffs"] += 1
                self.say(f"turn {record['turn']} failed ({record['error']}); backing off "
                         f"{record['backoff_s']:g} s")
                self._sleep(record["backoff_s"])

    def due(self) -> Due:
        """Is a turn due? A job that ended since the last successful turn comes first: its
        result is news even when the attention list is empty."""
        state = self._state()
        mark = self._guarded("jobs", self.jobs_mark, None)
        attention = self._guarded("attention", self.attention, {"items": []})
        if attention.get("unavailable"):
            self._warn_once("unavailable", f"no attention list ({attention['unavailable']}); "
                                           "turns start only when a job ends")
        keys = attention_keys(attention)
        last = state.get("jobs_mark")
        if mark is not None and (last is None or mark > last):
            return Due("a job has ended since the last turn", mark, tuple(keys))
        ok_at = state.get("ok_at")
        since_ok = time.time() - float(ok_at) if isinstance(ok_at, (int, float)) else None
        reason = attention_reason(keys, set(state.get("seen") or ()), since_ok, config.AGENT.revisit_seconds)
        return Due(reason, mark, tuple(keys))

    def _guarded(self, what: str, fn: Callable[[], Any], fallback: Any) -> Any:
        """A failing check (the database away for a moment) means "nothing to do" for now: the
        loop sleeps and asks again, rather than spending a turn or dying."""
        try:
            return fn()
        except Exception as e:  # any failure: logged, survived
            self.say(f"warning: {what} check failed: {type(e).__name__}: {e}")
            return fallback

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.say(f"warning: {message}")

    # --- one turn ------------------------------------------------------------------------

    def argv(self) -> list[str]:
        o = self.opts
        out = [o.claude, "-p", self.prompt, "--output-format", "json", "--max-turns", str(o.max_turns),
               "--mcp-config", str(self.home / "mcp.json")]
        if o.allowed_tools:
            out += ["--allowedTools", *o.allowed_tools]  # variadic: it stays last
        return out

    def turn(self, due: Due | None = None) -> dict[str, Any]:
        """Run claude once, capped in time; log the turn; return its record. A successful turn
        saves `due`'s marks; a failed or stopped one keeps the old ones, so the same news starts
        the next turn (after the backoff)."""
        due = due or Due("asked", None)
        reason = due.reason or "asked"
        state = self._state()
        n = int(state.get("turn", 0)) + 1
        out_path, err_path = self.home / f"turn-{n}.json", self.home / f"turn-{n}.stderr.txt"
        argv = self.argv()
        self.say(f"turn {n}: {reason}")
        started, t0 = common.utc_now(), time.monotonic()
        exit_code, timed_out, stopped, pid, spawn_error = self._run_claude(argv, out_path, err_path)
        wall = time.monotonic() - t0
        result = parse_result(tail(out_path, 10 * 1024 * 1024))
        error = spawn_error or turn_error(exit_code, timed_out, stopped, self.opts.turn_timeout, result)
        ok = error is None
        if not stopped:
            self.failures = 0 if ok else self.failures + 1
        record = {
            "turn": n, "reason": reason, "started_at": started, "finished_at": common.utc_now(),
            "wall_s": round(wall, 3), "prompt": self.prompt,
            "prompt_sha256": hashlib.sha256(self.prompt.encode()).hexdigest(),
            "prompt_file": str(self.opts.prompt_file),
            "argv": [PROMPT_SLOT if a is self.prompt else a for a in argv],
            "cwd": str(self.opts.cwd), "pid": pid, "exit_code": exit_code, "timed_out": timed_out,
            "stopped": stopped, "ok": ok, "error": error,
            **{k: (result or {}).get(k) for k in RESULT_FIELDS},
            "result_tail": str((result or {}).get("result") or "")[-config.AGENT.tail_chars:],
            "stdout_tail": tail(out_path, config.AGENT.tail_chars),
            "stderr_tail": tail(err_path, config.AGENT.tail_chars),
            "attention_keys": list(due.keys), "stdout_file": str(out_path), "failures": self.failures,
            "backoff_s": 0.0 if stopped else backoff_seconds(self.failures, self.opts.backoff_base,
                                                             self.opts.backoff_max),
        }
        self._log(record, self._next_state(state, n, due, ok))
        self._count(record)
        self.say(f"turn {n}: {'ok' if ok else error}; {wall:.1f} s, {record['num_turns']} claude turn(s), "
                 f"${record['total_cost_usd'] or 0:.4f}")
        return record

    def _run_claude(self, argv: list[str], out_path: Path,
                    err_path: Path) -> tuple[int | None, bool, bool, int | None, str | None]:
        """(exit code, timed out, stopped by a signal, pid, error starting it). stdout and stderr
        go straight to files: no pipe to fill up, and the whole output is kept."""
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                # Its own session: the time cap and a stop kill claude and everything it started
                # (the MCP server, tool commands), and a Ctrl-C at the terminal reaches only us.
                proc = subprocess.Popen(argv, cwd=self.opts.cwd, env=claude_env(dict(os.environ)),
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        start_new_session=True)
            except OSError as e:
                return None, False, False, None, f"cannot start {argv[0]}: {e}"
        waiter = threading.Thread(target=self._wake_on_exit, args=(proc,), daemon=True)
        waiter.start()
        deadline = time.monotonic() + self.opts.turn_timeout
        timed_out = stopped = False
        while proc.poll() is None:
            if self.stopping:
                stopped = True
                break
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            self._wake.wait(left)
        if timed_out or stopped:
            self._stop_group(proc)
        _kill_group(proc.pid, signal.SIGKILL)  # whatever the turn left behind
        code = proc.wait()
        waiter.join(5)  # its wake-up belongs to this turn, not to the sleep after it
        return code, timed_out, stopped, proc.pid, None

    def _wake_on_exit(self, proc: subprocess.Popen[bytes]) -> None:
        proc.wait()
        self._wake.wake()

    def _stop_group(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM to the turn's process group, `stop_grace` seconds, then SIGKILL."""
        _kill_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(self.opts.stop_grace)
        except subprocess.TimeoutExpired:
            self.say(f"claude (pid {proc.pid}) ignored SIGTERM for {self.opts.stop_grace:g} s; SIGKILL")
        _kill_group(proc.pid, signal.SIGKILL)

    # --- records -------------------------------------------------------------------------

    def _log(self, record: dict[str, Any], state: dict[str, Any]) -> None:
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")
        common.write_json_atomic(self.state_path, state)

    @staticmethod
    def _next_state(state: dict[str, Any], n: int, due: Due, ok: bool) -> dict[str, Any]:
        """state.json after turn n: its number always; the marks only when it succeeded."""
        if not ok:
            return {**state, "turn": n}
        mark = due.jobs_mark if due.jobs_mark is not None else state.get("jobs_mark")
        return {"turn": n, "jobs_mark": mark, "seen": list(due.keys), "ok_at": time.time()}

    def _count(self, record: dict[str, Any]) -> None:
        self.counts["turns"] += 1
        if record["ok"]:
            self.counts["ok"] += 1
        elif not record["stopped"]:
            self.counts["failed"] += 1
        if record["timed_out"]:
            self.counts["timed_out"] += 1

    def _state(self) -> dict[str, Any]:
        try:
            data = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _mcp_config(self) -> dict[str, Any]:
        cmd = mcp_server_command()
        return {"mcpServers": {"lab": {"command": cmd[0], "args": cmd[1:],
                                       "env": absolute_paths(dict(os.environ))}}}


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already
