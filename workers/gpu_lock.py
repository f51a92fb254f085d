"""One GPU lock per card, per machine: `flock` on `<lock dir>/<card>.lock`.

Where: `$LAB_GPU_LOCK_DIR`, default `/tmp/reasoning-lab-gpu/` (created with mode 1777, like
/tmp, so a daemon's user and a researcher's can share it; lock files are made 0666). Not under
`$LAB_RUNS`: the card belongs to the machine, not to one runs directory, so the GPU lane, `make
demo`, a second daemon with its own LAB_RUNS and a foreground `lab train --device cuda` all meet
on the same file.

Which card: the first one this process would see (for `cuda:N`, the N-th), named by its UUID from
`nvidia-smi --query-gpu=uuid,index --format=csv,noheader` (honouring CUDA_VISIBLE_DEVICES given
as indices or UUIDs), else by its index (`gpu1`). With no working nvidia-smi: one machine lock,
`gpu0` (the lab's machine has one card, and a guessed per-card name could split it in two).

What it guarantees, between processes that take it: at most one holds a given card at a time. The
kernel releases it when the holder dies, however it dies, so an orphaned job keeps the card until
it ends and whoever comes next waits instead of overlapping it. A process keeps it until it exits,
or until it gives it back (`release`): a queue job does once its card work is done and its
memory freed, so the next job trains while this one writes its plots and result (workers/run.py
WorkerContext.release_card); the holder's pid is in the file.
Who takes it: the queue's job process on the GPU lane (workers/run.py, before the job starts) and
a foreground run whose device resolves to cuda (`hold_card_if_cuda`, where the CLI resolves
--device); a run on the cpu takes none. Taking it again in the same process is a no-op, so a job
process that already holds it cannot deadlock on itself. Child processes of a holder (the
ablation's seed processes) run under their parent's hold and must not take it themselves: theirs
would wait for the parent.

What it does not guarantee: anything about a process that uses CUDA without the lab (a python
one-liner, a notebook or script that never calls this module, another user's program): it takes
no lock and nothing here stops it. Nor that two processes name a card alike when one finds
nvidia-smi and the other does not (one locks the UUID, the other `gpu0`); nor anything across
machines. With CUDA_DEVICE_ORDER other than PCI_BUS_ID, CUDA's indices can differ from
nvidia-smi's on a machine with unlike cards: give CUDA_VISIBLE_DEVICES as UUIDs there. A /tmp
cleaner that deletes a held lock file lets the next process lock a new file beside it (an acquire
re-checks that it holds the file now at the path, which covers a deletion while it waited, not
one while it holds). A process that holds the lock forever (a stuck run) keeps the card: the lock
is cooperative, not a permission.
"""

from __future__ import annotations

import fcntl
import functools
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

DIR_ENV = "LAB_GPU_LOCK_DIR"
DEFAULT_DIR = Path("/tmp/reasoning-lab-gpu")
MACHINE_LOCK = "gpu0"  # the name when nvidia-smi cannot say which card
# Where nvidia-smi lives when the driver is installed: looked at when PATH lacks it, so a daemon
# with a bare PATH and a researcher's shell still name the card alike.
_SMI_FALLBACKS = ("/usr/bin/nvidia-smi",)
_SMI_TIMEOUT_S = 20.0  # a hung driver must not hang the job forever; it falls back to gpu0

# This process's held locks, path -> fd. flock on a second fd of the same file blocks even in the
# process that holds the first, so a repeated acquire must find the first fd here.
_held: dict[Path, int] = {}
_held_guard = threading.Lock()


def lock_dir() -> Path:
    return Path(os.environ.get(DIR_ENV) or DEFAULT_DIR)


def _nvidia_smi() -> str | None:
    found = shutil.which("nvidia-smi")
    if found:
        return found
    return next((p for p in _SMI_FALLBACKS if os.access(p, os.X_OK)), None)


def _query_cards() -> list[tuple[int, str]] | None:
    """(index, uuid) of every card nvidia-smi lists, in index order; None if it cannot tell."""
    smi = _nvidia_smi()
    if smi is None:
        return None
    try:
        r = subprocess.run([smi, "--query-gpu=uuid,index", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=_SMI_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as e:
        print(f"lab: nvidia-smi did not answer ({type(e).__name__}); using the machine GPU lock "
              f"{MACHINE_LOCK}", file=sys.stderr, flush=True)
        return None
    if r.returncode != 0:  # no driver, or no card: nothing to name
        return None
    cards = []
    for line in r.stdout.splitlines():
        uuid, _, index = (s.strip() for s in line.partition(","))
        if index.isdigit():
            cards.append((int(index), uuid))
    return sorted(cards) or None


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _name(index: int, uuid: str) -> str:
    return _safe(uuid) if uuid.startswith("GPU-") else f"gpu{index}"  # "[N/A]": by index


def _pick(cards: list[tuple[int, str]], visible: str | None, ordinal: int) -> tuple[int, str] | None:
    """The card `cuda:<ordinal>` means under CUDA_VISIBLE_DEVICES=`visible` (None: unset)."""
    if visible is None:
        return cards[ordinal] if ordinal < len(cards) else None
    entries = [e.strip() for e in visible.split(",")]
    if ordinal >= len(entries):
        return None
    entry = entries[ordinal]
    if entry.isdigit():
        return next((c for c in cards if c[0] == int(entry)), None)
    if entry.startswith("GPU-"):  # CUDA accepts a unique prefix of the UUID
        matches = [c for c in cards if c[1].startswith(entry)]
        return matches[0] if len(matches) == 1 else None
    return None  # "", "-1", a MIG instance: not one whole card we can name


@functools.lru_cache(maxsize=16)
def _card_name(visible: str | None, path_env: str | None, ordinal: int) -> str:
    # Cached per environment: nvidia-smi takes tens of ms (seconds without persistence mode),
    # and the GPU lane's standby process asks before a job comes (workers/run.py).
    cards = _query_cards()
    if cards is None:
        return MACHINE_LOCK
    # A name we cannot resolve (a MIG instance, an empty list) falls back to the first card: on
    # the lab's one-card machine that is the card, and locking too much only makes one wait.
    index, uuid = _pick(cards, visible, ordinal) or cards[0]
    return _name(index, uuid)


def card_name(ordinal: int = 0) -> str:
    """The lock's name for the card `cuda:<ordinal>` of this process: its UUID, `gpuN`, or gpu0."""
    return _card_name(os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("PATH"), ordinal)


def lock_path(ordinal: int = 0) -> Path:
    return lock_dir() / f"{card_name(ordinal)}.lock"


def _ensure_dir(d: Path) -> None:
    if d.is_symlink():  # in a shared /tmp someone else could point it anywhere
        raise RuntimeError(f"GPU lock directory {d} is a symbolic link; set {DIR_ENV} to a real directory")
    if d.is_dir():
        return
    d.mkdir(parents=True, exist_ok=True)
    try:
        os.chmod(d, 0o1777)  # mkdir's mode is cut by the umask; sticky: nobody deletes another's lock
    except PermissionError:
        pass  # made a moment ago by another user: theirs to set


def _open(path: Path) -> int:
    _ensure_dir(path.parent)
    flags = os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, os.O_RDWR | flags, 0o666)
    except PermissionError:
        # Another user's file that is not writable to us (made under an old umask): flock needs
        # only an open fd, so lock it read-only and leave the pid unwritten.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise RuntimeError(f"cannot open the GPU lock {path}: {e}; chmod 1777 {path.parent} or set "
                               f"{DIR_ENV}") from None
    st = os.fstat(fd)
    if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != 0o666:
        os.fchmod(fd, 0o666)  # so a process of another user can write its pid when it holds it
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def holder_pid(path: Path | None = None) -> int | None:
    """The pid written by the latest holder (it may have exited since; see is_held)."""
    try:
        text = (path or lock_path()).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def describe_holder(path: Path | None = None) -> str:
    """"pid 123 (python -m workers.run 7 1)", for a line that says who has the card."""
    pid = holder_pid(path)
    if pid is None:
        return "another process"
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        raw = ""
    cmd = " ".join(raw.replace("\0", " ").split())  # one line, even for `python -c "<lines>"`
    return f"pid {pid}" + (f" ({cmd[:120]})" if cmd else "")


def acquire(on_wait: Callable[[], None] | None = None, ordinal: int = 0) -> int:
    """Block until this process holds the lock of its card `cuda:<ordinal>`; returns the fd, which
    stays open until the process exits or calls `release`. Idempotent: a second call returns the
    same fd at once. `on_wait` is called once, before blocking, if another process holds it."""
    path = lock_path(ordinal)
    with _held_guard:  # two threads of one process must not both open (the second would deadlock)
        if path in _held:
            return _held[path]
        waited = False
        while True:
            fd = _open(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None and not waited:
                    on_wait()
                waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_file(fd, path):
                break
            os.close(fd)  # the file was deleted or replaced while we waited: lock the one there now
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # opened read-only (another user's file): the lock holds all the same
        _held[path] = fd
        return fd


def release(ordinal: int = 0) -> bool:
    """Give the card's lock back (closing the fd drops the flock); True if this process held it.
    The caller must be done with the card: the next holder may start on it at once."""
    path = lock_path(ordinal)
    with _held_guard:
        fd = _held.pop(path, None)
        if fd is None:
            return False
        os.close(fd)
        return True


def _print_waiting(ordinal: int) -> Callable[[], None]:
    def say() -> None:
        # One line on stderr (stdout may be --json): a researcher must not see a silent hang.
        print(f"lab: waiting for the GPU {card_name(ordinal)}: {describe_holder(lock_path(ordinal))} holds "
              "it (a queue job or another run); this run starts when it ends", file=sys.stderr, flush=True)
    return say


def hold_card_if_cuda(device: object, on_wait: Callable[[], None] | None = None) -> bool:
    """Take the lock of the card `device` names if it is a cuda device ("cuda", "cuda:1", a
    torch.device); a no-op for "cpu" (and any non-cuda device). Call it where a device is
    resolved, before the first CUDA allocation. Returns whether this process now holds a card.
    By default, waiting prints one line saying which pid holds the card."""
    kind, _, index = str(device).partition(":")
    if kind == "auto":
        raise ValueError("hold_card_if_cuda: resolve 'auto' to cuda or cpu first")
    if kind != "cuda":
        return False
    ordinal = int(index) if index.isdigit() else 0
    acquire(on_wait if on_wait is not None else _print_waiting(ordinal), ordinal)
    return True


def held_here(ordinal: int = 0) -> bool:
    """True if this process holds the lock of its card."""
    return lock_path(ordinal) in _held


def is_held(path: Path | None = None) -> bool:
    """True if some process holds the lock now (for status and tests); default: this process's
    card. From the holding process itself it is True as well."""
    path = path or lock_path()
    if path in _held:
        return True
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
