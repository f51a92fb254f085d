"""`lab mcp`: the queue as MCP tools over stdio, so an agent uses it without parsing text.

Tools (typed inputs, JSON results, the CLI's names): submit, status, next, jobs, show, wait,
logs, cancel, retry, kinds (what each kind's spec accepts), pipeline (an idea's stages),
compare, runs, finding, register, archive and dismiss. An unknown argument is an error naming
it. They call the service layer
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
from records import RecordError
from records.archive import ArchiveError
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
    except (ConfigError, StateError, FileNotFoundError, RecordError, ArchiveError) as e:
        raise ToolError(str(e)) from None


def submit(
    kind: Annotated[str, Field(description="Job kind: sleep, smoke, train, eval, tokenize, ablation, "
                                           "archive (see the kinds tool), or idea: a pipeline of smoke, "
                                           "ablation and (if earned) full run")],
    set: Annotated[dict[str, Any] | None, Field(  # noqa: A002 (the CLI's name: `--set key=value`)
        description="Spec fields and config overrides, like `lab submit --set key=value`: "
                    "{\"seconds\": 1}, {\"preset\": \"tiny\", \"max_steps\": 50}")] = None,
    lane: Annotated[Literal["gpu", "cpu"] | None, Field(description="Default: the kind's first lane")] = None,
    after: Annotated[int | None, Field(description="Run only after this job succeeded")] = None,
    priority: Annotated[int, Field(description="Higher runs first within a lane",
                                   ge=-service.PRIORITY_LIMIT, le=service.PRIORITY_LIMIT)] = 0,
    timeout: Annotated[float | None, Field(description="Seconds before the job is killed", gt=0)] = None,
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
    return _call(service.submit, kind, dict(set or {}), lane=lane, after=after, priority=priority,
                 timeout_s=timeout, issue=issue, earned_by=earned_by, source="mcp", dry_run=dry_run)


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
    timeout: Annotated[float, Field(description="Give up after this many seconds (then timed_out is "
                                                "true)", gt=0, le=MAX_WAIT_SECONDS)] = 300.0,
) -> dict[str, Any]:
    """Block until the job ends or `timeout` seconds pass; returns the job plus `timed_out`."""
    try:
        job = _call(service.wait, job_id, timeout)
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


def jobs(
    status: Annotated[str | None, Field(description="queued, blocked, running, succeeded, failed, "
                                                    "cancelled, active or final")] = None,
    kind: Annotated[str | None, Field(description="Only this job kind")] = None,
    issue: Annotated[int | None, Field(description="Only jobs linked to this issue")] = None,
    since: Annotated[str | None, Field(description="Created since: an age (30m, 6h, 2d) or ISO time")] = None,
    limit: Annotated[int, Field(description="At most this many, newest first", ge=1, le=10_000)] = 50,
) -> dict[str, Any]:
    """Jobs newest first, filtered (`lab jobs`)."""
    return _call(service.list_jobs, status, kind, issue, since, limit)


def next() -> dict[str, Any]:  # noqa: A001 (the CLI's name: `lab next`)
    """What needs attention, ranked, each item with its reason, the command and the MCP call that
    deals with it (`lab next`); `empty` with a summary of what runs when there is nothing."""
    from daemon.attention import needs_attention

    return _call(needs_attention)


def dismiss(
    key: Annotated[str, Field(description="The `key` of a `next` item")],
    reason: Annotated[str, Field(description="Why it needs no action (recorded)")],
) -> dict[str, Any]:
    """Take an item off `next` for good (`lab next --dismiss KEY --reason TEXT`)."""
    from daemon.attention import dismiss as dismiss_item

    return _call(dismiss_item, key, reason)


def compare(
    a: Annotated[str, Field(description="A run id: a job id or a run directory name")],
    b: Annotated[str, Field(description="The other run id; deltas are b minus a")],
) -> dict[str, Any]:
    """Two runs or two ablations side by side: metric deltas, the config diff, verdicts (`lab compare`)."""
    from records.compare import compare as compare_runs

    return _call(compare_runs, a, b)


def runs() -> list[dict[str, Any]]:
    """Every run under $LAB_RUNS and the archive: kind, status, best metric, tier (`lab runs`)."""
    import records

    return _call(records.list_runs)


def finding(
    job_id: Annotated[int, Field(description="A finished ablation job")],
    title: Annotated[str, Field(description="The finding's one claim")],
    supersedes: Annotated[str | None, Field(description="An older finding's file name it replaces")] = None,
) -> dict[str, Any]:
    """Write docs/findings/<date>-<slug>.md from the ablation's results (`lab finding`)."""
    import records

    return _call(records.write_finding, str(job_id), title, supersedes)


def register(
    job_id: Annotated[int, Field(description="A succeeded training job")],
    name: Annotated[str, Field(description="The model card's name (letters, digits, . _ -)")],
) -> dict[str, Any]:
    """Write docs/registry/<name>.md, the model card of a training run (`lab register`)."""
    import records

    return _call(records.write_card, str(job_id), name)


def archive(
    runs: Annotated[list[str] | None, Field(description="Run ids to move to the cold tier")] = None,
    older_than: Annotated[float | None, Field(description="Or: every finished run older than this many "
                                                          "days", ge=0, le=36_500)] = None,
) -> dict[str, Any]:
    """Move runs to the cold tier, leaving ARCHIVED.json pointers (`lab archive`); nothing is deleted."""
    import records

    if not runs and older_than is None:
        raise ToolError("archive: name runs, or give older_than DAYS")
    return _call(records.archive_runs, list(runs or []), older_than)


def kinds() -> list[dict[str, Any]]:
    """Job kinds, their lanes and spec fields (name, type, default, doc)."""
    return _call(service.kinds)


TOOLS = (submit, status, next, jobs, show, wait, logs, cancel, retry, kinds, pipeline, compare, runs,
         finding, register, archive, dismiss)


def build_server() -> MCPServer:
    server = MCPServer(name="lab", instructions=INSTRUCTIONS, log_level="WARNING")
    for fn in TOOLS:
        server.add_tool(fn)
    # An argument the tool does not have is an error naming it, never silently dropped (the SDK
    # ignores extras by default: `submit {"spec": ...}` once queued a job with defaults). The
    # SDK has no public switch for it, so each tool's argument model is made strict here.
    for tool in server._tool_manager.list_tools():
        model = tool.fn_metadata.arg_model
        model.model_config["extra"] = "forbid"
        model.model_rebuild(force=True)
        tool.parameters = model.model_json_schema(by_alias=True)
    return server


def serve() -> None:
    """Run on stdio until the client closes the connection."""
    build_server().run("stdio")
