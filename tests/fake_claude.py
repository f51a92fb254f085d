"""A stand-in for the `claude` CLI in headless mode (`claude -p PROMPT --output-format json ...`),
for tests of `lab agent`. Each call appends one JSON line to $FAKE_CLAUDE_RECORD (its argv, cwd,
pid, the environment that matters, the time), then does what step n of $FAKE_CLAUDE_SCENARIO
says, n being how many calls came before (the last step repeats):

    {"steps": [{"do": "success", "write": {"path": "...", "text": "..."}},
               {"do": "fail"},
               {"do": "hang", "child": true, "ignore_term": false}]}

success prints a result object shaped like the real one and exits 0; fail prints an error
result (`is_error: true`) and exits 1; hang sleeps (optionally beside a child process of its
own, to show the whole process group is killed) until it is killed. `write` writes a file first
(an agent acting on the lab: the attention list emptied, a stop file).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

WATCHED_ENV = ("CUDA_VISIBLE_DEVICES", "LAB_DB", "LAB_RUNS", "GITHUB_TOKEN", "GITHUB_TOKEN_FILE")


def record(path: Path, entry: dict[str, Any]) -> int:
    """Append `entry`; return how many calls came before this one."""
    before = len(path.read_text().splitlines()) if path.exists() else 0
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
    return before


def result(subtype: str, is_error: bool, text: str, started: float) -> dict[str, Any]:
    ms = int((time.time() - started) * 1000)
    return {"type": "result", "subtype": subtype, "is_error": is_error, "duration_ms": ms,
            "duration_api_ms": ms // 2, "num_turns": 3, "result": text, "session_id": str(uuid.uuid4()),
            "total_cost_usd": 0.0123,
            "usage": {"input_tokens": 100, "output_tokens": 20, "cache_read_input_tokens": 0}}


def main() -> int:
    started = time.time()
    log = Path(os.environ["FAKE_CLAUDE_RECORD"])
    env = {k: os.environ[k] for k in os.environ if k.startswith("CLAUDE") or k in WATCHED_ENV}
    entry: dict[str, Any] = {"argv": sys.argv[1:], "cwd": os.getcwd(), "pid": os.getpid(),
                             "pgid": os.getpgid(0), "env": env, "time": started}
    steps = json.loads(Path(os.environ["FAKE_CLAUDE_SCENARIO"]).read_text())["steps"]
    step = steps[min(len(steps) - 1, record(log, entry))] if steps else {"do": "success"}
    if step.get("write"):
        Path(step["write"]["path"]).write_text(step["write"]["text"])
    if step["do"] == "success":
        print(json.dumps(result("success", False, "Dealt with the top item; waiting for job 1.", started)))
        return 0
    if step["do"] == "fail":
        print("API Error: 500 overloaded", file=sys.stderr)
        print(json.dumps(result("error_during_execution", True, "", started)))
        return 1
    # hang: until the time cap (or a stop) kills the process group
    if step.get("ignore_term"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = None
    if step.get("child"):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    hang = Path(str(log) + ".hanging")
    hang.write_text(json.dumps({"pid": os.getpid(), "child": child.pid if child else None}))
    time.sleep(3600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
