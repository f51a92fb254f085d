"""`lab service print`: the systemd unit for the daemon."""

from __future__ import annotations

import configparser
import json
import shutil
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

import config
from cli import main


def parse(unit: str) -> configparser.ConfigParser:
    p = configparser.ConfigParser(strict=True, interpolation=None, comment_prefixes=("#",))
    p.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    p.read_string(unit)
    return p


def test_unit_restarts_on_failure_and_reads_the_token_from_a_file(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["service", "print", "--workdir", str(tmp_path), "--user", "lab",
                                  "--env-file", "/etc/reasoning-lab.env", "--json"])
    assert r.exit_code == 0, r.output
    unit = json.loads(r.output)["unit"]
    svc = parse(unit)["Service"]
    lab = Path(sys.executable).parent / "lab"
    assert svc["ExecStart"] == f"{lab} daemon"
    assert svc["WorkingDirectory"] == str(tmp_path.resolve())
    assert svc["EnvironmentFile"] == "-/etc/reasoning-lab.env"
    assert (svc["Restart"], svc["KillSignal"], svc["User"]) == ("on-failure", "SIGTERM", "lab")
    # systemd must wait for the daemon's own graceful stop before it sends SIGKILL.
    stop = int(svc["TimeoutStopSec"])
    assert stop >= 30 and stop > config.QUEUE.shutdown_seconds + config.QUEUE.kill_grace_seconds
    assert parse(unit)["Install"]["WantedBy"] == "multi-user.target"
    assert "GITHUB_TOKEN=" not in unit  # the token lives only in the environment file

    if shutil.which("systemd-analyze"):
        path = tmp_path / "lab.service"
        path.write_text(unit.replace("User=lab\n", ""))  # the test machine has no user `lab`
        v = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True,
                           timeout=60)
        assert v.returncode == 0 and str(path) not in v.stderr, v.stderr


def test_user_unit_text_output() -> None:
    r = CliRunner().invoke(main, ["service", "print", "--cpu-workers", "3"])
    assert r.exit_code == 0, r.output
    svc = parse(r.output)
    assert svc["Service"]["ExecStart"].endswith("lab daemon --cpu-workers 3")
    assert "User" not in svc["Service"]
    assert svc["Install"]["WantedBy"] == "default.target"
