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
    return common.duration(seconds)


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
    ys = ", ".join(f"{y:.3g}" for _, y in picked)  # three significant digits, as the comment's numbers
    return ("```mermaid\nxychart-beta\n"
            f'    title "{title}"\n    x-axis "{x_label}" [{xs}]\n'
            f'    y-axis "{y_label}"\n    line [{ys}]\n```')


def _series(rows: list[dict[str, Any]], event: str, key: str) -> list[tuple[float, float]]:
    """(step, value) of one metrics.jsonl series: the `event` rows' finite `key`."""
    points: list[tuple[float, float]] = []
    for rec in rows:
        value, step = rec.get(key), rec.get("step")
        if rec.get("event", "train") == event and isinstance(value, (int, float)) \
                and not isinstance(value, bool) and isinstance(step, int) and math.isfinite(value):
            points.append((step, float(value)))
    return points


def loss_curve(run_dir: Path) -> str | None:
    """The training loss and the validation loss against step from a run's metrics.jsonl, as two
    charts: the trainer logs them at different steps (every log_interval, every eval_interval) and
    xychart-beta puts every line on one list of x values, so one chart would have to invent the
    points one series never measured. The training chart needs 3 points, the validation one 2."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    rows: list[dict[str, Any]] = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            rows.append(rec)
    train, val = _series(rows, "train", "loss"), _series(rows, "eval", "val_loss")
    charts = []
    if len(train) >= 3:
        charts.append(mermaid_curve(train, "training loss", "loss"))
    if len(val) >= 2:
        charts.append(mermaid_curve(val, "validation loss", "val_loss"))
    return "\n\n".join(charts) or None


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


# --- the result comment -------------------------------------------------------------------


def sig(v: Any, sign: bool = False) -> str:
    """The result comment's one number format (common.sig): three significant digits."""
    return common.sig(v, sign)


def _shown(v: Any, sign: bool = False) -> str:
    """`sig` for a value that goes into the bot's own markdown: a result is what a job returned,
    so a "number" that is not one is escaped text, never markdown."""
    if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)):
        return sig(v, sign)
    return untrusted(v, 60, code=False)


def _interval(d: dict[str, Any], sign: bool = False) -> str:
    low, high = _shown(d.get("ci_low"), sign), _shown(d.get("ci_high"), sign)
    return f"{_shown(d.get('mean'), sign)} [{low}, {high}]"


def _name(v: Any) -> str:
    """An arm's name in prose: escaped text, never a code span (a span would keep `**` as typed,
    and a forged "**better**" must not appear even there)."""
    return untrusted(v, 64, code=False)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


# Keys of an ablation's result the verdict block shows itself (the harness's _summarise).
_ABLATION_SHOWN = frozenset({"verdict", "verdict_line", "primary", "primary_cell", "arms", "baseline",
                             "best_trivial", "matched", "baselines"})
# What nobody needs to read a verdict or a loss, though a reviewer checks it: the collapsed
# details block, never the Metrics table.
_HOUSEKEEPING = ("run_dir", "minutes", "wall_s", "train_s", "confidence", "min_effect", "correction",
                 "tested_arms", "match_ratio", "references", "deepest_trained", "never_trained",
                 "extrapolation", "overlap", "stop_reason", "status", "skipped_steps", "resumed_from_step",
                 "peak_mem_mb", "device", "precision", "preset", "arch", "data", "eval_split", "checkpoint",
                 "host", "git_commit", "versions")


def _cell_words(cell_: Any) -> str:
    """The primary cell spelled out: its split, its bucket, the depth looped arms are read at."""
    if not isinstance(cell_, dict) or not cell_.get("split"):
        return ""
    bucket = cell_.get("bucket") or "all"
    depth = cell_.get("depth")
    return (f" (split {untrusted(cell_['split'])}, "
            + ("every answer" if bucket == "all" else f"bucket {untrusted(bucket)}")
            + (f", looped arms read at depth {untrusted(depth)}" if depth is not None
               else ", each arm at its own depth") + ")")


def _arms_table(arms: list[dict[str, Any]], base: dict[str, Any] | None, conf: str) -> str:
    rows: list[list[Any]] = []
    for a in arms:
        d = a.get("diff") if isinstance(a.get("diff"), dict) else None
        verdict = a.get("verdict")
        rows.append([a.get("name"), sig(a.get("read_depth")), Markdown(_interval(a)),
                     Markdown(_interval(d, sign=True)) if d else Markdown("-"),
                     Markdown(_shown(d.get("p_holm", d.get("p")))) if d else Markdown("-"),
                     Markdown(verdict) if verdict in (*_VERDICTS, "baseline") else verdict])
    against = f" vs {_name(base.get('name'))}" if base else ""
    return table(["arm", "read depth", f"mean [{conf}]", f"paired difference{against} [{conf}]", "Holm p",
                  "verdict"], rows)


def _ratio(axis: Any, m: Any) -> str:
    v = _num(m.get("ratio")) if isinstance(m, dict) else None
    return f"{untrusted(axis, 40, code=False)} {sig(v) if v is not None else 'inf'}x"


def _matching_lines(result: dict[str, Any], arms: list[dict[str, Any]],
                    base: dict[str, Any] | None) -> list[str]:
    claimed = [untrusted(m, 40) for m in result.get("matched") or []]
    out = []
    for a in arms:
        m = a.get("matching")
        if not isinstance(m, dict) or not m:
            continue
        good = [_ratio(k, v) for k, v in m.items() if isinstance(v, dict) and v.get("matched")]
        bad = [_ratio(k, v) for k, v in m.items() if isinstance(v, dict) and not v.get("matched")]
        out.append(f"- {_name(a.get('name'))} vs {_name((base or {}).get('name'))}: matched "
                   f"{', '.join(good) or 'nothing'}; **not matched**: {', '.join(bad) or 'nothing'}")
    if not out:
        return []
    within = sig(_num(result.get("match_ratio")) or 1.5)
    claim = (f"the spec claims {', '.join(claimed)} matched (checked before the run)" if claimed
             else "the spec claims no axis matched")
    return [f"**Matching** (an axis is matched within {within}x of the baseline; {claim}):", *out]


def _trivial_line(verdict: str, arms: list[dict[str, Any]], best: Any, subject: dict[str, Any] | None,
                  base: dict[str, Any] | None) -> str | None:
    if not isinstance(best, dict) or best.get("name") is None or _num(best.get("value")) is None:
        return None
    value = float(best["value"])
    text = f"**Best trivial baseline:** {untrusted(best['name'], 60)} {sig(value)}"
    winner = subject if verdict == "better" else base if verdict == "worse" else None
    if winner is not None and _num(winner.get("mean")) is not None:
        mean = float(winner["mean"])
        who = f"; the winner {_name(winner.get('name'))} ({sig(mean)})"
        return text + who + (" clears it" if mean > value
                             else " does **not** clear it: a shortcut, not reasoning")
    scored = [a for a in arms if _num(a.get("mean")) is not None]
    if not scored:
        return text
    top = max(scored, key=lambda a: float(a["mean"]))
    shown = f"{_name(top.get('name'))} ({sig(float(top['mean']))})"
    above = "is above it" if float(top["mean"]) > value else "does not clear it either"
    return text + f"; no winner, and the best arm {shown} {above}"


def _next_for_ablation(jid: int, verdict: str, subject: dict[str, Any] | None,
                       job: dict[str, Any]) -> str | None:
    """What the verdict invites, said where the verdict is read: a person should not need the
    README to know that an inconclusive ablation asks for more seeds or steps, or how a win is
    spent."""
    seeds = len((subject or {}).get("per_seed") or []) or None
    spec = job.get("spec") if isinstance(job.get("spec"), dict) else {}
    offset = spec.get("seed_offset") if isinstance(spec.get("seed_offset"), int) else 0
    fresh = (f"`seed_offset = {offset + seeds}` for {seeds} fresh seed{'s' if seeds > 1 else ''}" if seeds
             else "a new `seed_offset` for fresh seeds")
    steps = [s for s in (subject or {}).get("steps") or [] if isinstance(s, int)]
    if verdict == "inconclusive":
        more = f"`seeds = {2 * seeds}`" if seeds else "a larger `seeds`"
        return (f"**Next:** inconclusive says the difference was not told from noise at this budget, "
                f"not that the idea fails. More seeds narrow the interval ({more}, or {fresh} to pool "
                f"with these); "
                f"more steps (`steps`" + (f", {max(steps)} here" if steps else "")
                + ") let both arms learn what the cell asks.")
    if verdict == "better":
        return (f"**Next:** the full run is earned: `lab submit idea --spec idea.toml` runs the idea's "
                f"pipeline, or `lab submit train ... --earned-by {jid}` runs it on this verdict. Replicate "
                f"first ({fresh}): a 95% test also says so by chance.")
    if verdict == "worse":
        return (f"**Next:** this is a finding: `lab finding {jid} --title \"...\"` records it, and the idea "
                "goes to the graveyard (docs/ROADMAP.md, Graveyard); no full run.")
    return None


def _ablation_parts(job: dict[str, Any], result: dict[str, Any]) -> list[str]:
    """The verdict first, then the numbers that decide it, matching, shortcuts and what next."""
    verdict = result["verdict"]
    # the result is what the job returned: only the harness's own three words stay bold
    shown = verdict if verdict in _VERDICTS else untrusted(verdict, 60, code=False)
    primary = f" on primary cell {untrusted(result['primary'])}" if result.get("primary") else ""
    parts = [f"**Verdict: {shown}**{primary}{_cell_words(result.get('primary_cell'))}"]
    arms = [a for a in result.get("arms") or [] if isinstance(a, dict)]
    base = next((a for a in arms if a.get("verdict") == "baseline"), None)
    subject = next((a for a in arms if a.get("verdict") != "baseline"), None)
    conf_v = _num(result.get("confidence"))
    conf = f"{round(conf_v * 100)}% CI" if conf_v is not None else "CI"
    d = (subject or {}).get("diff")
    if subject is not None and base is not None and isinstance(d, dict):
        holm = (f", Holm p {sig(_num(d.get('p_holm')))} over {_shown(result.get('tested_arms'))} tested arms"
                if result.get("correction") == "holm" else "")
        parts.append(f"**Paired difference** {_name(subject.get('name'))} − {_name(base.get('name'))}: "
                     f"**{_interval(d, sign=True)}** ({conf}), p {sig(_num(d.get('p')))}{holm}")
    if arms:
        parts.append(_arms_table(arms, base, conf))
    matching = _matching_lines(result, arms, base)
    if matching:
        parts.append("\n".join(matching))
    trivial = _trivial_line(verdict, arms, result.get("best_trivial"), subject, base)
    if trivial:
        parts.append(trivial)
    nxt = _next_for_ablation(int(job["id"]), verdict, subject, job) if job["status"] == "succeeded" else None
    if nxt:
        parts.append(nxt)
    return parts


def _report_part(run_dir: Path | None, arms: list[Any]) -> str | None:
    report = run_dir / "report.md" if run_dir else None
    if report is None or not report.is_file():
        return None
    names = [a.get("name") for a in arms if isinstance(a, dict)]
    if not all(isinstance(n, str) and _PLAIN_NAME.fullmatch(n) for n in names):
        # report.md is markdown the harness wrote with the arm names in it, embedded as it is;
        # names that the harness would refuse today may be markdown, so it stays in the run
        return f"report.md is not shown: its arm names are not plain names (`{report}`)"
    text = report.read_text(errors="replace")
    if len(text) > REPORT_CHARS:
        text = text[:REPORT_CHARS] + f"\n\n... (cut; the whole report is `{report}`)"
    return "<details><summary>report.md</summary>\n\n" + text + "\n\n</details>"


def _compact(v: Any) -> str:
    """A housekeeping value on one line: a dict as `key value, ...`, a list joined."""
    if isinstance(v, dict):
        return ", ".join(f"{k} {_compact(x)}" for k, x in v.items()) or "-"
    if isinstance(v, (list, tuple)):
        return ", ".join(_compact(x) for x in v) or "-"
    return sig(v)


def _overlap(v: Any) -> str:
    """The harness's overlap ({split: {lines, in_train}}) as `split in_train/lines` per split."""
    if not isinstance(v, dict) or not all(isinstance(o, dict) for o in v.values()):
        return _compact(v)
    shown = ", ".join(f"{k} {sig(o.get('in_train'))}/{sig(o.get('lines'))}" for k, o in v.items())
    return shown + " in train"


def _details_part(result: dict[str, Any]) -> str | None:
    rows: list[list[Any]] = [[k, _overlap(result[k]) if k == "overlap" else _compact(result[k])]
                             for k in _HOUSEKEEPING if k in result]
    line = result.get("verdict_line")
    if not rows and not line:
        return None
    said = f"verdict: {cell(str(line))}\n\n" if line else ""  # the harness's greppable line, as logged
    return ("<details><summary>Details: run, statistics, overlap, versions</summary>\n\n" + said
            + (table(["", ""], rows) if rows else "") + "\n\n</details>")


def _metrics_part(result: Any, leave_out: frozenset[str]) -> str | None:
    metrics = [(k, v) for k, v in flat_metrics(result)
               if k.split(".")[0] not in leave_out and k.split(".")[0] not in _HOUSEKEEPING]
    if not metrics:
        return None
    return "**Metrics**\n\n" + table(["metric", "value"], [[k, sig(v)] for k, v in metrics])


def result_comment(job: dict[str, Any], approval: dict[str, Any] | None = None,
                   stage: dict[str, Any] | None = None) -> str:
    """The one result comment of a finished job. `approval`: the bridge's run row when the job
    came from the issue's spec (then `/rerun` runs it again). `stage`: the job's link to an idea
    pipeline (pipeline_id, stage, round, role), said in the heading.

    An ablation's leads with what decides it: the verdict and the cell it was read on, the
    paired difference against the baseline with its interval and Holm p, every arm's mean, what
    is matched, the best trivial baseline, and what the verdict invites. A training run shows
    its metrics and its training and validation curves. Housekeeping (run_dir, minutes,
    confidence, overlap, versions ...) sits in a collapsed block; numbers have three
    significant digits (`sig`)."""
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
    leave_out: frozenset[str] = frozenset({"verdict"})
    report = None
    if isinstance(result, dict) and "verdict" in result:
        parts += _ablation_parts(job, result)
        leave_out = _ABLATION_SHOWN
        report = _report_part(run_dir, result.get("arms") or [])
    if isinstance(result, dict) and isinstance(result.get("grid"), dict):
        # a full run on a task: its grid, beside the ablation arm it scales when one earned it
        from records import earning_arm, task_grid_lines

        cell_ = result.get("primary") or {}
        trivial = ", ".join(f"{untrusted(k)} {_shown(v)}" for k, v in (result.get("trivial") or {}).items())
        parts.append(f"**Primary cell** {untrusted(cell_.get('cell'))}: {_shown(cell_.get('accuracy'))}"
                     + (f" · trivial baselines: {trivial}" if trivial else ""))
        parts.append("\n".join(task_grid_lines(result, *earning_arm(result, job.get("earned_by")))))
        leave_out = leave_out | {"grid", "counts", "overlap", "baselines", "primary", "trivial"}
    metrics = _metrics_part(result, leave_out)
    if metrics:
        parts.append(metrics)
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
    details = _details_part(result) if isinstance(result, dict) else None
    if details:
        parts.append(details)
    if report:
        parts.append(report)
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
