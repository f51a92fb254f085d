"""`lab service print`: the systemd unit for the daemon (daemon/systemd.py)."""

from __future__ import annotations

import configparser
import grp
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import config
from cli import main
from daemon.systemd import (
    device_problems,
    gpu_device_group,
    install_unit,
    token_file_problems,
    unit_path,
    unit_text,
)


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


# --- the token and the separate user (daemon/systemd.py; docs/SECURITY.md) ---------------------

TOKEN_FILE = "/etc/reasoning-lab/github-token"
# Today's user unit, line for line (comments aside): a token file may add only its own lines.
USER_UNIT_SERVICE = ["Type", "WorkingDirectory", "EnvironmentFile", "Environment", "ExecStart", "Restart",
                     "RestartSec", "KillSignal", "KillMode", "TimeoutStopSec"]


def entries(unit: str) -> list[tuple[str, str, str]]:
    """(section, key, value) per line, repeated keys kept: what systemd reads."""
    out, section = [], ""
    for line in unit.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key, value))
    return out


def env_assignments(unit: str) -> dict[str, str]:
    """Every KEY=value the Environment= lines set (they may quote, and hold several)."""
    out = {}
    for _, key, value in entries(unit):
        if key == "Environment":
            for item in shlex.split(value):
                k, _, v = item.partition("=")
                out[k] = v
    return out


def verify(unit: str, tmp_path: Path) -> None:
    """systemd's own check, where systemd-analyze exists (the test machine has no user `lab`)."""
    if not shutil.which("systemd-analyze"):
        return
    path = tmp_path / "lab.service"
    path.write_text("".join(line + "\n" for line in unit.splitlines() if not line.startswith("User=")))
    v = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert v.returncode == 0 and str(path) not in v.stderr, v.stderr


def test_system_unit_as_lab_loads_the_token_as_a_credential(tmp_path: Path) -> None:
    unit = unit_text(workdir=tmp_path, user="lab", gpu_group="video", token_file=TOKEN_FILE,
                     token_via="credential")
    svc = parse(unit)["Service"]
    assert (svc["User"], svc["SupplementaryGroups"]) == ("lab", "video")
    assert svc["LoadCredential"] == f"github-token:{TOKEN_FILE}"
    assert "GITHUB_TOKEN" not in env_assignments(unit), "the token never goes into the environment"
    assert svc["UnsetEnvironment"] == "GITHUB_TOKEN"  # nor from an old environment file
    assert svc["NoNewPrivileges"] == "yes"
    assert "StandardInput" not in svc
    # The GPU lock (LAB_GPU_LOCK_DIR, /tmp by default) is machine-wide: no private /tmp.
    assert not {"PrivateTmp", "ProtectHome", "ProtectSystem"} & set(svc)
    assert parse(unit)["Install"]["WantedBy"] == "multi-user.target"
    verify(unit, tmp_path)


def test_system_unit_by_default_hands_a_root_only_token_file_to_the_daemon_as_stdin(tmp_path: Path) -> None:
    unit = unit_text(workdir=tmp_path, user="lab", group="lab", token_file=TOKEN_FILE)
    svc = parse(unit)["Service"]
    assert (svc["User"], svc["Group"]) == ("lab", "lab")
    assert svc["StandardInput"] == f"file:{TOKEN_FILE}"
    # stdin is a read-only file: the log must not default to `inherit` it.
    assert (svc["StandardOutput"], svc["StandardError"]) == ("journal", "journal")
    assert env_assignments(unit) == {"PYTHONUNBUFFERED": "1", "GITHUB_TOKEN_FD": "0"}
    assert "LoadCredential" not in svc and svc["UnsetEnvironment"] == "GITHUB_TOKEN"
    verify(unit, tmp_path)


def test_user_unit_is_todays_and_a_token_file_only_names_the_file(tmp_path: Path) -> None:
    plain = unit_text(workdir=tmp_path)
    assert [k for s, k, _ in entries(plain) if s == "Service"] == USER_UNIT_SERVICE
    assert env_assignments(plain) == {"PYTHONUNBUFFERED": "1"}
    token = tmp_path / "my token"  # a space: quoted in Environment=
    with_token = unit_text(workdir=tmp_path, token_file=token)
    added = [e for e in entries(with_token) if e not in entries(plain)]
    assert [k for _, k, _ in added] == ["Environment", "UnsetEnvironment"]
    assert env_assignments(with_token) == {"PYTHONUNBUFFERED": "1", "GITHUB_TOKEN_FILE": str(token)}
    assert "User" not in parse(with_token)["Service"]
    assert not [line for line in with_token.splitlines() if "GITHUB_TOKEN=" in line]
    verify(with_token, tmp_path)


def test_unit_options_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="system unit"):
        unit_text(workdir=tmp_path, token_file=TOKEN_FILE, token_via="credential")
    with pytest.raises(ValueError, match="need a user"):
        unit_text(workdir=tmp_path, gpu_group="video")
    with pytest.raises(ValueError, match="not one of"):
        unit_text(workdir=tmp_path, user="lab", token_file=TOKEN_FILE, token_via="env")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="token file"):
        unit_text(workdir=tmp_path, user="lab", token_via="stdin")


def test_a_percent_in_a_path_is_not_a_systemd_specifier(tmp_path: Path) -> None:
    unit = unit_text(workdir=tmp_path, user="lab", token_file="/etc/lab/100%.token")
    assert parse(unit)["Service"]["StandardInput"] == "file:/etc/lab/100%%.token"


def test_gpu_device_group_is_the_group_of_the_node(tmp_path: Path) -> None:
    assert gpu_device_group(tmp_path / "missing") == "video"  # no card node (yet): the usual group
    if os.geteuid() != 0:
        return  # the rest gives a file to other groups
    node = tmp_path / "nvidia0"
    node.write_text("")
    os.chown(node, -1, 0)
    assert gpu_device_group(node) is None  # the driver default, root:root 0666: never group root
    os.chown(node, -1, 44)
    assert gpu_device_group(node) == next((g.gr_name for g in grp.getgrall() if g.gr_gid == 44), "44")


def test_device_problems_names_a_node_every_user_can_open(tmp_path: Path) -> None:
    assert device_problems([Path("/dev/null")]) == ["/dev/null: mode 0666: every user can open the card; "
                                                    "see docs/SECURITY.md (NVreg_DeviceFileMode=0660)"]
    plain = tmp_path / "nvidia0"
    plain.write_text("")
    assert device_problems([plain, tmp_path / "missing"]) == []  # not a device, or absent


def test_token_file_problems(tmp_path: Path) -> None:
    assert token_file_problems("relative/token") == ["relative/token: give an absolute path"]
    assert token_file_problems(tmp_path / "missing")[0].endswith("No such file or directory")
    token = tmp_path / "token"
    token.write_text("t")
    os.chmod(token, 0o644)
    problems = token_file_problems(token)
    assert any("mode 0644" in p for p in problems)
    os.chmod(token, 0o600)
    if os.geteuid() == 0:
        assert token_file_problems(token) == []
        os.chown(token, 65534, -1)
    assert any("not root" in p for p in token_file_problems(token))


def test_install_unit_writes_a_readable_unit_and_refuses_a_token(tmp_path: Path) -> None:
    target = tmp_path / "systemd" / "lab.service"
    text = unit_text(workdir=tmp_path, user="lab", token_file=TOKEN_FILE)
    assert install_unit(text, system=True, path=target, reload=False) == target
    assert target.read_text() == text and stat.S_IMODE(target.stat().st_mode) == 0o644
    with pytest.raises(ValueError, match="GITHUB_TOKEN"):
        install_unit(text.replace("Environment=PYTHONUNBUFFERED=1", "Environment=GITHUB_TOKEN=ghp_x"),
                     system=True, path=target, reload=False)
    assert target.read_text() == text
    assert unit_path(True) == Path("/etc/systemd/system/lab.service")


def test_timeout_stop_follows_the_shutdown_overrides_in_effect(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Raised LAB_QUEUE_SHUTDOWN_SECONDS (here or in the unit's environment file): systemd must
    still wait for the daemon's drain before its SIGKILL."""
    from daemon.systemd import unit_text

    def stop_of(unit: str) -> int:
        return int(parse(unit)["Service"]["TimeoutStopSec"])

    default = stop_of(unit_text(workdir=tmp_path, env_file=tmp_path / "none.env"))
    monkeypatch.setenv("LAB_QUEUE_SHUTDOWN_SECONDS", "400")
    assert stop_of(unit_text(workdir=tmp_path, env_file=tmp_path / "none.env")) > 400 + \
        config.QUEUE.kill_grace_seconds > default
    monkeypatch.delenv("LAB_QUEUE_SHUTDOWN_SECONDS")
    env_file = tmp_path / "lab.env"
    env_file.write_text('GITHUB_REPOSITORY=o/r\nLAB_QUEUE_SHUTDOWN_SECONDS="500"\n')
    assert stop_of(unit_text(workdir=tmp_path, env_file=env_file)) > 500 + config.QUEUE.kill_grace_seconds
