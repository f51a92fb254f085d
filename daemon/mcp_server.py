"""`lab mcp`: the queue as MCP tools over stdio, so an agent uses it without parsing text.

Tools (typed inputs, JSON results): submit, status, show, wait, logs, cancel, retry, kinds
(what each kind's spec accepts) and pipeline (an idea's stages). They call the service layer
(daemon/service.py) as the CLI does, so validation, the earned-run gate and the errors are the
CLI's; a bad input comes back as a tool error whose text names the field, and nothing is
queued. Jobs submitted here are recorded with source "mcp". There is deliberately no tool that
trains in the foreground: work goes through the queue. Register it with Claude Code:
`claude mcp add lab -- /path/to/.venv/bin/lab mcp`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

import config
from config import ConfigError
from daemon import service
from store import StateError

# `wait` holds the call open; agents' MCP clients time requests out, so it is bounded and says
# `timed_out` rather than failing. Call it again to keep waiting.
MAX_WAIT_SECONDS = config.MCP.max_wait_seconds
MAX_LOG_LINES = config.MCP.max_log_lines

INSTRUCTIONS = """The reasoning-lab job queue. Submit work with `submit` (kind + spec, validated the same
way as `lab submit`), follow it with `wait`, `show` and `logs`, stop it with `cancel`, requeue a failed
or cancelled one with `retry`; `status` shows both lanes and the daemon; `kinds` lists each kind's spec
fields. Training and GPU work only ever run through this queue. An idea goes through `submit` with kind
`idea`: smoke, then ablation, then the full run only if the ablation says `better` (`pipeline` follows
it). A GPU job whose compute estimate reaches the full-run threshold needs `earned_by` = a succeeded
ablation whose tested arm made the same change with verdict `better`; only the person can force it,
from their own terminal. `issue` must be an issue the lab already tracks (one labelled for a job)."""


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """The queue's own errors (bad spec, unknown job, wrong state) become tool errors the agent reads."""
    try:
        return fn(*args, **kwargs)
    except (ConfigError, StateError, FileNotFoundError) as e:
        raise ToolError(str(e)) from None


def submit(
    kind: Annotated[str, Field(description="Job kind: sleep, smoke, train, eval, tokenize, ablation, "
                                           "archive (see the kinds tool), or idea: a pipeline of smoke, "
                                           "ablation and (if earned) full run")],
    spec: Annotated[dict[str, Any] | None, Field(description="The kind's spec keys and values "
                                                             "(like `--set key=value`)")] = None,
    lane: Annotated[Literal["gpu", "cpu"] | None, Field(description="Default: the kind's first lane")] = None,
    after: Annotated[int | None, Field(description="Run only after this job succeeded")] = None,
    priority: Annotated[int, Field(description="Higher runs first within a lane",
                                   ge=-service.PRIORITY_LIMIT, le=service.PRIORITY_LIMIT)] = 0,
    timeout_s: Annotated[float | None, Field(description="Seconds before the job is killed", gt=0)] = None,
    earned_by: Annotated[int | None, Field(description="The ablation job that earned a full GPU run")] = None,
    issue: Annotated[int | None, Field(description="A GitHub issue the lab already tracks; the result is "
                                                   "posted there")] = None,
    dry_run: Annotated[bool, Field(description="Validate and return what would be queued (spec, lane, "
                                               "cost, the gate's decision); queue nothing")] = False,
) -> dict[str, Any]:
    """Queue a job (validated like `lab submit`); returns the job as `show` does, or for kind `idea`
    the pipeline as `pipeline` does. There is no force: the earned-run gate is the person's to
    override, never the agent's."""
    if issue is not None:
        _call(service.check_tracked_issue, issue)
    return _call(service.submit, kind, dict(spec or {}), lane=lane, after=after, priority=priority,
                 timeout_s=timeout_s, issue=issue, earned_by=earned_by, source="mcp", dry_run=dry_run)


def pipeline(
    pipeline_id: Annotated[int | None, Field(description="Pipeline id; leave out for the latest 20")] = None,
    rerun: Annotated[bool, Field(description="Run the stage that stopped it again")] = False,
) -> dict[str, Any]:
    """An idea's pipeline: each stage's state and jobs, the current stage, the last decision and,
    for a stopped idea, its drafted finding and graveyard line. Without an id: the latest ones."""
    from daemon import pipeline as pl

    store = service.open_store()
    if pipeline_id is None:
        return {"pipelines": _call(pl.list_views, store)}
    return _call(pl.rerun if rerun else pl.view, pipeline_id, store)


def status() -> dict[str, Any]:
    """Both lanes (running, queued, blocked, paused), recent jobs, whether a daemon is alive, disk."""
    return _call(service.status)


def show(job_id: Annotated[int, Field(description="Job id")]) -> dict[str, Any]:
    """One job: kind, lane, status, spec, times (ISO 8601 UTC), attempts, exit code, error, result."""
    return _call(service.show, job_id)


def wait(
    job_id: Annotated[int, Field(description="Job id")],
    timeout_s: Annotated[float, Field(description="Give up after this long (then timed_out is true)",
                                      gt=0, le=MAX_WAIT_SECONDS)] = 300.0,
) -> dict[str, Any]:
    """Block until the job ends or timeout_s passes; returns the job plus `timed_out`."""
    try:
        job = _call(service.wait, job_id, timeout_s)
    except service.WaitTimeout:
        return {**_call(service.show, job_id), "timed_out": True}
    return {**job, "timed_out": False}


def logs(
    job_id: Annotated[int, Field(description="Job id")],
    tail_lines: Annotated[int, Field(description="Last N lines", ge=1, le=MAX_LOG_LINES)] = 200,
) -> dict[str, Any]:
    """The last lines of a job's log (runs/<id>/log.txt on the host that ran it)."""
    return _call(service.logs, job_id, tail_lines)


def cancel(
    job_id: Annotated[int, Field(description="Job id")],
    reason: Annotated[str, Field(description="Recorded with the job")] = "cancelled by agent",
) -> dict[str, Any]:
    """Cancel a job: a waiting one at once, a running one by killing its process group."""
    return _call(service.cancel, job_id, reason)


def retry(job_id: Annotated[int, Field(description="Job id")]) -> dict[str, Any]:
    """Put a failed or cancelled job back in the queue (attempts from zero); returns it as show does."""
    return _call(service.retry, job_id)


def kinds() -> list[dict[str, Any]]:
    """Job kinds, their lanes and spec fields (name, type, default, doc)."""
    return _call(service.kinds)


TOOLS = (submit, status, show, wait, logs, cancel, retry, kinds, pipeline)


def build_server() -> MCPServer:
    server = MCPServer(name="lab", instructions=INSTRUCTIONS, log_level="WARNING")
    for fn in TOOLS:
        server.add_tool(fn)
    return server


def serve() -> None:
    """Run on stdio until the client closes the connection."""
    build_server().run("stdio")
