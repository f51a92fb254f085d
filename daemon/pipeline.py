"""An idea is one spec and one pipeline: smoke -> ablation -> full run, each stage only if the
one before earned it.

    idea spec --validate every stage--> pipeline row + smoke jobs (the idea's arm and its
    baseline build, learn, stay finite)
      --all succeeded--> ablation (the spec's arms, plus any controls the idea names)
      --verdict `better` for the idea's arm on the pre-registered primary, controls as
        expected--> full run: a `train` job of that arm at the full-run preset, on the same task,
        read on the same difficulty x depth grid, earned by the ablation (the queue's gate)
      --succeeded--> the pipeline succeeded

A stage that fails, or does not earn the next, stops the pipeline with the reason; an ablation
that did not say `better` leaves a drafted finding (runs/<job>/finding-draft.md, `lab finding`
publishes it) and a graveyard line for docs/ROADMAP.md. `rerun` starts the stage that stopped
it again; `cancel` cancels the stage that runs.

Exactly once: the scheduler calls `advance` on every tick, on every host. A decision is read
from the store (the stage's jobs are final) and written with `Store.move_pipeline`, which inserts
the next stage's jobs in the same transaction that moves the pipeline's version on; a second
process deciding the same step finds the version moved and does nothing, and a process killed
mid-decision leaves the transaction undone, so the next tick decides again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import config
import jobs
from config import ConfigError, Validated, check_nested, show
from store import ACTIVE, FINAL, PIPELINE_STAGES, Store, iso

log = logging.getLogger("lab.pipeline")

FULL_RUN_PRESET = "rtx2060_task"
_SMOKE_KEYS = ("steps",)
_FULL_KEYS = ("preset", "steps", "set", "train_max_difficulty", "eval_examples", "seconds")
_TEXT_MAX = 2000


@dataclass(frozen=True)
class IdeaSpec(Validated):
    """An idea as an issue or `lab submit idea --spec FILE.toml` states it.

    hypothesis: what the idea claims; kill: the result that would kill it (both in words, for
    the record); ablation: an ablation job's spec (`spec_file = ...` and/or its keys: arms,
    baseline, primary, task, ...), whose `primary` is the pre-registered cell; arm: the idea's
    arm in it (default: the first arm that is not the baseline); controls: instrument controls
    run beside the ablation (negative, positive); smoke: {steps}; full: {preset, steps, set (size
    keys only), train_max_difficulty, eval_examples, seconds}; ablation_lane: where the
    ablation runs (the smoke runs in the idea's lane, the full run on the GPU lane)."""

    FIELD_PREFIX = "idea"

    hypothesis: str
    kill: str
    ablation: dict
    arm: str | None = None
    controls: tuple[str, ...] = ()
    smoke: dict = field(default_factory=dict)
    full: dict = field(default_factory=dict)
    ablation_lane: str = "cpu"

    def _check_relations(self) -> None:
        for name in ("hypothesis", "kill"):
            text = getattr(self, name).strip()
            if not text:
                what = "what the idea claims" if name == "hypothesis" else "the result that would kill it"
                raise ConfigError(f"idea.{name}: say {what}, in a sentence")
            if len(text) > _TEXT_MAX:
                raise ConfigError(f"idea.{name}: {len(text)} characters (at most {_TEXT_MAX})")
        for name in ("ablation", "smoke", "full"):
            check_nested(f"idea.{name}", getattr(self, name))
        if self.ablation_lane not in jobs.LANES:
            raise ConfigError(f"idea.ablation_lane: {show(self.ablation_lane)} is not a lane "
                              f"(allowed: {', '.join(jobs.LANES)})")
        from harness.ablate import CONTROL_EXPECTED

        for c in self.controls:
            if c not in CONTROL_EXPECTED:
                raise ConfigError(f"idea.controls: {show(c)} is not a control "
                                  f"(allowed: {', '.join(CONTROL_EXPECTED)})")
        if len(set(self.controls)) != len(self.controls):
            raise ConfigError("idea.controls: a control is named twice")
        _known_keys("idea.smoke", self.smoke, _SMOKE_KEYS)
        _known_keys("idea.full", self.full, _FULL_KEYS)
        scaled = self.full.get("set", {})
        if not isinstance(scaled, dict):
            raise ConfigError(f"idea.full.set: expected a table of size keys, got {type(scaled).__name__}")
        for key in scaled:
            bare = key.split(".")[-1] if isinstance(key, str) else key
            if bare not in config.FULL_RUN_SIZE_KEYS:
                raise ConfigError(f"idea.full.set.{key}: a full run scales only size keys "
                                  f"({', '.join(sorted(config.FULL_RUN_SIZE_KEYS))}); what the idea "
                                  "changes belongs in its arm, where the ablation measures it")
        abl = resolved_ablation(self)
        names = [a.name for a in abl.arms]
        if self.arm is not None and self.arm not in names:
            raise ConfigError(f"idea.arm: {show(self.arm)} is not an arm of the ablation "
                              f"(its arms: {', '.join(names)})")
        if self.arm == abl.baseline:
            raise ConfigError(f"idea.arm: {self.arm!r} is the ablation's baseline; name the arm that "
                              "makes the change")


def _known_keys(where: str, values: dict[str, Any], known: tuple[str, ...]) -> None:
    for key in values:
        if key not in known:
            close = config.did_you_mean(str(key), known)
            raise ConfigError(f"{where}.{key}: unknown key{close} (allowed: {', '.join(known)})")


def resolved_ablation(idea: IdeaSpec) -> Any:
    """The idea's ablation as the harness will run it (harness.ablate.AblationSpec)."""
    from jobs.ablation import resolve

    spec = jobs.parse_spec("ablation", idea.ablation)
    try:
        return resolve(spec)
    except ConfigError as e:
        raise ConfigError(f"idea.{e}") from None


def idea_arm(idea: IdeaSpec) -> Any:
    abl = resolved_ablation(idea)
    name = idea.arm or next(a.name for a in abl.arms if a.name != abl.baseline)
    return next(a for a in abl.arms if a.name == name)


def parse_idea(values: Any) -> IdeaSpec:
    """Untrusted keys -> a validated IdeaSpec; ConfigError naming `idea.<field>` otherwise."""
    if not isinstance(values, dict):
        raise ConfigError(f"idea: expected a table of keys and values, got {type(values).__name__}")
    values = {k: v for k, v in values.items() if k != "kind"}
    from jobs.paths import check_spec_paths

    abl = values.get("ablation")
    if isinstance(abl, dict):
        try:
            check_spec_paths("ablation", abl)
        except ConfigError as e:
            raise ConfigError(f"idea.{e}") from None
    try:
        return config.from_mapping(IdeaSpec, values, where="idea")
    except ConfigError:
        raise
    except (TypeError, ValueError, OverflowError, RecursionError, LookupError, AttributeError) as e:
        raise ConfigError(f"idea: a value could not be validated ({type(e).__name__})") from None


def idea_dict(idea: IdeaSpec) -> dict[str, Any]:
    """The idea as the store keeps it (JSON: tuples are lists), so a stored idea compares equal
    to the same idea parsed again from its issue."""
    return json.loads(json.dumps({k: v for k, v in asdict(idea).items() if v is not None}))


def spec_hash(idea: dict[str, Any], lane: str) -> str:
    canon = json.dumps({"kind": "idea", "lane": lane, "spec": idea}, sort_keys=True, default=str)
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


# --- the stages' job specs ---------------------------------------------------------------------


def smoke_spec(idea: IdeaSpec) -> dict[str, Any]:
    abl = resolved_ablation(idea)
    arm = idea_arm(idea)
    spec: dict[str, Any] = {"ablation": abl.to_dict(), "arms": [arm.name, abl.baseline]}
    if "steps" in idea.smoke:
        spec["steps"] = idea.smoke["steps"]
    return spec


def full_spec(idea: IdeaSpec) -> dict[str, Any]:
    """The idea's arm at the full-run preset, on the ablation's task, read on its grid."""
    abl = resolved_ablation(idea)
    arm = idea_arm(idea)
    full = idea.full
    overrides = {**dict(arm.set), **dict(full.get("set", {}))}
    if "steps" in full:
        overrides["max_steps"] = full["steps"]
    if "seconds" in full:
        overrides["max_seconds"] = full["seconds"]
    spec: dict[str, Any] = {"preset": full.get("preset", FULL_RUN_PRESET), "arch": arm.arch, "arm": arm.name,
                            "set": overrides, "primary": abl.primary,
                            "eval_depths": list(abl.eval_depths),
                            "eval_examples": full.get("eval_examples", abl.eval_examples)}
    if abl.task_dir:
        spec["task_dir"] = abl.task_dir
    else:
        spec["task"] = abl.task
    if arm.n_steps is not None:
        spec["n_steps"] = arm.n_steps
    difficulty = full.get("train_max_difficulty", abl.train_max_difficulty)
    if difficulty is not None:
        spec["train_max_difficulty"] = difficulty
    return spec


def stage_rows(idea: IdeaSpec, stage: str, lane: str, *, issue: int | None, source: str,
               store: Store, held: str | None = None, earned_by: int | None = None
               ) -> list[dict[str, Any]]:
    """The jobs of `stage`, each validated and gated by admission.prepare (as `lab submit` would),
    as Store.create_pipeline / move_pipeline take them."""
    from daemon.admission import prepare

    def row(kind: str, values: dict[str, Any], lane_: str, role: str, **kw: Any) -> dict[str, Any]:
        try:
            plan = prepare(kind, values, lane=lane_, issue=issue, source=source, held=held, store=store, **kw)
        except ConfigError as e:
            raise ConfigError(f"idea.{stage}: {e}") from None
        return {**plan["row"], "role": role}

    if stage == "smoke":
        return [row("smoke", smoke_spec(idea), lane, "main")]
    if stage == "ablation":
        rows = [row("ablation", dict(idea.ablation), idea.ablation_lane, "main")]
        rows += [row("ablation", {"control": c}, idea.ablation_lane, f"control:{c}") for c in idea.controls]
        return rows
    return [row("train", full_spec(idea), "gpu", "main", earned_by=earned_by)]


# --- submitting, advancing, rerunning, cancelling ---------------------------------------------


def _open_store() -> Store:
    return Store(config.paths().db)


def submit_idea(values: Any, *, lane: str | None = None, issue: int | None = None, source: str = "cli",
                held: str | None = None, dry_run: bool = False, store: Store | None = None
                ) -> dict[str, Any]:
    """Validate the idea and every stage that can be checked now (the smoke and the ablation are
    validated and costed; the full run's spec is validated, and the gate waits for the verdict),
    then queue the pipeline with its smoke stage. `dry_run`: what would be queued."""
    from daemon.admission import cost_of

    store = store or _open_store()
    lane = jobs.check_lane("smoke", lane)
    idea = parse_idea(values)
    smoke = stage_rows(idea, "smoke", lane, issue=issue, source=source, store=store, held=held)
    ablation = stage_rows(idea, "ablation", lane, issue=issue, source=source, store=store, held=held)
    full = full_spec(idea)
    try:
        full_cost = cost_of("train", jobs.parse_spec("train", full))
    except ConfigError as e:
        raise ConfigError(f"idea.full: {e}") from None
    data = idea_dict(idea)
    digest = spec_hash(data, lane)
    if dry_run:
        abl = resolved_ablation(idea)
        return {"dry_run": True, "queued": False, "kind": "idea", "lane": lane, "hash": digest,
                "arm": idea_arm(idea).name, "baseline": abl.baseline, "primary": abl.primary,
                "stages": [
                    {"stage": "smoke", "jobs": [_planned(r) for r in smoke]},
                    {"stage": "ablation", "jobs": [_planned(r) for r in ablation]},
                    {"stage": "full", "jobs": [{
                        "kind": "train", "lane": "gpu", "spec": full, "cost": full_cost,
                        "gate": f"queued only if the ablation says better for {idea_arm(idea).name} "
                                f"on {abl.primary}"}]}]}
    pid, _ids = store.create_pipeline(data, digest, lane, "smoke", smoke, issue=issue, source=source)
    log.info("pipeline %d: smoke stage queued", pid)
    return view(pid, store)


def _planned(row: dict[str, Any]) -> dict[str, Any]:
    from daemon.admission import cost_of

    return {"kind": row["kind"], "lane": row["lane"], "role": row["role"], "spec": row["spec"],
            "cost": cost_of(row["kind"], jobs.parse_spec(row["kind"], row["spec"]))}


def advance(store: Store) -> list[tuple[int, str]]:
    """Decide the next step of every running pipeline whose stage has ended; [(id, what)]."""
    done = []
    for p in store.list_pipelines(("running",)):
        try:
            what = decide(p, store)
        except Exception as e:  # one pipeline's fault must not stop the others, or the scheduler
            log.exception("pipeline %d: deciding its next stage failed", p["id"])
            what = _stop(p, store, f"the lab could not decide the next stage ({type(e).__name__}: {e})")
        if what:
            done.append((p["id"], what))
    return done


def _current(p: dict[str, Any], store: Store) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(link, job) of the pipeline's current stage and round."""
    out = []
    for link in store.pipeline_jobs(p["id"]):
        if link["stage"] == p["stage"] and link["round"] == p["round"]:
            job = store.get(link["job_id"])
            if job is not None:
                out.append((link, job))
    return out


def decide(p: dict[str, Any], store: Store) -> str | None:
    current = _current(p, store)
    if not current or any(job["status"] not in FINAL for _, job in current):
        return None  # the stage is still running (or waits, held)
    stage = p["stage"]
    for link, job in current:
        if job["status"] != "succeeded":
            what = f"{stage} job {job['id']} ({link['role']}) {job['status']}"
            return _stop(p, store, f"{what}: {job.get('error') or 'no reason given'}")
    idea = parse_idea(p["spec"])
    main = next(job for link, job in current if link["role"] == "main")
    if stage == "smoke":
        return _move(p, store, idea, "ablation",
                     f"smoke job {main['id']} passed: {(main.get('result') or {}).get('reason', 'ok')}")
    if stage == "ablation":
        from harness.ablate import CONTROL_EXPECTED

        for link, job in current:
            if link["role"].startswith("control:"):
                name = link["role"].split(":", 1)[1]
                said = (job.get("result") or {}).get("verdict")
                if said != CONTROL_EXPECTED[name]:
                    return _stop(p, store, f"the {name} control (job {job['id']}) said {said!r}, expected "
                                           f"{CONTROL_EXPECTED[name]!r}: the instrument cannot be trusted on "
                                           "this run, so its verdict earns nothing")
        result = main.get("result") or {}
        arm = idea_arm(idea).name
        entry = next((a for a in result.get("arms") or [] if a.get("name") == arm), {})
        verdict = entry.get("verdict")
        diff = entry.get("diff") or {}
        interval = f"[{_signed(diff.get('ci_low'))}, {_signed(diff.get('ci_high'))}]"
        said = (f"{arm} vs {result.get('baseline')} on {result.get('primary')}: {verdict} "
                f"({_signed(diff.get('mean'))} {interval})")
        if verdict != "better":
            return _stop(p, store, f"ablation job {main['id']}: {said}; only `better` earns a full run",
                         outcome=_lost(p, idea, main, said))
        return _move(p, store, idea, "full", f"ablation job {main['id']}: {said}; the full run is earned",
                     earned_by=main["id"])
    result = main.get("result") or {}
    outcome = {"full_run": main["id"], "primary": result.get("primary"), "grid": result.get("grid"),
               "ablation": _ablation_cell(p, store, idea)}
    reached = (result.get("primary") or {}).get("accuracy")
    moved = store.move_pipeline(p["id"], p["version"], status="succeeded", outcome=outcome,
                                reason=f"full run job {main['id']} finished: {_num(reached)} on "
                                       f"{(result.get('primary') or {}).get('cell', 'the primary cell')}")
    return None if moved is None else "succeeded"


def _signed(v: Any) -> str:
    return "n/a" if not isinstance(v, (int, float)) else f"{v:+.3f}"


def _num(v: Any) -> str:
    return "n/a" if not isinstance(v, (int, float)) else f"{v:.3f}"


def _move(p: dict[str, Any], store: Store, idea: IdeaSpec, stage: str, reason: str,
          earned_by: int | None = None) -> str | None:
    held = f"issue #{p['issue']} has the `blocked` label" if _held(p, store) else None
    try:
        rows = stage_rows(idea, stage, p["lane"], issue=p["issue"], source=p["source"] or "cli",
                          store=store, held=held, earned_by=earned_by)
    except ConfigError as e:  # the gate refused, or a file the stage needs went away
        return _stop(p, store, f"{reason}; but the {stage} stage cannot be queued: {e}")
    ids = store.move_pipeline(p["id"], p["version"], stage=stage, stage_jobs=rows, reason=reason)
    if ids is None:
        return None  # another process decided it first
    log.info("pipeline %d: %s -> %s (jobs %s)", p["id"], p["stage"], stage, ids)
    return stage


def _held(p: dict[str, Any], store: Store) -> bool:
    """Whether the pipeline's last stage was held (the issue's `blocked` label): the next is too."""
    return any((store.get(link["job_id"]) or {}).get("held") for link in store.pipeline_jobs(p["id"])[-1:])


def _stop(p: dict[str, Any], store: Store, reason: str, outcome: dict[str, Any] | None = None) -> str | None:
    moved = store.move_pipeline(p["id"], p["version"], status="stopped", reason=reason, outcome=outcome)
    if moved is None:
        return None
    log.info("pipeline %d stopped in %s: %s", p["id"], p["stage"], reason)
    return "stopped"


def _ablation_cell(p: dict[str, Any], store: Store, idea: IdeaSpec) -> dict[str, Any] | None:
    """The earning ablation's figures on its primary cell, to set beside the full run's."""
    abl = [store.get(link["job_id"]) for link in store.pipeline_jobs(p["id"])
           if link["stage"] == "ablation" and link["role"] == "main"]
    job = next((j for j in reversed(abl) if j and j["status"] == "succeeded"), None)
    if job is None:
        return None
    result = job.get("result") or {}
    arm = idea_arm(idea).name
    arms = {a.get("name"): a for a in result.get("arms") or []}
    return {"job": job["id"], "primary": result.get("primary"),
            "arm": {"name": arm, "mean": (arms.get(arm) or {}).get("mean"),
                    "grid": (arms.get(arm) or {}).get("grid")},
            "baseline": {"name": result.get("baseline"),
                         "mean": (arms.get(result.get("baseline")) or {}).get("mean")},
            "best_trivial": result.get("best_trivial")}


def _lost(p: dict[str, Any], idea: IdeaSpec, job: dict[str, Any], said: str) -> dict[str, Any]:
    """A lost idea's record: the finding drafted from its ablation (when the run's files are on
    this host) and the graveyard line proposed for docs/ROADMAP.md."""
    from records import finding_markdown, read_ablation, today

    graveyard = (f"- {today()}: {idea.hypothesis.strip()} -- {said} (ablation job {job['id']}, "
                 f"pipeline {p['id']}; it would have been killed by: {idea.kill.strip()})")
    out: dict[str, Any] = {"graveyard": graveyard, "ablation": job["id"],
                           "publish": f"lab finding {job['id']} --title \"...\""}
    run_dir = Path(job["run_dir"]) if job.get("run_dir") else None
    here = job.get("host") == config.paths().host
    abl = read_ablation(run_dir) if run_dir is not None and here and run_dir.is_dir() else None
    if abl is None:
        out["finding_draft"] = None
        out["draft_note"] = (f"the ablation's files are on host {job.get('host')!r}: run "
                             f"`lab finding {job['id']}` there")
        return out
    title = f"Idea: {idea.hypothesis.strip().splitlines()[0][:80]} ({abl.get('verdict')})"
    _fm, text = finding_markdown(str(job["id"]), title, abl)
    draft = run_dir / "finding-draft.md"  # type: ignore[operator]
    draft.write_text(text, encoding="utf-8")
    out["finding_draft"] = str(draft)
    out["title"] = title
    return out


def rerun(pid: int, store: Store | None = None) -> dict[str, Any]:
    """Start the stage that stopped (or was cancelled in) pipeline `pid` again, as a new round."""
    store = store or _open_store()
    p = store.pipeline(pid)
    if p is None:
        raise ConfigError(f"pipeline {pid}: no such pipeline")
    if p["status"] not in ("stopped", "cancelled"):
        raise ConfigError(f"pipeline {pid} is {p['status']}: only a stopped or cancelled pipeline runs again")
    idea = parse_idea(p["spec"])
    earned_by = None
    if p["stage"] == "full":
        earned_by = next((link["job_id"] for link in reversed(store.pipeline_jobs(pid))
                          if link["stage"] == "ablation" and link["role"] == "main"), None)
    rows = stage_rows(idea, p["stage"], p["lane"], issue=p["issue"], source=p["source"] or "cli",
                      store=store, earned_by=earned_by)
    ids = store.move_pipeline(pid, p["version"], stage=p["stage"], stage_jobs=rows,
                              reason=f"{p['stage']} started again", from_statuses=("stopped", "cancelled"))
    if ids is None:
        raise ConfigError(f"pipeline {pid} changed meanwhile; look again (`lab pipeline {pid}`)")
    return view(pid, store)


def cancel(pid: int, reason: str, store: Store | None = None) -> dict[str, Any]:
    """Cancel the pipeline and whatever stage job still waits or runs."""
    store = store or _open_store()
    p = store.pipeline(pid)
    if p is None:
        raise ConfigError(f"pipeline {pid}: no such pipeline")
    if p["status"] == "running":
        store.move_pipeline(pid, p["version"], status="cancelled", reason=reason)
    for link in store.pipeline_jobs(pid):
        job = store.get(link["job_id"])
        if job and job["status"] in ACTIVE and not job.get("cancel_requested"):
            store.cancel(job["id"], reason)
    return view(pid, store)


# --- reading ---------------------------------------------------------------------------------


def view(pid: int, store: Store) -> dict[str, Any]:
    """The pipeline as `lab pipeline`, `lab status`, MCP and the issue's status comment show it:
    each stage's state and jobs (latest round), the current stage, the last decision."""
    p = store.pipeline(pid)
    if p is None:
        raise ConfigError(f"pipeline {pid}: no such pipeline")
    links = store.pipeline_jobs(pid)
    stages = []
    for stage in PIPELINE_STAGES:
        mine = [link for link in links if link["stage"] == stage]
        last = max((link["round"] for link in mine), default=0)
        jobs_ = []
        for link in mine:
            if link["round"] != last:
                continue
            job = store.get(link["job_id"]) or {}
            result = job.get("result") or {}
            jobs_.append({"id": link["job_id"], "role": link["role"], "kind": job.get("kind"),
                          "lane": job.get("lane"), "status": job.get("status"),
                          "progress": job.get("progress"),
                          "error": job.get("error"), "verdict": result.get("verdict"),
                          "round": link["round"]})
        main = next((j for j in jobs_ if j["role"] == "main"), None)
        state = main["status"] if main else ("skipped" if p["status"] != "running" else "waiting")
        stages.append({"stage": stage, "state": state, "rounds": last, "jobs": jobs_})
    spec = p["spec"] or {}
    try:
        idea = parse_idea(spec)
        arm, abl = idea_arm(idea).name, resolved_ablation(idea)
        primary, baseline = abl.primary, abl.baseline
    except ConfigError:  # a spec file changed since: show what the row holds
        arm, primary, baseline = spec.get("arm"), None, None
    return {"id": p["id"], "kind": "idea", "status": p["status"], "stage": p["stage"], "round": p["round"],
            "reason": p["reason"], "issue": p["issue"], "source": p["source"], "lane": p["lane"],
            "hash": p["spec_hash"], "hypothesis": spec.get("hypothesis"), "kill": spec.get("kill"),
            "arm": arm, "baseline": baseline, "primary": primary, "stages": stages,
            "outcome": p["outcome"], "created_at": iso(p["created_at"]), "updated_at": iso(p["updated_at"]),
            "finished_at": iso(p["finished_at"])}


def list_views(store: Store, statuses: tuple[str, ...] | None = None, issue: int | None = None,
               limit: int | None = 20) -> list[dict[str, Any]]:
    return [view(p["id"], store) for p in store.list_pipelines(statuses, issue=issue, limit=limit)]
