"""What the dashboard shows, read from the same store, run directories and docs as `lab status`,
`lab next`, `lab jobs`, `lab show`, `lab runs` and `lab registry`: the same service functions
where they exist, so a page never disagrees with the CLI. Nothing here writes anything."""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import func, inspect, select

import records
from bridge import github
from daemon import attention, service
from daemon.pipeline import list_views
from store import ACTIVE, STATUSES, Store, iso, public
from store import jobs as jobs_table

LOG_TAIL_LINES = 15
PAGE_SIZE = 50
# A run's files the job page links to are capped: a dashboard must not stream a 2 GB checkpoint.
MAX_FILE_BYTES = 5_000_000
TEXT_SUFFIXES = {".txt", ".json", ".jsonl", ".md", ".toml", ".log", ".csv"}
IMAGE_SUFFIXES = {".png"}


def open_store() -> Store:
    # As `lab status` opens it: a new LAB_DB gets the (empty) tables, so the pages show an empty
    # queue instead of failing; no row is ever written.
    return service.open_store()


# --- the overview ------------------------------------------------------------------------------


def log_tail(run_dir: str | None, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a run's log.txt, read from the end (a long run's log may be large)."""
    if not run_dir:
        return ""
    path = Path(run_dir) / "log.txt"
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16_384))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def waiting_reason(job: dict[str, Any], store: Store, paused: str | None,
                   nobody: dict[tuple[str, str | None], str | None]) -> str:
    """Why a queued or blocked job does not run yet, in the words `lab status`/`lab next` use.
    `nobody` caches service.no_daemon_for per (lane, host): one answer serves every job there."""
    if job.get("held"):
        return f"held: {job['held']}"
    if job["status"] == "blocked" and job.get("after_id"):
        dep = store.get(job["after_id"])
        state = dep["status"] if dep else "missing"
        return f"waits for job {job['after_id']} to succeed (it is {state})"
    if paused:
        return paused
    key = (job["lane"], job.get("want_host"))
    if key not in nobody:
        nobody[key] = service.no_daemon_for(job, store)
    if nobody[key]:
        return re.sub(r"^job \d+ is still \w+ and ", "", nobody[key])  # the first job's id is in it
    if job.get("want_host"):
        return f"queued for host {job['want_host']}"
    return f"queued on the {job['lane']} lane"


class Stale:
    """A slow read kept fresh in the background: get() returns the last value at once and, when
    it is older than `ttl` seconds, starts one recompute on a thread. Only the first call waits.
    For `lab next` (attention.needs_attention reads every failed job and finding: ~150 ms on a
    store of 10,000 jobs), which does not need to be fresher than a few seconds."""

    def __init__(self, compute: Callable[[], Any], ttl: float):
        self.compute, self.ttl = compute, ttl
        self.value: Any = None
        self.at = 0.0
        self.lock = threading.Lock()
        self.busy = False

    def _refresh(self) -> None:
        try:
            value = self.compute()
            with self.lock:
                self.value, self.at = value, time.monotonic()
        finally:
            self.busy = False

    def get(self) -> Any:
        with self.lock:
            first, stale = self.at == 0.0, time.monotonic() - self.at > self.ttl
            start = stale and not self.busy and not first
            if start:
                self.busy = True
        if first:
            self._refresh()
        elif start:
            threading.Thread(target=self._refresh, name="lab-serve-refresh", daemon=True).start()
        return self.value


def overview(store: Store, attention_list: Callable[[], dict[str, Any]] | None = None,
             waiting_limit: int = 50) -> dict[str, Any]:
    st = service.status(store)
    paused = next((lane["paused"] for lane in st["lanes"].values() if lane["paused"]), None)
    running = []
    for j in store.list_jobs(("running",)):
        p = public(j)
        p["log_tail"] = log_tail(j["run_dir"])
        p["bar"] = progress_bar(j.get("progress"))
        running.append(p)
    waiting = []
    nobody: dict[tuple[str, str | None], str | None] = {}
    for j in store.list_jobs(("queued", "blocked"), limit=waiting_limit):  # oldest first: next to run
        p = public(j)
        p["why"] = waiting_reason(j, store, paused, nobody)
        waiting.append(p)
    waits = sum(lane["queued"] + lane["blocked"] for lane in st["lanes"].values())
    nxt = attention_list() if attention_list is not None else attention.needs_attention(store)
    return {"status": st, "running": running, "waiting": waiting,
            "waiting_more": max(0, waits - len(waiting)), "next": nxt, "bridge": bridge_state(store),
            "paused": paused, "now": iso(time.time())}


def bridge_state(store: Store) -> dict[str, Any] | None:
    """bridge.github.status_summary, only when the bridge's tables exist: its Outbox creates
    them, and a read-only page must not change the schema of a queue no bridge ever ran on."""
    if not inspect(store.engine).has_table("lab_outbox"):
        return None
    return github.status_summary(store)


def progress_bar(p: dict[str, Any] | None) -> dict[str, Any] | None:
    """step/total as a fraction, ETA and the latest metrics, for a <progress> element."""
    if not p or not p.get("total"):
        return None
    step, total = p.get("step") or 0, p["total"]
    metrics = {k: v for k, v in (p.get("metrics") or {}).items() if v is not None}
    return {"step": step, "total": total, "percent": round(100 * min(1.0, step / total), 1),
            "eta_s": p.get("eta_s"), "metrics": metrics, "at": p.get("at")}


# --- jobs --------------------------------------------------------------------------------------


def job_page(store: Store, *, status: str | None = None, kind: str | None = None, lane: str | None = None,
             issue: int | None = None, page: int = 1, size: int = PAGE_SIZE) -> dict[str, Any]:
    """One page of `lab jobs`, newest first, with the total: LIMIT/OFFSET and COUNT in SQL, so a
    store of 10,000 jobs costs one page's rows, not all of them (service.list_jobs reads every
    row it filters; fine for a CLI, not for a page reloaded every few seconds)."""
    where = []
    if status in ("active", "final"):
        where.append(jobs_table.c.status.in_(ACTIVE if status == "active" else ("succeeded", "failed",
                                                                                  "cancelled")))
    elif status:
        where.append(jobs_table.c.status == status)
    if kind:
        where.append(jobs_table.c.kind == kind)
    if lane:
        where.append(jobs_table.c.lane == lane)
    if issue is not None:
        where.append(jobs_table.c.issue == issue)
    page = max(1, page)
    cols = [jobs_table.c[k] for k in ("id", "kind", "lane", "status", "priority", "progress", "host",
                                      "created_at", "started_at", "finished_at", "error", "after_id",
                                      "issue", "attempts", "held")]
    with store.reading() as c:
        total = c.execute(select(func.count()).select_from(jobs_table).where(*where)).scalar_one()
        rows = c.execute(select(*cols).where(*where).order_by(jobs_table.c.id.desc())
                         .limit(size).offset((page - 1) * size)).mappings().all()
    out = []
    for r in rows:
        p = public(dict(r))
        p["bar"] = progress_bar(r["progress"])
        out.append(p)
    pages = max(1, math.ceil(total / size))
    return {"jobs": out, "total": total, "page": page, "pages": pages, "size": size,
            "filters": {"status": status or "", "kind": kind or "", "lane": lane or "",
                        "issue": "" if issue is None else str(issue)},
            # the pager's links keep the filters: `status=failed&kind=sleep&` (urlencoded)
            "query": "".join(f"{urlencode({k: v})}&" for k, v in (("status", status), ("kind", kind),
                                                                   ("lane", lane), ("issue", issue)) if v),
            "statuses": [*STATUSES, "active", "final"], "kinds": sorted(_kinds()), "lanes": ["gpu", "cpu"]}


def _kinds() -> list[str]:
    import jobs

    return list(jobs.kind_names())


def run_files(run_dir: str | None) -> list[dict[str, Any]]:
    if not run_dir or not Path(run_dir).is_dir():
        return []
    out = []
    for p in sorted(Path(run_dir).iterdir()):
        if not p.is_file():
            continue
        size = p.stat().st_size
        viewable = p.suffix in TEXT_SUFFIXES | IMAGE_SUFFIXES and size <= MAX_FILE_BYTES
        out.append({"name": p.name, "bytes": size, "size": records.human_bytes(size), "viewable": viewable,
                    "image": p.suffix in IMAGE_SUFFIXES})
    return out


def run_file(run_dir: str | None, name: str) -> Path | None:
    """A file of the run directory by its name, or None: resolved and kept inside the run dir (no
    `..`, no symlink out of it), of a kind the page shows and not too large."""
    if not run_dir or "/" in name or name.startswith("."):
        return None
    root = Path(run_dir).resolve()
    path = (root / name).resolve()
    if path.parent != root or not path.is_file():
        return None
    if path.suffix not in TEXT_SUFFIXES | IMAGE_SUFFIXES or path.stat().st_size > MAX_FILE_BYTES:
        return None
    return path


def curves(run_dir: str | None) -> dict[str, Any]:
    """Train and validation loss (and the learning rate) from metrics.jsonl as uPlot's aligned
    columns: one x (step) and a value or null per series."""
    empty: dict[str, Any] = {"steps": [], "train": [], "val": [], "lr": []}
    if not run_dir:
        return empty
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return empty
    train: dict[int, float] = {}
    val: dict[int, float] = {}
    lr: dict[int, float] = {}
    for r in records.read_metrics(path):
        step = r.get("step")
        if not isinstance(step, int):
            continue
        if r.get("event") == "train" and _finite(r.get("loss")):
            train[step] = r["loss"]
            if _finite(r.get("lr")):
                lr[step] = r["lr"]
        elif r.get("event") == "eval" and _finite(r.get("val_loss")):
            val[step] = r["val_loss"]
    steps = sorted(set(train) | set(val))
    return {"steps": steps, "train": [train.get(s) for s in steps], "val": [val.get(s) for s in steps],
            "lr": [lr.get(s) for s in steps]}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def job_detail(store: Store, job_id: int) -> dict[str, Any]:
    job = service.show(job_id, store, events=True)
    job["bar"] = progress_bar(job.get("progress"))
    job["log_tail"] = log_tail(job.get("run_dir"), 40)
    job["files"] = run_files(job.get("run_dir"))
    job["spec_json"] = json.dumps(job.get("spec"), indent=2, sort_keys=True)
    job["result_json"] = json.dumps(job.get("result"), indent=2, sort_keys=True, default=str)
    job["ablation"] = job.get("kind") == "ablation" and bool(job.get("run_dir")) and \
        (Path(job["run_dir"]) / "ablation.json").is_file()
    return job


# --- ablations ---------------------------------------------------------------------------------


def ablation_runs(limit: int = 200) -> list[dict[str, Any]]:
    """Run directories with an ablation.json, newest first (queue jobs and foreground `lab ablate`)."""
    root = records.runs_root()
    if not root.is_dir():
        return []
    found = [(p.stat().st_mtime, p) for p in root.iterdir() if (p / "ablation.json").is_file()]
    out = []
    for mtime, p in sorted(found, reverse=True)[:limit]:
        abl = records.read_ablation(p) or {}
        out.append({"run": p.name, "task": abl.get("task"), "verdict": abl.get("verdict"),
                    "primary": abl.get("primary"), "verdict_line": abl.get("verdict_line"),
                    "at": iso(mtime)})
    return out


def _cell_class(v: float | None) -> str:
    # Ten colour steps as CSS classes: the page's CSP allows no inline style attributes.
    return "na" if v is None else f"h{min(9, max(0, int(v * 10)))}"


def ablation(run: str) -> dict[str, Any] | None:
    if "/" in run or run.startswith("."):
        return None
    run_dir = records.runs_root() / run
    raw_path = run_dir / "ablation.json"
    if not raw_path.is_file():
        return None
    raw = json.loads(raw_path.read_text())
    s = raw.get("summary") or {}
    cell = s.get("primary_cell") or {}
    split, bucket = cell.get("split"), cell.get("bucket")
    task = raw.get("task") or {}
    arms = []
    for a in s.get("arms") or []:
        grid = (a.get("grid") or {}).get(split) or {}
        depths = list(grid)
        buckets = ["all", *[b for b in task.get("buckets", []) if any(grid[d].get(b) is not None
                                                                      for d in depths)]]
        rows = [{"bucket": b, "never": b in (s.get("never_trained") or []),
                 "cells": [{"depth": d, "value": grid[d].get(b), "cls": _cell_class(grid[d].get(b)),
                            "primary": b == bucket and str(d) == str(a.get("read_depth"))}
                           for d in depths]} for b in buckets]
        arms.append({**{k: a.get(k) for k in ("name", "arch", "n_steps", "read_depth", "mean", "ci_low",
                                              "ci_high", "per_seed", "params", "distinct_blocks",
                                              "flops_per_token", "verdict", "diff")},
                     "is_baseline": a.get("name") == s.get("baseline"), "depths": depths, "rows": rows})
    matched = s.get("matched") or []
    axes = ["params", "distinct_blocks", "train_flops", "inference_flops"]
    return {"run": run, "task": task.get("name"), "verdict": s.get("verdict"),
            "verdict_line": s.get("verdict_line"), "primary": s.get("primary"), "cell": cell,
            "baseline": s.get("baseline"), "correction": s.get("correction"),
            "confidence": s.get("confidence"), "min_effect": s.get("min_effect"),
            "best_trivial": s.get("best_trivial"), "matched": matched,
            "not_matched": [x for x in axes if x not in matched], "match_ratio": s.get("match_ratio"),
            "arms": arms, "minutes": s.get("minutes"), "has_png": (run_dir / "accuracy.png").is_file(),
            "git_commit": raw.get("git_commit"), "seeds": (raw.get("spec") or {}).get("seeds")}


# --- research ----------------------------------------------------------------------------------


def docs_file(rel: str) -> Path | None:
    """A markdown file under LAB_DOCS by a relative name (ROADMAP.md, findings/x.md)."""
    root = records.docs_root().resolve()
    path = (root / rel).resolve()
    if root not in path.parents or path.suffix != ".md" or not path.is_file():
        return None
    return path


def strip_front_matter(text: str) -> tuple[dict[str, Any], str]:
    if not text.startswith("---\n"):
        return {}, text
    end = text.find("\n---", 4)
    if end < 0:
        return {}, text
    return records.parse_front_matter(text), text[end + 4:].lstrip("\n")


def findings() -> list[dict[str, Any]]:
    d = records.findings_dir()
    out = []
    for p in sorted(d.glob("*.md"), reverse=True) if d.is_dir() else []:
        fm, _ = strip_front_matter(p.read_text(errors="replace"))
        out.append({"name": p.name, "title": fm.get("title") or p.stem, "verdict": fm.get("verdict"),
                    "job": fm.get("job"), "date": p.name[:10]})
    return out


def cards() -> list[dict[str, Any]]:
    return records.list_cards()


def pipelines(store: Store) -> list[dict[str, Any]]:
    return list_views(store, limit=100)
