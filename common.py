"""Small helpers every room uses, one copy each: a UTC timestamp, the git commit of the code, a
file's sha256, and a crash-safe write (temp file, fsync, rename, fsync of the directory: after a
power cut the file is the old one or the new one, never torn or missing). Imports only the
standard library and config, so the lightest module can use it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import config


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def git_commit() -> str:
    """HEAD of the checkout this code runs from, or "unknown" outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(config.RECORDS.hash_chunk_bytes):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomic(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> None:
    """Call write(f) on a temp file beside `path`, fsync it, rename it over `path`, fsync the
    directory: a crash at any moment leaves the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: str | os.PathLike[str], text: str) -> None:
    replace_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_json_atomic(path: str | os.PathLike[str], data: Any, indent: int = 2) -> None:
    write_atomic(path, json.dumps(data, indent=indent, default=str) + "\n")
