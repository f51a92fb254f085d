"""The GPU lane's file lock: `$LAB_RUNS/gpu.lock`, held with `flock` by the job's own process.

The database says which job should hold the card; this lock says which process does. It is
released by the kernel when the process dies, however it dies, so a job that outlives its
daemon keeps the card until it ends, and a job started by a restarted (or second) daemon waits
here instead of overlapping it.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path

LOCK_NAME = "gpu.lock"


def lock_path(runs: str | Path) -> Path:
    return Path(runs) / LOCK_NAME


def acquire(runs: str | Path, on_wait: Callable[[], None] | None = None) -> int:
    """Block until this process holds the GPU lock; returns the fd (keep it open for life).
    `on_wait` is called once if another process holds it."""
    path = lock_path(runs)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if on_wait is not None:
            on_wait()
        fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def is_held(runs: str | Path) -> bool:
    """True if some process holds the lock now (for status and tests)."""
    path = lock_path(runs)
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
