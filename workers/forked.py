"""The daemon's side of a lane's fork server (`python -m workers.fork_server`): one process per
lane and commit that imports torch, the models, the harness and the sample data once, then forks
each training standby from itself in milliseconds. Without it every standby pays that preload
(~3.5 CPU-s on 2 cores), so short jobs outran the supply and the card waited for a preload.

`ForkServer` starts the server and asks it for children; `ForkedProcess` is one child as the
supervisor sees a subprocess.Popen: pid, stdin, poll, wait, returncode. The child is the server's,
not the daemon's, so its exit status comes from the server (a line on a pipe of its own); the
moment of its exit is still seen at once (a pidfd works for any process, workers.supervise
ExitWaiter).

Lifetimes: the server exits at once when its stdin closes (the daemon is gone: its running jobs
are then re-parented, which their lease keepers read as "no daemon supervises", as for any job);
`retire` (HEAD moved) closes its request socket instead: no more forks, and it exits once its
children have, so their exit statuses still reach the daemon.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

# The fd number of the server's end of its request socket.
SOCKET_FD_ENV = "LAB_FORK_SERVER_FD"
# What a standby or fork server loads ahead of its job: torch and the training modules ("torch"),
# the queue's own code only ("light"), or nothing more, being a fork of a server that has
# ("forked").
PRELOAD_ENV = "LAB_STANDBY_PRELOAD"
READY = b"ready\n"
# The exit status of a child whose server died before it could say: not the job's own verdict.
EXIT_LOST = -1000


def proc_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state, ppid, pgrp, ...), or None if that
    process is gone (or its stat cannot be read). Raises FileNotFoundError where there is no
    /proc at all."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if not Path("/proc").is_dir():
            raise
        return None
    except OSError:
        return None
    # pid (comm) state ppid pgrp ...; comm may hold spaces, so split after the last ')'
    return stat.rsplit(")", 1)[1].split()


class ForkedProcess:
    """A job process forked by a fork server, with the parts of subprocess.Popen the supervisor
    uses. `stdin` is the write end of its stdin pipe; the exit status arrives on `status_fd` as
    one line ("0", "-9"), EOF without it meaning the server died (EXIT_LOST once the process
    is gone too)."""

    def __init__(self, pid: int, stdin: IO[bytes], status_fd: int, server_pid: int):
        self.pid, self.stdin, self.returncode = pid, stdin, None
        self.server_pid = server_pid
        self._status_fd: int | None = status_fd
        self._said = b""

    def _alive(self) -> bool:
        """Running (a zombie is not: where pid 1 does not reap, an orphan stays one)."""
        try:
            fields = proc_stat(self.pid)
            return fields is not None and fields[0] not in ("Z", "X")
        except FileNotFoundError:  # no /proc
            try:
                os.kill(self.pid, 0)
                return True
            except ProcessLookupError:
                return False
            except PermissionError:
                return True

    def _read(self, timeout: float | None) -> int | None:
        if self.returncode is not None:
            return self.returncode
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._status_fd is not None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([self._status_fd], [], [], left)
            if not readable:
                return None
            chunk = os.read(self._status_fd, 64)
            self._said += chunk
            if chunk and not self._said.endswith(b"\n"):
                continue
            os.close(self._status_fd)
            self._status_fd = None
            if self._said.strip():
                self.returncode = int(self._said.strip())
                return self.returncode
        # The server died: the child was re-parented; gone means ended, how is not known.
        while self._alive():
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(0.01)
        self.returncode = EXIT_LOST
        return self.returncode

    def poll(self) -> int | None:
        return self._read(0.0)

    def wait(self, timeout: float | None = None) -> int:
        rc = self._read(timeout)
        if rc is None:
            raise subprocess.TimeoutExpired(f"forked pid {self.pid}", timeout or 0.0)
        return rc

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class ForkServer:
    """One lane's fork server, loaded with `commit`'s code, and with torch and the training
    modules if `heavy`. `ready` is set once it has preloaded (`on_ready` is then called, from a
    thread of its own); `fork` asks it for a standby."""

    def __init__(self, env: dict[str, str], commit: str, log_path: Path,
                 on_ready: Callable[[], None] | None = None, heavy: bool = True):
        self.commit, self.heavy = commit, heavy
        self.ready = threading.Event()
        self._lock = threading.Lock()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(env, **{SOCKET_FD_ENV: str(theirs.fileno()), PRELOAD_ENV: "torch" if heavy else "light"})
        try:
            with open(log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "workers.fork_server"], stdin=subprocess.PIPE, stdout=log,
                    stderr=subprocess.STDOUT, env=env, start_new_session=True, pass_fds=(theirs.fileno(),))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock: socket.socket | None = ours
        self._on_ready = on_ready
        threading.Thread(target=self._await_ready, name="fork-server-ready", daemon=True).start()

    def _await_ready(self) -> None:
        sock = self.sock
        said = b""
        try:
            while sock is not None and not said.endswith(b"\n"):
                chunk = sock.recv(16)
                if not chunk:
                    return  # it died (or was retired) before it was ready
                said += chunk
        except OSError:
            return
        if said == READY:
            self.ready.set()
            if self._on_ready is not None:
                self._on_ready()

    def alive(self) -> bool:
        return self.proc.poll() is None and self.sock is not None

    def fork(self, card: bool, timeout: float = 5.0) -> tuple[ForkedProcess, int | None]:
        """A new standby forked from the server: the process and, with `card`, the read end of
        its "card released" pipe (workers.supervise.start_job_process has the same contract).
        Raises OSError when the server does not answer (then it is retired)."""
        stdin_r, stdin_w = os.pipe()
        status_r, status_w = os.pipe()
        card_r, card_w = os.pipe() if card else (None, None)
        sent = [stdin_r, status_w] + ([] if card_w is None else [card_w])
        try:
            with self._lock:
                if self.sock is None or not self.ready.is_set():
                    raise OSError("the fork server is not ready")
                self.sock.settimeout(timeout)
                try:
                    socket.send_fds(self.sock, [b"fork\n"], sent)
                    said = b""
                    while not said.endswith(b"\n"):
                        chunk = self.sock.recv(32)
                        if not chunk:
                            raise OSError("the fork server closed its socket")
                        said += chunk
                except OSError:
                    self._close_sock()
                    raise
            pid = int(said) if said.strip().lstrip(b"-").isdigit() else -1
            if pid <= 0:
                raise OSError("the fork server could not fork")
        except BaseException:
            for fd in (stdin_w, status_r, card_r):
                if fd is not None:
                    os.close(fd)
            raise
        finally:
            for fd in sent:
                os.close(fd)  # the child's now (or nobody's)
        return ForkedProcess(pid, os.fdopen(stdin_w, "wb"), status_r, self.proc.pid), card_r

    def _close_sock(self) -> None:
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv; EOF for the server
            except OSError:
                pass
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None

    def retire(self) -> None:
        """No more forks: the server exits once its children have (their statuses still come)."""
        with self._lock:
            self._close_sock()

    def close(self) -> None:
        """Exit now (the daemon stops): its stdin closed."""
        self.retire()
        try:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                self.proc.stdin.close()
        except OSError:
            pass
