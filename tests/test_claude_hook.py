"""The PreToolUse guard, fed real Claude Code hook payloads through a real subprocess, the way
Claude Code runs it: the command from .claude/settings.json, JSON on stdin."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ROOT / ".claude" / "settings.json"


def hook_command() -> str:
    hooks = json.loads(SETTINGS.read_text())["hooks"]["PreToolUse"]
    bash = [h for h in hooks if h["matcher"] == "Bash"]
    assert len(bash) == 1, "exactly one PreToolUse hook on Bash"
    (entry,) = bash[0]["hooks"]
    assert entry["type"] == "command"
    return entry["command"]


def run_hook(payload: dict | str) -> subprocess.CompletedProcess[str]:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    env = {**os.environ, "CLAUDE_PROJECT_DIR": str(ROOT)}
    return subprocess.run(["bash", "-c", hook_command()], input=text, capture_output=True, text=True,
                          env=env, cwd="/", timeout=20)


def bash_payload(command: str) -> dict:
    # The shape Claude Code sends for PreToolUse (hooks reference: common fields + tool fields).
    return {"session_id": "test-session", "transcript_path": "/tmp/t.jsonl", "cwd": str(ROOT),
            "permission_mode": "default", "hook_event_name": "PreToolUse", "tool_name": "Bash",
            "tool_input": {"command": command, "description": "run it"}, "tool_use_id": "toolu_01"}


BLOCKED = [
    ("python -m models.train --preset rtx2060", "lab submit train"),
    (".venv/bin/python models/train.py", "lab submit train"),
    ("cd /work && python3 train.py --steps 100", "lab submit train"),
    ("lab train --preset tiny --set max_steps=5", "lab submit train"),
    (".venv/bin/lab ablate --spec harness/specs/khop.toml", "lab submit ablation"),
    ("python -m cli eval runs/3/ckpt_best.pt", "lab submit eval"),
    ("python -m harness.ablate --spec x.toml", "lab submit ablation"),
    ("CUDA_VISIBLE_DEVICES=0 python bench/throughput.py", "GPU lane"),
    ("export CUDA_VISIBLE_DEVICES=0", "GPU lane"),
    ("python -c 'import torch; print(torch.cuda.is_available())'", "GPU lane"),
    ("python - <<'EOF'\nimport torch\nx = torch.zeros(1).cuda()\nEOF", "GPU lane"),
    ("nohup timeout 3600 python -m models.train > log.txt 2>&1 &", "lab submit train"),
    ("echo start; bash -c \"python -m models.train\"", "lab submit train"),
    ("ls $(python -m models.train)", "lab submit train"),
    ("torchrun --nproc_per_node 1 train.py", "lab submit train"),
    ("python bench/memory.py", "daemon is stopped"),
    ("make bench", "daemon is stopped"),
    ("nvidia-smi -r", "GPU lane"),
    ("sudo nvidia-smi -pl 120", "GPU lane"),
    ("python scripts/probe.py --device cuda", "GPU lane"),
    ("lab smoke --preset rtx2060", "lab submit smoke"),
    ("lab smoke --device cuda", "lab submit smoke"),
    ("lab smoke --preset tiny", "lab smoke --device cpu"),
    ("lab smoke --preset rtx2060 --device cpu", "lab submit smoke"),
    ("uv run python -m models.train", "lab submit train"),
]

ALLOWED = [
    "lab submit train --lane gpu --set preset=rtx2060 --earned-by 12 --json",
    "lab submit ablation --lane cpu --set task=khop --json",
    "CUDA_VISIBLE_DEVICES=0 lab daemon",
    "lab status --json",
    "lab wait 12 --timeout 600 --json && lab show 12 --json",
    "lab logs 12 --follow",
    "lab smoke --device cpu",
    "lab smoke --preset tiny --arch refiner --device=cpu --json",
    "CUDA_VISIBLE_DEVICES= lab smoke",
    "make test",
    ".venv/bin/python -m pytest tests/test_claude_hook.py -q -k cuda",
    "make demo",
    "nvidia-smi",
    "nvidia-smi --query-gpu=memory.used,memory.total --format=csv",
    "git commit -m 'never run python -m models.train by hand'",
    "grep -rn 'torch.cuda' models/",
    "python -c 'import torch; print(torch.__version__)'",
    "CUDA_VISIBLE_DEVICES= python -m pytest -q",
    "lab runs --json; lab finding 7 --title 'k4 refiner beats flat'",
]


@pytest.mark.parametrize("command,instead", BLOCKED, ids=[c for c, _ in BLOCKED])
def test_blocked_commands_are_denied_with_what_to_run_instead(command: str, instead: str) -> None:
    r = run_hook(bash_payload(command))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    decision = out["hookSpecificOutput"]
    assert decision["hookEventName"] == "PreToolUse"
    assert decision["permissionDecision"] == "deny"
    assert "Instead" in decision["permissionDecisionReason"]
    assert instead in decision["permissionDecisionReason"]


@pytest.mark.parametrize("command", ALLOWED)
def test_allowed_commands_pass_silently(command: str) -> None:
    r = run_hook(bash_payload(command))
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


def test_other_tools_are_not_judged() -> None:
    r = run_hook({"hook_event_name": "PreToolUse", "tool_name": "Write",
                  "tool_input": {"file_path": "/x/train.py", "content": "torch.cuda.init()"}})
    assert (r.returncode, r.stdout) == (0, "")


@pytest.mark.parametrize("payload", ["not json", "[1, 2]", json.dumps({"tool_name": "Bash",
                                                                       "tool_input": {"command": 3}})])
def test_an_unreadable_payload_fails_closed_with_exit_2(payload: str) -> None:
    r = run_hook(payload)
    assert r.returncode == 2
    assert "cannot read the PreToolUse payload" in r.stderr
    assert r.stdout == ""
