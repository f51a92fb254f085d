"""The systemd unit that keeps `lab daemon` running on the GPU box.

`lab service print` writes it to stdout; README "Running as a service" says how to install it.
The daemon stops on SIGTERM within QueueConfig.shutdown_seconds (+ the kill grace of its jobs),
so TimeoutStopSec leaves room for that before systemd sends SIGKILL; a job systemd kills anyway
is requeued by the lease sweep at the next start. KillMode=mixed sends SIGTERM to the daemon
only (it stops its jobs' process groups itself) and SIGKILL to everything left at the timeout.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import config


def default_lab_bin() -> Path:
    """The `lab` next to the running interpreter (the venv's), else the one on PATH."""
    here = Path(sys.executable).parent / "lab"
    return here if here.exists() else Path("lab")


def unit_text(workdir: str | Path | None = None, lab_bin: str | Path | None = None,
              env_file: str | Path | None = None, user: str | None = None,
              cpu_workers: int | None = None) -> str:
    workdir = Path(workdir or os.getcwd()).resolve()
    lab = Path(lab_bin) if lab_bin else default_lab_bin()
    if not lab.is_absolute():
        lab = workdir / ".venv" / "bin" / "lab"
    env_file = Path(env_file) if env_file else workdir / ".env"
    r = config.SYSTEMD
    stop = max(r.stop_seconds,
               int(config.QUEUE.shutdown_seconds + config.QUEUE.kill_grace_seconds) + 10)
    exec_start = f"{lab} daemon" + (f" --cpu-workers {cpu_workers}" if cpu_workers else "")
    lines = [
        "# reasoning-lab queue daemon. Install: see README, \"Running as a service\".",
        "[Unit]",
        "Description=reasoning-lab queue daemon (GPU and CPU lanes, GitHub bridge)",
        "Wants=network-online.target",
        "After=network-online.target",
        "StartLimitIntervalSec=600",
        "StartLimitBurst=10",
        "",
        "[Service]",
        "Type=simple",
    ]
    if user:
        lines.append(f"User={user}")
    lines += [
        f"WorkingDirectory={workdir}",
        "# GITHUB_TOKEN, GITHUB_REPOSITORY, LAB_DB, LAB_RUNS, LAB_ARCHIVE ... one KEY=value per line;",
        "# keep it chmod 600: the token never goes into the unit itself. '-': the file may be absent.",
        f"EnvironmentFile=-{env_file}",
        "Environment=PYTHONUNBUFFERED=1",
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
