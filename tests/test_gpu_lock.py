"""workers/gpu_lock.py: one lock per card, per machine, in LAB_GPU_LOCK_DIR.

Real processes and real files: each holder or waiter is its own python process (flock is per
open file, so only another process shows contention). `nvidia-smi` is a stand-in script on PATH
that prints what the real one prints for `--query-gpu=uuid,index --format=csv,noheader`."""

from __future__ import annotations

import os
import select
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_daemon import ROOT, gpu_lock_holder

from workers import gpu_lock

pytestmark = pytest.mark.timeout(60)

UUID_A = "GPU-5f6a7e0c-1b2d-4c3e-9f8a-0b1c2d3e4f50"
UUID_B = "GPU-b7d1c2e3-4f50-4a6b-8c9d-0e1f2a3b4c5d"
TWO_CARDS = f"{UUID_A}, 0\n{UUID_B}, 1\n"
REAL_SMI = any(os.access(p, os.X_OK) for p in gpu_lock._SMI_FALLBACKS)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A private lock directory, shared by every process of the test (and by the test itself)."""
    monkeypatch.setenv("LAB_GPU_LOCK_DIR", str(tmp_path / "gpu-lock"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return dict(os.environ)


def spawn(env: dict[str, str], code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def read_line(stream: object, timeout: float) -> str | None:
    """The next line, or None if none comes within `timeout` seconds."""
    ready, _, _ = select.select([stream], [], [], timeout)
    return stream.readline().strip() if ready else None  # type: ignore[attr-defined]


def finish(proc: subprocess.Popen) -> tuple[str, str]:
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    return out, err


# A waiter: says "waiting" if it must wait, "acquired PID" once it holds the lock, then keeps it
# until its stdin closes.
WAITER = """
import os, sys
from workers import gpu_lock
gpu_lock.acquire(on_wait=lambda: print("waiting", flush=True))
print("acquired", os.getpid(), flush=True)
sys.stdin.read()
"""


def test_two_runs_directories_contend_for_the_same_card(env: dict[str, str], tmp_path: Path) -> None:
    """The security review's case: `make demo` or a second daemon with its own LAB_RUNS. With the
    old `$LAB_RUNS/gpu.lock` the second process got a lock of its own at once."""
    with gpu_lock_holder({**env, "LAB_RUNS": str(tmp_path / "runs-a")}) as holder:
        waiter = spawn({**env, "LAB_RUNS": str(tmp_path / "runs-b")}, WAITER)
        assert read_line(waiter.stdout, 20) == "waiting"
        assert read_line(waiter.stdout, 0.5) is None, "the second process must not get the card"
        assert gpu_lock.holder_pid() == holder
    assert read_line(waiter.stdout, 20) == f"acquired {waiter.pid}"
    assert gpu_lock.is_held() and gpu_lock.holder_pid() == waiter.pid
    finish(waiter)
    assert not gpu_lock.is_held()  # the kernel released it when the waiter exited


def test_lock_directory_is_shared_between_users(env: dict[str, str]) -> None:
    """Made like /tmp (1777: anyone may create, nobody removes another's file) and a 0666 file, so a
    daemon's user and a researcher's can both lock and write their pid."""
    lock_dir = Path(env["LAB_GPU_LOCK_DIR"])
    assert not lock_dir.exists()
    with gpu_lock_holder(env) as holder:
        path = gpu_lock.lock_path()
        assert path.parent == lock_dir
        assert stat.S_IMODE(lock_dir.stat().st_mode) == 0o1777
        assert stat.S_IMODE(path.stat().st_mode) == 0o666
        assert path.read_text() == f"{holder}\n"


def test_default_directory_is_machine_wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAB_GPU_LOCK_DIR", raising=False)
    monkeypatch.setenv("LAB_RUNS", "/somewhere/else")
    assert gpu_lock.lock_dir() == Path("/tmp/reasoning-lab-gpu")


def test_a_symlinked_lock_directory_is_refused(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    p = spawn({**env, "LAB_GPU_LOCK_DIR": str(tmp_path / "link")}, WAITER)
    _, err = p.communicate(timeout=20)
    assert p.returncode == 1 and "is a symbolic link" in err
    assert not list((tmp_path / "elsewhere").iterdir())


# --- which card: the lock's name ------------------------------------------------------------

NAME = "from workers import gpu_lock\nimport sys\nprint(gpu_lock.lock_path(int(sys.argv[1])).name)\n"


def fake_smi(bin_dir: Path, output: str, code: int = 0) -> None:
    """A stand-in nvidia-smi that answers only the query the lock asks."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "nvidia-smi"
    script.write_text("#!/bin/sh\n"
                      '[ "$1" = "--query-gpu=uuid,index" ] && [ "$2" = "--format=csv,noheader" ] || exit 2\n'
                      f"printf '%s' '{output}'\nexit {code}\n")
    script.chmod(0o755)


def lock_name(env: dict[str, str], bin_dir: Path, visible: str | None, ordinal: int = 0) -> str:
    e = {**env, "PATH": str(bin_dir)}  # only the stand-in (or nothing) is on PATH
    if visible is not None:
        e["CUDA_VISIBLE_DEVICES"] = visible
    p = spawn(e, NAME, str(ordinal))
    out, _ = finish(p)
    return out.strip()


@pytest.mark.parametrize("visible, ordinal, expected", [
    (None, 0, UUID_A),  # unset: the first card
    (None, 1, UUID_B),  # cuda:1
    ("1", 0, UUID_B),  # by index: the first visible one
    ("1,0", 0, UUID_B),
    ("1,0", 1, UUID_A),
    (UUID_B, 0, UUID_B),
    (UUID_B[:12], 0, UUID_B),  # CUDA takes a unique UUID prefix
    ("MIG-0e1f2a3b-4c5d-6e7f-8091-a2b3c4d5e6f7", 0, UUID_A),  # not a whole card: the first one
    ("", 0, UUID_A),  # sees no card (a CPU lane's env): still one name, the first card's
])
def test_the_lock_is_named_by_the_visible_cards_uuid(env: dict[str, str], tmp_path: Path, visible: str | None,
                                                     ordinal: int, expected: str) -> None:
    fake_smi(tmp_path / "bin", TWO_CARDS)
    assert lock_name(env, tmp_path / "bin", visible, ordinal) == f"{expected}.lock"


def test_without_a_uuid_the_lock_is_named_by_index(env: dict[str, str], tmp_path: Path) -> None:
    fake_smi(tmp_path / "bin", "[N/A], 0\n[N/A], 1\n")
    assert lock_name(env, tmp_path / "bin", "1") == "gpu1.lock"


@pytest.mark.skipif(REAL_SMI, reason="a real nvidia-smi is installed at a fallback path")
@pytest.mark.parametrize("visible", [None, "1", UUID_B])
def test_without_nvidia_smi_there_is_one_machine_lock(env: dict[str, str], tmp_path: Path,
                                                      visible: str | None) -> None:
    (tmp_path / "empty").mkdir()
    assert lock_name(env, tmp_path / "empty", visible) == "gpu0.lock"


@pytest.mark.skipif(REAL_SMI, reason="a real nvidia-smi is installed at a fallback path")
def test_a_failing_nvidia_smi_means_the_machine_lock(env: dict[str, str], tmp_path: Path) -> None:
    fake_smi(tmp_path / "bin", "NVIDIA-SMI has failed because it couldn't communicate with the driver", 9)
    assert lock_name(env, tmp_path / "bin", None) == "gpu0.lock"


# --- foreground runs: cuda takes the card, cpu does not --------------------------------------

# Decides like a foreground run (`hold_card_if_cuda(device)` where --device is resolved), reports
# what it did, and keeps whatever it took until its stdin closes.
FOREGROUND = """
import sys
from workers import gpu_lock
took = gpu_lock.hold_card_if_cuda(sys.argv[1])
print(took, gpu_lock.held_here(), flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("device, takes", [("cuda", True), ("cuda:0", True), ("cpu", False), ("meta", False)])
def test_a_cuda_foreground_run_takes_the_card_and_a_cpu_one_does_not(env: dict[str, str], device: str,
                                                                    takes: bool) -> None:
    p = spawn(env, FOREGROUND, device)
    assert read_line(p.stdout, 20) == f"{takes} {takes}"
    assert gpu_lock.is_held() is takes
    assert (gpu_lock.holder_pid() == p.pid) is takes
    finish(p)
    assert not gpu_lock.is_held()


def test_auto_must_be_resolved_first() -> None:
    with pytest.raises(ValueError, match="resolve 'auto'"):
        gpu_lock.hold_card_if_cuda("auto")


def test_a_waiting_foreground_run_says_who_holds_the_card(env: dict[str, str]) -> None:
    with gpu_lock_holder(env) as holder:
        p = spawn(env, FOREGROUND, "cuda")
        line = read_line(p.stderr, 20) or ""
        assert line.startswith(f"lab: waiting for the GPU {gpu_lock.card_name()}: pid {holder} ("), line
        assert "holds it" in line
        assert read_line(p.stdout, 0.5) is None, "it must wait while the card is held"
    assert read_line(p.stdout, 20) == "True True"
    _, err = finish(p)
    assert "waiting" not in err, "one line, not one per retry"


# A job process that already holds the card and then resolves a cuda device (a kind that builds a
# foreground-style context, a second thread): none of it may wait on itself.
IDEMPOTENT = """
import threading
from workers import gpu_lock
fd = gpu_lock.acquire()
fds = {fd, gpu_lock.acquire()}
assert gpu_lock.hold_card_if_cuda("cuda") and gpu_lock.hold_card_if_cuda("cuda:0")
t = threading.Thread(target=lambda: fds.add(gpu_lock.acquire()))
t.start(); t.join(10)
assert not t.is_alive() and fds == {fd}, fds
assert gpu_lock.is_held()
print("ok", flush=True)
"""


def test_taking_it_twice_in_one_process_does_not_deadlock(env: dict[str, str]) -> None:
    p = spawn(env, IDEMPOTENT)
    out, _ = finish(p)
    assert out.strip() == "ok"


def test_a_lock_file_deleted_while_waiting_is_not_trusted(env: dict[str, str]) -> None:
    """A /tmp cleaner (or a person) removes the file while a waiter waits on it: the waiter, once
    through, must hold the file now at the path, or a newcomer could lock that one beside it."""
    with gpu_lock_holder(env):
        waiter = spawn(env, WAITER)
        assert read_line(waiter.stdout, 20) == "waiting"
        gpu_lock.lock_path().unlink()
    assert read_line(waiter.stdout, 20) == f"acquired {waiter.pid}"
    assert gpu_lock.is_held(), "the waiter holds a file nobody else can find"
    assert gpu_lock.holder_pid() == waiter.pid
    finish(waiter)
