"""`lab agent` (daemon/agent.py) against a stand-in `claude` (tests/fake_claude.py): real
subprocesses, real signals, a private LAB_RUNS/LAB_DB, tiny timeouts.

"Has something to do" is decided through the loop's own seam, `AgentLoop(attention=...)`: a
driver script (written per test) runs the real loop with an attention function that reads a file
the test controls; the CLI tests use the real default and the store (a job that has ended)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from helpers_daemon import ROOT, queue_env

import cli
import config
from daemon import agent, systemd
from store import Store

PROMPT = (ROOT / "AGENT_TURN.md").read_text()

DRIVER = """
import json, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from daemon import agent

args = json.loads(sys.argv[1])
attention_file = Path(args.pop("attention_file"))

def attention():  # the seam: the test decides what needs the agent
    return json.loads(attention_file.read_text())

loop = agent.AgentLoop(agent.options(**args), attention=attention)
print(json.dumps(loop.run()), flush=True)
"""


class Lab:
    """One private lab: the stand-in claude on a PATH of its own, its scenario and record, the
    attention file, and the environment every subprocess gets."""

    def __init__(self, tmp: Path, steps: list[dict[str, Any]]):
        self.tmp = tmp
        self.bin = tmp / "bin"
        self.bin.mkdir()
        self.claude = self.bin / "claude"
        fake = ROOT / "tests" / "fake_claude.py"
        self.claude.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{fake}" "$@"\n')
        self.claude.chmod(0o755)
        self.record = tmp / "claude-calls.jsonl"
        self.scenario = tmp / "scenario.json"
        self.scenario.write_text(json.dumps({"steps": steps}))
        self.attention_file = tmp / "attention.json"
        self.set_attention(0)
        self.driver = tmp / "driver.py"
        self.driver.write_text(DRIVER.format(root=str(ROOT)))
        self.env = queue_env(tmp, FAKE_CLAUDE_RECORD=str(self.record),
                             FAKE_CLAUDE_SCENARIO=str(self.scenario),
                             GITHUB_TOKEN="ghp_must_not_reach_the_agent")
        self.env.pop("LAB_CLAUDE", None)
        self.home = Path(self.env["LAB_RUNS"]) / "agent"

    def set_attention(self, n: int) -> None:
        items = [{"key": f"k{i}", "rank": i, "kind": "job_failed", "reason": "job 1 failed",
                  "command": "lab show 1 --json", "mcp": {"tool": "show", "arguments": {"job_id": 1}}}
                 for i in range(n)]
        self.attention_file.write_text(json.dumps({"items": items, "running": [], "empty": not items}))

    def start(self, **args: Any) -> subprocess.Popen[str]:
        args = {"claude": str(self.claude), "attention_file": str(self.attention_file), **args}
        self.stderr = self.tmp / f"driver-{time.monotonic_ns()}.err"
        with open(self.stderr, "w") as err:
            return subprocess.Popen([sys.executable, str(self.driver), json.dumps(args)], cwd=ROOT,
                                    env=self.env, stdout=subprocess.PIPE, stderr=err, text=True)

    def lab(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def calls(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.record.read_text().splitlines()] if self.record.exists() else []

    def turns(self) -> list[dict[str, Any]]:
        log = self.home / "turns.jsonl"
        return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []

    def log_text(self) -> str:
        return self.stderr.read_text()


def wait_for(what: Callable[[], Any], timeout: float = 15, message: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {message}")


def finish(proc: subprocess.Popen[str], timeout: float = 15) -> dict[str, Any]:
    """Wait for the driver to exit 0 and return its summary."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("lab agent did not exit") from None
    assert proc.returncode == 0, out
    return json.loads(out.strip().splitlines()[-1])


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie still answers kill(0); it is dead all the same
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (OSError, IndexError):
        return True


def test_three_turns_idle_sleep_backoff_and_the_time_cap(tmp_path: Path) -> None:
    """The issue's words: one turn with nothing to do after it (so it sleeps), one that fails (so
    it backs off), one killed by its time cap; then the stop file ends the loop, exit 0."""
    lab = Lab(tmp_path, [])
    stop = tmp_path / "STOP"
    lab.scenario.write_text(json.dumps({"steps": [
        {"do": "success", "write": {"path": str(lab.attention_file),
                                    "text": json.dumps({"items": [], "running": [], "empty": True})}},
        {"do": "fail"},
        {"do": "hang", "child": True, "write": {"path": str(stop), "text": "done\n"}},
    ]}))
    lab.set_attention(1)
    proc = lab.start(idle_seconds=0.3, turn_timeout=1.5, max_turns=5, backoff_base=0.4, stop_grace=1.0,
                     stop_file=str(stop))
    wait_for(lambda: "nothing to do" in lab.log_text(), message="the loop sleeps after turn 1")
    lab.set_attention(2)  # something new: the next wake-up starts turn 2
    summary = finish(proc, timeout=20)

    assert summary["stopped_by"] == "stop_file"
    assert (summary["turns"], summary["ok"], summary["failed"], summary["timed_out"]) == (3, 1, 2, 1)
    assert summary["idle_sleeps"] >= 1 and summary["backoffs"] == 2
    ok, failed, capped = lab.turns()
    calls = lab.calls()
    assert len(calls) == 3

    assert ok["ok"] and ok["exit_code"] == 0 and not ok["timed_out"] and ok["subtype"] == "success"
    assert ok["reason"] == "attention: 1 item(s), new: k0"
    assert ok["total_cost_usd"] == 0.0123 and ok["num_turns"] == 3 and ok["duration_ms"] >= 0
    assert ok["backoff_s"] == 0 and ok["failures"] == 0
    assert "waiting for job 1" in ok["result_tail"]
    stdout = json.loads(Path(ok["stdout_file"]).read_text())
    assert stdout["type"] == "result" and Path(ok["stdout_file"]).name == "turn-1.json"

    assert failed["exit_code"] == 1 and failed["is_error"] is True and not failed["ok"]
    assert failed["reason"] == "attention: 2 item(s), new: k1"
    assert capped["reason"] == failed["reason"]  # a failed turn leaves the news unseen
    assert "API Error" in failed["stderr_tail"] and failed["subtype"] == "error_during_execution"
    assert (failed["failures"], failed["backoff_s"]) == (1, 0.4)

    assert capped["timed_out"] and not capped["ok"] and "timed out" in capped["error"]
    assert (capped["failures"], capped["backoff_s"]) == (2, 0.8)
    assert 1.5 <= capped["wall_s"] < 1.5 + 1.0 + 3
    # the backoff really waited before turn 3; the cap killed the whole process group
    assert calls[2]["time"] - calls[1]["time"] >= 0.4
    hanging = json.loads(Path(str(lab.record) + ".hanging").read_text())
    wait_for(lambda: gone(hanging["pid"]) and gone(hanging["child"]), 5, "the turn's processes are gone")


def test_each_turn_gets_the_prompt_the_settings_and_no_token(tmp_path: Path) -> None:
    """argv is `claude -p <AGENT_TURN.md> --output-format json --max-turns N ...`, run in the
    checkout (its .claude/settings.json applies), with CUDA_VISIBLE_DEVICES="" and no token; the
    log line's fields parse and the prompt is logged once, not inside argv."""
    lab = Lab(tmp_path, [{"do": "success"}])
    lab.set_attention(1)
    summary = finish(lab.start(once=True, max_turns=7))
    assert summary["stopped_by"] == "once" and summary["turns"] == 1
    (call,) = lab.calls()
    argv = call["argv"]
    assert argv[:6] == ["-p", PROMPT, "--output-format", "json", "--max-turns", "7"]
    mcp = json.loads(Path(argv[argv.index("--mcp-config") + 1]).read_text())
    assert mcp["mcpServers"]["lab"]["args"][-1] == "mcp"
    assert "Bash(lab:*)" in argv[argv.index("--allowedTools") + 1:]
    assert Path(call["cwd"]) == ROOT and (ROOT / ".claude" / "settings.json").is_file()
    assert call["env"]["CUDA_VISIBLE_DEVICES"] == ""
    assert "GITHUB_TOKEN" not in call["env"]
    assert call["env"]["LAB_DB"] == str(tmp_path / "queue.db")
    assert call["pgid"] == call["pid"]  # a process group of its own
    (turn,) = lab.turns()
    assert set(turn) >= {"turn", "reason", "started_at", "finished_at", "wall_s", "prompt", "argv",
                         "exit_code", "timed_out", "ok", "subtype", "is_error", "num_turns", "duration_ms",
                         "duration_api_ms", "total_cost_usd", "session_id", "stdout_tail", "stderr_tail"}
    assert turn["prompt"] == PROMPT and PROMPT not in turn["argv"] and turn["argv"][2] == agent.PROMPT_SLOT
    assert turn["argv"][0] == str(lab.claude) and turn["argv"][5:7] == ["--max-turns", "7"]


def test_once_with_nothing_to_do_runs_no_turn(tmp_path: Path) -> None:
    lab = Lab(tmp_path, [{"do": "success"}])
    summary = finish(lab.start(once=True))
    assert summary["stopped_by"] == "once" and summary["turns"] == 0 and summary["idle_sleeps"] == 0
    assert lab.calls() == [] and lab.turns() == []


def test_items_a_successful_turn_saw_start_no_other_turn(tmp_path: Path) -> None:
    """An item the agent cannot clear (no daemon: "ask the person") must not start a paid turn
    every idle period; a new item does."""
    lab = Lab(tmp_path, [{"do": "success"}])
    lab.set_attention(1)
    assert finish(lab.start(once=True))["turns"] == 1
    assert finish(lab.start(once=True))["turns"] == 0
    lab.set_attention(2)
    assert finish(lab.start(once=True))["turns"] == 1
    assert [t["reason"] for t in lab.turns()] == ["attention: 1 item(s), new: k0",
                                                  "attention: 2 item(s), new: k1"]
    assert agent.attention_reason(["k0"], {"k0"}, 10.0, 5.0) == "attention: 1 item(s) still open: k0"
    assert agent.attention_reason(["k0"], {"k0"}, 1.0, 5.0) is None


def test_a_second_agent_exits_1_naming_the_holder(tmp_path: Path) -> None:
    lab = Lab(tmp_path, [{"do": "success"}])
    first = lab.start(idle_seconds=30)
    wait_for(lambda: "nothing to do" in lab.log_text(), message="the first agent is asleep")
    t0 = time.monotonic()
    second = lab.lab("agent", "--once", "--claude", str(lab.claude), "--json")
    assert second.returncode == 1, second.stderr
    assert f"pid {first.pid}" in second.stderr and "lock" in second.stderr
    assert time.monotonic() - t0 < 10  # at once: it does not wait for the lock
    first.send_signal(signal.SIGTERM)
    assert finish(first)["stopped_by"] == "signal"


def test_sigterm_mid_sleep_exits_0_at_once(tmp_path: Path) -> None:
    lab = Lab(tmp_path, [{"do": "success"}])
    proc = lab.start(idle_seconds=60)
    wait_for(lambda: "nothing to do" in lab.log_text(), message="asleep")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    summary = finish(proc)
    assert time.monotonic() - t0 < 5, "the sleep was not cut short"
    assert summary["stopped_by"] == "signal" and summary["turns"] == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_turn_stops_the_turn_and_exits_0(tmp_path: Path, sig: signal.Signals) -> None:
    lab = Lab(tmp_path, [{"do": "hang", "child": True}])
    lab.set_attention(1)
    proc = lab.start(turn_timeout=60, stop_grace=1.0)
    hanging = Path(str(lab.record) + ".hanging")
    wait_for(hanging.exists, message="the turn is running")
    pids = json.loads(hanging.read_text())
    t0 = time.monotonic()
    proc.send_signal(sig)
    summary = finish(proc)
    assert time.monotonic() - t0 < 8
    assert summary["stopped_by"] == "signal" and summary["turns"] == 1 and summary["failed"] == 0
    (turn,) = lab.turns()
    assert turn["stopped"] and not turn["timed_out"] and turn["backoff_s"] == 0
    wait_for(lambda: gone(pids["pid"]) and gone(pids["child"]), 5, "the turn's processes are gone")


def test_a_turn_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    lab = Lab(tmp_path, [{"do": "hang", "ignore_term": True}])
    lab.set_attention(1)
    summary = finish(lab.start(once=True, turn_timeout=0.5, stop_grace=0.5))
    (turn,) = lab.turns()
    assert summary["failed"] == 1 and turn["timed_out"] and turn["exit_code"] == -signal.SIGKILL
    assert turn["wall_s"] < 0.5 + 0.5 + 3


def test_the_stop_file_stops_it_before_any_turn(tmp_path: Path) -> None:
    lab = Lab(tmp_path, [{"do": "success"}])
    stop = tmp_path / "STOP"
    stop.write_text("")
    out = lab.lab("agent", "--claude", str(lab.claude), "--stop-file", str(stop), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["stopped_by"] == "stop_file"
    assert lab.calls() == []


def test_the_default_stop_file_lives_in_runs_agent(tmp_path: Path) -> None:
    lab = Lab(tmp_path, [{"do": "success"}])
    lab.home.mkdir(parents=True)
    (lab.home / "STOP").write_text("")
    out = lab.lab("agent", "--claude", str(lab.claude), "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["stopped_by"] == "stop_file", out.stderr


def test_a_job_that_ended_starts_one_turn(tmp_path: Path) -> None:
    """`lab agent --once` through the CLI: a job ended since the last turn (none yet), so a turn
    runs; the mark is kept, so the same ended job does not start another one."""
    lab = Lab(tmp_path, [{"do": "success"}])
    store = Store(lab.env["LAB_DB"])
    job = store.submit("smoke", "cpu", {}, timeout_s=60, max_attempts=1)
    store.cancel(job)
    out = lab.lab("agent", "--once", "--max-turns", "3", "--claude", str(lab.claude), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["turns"] == 1
    (turn,) = lab.turns()
    assert turn["reason"] == "a job has ended since the last turn" and turn["ok"]
    assert lab.calls()[0]["argv"][4:6] == ["--max-turns", "3"]
    state = json.loads((lab.home / "state.json").read_text())
    assert state["turn"] == 1 and state["jobs_mark"] == store.get(job)["finished_at"]


def test_a_failed_once_turn_exits_1(tmp_path: Path) -> None:
    lab = Lab(tmp_path, [{"do": "fail"}])
    store = Store(lab.env["LAB_DB"])
    store.cancel(store.submit("smoke", "cpu", {}, timeout_s=60, max_attempts=1))
    out = lab.lab("agent", "--once", "--claude", str(lab.claude), "--json")
    assert out.returncode == 1 and json.loads(out.stdout)["failed"] == 1, out.stderr


def test_bad_input_exits_2(tmp_path: Path) -> None:
    lab = Lab(tmp_path, [])
    out = lab.lab("agent", "--once", "--claude", str(tmp_path / "no-such-claude"))
    assert out.returncode == 2 and "--claude" in out.stderr
    out = lab.lab("agent", "--once", "--claude", str(lab.claude), "--cwd", str(tmp_path))
    assert out.returncode == 2 and "settings.json" in out.stderr


def test_the_prompt_is_capped(tmp_path: Path) -> None:
    big = tmp_path / "AGENT_TURN.md"
    big.write_text("x" * (config.AGENT.prompt_max_chars + 1))
    with pytest.raises(agent.AgentError, match="prompt_max_chars"):
        agent.read_prompt(big, config.AGENT.prompt_max_chars)
    assert len(PROMPT) <= config.AGENT.prompt_max_chars
    assert agent.read_prompt(ROOT / "AGENT_TURN.md", config.AGENT.prompt_max_chars) == PROMPT


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [agent.backoff_seconds(n, 30, 200) for n in range(6)] == [0, 30, 60, 120, 200, 200]
    assert agent.backoff_seconds(10_000, 1, 1800) == 1800


def test_parse_result_reads_the_result_object() -> None:
    obj = {"type": "result", "subtype": "success", "is_error": False}
    assert agent.parse_result(json.dumps(obj)) == obj
    assert agent.parse_result("warning: something\n" + json.dumps(obj) + "\n") == obj
    assert agent.parse_result("not json") is None


def test_service_print_agent_prints_the_agent_unit(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli.main, ["service", "print", "--agent", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    text = result.output
    assert f"agent --cwd {tmp_path}" in text and "ExecStart=" in text
    for line in ("Restart=on-failure", "KillMode=mixed",
                 "Environment=PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=",
                 f"EnvironmentFile=-{tmp_path / '.env.agent'}", "WantedBy=default.target"):
        assert line in text.splitlines(), line
    stop = int(next(x for x in text.splitlines() if x.startswith("TimeoutStopSec=")).split("=")[1])
    assert config.AGENT.stop_grace_seconds < stop <= config.AGENT.stop_grace_seconds + 60
    assert "agent/STOP" in text
    # no token in any form: not assigned, not a file, not a credential, not stdin
    assert "GITHUB_TOKEN=" not in text and "LoadCredential" not in text and "StandardInput" not in text
    assert "SupplementaryGroups" not in text
    as_json = CliRunner().invoke(cli.main, ["service", "print", "--agent", "--workdir", str(tmp_path),
                                            "--json"])
    assert json.loads(as_json.output)["unit"] == text
    system = systemd.agent_unit_text(tmp_path, user="lab", claude="/opt/claude bin/claude")
    assert "User=lab" in system and "WantedBy=multi-user.target" in system and "NoNewPrivileges=yes" in system
    assert '--claude "/opt/claude bin/claude"' in system
    bad = CliRunner().invoke(cli.main, ["service", "print", "--agent", "--token-file", "/x"])
    assert bad.exit_code == 2 and "--token-file" in bad.output
