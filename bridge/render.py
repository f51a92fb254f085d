"""Markdown the bridge posts on issues: status comments, result comments, answers to bad specs.

Every comment carries an HTML-comment marker (`<!-- lab:status 17 -->`, `<!-- lab:result 17 -->`,
`<!-- lab:invalid -->`) that finds it again on GitHub. Bodies never include the current time, so
a status comment is edited only when something the reader sees has changed. Everything stays
under GitHub's 65,536-character comment limit: long parts (log tail, ablation report) have
fixed budgets and `fit` cuts whatever still overflows.

Text the bot did not write (anything from an issue: field names, values, logins, kinds, arm and
task names; anything a job printed or returned) goes through `untrusted`, and every body is
`_sealed`: after its own marker lines it holds no `<!--` at all, so no text can hide the rest of
a comment or carry another comment's marker.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import common
import config
from store import iso

# The limits live in config.COMMENTS; these names are the ones the code below reads.
COMMENT_LIMIT = config.COMMENTS.max_chars
LOG_TAIL_LINES = config.COMMENTS.log_tail_lines
LOG_TAIL_CHARS = config.COMMENTS.log_tail_chars
REPORT_CHARS = config.COMMENTS.report_chars
TABLE_ROWS = config.COMMENTS.table_rows
CURVE_POINTS = config.COMMENTS.curve_points

EMOJI = {"queued": "⏳", "blocked": "⏸️", "running": "🏃", "succeeded": "✅", "failed": "❌",
         "cancelled": "⚪"}


def status_marker(job_id: int) -> str:
    return f"<!-- lab:status {job_id} -->"


def result_marker(job_id: int) -> str:
    return f"<!-- lab:result {job_id} -->"


INVALID_MARKER = "<!-- lab:invalid -->"


def key_marker(key: str) -> str:
    """A marker that names one outbox row, for comments that have no job of their own. A key can
    hold a login; whatever it holds, the marker cannot end early or ping, and it keeps the shape
    bridge/github.py's MARKER_LINE reads (the bridge's own keys, hex hashes and plain logins,
    pass unchanged; a bot login's `[bot]` becomes `_bot_`)."""
    safe = re.sub(r"[^A-Za-z0-9:_.-]", "_", key).replace("--", "-_")
    return f"<!-- lab:key {safe} -->"


# --- text from outside ------------------------------------------------------------------------

ZWJ = common.ZWJ


def untrusted(text: object, limit: int = 200, code: bool = True) -> str:
    """`text` from outside the bot, safe to put anywhere inline in a comment (a table cell too):
    common.md_untrusted's rule, cut to `limit` characters with an ellipsis."""
    raw = str(text)
    raw = raw if len(raw) <= limit else raw[: max(0, limit - 1)] + "…"
    shown = common.md_untrusted(raw, code=code)
    return "(empty)" if shown in ("", "<code></code>") else shown


def defuse(text: str) -> str:
    """No HTML comment can start in `text`: a zero-width joiner after the `<` of each `<!--`. It
    reads the same, in code blocks too (where an entity would show as typed)."""
    return text.replace("<!--", "<" + ZWJ + "!--")


def _sealed(head: str, body: str) -> str:
    """A comment: the bot's marker lines `head`, then `body` with every `<!--` defused, so the
    job's log, its report or any value in it cannot carry a marker the bridge would act on."""
    return head + defuse(body)


class Markdown(str):
    """A table cell the bot wrote itself (markdown kept, e.g. a code span); any other string in
    a table is untrusted and escaped."""


# The names harness/ablate.py accepts (PLAIN_NAME there): a result whose arms have other names
# was made before that check, and its report.md is not embedded (its names may be markdown).
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_VERDICTS = ("better", "worse", "inconclusive")


# --- small pieces ---------------------------------------------------------------------------


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "unknown"
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def number(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    if v != v or v in (float("inf"), float("-inf")):
        return str(v)
    return f"{v:.4g}"


def cell(v: Any) -> str:
    """A table cell: one line, pipes escaped, not too long; text is escaped unless the bot wrote
    it (Markdown)."""
    if isinstance(v, Markdown):
        text = v.replace("\n", " ").replace("|", "\\|")
        return text if len(text) <= 120 else text[:117] + "..."
    return untrusted(number(v), 120, code=False)


def code_block(text: str, lang: str = "") -> str:
    """Fence `text` so a log cannot break out (common.md_fence)."""
    return common.md_fence(text, lang)


def table(headers: list[str], rows: list[list[Any]], max_rows: int = TABLE_ROWS) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows[:max_rows]]
    if len(rows) > max_rows:
        lines.append(f"| ... {len(rows) - max_rows} more rows |" + " |" * (len(headers) - 1))
    return "\n".join(lines)


def flat_metrics(result: Any, prefix: str = "", depth: int = 2) -> list[tuple[str, Any]]:
    """The scalar values of a job's result as (dotted name, value), lists left out."""
    out: list[tuple[str, Any]] = []
    if not isinstance(result, dict):
        return [("result", result)] if result is not None and not isinstance(result, list) else []
    for k, v in result.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and depth > 1:
            out += flat_metrics(v, name + ".", depth - 1)
        elif isinstance(v, (int, float, bool)) or (isinstance(v, str) and len(v) <= 200):
            out.append((name, v))
    return out


def tail(text: str, max_lines: int = LOG_TAIL_LINES, max_chars: int = LOG_TAIL_CHARS) -> str:
    lines = [ln if len(ln) <= 400 else ln[:397] + "..." for ln in text.splitlines()[-max_lines:]]
    out = "\n".join(lines)
    return out if len(out) <= max_chars else "..." + out[-max_chars:]


def progress_bar(step: float, total: float, width: int = 20) -> str:
    frac = min(1.0, max(0.0, step / total)) if total else 0.0
    full = int(round(frac * width))
    return "█" * full + "░" * (width - full)


def mermaid_curve(points: list[tuple[float, float]], title: str, y_label: str, x_label: str = "step") -> str:
    """A line chart GitHub renders (mermaid xychart-beta), at most CURVE_POINTS points."""
    if len(points) > CURVE_POINTS:
        stride = len(points) / CURVE_POINTS
        picked = [points[int(i * stride)] for i in range(CURVE_POINTS - 1)] + [points[-1]]
    else:
        picked = points
    xs = ", ".join(str(int(x)) if float(x).is_integer() else f"{x:.4g}" for x, _ in picked)  # no 10,000
    ys = ", ".join(f"{y:.4g}" for _, y in picked)
    return ("```mermaid\nxychart-beta\n"
            f'    title "{title}"\n    x-axis "{x_label}" [{xs}]\n'
            f'    y-axis "{y_label}"\n    line [{ys}]\n```')


def loss_curve(run_dir: Path) -> str | None:
    """The training loss against step from a run's metrics.jsonl, if it has enough points."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    points: list[tuple[float, float]] = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        loss, step = rec.get("loss"), rec.get("step")
        if rec.get("event", "train") == "train" and isinstance(loss, (int, float)) and isinstance(step, int) \
                and math.isfinite(loss):
            points.append((step, float(loss)))
    if len(points) < 3:
        return None
    return mermaid_curve(points, "training loss", "loss")


def fit(text: str, limit: int = COMMENT_LIMIT, where: str = "") -> str:
    """Cut `text` to GitHub's limit, saying where the rest is."""
    if len(text) <= limit:
        return text
    note = f"\n\n... cut to fit GitHub's comment limit{'; the full text is in ' + where if where else ''}."
    return text[: limit - len(note) - 10] + note


def _files_line(job: dict[str, Any]) -> str:
    run_dir = job.get("run_dir") or f"runs/{job['id']}"
    host = f" on host `{job['host']}`" if job.get("host") else ""
    return f"**Files:** `{run_dir}`{host} · `lab show {job['id']} --json` · `lab logs {job['id']}`"


# --- the comments ---------------------------------------------------------------------------


def status_comment(job: dict[str, Any], lane_paused: str | None = None,
                   approval: dict[str, Any] | None = None) -> str:
    """The one status comment of a job, edited in place as it moves. `lane_paused`: why the
    lane this queued job waits in takes no new job (the disk guard), said on the issue.
    `approval`: the spec hash the job runs and who approved it (the bridge's run row)."""
    jid, status = job["id"], job["status"]
    lines = [status_marker(jid),
             f"### {EMOJI.get(status, '')} Job {jid} · {untrusted(job['kind'])} on lane "
             f"{untrusted(job['lane'])} · **{status}**", ""]
    rows: list[list[Any]] = []
    prog = job.get("progress") or {}
    if status == "blocked":
        after = f"waits for job {job['after_id']} to succeed" if job.get("after_id") else ""
        why = job.get("held") or after  # held: the bot's or the operator's words, not an issue's
        rows.append(["waiting", Markdown(why or "blocked")])
    if lane_paused and status == "queued":
        rows.append(["waiting", Markdown(f"the {job['lane']} lane is paused: {lane_paused}")])
    if prog and prog.get("total"):
        step, total = prog.get("step", 0), prog["total"]
        rows.append(["progress", Markdown(f"{number(step)} / {number(total)} ({100 * step / total:.0f} %) "
                                          f"`{progress_bar(step, total)}`")])
        if status == "running" and prog.get("eta_s") is not None:
            rows.append(["ETA", duration(prog["eta_s"])])
        metrics = prog.get("metrics") or {}
        if metrics:  # the job names its metrics: a plain string, so cell() escapes it
            rows.append(["latest", ", ".join(f"{k} = {number(v)}" for k, v in list(metrics.items())[:6])])
    if job.get("attempts"):
        # "1 of 3" is true while it runs (an expired lease requeues it); once it ended it is final
        count = (f"{job['attempts']}" if status in _ENDED
                 else f"{job['attempts']} of {job.get('max_attempts', '?')}")
        rows.append(["attempt", Markdown(count + (f" on host `{job['host']}`" if job.get("host") else ""))])
    if approval:
        how = {"spec": "the lane label", "rerun": "`/rerun`", "run": "`/run`"}.get(
            approval.get("reason") or "", "the lab")
        rows.append(["spec", Markdown(f"`{approval['spec_hash']}` approved by "
                                      f"{_plain_login(approval.get('actor'))} with {how}")])
    rows.append(["queued at", iso(job.get("created_at"))])
    if job.get("started_at"):
        rows.append(["started at", iso(job["started_at"])])
    if job.get("finished_at"):
        rows.append(["finished at", iso(job["finished_at"])])
    if job.get("cancel_requested") and status == "running":
        rows.append(["cancel", f"requested: {job.get('cancel_reason') or ''}"])  # free text: escaped
    lines += [table(["", ""], rows), ""]
    if status in ("failed", "cancelled"):
        lines.append(f"Finished **{status}**, not retried: the result is in the comment below. "
                     + _again(jid, approval))
    elif status == "succeeded":
        lines.append(f"Finished **{status}**: the result is in the comment below.")
    else:
        lines.append(f"Follow it: `lab logs {jid} --follow` · `lab show {jid}`")
    return fit(_sealed(lines[0] + "\n", "\n".join(lines[1:])))


_ENDED = ("succeeded", "failed", "cancelled")


def _again(job_id: int, approval: dict[str, Any] | None) -> str:
    """How a person runs an ended job again: a job from an issue's spec by `/rerun`; one
    submitted from the command line (linked with --issue) has no spec there to rerun."""
    if approval:
        return "To run this spec again, someone with write access comments `/rerun` on this issue."
    return f"To run it again: `lab retry {int(job_id)}` on the lab's machine."


def result_comment(job: dict[str, Any], approval: dict[str, Any] | None = None,
                   stage: dict[str, Any] | None = None) -> str:
    """The one result comment of a finished job. `approval`: the bridge's run row when the job
    came from the issue's spec (then `/rerun` runs it again). `stage`: the job's link to an idea
    pipeline (pipeline_id, stage, round, role), said in the heading."""
    jid, status = job["id"], job["status"]
    run_dir = Path(job["run_dir"]) if job.get("run_dir") else None
    took = None
    if job.get("finished_at") and job.get("started_at"):
        took = job["finished_at"] - job["started_at"]
    of_stage = ""
    if stage:
        role = "" if stage["role"] == "main" else f" ({untrusted(stage['role'])})"
        of_stage = (f" · stage **{untrusted(stage['stage'])}**{role} of idea pipeline "
                    f"{int(stage['pipeline_id'])}")
    parts = [result_marker(jid),
             f"### {EMOJI.get(status, '')} Job {jid} {status}{of_stage}",
             f"{untrusted(job['kind'])} on lane {untrusted(job['lane'])} · took {duration(took)} · "
             f"attempt {job.get('attempts', 0)} · finished {iso(job.get('finished_at')) or 'unknown'}"]
    result = job.get("result")
    if isinstance(result, dict) and "verdict" in result:
        # the result is what the job returned: only the harness's own three words stay bold
        verdict = result["verdict"]
        shown = verdict if verdict in _VERDICTS else untrusted(verdict, 60, code=False)
        primary = f" on primary cell {untrusted(result['primary'])}" if result.get("primary") else ""
        parts.append(f"**Verdict: {shown}**{primary}")
        if result.get("verdict_line"):
            parts.append(f"verdict: {cell(str(result['verdict_line']))}")
        arms = result.get("arms") or []
        if arms:
            cols = ["name", "params", "distinct_blocks", "flops_per_token", "read_depth", "mean", "ci_low",
                    "ci_high", "verdict"]
            parts.append(table(cols, [[a.get(c, "") for c in cols] for a in arms if isinstance(a, dict)]))
        report = run_dir / "report.md" if run_dir else None
        names = [a.get("name") for a in arms if isinstance(a, dict)]
        if report is not None and report.is_file() and not all(
                isinstance(n, str) and _PLAIN_NAME.fullmatch(n) for n in names):
            # report.md is markdown the harness wrote with the arm names in it, embedded as it is;
            # names that the harness would refuse today may be markdown, so it stays in the run
            parts.append(f"report.md is not shown: its arm names are not plain names (`{report}`)")
        elif report is not None and report.is_file():
            text = report.read_text(errors="replace")
            if len(text) > REPORT_CHARS:
                text = text[:REPORT_CHARS] + f"\n\n... (cut; the whole report is `{report}`)"
            parts.append("<details><summary>report.md</summary>\n\n" + text + "\n\n</details>")
    if isinstance(result, dict) and isinstance(result.get("grid"), dict):
        # a full run on a task: its grid, beside the ablation arm it scales when one earned it
        from records import earning_arm, task_grid_lines

        cell_ = result.get("primary") or {}
        trivial = ", ".join(f"{untrusted(k)} {number(v)}" for k, v in (result.get("trivial") or {}).items())
        parts.append(f"**Primary cell** {untrusted(cell_.get('cell'))}: {number(cell_.get('accuracy'))}"
                     + (f" · trivial baselines: {trivial}" if trivial else ""))
        parts.append("\n".join(task_grid_lines(result, *earning_arm(result, job.get("earned_by")))))
        result = {k: v for k, v in result.items() if k not in ("grid", "counts", "overlap", "baselines",
                                                              "primary", "trivial")}
    metrics = [(k, v) for k, v in flat_metrics(result) if k != "verdict"]
    if metrics:
        parts.append("**Metrics**\n\n" + table(["metric", "value"], [[k, v] for k, v in metrics]))
    if status != "succeeded":
        reason = job.get("error") or job.get("cancel_reason") or "no reason recorded"
        exit_code = job.get("exit_code")
        parts.append(f"**Reason:** {untrusted(reason, 300, code=False)}"
                     + (f" (exit code {exit_code})" if exit_code is not None else ""))
        # The truth about what comes next: a failed or cancelled job is final, nothing retries it.
        parts.append(f"**Next:** not retried (a {status} job is final). {_again(jid, approval)}")
        log = run_dir / "log.txt" if run_dir else None
        if log is not None and log.is_file():
            parts.append(f"**Log tail** (`{log}`)\n\n" + code_block(tail(log.read_text(errors="replace"))))
    curve = loss_curve(run_dir) if run_dir and run_dir.is_dir() else None
    if curve:
        parts.append(curve)
    parts.append(_files_line(job))
    return fit(_sealed(parts[0] + "\n\n", "\n\n".join(parts[1:])), where=str(run_dir or f"runs/{jid}"))


PIPELINE_EMOJI = {"running": "🏃", "succeeded": "✅", "stopped": "⛔", "cancelled": "⚪"}
_STAGE_WHAT = {"smoke": "the idea's arm and its baseline build, learn, stay finite",
               "ablation": "the idea's arm against its baseline, read on the pre-registered cell",
               "full": "the arm at the full-run preset, on the same task and grid; only if earned"}


def pipeline_comment(view: dict[str, Any], lane_paused: str | None = None) -> str:
    """The one status comment of an idea's pipeline (daemon/pipeline.py view): every stage's
    state, progress and job, the last decision and what comes next; edited in place."""
    pid, status = int(view["id"]), view["status"]
    marker = key_marker(f"pipeline:{pid}")
    # status and stage are the lab's own words (store.py); anything else would be shown escaped
    shown_status = status if status in PIPELINE_EMOJI else untrusted(status)
    stage = view["stage"] if view["stage"] in _STAGE_WHAT else untrusted(view["stage"])
    lines = [marker, f"### {PIPELINE_EMOJI.get(status, '')} Idea pipeline {pid} · stage {stage} · "
             f"**{shown_status}**", ""]
    lines.append(f"**Hypothesis:** {untrusted(view.get('hypothesis'), 300, code=False)}")
    lines.append(f"**Killed by:** {untrusted(view.get('kill'), 300, code=False)}")
    lines.append(f"**Primary cell** (pre-registered): {untrusted(view.get('primary'))}, arm "
                 f"{untrusted(view.get('arm'))} against {untrusted(view.get('baseline'))}")
    lines.append("")
    rows: list[list[Any]] = []
    for st in view["stages"]:
        jobs = st["jobs"]
        ids = Markdown(", ".join(f"job {int(j['id'])}" + ("" if j["role"] == "main" else f" ({j['role']})")
                                 for j in jobs) or "-")
        main = next((j for j in jobs if j["role"] == "main"), None)
        prog = (main or {}).get("progress") or {}
        if main and main["status"] == "running" and prog.get("total"):
            step, total = prog.get("step", 0), prog["total"]
            shown = Markdown(f"{number(step)} / {number(total)} `{progress_bar(step, total)}`")
        else:
            shown = Markdown("")
        said = (main or {}).get("verdict") or ""
        if main and main["status"] in ("failed", "cancelled"):
            said = (main.get("error") or "")[:100]
        state = st["state"]
        if lane_paused and state == "queued":
            state = f"queued (lane paused: {lane_paused})"
        rows.append([Markdown(f"**{st['stage']}**"), state, ids, shown, said if said else Markdown(""),
                     _STAGE_WHAT[st["stage"]]])
    lines += [table(["stage", "state", "jobs", "progress", "verdict / reason", "what it checks"], rows), ""]
    lines.append(f"**Last decision:** {untrusted(view.get('reason') or '-', 600, code=False)}")
    outcome = view.get("outcome") or {}
    if status == "stopped" and outcome.get("graveyard"):
        lines += ["", "The idea did not earn a full run. Proposed line for the graveyard in "
                  "`docs/ROADMAP.md`:", "", code_block(str(outcome["graveyard"]))]
        if outcome.get("finding_draft"):
            lines.append(f"Finding drafted at `{outcome['finding_draft']}`; publish it with "
                         f"`lab finding {int(outcome['ablation'])} --title \"...\"`.")
        elif outcome.get("draft_note"):
            lines.append(untrusted(outcome["draft_note"], 300, code=False))
    if status == "succeeded" and outcome.get("primary"):
        full = outcome["primary"] or {}
        abl = outcome.get("ablation") or {}
        lines += ["", table(["on " + str(full.get("cell")), "accuracy"], [
            [f"full run (job {outcome.get('full_run')})", full.get("accuracy")],
            [f"ablation arm {(abl.get('arm') or {}).get('name')} (job {abl.get('job')})",
             (abl.get("arm") or {}).get("mean")],
            [f"ablation baseline {(abl.get('baseline') or {}).get('name')}",
             (abl.get("baseline") or {}).get("mean")],
            [f"best trivial baseline {((abl.get('best_trivial') or {}).get('name'))}",
             (abl.get("best_trivial") or {}).get("value")]])]
    lines.append("")
    if status in ("stopped", "cancelled"):
        lines.append("To run the stage that stopped it again, someone with write access comments `/rerun`; "
                     f"from the lab's machine: `lab pipeline {pid} --rerun`.")
    elif status == "running":
        lines.append(f"Follow it: `lab pipeline {pid}` · closing this issue cancels the running stage.")
    return fit(_sealed(marker + "\n", "\n".join(lines[1:])))


def invalid_comment(key: str, field: str, problem: str, fix: str, example: str) -> str:
    """`field`, `problem` and `fix` quote the issue (its keys, its values): all three are shown
    escaped, the bot's own backticks in `problem` and `fix` included (they read as typed)."""
    return fit(_sealed(INVALID_MARKER + "\n" + key_marker(key) + "\n", "\n".join([
        "### ⚠️ This issue's spec cannot run yet",
        "",
        f"**Field:** {untrusted(field)} — {untrusted(problem, 500, code=False)}",
        "",
        f"**Fix:** {untrusted(fix, 500, code=False)}",
        "",
        "A spec is one fenced toml block in the issue body, for example:",
        "",
        code_block(example, "toml"),
        "",
        "Edit the issue body; the lab reads it again on its next poll and the `needs-fix` label goes away.",
    ])))


def unauthorised_comment(key: str, login: str | None, what: str) -> str:
    """`what` is the bot's own words; the login is named without an `@` (no ping)."""
    who = _plain_login(login) if login else "whoever added the label"
    return _sealed(key_marker(key) + "\n", "\n".join([
        f"Thanks, {who}! {what} needs someone with write access to this repository (or listed in "
        "`LAB_ALLOWED_USERS`) to start lab work, so nothing was queued. A maintainer can add the lane label "
        "(`gpu` or `cpu`) or comment `/rerun` to run it.",
    ]))


def waiting_comment(key: str, dep_issue: int) -> str:
    dep_issue = int(dep_issue)  # a number, whatever the caller passed: nothing else is shown
    return "\n".join([
        key_marker(key),
        f"⏳ This spec has `depends-on = {dep_issue}`, and issue #{dep_issue} has no job yet. "
        f"It will be queued as soon as #{dep_issue} gets one, and run once that job succeeds.",
    ])


def _plain_login(login: str | None) -> str:
    """A GitHub login shown without an `@`, so the bot's note pings no one; anything that is not
    a login's shape is not shown at all."""
    return f"`{login}`" if login and re.fullmatch(r"[A-Za-z0-9-]{1,39}(\[bot\])?", login) else "someone"


def held_comment(key: str, spec_hash: str, approver: str | None, what: str, editor: str | None,
                 lane: str) -> str:
    """The spec changed after a writer approved the issue: nothing runs until this exact text is."""
    return _sealed(key_marker(key) + "\n", "\n".join([
        f"⏸️ Not queued: the issue body was last edited (by {_plain_login(editor)}) after "
        f"{_plain_login(approver)} approved it with {what}, so that approval does not cover the spec the "
        f"body holds now (hash `{spec_hash}`). A job runs only a spec a writer approved.",
        "",
        f"To run this exact spec, someone with write access comments `/run {spec_hash}`, or removes and "
        f"adds the `{lane}` label again after reading it.",
    ]))


def run_mismatch_comment(key: str, author: str | None, given: str, spec_hash: str) -> str:
    shown = f"`{given}`" if re.fullmatch(r"[0-9a-f]{16}", given) else "no 16-digit hash"
    return _sealed(key_marker(key) + "\n", "\n".join([
        f"Not queued: the `/run` comment by {_plain_login(author)} names {shown}, but the spec in the "
        f"issue body now has hash `{spec_hash}` (the body changed, or the hash was mistyped). Read the "
        f"spec, then comment `/run {spec_hash}` to run it.",
    ]))


def error_comment(key: str, number: str) -> str:
    """The lab failed on this issue in a way it did not foresee: say so, quoting nothing."""
    return _sealed(key_marker(key) + "\n", "\n".join([
        f"⚠️ The lab could not handle this issue (error `{number}` in the lab's log), so nothing was queued. "
        "Editing the issue makes the lab read it again; the maintainers can find the error by its number.",
    ]))
