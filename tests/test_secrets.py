"""Where the daemon's GitHub token comes from (common.github_token), and keeping it from processes
of the same user (common.harden_process), with real files and real processes.

The process tests reproduce the review's finding 8: a job runs as the daemon's user and can read
/proc/<daemon pid>/environ, the token included. Root reads every /proc file, so as root the
"daemon" and the "reader" both run as uid 65534 (nobody); as any other user, both run as that
user, which is the same situation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import common
from config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "ghp_reproduction_secret_0123456789"


def secret_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


# --- github_token: the order of the sources ----------------------------------------------------


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, str]:
    """All four sources present, each with a token of its own."""
    creds = tmp_path / "credentials"
    creds.mkdir()
    secret_file(creds / "github-token", "  from-credential\n", 0o400)  # as systemd makes it
    fd_file = secret_file(tmp_path / "fd-token", "from-fd\n")
    fd = os.open(fd_file, os.O_RDONLY)
    yield {"CREDENTIALS_DIRECTORY": str(creds), "GITHUB_TOKEN_FD": str(fd),
           "GITHUB_TOKEN_FILE": str(secret_file(tmp_path / "token", "from-file\n")),
           "GITHUB_TOKEN": " from-env "}
    os.close(fd)


def test_the_credential_comes_first_then_the_descriptor_then_the_file_then_the_variable(
        sources: dict[str, str]) -> None:
    env = dict(sources)
    assert common.github_token(env) == "from-credential"
    del env["CREDENTIALS_DIRECTORY"]
    assert common.github_token(env) == "from-fd"
    del env["GITHUB_TOKEN_FD"]
    assert common.github_token(env) == "from-file"
    del env["GITHUB_TOKEN_FILE"]
    assert common.github_token(env) == "from-env"  # stripped, as the bridge always did
    assert common.github_token({"GITHUB_TOKEN": "  "}) is None
    assert common.github_token({}) is None


def test_a_credentials_directory_without_the_token_falls_through(tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    secret_file(creds / "other", "not ours")  # a unit may load other credentials
    env = {"CREDENTIALS_DIRECTORY": str(creds), "GITHUB_TOKEN_FILE": str(secret_file(tmp_path / "t", "tok"))}
    assert common.github_token(env) == "tok"


def test_a_token_file_others_may_read_is_refused_naming_it(tmp_path: Path) -> None:
    for mode in (0o644, 0o640, 0o604, 0o620):
        path = secret_file(tmp_path / f"token-{mode:o}", TOKEN, mode)
        with pytest.raises(ConfigError) as e:
            common.github_token({"GITHUB_TOKEN_FILE": str(path), "GITHUB_TOKEN": "fallback"})
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg and f"{mode:04o}" in msg and "chmod 600" in msg
        assert TOKEN not in msg
    private = secret_file(tmp_path / "ok", TOKEN, 0o400)
    assert common.github_token({"GITHUB_TOKEN_FILE": str(private)}) == TOKEN


@pytest.mark.parametrize("text, problem", [
    ("", "empty"), ("  \n", "empty"), ("GITHUB_TOKEN=abc\n", "KEY=value"), ("abc\ndef\n", "one line"),
])
def test_a_token_file_that_holds_no_single_token_is_refused(tmp_path: Path, text: str, problem: str) -> None:
    path = secret_file(tmp_path / "token", text)
    with pytest.raises(ConfigError, match=problem):
        common.github_token({"GITHUB_TOKEN_FILE": str(path)})


def test_a_missing_token_file_is_an_error_not_a_silent_fallback(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="GITHUB_TOKEN_FILE: cannot read .*missing"):
        common.github_token({"GITHUB_TOKEN_FILE": str(tmp_path / "missing"), "GITHUB_TOKEN": "x"})


def test_the_descriptor_is_read_once_and_left_pointing_at_dev_null(tmp_path: Path) -> None:
    fd = os.open(secret_file(tmp_path / "token", f"{TOKEN}\n"), os.O_RDONLY)
    try:
        env = {"GITHUB_TOKEN_FD": str(fd)}
        assert common.github_token(env) == TOKEN
        null = os.stat(os.devnull)
        st = os.fstat(fd)
        assert (st.st_dev, st.st_ino) == (null.st_dev, null.st_ino), "a child inheriting it finds nothing"
        assert os.read(fd, 100) == b""
        assert common.github_token(env) == TOKEN  # the bridge may ask again
    finally:
        os.close(fd)


def test_a_descriptor_that_holds_no_token_is_refused_and_still_closed_off(tmp_path: Path) -> None:
    fd = os.open(secret_file(tmp_path / "token", "two words\n"), os.O_RDONLY)
    try:
        with pytest.raises(ConfigError, match="GITHUB_TOKEN_FD: descriptor .* more than one"):
            common.github_token({"GITHUB_TOKEN_FD": str(fd)})
        assert os.read(fd, 100) == b""  # /dev/null now, as after a good read
    finally:
        os.close(fd)


def test_the_descriptor_may_be_a_pipe(tmp_path: Path) -> None:
    r, w = os.pipe()
    os.write(w, f" {TOKEN} \n".encode())
    os.close(w)
    try:
        assert common.github_token({"GITHUB_TOKEN_FD": str(r)}) == TOKEN
    finally:
        os.close(r)


def test_a_descriptor_on_a_file_others_may_read_is_refused(tmp_path: Path) -> None:
    fd = os.open(secret_file(tmp_path / "token", TOKEN, 0o644), os.O_RDONLY)
    try:
        with pytest.raises(ConfigError, match="GITHUB_TOKEN_FD: descriptor .* mode 0644"):
            common.github_token({"GITHUB_TOKEN_FD": str(fd)})
    finally:
        os.close(fd)
    with pytest.raises(ConfigError, match="GITHUB_TOKEN_FD: 'x' is not a descriptor number"):
        common.github_token({"GITHUB_TOKEN_FD": "x"})


# --- harden_process: real processes of one unprivileged user ------------------------------------

# The "daemon": the token is in its environment at exec, as systemd's EnvironmentFile puts it.
# It hardens itself (argv[1] == "1") or not, starts a "job" with subprocess (fork + exec), and
# says: its own dumpable flag, the job's pid, the job's dumpable flag. It lives until stdin closes.
DAEMON = """
import os, subprocess, sys
import common
if sys.argv[1] == "1":
    common.harden_process()
job = subprocess.Popen(
    [sys.executable, "-c", "import common, time; print(common.is_dumpable(), flush=True); time.sleep(60)"],
    stdout=subprocess.PIPE, text=True, env=dict(os.environ, JOB_MARKER="the-job-env"))
print(common.is_dumpable(), job.pid, job.stdout.readline().strip(), flush=True)
sys.stdin.read()
job.kill()
"""

# The "reader": what a job (or the agent, were it the same user) tries against a pid.
READER = """
import ctypes, json, os, sys
pid = int(sys.argv[1])
out = {}
def attempt(name, fn):
    try:
        out[name] = ["ok", fn()]
    except OSError as e:
        out[name] = [type(e).__name__, e.errno]
attempt("environ", lambda: open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace"))
attempt("mem", lambda: os.close(os.open(f"/proc/{pid}/mem", os.O_RDONLY)))
attempt("fd", lambda: sorted(os.listdir(f"/proc/{pid}/fd")))
attempt("fd0", lambda: open(f"/proc/{pid}/fd/0", "rb").read().decode(errors="replace"))
if len(sys.argv) > 2:  # a file the token is in
    attempt("file", lambda: open(sys.argv[2], "rb").read().decode(errors="replace"))
libc = ctypes.CDLL(None, use_errno=True)
PTRACE_SEIZE = 0x4206  # attaches without stopping it; the reader's exit detaches
r = libc.ptrace(ctypes.c_long(PTRACE_SEIZE), ctypes.c_long(pid), None, None)
out["ptrace"] = ["ok", 0] if r == 0 else ["OSError", ctypes.get_errno()]
print(json.dumps(out))
"""


@dataclasses.dataclass(frozen=True)
class User:
    """How to start a process as the tests' unprivileged user: Popen keywords and a python."""

    popen: dict[str, Any]
    python: str
    cwd: str  # where its `import common` finds the module


@pytest.fixture(scope="module")
def modules_for_nobody() -> Iterator[str]:
    """common.py and config.py (standard library only) where uid 65534 can read them: a fresh
    clone often sits in a 0700 directory (mktemp -d), which nobody cannot enter."""
    d = Path(tempfile.mkdtemp(prefix="lab-nobody-"))  # directly under /tmp, which anyone may pass
    for name in ("common.py", "config.py"):
        shutil.copy2(ROOT / name, d / name)
    d.chmod(0o755)
    yield str(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def as_user(modules_for_nobody: str) -> User:
    if not sys.platform.startswith("linux"):
        pytest.skip("prctl(PR_SET_DUMPABLE) and /proc are Linux")
    if os.geteuid() != 0:
        return User({}, sys.executable, str(ROOT))  # already unprivileged: plays both parts
    kw: dict[str, Any] = {"user": 65534, "group": 65534, "extra_groups": []}
    # The venv's interpreter may sit where nobody can reach it (a pyenv under /root, mode 0700);
    # these processes need only the standard library and this checkout, so any python 3.11+ does.
    problems = []
    for python in dict.fromkeys([sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"]):
        try:
            probe = subprocess.run([python, "-c", "import os, common; print(os.getuid())"],
                                   cwd=modules_for_nobody,
                                   capture_output=True, text=True, timeout=60, **kw)
        except (OSError, subprocess.SubprocessError) as e:
            problems.append(f"{python}: {e}")
            continue
        if probe.returncode == 0 and probe.stdout.strip() == "65534":
            return User(kw, python, modules_for_nobody)
        problems.append(f"{python}: {probe.stderr.strip()[-200:]}")
    pytest.skip("running as root (which reads every /proc file) and cannot run a python that "
                f"imports this checkout as uid 65534 (nobody): {'; '.join(problems)}")


def _read(pid: int, user: User, *files: str) -> dict[str, list[Any]]:
    r = subprocess.run([user.python, "-c", READER, str(pid), *files], cwd=user.cwd, capture_output=True,
                       text=True, timeout=60, **user.popen)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _run_daemon(harden: bool, user: User) -> tuple[subprocess.Popen, list[str]]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GITHUB_TOKEN": TOKEN,
           "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.Popen([user.python, "-c", DAEMON, "1" if harden else "0"], cwd=user.cwd, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **user.popen)
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if len(line) != 3:
        proc.kill()
        raise AssertionError(f"the daemon did not start: {proc.communicate(timeout=30)}")
    return proc, line


def _stop(proc: subprocess.Popen) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=30)


def test_without_hardening_a_same_user_process_reads_the_token_from_proc(as_user: User) -> None:
    """The finding: the job's GITHUB_TOKEN was removed, the daemon's initial environment was not."""
    proc, (dumpable, _, _) = _run_daemon(False, as_user)
    try:
        seen = _read(proc.pid, as_user)
    finally:
        _stop(proc)
    assert dumpable == "True"
    assert seen["environ"][0] == "ok" and f"GITHUB_TOKEN={TOKEN}" in seen["environ"][1]
    assert seen["fd"][0] == "ok"


def test_harden_process_shuts_proc_and_ptrace_and_its_jobs_stay_normal(as_user: User) -> None:
    proc, (dumpable, job_pid, job_dumpable) = _run_daemon(True, as_user)
    try:
        daemon = _read(proc.pid, as_user)
        job = _read(int(job_pid), as_user)
    finally:
        _stop(proc)
    assert dumpable == "False"
    assert daemon["environ"][0] == "PermissionError", daemon["environ"]
    assert daemon["mem"][0] == "PermissionError", daemon["mem"]
    assert daemon["fd"][0] == "PermissionError", daemon["fd"]
    assert daemon["ptrace"] == ["OSError", 1], daemon["ptrace"]  # EPERM
    # execve makes the job dumpable again: its own /proc is an ordinary one.
    assert job_dumpable == "True"
    assert job["environ"][0] == "ok" and "JOB_MARKER=the-job-env" in job["environ"][1]
    assert job["fd"][0] == "ok"


# As systemd does for `StandardInput=file:PATH` with `User=lab` (daemon/systemd.py, token_via
# "stdin"): root opens the root-only file as the new process's stdin, then the process becomes
# the user and execs. Here the parent (root) opens it for Popen, which switches to nobody.
STDIN_DAEMON = """
import hashlib, os, subprocess, sys, time
import common
common.harden_process()
token = common.github_token(os.environ)  # GITHUB_TOKEN_FD=0
job = subprocess.Popen([sys.executable, "-c", "import sys; print(len(sys.stdin.buffer.read()), flush=True); "
                        "import time; time.sleep(60)"], stdout=subprocess.PIPE, text=True)
print(hashlib.sha256(token.encode()).hexdigest(), job.pid, job.stdout.readline().strip(), flush=True)
time.sleep(60)
"""


def test_a_token_on_stdin_from_a_root_only_file_reaches_the_daemon_and_nothing_else(
        as_user: User) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: a root-only token file, opened by root for a process of another user")
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o755)  # like /etc/reasoning-lab: anyone may look in, only the file is closed
        path = secret_file(Path(d) / "github-token", f"{TOKEN}\n")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GITHUB_TOKEN_FD": "0",
               "PYTHONDONTWRITEBYTECODE": "1"}
        with open(path, "rb") as stdin:
            proc = subprocess.Popen([as_user.python, "-c", STDIN_DAEMON], cwd=as_user.cwd, env=env,
                                    stdin=stdin,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    **as_user.popen)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().split()
            assert len(line) == 3, proc.stderr.read() if proc.stderr else line
            digest, job_pid, job_stdin_bytes = line
            seen = _read(proc.pid, as_user, str(path))
        finally:
            for pid in ([int(line[1])] if len(line) == 3 else []) + [proc.pid]:
                os.kill(pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert digest == hashlib.sha256(TOKEN.encode()).hexdigest(), "the daemon got the token"
    assert job_stdin_bytes == "0", "a job that inherits the daemon's stdin finds /dev/null there"
    assert seen["file"][0] == "PermissionError", "the daemon's user cannot open the token file"
    assert seen["fd0"][0] == "PermissionError" and seen["environ"][0] == "PermissionError"
    assert TOKEN not in json.dumps(seen)


def test_harden_process_in_this_process_is_reported_and_harmless_to_children() -> None:
    """In a child of its own, so the test process stays dumpable (pytest, debuggers)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("Linux only")
    code = ("import common, subprocess, sys; assert common.is_dumpable(); common.harden_process(); "
            "assert common.is_dumpable() is False; "
            "r = subprocess.run([sys.executable, '-c', 'import common; print(common.is_dumpable())'], "
            "capture_output=True, text=True, check=True); print(r.stdout.strip())")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True"


def test_no_source_of_the_token_reaches_a_job(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from workers.supervise import lane_env

    for name in ("GITHUB_TOKEN", "GITHUB_TOKEN_FD", "GITHUB_TOKEN_FILE", "CREDENTIALS_DIRECTORY"):
        monkeypatch.setenv(name, "x")
    for lane in ("gpu", "cpu"):
        env = lane_env(lane, str(tmp_path / "q.db"), tmp_path, "host")
        assert not {"GITHUB_TOKEN", "GITHUB_TOKEN_FD", "GITHUB_TOKEN_FILE",
                    "CREDENTIALS_DIRECTORY"} & set(env)
