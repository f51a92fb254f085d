"""The CLI surface, frozen (as torchtitan does): a command or option changes only on purpose,
together with this list and the README. Every command teaches (--help with an Example:), speaks
JSON for agents, and appears in the README."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import cli

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()

# command -> its arguments, then its long options, sorted
SURFACE = {
    "ablate": ['--control', '--json', '--set', '--spec'],
    "agent": ['--claude', '--cwd', '--idle-seconds', '--json', '--max-turns', '--once', '--stop-file',
              '--turn-timeout'],
    "archive": ['runs', '--json', '--older-than'],
    "cancel": ['job_id', '--json', '--reason'],
    "daemon": ['--cpu-workers', '--json', '--lanes'],
    "eval": ['run', '--batches', '--checkpoint', '--device', '--json', '--n-steps'],
    "finding": ['job', '--json', '--supersedes', '--title'],
    "github sync": ['--json', '--once'],
    "kinds": ['--json'],
    "labels sync": ['--json'],
    "logs": ['job_id', '--follow', '--json'],
    "mcp": [],
    "register": ['job', '--json', '--name'],
    "registry": ['--json'],
    "restore": ['run', '--json'],
    "retry": ['job_id', '--json'],
    "runs": ['--json'],
    "serve": ['--host', '--json', '--port', '--token'],
    "service print": ['--agent', '--cpu-workers', '--env-file', '--gpu-group', '--group', '--json',
                      '--token-file', '--token-via', '--user', '--workdir'],
    "show": ['job_id', '--json'],
    "pipeline": ['pipeline_id', '--cancel', '--json', '--reason', '--rerun'],
    "compare": ['a', 'b', '--json'],
    "jobs": ['--issue', '--json', '--kind', '--limit', '--since', '--status'],
    "next": ['--dismiss', '--json', '--reason'],
    "smoke": ['--arch', '--device', '--json', '--preset', '--set', '--steps'],
    "status": ['--json'],
    "submit": ['kind', '--after', '--dry-run', '--earned-by', '--force', '--host', '--issue', '--json',
               '--lane', '--priority', '--reason', '--set', '--spec', '--timeout'],
    "tokenize": ['src', '--field', '--force', '--json', '--name'],
    "train": ['--arch', '--data', '--device', '--json', '--preset', '--resume', '--set'],
    "wait": ['job_id', '--json', '--keep-waiting', '--timeout'],
}

# `lab mcp` speaks JSON-RPC on stdio: a --json flag would mean nothing there.
NO_JSON = {"mcp"}


def commands(group: click.Group = cli.main,
             path: tuple[str, ...] = ()) -> Iterator[tuple[str, click.Command]]:
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from commands(cmd, (*path, name))
        else:
            yield " ".join((*path, name)), cmd


def surface(cmd: click.Command) -> list[str]:
    args = [p.name for p in cmd.params if isinstance(p, click.Argument)]
    opts = sorted(o for p in cmd.params for o in getattr(p, "opts", []) if o.startswith("--"))
    return [str(a) for a in args] + opts


def test_the_surface_is_what_was_agreed() -> None:
    assert {name: surface(cmd) for name, cmd in commands()} == SURFACE


@pytest.mark.parametrize("name", sorted(SURFACE))
def test_every_command_teaches_speaks_json_and_is_documented(name: str) -> None:
    result = CliRunner().invoke(cli.main, [*name.split(), "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output, f"`lab {name} --help` shows no example"
    if name not in NO_JSON:
        assert "--json" in result.output
    assert f"lab {name}" in README, f"`lab {name}` is missing from the README"


def test_bad_usage_exits_2() -> None:
    result = CliRunner().invoke(cli.main, ["show"])  # the job id is missing
    assert result.exit_code == 2
    result = CliRunner().invoke(cli.main, ["no-such-command"])
    assert result.exit_code == 2


def test_help_groups_every_command_by_topic_with_whole_summaries() -> None:
    """`lab --help` as gh does it: a section per topic, every command in one, none cut off."""
    out = CliRunner().invoke(cli.main, ["--help"]).output
    for title, _ in cli.TOPICS:
        assert f"\n{title}:\n" in out
    assert "\nOther:\n" not in out  # every command has a topic
    placed = [n for _, names in cli.TOPICS for n in names]
    assert sorted(placed) == sorted(cli.main.list_commands(click.Context(cli.main)))
    flat = " ".join(out.split())
    assert "(ablation.json, report.md, accuracy.png)" in flat  # a long summary is whole, not cut


def test_show_prints_sections_and_smoke_prints_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAB_DB", str(tmp_path / "q.db"))
    monkeypatch.setenv("LAB_RUNS", str(tmp_path / "runs"))
    runner = CliRunner()
    assert runner.invoke(cli.main, ["submit", "sleep", "--lane", "cpu", "--set", "seconds=2"]).exit_code == 0
    shown = runner.invoke(cli.main, ["show", "1"]).output
    for section in ("Spec:", "Times (UTC):", "Outcome:", "Events:"):
        assert f"\n{section}\n" in shown
    assert "  seconds    2.0" in shown  # aligned key/value rows, not one JSON line
    status = runner.invoke(cli.main, ["status"]).output
    assert any(line.split()[:4] == ["ID", "KIND", "LANE", "STATUS"] for line in status.splitlines())
    smoke = runner.invoke(cli.main, ["smoke", "--steps", "8", "--device", "cpu"])
    assert smoke.exit_code == 0 and smoke.stdout.startswith("smoke ok: eval loss fell")
    assert "{" not in smoke.stdout  # text for a person; --json gives the whole result
