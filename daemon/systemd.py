"""The systemd unit that keeps `lab daemon` running on the GPU box.

`lab service print` writes it to stdout; README "Running as a service" says how to install it,
docs/SECURITY.md how to run the daemon as a user of its own.
The daemon stops on SIGTERM within QueueConfig.shutdown_seconds (+ the kill grace of its jobs),
so TimeoutStopSec leaves room for that before systemd sends SIGKILL; a job systemd kills anyway
is requeued by the lease sweep at the next start. KillMode=mixed sends SIGTERM to the daemon
only (it stops its jobs' process groups itself) and SIGKILL to everything left at the timeout.

The token never goes into the unit, nor (with a token file) into the daemon's environment:
  - a user unit (`systemctl --user`, no `user`): Environment=GITHUB_TOKEN_FILE=<path>, a file
    that user reads (common.github_token checks it is chmod 600);
  - a system unit (`user` set), token_via "stdin" (the default): StandardInput=file:<path> and
    GITHUB_TOKEN_FD=0. systemd opens the file as root before it switches to the user, so the file
    stays root:root 0600: no file the daemon's user can open holds the token, and neither can the
    jobs, which run as that user too;
  - a system unit, token_via "credential": LoadCredential=github-token:<path>. systemd copies the
    file to $CREDENTIALS_DIRECTORY, readable by the service's user, and so by every job as well
    (a job that opens a path its spec names can copy it): use it when the jobs are trusted.
Either way UnsetEnvironment=GITHUB_TOKEN drops a token an old environment file still holds.

unit_text is pure text (tests render it); the lookups that read the machine (gpu_device_group,
device_problems, token_file_problems) are separate, for the CLI to call at install time.
"""

from __future__ import annotations

import grp
import math
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Literal

import common
import config

TokenVia = Literal["stdin", "credential"]
TOKEN_VIA: tuple[TokenVia, ...] = ("stdin", "credential")
UNIT_NAME = "lab.service"
GPU_DEVICE = Path("/dev/nvidia0")
GPU_FALLBACK_GROUP = "video"  # the group many distributions give GPU device nodes


def _unit_head(description: str, after: str, user: str | None, group: str | None) -> list[str]:
    """[Unit] and the start of [Service], the same for the daemon's unit and the agent's."""
    lines = ["[Unit]", f"Description={description}", "Wants=network-online.target", f"After={after}",
             "StartLimitIntervalSec=600", "StartLimitBurst=10", "", "[Service]", "Type=simple"]
    if user:
        lines.append(f"User={user}")
    if group:
        lines.append(f"Group={group}")
    return lines


def default_lab_bin() -> Path:
    """The `lab` next to the running interpreter (the venv's), else the one on PATH."""
    here = Path(sys.executable).parent / "lab"
    return here if here.exists() else Path("lab")


def _value(text: str) -> str:
    """A path as one unit-file value: '%' starts a systemd specifier, so it is doubled."""
    return str(text).replace("%", "%%")


def _assign(key: str, value: str) -> str:
    """One KEY=value for Environment=, quoted when it holds a space (systemd splits on spaces)."""
    item = f"{key}={_value(value)}"
    return f'"{item}"' if any(ch.isspace() for ch in item) else item


def _queue_overrides(env_file: Path) -> dict[str, str]:
    """The LAB_QUEUE_* lines of a systemd environment file (KEY=value, optional quotes)."""
    try:
        lines = env_file.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, sep, value = line.strip().partition("=")
        if sep and key.startswith("LAB_QUEUE_"):
            out[key] = value.strip().strip('"').strip("'")
    return out


def unit_text(workdir: str | Path | None = None, lab_bin: str | Path | None = None,
              env_file: str | Path | None = None, user: str | None = None,
              cpu_workers: int | None = None, *, group: str | None = None,
              gpu_group: str | None = None, token_file: str | Path | None = None,
              token_via: TokenVia | None = None) -> str:
    """The unit. `user` makes it a system unit (User=, WantedBy=multi-user.target); without it,
    a `systemctl --user` unit. `group`: Group= (else the user's primary group). `gpu_group`:
    SupplementaryGroups=, the group that may open /dev/nvidia* (gpu_device_group() finds it).
    `token_file`: where the token is (see the module docstring for how each kind of unit gets
    it); without it, the token comes from the environment file as before. `token_via` (system
    units only): "stdin" (default) or "credential"."""
    workdir = Path(workdir or os.getcwd()).resolve()
    lab = Path(lab_bin) if lab_bin else default_lab_bin()
    if not lab.is_absolute():
        lab = workdir / ".venv" / "bin" / "lab"
    env_file = Path(env_file) if env_file else workdir / ".env"
    if token_via is not None and token_via not in TOKEN_VIA:
        raise ValueError(f"token_via: {token_via!r} is not one of {', '.join(TOKEN_VIA)}")
    if token_via is not None and user is None:
        raise ValueError("token_via: only a system unit (a user) chooses; a user unit reads the "
                         "token file itself (GITHUB_TOKEN_FILE)")
    if token_via is not None and token_file is None:
        raise ValueError("token_via: give the token file too")
    if user is None and (group or gpu_group):
        raise ValueError("group and gpu_group need a user: a user unit runs with that user's groups")
    token = Path(token_file).expanduser().resolve() if token_file is not None else None
    r = config.SYSTEMD
    # The daemon's drain (shutdown, then the kill grace) as it will run: the overrides in this
    # environment and in the unit's environment file, not the defaults; systemd's SIGKILL must
    # come after it.
    q = config.queue_config({**os.environ, **_queue_overrides(env_file)})
    stop = max(r.stop_seconds, math.ceil(q.shutdown_seconds + q.kill_grace_seconds) + 10)
    exec_start = f"{lab} daemon" + (f" --cpu-workers {cpu_workers}" if cpu_workers else "")
    env = [_assign("PYTHONUNBUFFERED", "1")]
    token_lines: list[str] = []
    if token is not None and user is None:
        env.append(_assign("GITHUB_TOKEN_FILE", str(token)))
    elif token is not None and (token_via or "stdin") == "stdin":
        token_lines = [
            "# The token: systemd (root) opens this root:root 0600 file as the daemon's stdin; the",
            "# daemon reads it once (GITHUB_TOKEN_FD=0) and puts /dev/null in its place.",
            f"StandardInput=file:{_value(str(token))}",
            "StandardOutput=journal",  # not the default `inherit` of stdin: the log goes to journald
            "StandardError=journal",
        ]
        env.append(_assign("GITHUB_TOKEN_FD", "0"))
    elif token is not None:
        token_lines = [
            "# The token: $CREDENTIALS_DIRECTORY/github-token, readable by this user (and its jobs).",
            f"LoadCredential={common.TOKEN_CREDENTIAL}:{_value(str(token))}",
        ]
    lines = [
        "# reasoning-lab queue daemon. Install: see README, \"Running as a service\";",
        "# as a user of its own: docs/SECURITY.md.",
        *_unit_head("reasoning-lab queue daemon (GPU and CPU lanes, GitHub bridge)",
                    "network-online.target", user, group),
    ]
    if gpu_group:
        lines.append(f"SupplementaryGroups={gpu_group}")
    lines.append(f"WorkingDirectory={workdir}")
    if token is None:
        lines += [
            "# GITHUB_TOKEN, GITHUB_REPOSITORY, LAB_DB, LAB_RUNS, LAB_ARCHIVE ... one KEY=value per line;",
            "# keep it chmod 600: the token never goes into the unit itself. '-': the file may be absent.",
        ]
    else:
        lines += [
            "# GITHUB_REPOSITORY, LAB_DB, LAB_RUNS, LAB_ARCHIVE ... one KEY=value per line; the token",
            "# has a file of its own (below). '-': the file may be absent.",
        ]
    lines.append(f"EnvironmentFile=-{env_file}")
    lines.append("Environment=" + " ".join(env))
    if token is not None:
        lines.append("UnsetEnvironment=GITHUB_TOKEN")  # applied last: also to the environment file
    lines += token_lines
    if user:
        # No setuid/setgid gains for the daemon or its jobs (sudo, su). CUDA does not need them
        # once the driver's nodes exist: nvidia-modprobe, setuid root, can then no longer create
        # /dev/nvidia-uvm on first use, so load nvidia-uvm at boot (docs/SECURITY.md). Not set,
        # on purpose: PrivateTmp (the machine-wide GPU lock, LAB_GPU_LOCK_DIR, defaults to /tmp and
        # must be the same /tmp that foreground runs see), ProtectHome (the checkout, the venv and
        # the user's caches may live in a home), ProtectSystem (the user cannot write /usr anyway).
        lines.append("NoNewPrivileges=yes")
    lines += [
        f"ExecStart={exec_start}",
        "Restart=on-failure",
        f"RestartSec={r.restart_seconds}",
        "KillSignal=SIGTERM",
        "KillMode=mixed",
        f"TimeoutStopSec={stop}",
        "",
        "[Install]",
        "WantedBy=multi-user.target" if user else "WantedBy=default.target",
    ]
    return "\n".join(lines) + "\n"


def gpu_device_group(device: str | Path = GPU_DEVICE) -> str | None:
    """The group for SupplementaryGroups=: the group that owns `device` when it exists, else
    "video". None when the node belongs to group root (gid 0): the service must never be put in
    group root, and such a node is usually mode 0666 (the NVIDIA driver's default), which every
    user can open anyway (device_problems says so)."""
    try:
        gid = os.stat(device).st_gid
    except FileNotFoundError:
        return GPU_FALLBACK_GROUP
    if gid == 0:
        return None
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)  # systemd takes a numeric group too


def device_problems(devices: list[Path] | None = None) -> list[str]:
    """One line per /dev/nvidia* node any user may open: then the agent's user can use the card
    outside the queue whatever groups it is in."""
    nodes = devices if devices is not None else sorted(Path("/dev").glob("nvidia*"))
    out = []
    for node in nodes:
        try:
            st = os.stat(node)
        except OSError:
            continue
        if stat.S_ISCHR(st.st_mode) and st.st_mode & 0o006:
            out.append(f"{node}: mode {stat.S_IMODE(st.st_mode):04o}: every user can open the card; "
                       "see docs/SECURITY.md (NVreg_DeviceFileMode=0660)")
    return out


def token_file_problems(path: str | Path) -> list[str]:
    """What is wrong with a token file for a system unit (systemd reads it as root): it must be
    a regular file owned by root with no group or other permission. Empty: nothing."""
    path = Path(path)
    if not path.is_absolute():
        return [f"{path}: give an absolute path"]
    try:
        st = os.stat(path)
    except OSError as e:
        return [f"{path}: {e.strerror}"]
    out = []
    if not stat.S_ISREG(st.st_mode):
        out.append(f"{path}: not a regular file")
    if st.st_uid != 0:
        out.append(f"{path}: owned by uid {st.st_uid}, not root (sudo chown root:root {path})")
    if st.st_mode & 0o077:
        out.append(f"{path}: mode {stat.S_IMODE(st.st_mode):04o}; other users may read it "
                   f"(sudo chmod 600 {path})")
    return out


def unit_path(system: bool) -> Path:
    """Where `systemctl` looks for the unit: /etc/systemd/system, or the user's config dir."""
    if system:
        return Path("/etc/systemd/system") / UNIT_NAME
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "systemd" / "user" / UNIT_NAME


def install_unit(text: str, system: bool, path: Path | None = None, reload: bool = True) -> Path:
    """Write the unit (mode 0644, atomically) and `systemctl [--user] daemon-reload`. Refuses a
    unit that assigns GITHUB_TOKEN itself: a unit file is world-readable."""
    if any(line.startswith("Environment=") and "GITHUB_TOKEN=" in line for line in text.splitlines()):
        raise ValueError("the unit assigns GITHUB_TOKEN; give a token file instead")
    path = path or unit_path(system)
    path.parent.mkdir(parents=True, exist_ok=True)
    common.write_atomic(path, text)
    os.chmod(path, 0o644)
    if reload:
        subprocess.run(["systemctl", *([] if system else ["--user"]), "daemon-reload"], check=True,
                       timeout=60)
    return path


AGENT_UNIT_NAME = "lab-agent.service"
AGENT_ENV_FILE = ".env.agent"


def _arg(text: str) -> str:
    """One ExecStart= argument: specifiers escaped, quoted when it holds a space."""
    value = _value(text)
    return f'"{value}"' if any(ch.isspace() for ch in value) else value


def agent_unit_text(workdir: str | Path | None = None, user: str | None = None,
                    lab_bin: str | Path | None = None, env_file: str | Path | None = None,
                    claude: str | Path | None = None, *, group: str | None = None) -> str:
    """The unit for `lab agent` (lab-agent.service): Claude Code in a loop, one turn at a time.
    No GitHub token and no GPU group: the agent needs neither (the daemon's bridge talks to
    GitHub, the queue runs the jobs). Its environment file is its own (default .env.agent), not
    the daemon's .env, which may hold the token; `lab agent` drops a token that still reaches it.
    On SIGTERM the loop stops a running turn (SIGTERM to the turn's process group, then SIGKILL
    after AGENT.stop_grace_seconds) and exits 0, so TimeoutStopSec is a little above that grace."""
    workdir = Path(workdir or os.getcwd()).resolve()
    lab = Path(lab_bin) if lab_bin else default_lab_bin()
    if not lab.is_absolute():
        lab = workdir / ".venv" / "bin" / "lab"
    env_file = Path(env_file) if env_file else workdir / AGENT_ENV_FILE
    if user is None and group:
        raise ValueError("group needs a user: a user unit runs with that user's groups")
    stop = math.ceil(config.AGENT.stop_grace_seconds) + 20
    exec_start = f"{_arg(str(lab))} agent --cwd {_arg(str(workdir))}"
    if claude:
        exec_start += f" --claude {_arg(str(claude))}"
    env = [_assign("PYTHONUNBUFFERED", "1"), "CUDA_VISIBLE_DEVICES="]
    lines = [
        "# reasoning-lab agent loop: `lab agent` runs Claude Code headless, one turn at a time, when",
        "# `lab next` has something or a job has ended. Install: see README, \"Running as a service\".",
        "# To stop it for good: touch $LAB_RUNS/agent/STOP (default runs/agent/STOP here); it exits 0",
        "# before its next turn, and again at every start until the file is removed.",
        "# Each turn is one line of $LAB_RUNS/agent/turns.jsonl.",
        *_unit_head("reasoning-lab agent loop (Claude Code, one turn at a time)",
                    f"network-online.target {UNIT_NAME}", user, group),
    ]
    lines += [
        f"WorkingDirectory={workdir}",
        "# LAB_DB, LAB_RUNS (the daemon's), ANTHROPIC_API_KEY when claude is not logged in ... one",
        "# KEY=value per line, chmod 600. Never the GitHub token. '-': the file may be absent.",
        f"EnvironmentFile=-{env_file}",
        "Environment=" + " ".join(env),
        "UnsetEnvironment=GITHUB_TOKEN GITHUB_TOKEN_FILE GITHUB_TOKEN_FD",
    ]
    if user:
        lines.append("NoNewPrivileges=yes")
    lines += [
        f"ExecStart={exec_start}",
        "Restart=on-failure",
        f"RestartSec={config.SYSTEMD.restart_seconds}",
        "KillSignal=SIGTERM",
        "# SIGTERM to `lab agent` only: it stops the running turn's process group itself.",
        "KillMode=mixed",
        f"TimeoutStopSec={stop}",
        "",
        "[Install]",
        "WantedBy=multi-user.target" if user else "WantedBy=default.target",
    ]
    return "\n".join(lines) + "\n"
