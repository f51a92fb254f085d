"""What may be queued: every check a job passes before its row is written (`prepare`), and the
earned-run gate on cost and identity (`check_gate`). The service layer (daemon/service.py) and
the idea pipeline (daemon/pipeline.py) both submit through here, so a pipeline's stage is
validated and gated exactly like a job a person submits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import config
import jobs
from config import ConfigError
from jobs.cost import estimate, is_full_run
from jobs.paths import check_spec_paths
from store import ACTIVE, MAX_ID, Store

# Priorities order jobs within a lane; a bound keeps one caller from outranking every job forever
# with a number no person would type.
PRIORITY_LIMIT = 1000


class GateError(ConfigError):
    """A full GPU run that was not earned by an ablation (nor forced with a reason)."""


def check_gate(store: Store, kind: str, lane: str, spec: dict[str, Any], earned_by: int | None,
               force: bool, reason: str | None, cost: dict[str, Any] | None = None) -> str | None:
    """The earned-run gate, on cost and on identity. A GPU job whose compute estimate reaches
    config.GATE (jobs/cost.py) is a full run, whatever its kind or preset: it needs `earned_by`
    naming a succeeded ablation whose tested arm made the same change (`earned_match`) with
    verdict `better`, or `force` with a reason. Returns what the gate decided (for the job's
    events), None for a job below the threshold; GateError says what would earn the run."""
    if force and not (reason or "").strip():
        raise GateError("--force: needs --reason TEXT (it is recorded with the job)")
    earner = None
    if earned_by is not None:
        earner = store.get(earned_by)
        if earner is None:
            raise GateError(f"--earned-by: job {earned_by} does not exist")
    why = is_full_run(cost) if lane == "gpu" else None
    if why is None:
        return None
    if force:
        return f"full run ({why}), forced: {(reason or '').strip()}"
    earn = ("give --earned-by ABLATION_JOB: a succeeded ablation whose tested arm made the same change "
            "(the same arch, n_steps and overrides, apart from the size keys a full run scales) "
            "with verdict better; or carry the idea through `lab submit idea`, which submits its "
            "full run only when its ablation earned it")
    if earner is None:
        raise GateError(f"--earned-by: this {kind} job is a full run ({why}) and was not earned: {earn}")
    if kind != "train":
        raise GateError(f"--earned-by: this {kind} job is a full run ({why}); an ablation earns only a "
                        f"train job that scales its arm (a person may --force --reason)")
    if earner["kind"] != "ablation":
        raise GateError(f"--earned-by: job {earned_by} is a {earner['kind']} job, not an ablation; {earn}")
    if earner["status"] != "succeeded":
        raise GateError(f"--earned-by: ablation {earned_by} is {earner['status']}, not succeeded; {earn}")
    arm, problem = earned_match(earner, spec)
    if arm is None:
        raise GateError(f"--earned-by: {problem}; {earn}")
    return f"full run ({why}), earned by ablation {earned_by}, arm {arm}"


def _change(arch: Any, n_steps: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """What an arm changes, with the keys a full run may scale left out."""
    bare = {config.split_key(k)[1] if "." in k else k: v for k, v in (overrides or {}).items()}
    return {"arch": arch, "n_steps": n_steps,
            "set": {k: v for k, v in sorted(bare.items()) if k not in config.FULL_RUN_SIZE_KEYS}}


def earned_match(earner: dict[str, Any], spec: dict[str, Any]) -> tuple[str | None, str]:
    """The name of the earning ablation's tested arm that made the change this train spec runs,
    with verdict `better` on its primary cell; else (None, why not)."""
    result = earner.get("result") or {}
    arms = {a.get("name"): a for a in result.get("arms") or []}
    made = result.get("arm_specs")
    if not made:  # an ablation that ran before arm_specs was recorded: its spec, resolved now
        from jobs.ablation import Spec as AblationJobSpec
        from jobs.ablation import resolve

        try:
            made = [{"name": a.name, "arch": a.arch, "n_steps": a.n_steps, "set": dict(a.set)}
                    for a in resolve(AblationJobSpec(**earner["spec"])).arms]
        except (ConfigError, TypeError) as e:
            return None, f"the arms of ablation {earner['id']} cannot be read back ({e})"
    want = _change(spec.get("arch") or config.default_arch(), spec.get("n_steps"), spec.get("set") or {})
    task = result.get("task")
    if spec.get("task") and task and spec["task"] != task:
        return None, f"ablation {earner['id']} measured task {task!r}, this run trains on {spec['task']!r}"
    same = [a for a in made if _change(a["arch"], a["n_steps"], a.get("set") or {}) == want
            and a["name"] != result.get("baseline") and spec.get("arm") in (None, a["name"])]
    if not same:
        tried = "; ".join(f"{a['name']}: {_change(a['arch'], a['n_steps'], a.get('set') or {})}" for a in made
                          if a["name"] != result.get("baseline"))
        return None, (f"no tested arm of ablation {earner['id']} made this run's change {want} "
                      f"(its arms: {tried})")
    for a in same:
        verdict = (arms.get(a["name"]) or {}).get("verdict")
        if verdict == "better":
            return a["name"], ""
    names = ", ".join(f"{a['name']} {(arms.get(a['name']) or {}).get('verdict')!r}" for a in same)
    return None, (f"ablation {earner['id']}'s arm that made this change has verdict {names} on "
                  f"{result.get('primary')}, not 'better'")


def dry_run_view(plan: dict[str, Any]) -> dict[str, Any]:
    row = plan["row"]
    return {"dry_run": True, "queued": False, "kind": row["kind"], "lane": row["lane"], "spec": row["spec"],
            "cost": plan["cost"], "full_run": plan["full_run"], "gate": plan["gate"] or "not a full run",
            "after": row["after"], "issue": row["issue"], "earned_by": row["earned_by"],
            "timeout_s": row["timeout_s"], "priority": row["priority"]}


def prepare(kind: str, values: dict[str, Any], *, lane: str | None = None, after: int | None = None,
            priority: int = 0, timeout_s: float | None = None, issue: int | None = None,
            earned_by: int | None = None, force: bool = False, reason: str | None = None,
            host: str | None = None, source: str = "cli", held: str | None = None,
            store: Store) -> dict[str, Any]:
    """Everything `submit` checks, nothing written: {"row": Store.submit's arguments, "cost",
    "full_run", "gate"} or a ConfigError naming the field. A pipeline's stages come through
    here too (daemon/pipeline.py), so a stage is validated and gated like any job."""
    q = config.queue_config()
    lane = jobs.check_lane(kind, lane)
    host = check_host(host)
    # Before the Spec looks at any file: only files in the checkout's allowed roots, never a
    # dotfile or the queue database, and runs by id (jobs/paths.py); the job checks it again.
    check_spec_paths(kind, values)
    parsed = jobs.parse_spec(kind, values)
    spec = jobs.spec_to_dict(parsed)
    check_local_inputs(kind, spec, host, store)
    check_job_ref("--after", after)
    check_job_ref("--earned-by", earned_by)
    if after is not None and store.get(after) is None:
        raise ConfigError(f"--after: job {after} does not exist")
    if isinstance(priority, bool) or not isinstance(priority, int) or abs(priority) > PRIORITY_LIMIT:
        raise ConfigError(f"--priority: {config.show(priority)} is out of range "
                          f"(allowed: -{PRIORITY_LIMIT} to {PRIORITY_LIMIT})")
    if issue is not None and (isinstance(issue, bool) or not isinstance(issue, int) or not 0 < issue < 2**31):
        raise ConfigError(f"--issue: {config.show(issue)} is not an issue number (a positive integer "
                          "below 2^31)")
    if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))):
        raise ConfigError(f"--timeout: expected a number of seconds, got {type(timeout_s).__name__}")
    if timeout_s is not None and not 0 < timeout_s <= 30 * 86_400:
        raise ConfigError(f"--timeout: {config.show(timeout_s)} is out of range "
                          "(allowed: (0, 2592000] seconds)")
    cost = cost_of(kind, parsed)
    gate = check_gate(store, kind, lane, spec, earned_by, force, reason, cost)
    row = dict(kind=kind, lane=lane, spec=spec, priority=priority, after=after,
               timeout_s=timeout_s or q.default_timeout_seconds, max_attempts=q.max_attempts, issue=issue,
               earned_by=earned_by, force_reason=reason.strip() if force and reason else None,
               want_host=host, source=source, held=held)
    return {"row": row, "cost": cost, "full_run": bool(is_full_run(cost)) and lane == "gpu", "gate": gate}


def cost_of(kind: str, parsed: Any) -> dict[str, Any] | None:
    """jobs/cost.py's estimate; a spec whose estimate cannot be made (a task directory that went
    away since) has none rather than an error."""
    try:
        return estimate(kind, parsed)
    except ConfigError:
        return None


def check_host(host: str | None) -> str | None:
    """`host` stripped, or ConfigError: a daemon claims a job only when its LAB_HOST equals the
    job's host exactly, so a name no daemon can have (empty, a newline, a space, a control
    character) would wait forever."""
    if host is None:
        return None
    if not isinstance(host, str):
        raise ConfigError(f"--host: expected a host name (a string), got {type(host).__name__}")
    host = host.strip()
    if not host or len(host) > 128 or not host.isprintable() or any(c.isspace() for c in host):
        raise ConfigError(f"--host: {config.show(host)} is not a host name (LAB_HOST of a daemon: "
                          "1-128 printable characters, no spaces)")
    return host


def check_job_ref(flag: str, job_id: int | None) -> None:
    """A job id given to point at another job (--after, --earned-by): a positive integer the
    store can hold; a larger one would reach the database driver and overflow there."""
    if job_id is None:
        return
    if isinstance(job_id, bool) or not isinstance(job_id, int) or not 0 < job_id <= MAX_ID:
        raise ConfigError(f"{flag}: {config.show(job_id)} is not a job id (a positive integer)")


def check_local_inputs(kind: str, spec: dict[str, Any], host: str | None, store: Store) -> None:
    """Refuse at submit what would only fail when the job runs, where this host can tell: a
    `train` dataset that is not under $LAB_RUNS/data (the sample dataset is built on demand), an
    `eval` or `archive` run that is not under $LAB_RUNS. A dataset a queued `tokenize` job will
    make, and a run that is a job of the queue still to run (its run dir appears when it does),
    are accepted: `lab submit eval --set run=12 --after 12` is the usual way to evaluate job 12.

    Only when the job runs here: with `host` naming another host (a multi-host queue), its
    datasets and runs are under that host's LAB_RUNS, which this one cannot see. A job for any
    host (no `host`) is checked here too, so that a typo is caught at submit; a run that the
    queue says ran on another host is then accepted, since a daemon there may take the job."""
    here = config.paths().host
    if host is not None and host != here:
        return
    runs = Path(config.paths().runs)
    if kind == "train":
        name = spec.get("data")
        if isinstance(name, str) and name != config.SAMPLE_DATASET \
                and not (runs / "data" / name / "meta.json").is_file() \
                and not any(j["spec"].get("name") == name for j in store.list_jobs(ACTIVE, kind="tokenize")):
            raise ConfigError(f"train.data: no dataset {name!r} in {runs / 'data'} (make it with `lab "
                              f"tokenize`; the sample dataset {config.SAMPLE_DATASET!r} is built on demand)")
    named = {"eval": [spec.get("run")], "archive": list(spec.get("runs") or ())}.get(kind, [])
    for run in named:
        if isinstance(run, str) and not _run_is_known(run, runs, here, host, store):
            raise ConfigError(f"{kind}.{'run' if kind == 'eval' else 'runs'}: no run {run!r} in {runs}")


def _run_is_known(run: str, runs: Path, here: str, host: str | None, store: Store) -> bool:
    """Whether run id `run` names a run the job may find: a directory under $LAB_RUNS, a queued,
    blocked or running job (its run dir appears when it runs), or, for a job any host may
    take, a job that ran on another host."""
    try:
        if (runs / run).is_dir():
            return True
    except OSError:  # a name the filesystem refuses (too long): no run of this lab
        return False
    if not run.isdigit() or len(run) > 19:  # a job's run dir is named by its id; 19 digits is 2^63
        return False
    job = store.get(int(run))
    if job is None:
        return False
    return job["status"] in ACTIVE or (host is None and job["host"] not in (None, here))
