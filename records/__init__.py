"""Records the lab writes from real jobs: findings, model cards, and the listing of runs.

- A *finding* (`docs/findings/YYYY-MM-DD-<slug>.md`) is one dated conclusion drawn from a finished
  ablation: its claim, evidence table, verdict with intervals, the config difference between
  arms, the command that reproduces it, the job id and git commit. One finding per job.
- A *card* (`docs/registry/NAME.md`) describes a trained model: architecture, resolved config,
  parameter count, data, metrics, checkpoint path, sha256 and storage tier.
- `list_runs` reads every run directory (hot, or cold through its pointer file) and says what it
  is, how big, where, how old, and its best metric.

Both documents start with a front-matter block of `key: <JSON value>` lines between `---`
markers (valid YAML too), so `lab registry --json` and the duplicate check read them back
without guessing. Everything here reads files; the queue database is consulted only for a job's
kind and status when it exists.
"""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import config
from common import md_fence, md_untrusted, utc_now
from records import archive
from store import ACTIVE

FRONT = "---"
# Directories under LAB_RUNS that are not runs (token datasets live in runs/data).
NOT_RUNS = frozenset({"data"})


class RecordError(RuntimeError):
    """A record cannot be written (no verdict, a duplicate, an unfinished run); exit 1."""


# --------------------------------------------------------------------------------------------
# Locating a run's files, hot or cold


def runs_root() -> Path:
    return Path(config.paths().runs)


def archive_root() -> Path:
    return Path(config.paths().archive)


def docs_root() -> Path:
    return Path(config.docs_dir())


def locate_run(name: str) -> tuple[Path, str]:
    """(directory holding the run's files, tier). A cold run is read in place in the archive."""
    if not name or "/" in name or name in (".", "..") or name in NOT_RUNS:
        raise config.ConfigError(f"run: {name!r} is not a run name")
    hot = runs_root() / name
    pointer = archive.read_pointer(hot) if hot.is_dir() else None
    if pointer is not None:
        return Path(pointer["archive_path"]), "cold"
    if hot.is_dir():
        return hot, "hot"
    cold = archive_root() / name
    if (cold / config.RECORDS.manifest_file).is_file():
        return cold, "cold"
    raise FileNotFoundError(f"run: no run directory {hot} (and none in the archive {archive_root()})")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RecordError(f"{path}: not valid JSON ({e})") from None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows; a torn last line (a run killed mid-write) is skipped."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def log_values(path: Path) -> dict[str, str]:
    """The `key: value` lines a run's log ends with (the greppable summary)."""
    out: dict[str, str] = {}
    if not path.is_file():
        return out
    lines = path.read_text(errors="replace").splitlines()
    for line in reversed(lines[-200:]):
        m = re.fullmatch(r"([A-Za-z_][\w.]*):\s+(\S.*)", line.strip())
        if not m:
            if out:
                break  # the summary block is the unbroken run of key: value lines at the end
            continue
        out.setdefault(m.group(1), m.group(2).strip())
    return dict(reversed(out.items()))


def _num(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def ablation_view(raw: dict[str, Any]) -> dict[str, Any]:
    """ablation.json as one flat dict: the harness nests the verdict and arms under `summary`
    (next to spec, task, git_commit, versions); a flat file (the `--json` summary) is taken as is."""
    view = {**raw, **(raw.get("summary") or {})}
    task = raw.get("task")
    if isinstance(task, dict):
        view["task"] = task.get("name")
    return view


def read_ablation(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "ablation.json"
    if not path.is_file():
        return None
    raw = _read_json(path)
    return ablation_view(raw) if isinstance(raw, dict) else None


def best_metric(run_dir: Path) -> dict[str, Any] | None:
    """The run's headline number: best arm mean (ablation), lowest val_loss (training), or a
    numeric loss/accuracy in result.json; with the file it came from."""
    abl = read_ablation(run_dir)
    if abl is not None:
        arms = [a for a in abl.get("arms", []) if _num(a.get("mean")) is not None]
        if arms:
            top = max(arms, key=lambda a: float(a["mean"]))
            return {"name": f"accuracy ({top['name']})", "value": float(top["mean"]),
                    "source": "ablation.json"}
    vals = [(_num(r.get("val_loss")), r) for r in read_metrics(run_dir / "metrics.jsonl")]
    vals = [(v, r) for v, r in vals if v is not None]
    if vals:
        v, row = min(vals, key=lambda t: t[0])
        return {"name": "val_loss", "value": v, "step": row.get("step"), "source": "metrics.jsonl"}
    for res in (run_dir / "summary.json", run_dir / "result.json"):
        data = _read_json(res) if res.is_file() else None
        if isinstance(data, dict):
            for key in ("best_val_loss", "val_loss", "accuracy", "loss", "final_loss"):
                if _num(data.get(key)) is not None:
                    return {"name": key, "value": _num(data[key]), "source": res.name}
    return None


def _job_rows(ids: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """The queue's rows by run name (a job's run is runs/<job id>); empty without a queue."""
    db = config.paths().db
    if "://" not in db and not Path(db).exists():
        return {}
    from sqlalchemy.exc import SQLAlchemyError

    import store

    st = store.Store(db, create=False)
    try:
        if ids is not None:
            rows = [st.get(int(i)) for i in ids if i.isdigit()]
        else:
            rows = st.list_jobs()
    except SQLAlchemyError:  # a file that is not (yet) a queue: the run files still tell most
        return {}
    finally:
        st.dispose()
    return {str(r["id"]): r for r in rows if r}


def _job_row(name: str) -> dict[str, Any] | None:
    return _job_rows([name]).get(name)


def _kind_from_files(run_dir: Path) -> str | None:
    if (run_dir / "ablation.json").is_file():
        return "ablation"
    if (run_dir / "config.json").is_file() and (run_dir / "metrics.jsonl").is_file():
        return "train"
    return None


def summarize_run(name: str, row: dict[str, Any] | None = None) -> dict[str, Any]:
    """kind, status, size, tier, age and best metric of one run (`row`: its queue row, if known)."""
    run_dir, tier = locate_run(name)
    hot = runs_root() / name
    pointer = archive.read_pointer(hot) if hot.is_dir() else None
    row = row if row is not None else _job_row(name)
    saved = (pointer or {}).get("summary", {})
    kind = (row or {}).get("kind") or _kind_from_files(run_dir) or saved.get("kind")
    status = (row or {}).get("status") or saved.get("status") or _status_from_files(run_dir)
    size = (pointer or {}).get("bytes") if tier == "cold" and pointer else archive.dir_bytes(run_dir)
    return {
        "run": name,
        "kind": kind,
        "status": status,
        "tier": tier,
        "bytes": size,
        "size": human_bytes(size or 0),
        "age_days": round(archive.run_age_days(run_dir), 2),
        "best": best_metric(run_dir),
        "path": str(run_dir),
        # An agent reading `lab runs --json` learns how to bring a cold run back without guessing.
        "restore": archive.restore_command(name) if tier == "cold" else None,
    }


# The trainer's summary.json says "finished" or "diverged"; the queue's words are these.
_TRAIN_STATUS = {"finished": "succeeded", "diverged": "failed"}


def _status_from_files(run_dir: Path) -> str | None:
    abl = read_ablation(run_dir)
    if abl is not None and abl.get("verdict"):
        return "succeeded"
    for res in (run_dir / "summary.json", run_dir / "result.json"):
        data = _read_json(res) if res.is_file() else None
        if isinstance(data, dict) and isinstance(data.get("status"), str):
            return _TRAIN_STATUS.get(data["status"], data["status"])
    return None


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def list_runs() -> list[dict[str, Any]]:
    """Every run: directories under LAB_RUNS (hot, or cold with a pointer) plus archived runs
    whose hot pointer is gone. Newest first."""
    names: set[str] = set()
    root = runs_root()
    if root.is_dir():
        names |= {p.name for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and p.name not in NOT_RUNS}
    cold = archive_root()
    if cold.is_dir():
        names |= {p.name for p in cold.iterdir() if (p / config.RECORDS.manifest_file).is_file()}
    rows = _job_rows()
    out = []
    for n in sorted(names):
        try:
            out.append(summarize_run(n, rows.get(n, {})))
        # One unreadable run must not hide the others.
        except (RecordError, archive.ArchiveError, OSError) as e:
            # ArchiveError: a damaged pointer. Where the files are is then not known, so the tier
            # says "unknown" rather than guessing hot or cold; the queue still knows kind and status.
            row = rows.get(n, {})
            out.append({"run": n, "kind": row.get("kind"), "status": row.get("status"), "tier": "unknown",
                        "bytes": None, "size": "?", "age_days": 0.0, "best": None, "path": None,
                        "restore": None, "error": str(e)})
    return sorted(out, key=lambda r: r["age_days"])


def runs_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no runs"
    lines = [f"{'RUN':<28} {'KIND':<9} {'STATUS':<10} {'TIER':<7} {'SIZE':>9} {'AGE':>7}  BEST"]
    for r in rows:
        best = r["best"]
        shown = f"{best['name']}={best['value']:.4g}" if best else "-"
        if r.get("error"):
            shown = f"error: {r['error']}"  # a person reading the table sees why the row is empty
        lines.append(f"{r['run']:<28} {r['kind'] or '-':<9} {r['status'] or '-':<10} {r['tier']:<7} "
                     f"{r['size']:>9} {r['age_days']:>6.1f}d  {shown}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Front matter


def front_matter(fields: dict[str, Any]) -> str:
    body = "\n".join(f"{k}: {json.dumps(v)}" for k, v in fields.items())
    return f"{FRONT}\n{body}\n{FRONT}\n"


def parse_front_matter(text: str) -> dict[str, Any]:
    lines = text.splitlines()
    if not lines or lines[0].strip() != FRONT:
        return {}
    out: dict[str, Any] = {}
    for line in lines[1:]:
        if line.strip() == FRONT:
            return out
        key, sep, value = line.partition(":")
        if sep:
            try:
                out[key.strip()] = json.loads(value.strip())
            except json.JSONDecodeError:
                out[key.strip()] = value.strip()
    return {}  # no closing marker: not front matter


def slugify(text: str, limit: int = 60) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if len(slug) > limit:  # cut at a word boundary
        slug = slug[:limit + 1].rsplit("-", 1)[0] if "-" in slug[:limit + 1] else slug[:limit]
    return slug.strip("-") or "finding"


def today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")


# --------------------------------------------------------------------------------------------
# Findings


def findings_dir() -> Path:
    return docs_root() / "findings"


def finding_for_job(job: str, started: str | None = None) -> Path | None:
    """The finding already written from this job's ablation. Job ids restart with a new queue
    database, so a finding also records when its ablation started: the same id from another
    queue (another start time) is another job."""
    d = findings_dir()
    if not d.is_dir():
        return None
    for p in sorted(d.glob("*.md")):
        fm = parse_front_matter(p.read_text())
        if str(fm.get("job")) != str(job):
            continue
        theirs = fm.get("ablation_started")
        if started is None or theirs == started:
            return p
        if theirs is None and str(fm.get("date", "")) >= started[:10]:
            return p  # written before findings recorded the start, but not before this run began
    return None


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    if v is None:
        raise ValueError("TOML has no null")
    return json.dumps(str(v))


def spec_to_toml(spec: dict[str, Any]) -> str:
    """An ablation spec as the TOML file `lab ablate --spec` reads (arms as [[arms]] tables);
    empty strings and None are left out (they mean "the default")."""
    lines = [f"{k} = {toml_value(v)}" for k, v in spec.items()
             if k != "arms" and v not in (None, "") and not isinstance(v, dict)]
    for k, v in spec.items():
        if isinstance(v, dict) and v:
            lines += ["", f"[{k}]"] + [f"{kk} = {toml_value(vv)}" for kk, vv in v.items() if vv is not None]
    for arm in spec.get("arms", []):
        lines += ["", "[[arms]]"] + [f"{k} = {toml_value(v)}" for k, v in arm.items() if v is not None]
    return "\n".join(lines) + "\n"


def arm_differences(arms: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """Keys whose value differs between arms (arch, n_steps, each `set` override), with each
    arm's value; what the ablation actually varied."""
    flat = []
    for arm in arms:
        d = {k: v for k, v in arm.items() if k not in ("name", "set")}
        d.update({f"set.{k}": v for k, v in (arm.get("set") or {}).items()})
        flat.append(d)
    keys = sorted({k for d in flat for k in d})
    rows = []
    for k in keys:
        values = [json.dumps(d.get(k)) if k in d else "(default)" for d in flat]
        if len(set(values)) > 1:
            rows.append((k, values))
    return rows


def config_differences(configs: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """Resolved config keys (`model.d_model`, `train.lr`, ...) whose value differs between arms."""
    flat = [{f"{sec}.{k}": v for sec, vals in c.items() if isinstance(vals, dict) for k, v in vals.items()}
            for c in configs]
    keys = sorted({k for d in flat for k in d})
    out = []
    for k in keys:
        values = [json.dumps(d.get(k)) for d in flat]
        if len(set(values)) > 1:
            out.append((k, values))
    return out


# Names and values in a finding come from an ablation record: arm and task names, the primary
# cell, the verdict line and the spec's own values (`why`, ...), all written by whoever wrote the
# spec (an issue, maybe) and, in records older than the harness's name check, not even plain
# names. None is trusted to be markdown: the rule is common.md_untrusted's, as in the bridge.


def _text(v: Any) -> str:
    """A record's value as escaped prose (a table cell too: `|` is escaped)."""
    return md_untrusted(v, code=False)


def _code(v: Any) -> str:
    """A record's value shown as code: a code span when plain, else escaped text in <code>."""
    return md_untrusted(v, code=True)


def _fence(text: str, lang: str) -> list[str]:
    return md_fence(text, lang).split("\n")


def _sh_quote(arg: str) -> str:
    """One shell word, always single-quoted (a `'` inside is closed, escaped and reopened), so a
    value from the spec cannot end the quote and add a command to the reproduce line."""
    return "'" + arg.replace("'", "'\\''") + "'"


def _fmt(v: Any, digits: int = 3) -> str:
    n = _num(v)
    return "-" if n is None else f"{n:.{digits}f}"


def _diff_of(arm: dict[str, Any]) -> tuple[Any, Any, Any]:
    """The paired difference against the baseline, wherever the harness put it."""
    d = arm.get("diff") or arm.get("paired") or arm.get("vs_baseline") or {}
    if isinstance(d, dict) and d:
        return (d.get("mean", d.get("diff")), d.get("ci_low"), d.get("ci_high"))
    return (arm.get("diff_mean", arm.get("diff")), arm.get("diff_ci_low"), arm.get("diff_ci_high"))


def _claim(abl: dict[str, Any], spec: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    baseline = spec.get("baseline") or abl.get("baseline")
    arms = abl.get("arms", [])
    # The harness's overall verdict is that of the first arm that is not the baseline: the idea
    # under test; any other arms are context with verdicts of their own (in the table).
    subject = next((a for a in arms if a.get("name") != baseline and a.get("verdict") != "baseline"), None)
    task = spec.get("task_dir") or spec.get("task") or abl.get("task") or "the task"
    split = abl.get("primary") or spec.get("primary") or "the primary cell"
    if subject is None:
        return f"Verdict {_code(abl['verdict'])} on {_text(task)} (primary cell {_code(split)}).", None
    d, lo, hi = _diff_of(subject)
    diff = f" (paired difference {_fmt(d)}, 95% CI [{_fmt(lo)}, {_fmt(hi)}])" if _num(d) is not None else ""
    words = {"better": "beats", "worse": "is worse than"}
    word = words.get(str(subject.get("verdict")), "does not separate from")
    seeds = len(subject.get("per_seed") or []) or spec.get("seeds", "?")
    claim = (f"{_code(subject['name'])} {word} the baseline {_code(baseline)} on {_text(task)}, primary cell "
             f"{_code(split)}{diff}, over {_text(seeds)} seeds: verdict **{_text(subject.get('verdict'))}**.")
    if abl.get("verdict_line"):
        claim += f" The harness's verdict line: {_code(abl['verdict_line'])}."
    return claim, subject


def _evidence_context(abl: dict[str, Any]) -> list[str]:
    """What a reviewer checks next to the numbers: what is not matched, the trivial baselines,
    overlap, and each arm's depth x difficulty grid on the primary split."""
    out: list[str] = []
    cell = abl.get("primary_cell") or {}
    split, bucket = cell.get("split"), cell.get("bucket", "all")
    for a in abl.get("arms", []):
        m = a.get("matching")
        if m:
            bad = [f"{_text(k)} {v['ratio']:.2f}x" for k, v in m.items() if not v.get("matched")]
            good = [f"{_text(k)} {v['ratio']:.2f}x" for k, v in m.items() if v.get("matched")]
            out.append(f"- {_text(a['name'])} vs baseline: matched {', '.join(good) or 'nothing'}; "
                       f"not matched: {', '.join(bad) or 'nothing'}")
    if out:
        out = ["", f"What is matched (within {abl.get('match_ratio', 1.5)}x) and what is not:", "", *out]
    base = (abl.get("baselines") or {}).get(split) or {}
    if base:
        out += ["", f"Trivial baselines and references on {_code(split)} / {_code(bucket)}: "
                + ", ".join(f"{_text(k)} {_fmt(v.get(bucket))}" for k, v in base.items()) + "."]
    if abl.get("overlap"):
        found = [f"{_text(s)} {_text(o.get('in_train'))}/{_text(o.get('lines'))}"
                 for s, o in abl["overlap"].items()]
        out += ["", "Test lines found in the training stream: " + ", ".join(found) + "."]
    if abl.get("deepest_trained") is not None:
        out += ["", f"Trained on difficulty <= {_text(abl['deepest_trained'])}; never trained: "
                f"{', '.join(_text(b) for b in abl.get('never_trained') or []) or 'none'}."]
    arms = [a for a in abl.get("arms", []) if split in (a.get("grid") or {})]
    if arms:
        rows = [r for a in arms for r in a["grid"][split].values()]
        cols = ["all", *[b for b in rows[0] if b != "all" and any(r.get(b) is not None for r in rows)]]
        out += ["", f"Depth x difficulty on {_code(split)} (mean over seeds; ← the depth the verdict reads):",
                "", "| arm | depth | " + " | ".join(_text(c) for c in cols) + " |",
                "|---|---:|" + "---:|" * len(cols)]
        for a in arms:
            for d, row in a["grid"][split].items():
                arrow = " ←" if str(a.get("read_depth")) == str(d) else ""
                cells = " | ".join(_fmt(row.get(c)) for c in cols)
                out.append(f"| {_text(a['name'])} | {_text(d)}{arrow} | {cells} |")
    return out


def _limits(abl: dict[str, Any], spec: dict[str, Any], subject: dict[str, Any] | None) -> list[str]:
    """The limits a reader must keep in mind, derived from the record (not written by hand)."""
    arms = abl.get("arms", [])
    base = next((a for a in arms if a.get("verdict") == "baseline"), None)
    out = []
    means = [_num(a.get("mean")) for a in (subject, base) if a]
    if means and all(m is not None and m >= 0.99 for m in means):
        out.append("- Both arms of the verdict are at ceiling on the primary cell: at this budget the task "
                   "cannot separate them, whatever their architectures could do on a harder one.")
    best = abl.get("best_trivial") or {}
    if best and means and all(m is not None and m <= float(best.get("value", 0)) + 0.05 for m in means):
        out.append("- Both arms of the verdict are within 0.05 of the trivial baseline "
                   f"{_text(best.get('name'))}: neither learned the cell beyond a shortcut.")
    bad = [k for k, v in ((subject or {}).get("matching") or {}).items() if not v.get("matched")]
    if bad:
        out.append(f"- Not matched between the two arms: {', '.join(_text(b) for b in bad)} (over "
                   f"{abl.get('match_ratio', 1.5)}x); the difference, or its absence, may come from them.")
    cell = abl.get("primary_cell") or {}
    if cell.get("bucket") in (abl.get("never_trained") or []):
        out.append(f"- The primary bucket {_code(cell.get('bucket'))} was never trained: the cell measures "
                   "extrapolation in difficulty, on this task only.")
    steps, task = spec.get("steps") or "the preset's", spec.get("task_dir") or spec.get("task")
    out.append(f"- One task ({_code(task)}), one budget ({_text(steps)} steps, preset "
               f"{_code(spec.get('preset'))}), {_text(spec.get('seeds'))} seeds, CPU fp32; it says nothing "
               "yet of other tasks, longer training or the `rtx2060` scale.")
    return out


def finding_markdown(job: str, title: str, abl: dict[str, Any],
                     supersedes: str | None = None) -> tuple[dict[str, Any], str]:
    spec = abl.get("spec") or {}
    claim, subject = _claim(abl, spec)
    fm = {"job": job, "title": title, "date": today(), "ablation_started": abl.get("started"),
          "verdict": abl["verdict"],
          "arm": subject.get("name") if subject else None, "baseline": spec.get("baseline"),
          "git_commit": abl.get("git_commit"), "created_at": utc_now()}
    if supersedes:
        fm["supersedes"] = supersedes
    split = abl.get("primary") or spec.get("primary") or "the primary cell"
    lines = [front_matter(fm), f"# {title}", ""]
    if supersedes:
        lines += [f"> Supersedes [{Path(supersedes).name}]({Path(supersedes).name}).", ""]
    lines += [f"**Claim.** {claim}", "", "## Evidence", "",
              f"Accuracy on the primary cell {_code(split)} (chosen before the run): the mean over seeds "
              f"with its {abl.get('confidence', 0.95):.0%} interval, and the paired difference against the "
              "baseline.", "",
              "| arm | params | distinct blocks | train FLOPs/token | read depth | mean | 95% CI "
              "| diff vs baseline (95% CI) | p (Holm) | per seed | verdict |",
              "|---|---:|---:|---:|---:|---:|---|---|---:|---|---|"]
    for a in abl.get("arms", []):
        d, lo, hi = _diff_of(a)
        diff = f"{_fmt(d)} [{_fmt(lo)}, {_fmt(hi)}]" if _num(d) is not None else "-"
        p_holm = _fmt((a.get("diff") or {}).get("p_holm"))
        seeds = ", ".join(_fmt(s) for s in a.get("per_seed") or [])
        flops = _num(a.get("flops_per_token"))
        interval = f"[{_fmt(a.get('ci_low'))}, {_fmt(a.get('ci_high'))}]"
        lines.append(f"| {_text(a.get('name'))} | {_text(a.get('params', '-'))} | "
                     f"{_text(a.get('distinct_blocks', '-'))} | {f'{flops:.3g}' if flops else '-'} | "
                     f"{_text(a.get('read_depth', '-'))} | {_fmt(a.get('mean'))} | {interval} | {diff} | "
                     f"{p_holm} | {seeds} | {_text(a.get('verdict', '-'))} |")
    lines += _evidence_context(abl)
    lines += ["", "## What this cannot show", "", *_limits(abl, spec, subject)]
    min_effect = abl.get("min_effect", config.ABLATION.min_effect)
    holm = " (Holm-corrected over the tested arms)" if abl.get("correction") == "holm" else ""
    lines += ["", "## Verdict", "",
              f"Overall verdict: **{_text(abl['verdict'])}**. The rule: `better` only when the paired "
              f"difference against the baseline is significant at 95%{holm} and the mean difference is at "
              f"least the minimum effect ({min_effect}); `worse` is the mirror; anything else is "
              "`inconclusive`. The ablation's verdict is that of its first arm other than the baseline.",
              "", "## What differs between the arms", ""]
    names = [a.get("name", "?") for a in spec.get("arms", [])]
    diffs = arm_differences(spec.get("arms", []))
    configs = abl.get("configs")
    if isinstance(configs, list) and len(configs) == len(names):
        diffs += [(k, v) for k, v in config_differences(configs) if k not in {d[0] for d in diffs}]
    if diffs:
        lines += ["The arm keys and every resolved config value that differs:", "",
                  "| key | " + " | ".join(_text(n) for n in names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {_text(k)} | " + " | ".join(_text(v) for v in vals) + " |" for k, vals in diffs]
    else:
        lines.append("(the spec records no per-arm difference)")
    common = {k: v for k, v in spec.items() if k != "arms" and v not in (None, "")}
    if common:
        lines += ["", "Shared by every arm: " + ", ".join(_code(f"{k} = {toml_value(v)}")
                                                         for k, v in common.items()) + "."]
    lines += ["", "## Reproduce", "", "Save the spec as `spec.toml`, then queue it (or run it in the "
              "foreground with `lab ablate --spec spec.toml`):", "", *_fence(spec_to_toml(spec), "toml"),
              "", *_fence("lab submit ablation --lane cpu " + " ".join(
                  f"--set {_sh_quote(f'{k}={toml_value(v)}')}" for k, v in spec.items()
                  if v not in (None, "")), "sh"),
              "", "## Provenance", "",
              f"- job: `{job}`" + (f" (`lab show {job} --json`)" if job.isdigit() else "")
              + f"; run directory `{runs_root() / job}`",
              f"- git commit: {_code(abl.get('git_commit', 'unknown'))}"]
    versions = abl.get("versions") or abl.get("package_versions")
    if isinstance(versions, dict):
        lines.append("- packages: " + ", ".join(f"{_text(k)} {_text(v)}" for k, v in versions.items()))
    return fm, "\n".join(lines) + "\n"


def write_finding(job: str, title: str, supersedes: str | None = None) -> dict[str, Any]:
    """Write docs/findings/YYYY-MM-DD-<slug>.md from runs/<job>/ablation.json; refuse a job
    without a verdict or one that already has a finding. `supersedes` names an older finding
    (a file in docs/findings): both get a link to the other; nothing is deleted."""
    if not title.strip():
        raise config.ConfigError("--title: a finding needs a title")
    old = None
    if supersedes:
        old = findings_dir() / Path(supersedes).name
        if not old.is_file():
            raise config.ConfigError(f"--supersedes: no finding {Path(supersedes).name} in {findings_dir()}")
    run_dir, _tier = locate_run(job)
    abl = read_ablation(run_dir)
    if abl is None:
        raise RecordError(f"job {job}: no ablation.json in {run_dir}; a finding needs a finished ablation")
    if abl.get("verdict") not in ("better", "worse", "inconclusive"):
        raise RecordError(f"job {job}: ablation.json has no verdict (got {abl.get('verdict')!r}); "
                          "wait for the ablation to finish")
    existing = finding_for_job(job, abl.get("started"))
    if existing is not None:
        raise RecordError(f"job {job} already has a finding: {existing}")
    fm, text = finding_markdown(job, title.strip(), abl, old.name if old else None)
    path = findings_dir() / f"{today()}-{slugify(title)}.md"
    n = 2
    while path.exists():  # two findings with one title on one day: keep both, never overwrite
        path = findings_dir() / f"{today()}-{slugify(title)}-{n}.md"
        n += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if old is not None:
        mark_superseded(old, path)
    return {**fm, "path": str(path)}


def mark_superseded(old: Path, new: Path) -> None:
    """Add `superseded_by` to an old finding's front matter and a banner under its title."""
    text = old.read_text()
    fm = parse_front_matter(text)
    body = text.split(FRONT, 2)[2].lstrip("\n") if fm else text
    fm["superseded_by"] = new.name
    heading, _, rest = body.partition("\n")
    banner = f"> **Superseded** by [{new.name}]({new.name}): read that finding instead."
    old.write_text(front_matter(fm) + "\n" + heading + "\n\n" + banner + "\n" + rest)


# --------------------------------------------------------------------------------------------
# Model cards


def registry_dir() -> Path:
    return docs_root() / "registry"


def _checkpoint(run_dir: Path) -> Path | None:
    for name in ("ckpt_best.pt", "ckpt_last.pt"):
        if (run_dir / name).is_file():
            return run_dir / name
    return None


def _param_count(run_cfg: dict[str, Any], logv: dict[str, str], ckpt: Path) -> int:
    for src in (run_cfg, logv):
        for key in ("params", "n_params", "num_params", "param_count"):
            n = _num(src.get(key))
            if n:
                return int(n)
    # Count from the checkpoint itself (mmap: no need to read the whole file).
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    model = state.get("model", state) if isinstance(state, dict) else state
    return int(sum(t.numel() for t in model.values() if hasattr(t, "numel")))


def task_grid_lines(result: dict[str, Any], beside: dict[str, Any] | None = None,
                    beside_job: Any = None) -> list[str]:
    """A task run's depth x difficulty grid as markdown tables, one per split (the primary's
    split first), each cell the full run's accuracy and, in brackets, that of the ablation arm
    it scales (`beside`: the arm's entry of the ablation's result, its `grid` the mean over
    seeds). Empty for a run without a grid."""
    grid = result.get("grid")
    if not isinstance(grid, dict) or not grid:
        return []
    depths = sorted(grid, key=lambda d: int(d) if str(d).isdigit() else 0)
    splits = list(next(iter(grid.values())) or {})
    primary = (result.get("primary") or {}).get("cell") or ""
    first = primary.split(":")[0].split("@")[0]
    splits.sort(key=lambda sp: sp != first)
    theirs = (beside or {}).get("grid") or {}
    lines: list[str] = []
    if beside:
        lines += [f"Each cell: the full run's accuracy, and in brackets the ablation arm "
                  f"{_code(beside.get('name'))}'s (job {_text(beside_job)}, mean over its seeds) where it "
                  "was measured at that depth.", ""]
    for split in splits:
        cells = list(grid[depths[0]].get(split) or {})
        lines += [f"Split {_code(split)}: difficulty bucket (rows) x test depth (columns)", "",
                  "| bucket | " + " | ".join(_text(d) for d in depths) + " |",
                  "|---|" + "---:|" * len(depths)]
        for c in cells:
            row = []
            for d in depths:
                mine = _fmt((grid[d].get(split) or {}).get(c))
                other = ((theirs.get(split) or {}).get(str(d)) or {}).get(c)
                row.append(mine + (f" ({_fmt(other)})" if _num(other) is not None else ""))
            lines.append(f"| {_text(c)} | " + " | ".join(row) + " |")
        lines.append("")
    return lines


def earning_arm(result: dict[str, Any], earned_by: Any) -> tuple[dict[str, Any] | None, Any]:
    """The ablation arm a task run scales (its result's `arm`, in the earning ablation's
    result), or (None, None) when the queue does not know it."""
    if earned_by is None or not result.get("arm"):
        return None, None
    row = _job_row(str(earned_by))
    arms = ((row or {}).get("result") or {}).get("arms") or []
    return next((a for a in arms if a.get("name") == result["arm"]), None), earned_by


def write_card(job: str, name: str) -> dict[str, Any]:
    """Write docs/registry/NAME.md for a finished training run (it must have a checkpoint)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}", name):
        raise config.ConfigError(f"--name: {name!r} must be letters, digits, '.', '_' or '-' (max 80)")
    path = registry_dir() / f"{name}.md"
    if path.exists():
        raise RecordError(f"card {name} already exists: {path}")
    run_dir, tier = locate_run(job)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise RecordError(f"job {job}: no config.json in {run_dir}; a card needs a training run")
    ckpt = _checkpoint(run_dir)
    if ckpt is None:
        raise RecordError(f"job {job}: no checkpoint (ckpt_best.pt / ckpt_last.pt) in {run_dir}")
    row = _job_row(job)
    status = row.get("status") if row else _status_from_files(run_dir)
    if status != "succeeded":
        raise RecordError(f"job {job} is {status or 'unfinished'}; a card needs a succeeded training run")
    run_cfg = _read_json(cfg_path)
    resolved = run_cfg.get("config", run_cfg)
    model = resolved.get("model", {})
    logv = log_values(run_dir / "log.txt")
    metrics = read_metrics(run_dir / "metrics.jsonl")
    best = best_metric(run_dir)
    last = next((r for r in reversed(metrics) if "val_loss" in r), metrics[-1] if metrics else {})
    params = _param_count(run_cfg, logv, ckpt)
    sha = archive.sha256_file(ckpt)
    data = run_cfg.get("data") or logv.get("data") or "see config.json"
    if isinstance(data, dict):
        data = (f"dataset `{data.get('name')}`: {data.get('tokens', 0):,} tokens, tokenizer "
                f"`{data.get('tokenizer')}` (`{data.get('dir')}`)")
    hot_ckpt = runs_root() / job / ckpt.name
    fm = {"name": name, "job": job, "arch": model.get("arch"), "preset": resolved.get("name"),
          "params": params, "checkpoint": str(hot_ckpt), "checkpoint_bytes": ckpt.stat().st_size,
          "sha256": sha, "tier": tier, "best_val_loss": best["value"] if best else None,
          "git_commit": run_cfg.get("git_commit"), "created_at": utc_now()}
    lines = [front_matter(fm), f"# {name}", "",
             f"A `{model.get('arch')}` model trained by job `{job}` (preset `{resolved.get('name')}`), "
             f"{params:,} parameters.", "",
             "## Architecture", "", "| key | value |", "|---|---|"]
    lines += [f"| {k} | {json.dumps(v)} |" for k, v in model.items()]
    lines += ["", "## Data", "", str(data), "",
              "## Metrics", "", "| metric | value |", "|---|---|"]
    if best:
        lines.append(f"| best {best['name']} | {best['value']:.4f} (step {best.get('step', '-')}) |")
    lines += [f"| step {last.get('step')} {k} | {v} |" for k, v in last.items()
              if k not in ("time", "event", "step")]
    lines += [f"| {k} (log) | {v} |" for k, v in logv.items()]
    result = (row or {}).get("result") or {}
    grid = task_grid_lines(result, *earning_arm(result, (row or {}).get("earned_by")))
    if grid:
        cell = result.get("primary") or {}
        lines += ["", "## Task grid", "",
                  f"Trained and measured on task {_code(result.get('task'))}; primary cell "
                  f"{_code(cell.get('cell'))}: {_fmt(cell.get('accuracy'))}. Trivial baselines on it: "
                  + (", ".join(f"{_text(k)} {_fmt(v)}" for k, v in (result.get("trivial") or {}).items())
                     or "-") + ".", "", *grid]
    lines += ["", "## Checkpoint", "", f"- path: `{hot_ckpt}` ({human_bytes(ckpt.stat().st_size)})",
              f"- sha256: `{sha}`", f"- storage tier when registered: {tier} "
              f"(`lab restore {job}` brings a cold run back)", "",
              "## Resolved config", "", "```json", json.dumps(resolved, indent=2), "```", "",
              "## Provenance", "", f"- job: `{job}`",
              f"- git commit: `{run_cfg.get('git_commit', 'unknown')}`"]
    versions = run_cfg.get("versions") or run_cfg.get("package_versions")
    if isinstance(versions, dict):
        lines.append("- packages: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return {**fm, "path": str(path)}


def list_cards() -> list[dict[str, Any]]:
    """Every card's front matter, with the checkpoint's current tier (it may have moved since)."""
    d = registry_dir()
    cards = []
    for p in sorted(d.glob("*.md")) if d.is_dir() else []:
        fm = parse_front_matter(p.read_text())
        if not fm.get("name"):
            continue
        try:
            _run_dir, fm["tier"] = locate_run(str(fm.get("job")))
        except (FileNotFoundError, config.ConfigError):
            fm["tier"] = "missing"
        except archive.ArchiveError:  # a damaged pointer: one card must not hide the others
            fm["tier"] = "unknown"
        cards.append({**fm, "path": str(p)})
    return cards


def cards_table(cards: list[dict[str, Any]]) -> str:
    if not cards:
        return "no cards"
    lines = [f"{'NAME':<24} {'ARCH':<9} {'PARAMS':>10} {'VAL_LOSS':>9} {'TIER':<7} JOB"]
    for c in cards:
        vl = c.get("best_val_loss")
        lines.append(f"{c['name']:<24} {c.get('arch') or '-':<9} {c.get('params') or 0:>10,} "
                     f"{vl if vl is None else f'{vl:.4f}':>9} {c['tier']:<7} {c.get('job')}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Archiving many runs (the `archive` job kind and `lab archive`)




def select_old_runs(older_than_days: float, exclude: frozenset[str] = frozenset()) -> list[str]:
    """Hot runs whose job finished (or that the queue does not know) and whose newest file is
    older than N days. Runs the queue says are still active are never chosen."""
    return _select_old_runs(older_than_days, exclude)[0]


def _select_old_runs(older_than_days: float,
                     exclude: frozenset[str]) -> tuple[list[str], list[dict[str, str]]]:
    """(the runs select_old_runs chooses, the runs it had to skip with the reason). A run whose
    pointer cannot be read is skipped: its files may be half in the archive, and only a person
    can tell; one such run must not stop the others from being archived."""
    root = runs_root()
    chosen, skipped = [], []
    now = time.time()
    rows = _job_rows()
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if not p.is_dir() or p.name.startswith(".") or p.name in NOT_RUNS or p.name in exclude:
            continue
        try:
            if archive.read_pointer(p):
                continue
        except (archive.ArchiveError, OSError) as e:
            skipped.append({"run": p.name, "reason": str(e)})
            continue
        if rows.get(p.name, {}).get("status") in ACTIVE:
            continue
        if archive.run_age_days(p, now) >= older_than_days:
            chosen.append(p.name)
    return chosen, skipped


def archive_runs(names: list[str], older_than_days: float | None = None,
                 exclude: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Archive named runs and/or old finished ones. One run's failure does not stop the others;
    each is reported. A named run the queue says is active is refused. `skipped`: runs the age
    rule passed over because their pointer cannot be read (a named one is `failed` instead)."""
    todo = list(dict.fromkeys(names))
    skipped: list[dict[str, str]] = []
    if older_than_days is not None:
        old, skipped = _select_old_runs(older_than_days, exclude)
        todo += [n for n in old if n not in todo]
    done, failed = [], []
    for name in todo:
        row = _job_row(name)
        if row and row.get("status") in ACTIVE:
            failed.append({"run": name, "error": f"job {name} is {row['status']}; archive it when it ends"})
            continue
        try:
            summary = summarize_run(name)
            info = archive.archive_run(name, summary={k: summary[k] for k in ("kind", "status", "best")})
            done.append(info)
        except (archive.ArchiveError, RecordError, FileNotFoundError, OSError, config.ConfigError) as e:
            failed.append({"run": name, "error": str(e)})
    return {"archived": done, "failed": failed, "skipped": skipped,
            "bytes_moved": sum(d.get("bytes", 0) for d in done if not d.get("already_archived"))}
