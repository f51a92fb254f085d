"""`lab`: the command line of the lab. A thin layer: parse, call one function, print.

Every command takes --json (one JSON document on stdout, for an agent). Exit codes:
0 success; 1 the work failed (a job failed, a check did not hold); 2 bad input (usage, unknown
key, wrong lane, missing file); 3 timed out (`lab wait`). Errors go to stderr as `Error: ...`.
Nothing imports this module.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from typing import Any

import click

from config import ConfigError

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_TIMEOUT = 3


class BadInput(click.ClickException):
    """A user error: one line on stderr, exit 2, nothing done."""

    exit_code = EXIT_BAD_INPUT


class Failed(click.ClickException):
    """The work ran and failed: exit 1."""

    exit_code = EXIT_FAILED


class JsonError(click.ClickException):
    """An error of a command run with --json: one JSON document on stderr, so an agent parses it
    (`{"error", "field", "exit_code"}`) instead of scraping `Error: ...`."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        m = re.match(r"([^\s:]+): ", self.message)  # errors name their field first: `train.lr: ...`
        click.echo(json.dumps({"error": self.message, "field": m.group(1) if m else None,
                               "exit_code": self.exit_code}, ensure_ascii=False), err=True)


class LabGroup(click.Group):
    """Turns the project's validation errors into `Error: ...` with exit 2, wherever raised (as
    JSON on stderr when the command was given --json); `lab --help` lists commands by topic."""

    def invoke(self, ctx: click.Context) -> Any:
        wants_json = "--json" in [*getattr(ctx, "_protected_args", []), *ctx.args]
        try:
            try:
                return super().invoke(ctx)
            except (ConfigError, FileNotFoundError) as e:
                raise BadInput(str(e)) from None
        except click.ClickException as e:
            if not wants_json or isinstance(e, JsonError):
                raise
            raise JsonError(e.format_message(), e.exit_code) from None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Commands grouped by topic, as `gh --help` does, each with its whole first line."""
        names = self.list_commands(ctx)
        placed = {n for _, group in TOPICS for n in group}
        topics = [*TOPICS, ("Other", [n for n in names if n not in placed])]
        for title, group in topics:
            rows = []
            for name in group:
                cmd = self.get_command(ctx, name)
                if cmd is not None and not cmd.hidden:
                    rows.append((name, _summary(cmd)))
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def _summary(cmd: click.Command) -> str:
    """A command's whole first paragraph, on one line: click's short help cuts it at 45 chars."""
    if cmd.short_help:
        return cmd.short_help
    first = inspect.cleandoc(cmd.help or "").split("\n\n")[0]
    return " ".join(first.replace("\b", "").split())


# `lab --help` by topic; a command missing here is listed under "Other".
TOPICS: list[tuple[str, list[str]]] = [
    ("Models", ["smoke", "train", "eval", "tokenize"]),
    ("Ablations and ideas", ["ablate", "pipeline", "compare"]),
    ("Queue", ["daemon", "submit", "status", "next", "jobs", "show", "logs", "wait", "cancel", "retry",
               "kinds", "agent"]),
    ("GitHub", ["github", "labels"]),
    ("Records", ["finding", "register", "registry", "runs", "archive", "restore"]),
    ("Operations", ["service", "serve", "mcp"]),
]


def emit(data: Any, as_json: bool, text: Callable[[Any], str] | str | None = None) -> None:
    """Print `data` as JSON, or as text for a person."""
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    elif callable(text):
        click.echo(text(data))
    elif text is not None:
        click.echo(text)
    else:
        click.echo(json.dumps(data, indent=2, default=str))


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document (for agents).")


@click.group(cls=LabGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="reasoning-lab")
def main() -> None:
    """reasoning-lab: train tiny reasoning models, run ablations, and queue work for one GPU.

    \b
    Typical loop:
      lab smoke --preset tiny --arch refiner        # does it build and learn at all?
      lab submit ablation --lane cpu --set ...      # does the idea win an ablation?
      lab wait ID --json                            # block until it ends (exit 0/1/3)
      lab show ID --json                            # read the result

    Every command has --help and --json.
    """


def _set_option() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                        help="A config key (--set d_model=128, an override) or a spec field (--set "
                             "preset=tiny); repeatable; values are TOML.")


# --- model and training commands (models/, jobs/smoke, jobs/train, jobs/tokenize) -------------


def _new_run_id(kind: str) -> str:
    """Sortable and unique: kind-YYYYmmdd-HHMMSS-<6 hex>."""
    import secrets
    from datetime import UTC, datetime

    return f"{kind}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


# What a job writes before it does any work (the spec it was given, a log line): a run directory
# holding only these, left by a bad input, records nothing worth keeping.
_SETUP_FILES = frozenset({"spec.json", "log.txt"})


@contextlib.contextmanager
def _foreground(kind: str, device: str, run_id: str | None = None) -> Iterator[Any]:
    """A LocalContext for running a job kind here, in $LAB_RUNS/<run_id>.

    Exit 2 means nothing was done, yet some inputs are found bad only inside the job (a dataset
    that is not there, a block_size longer than the data): on such an error the run directory
    made by this call is removed again, so `lab runs` shows no empty run. A directory that was
    there before (`--resume`), or one where the job wrote more than its setup files, is kept."""
    from pathlib import Path

    import torch

    import config
    from jobs.context import LocalContext
    from workers.gpu_lock import hold_card_if_cuda

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device: cuda is not available on this machine")
    # The card's machine-wide lock, as a queue job takes it: a foreground run never overlaps the
    # GPU lane's job (a wait prints who holds the card).
    hold_card_if_cuda(device)
    run_dir = Path(config.paths().runs) / (run_id or _new_run_id(kind))
    made_here = not run_dir.exists()
    ctx = LocalContext(run_dir, lane="gpu" if device == "cuda" else "cpu", device=device)
    try:
        yield ctx
    except (BadInput, ConfigError, FileNotFoundError):
        if made_here and all(p.is_file() and p.name in _SETUP_FILES for p in run_dir.iterdir()):
            shutil.rmtree(run_dir)
        raise


_device_option = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                              show_default=True, help="Where to run (auto: cuda when there is a card).")


def _run_text(r: dict[str, Any]) -> str:
    return (f"run {r['run_dir']}: val_loss {r['val_loss']:.4f}, val_bpb {r['val_bpb']:.4f}, "
            f"{r['steps']} steps, {r['wall_s']:.1f} s")


@main.command("train")
@click.option("--preset", default=None, help="tiny | ablation | rtx2060  [default: tiny]")
@click.option("--arch", default=None, help="refiner | reasoner  [default: config.MODEL_ARCH]")
@_set_option()
@click.option("--data", default=None, metavar="NAME",
              help="A dataset under $LAB_RUNS/data  [default: sample]")
@click.option("--resume", "resume_run", default=None, metavar="RUN_ID",
              help="Continue RUN_ID from its last checkpoint (--set may change train settings).")
@_device_option
@json_option
def train_cmd(preset: str | None, arch: str | None, sets: tuple[str, ...], data: str | None,
              resume_run: str | None, device: str, as_json: bool) -> None:
    """Train a model in the foreground, in $LAB_RUNS/<run_id> (checkpoints, metrics.jsonl,
    config.json, log.txt). Exit 1 if the loss diverges (the last good checkpoint is kept).

    \b
    Example:
      lab train --preset tiny --arch refiner --set max_steps=200 --set lr=1e-3
      lab train --resume train-20261125-173000-abc123 --set max_steps=400
    """
    import config
    import jobs
    from jobs.train import resume_values
    from models.train import TrainingDiverged

    values: dict[str, Any] = resume_values(resume_run) if resume_run else {}
    values.update(config.parse_assignments(sets))  # config keys join the overrides (jobs.route_sets)
    for key, value in (("preset", preset), ("arch", arch), ("data", data)):
        if value is not None:
            values[key] = value
    values["resume"] = bool(resume_run)
    spec = jobs.parse_spec("train", values)
    try:
        with _foreground("train", device, resume_run) as ctx:
            result = jobs.get_kind("train").run(spec, ctx)
    except TrainingDiverged as e:
        raise Failed(str(e)) from None
    emit(result, as_json, _run_text)


def _smoke_text(r: dict[str, Any]) -> str:
    head = f"smoke {'ok' if r['ok'] else 'FAILED'}: {r['reason']}"
    if r.get("arms"):
        return "\n".join([head] + [f"  {name}: {'ok' if a['ok'] else 'FAILED'}: {a['reason']}"
                                    for name, a in r["arms"].items()])
    rows = [("preset / arch", f"{r.get('preset')} / {r.get('arch')} on {r.get('device')}"),
            ("parameters", _sig(r.get("params"))), ("steps", r.get("steps")),
            ("eval loss", f"{_sig(r.get('val_loss_start'))} -> {_sig(r.get('val_loss'))}"),
            ("peak memory", f"{_sig(r.get('peak_mem_mb'))} MB"), ("took", f"{_sig(r.get('seconds'))} s")]
    return "\n".join([head] + [f"  {k:<13}  {v}" for k, v in rows if "None" not in str(v)])


@main.command("smoke")
@click.option("--preset", default="tiny", show_default=True, help="tiny | ablation | rtx2060")
@click.option("--arch", default=None, help="refiner | reasoner  [default: config.MODEL_ARCH]")
@click.option("--steps", default=None, type=int, help="Optimizer steps  [default: 40]")
@_set_option()
@_device_option
@json_option
def smoke_cmd(preset: str, arch: str | None, steps: int | None, sets: tuple[str, ...], device: str,
              as_json: bool) -> None:
    """Build the model, train a few dozen steps on the sample text, check that the loss falls
    and nothing is NaN; exit 1 if the check fails (--json prints the whole result).

    \b
    Example:
      lab smoke --preset tiny --arch refiner --json
    """
    import config
    import jobs
    from jobs.smoke import check

    values: dict[str, Any] = {"preset": preset, "arch": arch, **config.parse_assignments(sets)}
    if steps is not None:
        values["steps"] = steps
    spec = jobs.parse_spec("smoke", values)
    with _foreground("smoke", device) as ctx:
        result = check(spec, ctx)
    emit(result, as_json, _smoke_text)
    if not result["ok"]:
        raise Failed(f"smoke: {result['reason']}")


@main.command("tokenize")
@click.argument("src", nargs=-1, required=True)
@click.option("--name", required=True, help="Dataset name: $LAB_RUNS/data/NAME")
@click.option("--field", "text_field", default="text", show_default=True,
              help="The JSON key (.jsonl) or column (.parquet) that holds the text")
@click.option("--force", is_flag=True, help="Replace an existing dataset NAME (once the new one is complete)")
@json_option
def tokenize_cmd(src: tuple[str, ...], name: str, text_field: str, force: bool, as_json: bool) -> None:
    """Tokenize files (r50k_base) into uint16 shards under $LAB_RUNS/data/NAME with a meta.json
    (token and byte counts, sha256 per shard and source). A .txt or .md file is one document; a
    .jsonl line (a JSON object) or a .parquet row is one, its text in --field. Files are
    streamed, so a corpus may be far larger than memory; progress goes to stderr.

    \b
    The files must lie in the checkout's data/ (or models/assets/): a dataset is readable by
    every user of the runs directory, so no dotfile, no file outside the checkout. An existing
    dataset NAME is refused unless --force (it is replaced only once the new one is complete).

    \b
    Example:
      lab tokenize data/books/*.txt --name books
      lab tokenize data/web/part-*.parquet --field content --name web --force
      lab train --data books --preset tiny
    """
    import jobs
    from jobs.paths import check_spec_paths

    values = {"src": list(src), "name": name, "text_field": text_field, "force": force}
    check_spec_paths("tokenize", values)  # the agent may run this one in the foreground
    spec = jobs.parse_spec("tokenize", values)
    with _foreground("tokenize", "cpu") as ctx:
        result = jobs.get_kind("tokenize").run(spec, ctx)
    emit(result, as_json,
         lambda r: f"{r['name']}: {r['tokens']:,} tokens, {r['documents']:,} document(s), "
                   f"{r['shards']} shard(s) at {r['dir']}")


@main.command("eval")
@click.argument("run")
@click.option("--n-steps", default=None, type=int,
              help="Depth at eval (loop passes or layers)  [default: the model's own]")
@click.option("--batches", default=None, type=int, help="Eval batches  [default: the run's eval_batches]")
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True)
@_device_option
@json_option
def eval_cmd(run: str, n_steps: int | None, batches: int | None, checkpoint: str, device: str,
             as_json: bool) -> None:
    """Evaluate a training run's checkpoint (val_loss, val_bpb) on its dataset's held-out split.

    \b
    Example:
      lab eval train-20261125-173000-abc123 --n-steps 8 --json
    """
    import jobs
    from jobs.eval import checkpoint_of
    from records.archive import ArchivedRun

    spec = jobs.parse_spec("eval", {"run": run, "n_steps": n_steps, "batches": batches,
                                    "checkpoint": checkpoint})
    try:
        checkpoint_of(spec)  # a missing run is bad input: fail before creating a run dir
    except ArchivedRun as e:
        # In the cold tier: exit 2 as for a missing run, but an agent gets where it is and the
        # command that brings it back (one JSON document on stdout; the error on stderr).
        if as_json:
            emit(e.as_dict(), True)
        raise BadInput(str(e)) from None
    with _foreground("eval", device) as ctx:
        result = jobs.get_kind("eval").run(spec, ctx)
    emit(result, as_json, lambda r: f"{r['run']} at depth {r['n_steps']}: val_loss {r['val_loss']:.4f}, "
                                    f"val_bpb {r['val_bpb']:.4f}")


# --- ablation commands (harness/, jobs/ablation) ----------------------------------------------


def _ablation_text(s: dict[str, Any]) -> str:
    from pathlib import Path

    report = Path(s["run_dir"]) / "report.md"
    body = report.read_text() if report.exists() else ""
    line = s.get("verdict_line", s["verdict"])
    return f"{body}\nrun: {s['run_dir']} ({s['minutes']:.1f} min)\nverdict: {line}"


@main.command("ablate")
@click.option("--spec", "spec_file", default=None, metavar="FILE.toml", help="The ablation spec.")
@click.option("--control", type=click.Choice(["negative", "positive"]), default=None,
              help="Run a shipped control (exit 1 if it does not give its expected verdict).")
@_set_option()
@json_option
def ablate_cmd(spec_file: str | None, control: str | None, sets: tuple[str, ...], as_json: bool) -> None:
    """Train every arm of an ablation on every seed and give the verdict of the first non-baseline
    arm against the baseline (better / worse / inconclusive), in $LAB_RUNS/ablate-<timestamp>
    (ablation.json, report.md, accuracy.png). --set overrides a top-level spec key.

    \b
    Example:
      lab ablate --spec harness/specs/khop_default.toml --json
      lab ablate --control negative --set seeds=5
    """
    import config
    import jobs
    from harness.ablate import CONTROL_EXPECTED, new_run_dir, run_ablation
    from jobs.ablation import resolve
    from jobs.context import LocalContext

    if bool(spec_file) == bool(control):
        raise BadInput("--spec: give exactly one of --spec FILE.toml or --control negative|positive")
    values: dict[str, Any] = {k: v for k, v in (("spec_file", spec_file), ("control", control)) if v}
    values.update(config.parse_assignments(sets))
    spec = resolve(jobs.parse_spec("ablation", values))  # every error before anything trains
    try:
        summary = run_ablation(spec, LocalContext(new_run_dir()))
    except FloatingPointError as e:  # a diverged arm: the ablation failed, not the input
        raise Failed(str(e)) from None
    emit(summary, as_json, _ablation_text)
    if control and summary["verdict"] != CONTROL_EXPECTED[control]:
        raise Failed(f"control {control}: expected {CONTROL_EXPECTED[control]}, got {summary['verdict']}")


# --- queue commands (daemon/, workers/) -------------------------------------------------------


def _sig(v: Any) -> str:
    """Numbers for people (common.sig: three significant digits); --json keeps every digit."""
    import common

    return common.sig(v, missing="-")


def _job_text(j: dict[str, Any]) -> str:
    """`lab show` for a person: sections, not one JSON line."""
    lines = [f"job {j['id']}: {j['kind']} on lane {j['lane']}: {j['status']}"]

    def section(title: str, rows: list[tuple[str, Any]]) -> None:
        rows = [(k, v) for k, v in rows if v not in (None, {}, "", [])]
        if rows:
            lines.extend(["", f"{title}:"])
            width = max(len(k) for k, _ in rows)
            lines.extend(f"  {k:<{width}}  {v}" for k, v in rows)

    spec = j.get("spec") or {}
    section("Spec", [(k, json.dumps(v, default=str) if isinstance(v, (dict, list)) else v)
                     for k, v in spec.items()])
    pl = j.get("pipeline")
    section("Queue", [("priority", j.get("priority") or None), ("after", j.get("after")),
                      ("issue", j.get("issue")), ("host wanted", j.get("want_host")),
                      ("cost", _cost_text(j["cost"]) if j.get("cost") else None),
                      ("earned by", j.get("earned_by")), ("forced", j.get("force_reason")),
                      ("pipeline", f"{pl['id']}, stage {pl['stage']} ({pl['role']}, round {pl['round']})"
                       if pl else None)])
    section("Times (UTC)", [("created", j.get("created_at")), ("started", j.get("started_at")),
                            ("finished", j.get("finished_at"))])
    progress = j.get("progress") or {}
    section("Outcome", [("attempts", f"{j.get('attempts')} of {j.get('max_attempts')}"),
                        ("exit code", j.get("exit_code")), ("error", j.get("error")),
                        ("progress", _progress_text(progress).strip() if j["status"] == "running" else None)])
    result = j.get("result")
    if isinstance(result, dict) and result:
        lines.extend(["", "Result:"])
        arms = result.get("arms") if isinstance(result.get("arms"), list) else None
        if arms:
            lines.append(f"  verdict {result.get('verdict')} on {result.get('primary')}: "
                         f"{result.get('verdict_line', '')}")
            lines.append(f"  {'ARM':<16} {'MEAN':>6} {'95% CI':<16} {'VS BASELINE':<24} VERDICT")
            for a in arms:
                d = a.get("diff") or {}
                ci = f"[{_sig(a.get('ci_low'))}, {_sig(a.get('ci_high'))}]"
                vs = (f"{d.get('mean', 0):+.3f} [{d.get('ci_low', 0):+.3f}, {d.get('ci_high', 0):+.3f}]"
                      if d.get("mean") is not None else "-")
                lines.append(f"  {str(a.get('name')):<16} {_sig(a.get('mean')):>6} {ci:<16} {vs:<24} "
                             f"{a.get('verdict')}")
        shown = {k: v for k, v in result.items() if not isinstance(v, (dict, list))}
        width = max((len(k) for k in shown), default=0)
        lines.extend(f"  {k:<{width}}  {_sig(v)}" for k, v in shown.items())
        nested = [k for k, v in result.items() if isinstance(v, (dict, list))]
        if nested:
            lines.append(f"  (also {', '.join(nested)}: `lab show {j['id']} --json`)")
    rf = j.get("run_files")
    if rf:
        section("Files", [("host", rf["host"] + ("" if rf["here"] else " (not this host)")),
                          ("path", rf["path"]), ("tier", rf.get("tier"))])
    if j.get("events"):
        lines.extend(["", "Events:"])
        lines.extend(f"  {e['at']}  {e['kind']}: {e['message']}" for e in j["events"])
    return "\n".join(lines)


def _progress_text(p: dict[str, Any] | None) -> str:
    if not p:
        return ""
    metrics = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in (p.get("metrics") or {}).items())
    eta = f" eta {p['eta_s']:.0f}s" if p.get("eta_s") is not None else ""
    return f" [{p.get('step')}/{p.get('total')}{eta}] {metrics}".rstrip()


def _status_text(s: dict[str, Any]) -> str:
    d = s["daemon"]
    alive = f"alive on {d['host']} (pid {d['pid']})" if d["alive"] else "not running"
    lines = [f"daemon: {alive}" + (f", {d['count']} daemons" if d["count"] > 1 else "")]
    for h in s.get("hosts") or []:
        running = ", ".join(f"{j['id']} {j['kind']} ({j['lane']})" for j in h["running"])
        lines.append(f"host {h['host']}: {'alive' if h['alive'] else 'not alive'}, "
                     f"lanes {','.join(h['lanes']) or '-'}, last heartbeat {h['heartbeat'] or 'never'}, "
                     f"running [{running or '-'}]")
    for lane, info in s["lanes"].items():
        running = ", ".join(f"{j['id']} {j['kind']}{_progress_text(j['progress'])}" for j in info["running"])
        lines.append(f"{lane}: running [{running or '-'}], {info['queued']} queued, {info['blocked']} blocked"
                     + (f" — PAUSED: {info['paused']}" if info["paused"] else ""))
    disk = s["disk"]
    lines.append(f"disk: {disk['free_gb']} GB free under {disk['path']} (min {disk['min_free_gb']:g} GB)")
    for p in s.get("pipelines") or []:
        lines.append(_pipeline_line(p))
    if s["jobs"]:
        lines.append(f"  {'ID':>5} {'KIND':<9} {'LANE':<3} {'STATUS':<9} PROGRESS / ERROR")
    for j in s["jobs"]:
        lines.append(f"  {j['id']:>5} {j['kind']:<9} {j['lane']:<3} {j['status']:<9}"
                     f"{_progress_text(j['progress'])}{'  ' + j['error'] if j.get('error') else ''}")
    return "\n".join(lines)


def _int_or_none(value: str | None, flag: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise BadInput(f"{flag}: expected a job id (an integer), got {value!r}") from None


@main.command("daemon")
@click.option("--cpu-workers", type=click.IntRange(1, 256), default=None,
              help="CPU jobs in parallel (default: config QUEUE.cpu_workers).")
@click.option("--lanes", default="gpu,cpu", show_default=True, envvar="LAB_LANES",
              help="Lanes this host offers (env LAB_LANES; a CPU-only box: cpu).")
@json_option
def daemon_cmd(cpu_workers: int | None, lanes: str, as_json: bool) -> None:
    """Run the queue daemon in the foreground until SIGTERM/SIGINT.

    It runs GPU jobs one at a time and CPU jobs in parallel, each in its own process with a log
    in runs/<job_id>/log.txt. On SIGTERM it takes no new work, lets running jobs finish within
    QUEUE.shutdown_seconds or requeues them, and exits.

    Several hosts share one queue when LAB_DB is a Postgres URL (and LAB_BROKER a redis:// URL);
    each names itself with LAB_HOST and keeps its run files under its own LAB_RUNS
    (docs/MULTIHOST.md).

    Example: LAB_DB=queue.db LAB_RUNS=runs lab daemon --cpu-workers 2
    """
    import common
    from bridge import github
    from daemon.scheduler import run_daemon

    # Before any thread or subprocess: jobs run as this user, and must not read the daemon's
    # /proc/<pid>/environ or memory; the token (from a descriptor systemd opened, a credential or
    # a file) is read once, now, before a child could inherit the descriptor.
    try:
        common.harden_process()
    except OSError as e:
        click.echo(f"lab daemon: warning: could not make the daemon undumpable ({e})", err=True)
    common.github_token(os.environ)
    chosen = tuple(x.strip() for x in lanes.split(",") if x.strip())
    bad = [x for x in chosen if x not in ("gpu", "cpu")]
    if bad or not chosen:
        raise BadInput(f"--lanes: {lanes!r} must name gpu and/or cpu")
    # the scheduler and the GitHub bridge side by side (it polls when GITHUB_TOKEN is set)
    run_daemon(chosen, cpu_workers, companion=lambda db, say: github.maybe_start(db, say=say))
    if as_json:
        emit({"stopped": True}, True)


@main.command("submit")
@click.argument("kind")
@click.option("--lane", default=None, metavar="gpu|cpu", help="Default: the kind's first lane.")
@_set_option()
@click.option("--after", default=None, metavar="ID", help="Wait until job ID succeeded (blocked until then).")
@click.option("--priority", type=int, default=0, show_default=True, help="Higher runs first within a lane.")
@click.option("--timeout", "timeout_s", type=float, default=None, help="Seconds before the job is killed.")
@click.option("--issue", type=int, default=None, help="The GitHub issue this job answers to.")
@click.option("--earned-by", default=None, metavar="ID", help="The ablation that earned a full GPU run.")
@click.option("--force", is_flag=True, help="Skip the earned-run gate (needs --reason).")
@click.option("--reason", default=None, help="Why the gate is forced (recorded with the job).")
@click.option("--host", default=None, help="Only this host (LAB_HOST) may run it.")
@click.option("--spec", "spec_file", default=None, metavar="FILE.toml",
              help="The spec's keys from a TOML file (--set overrides them); an idea's whole spec.")
@click.option("--dry-run", is_flag=True,
              help="Validate and show what would be queued (spec, lane, cost, the gate); queue nothing.")
@json_option
def submit_cmd(kind: str, lane: str | None, sets: tuple[str, ...], after: str | None, priority: int,
               timeout_s: float | None, issue: int | None, earned_by: str | None, force: bool,
               reason: str | None, host: str | None, spec_file: str | None, dry_run: bool,
               as_json: bool) -> None:
    """Queue a job; works with no daemon running (it waits in the queue).

    A GPU job whose compute estimate (training FLOPs, or its wall-clock budget) reaches the
    full-run threshold (config GATE) is a full run, whatever its kind: it needs --earned-by, an
    ablation whose tested arm made the same change with verdict better. `lab submit idea --spec
    idea.toml` queues an idea's whole pipeline: smoke, then ablation, then the full run only if
    the ablation earned it (`lab pipeline` follows it).

    Examples:

      lab submit sleep --lane cpu --set seconds=2 --json

      lab submit ablation --lane cpu --set spec_file=harness/specs/khop_default.toml --dry-run

      lab submit idea --spec idea.toml --lane cpu
    """
    from config import parse_assignments
    from daemon import service

    values = _spec_file_values(spec_file) if spec_file else {}
    values.update(parse_assignments(sets))
    job = service.submit(kind, values, lane=lane, after=_int_or_none(after, "--after"),
                       priority=priority, timeout_s=timeout_s, issue=issue,
                       earned_by=_int_or_none(earned_by, "--earned-by"), force=force, reason=reason,
                       host=host, dry_run=dry_run)
    if dry_run:
        emit(job, as_json, _dry_run_text)
    elif kind == "idea":
        emit(job, as_json, lambda p: f"queued pipeline {p['id']}: {p['stage']} stage "
             f"(jobs {', '.join(str(j['id']) for s in p['stages'] for j in s['jobs'])}); "
             f"`lab pipeline {p['id']}` follows it")
    else:
        emit(job, as_json, lambda j: f"queued job {j['id']}: {j['kind']} on lane {j['lane']} ({j['status']})"
             + (f"\n  cost: {_cost_text(j['cost'])}" if j.get("cost") else "")
             + (f"\nwarning: {j['warning']}" if j.get("warning") else ""))


def _spec_file_values(path: str) -> dict[str, Any]:
    import tomllib
    from pathlib import Path

    try:
        values = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"--spec: cannot read {path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise BadInput(f"--spec: {path} is not valid TOML: {e}") from None
    values.pop("kind", None)
    return values


def _cost_text(c: dict[str, Any] | None) -> str:
    if not c:
        return "-"
    flops = f"{c['flops']:.3g} training FLOPs" if c.get("flops") is not None else "FLOPs unknown"
    budget = f", budget {c['budget_s']:.0f} s" if c.get("budget_s") else ""
    return f"{flops} ({c.get('basis', '')}){budget}"


def _dry_run_text(d: dict[str, Any]) -> str:
    if d.get("kind") == "idea":
        lines = [f"dry run: idea on lane {d['lane']} (hash {d['hash']}), arm {d['arm']} vs {d['baseline']} "
                 f"on {d['primary']}; nothing queued"]
        for st in d["stages"]:
            for j in st["jobs"]:
                lines.append(f"  {st['stage']:<8} {j['kind']:<8} {j['lane']:<3} {_cost_text(j.get('cost'))}"
                             + (f" -- {j['gate']}" if j.get("gate") else ""))
        return "\n".join(lines)
    return "\n".join([f"dry run: {d['kind']} on lane {d['lane']}; nothing queued",
                      f"  spec: {json.dumps(d['spec'], default=str)}",
                      f"  cost: {_cost_text(d['cost'])}",
                      f"  gate: {d['gate']}"])


@main.command("pipeline")
@click.argument("pipeline_id", type=int, required=False)
@click.option("--rerun", is_flag=True, help="Run the stage that stopped (or was cancelled) again.")
@click.option("--cancel", "cancel_", is_flag=True, help="Cancel the pipeline and its running stage.")
@click.option("--reason", default="cancelled by user", show_default=True, help="Recorded with --cancel.")
@json_option
def pipeline_cmd(pipeline_id: int | None, rerun: bool, cancel_: bool, reason: str, as_json: bool) -> None:
    """Ideas' pipelines: smoke -> ablation -> full run. Without an id, the latest 20; with one,
    each stage's state, jobs and the last decision (why it moved on or stopped).

    Examples:

      lab pipeline            # every recent pipeline, one line each

      lab pipeline 3 --json   # one pipeline, every stage

      lab pipeline 3 --rerun  # run the stage that stopped it again
    """
    from daemon import pipeline as pl
    from daemon import service

    store = service.open_store()
    if pipeline_id is None:
        if rerun or cancel_:
            raise BadInput("--rerun/--cancel: give the pipeline's id")
        rows = pl.list_views(store)
        emit({"pipelines": rows}, as_json, lambda d: "\n".join(_pipeline_line(p) for p in d["pipelines"])
             or "no pipelines yet (`lab submit idea --spec idea.toml`)")
        return
    if rerun and cancel_:
        raise BadInput("--rerun/--cancel: choose one")
    if rerun:
        view = pl.rerun(pipeline_id, store)
    elif cancel_:
        view = pl.cancel(pipeline_id, reason, store)
    else:
        view = pl.view(pipeline_id, store)
    emit(view, as_json, _pipeline_text)


def _pipeline_line(p: dict[str, Any]) -> str:
    issue = f" #{p['issue']}" if p.get("issue") else ""
    return f"pipeline {p['id']}{issue}: {p['status']} in {p['stage']}: {p['reason'] or ''}"


def _pipeline_text(p: dict[str, Any]) -> str:
    lines = [_pipeline_line(p), f"  hypothesis: {p.get('hypothesis')}",
             f"  arm {p.get('arm')} vs {p.get('baseline')} on {p.get('primary')} (pre-registered)"]
    for st in p["stages"]:
        jobs_ = ", ".join(f"job {j['id']} {j['role']} {j['status']}"
                          + (f" ({j['verdict']})" if j.get("verdict") else "") for j in st["jobs"])
        lines.append(f"  {st['stage']:<8} {st['state']:<10} {jobs_}")
    outcome = p.get("outcome") or {}
    if outcome.get("graveyard"):
        lines.append(f"  graveyard line for docs/ROADMAP.md: {outcome['graveyard']}")
    if outcome.get("finding_draft"):
        lines.append(f"  finding drafted: {outcome['finding_draft']} (publish: {outcome['publish']})")
    return "\n".join(lines)


@main.command("agent")
@click.option("--once", is_flag=True, help="Run at most one turn (only if one is due), then exit (cron).")
@click.option("--claude", default=None, metavar="PATH",
              help="The Claude Code executable  [default: env LAB_CLAUDE, else `claude` on PATH]")
@click.option("--idle-seconds", type=click.FloatRange(0.01, 86_400.0), default=None,
              help="Sleep this long when nothing is due  [default: config AGENT.idle_seconds]")
@click.option("--turn-timeout", type=click.FloatRange(0.1, 86_400.0), default=None, metavar="SECONDS",
              help="Kill a turn (its process group) after this long  [default: AGENT.turn_timeout_seconds]")
@click.option("--max-turns", type=click.IntRange(1, 10_000), default=None,
              help="Passed to claude as --max-turns  [default: AGENT.max_turns]")
@click.option("--stop-file", default=None, metavar="PATH",
              help="Stop before the next turn while this file exists  [default: $LAB_RUNS/agent/STOP]")
@click.option("--cwd", default=None, metavar="DIR",
              help="The checkout claude runs in (its .claude/settings.json applies)  [default: this repo]")
@json_option
def agent_cmd(once: bool, claude: str | None, idle_seconds: float | None, turn_timeout: float | None,
              max_turns: int | None, stop_file: str | None, cwd: str | None, as_json: bool) -> None:
    """Run the agent around the clock: Claude Code headless, one turn at a time.

    A turn (`claude -p <AGENT_TURN.md> --output-format json --max-turns N`, in the checkout, so
    the guard hook and the MCP server apply) starts when `lab next` has something or a job has
    ended since the last turn; otherwise it sleeps. A failed turn is followed by a backoff that
    doubles up to AGENT.backoff_max_seconds. Each turn is one JSON line in
    $LAB_RUNS/agent/turns.jsonl, its stdout in turn-<n>.json. SIGTERM/SIGINT stops the running
    turn and exits 0; so does the stop file, before the next turn. A second `lab agent` exits 1
    at once (the lock names the holder's pid). With --once, exit 1 when the turn failed.

    Example: lab agent --turn-timeout 1800 --max-turns 40 --json
    """
    from daemon import agent

    try:
        opts = agent.options(claude=claude, cwd=cwd, stop_file=stop_file, idle_seconds=idle_seconds,
                             turn_timeout=turn_timeout, max_turns=max_turns, once=once)
        loop = agent.AgentLoop(opts)
    except agent.AgentError as e:
        raise BadInput(str(e)) from None
    try:
        summary = loop.run()
    except agent.AlreadyRunning as e:
        raise Failed(str(e)) from None
    s = summary
    emit(s, as_json, f"lab agent stopped ({s['stopped_by']}): {s['turns']} turn(s), {s['ok']} ok, "
                     f"{s['failed']} failed ({s['timed_out']} timed out); log {s['log']}")
    if once and summary["failed"]:
        sys.exit(EXIT_FAILED)


@main.command("status")
@json_option
def status_cmd(as_json: bool) -> None:
    """What runs, what waits (progress, ETA), whether a daemon is alive, the disk guard, and the
    GitHub bridge once it has run (last sync, requests left, a pause and why, rows it gave up on).

    Example: lab status --json
    """
    from bridge import github
    from daemon import service

    store = service.open_store()
    status = service.status(store)
    bridge = github.status_summary(store)  # the daemon's GitHub poller: its rate, pause, give-ups
    if bridge is not None:
        status["bridge"] = bridge
    emit(status, as_json, lambda s: "\n".join([_status_text(s), *github.status_lines(s.get("bridge"))]))


@main.command("next")
@click.option("--dismiss", default=None, metavar="KEY", help="Take item KEY off the list (needs --reason).")
@click.option("--reason", default=None, help="Why the dismissed item needs no action (recorded).")
@json_option
def next_cmd(dismiss: str | None, reason: str | None, as_json: bool) -> None:
    """What needs attention, ranked: each item with its reason and the exact command (and MCP
    call) that deals with it. An empty list says so, and what runs and when it should end.

    Items: no daemon alive while work waits, the disk guard, a stopped idea pipeline, a spec
    marked needs-fix, GitHub writes the bridge gave up on, failed jobs, finished ablations
    without a finding. An item goes when what it points at changes, or with --dismiss.

    \b
    Examples:
      lab next --json
      lab next --dismiss job:12 --reason "superseded by job 14"
    """
    from daemon import attention

    if dismiss is not None:
        emit(attention.dismiss(dismiss, reason or ""), as_json, lambda d: f"dismissed {d['dismissed']}")
        return
    emit(attention.needs_attention(), as_json, _next_text)


def _next_text(d: dict[str, Any]) -> str:
    if d["empty"]:
        return d["summary"]
    lines = [f"{'#':>2}  {'KEY':<16} {'WHAT':<17} REASON / COMMAND"]
    for n, i in enumerate(d["items"], 1):
        lines.append(f"{n:>2}  {i['key']:<16} {i['kind']:<17} {i['reason']}")
        lines.append(f"{'':>2}  {'':<16} {'':<17} $ {i['command']}")
    return "\n".join(lines)


@main.command("jobs")
@click.option("--status", default=None, help="queued, blocked, running, succeeded, failed, cancelled, "
                                             "active or final.")
@click.option("--kind", default=None, help="Only this job kind.")
@click.option("--issue", type=int, default=None, help="Only jobs linked to this GitHub issue.")
@click.option("--since", default=None, help="Created since: an age (30m, 6h, 2d) or an ISO time.")
@click.option("--limit", type=int, default=50, show_default=True, help="At most this many, newest first.")
@json_option
def jobs_cmd(status: str | None, kind: str | None, issue: int | None, since: str | None, limit: int,
             as_json: bool) -> None:
    """List jobs, newest first, filtered by status, kind, issue and age.

    \b
    Examples:
      lab jobs --status failed --since 1d --json
      lab jobs --kind ablation --limit 5
    """
    from daemon import service

    emit(service.list_jobs(status, kind, issue, since, limit), as_json, lambda d: _jobs_table(d["jobs"]))


def _jobs_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no jobs match"
    lines = [f"{'ID':>5}  {'KIND':<9} {'LANE':<4} {'STATUS':<9} {'ISSUE':>5}  {'CREATED (UTC)':<20} ERROR"]
    for j in rows:
        lines.append(f"{j['id']:>5}  {j['kind']:<9} {j['lane']:<4} {j['status']:<9} {j['issue'] or '-':>5}  "
                     f"{(j['created_at'] or '')[:19]:<20} {(j.get('error') or '')[:60]}")
    return "\n".join(lines)


@main.command("compare")
@click.argument("a")
@click.argument("b")
@json_option
def compare_cmd(a: str, b: str, as_json: bool) -> None:
    """Two runs or two ablations side by side: metrics with deltas (B - A), the config diff, the
    verdicts. A and B are run ids (a job id, or a run's directory name under $LAB_RUNS).

    \b
    Example:
      lab compare 12 14 --json
    """
    from records.compare import compare, compare_text

    emit(compare(a, b), as_json, compare_text)


@main.command("show")
@click.argument("job_id", type=int)
@json_option
def show_cmd(job_id: int, as_json: bool) -> None:
    """One job: spec, status, times (ISO 8601 UTC), attempts, exit code, error, result, host, run
    dir, and its events (submitted, claimed, started, requeued, ...).

    Example: lab show 12 --json
    """
    from pathlib import Path

    from daemon import service
    from records import archive

    job = service.show(job_id, events=True)
    rf = job.get("run_files")
    if rf:
        # The queue records where the run was written; an archived run's files are now in the cold
        # tier: run_files says which tier, where the files are now, and how to bring them back.
        where = archive.whereabouts(Path(rf["path"])) if rf["here"] else {"tier": None}
        if where["tier"] == "cold":
            rf.update(hot_path=rf["path"], path=where["archive_path"], tier="cold", restore=where["restore"])
        else:
            rf.update(where)

    def text(j: dict[str, Any]) -> str:
        out = _job_text(j)
        if rf and rf.get("tier") == "cold":
            out += f"\n  archived: the run files are in the cold tier; `{rf['restore']}` brings them back"
        elif rf and rf.get("error"):
            out += f"\n  run files: {rf['error']}"
        return out

    emit(job, as_json, text)


@main.command("logs")
@click.argument("job_id", type=int)
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the job ends.")
@json_option
def logs_cmd(job_id: int, follow: bool, as_json: bool) -> None:
    """Print a job's log (runs/<job_id>/log.txt on the host that ran it).

    Example: lab logs 12 --follow
    """
    import time as _time
    from pathlib import Path

    import config as _config
    from daemon import service
    from records import archive
    from store import FINAL

    store = service.open_store()
    job = service.show(job_id, store)
    here = job["run_dir"] and (not job["host"] or job["host"] == _config.paths().host)
    where = archive.whereabouts(Path(job["run_dir"])) if here else {"tier": None}
    if where["tier"] == "unknown" and not as_json:  # a damaged pointer: whatever follows, say so first
        click.echo(f"warning: job {job_id}: {where['error']}", err=True)
    if where["tier"] == "cold":
        # An archived job has ended: its log is read where it now is, the cold copy, and the
        # note says so and how to restore; not "no log yet", which would send one waiting.
        cold_log = Path(where["archive_path"]) / "log.txt"
        note = (f"job {job_id} is archived: its files are in the cold tier at {where['archive_path']}; "
                f"`{where['restore']}` brings them back")
        try:
            text = cold_log.read_text(errors="replace")
        except OSError as e:  # the cold disk not mounted, or a job that never logged
            if as_json:
                emit({**where, "id": job_id, "status": job["status"], "path": str(cold_log),
                      "error": f"{note}; its log {cold_log} cannot be read ({e.strerror})"}, True)
            raise Failed(f"{note}; its log {cold_log} cannot be read ({e.strerror})") from None
        if as_json:
            emit({**service.logs(job_id, store=store), **where, "path": str(cold_log),
                  "lines": len(text.splitlines()), "log": text}, True)
        else:
            click.echo(text, nl=False)
            click.echo(note, err=True)
        return
    if as_json:
        emit({**service.logs(job_id, store=store), **where}, True)
        return
    pos = 0
    while True:
        job = service.show(job_id, store)
        path = service.log_path(job)
        if path is not None and path.exists():
            with open(path, "rb") as f:
                f.seek(pos)
                chunk = f.read()
            pos += len(chunk)
            if chunk:
                click.echo(chunk.decode(errors="replace"), nl=False)
        elif path is not None and job["host"] and job["host"] != _config.paths().host:
            click.echo(f"job {job_id} ran on host {job['host']}: its log is there, at {path}", err=True)
            return
        elif not follow:
            click.echo(f"job {job_id} has no log yet ({job['status']})", err=True)
        if not follow or (job["status"] in FINAL and (path is None or pos >= path.stat().st_size)):
            return
        _time.sleep(0.3)


@main.command("cancel")
@click.argument("job_id", type=int)
@click.option("--reason", default="cancelled by user", show_default=True)
@json_option
def cancel_cmd(job_id: int, reason: str, as_json: bool) -> None:
    """Cancel a job: a waiting one at once, a running one by killing its process group.

    Example: lab cancel 12
    """
    from daemon import service
    from store import StateError

    try:
        out = service.cancel(job_id, reason)
    except StateError as e:
        raise BadInput(str(e)) from None
    emit(out, as_json, f"job {job_id}: " + ("cancelled" if out["status"] == "cancelled"
                                            else "cancel requested (stopping)"))


@main.command("retry")
@click.argument("job_id", type=int)
@json_option
def retry_cmd(job_id: int, as_json: bool) -> None:
    """Put a failed or cancelled job back in the queue (attempts start again from zero).

    Example: lab retry 12
    """
    from daemon import service
    from store import StateError

    try:
        job = service.retry(job_id)
    except StateError as e:
        raise BadInput(str(e)) from None
    # A held job comes back blocked (the GitHub `blocked` label is still on): say why it waits.
    held = f" (held: {job['held']})" if job.get("held") else ""
    emit(job, as_json, f"job {job_id}: {job['status']}{held}")


@main.command("wait")
@click.argument("job_id", type=int)
@click.option("--timeout", "timeout_s", type=float, default=None,
              help="Give up after this many seconds (exit 3).")
@click.option("--keep-waiting", is_flag=True,
              help="Wait even when no daemon is alive to run the job (say so once on stderr); "
                   "without it, exit 3 at once.")
@json_option
def wait_cmd(job_id: int, timeout_s: float | None, keep_waiting: bool, as_json: bool) -> None:
    """Block until a job ends: exit 0 succeeded, 1 failed or cancelled, 3 timed out.

    When no daemon is alive for the job's lane (and host), nothing will ever run it: wait says
    so on stderr (with when a daemon was last seen) and exits 3 at once, unless --keep-waiting
    is given (e.g. a daemon is about to start). With --json, stdout stays one JSON document (the
    job, with "timed_out" and "no_daemon"); the message goes to stderr only.

    Example: lab wait 12 --timeout 600 --json
    """
    from daemon import service

    def say(message: str) -> None:
        click.echo(f"warning: {message}; waiting anyway (--keep-waiting)", err=True)

    try:
        job = service.wait(job_id, timeout_s, without_daemon="warn" if keep_waiting else "fail", say=say)
    except service.WaitTimeout as e:
        no_daemon = isinstance(e, service.NoDaemon)
        if as_json:
            emit({**service.show(job_id), "timed_out": True, "no_daemon": no_daemon}, True)
        click.echo(f"Error: {e}" + ("; pass --keep-waiting to wait anyway" if no_daemon else ""), err=True)
        sys.exit(EXIT_TIMEOUT)
    emit(job, as_json, _job_text)
    if job["status"] != "succeeded":
        sys.exit(EXIT_FAILED)


@main.command("kinds")
@json_option
def kinds_cmd(as_json: bool) -> None:
    """List job kinds, their lanes and spec fields (what --set accepts).

    Example: lab kinds --json
    """
    from daemon import service

    def text(ks: list[dict[str, Any]]) -> str:
        out = []
        for k in ks:
            if "error" in k:
                out.append(f"{k['kind']}: unavailable ({k['error']})")
                continue
            out.append(f"{k['kind']} (lanes: {', '.join(k['lanes'])}): {k['doc']}")
            out += [f"    {f['name']}: {f['type']} " + ("(required)" if f["required"] else "(optional)"
                                                        if f["default"] is None else f"= {f['default']!r}")
                    for f in k["fields"]]
        return "\n".join(out)

    emit(service.kinds(), as_json, text)


# --- GitHub commands (bridge/github.py) -------------------------------------------------------


def _sync_text(s: dict[str, Any]) -> str:
    if s.get("skipped"):
        return f"skipped: {s['skipped']}"
    lines = [f"{s['repository']}: {s['issues_read']} issues read, submitted {s['submitted'] or '-'}, "
             f"cancelled {s['cancelled'] or '-'}, {s['answered']} answered, {s['sent']} writes sent, "
             f"{s['failed']} failed, {s['requests']} requests, rate limit left {s['rate_remaining']}",
             "outbox: " + ", ".join(f"{k} {v}" for k, v in s["outbox"].items())]
    if s.get("paused_until"):
        lines.append(f"paused until {s['paused_until']}")
    lines += [f"  {e}" for e in s["errors"]]
    return "\n".join(lines)


@main.group("github")
def github_group() -> None:
    """The GitHub bridge: labelled issues become jobs; results go back to the issue."""


@github_group.command("sync")
@click.option("--once", is_flag=True, required=True,
              help="Run one full cycle and exit (for scripts and cron).")
@json_option
def github_sync_cmd(once: bool, as_json: bool) -> None:
    """Read issues, enqueue their specs, post pending comments and labels, then exit.

    Needs GITHUB_TOKEN and GITHUB_REPOSITORY (GITHUB_API_URL for GitHub Enterprise). The daemon
    does the same every LAB_GITHUB_POLL seconds when those are set.

    Example: GITHUB_TOKEN=... GITHUB_REPOSITORY=me/lab lab github sync --once --json
    """
    from bridge import github

    try:
        summary = github.sync_once()
    except RuntimeError as e:
        raise Failed(str(e)) from None
    emit(summary, as_json, _sync_text)


@main.group("labels")
def labels_group() -> None:
    """The repository's labels: lanes, states and types."""


@labels_group.command("sync")
@json_option
def labels_sync_cmd(as_json: bool) -> None:
    """Create or update the lab's labels (colours, descriptions) on GITHUB_REPOSITORY.

    Example: lab labels sync --json
    """
    from bridge import github

    try:
        done = github.sync_labels()
    except RuntimeError as e:
        raise Failed(str(e)) from None
    emit(done, as_json, lambda d: "\n".join(f"{x['label']:<14} #{x['color']}  {x['action']}" for x in d))


# --- records, storage and guardrail commands (records/, jobs/archive) -------------------------


def _record_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a records/archive function; a refusal (no verdict, duplicate, failed verify) exits 1."""
    from records import RecordError
    from records.archive import ArchiveError

    try:
        return fn(*args, **kwargs)
    except (RecordError, ArchiveError) as e:
        raise Failed(str(e)) from None


@main.command("finding")
@click.argument("job")
@click.option("--title", required=True, help="The conclusion in a sentence (it names the file).")
@click.option("--supersedes", default=None, metavar="FILE.md",
              help="An older finding this one replaces; both get a link to the other.")
@json_option
def finding_cmd(job: str, title: str, supersedes: str | None, as_json: bool) -> None:
    """Write docs/findings/YYYY-MM-DD-<slug>.md from a finished ablation: claim on the primary
    cell, evidence table, what is not matched, trivial baselines, the depth x difficulty grid,
    the config difference between arms, the command that reproduces it, job id and git commit.
    Exit 1 for a job without a verdict or one that already has a finding.

    Example: lab finding 12 --title "A 4-pass refiner beats a 1-layer flat model on khop"
    """
    import records

    out = _record_call(records.write_finding, job, title, supersedes)
    emit(out, as_json, lambda f: f"wrote {f['path']} (verdict {f['verdict']})")


@main.command("register")
@click.argument("job")
@click.option("--name", required=True, help="The card's name: docs/registry/NAME.md")
@json_option
def register_cmd(job: str, name: str, as_json: bool) -> None:
    """Write a model card docs/registry/NAME.md for a finished training run: architecture,
    resolved config, parameter count, data, metrics, checkpoint path, sha256, storage tier.

    Example: lab register 14 --name refiner-k4-v1
    """
    import records

    out = _record_call(records.write_card, job, name)
    emit(out, as_json, lambda c: f"wrote {c['path']} ({c['params']:,} parameters, sha256 {c['sha256'][:12]})")


@main.command("registry")
@json_option
def registry_cmd(as_json: bool) -> None:
    """List the model cards in docs/registry (with each checkpoint's current storage tier).

    Example: lab registry --json
    """
    import records

    cards = records.list_cards()
    emit(cards, as_json, records.cards_table)


@main.command("runs")
@json_option
def runs_cmd(as_json: bool) -> None:
    """Every run (hot under LAB_RUNS, cold in LAB_ARCHIVE): kind, status, size, tier, age, best metric.

    Example: lab runs --json
    """
    import records

    emit(records.list_runs(), as_json, records.runs_table)


@main.command("archive")
@click.argument("runs", nargs=-1)
@click.option("--older-than", "older_than", type=float, default=None, metavar="DAYS",
              help="Also archive every finished run whose newest file is older than DAYS.")
@json_option
def archive_cmd(runs: tuple[str, ...], older_than: float | None, as_json: bool) -> None:
    """Move runs to LAB_ARCHIVE in the foreground: copy, verify every file's sha256, then delete
    the hot copy and leave a pointer. A failed verify deletes nothing (exit 1). The queue kind
    `archive` does the same on the CPU lane: lab submit archive --set older_than_days=30

    Example: lab archive 12 13 --json
    """
    import records

    if not runs and older_than is None:
        raise BadInput("archive: name runs, or give --older-than DAYS")
    if older_than is not None and not 0 <= older_than <= 36_500:  # nan fails both comparisons
        raise BadInput(f"--older-than: {older_than} must be a number of days in [0, 36500]")
    for run in runs:
        # A named run that is not there is bad input (exit 2, as `lab restore` says), refused
        # before anything moves; a run that fails to archive is the work failing (exit 1).
        _check_named_run(run)
    out = records.archive_runs(list(runs), older_than)

    def text(r: dict[str, Any]) -> str:
        lines = [f"archived {a['run']}: {a['files']} files, {records.human_bytes(a['bytes'])} -> "
                 f"{a['archive_path']}" for a in r["archived"]]
        lines += [f"not archived {f['run']}: {f['error']}" for f in r["failed"]]
        return "\n".join(lines) or "nothing to archive"

    emit(out, as_json, text)
    if out["failed"]:
        sys.exit(EXIT_FAILED)


def _check_named_run(run: str) -> None:
    """BadInput (exit 2) unless `run` is one directory under LAB_RUNS, as records names runs."""
    from pathlib import Path

    import config

    runs = Path(config.paths().runs)
    if not run or "/" in run or "\\" in run or run in (".", "..") or "\0" in run:
        raise BadInput(f"run: {run!r} is not a run name")
    try:
        there = (runs / run).is_dir()
    except (OSError, ValueError):  # a name the filesystem refuses (too long)
        there = False
    if not there:
        raise BadInput(f"run: no run {run!r} (no run directory {runs / run})")


@main.command("restore")
@click.argument("run")
@json_option
def restore_cmd(run: str, as_json: bool) -> None:
    """Bring an archived run back to LAB_RUNS, verified file by file against its manifest.

    Example: lab restore 12 --json
    """
    import records
    from records import archive

    _check_named_run(run)  # the same answer as `lab archive` for a run that is not there
    out = _record_call(archive.restore_run, run)
    emit(out, as_json, lambda r: f"restored {r['run']}: {r['files']} files, "
                               f"{records.human_bytes(r['bytes'])} -> {r['path']}")


@main.group("service")
def service_group() -> None:
    """Run the daemon as a systemd service (see README, "Running as a service").

    Example: lab service print > ~/.config/systemd/user/lab.service
    """


@service_group.command("print")
@click.option("--user", default=None, help="User= line (a system service); omit for `systemctl --user`.")
@click.option("--env-file", default=None, help="EnvironmentFile (the token)  [default: ./.env]")
@click.option("--workdir", default=None, help="WorkingDirectory  [default: the current directory]")
@click.option("--cpu-workers", type=int, default=None, help="Passed to `lab daemon`.")
@click.option("--group", default=None, help="Group= (a system service)  [default: the user's primary group]")
@click.option("--gpu-group", default=None,
              help="SupplementaryGroups= for /dev/nvidia* (a system service)  [default: the group of "
                   "/dev/nvidia0, else video; '' for none]")
@click.option("--token-file", default=None,
              help="The token alone in a file: root:root 0600 for a system service, chmod 600 for a "
                   "user one.")
@click.option("--token-via", type=click.Choice(["stdin", "credential"]), default=None,
              help="System service: how systemd hands the token over  [default: stdin]")
@click.option("--agent", is_flag=True,
              help="Print lab-agent.service (`lab agent`) instead: no token, no GPU group; --env-file "
                   "defaults to ./.env.agent.")
@json_option
def service_print_cmd(user: str | None, env_file: str | None, workdir: str | None, cpu_workers: int | None,
                      group: str | None, gpu_group: str | None, token_file: str | None, token_via: str | None,
                      agent: bool, as_json: bool) -> None:
    """Print a systemd unit for `lab daemon` (restart on failure; the token from a file, never
    in the unit or any process environment when --token-file is given).

    A system service (--user lab) runs the daemon as its own user in the group that owns
    /dev/nvidia*, with the token handed over by systemd (docs/SECURITY.md). Problems with the
    token file or the card's permissions are printed to stderr as warnings, so `| sudo tee` works.

    Examples:
      lab service print > ~/.config/systemd/user/lab.service
      lab service print --user lab --token-file /etc/reasoning-lab/github-token \
        | sudo tee /etc/systemd/system/lab.service
      lab service print --agent > ~/.config/systemd/user/lab-agent.service
    """
    from daemon import systemd

    if agent:
        extra = [flag for flag, given in (("--cpu-workers", cpu_workers), ("--gpu-group", gpu_group),
                                          ("--token-file", token_file), ("--token-via", token_via))
                 if given is not None]
        if extra:
            raise BadInput(f"{extra[0]}: not for --agent (the agent gets no token and no GPU)")
        try:
            text = systemd.agent_unit_text(workdir=workdir, user=user, env_file=env_file, group=group,
                                           claude=os.environ.get("LAB_CLAUDE") or shutil.which("claude"))
        except ValueError as e:
            raise BadInput(str(e)) from None
        emit({"unit": text}, as_json, text.rstrip("\n"))
        return
    if user and gpu_group is None:
        gpu_group = systemd.gpu_device_group()
    try:
        text = systemd.unit_text(workdir=workdir, env_file=env_file, user=user, cpu_workers=cpu_workers,
                                 group=group, gpu_group=gpu_group or None, token_file=token_file,
                                 token_via=token_via)  # type: ignore[arg-type]
    except ValueError as e:
        raise BadInput(str(e)) from None
    if user:
        problems = (systemd.token_file_problems(token_file) if token_file else []) + systemd.device_problems()
        for p in problems:
            click.echo(f"warning: {p}", err=True)
    emit({"unit": text}, as_json, text.rstrip("\n"))


@main.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback needs a token.")
@click.option("--port", type=click.IntRange(0, 65535), default=8008, show_default=True,
              help="Port (0: any free port; the URL printed says which).")
@click.option("--token", envvar="LAB_SERVE_TOKEN", default=None,
              help="Required on every request when set (env LAB_SERVE_TOKEN).")
@json_option
def serve_cmd(host: str, port: int, token: str | None, as_json: bool) -> None:
    """Serve a read-only web dashboard of the queue, runs, ablations and research notes.

    What runs and waits (live), jobs, ablations, findings, cards and pipelines, from the same
    store and run directories as `lab status`. GET only; binds 127.0.0.1 unless told otherwise,
    and another address requires --token. Reach it from elsewhere through an SSH tunnel.

    Example: lab serve --port 8008   # then, from a laptop: ssh -L 8008:localhost:8008 box
    """
    from web import app

    token = token or None
    app.check_bind(host, token)
    sock = app.bind(host, port)
    url = app.url_of(host, sock.getsockname()[1], token)
    # The URL first, before the server blocks: a script (or a test) reads it from the first line.
    emit({"url": url, "host": host, "port": sock.getsockname()[1], "token_required": bool(token)}, as_json,
         f"lab serve: {url} (read-only; Ctrl-C stops it)")
    sys.stdout.flush()
    app.serve(sock, token, loopback=app.is_loopback(host))


@main.command("mcp")
def mcp_cmd() -> None:
    """Serve the queue to an agent over MCP (stdio): tools submit, status, show, wait, logs, cancel.

    Example (Claude Code): claude mcp add lab -- .venv/bin/lab mcp
    """
    from daemon.mcp_server import serve

    serve()


if __name__ == "__main__":
    sys.exit(main())
