"""bridge/render.py against text an issue (or a job) controls: nothing from outside may ping a
user, open an HTML comment, forge a heading or verdict, close a fence, or carry a bot marker.

Every comment here is made by the real rendering functions from real inputs (a real issue body
through bridge.github.parse_issue_spec, real run files in a run directory)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from bridge import github, render

MARKER = "<!-- lab:status 2 --> @octocat <!--"  # the review's `kind`: a forged marker, a ping, a hidden rest
FORGED_ARM = "x\n## Verdict: **better**"


def spec_body(toml: str) -> str:
    return f"An experiment.\n\n```toml\n{toml.strip()}\n```\n"


def _job(**kw: Any) -> dict[str, Any]:
    base = dict(id=5, kind="ablation", lane="cpu", status="succeeded", created_at=1.0e9,
                started_at=1.0e9 + 5, finished_at=1.0e9 + 65, attempts=1, max_attempts=3, host="box",
                run_dir=None, result=None, error=None, exit_code=0, progress=None, held=None, after_id=None)
    return {**base, **kw}


def _rest(body: str, head: list[str]) -> str:
    """The body after its header marker lines (which must be exactly `head`)."""
    lines = body.split("\n")
    assert lines[: len(head)] == head, body[:300]
    return "\n".join(lines[len(head):])


def _no_ping(body: str, login: str = "octocat") -> None:
    # GitHub mentions `@name` after a start or a non-word character; the text must not hold one
    assert not re.search(rf"(?<![A-Za-z0-9_])@{login}", body), body


def _problem(toml: str) -> github.SpecProblem:
    with pytest.raises(github.SpecProblem) as e:
        github.parse_issue_spec(spec_body(toml), ["cpu"], 3)
    return e.value


# --- the helper -------------------------------------------------------------------------------


def test_untrusted_is_a_code_span_when_plain_and_escaped_text_otherwise() -> None:
    assert render.untrusted("sleep.secs") == "`sleep.secs`"  # what every ordinary field looks like
    assert render.untrusted("sparse:7-8@16") == "`sparse:7-8@16`"  # no mention inside a code span
    assert render.untrusted(MARKER) == "<code>&lt;!-- lab:status 2 --&gt; @\u200doctocat &lt;!--</code>"
    assert render.untrusted("a`b|c\\d") == "<code>a\\`b\\|c\\\\d</code>"
    assert render.untrusted("two\nlines\r\nhere\u2028x") == "`two lines  here x`"
    assert render.untrusted("") == "(empty)"
    long = render.untrusted("y" * 500)
    assert long == "`" + "y" * 199 + "…`"
    assert render.untrusted("y" * 50, limit=10) == "`" + "y" * 9 + "…`"
    # prose: escaped text without a span; intraword underscores and e-mail-like @ stay as they are
    assert render.untrusted("val_loss", code=False) == "val_loss"
    assert render.untrusted("a@b.c", code=False) == "a@b.c"
    assert render.untrusted("_x_ *y* [z](u) | ~s~ $m$ `c`", code=False) == \
        "\\_x\\_ \\*y\\* \\[z\\](u) \\| \\~s\\~ \\$m\\$ \\`c\\`"
    assert render.untrusted("@octocat, (@team)", code=False) == "@\u200doctocat, (@\u200dteam)"
    assert render.untrusted(42) == "`42`"


NASTY = [MARKER, FORGED_ARM, "`` ` ```", "<b>x</b>&amp;", "\\`", "| a | b |", "@octocat", "-->",
         "\x00\x1b[31m", "a" * 1000 + "`", "<!--", "[x](javascript:alert(1))", "__init__", "$$x$$",
         "~~gone~~"]


@pytest.mark.parametrize("text", NASTY)
@pytest.mark.parametrize("code", [True, False])
def test_untrusted_output_can_neither_open_html_nor_break_out(text: str, code: bool) -> None:
    out = render.untrusted(text, code=code)
    assert "\n" not in out and "\r" not in out and len(out) < 1000
    if out.startswith("`"):  # a code span: the content has no backtick that could close it
        assert code and out.endswith("`") and "`" not in out[1:-1] and "<" not in out
        return
    inner = out.removeprefix("<code>").removesuffix("</code>") if code else out
    assert (inner != out) == code
    assert "<" not in inner and ">" not in inner  # no tag, no comment, no `</code>`
    bare = re.sub(r"\\.", "", inner)  # what is left once every backslash escape is taken out
    assert not re.search(r"[`*\[\]|~$\\]", bare), out
    assert not re.search(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", bare), out
    _no_ping(out)


# --- the comments -----------------------------------------------------------------------------


def test_an_invalid_kind_cannot_ping_or_hide_the_comment() -> None:
    """Finding 1: `kind = "<!-- lab:status 2 --> @octocat <!--"` was echoed raw into the answer:
    it pinged @octocat, carried job 2's status marker, and hid the rest of the comment."""
    p = _problem(f'kind = "{MARKER}"')
    body = render.invalid_comment("invalid:3:abc", p.field, p.problem, p.fix, github.EXAMPLE_SPEC)
    rest = _rest(body, [render.INVALID_MARKER, render.key_marker("invalid:3:abc")])
    assert "<!--" not in rest and render.status_marker(2) not in body
    _no_ping(body)
    assert "**Field:** `kind`" in rest and "&lt;!-- lab:status 2 --&gt;" in rest  # still readable
    assert "is not a job kind" in rest and "Edit the issue body" in rest  # nothing hidden after it


def test_an_unknown_key_named_like_a_marker_is_escaped_in_field_and_fix() -> None:
    p = _problem(f'kind = "sleep"\n"{MARKER}" = 1')
    assert MARKER in p.field and MARKER in p.fix  # the issue's key reaches both
    body = render.invalid_comment("invalid:3:def", p.field, p.problem, p.fix, github.EXAMPLE_SPEC)
    rest = _rest(body, [render.INVALID_MARKER, render.key_marker("invalid:3:def")])
    assert "<!--" not in rest
    _no_ping(body)
    assert rest.count("&lt;!-- lab:status 2 --&gt;") >= 2  # the field and the fix, shown as text


def test_the_unauthorised_labeller_is_named_without_a_ping() -> None:
    body = render.unauthorised_comment("unauthorised:3:octocat", "octocat", "Adding the `cpu` label")
    rest = _rest(body, [render.key_marker("unauthorised:3:octocat")])
    assert "`octocat`" in rest and "write access" in rest
    _no_ping(body)
    assert "whoever added the label" in render.unauthorised_comment("unauthorised:3:-", None, "A label")


def test_status_comment_carries_only_its_own_marker() -> None:
    job = _job(status="running", finished_at=None, cancel_requested=True,
               cancel_reason="<!-- lab:result 5 --> please @octocat",
               progress={"step": 1, "total": 4, "eta_s": 3.0, "metrics": {"note": "`x` <!-- y"}})
    body = render.status_comment(job)
    rest = _rest(body, [render.status_marker(5)])
    assert "<!--" not in rest and render.result_marker(5) not in body
    _no_ping(body)
    assert "1 / 4 (25 %) `█████░░░" in rest  # the bot's own markdown (the progress bar's code span) is kept


def _result_with_report(run: Path, arm_name: str) -> str:
    run.mkdir()
    (run / "report.md").write_text(f"# Ablation on `khop`: **inconclusive** on `hops3`\n\n| arm |\n|---|\n"
                                   f"| {arm_name} |\n")
    arms = [{"name": arm_name, "params": 1000, "mean": 0.5, "verdict": "inconclusive"},
            {"name": "flat-1", "params": 1000, "mean": 0.5, "verdict": "baseline"}]
    result = {"verdict": "inconclusive", "primary": "hops3", "arms": arms,
              "verdict_line": f"inconclusive on hops3 ({arm_name} 0.500 vs flat-1 0.500)"}
    return render.result_comment(_job(run_dir=str(run), result=result))


def test_an_arm_name_cannot_forge_a_verdict_in_the_result_comment(tmp_path: Path) -> None:
    """Finding 2: an arm named "x\\n## Verdict: **better**" put a `better` heading into an
    inconclusive result (its table cell, its verdict line, its report)."""
    body = _result_with_report(tmp_path / "forged", FORGED_ARM)
    headings = [ln for ln in body.splitlines() if ln.lstrip().startswith("#")]
    assert headings == ["### ✅ Job 5 succeeded"], headings
    assert "**better**" not in body and "**Verdict: inconclusive** on primary cell `hops3`" in body
    assert "report.md is not shown" in body  # a record whose names are not plain is not embedded
    plain = _result_with_report(tmp_path / "plain", "refiner-k4")
    assert "<details><summary>report.md</summary>" in plain and "| refiner-k4 |" in plain


def test_a_log_tail_cannot_close_its_fence_or_carry_a_marker(tmp_path: Path) -> None:
    """Finding 3: the job's own output must not hold a bot marker (the bridge finds its comments
    by marker) nor end the fence around the log."""
    run = tmp_path / "5"
    run.mkdir()
    log = ["step 1", "```", "<!-- lab:status 7 -->", "````` still inside", "@octocat look", "</details>",
           "~~~", "`````", "last line"]
    (run / "log.txt").write_text("\n".join(log) + "\n")
    job = _job(status="failed", run_dir=str(run), error="boom\n## Verdict: **better** <!-- lab:result 9 -->",
               exit_code=1)
    body = render.result_comment(job)
    rest = _rest(body, [render.result_marker(5)])
    assert "<!--" not in rest and render.status_marker(7) not in body and render.result_marker(9) not in body
    assert "**better**" not in body and not any(ln.startswith("## ") for ln in body.splitlines())
    lines = body.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("**Log tail**")) + 2
    fence = lines[start]
    assert re.fullmatch(r"`{6,}", fence)  # longer than the longest run inside (5)
    end = lines.index(fence, start + 1)
    inside = lines[start + 1:end]
    assert [ln.replace("\u200d", "") for ln in inside] == log  # every line, unchanged to the eye
    assert not any(re.fullmatch(rf"\s*`{{{len(fence)},}}\s*", ln) for ln in inside)


def test_waiting_comment_takes_only_a_number() -> None:
    body = render.waiting_comment("waiting:3:abc", 12)
    assert "issue #12" in body and body.startswith(render.key_marker("waiting:3:abc"))
    with pytest.raises((TypeError, ValueError)):
        render.waiting_comment("waiting:3:abc", "12 <!--")  # type: ignore[arg-type]


def test_key_marker_cannot_be_closed_by_its_key() -> None:
    assert render.key_marker("invalid:3:0123abcd") == "<!-- lab:key invalid:3:0123abcd -->"
    bot = render.key_marker("unauthorised:3:dependabot[bot]")
    assert bot == "<!-- lab:key unauthorised:3:dependabot_bot_ -->"
    forged = render.key_marker("unauthorised:3:x --> @octocat <!-- y")
    assert forged.count("-->") == 1 and forged.endswith("-->") and "@" not in forged
    for key in ("invalid:3:0123abcd", "unauthorised:3:dependabot[bot]", "x --> @octocat <!-- y"):
        assert github.leading_markers(render.key_marker(key) + "\ntext") == [render.key_marker(key)]


# --- what a person reads at a glance ------------------------------------------------------------

# Written by the real harness (harness.ablate.run_ablation: khop, 2 arms x 2 seeds x 10 steps);
# its summary is what an ablation job returns (tests/test_records.py explains why it is reused).
ABLATION = Path(__file__).parent / "data" / "ablation_khop_2x2.json"


def _summary(**kw: Any) -> dict[str, Any]:
    summary = json.loads(ABLATION.read_text())["summary"]
    return {**summary, "run_dir": "/runs/5", "minutes": 0.4321, **kw}


def _decimals(text: str) -> list[str]:
    """Every decimal number in `text` (a sign, digits, a point, digits)."""
    return re.findall(r"(?<![\w.])[-+]?\d[\d,]*\.\d+(?![\w.])", text)


def _significant(number: str) -> int:
    digits = number.lstrip("+-").replace(",", "").replace(".", "").lstrip("0")
    return len(digits)


def test_an_ablation_result_leads_with_what_decides_the_verdict() -> None:
    """The issue: the comment lacked the paired difference and its interval, the split it was read
    on, mixed precisions, filled Metrics with housekeeping and did not say what next."""
    result = _summary()
    loop, flat = result["arms"]
    body = render.result_comment(_job(result=result, spec={"seeds": 2, "seed_offset": 0}))
    said = [
        "**Verdict: inconclusive** on primary cell `test:2` (split `test`, bucket `2`, each arm at its own "
        "depth)",
        "**Paired difference** loop − flat: **-0.000256 [-0.296, +0.295]** (95% CI), p 0.993",
        f"| loop | 2 | {render.sig(loop['mean'])} [{render.sig(loop['ci_low'])}, "
        f"{render.sig(loop['ci_high'])}] | -0.000256 [-0.296, +0.295] | 0.993 | inconclusive |",
        f"| flat | 1 | {render.sig(flat['mean'])} [",
        "**Matching** (an axis is matched within 1.50x of the baseline; the spec claims no axis matched):",
        "- loop vs flat: matched nothing; **not matched**: params ",
        "**Best trivial baseline:** `majority` 0.307; no winner, and the best arm ",
        "**Next:** inconclusive says the difference was not told from noise",
        "More seeds narrow the interval (`seeds = 4`, or `seed_offset = 2` for 2 fresh seeds to pool with "
        "these); more steps (`steps`, 10 here)",
        "<details><summary>Details: run, statistics, overlap, versions</summary>",
    ]
    at = [body.find(s) for s in said]
    assert all(i >= 0 for i in at) and at == sorted(at), list(zip(said, at, strict=True))
    lead, details = body.split("<details>", 1)
    lead = lead.split("**Verdict", 1)[1]
    assert _decimals(lead) and all(_significant(n) == 3 for n in _decimals(lead)), _decimals(lead)
    # housekeeping is collapsed, not a Metrics table
    assert "**Metrics**" not in body
    for key in ("run_dir", "minutes", "confidence", "overlap", "match_ratio"):
        assert f"| {key} |" not in lead and f"| {key} |" in details, key
    assert "| minutes | 0.432 |" in details and "| overlap | test 0/" in details
    assert "verdict: inconclusive on test:2 (loop 0.226 vs flat 0.227" in details  # the harness's line


@pytest.mark.parametrize("verdict", ["better", "worse"])
def test_a_verdict_says_what_it_earns(verdict: str) -> None:
    result = _summary(verdict=verdict)
    result["arms"][0]["verdict"] = verdict
    winner = result["arms"][0 if verdict == "better" else 1]
    winner["mean"] = 0.9  # above the best trivial baseline (majority, 0.307)
    body = render.result_comment(_job(result=result))
    assert f"**Verdict: {verdict}** on primary cell `test:2`" in body
    name = winner["name"]
    assert f"; the winner {name} (0.900) clears it" in body
    if verdict == "better":
        assert "**Next:** the full run is earned: `lab submit idea --spec idea.toml`" in body
        assert "`lab submit train ... --earned-by 5`" in body and "Replicate" in body
        assert "`seed_offset = 2` for 2 fresh seeds" in body
    else:
        assert "**Next:** this is a finding: `lab finding 5 --title \"...\"`" in body and "graveyard" in body
    winner["mean"] = 0.2
    shortcut = render.result_comment(_job(result=result))
    assert f"the winner {name} (0.200) does **not** clear it: a shortcut, not reasoning" in shortcut
    # a failed job's comment says it is final; it offers no next step for a verdict it did not finish
    failed = render.result_comment(_job(result=result, status="failed", error="boom"))
    assert "not retried" in failed
    assert "the full run is earned" not in failed and "this is a finding" not in failed


def test_sig_is_three_significant_digits() -> None:
    cases = [(0.754, "0.754"), (1.0, "1.00"), (0.05, "0.0500"), (12345.6, "12,300"), (999.6, "1,000"),
             (-0.000255754, "-0.000256"), (42, "42"), (386.0, "386"), (250368, "250,368"), (None, "n/a"),
             (True, "True")]
    assert [render.sig(v) for v, _ in cases] == [want for _, want in cases]
    assert render.sig(0.168, sign=True) == "+0.168" and render.sig(-0.005, sign=True) == "-0.00500"
    assert render.sig(float("nan")) == "nan"


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A real training run (tiny refiner, 6 steps, an eval every 2): train and eval lines in
    metrics.jsonl, and the summary the train job returns."""
    import torch

    import config
    from jobs.context import LocalContext
    from models.data import ensure_sample_data
    from models.train import train

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("evaluated")
    cfg = config.preset("tiny", arch="refiner", max_steps=6, eval_interval=2, eval_batches=1, log_interval=1)
    try:
        ctx = LocalContext(root / "run", echo=lambda s: None)
        summary = train(cfg, ensure_sample_data(root), root / "run", ctx)
    finally:
        torch.set_num_threads(before)
    return root / "run", summary


def test_a_training_result_shows_train_and_validation_curves(
        evaluated_run: tuple[Path, dict[str, Any]]) -> None:
    run, summary = evaluated_run
    body = render.result_comment(_job(kind="train", run_dir=str(run), result=summary))
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("event") == "eval"]
    charts = body.split("```mermaid\nxychart-beta\n")[1:]
    assert len(charts) == 2
    assert 'title "training loss"' in charts[0] and 'title "validation loss"' in charts[1]
    val = charts[1].split("```")[0]
    assert f'x-axis "step" [{", ".join(str(r["step"]) for r in evals)}]' in val
    assert len(re.search(r"line \[(.*)\]", val).group(1).split(", ")) == len(evals) >= 2
    assert f"| val_loss | {render.sig(summary['val_loss'])} |" in body  # three digits, not six
    lead, details = body.split("<details>", 1)
    assert "| steps | 6 |" in lead and "| params |" in lead
    for key in ("run_dir", "checkpoint", "wall_s", "device"):
        assert f"| {key} |" not in lead and f"| {key} |" in details, key


def test_a_task_run_result_keeps_its_grid_and_primary_cell() -> None:
    grid = {"1": {"test": {"all": 0.75, "1": 1.0}}, "2": {"test": {"all": 0.8, "1": 1.0}}}
    result = {"task": "khop", "arm": "flat-1", "grid": grid, "primary": {"cell": "test", "accuracy": 0.8},
              "trivial": {"majority": 0.3}, "counts": {"test": {"all": 20}}, "val_loss": 0.123456,
              "run_dir": "/runs/5"}
    body = render.result_comment(_job(kind="train", result=result))
    assert "**Primary cell** `test`: 0.800 · trivial baselines: `majority` 0.300" in body
    assert "Split `test`" in body and "| val_loss | 0.123 |" in body
    assert "| grid" not in body and "| counts" not in body and "| run_dir |" in body.split("<details>", 1)[1]


def test_numbers_a_job_returned_are_escaped_when_they_are_not_numbers() -> None:
    """Every number in the verdict block is the bot's markdown; a result's "number" that is text
    (a job returns what it likes) must be shown as text, not as markdown or a ping."""
    result = _summary(tested_arms="**better** @octocat", correction="holm")
    result["arms"][0].update(mean="**better**", ci_low="@octocat", read_depth="<!-- lab:result 9 -->")
    result["arms"][0]["diff"]["p_holm"] = "[x](javascript:alert(1))"
    grid = {"1": {"test": {"all": 0.5}}}
    task = {"grid": grid, "primary": {"cell": "test", "accuracy": "**better**"}, "trivial": {"m": "@octocat"}}
    for body in (render.result_comment(_job(result=result)), render.result_comment(_job(result=task))):
        rest = _rest(body, [render.result_marker(5)])
        assert "**better**" not in body and "<!--" not in rest and "[x](javascript" not in body
        _no_ping(body)
