"""`lab mcp` spawned as a subprocess and driven by the mcp package's own client over stdio,
against a private queue; a real `lab daemon` runs the jobs where a test needs them to run."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers_daemon import queue_env, start_daemon, stop_daemon
from mcp import Client
from mcp.client.stdio import StdioServerParameters

import config

pytestmark = pytest.mark.timeout(120)
LAB = str(Path(sys.executable).parent / "lab")
TOOLS = {"submit", "status", "next", "jobs", "show", "wait", "logs", "cancel", "retry", "kinds", "pipeline",
         "compare", "runs", "finding", "register", "archive", "dismiss"}


def server(env: dict[str, str]) -> StdioServerParameters:
    lab_env = {k: v for k, v in env.items() if k.startswith("LAB_")}
    cwd = str(Path(env["LAB_RUNS"]).parent)
    return StdioServerParameters(command=LAB, args=["mcp"], env=lab_env, cwd=cwd)


async def call(client: Client, tool: str, **args: Any) -> Any:
    r = await client.call_tool(tool, args)
    assert not r.is_error, r.content[0].text
    data = r.structured_content
    return data.get("result", data) if isinstance(data, dict) and set(data) == {"result"} else data


def test_tools_without_a_daemon(tmp_path: Path) -> None:
    env = queue_env(tmp_path)

    async def session() -> None:
        async with Client(server(env)) as c:
            listed = {t.name: t for t in (await c.list_tools()).tools}
            assert TOOLS <= set(listed)
            # Typed inputs: the schema says what each argument is.
            assert listed["show"].input_schema["properties"]["job_id"]["type"] == "integer"
            assert listed["wait"].input_schema["properties"]["timeout"]["maximum"] == 3600
            lane = listed["submit"].input_schema["properties"]["lane"]
            assert set(lane["anyOf"][0]["enum"]) == {"gpu", "cpu"}
            # The earned-run gate is the person's to force, never the agent's.
            assert not {"force", "reason"} & set(listed["submit"].input_schema["properties"])
            r = await c.call_tool("submit", {"kind": "train", "lane": "gpu", "force": True, "reason": "x",
                                             "set": {"preset": "rtx2060"}})
            assert r.is_error, "force must not reach the gate"

            job = await call(c, "submit", kind="sleep", lane="cpu", set={"seconds": 30})
            assert (job["kind"], job["lane"], job["status"]) == ("sleep", "cpu", "queued")
            assert job["source"] == "mcp"
            shown = await call(c, "show", job_id=job["id"])
            assert shown["spec"]["seconds"] == 30.0 and shown["created_at"].endswith("Z")
            waited = await call(c, "wait", job_id=job["id"], timeout=0.3)
            assert waited["timed_out"] and waited["status"] == "queued"
            status = await call(c, "status")
            assert status["lanes"]["cpu"]["queued"] == 1 and not status["daemon"]["alive"]

            cancelled = await call(c, "cancel", job_id=job["id"], reason="changed my mind")
            assert cancelled == {"id": job["id"], "status": "cancelled", "cancel_requested": False}
            assert (await call(c, "show", job_id=job["id"]))["error"] == "changed my mind"
            retried = await call(c, "retry", job_id=job["id"])  # the same shape as `lab retry --json`
            assert (retried["id"], retried["status"], retried["attempts"]) == (job["id"], "queued", 0)
            assert await call(c, "cancel", job_id=job["id"]) == {"id": job["id"], "status": "cancelled",
                                                               "cancel_requested": False}

            # Bad input: a tool error naming the field, and nothing queued.
            for args, field in (({"kind": "sleep", "set": {"secondz": 1}}, "sleep.secondz"),
                                ({"kind": "nope"}, "kind"),
                                ({"kind": "archive", "lane": "gpu", "set": {"runs": ["1"]}}, "lane"),
                                # comments (with log tails) only on an issue the lab tracks
                                ({"kind": "sleep", "set": {"seconds": 1}, "issue": 999}, "issue"),
                                ({"kind": "sleep", "set": {"seconds": 1}, "priority": 10**9}, "priority")):
                r = await c.call_tool("submit", args)
                assert r.is_error and field in r.content[0].text, r.content[0].text
            r = await c.call_tool("show", {"job_id": "x"})
            assert r.is_error and "job_id" in r.content[0].text
            r = await c.call_tool("cancel", {"job_id": job["id"]})
            assert r.is_error and "already cancelled" in r.content[0].text
            assert [j["id"] for j in (await call(c, "status"))["jobs"]] == [job["id"]]

    asyncio.run(session())


def test_jobs_run_through_the_daemon(tmp_path: Path) -> None:
    env = queue_env(tmp_path, LAB_ARCHIVE=str(tmp_path / "archive"))
    runs = Path(env["LAB_RUNS"])
    (runs / "old-run").mkdir(parents=True)
    (runs / "old-run" / "metrics.jsonl").write_text(json.dumps({"step": 1, "val_loss": 2.5}) + "\n")
    daemon = start_daemon(env)
    try:
        async def session() -> None:
            async with Client(server(env)) as c:
                short = await call(c, "submit", kind="sleep", lane="gpu", set={"seconds": 0.2})
                done = await call(c, "wait", job_id=short["id"], timeout=60)
                assert (done["status"], done["timed_out"]) == ("succeeded", False), done
                assert done["result"]["slept"] == 0.2
                log = await call(c, "logs", job_id=short["id"])
                assert "slept 0.2 s" in log["log"]

                moved = await call(c, "submit", kind="archive", set={"runs": ["old-run"]})
                done = await call(c, "wait", job_id=moved["id"], timeout=60)
                assert done["status"] == "succeeded", done
                assert done["result"]["archived"][0]["run"] == "old-run"

                long = await call(c, "submit", kind="sleep", lane="cpu", set={"seconds": 60})
                for _ in range(200):
                    if (await call(c, "show", job_id=long["id"]))["status"] == "running":
                        break
                    await asyncio.sleep(0.1)
                stopping = await call(c, "cancel", job_id=long["id"])
                assert stopping["cancel_requested"]
                done = await call(c, "wait", job_id=long["id"], timeout=60)
                assert done["status"] == "cancelled", done

        asyncio.run(session())
    finally:
        stop_daemon(daemon)
    pointer = runs / "old-run" / config.RECORDS.pointer_file
    assert json.loads(pointer.read_text())["files"] == 1
    assert (tmp_path / "archive" / "old-run" / "metrics.jsonl").exists()


def test_unknown_arguments_are_errors_naming_them_and_the_tools_use_the_clis_names(tmp_path: Path
                                                                                 ) -> None:
    """The two silent mistakes the issue measured: `submit {"spec": ...}` queued a job with
    defaults, `wait {"timeout_s": 30}` waited 300 s. Both are refused now, naming the argument."""
    env = queue_env(tmp_path)

    async def session() -> None:
        async with Client(server(env)) as c:
            listed = {t.name: t for t in (await c.list_tools()).tools}
            for name, tool in listed.items():
                assert tool.input_schema.get("additionalProperties") is False, name
            r = await c.call_tool("submit", {"kind": "sleep", "spec": {"seconds": 1}})
            assert r.is_error and "spec" in r.content[0].text and "Extra inputs" in r.content[0].text
            r = await c.call_tool("wait", {"job_id": 1, "timeout_s": 30})
            assert r.is_error and "timeout_s" in r.content[0].text
            assert (await call(c, "jobs"))["count"] == 0  # nothing was queued by the mistake
            # One meaning of `set`: spec fields and config overrides alike.
            plan = await call(c, "submit", kind="train", lane="cpu", set={"preset": "tiny", "max_steps": 5},
                              dry_run=True)
            assert plan["queued"] is False and plan["spec"]["set"] == {"max_steps": 5}
            job = await call(c, "submit", kind="sleep", lane="cpu", set={"seconds": 5})
            assert (await call(c, "jobs", status="queued"))["jobs"][0]["id"] == job["id"]
            attention = await call(c, "next")
            first = attention["items"][0]
            assert first["kind"] == "no-daemon" and first["mcp"]["tool"] == "status"
            gone = await call(c, "dismiss", key="daemon", reason="the person starts it later")
            assert gone["dismissed"] == "daemon" and (await call(c, "next"))["empty"]
            assert await call(c, "runs") == []
            r = await c.call_tool("finding", {"job_id": job["id"], "title": "x"})
            assert r.is_error  # not a finished ablation: the records' own error, as a tool error
            r = await c.call_tool("compare", {"a": "nosuch", "b": "other"})
            assert r.is_error and "nosuch" in r.content[0].text

    asyncio.run(session())
