"""A day in the lab's life, driven as the agent drives it: every call a subprocess with --json (or
the MCP client over stdio), every assertion on parsed fields, never on scraped text. Submit,
fail, notice it through `lab next`, retry, compare two ablations, write a finding."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from helpers_daemon import lab, queue_env, start_daemon, stop_daemon
from mcp import Client
from test_mcp_server import call, server

pytestmark = pytest.mark.timeout(300)

ABLATION = """
task = "khop"
seeds = 1
why = "a day-in-the-life test: one seed is enough to exercise the tools"
# 5 steps, 20 examples: the tools are under test (any verdict is accepted), not the training
steps = 5
primary = "test"
eval_depths = [1]
eval_examples = 20
baseline = "flat-1"
[[arms]]
name = "flat-1"
arch = "reasoner"
n_steps = 1
[[arms]]
name = "{arm}"
arch = "reasoner"
n_steps = {depth}
"""


def run(env: dict[str, str], *args: str, ok: tuple[int, ...] = (0,)) -> Any:
    r: subprocess.CompletedProcess = lab(env, *args, "--json", timeout=240)
    assert r.returncode in ok, (args, r.returncode, r.stderr)
    if r.returncode != 0 and not r.stdout.strip():
        return json.loads(r.stderr.strip().splitlines()[-1])  # errors are JSON on stderr too
    return json.loads(r.stdout)  # `lab wait` on a failed job prints the job, and exits 1


def test_a_day_in_the_lab(tmp_path: Path) -> None:
    env = queue_env(tmp_path, LAB_DOCS=str(tmp_path / "docs"))
    # Bad input first: a JSON error on stderr naming the field, exit 2, nothing queued.
    err = run(env, "submit", "train", "--lane", "cpu", "--set", "max_step=5", ok=(2,))
    assert err["exit_code"] == 2 and err["field"] == "train.max_step"
    assert "did you mean max_steps" in err["error"]
    assert run(env, "next")["items"] == [] and run(env, "jobs")["count"] == 0
    # Both meanings of --set in one submit: a spec field and a config override.
    plan = run(env, "submit", "train", "--lane", "cpu", "--set", "preset=tiny", "--set", "max_steps=5",
               "--dry-run")
    assert plan["queued"] is False and plan["spec"]["preset"] == "tiny"
    assert plan["spec"]["set"] == {"max_steps": 5}

    daemon = start_daemon(env, "--cpu-workers", "2")
    try:
        # as an agent would: `lab wait` on a lane no daemon serves yet says so and exits 3 at once
        up = time.monotonic() + 30
        while not run(env, "status")["daemon"]["alive"]:
            assert time.monotonic() < up, "the daemon did not come up"
            time.sleep(0.2)
        broken = run(env, "submit", "sleep", "--lane", "cpu", "--set", "seconds=0.1", "--set", "fail=true")
        done = run(env, "wait", str(broken["id"]), "--timeout", "60", ok=(1,))
        assert done["status"] == "failed"
        items = run(env, "next")["items"]
        failed = next(i for i in items if i["key"] == f"job:{broken['id']}")
        assert failed["kind"] == "job-failed" and f"lab retry {broken['id']}" in failed["command"]
        assert failed["mcp"] == {"tool": "logs", "arguments": {"job_id": broken["id"]}}
        again = run(env, "retry", str(broken["id"]))
        assert again["status"] == "queued"
        run(env, "wait", str(broken["id"]), "--timeout", "60", ok=(1,))
        run(env, "next", "--dismiss", f"job:{broken['id']}", "--reason", "fail=true is the point of it")
        assert f"job:{broken['id']}" not in [i["key"] for i in run(env, "next")["items"]]

        specs = []
        for arm, depth in (("flat-2", 2), ("flat-3", 3)):
            path = tmp_path / f"{arm}.toml"
            path.write_text(ABLATION.format(arm=arm, depth=depth))
            specs.append(run(env, "submit", "ablation", "--lane", "cpu", "--spec", str(path))["id"])
        for job_id in specs:
            assert run(env, "wait", str(job_id), "--timeout", "200")["status"] == "succeeded"
        a, b = specs
        failed_jobs = run(env, "jobs", "--status", "failed")
        assert [j["id"] for j in failed_jobs["jobs"]] == [broken["id"]]
        assert [j["id"] for j in run(env, "jobs", "--kind", "ablation", "--since", "1h")["jobs"]] == [b, a]

        owed = {i["key"] for i in run(env, "next")["items"]}
        assert {f"finding:{a}", f"finding:{b}"} <= owed
        diff = run(env, "compare", str(a), str(b))
        assert diff["kind"] == "ablation"
        wrote = run(env, "finding", str(a), "--title", "flat-2 against flat-1 on one seed")
        assert Path(wrote["path"]).is_file()
        owed = {i["key"] for i in run(env, "next")["items"]}
        assert f"finding:{a}" not in owed and f"finding:{b}" in owed

        async def agent() -> None:  # the same lab through MCP
            async with Client(server(env)) as c:
                attention = await call(c, "next")
                assert [i["key"] for i in attention["items"]] == [f"finding:{b}"]
                listed = await call(c, "jobs", kind="ablation")
                assert listed["count"] == 2
                shown = await call(c, "show", job_id=b)
                assert shown["result"]["verdict"] in ("better", "worse", "inconclusive")
                same = await call(c, "compare", a=str(a), b=str(b))
                assert same == diff

        asyncio.run(agent())
    finally:
        stop_daemon(daemon)
