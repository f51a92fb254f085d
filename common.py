"""Small helpers every room uses, one copy each: a UTC timestamp, the git commit of the code, a
file's sha256, a crash-safe write (temp file, fsync, rename, fsync of the directory: after a
power cut the file is the old one or the new one, never torn or missing), where the GitHub token
comes from (`github_token`) and how the daemon keeps it from its own children (`harden_process`;
docs/SECURITY.md). Imports only the standard library and config, so the lightest module can use
it."""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import re
import stat
import subprocess
import sys
import threading
import unicodedata
from collections.abc import Callable, Mapping
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


_loaded_commit: str | None = None  # set by workers.run in a standby: see code_commit


def set_loaded_commit(commit: str) -> None:
    """The commit this process's code was loaded from, checked against HEAD (workers.run)."""
    global _loaded_commit
    _loaded_commit = commit


def code_commit() -> str:
    """The commit of the code this process runs, for the records a run writes: in a queue job
    run by a standby, the commit it loaded before the job came (checked against HEAD when the
    job came: git is not asked again, ~4 ms between the card's jobs, and a commit landing
    mid-job is not taken for the code that ran); else HEAD now."""
    return _loaded_commit or git_commit()


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


# --- the GitHub token: where it comes from, and keeping it out of reach of the jobs --------------

# `LoadCredential=github-token:/etc/reasoning-lab/github-token` in the unit makes systemd copy the
# file to $CREDENTIALS_DIRECTORY/github-token for the service (daemon/systemd.py writes that line).
TOKEN_CREDENTIAL = "github-token"

# Tokens read from a descriptor (GITHUB_TOKEN_FD): fd -> (token, st_dev, st_ino of the /dev/null
# put in its place). The descriptor can be read once only, and the bridge asks more than once.
_fd_tokens: dict[int, tuple[str, int, int]] = {}
_fd_tokens_lock = threading.Lock()


def github_token(env: Mapping[str, str]) -> str | None:
    """The GitHub token, or None when no source names one (the daemon then runs CLI-only).

    Sources, first found wins:
      1. $CREDENTIALS_DIRECTORY/github-token: systemd's `LoadCredential=github-token:PATH`.
      2. GITHUB_TOKEN_FD=N: read descriptor N to its end, then put /dev/null in its place, so no
         child inherits it. systemd's `StandardInput=file:PATH` with GITHUB_TOKEN_FD=0 opens a
         root-only file for the daemon: no file the daemon's user (and so its jobs) can open holds
         the token. Read once per process (cached); on a terminal it reads until Ctrl-D.
      3. GITHUB_TOKEN_FILE=PATH: a file the daemon's user reads.
      4. GITHUB_TOKEN: the variable itself (a person's terminal; the old way). It is then in the
         process's initial environment, /proc/<pid>/environ, for as long as the process lives.
    Whitespace around the token is stripped. A file or descriptor that is named but missing,
    unreadable or empty raises config.ConfigError (a ValueError; one line naming the source),
    and so does a token file (2, 3) that other users may read or write: mode & 0o077, as ssh
    refuses a private key. Refusing rather than warning because a warning lands in a daemon log
    nobody reads, while the readable file is the very leak this exists to prevent. The credential
    (1) is not mode-checked: systemd makes it and its directory for the service's user alone.
    An empty or blank GITHUB_TOKEN is None, as before."""
    cred_dir = env.get("CREDENTIALS_DIRECTORY", "").strip()
    if cred_dir:
        path = Path(cred_dir) / TOKEN_CREDENTIAL
        if path.exists():  # a unit may load other credentials and not this one
            return _token_text(_read_text(path, "CREDENTIALS_DIRECTORY"), f"credential {path}")
    fd = env.get("GITHUB_TOKEN_FD", "").strip()
    if fd:
        return _token_from_fd(fd)
    file = env.get("GITHUB_TOKEN_FILE", "").strip()
    if file:
        path = Path(file).expanduser()
        # The mode is checked on the file that is read (fstat of the open file), not on a name
        # that could be swapped between a stat and the open.
        text = _read_text(path, "GITHUB_TOKEN_FILE",
                          lambda st: _check_private(st, f"GITHUB_TOKEN_FILE: {path}", f"chmod 600 {path}"))
        return _token_text(text, f"GITHUB_TOKEN_FILE: {path}")
    return env.get("GITHUB_TOKEN", "").strip() or None


def _read_text(path: Path, name: str, check: Callable[[os.stat_result], None] | None = None) -> str:
    try:
        with open(path, "rb") as f:
            if check is not None:
                check(os.fstat(f.fileno()))
            return f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise config.ConfigError(f"{name}: cannot read {path}: {why}") from None


def _check_private(st: os.stat_result, name: str, fix: str) -> None:
    """Refuse a regular file with any group or other permission bit (a pipe has none to check)."""
    if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
        raise config.ConfigError(f"{name}: mode {stat.S_IMODE(st.st_mode):04o} (owner uid {st.st_uid}) "
                                 f"lets other users read the token; {fix}")


def _token_text(text: str, name: object) -> str:
    token = text.strip()
    if not token:
        raise config.ConfigError(f"{name}: the token is empty")
    if token.startswith("GITHUB_TOKEN="):
        raise config.ConfigError(f"{name}: holds KEY=value; write the token alone")
    if any(ch.isspace() for ch in token):
        raise config.ConfigError(f"{name}: holds more than one line or word; write the token alone")
    return token


def _token_from_fd(raw: str) -> str:
    try:
        fd = int(raw)
    except ValueError:
        raise config.ConfigError(f"GITHUB_TOKEN_FD: {raw!r} is not a descriptor number") from None
    name = f"GITHUB_TOKEN_FD: descriptor {fd}"
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise config.ConfigError(f"{name}: {e.strerror}") from None
    with _fd_tokens_lock:  # the bridge may ask from a thread of its own
        cached = _fd_tokens.get(fd)
        if cached is not None and (st.st_dev, st.st_ino) == cached[1:]:
            return cached[0]
        _check_private(st, name, "chmod 600 the file opened there")
        chunks = []
        try:
            while block := os.read(fd, 4096):
                chunks.append(block)
        except OSError as e:
            raise config.ConfigError(f"{name}: {e.strerror}") from None
        finally:
            # /dev/null in its place, read well or not: a child that inherits this descriptor
            # (fd 0: any subprocess started without stdin=) must find nothing there.
            inheritable = os.get_inheritable(fd)
            null = os.open(os.devnull, os.O_RDONLY)
            try:
                os.dup2(null, fd, inheritable=inheritable)
            finally:
                os.close(null)
        try:
            token = _token_text(b"".join(chunks).decode("utf-8"), name)
        except UnicodeDecodeError:
            raise config.ConfigError(f"{name}: not UTF-8 text") from None
        st = os.fstat(fd)
        _fd_tokens[fd] = (token, st.st_dev, st.st_ino)
        return token


_PR_GET_DUMPABLE = 3  # <linux/prctl.h>
_PR_SET_DUMPABLE = 4


def _prctl(option: int, arg: int = 0) -> int:
    libc = ctypes.CDLL(None, use_errno=True)  # the process's own libc: prctl is in glibc and musl
    r = libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0),
                   ctypes.c_ulong(0))
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}, {arg}): {os.strerror(err)}")
    return int(r)


def harden_process() -> None:
    """Make this process non-dumpable (Linux: prctl(PR_SET_DUMPABLE, 0)); a no-op elsewhere.

    Why: the daemon holds the GitHub token, and its jobs run as the same user. A same-uid process
    may read /proc/<pid>/environ (the initial environment: GITHUB_TOKEN, a Postgres password in
    LAB_DB), /proc/<pid>/mem, /proc/<pid>/fd/*, and ptrace the process. A non-dumpable process's
    /proc files belong to root and the kernel's ptrace access check refuses every other non-root
    process, so only root (CAP_SYS_PTRACE) can still look in. It also stops core dumps, which
    would hold the token.

    What it does not change: the children. execve() makes a process dumpable again (when its
    user did not change and its binary is readable), so every job started with subprocess has a
    normal /proc of its own; only a fork() that never execs (multiprocessing's fork start
    method) stays non-dumpable, like its parent. The process itself can still read its
    /proc/self/fd, maps and status, but no longer open its own 0400/0600 files there
    (/proc/self/environ, mem) nor write /proc/self/oom_score_adj, and a person needs root to
    attach py-spy or gdb to it. Threads share the setting (it belongs to the memory, not the
    thread). Call it first thing, before the token is read. Raises OSError if prctl fails: a
    daemon that could not protect the token should not run unnoticed."""
    if not sys.platform.startswith("linux"):
        return
    _prctl(_PR_SET_DUMPABLE, 0)


def is_dumpable() -> bool | None:
    """prctl(PR_GET_DUMPABLE) on Linux (False after harden_process), None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    return _prctl(_PR_GET_DUMPABLE) == 1


# --- markdown from outside: shown, never interpreted --------------------------------------------
# The choice: a plain value (none of the characters below) is a code span, since nothing inside
# `...` is markdown, HTML or a mention. Anything else is escaped text: `&` `<` `>` become entities
# (no tag, no `<!--` even in the raw body, where the bridge looks for its markers) and the
# markdown punctuation that acts inline gets a backslash (backticks too, so no span opens or
# closes); as code it sits in <code>...</code>, which renders like the span and, unlike a span,
# decodes those escapes. An @ GitHub would read as a mention (at the start or after a non-word
# character) gets a zero-width joiner: the name reads, nobody is pinged. Line breaks and other
# control characters become spaces, so no value starts a line (a heading, a row, a fence).
_NOT_PLAIN = frozenset("`<>&|\\")
_BACKSLASHED = frozenset("\\`*[]|~$")
_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
_WORD = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_ALNUM = _WORD - {"_"}
ZWJ = "\u200d"


def md_untrusted(text: object, code: bool = True) -> str:
    """`text` from outside the lab, safe anywhere inline in markdown (a table cell too).
    code=True: shown as code (the way names and values are shown); code=False: as prose."""
    s = "".join(" " if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") else c for c in str(text))
    if code and s and not _NOT_PLAIN.intersection(s):
        return f"`{s}`"
    out = []
    for i, c in enumerate(s):
        before, after = s[i - 1] if i else "", s[i + 1] if i + 1 < len(s) else ""
        if c in _ENTITIES:
            out.append(_ENTITIES[c])
        elif c in _BACKSLASHED or (c == "_" and not (before in _ALNUM and after in _ALNUM)):
            out.append("\\" + c)  # an underscore inside a word never emphasises: left as it is
        elif c == "@" and before not in _WORD:
            out.append("@" + ZWJ)
        else:
            out.append(c)
    escaped = "".join(out)
    return f"<code>{escaped}</code>" if code else escaped


def md_fence(text: str, lang: str = "") -> str:
    """`text` fenced with more backticks than any run inside it: no line of it can close the block."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text.rstrip()}\n{fence}"


def sig(v: Any, sign: bool = False, missing: str = "n/a") -> str:
    """A number as a person reads it at a glance, the lab's one format for people (so no table
    mixes precisions): a measured float to three significant digits (0.754, 1.00, 0.0500,
    12,300), an int exactly (steps, parameters), `missing` for None. `sign`: a difference,
    always signed. Anything else is returned as text, for the caller to escape."""
    if v is None:
        return missing
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    plus = "+" if sign else ""
    if isinstance(v, int):
        return f"{v:{plus},}"
    if not math.isfinite(v):
        return str(v)
    r = float(f"{v:.3g}")
    if abs(r) >= 1000:  # 12,300 rather than 1.23e+04: a count of tokens or seconds reads as one
        return f"{r:{plus},.0f}"
    return f"{r:{plus}#.3g}".rstrip(".")  # "386", not the alternate form's "386."


def duration(seconds: Any, missing: str = "unknown") -> str:
    """Seconds as a person reads them: `42 s`, `3 min 5 s`, `2 h 10 min`; `missing` for none."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return missing
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"
