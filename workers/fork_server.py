"""`python -m workers.fork_server`: a lane's fork server (the daemon's side: workers.forked).

Where the lane trains (LAB_STANDBY_PRELOAD=torch) it loads what a training job needs before its
first step, once (workers.run.preload: torch, its first optimizer, the models, the harness,
matplotlib, the sample's tokens; never a CUDA context, which a forked child could not use);
elsewhere (`light`) only the queue's own code, which its import below already did. Then it says
"ready" on its request socket and forks one standby per request. A child starts where a standby
started with python waits for its job (workers.run.main, `--standby`), everything already
imported: a fork of this process takes milliseconds where a fresh preload takes ~3.5 CPU-s (a
light standby's python ~0.35 CPU-s), so standbys keep up with short jobs.

A request carries the child's fds (SCM_RIGHTS): its stdin's read end, the write end of its
status pipe and, on the GPU lane, the write end of its "card released" pipe. The server answers
with the child's pid, and writes the child's exit status on its status pipe when it reaps it.
It exits at once when its stdin closes (the daemon is gone), and once its children have when its
request socket closes (retired: HEAD moved).

Forking is safe here because the process has one python thread (the preload runs in the main
thread), makes no OpenMP team (its torch use runs no parallel op) and holds no database
connection, lock or CUDA context: each child makes its own. The native threads it has are the
idle pools of numpy's and scipy's OpenBLAS, which shut down before a fork and restart in the
child (OpenBLAS's pthread_atfork handlers).
"""

from __future__ import annotations

import gc
import os
import select
import signal
import socket
import sys
import threading
import traceback

import config
from workers import gpu_lock, run
from workers.forked import PRELOAD_ENV, READY, SOCKET_FD_ENV
from workers.supervise import CARD_FD_ENV, HeadWatch


def _say(message: str) -> None:
    run._say(f"lab: fork server pid {os.getpid()}: {message}")


def _child(fds: list[int], sock: socket.socket, others: list[int], watch: HeadWatch, heavy: bool) -> None:
    """In the forked child: become a standby of its own (session, stdin, card pipe) and run."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()  # the leader of its own process group, as a Popen standby (start_new_session)
        sock.close()
        stdin_r, status_w, *card = fds
        for fd in [status_w, *others]:
            os.close(fd)
        os.dup2(stdin_r, 0)
        os.close(stdin_r)
        if card:
            os.set_inheritable(card[0], True)  # as Popen's pass_fds: it survives a re-exec (fresh_code)
            os.environ[CARD_FD_ENV] = str(card[0])
        os.environ[PRELOAD_ENV] = "forked" if heavy else "light"  # "forked": all a training job loads
        code = run.main(["--standby"], watch=watch)
    except BaseException:
        traceback.print_exc()
    run.leave(code)


def serve() -> int:
    sock = socket.socket(fileno=int(os.environ.pop(SOCKET_FD_ENV)))
    lane = "cpu" if os.environ.get("CUDA_VISIBLE_DEVICES") == "" else "gpu"
    watch = HeadWatch()  # the children's: a commit after this makes a handed-over child re-exec
    if lane == "gpu":
        gpu_lock.lock_path()  # names the card once (nvidia-smi) for every child
    heavy = os.environ.get(PRELOAD_ENV) == "torch"
    if heavy and not _preload(lane):
        return 0
    # Every object loaded so far moves out of the collector's reach: a collection in a child would
    # otherwise write to all of them (gc headers) and copy each page the fork shared.
    gc.collect()
    gc.freeze()
    if threading.active_count() != 1:  # a python thread's locks would be held forever in a child
        _say(f"{threading.active_count()} python threads after the preload (forking assumes one)")
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # the wake-up fd wakes the select below
    children: dict[int, int] = {}  # pid -> the write end of its status pipe
    try:
        sock.sendall(READY)
    except OSError:
        return 0
    _say(f"ready (commit {watch.commit[:12]})")
    retiring = False
    while not (retiring and not children):
        watched = [0, wake_r] + ([] if retiring else [sock.fileno()])
        readable, _, _ = select.select(watched, [], [])
        if 0 in readable and not os.read(0, 64):
            return 0  # the daemon is gone: exit now (the children are re-parented)
        if wake_r in readable:
            os.read(wake_r, 512)  # a SIGCHLD: reaped below, with any child that ended meanwhile
        if sock.fileno() in readable and not retiring:
            try:
                msg, fds, _, _ = socket.recv_fds(sock, 16, 4)
            except OSError:
                msg, fds = b"", []
            if not msg:
                retiring = True  # retired: no more forks; out once the children are
                for fd in fds:
                    os.close(fd)
                continue
            pid = _fork(fds, sock, [wake_r, wake_w, *children.values()], watch, heavy)
            if pid > 0:
                children[pid] = fds[1]
            try:
                sock.sendall(f"{pid}\n".encode())
            except OSError:
                retiring = True
        _reap(children)
    return 0


def _preload(lane: str) -> bool:
    """workers.run.preload, or False if the daemon went away meanwhile (stdin closed): a thread
    watches for that while the preload runs and is gone before the first fork."""
    stop, done = threading.Event(), threading.Event()

    def watch_stdin() -> None:
        while not done.is_set():
            readable, _, _ = select.select([0], [], [], 0.1)
            if readable and not os.read(0, 64):
                stop.set()
                return
    watcher = threading.Thread(target=watch_stdin, name="stdin-watch", daemon=True)
    watcher.start()
    run.preload(lane, config.queue_config(), stop, cuda=False)
    done.set()
    watcher.join()
    return not stop.is_set()


def _fork(fds: list[int], sock: socket.socket, others: list[int], watch: HeadWatch, heavy: bool) -> int:
    """The child's pid (its fds but the status pipe's closed here), or -1 (no process)."""
    try:
        pid = os.fork()
    except OSError as e:
        _say(f"could not fork: {e}")
        for fd in fds:
            os.close(fd)
        return -1
    if pid == 0:
        _child(fds, sock, others, watch, heavy)
    for fd in fds[:1] + fds[2:]:
        os.close(fd)  # stdin's read end and the card pipe's write end are the child's alone
    return pid


def _reap(children: dict[int, int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        fd = children.pop(pid, None)
        if fd is not None:
            try:
                os.write(fd, f"{os.waitstatus_to_exitcode(status)}\n".encode())
            except OSError:
                pass  # the daemon no longer listens
            os.close(fd)


if __name__ == "__main__":
    code = serve()
    sys.stdout.flush()
    os._exit(code)
