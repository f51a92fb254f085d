"""Arms x seeds -> ablation.json, report.md, accuracy.png and a verdict.

    spec (toml or dict) --validate all--> arms' configs --(arm, seed) work, in seed processes-->
    per-seed accuracies --stats--> intervals, paired differences, verdicts --> files + summary

The whole spec is validated (task, splits, presets, every arm's overrides) before anything is
trained, so bad input costs nothing. Seeds pair the arms: every arm of a seed trains on the
same batches and is tested on the same test sets (harness/train_task.py).

Arm depth: `n_steps` is the depth at test. For a reasoner arm it also sets its size: a flat
model of `n_steps` layers trained at that depth ("flat-1"), unless `set` names n_layers or a
depth_* key itself. A refiner arm trains with the preset's random depth unless `set` says.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing as mp
import os
import queue
import subprocess
import time
import tomllib
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import config
from config import ConfigError
from harness import stats
from harness.tasks import TASK_NAMES, Task, make_task

SPECS_DIR = Path(__file__).parent / "specs"
CONTROLS = ("negative", "positive")
CONTROL_EXPECTED = {"negative": "inconclusive", "positive": "better"}
_ARM_KEYS = ("name", "arch", "n_steps", "set")
_DEPTH_KEYS = ("n_layers", "depth_min", "depth_max", "depth_eval")


@dataclass(frozen=True)
class ArmSpec:
    name: str
    arch: str
    n_steps: int | None = None
    set: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AblationSpec:
    """A validated ablation. Construction checks everything that can be checked without
    training: the errors are one line and name the field."""

    arms: tuple[ArmSpec, ...]
    baseline: str
    task: str = "khop"
    task_dir: str = ""
    seeds: int = config.ABLATION.seeds
    steps: int = 0  # 0: the preset's max_steps
    seconds: float = 0.0  # > 0: a wall-clock budget per (arm, seed) instead of steps
    preset: str = "ablation"
    primary: str = ""  # the split the verdict reads; default the hardest split
    why: str = ""  # required when seeds < 3: why fewer seeds are enough
    eval_examples: int = config.ABLATION.eval_examples

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _expect(where: str, value: Any, tp: type | tuple[type, ...], what: str) -> None:
    if not isinstance(value, tp) or isinstance(value, bool) and tp is not bool:
        raise ConfigError(f"{where}: expected {what}, got {type(value).__name__} {value!r}")


def parse_spec(values: dict[str, Any]) -> AblationSpec:
    """Untrusted mapping (a toml file, a queue spec) -> AblationSpec, or ConfigError naming the
    field. The task directory is read here too, so a bad file fails before training."""
    values = dict(values)
    allowed = {f.name for f in dataclasses.fields(AblationSpec)}
    for key in values:
        if key not in allowed:
            raise ConfigError(f"ablation.{key}: unknown key (allowed: {', '.join(sorted(allowed))})")
    raw_arms = values.pop("arms", None)
    if not isinstance(raw_arms, (list, tuple)) or len(raw_arms) < 2:
        raise ConfigError("ablation.arms: at least 2 arms are needed ([[arms]] tables)")
    arms = []
    for i, raw in enumerate(raw_arms):
        where = f"ablation.arms[{i}]"
        if isinstance(raw, ArmSpec):
            raw = dataclasses.asdict(raw)
        _expect(where, raw, dict, "a table")
        for key in raw:
            if key not in _ARM_KEYS:
                raise ConfigError(f"{where}.{key}: unknown arm key (allowed: {', '.join(_ARM_KEYS)})")
        if "name" not in raw or "arch" not in raw:
            raise ConfigError(f"{where}.{'name' if 'name' not in raw else 'arch'}: required key is missing")
        _expect(f"{where}.name", raw["name"], str, "a string")
        if raw["arch"] not in config.ARCHS:
            raise ConfigError(f"{where}.arch: {raw['arch']!r} is not an architecture "
                              f"(allowed: {', '.join(config.ARCHS)})")
        n_steps = raw.get("n_steps")
        if n_steps is not None:
            _expect(f"{where}.n_steps", n_steps, int, "an integer")
            if not 1 <= n_steps <= 128:
                raise ConfigError(f"{where}.n_steps: {n_steps} is out of range (allowed: [1, 128])")
        sets = raw.get("set", {})
        _expect(f"{where}.set", sets, dict, "a table of config keys")
        arms.append(ArmSpec(name=raw["name"], arch=raw["arch"], n_steps=n_steps, set=dict(sets)))
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ConfigError(f"ablation.arms: arm names must be unique (got {', '.join(names)})")
    if "baseline" not in values:
        raise ConfigError("ablation.baseline: required key is missing")
    types = {"baseline": (str, "a string"), "task": (str, "a string"), "task_dir": (str, "a string"),
             "seeds": (int, "an integer"), "steps": (int, "an integer"),
             "seconds": ((int, float), "a number"),
             "preset": (str, "a string"), "primary": (str, "a string"), "why": (str, "a string"),
             "eval_examples": (int, "an integer")}
    for key, value in values.items():
        _expect(f"ablation.{key}", value, types[key][0], types[key][1])
    if "seconds" in values:
        values["seconds"] = float(values["seconds"])
    spec = AblationSpec(arms=tuple(arms), **values)
    _check_spec(spec)
    return spec


def _check_spec(spec: AblationSpec) -> None:
    if spec.baseline not in [a.name for a in spec.arms]:
        raise ConfigError(f"ablation.baseline: {spec.baseline!r} is not an arm "
                          f"(arms: {', '.join(a.name for a in spec.arms)})")
    if not 1 <= spec.seeds <= 100:
        raise ConfigError(f"ablation.seeds: {spec.seeds} is out of range (allowed: [1, 100])")
    if spec.seeds < 3 and not spec.why:
        raise ConfigError(f"ablation.seeds: {spec.seeds} < 3 needs a reason in `why`")
    if spec.steps < 0 or spec.seconds < 0:
        raise ConfigError("ablation.steps: steps and seconds must be >= 0")
    if spec.steps and spec.seconds:
        raise ConfigError("ablation.seconds: give steps or seconds, not both")
    if not 10 <= spec.eval_examples <= 1_000_000:
        raise ConfigError(f"ablation.eval_examples: {spec.eval_examples} is out of range "
                          "(allowed: [10, 1000000])")
    if spec.preset not in config.PRESETS:
        raise ConfigError(f"ablation.preset: unknown preset {spec.preset!r} "
                          f"(allowed: {', '.join(config.PRESETS)})")
    if not spec.task_dir and spec.task not in TASK_NAMES:
        raise ConfigError(f"ablation.task: unknown task {spec.task!r} (allowed: {', '.join(TASK_NAMES)}, "
                          "or task_dir)")
    task = make_task(spec.task, spec.task_dir or None, seed=0)
    if spec.primary and spec.primary not in task.splits:
        raise ConfigError(f"ablation.primary: unknown split {spec.primary!r} "
                          f"(allowed: {', '.join(task.splits)})")
    for i, arm in enumerate(spec.arms):
        arm_config(spec, arm, task, where=f"ablation.arms[{i}]")


def arm_config(spec: AblationSpec, arm: ArmSpec, task: Task, where: str = "arm") -> config.Config:
    """The arm's full config: the preset for its arch, the task's vocabulary and length, the
    flat-n rule for reasoners (module docstring), then the arm's own overrides."""
    overrides: dict[str, Any] = {"vocab_size": task.vocab_size, "block_size": task.block_size}
    if arm.arch == "reasoner" and arm.n_steps is not None and not set(arm.set) & set(_DEPTH_KEYS):
        overrides.update(n_layers=arm.n_steps, depth_min=arm.n_steps, depth_max=arm.n_steps,
                         depth_eval=arm.n_steps)
    for key, value in arm.set.items():
        try:
            config.split_key(key)
        except ConfigError as e:
            raise ConfigError(f"{where}.set.{key}: unknown config key") from e
        overrides[key] = value
    try:
        cfg = config.preset(spec.preset, arm.arch, **overrides)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if arm.arch == "reasoner" and arm.n_steps is not None and arm.n_steps > cfg.model.n_layers:
        raise ConfigError(f"{where}.n_steps: {arm.n_steps} > n_layers {cfg.model.n_layers}")
    return cfg


def load_spec_file(path: str | Path) -> AblationSpec:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"spec: {str(p)!r} is not a file")
    try:
        values = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"spec: {p}: not TOML ({e})") from None
    if values.get("task_dir") and not Path(values["task_dir"]).is_absolute():
        values["task_dir"] = str(p.parent / values["task_dir"])  # relative to the spec file
    return parse_spec(values)


def control_spec(name: str) -> AblationSpec:
    if name not in CONTROLS:
        raise ConfigError(f"control: unknown control {name!r} (allowed: {', '.join(CONTROLS)})")
    return load_spec_file(SPECS_DIR / f"control_{name}.toml")


# --------------------------------------------------------------------------------------------
# Running


def _work_items(spec: AblationSpec, configs: list[config.Config], device: str) -> list[Any]:
    from harness.train_task import Work

    items = [Work(arm_index=i, arm_name=arm.name, seed=seed, cfg=configs[i], n_steps=arm.n_steps,
                  eval_depths=config.ABLATION.eval_depths, steps=spec.steps or configs[i].train.max_steps,
                  seconds=spec.seconds,
                  eval_examples=spec.eval_examples, task_name=None if spec.task_dir else spec.task,
                  task_dir=spec.task_dir or None, task_sizes=config.TASKS, device=device,
                  train_examples=config.ABLATION.train_examples)
             for seed in range(spec.seeds) for i, arm in enumerate(spec.arms)]
    # the costliest first, so the last item to finish is a cheap one (better packing)
    from models.flops import train_flops_per_token

    return sorted(items, key=lambda w: -train_flops_per_token(w.cfg.model) * (w.cfg.train.batch_size))


_progress_queue: Any = None  # in a child process: where progress goes (set by _init_child)


def _init_child(progress_queue: Any) -> None:
    global _progress_queue
    _progress_queue = progress_queue


def _run_in_child(work: Any) -> Any:
    from harness.train_task import train_and_eval

    def report(step: int, total: int, loss: float) -> None:
        _progress_queue.put((work.arm_index, work.seed, step, total, loss))

    return train_and_eval(work, report)


def _run_all(items: list[Any], spec: AblationSpec, ctx: Any) -> list[Any]:
    """Run every (arm, seed) in `parallel_seeds` child processes (one torch thread each) and
    forward their progress to ctx.progress as one overall step count."""
    workers = max(1, min(config.ABLATION.parallel_seeds, len(items)))
    spawn = mp.get_context("spawn")  # fork after torch is loaded is not safe
    progress_queue = spawn.Queue()
    done_steps: dict[tuple[int, int], int] = {}
    totals = {(w.arm_index, w.seed): w.steps for w in items}
    results = []
    names = {w.arm_index: w.arm_name for w in items}
    last_report = 0.0
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=spawn, initializer=_init_child,
                                 initargs=(progress_queue,)) as pool:
            pending = {pool.submit(_run_in_child, w): w for w in items}
            while pending:
                finished, _ = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                while True:
                    try:
                        arm, seed, step, total, loss = progress_queue.get_nowait()
                    except queue.Empty:
                        break
                    done_steps[(arm, seed)], totals[(arm, seed)] = step, total
                    if time.monotonic() - last_report >= config.ABLATION.progress_seconds:
                        last_report = time.monotonic()
                        ctx.progress(sum(done_steps.values()), sum(totals.values()), arm=names[arm],
                                     seed=seed, arm_step=step, loss=float(loss))
                for fut in finished:
                    w = pending.pop(fut)
                    if fut.exception() is not None:  # a NaN loss, say: the ablation has failed
                        pool.shutdown(wait=False, cancel_futures=True)
                    r = fut.result()
                    done_steps[(w.arm_index, w.seed)] = totals[(w.arm_index, w.seed)] = r.steps
                    results.append(r)
                    accs = " ".join(f"{k}={v:.3f}" for k, v in r.accuracy.items())
                    ctx.log(f"done {w.arm_name} seed {w.seed}: {r.steps} steps in {r.wall_s:.0f}s "
                            f"({r.cpu_s:.0f} CPU s), {accs}")
    finally:
        progress_queue.close()
    steps = sum(r.steps for r in results)
    ctx.progress(steps, steps, arms=len(names), seeds=spec.seeds)  # the last report says done
    return results


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("torch", "numpy", "scipy", "matplotlib"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def _baselines(spec: AblationSpec, task: Task) -> dict[str, dict[str, float]]:
    """Trivial predictors on the same test sets as the arms, averaged over seeds."""
    from harness.train_task import data_rng

    if task.generative:
        return {s: task.baselines(s, None, None) for s in task.splits}  # type: ignore[arg-type]
    out: dict[str, dict[str, float]] = {}
    for split in task.splits:
        per_seed = []
        for seed in range(spec.seeds):
            t = make_task(spec.task, None, seed=seed)
            test = t.test_batch(split, data_rng(seed, split), spec.eval_examples)
            per_seed.append(t.baselines(split, test, t.train_batch(data_rng(seed), 2000)))
        out[split] = {k: float(sum(b[k] for b in per_seed) / len(per_seed)) for k in per_seed[0]}
    return out


def _summarise(spec: AblationSpec, task: Task, configs: list[config.Config], params: list[int],
               results: list[Any]) -> dict[str, Any]:
    """Intervals and verdicts from the per-seed results."""
    from models.flops import train_flops_per_token

    conf, min_effect = config.ABLATION.confidence, config.ABLATION.min_effect
    primary = spec.primary or task.splits[-1]
    by = {(r.arm_index, r.seed): r for r in results}
    seeds = range(spec.seeds)
    base_i = [a.name for a in spec.arms].index(spec.baseline)
    base_acc = [by[(base_i, s)].accuracy[primary] for s in seeds]
    arms = []
    for i, arm in enumerate(spec.arms):
        per_seed = [by[(i, s)].accuracy[primary] for s in seeds]
        iv = stats.t_interval(per_seed, conf)
        splits = {sp: stats.t_interval([by[(i, s)].accuracy[sp] for s in seeds], conf).to_dict()
                  for sp in task.splits}
        depths = sorted(by[(i, 0)].by_depth)
        by_depth = {str(d): {sp: stats.t_interval([by[(i, s)].by_depth[d][sp] for s in seeds], conf).to_dict()
                             for sp in task.splits} for d in depths}
        entry: dict[str, Any] = {
            "name": arm.name, "arch": arm.arch, "n_steps": arm.n_steps,
            "test_depth": arm.n_steps or configs[i].model.depth_eval,
            "params": params[i], "flops_per_token": train_flops_per_token(configs[i].model),
            "mean": iv.mean, "ci_low": iv.low, "ci_high": iv.high, "per_seed": per_seed,
            "splits": splits, "by_depth": by_depth,
            "steps": [by[(i, s)].steps for s in seeds], "wall_s": [by[(i, s)].wall_s for s in seeds],
            "cpu_s": [by[(i, s)].cpu_s for s in seeds],
            "final_loss": [by[(i, s)].final_loss for s in seeds],
        }
        if i == base_i:
            entry["verdict"], entry["diff"] = "baseline", None
        else:
            diff = stats.paired_difference(per_seed, base_acc, conf)
            entry["diff"] = {"mean": diff.mean, "ci_low": diff.low, "ci_high": diff.high}
            entry["verdict"] = stats.verdict(diff, min_effect)
        arms.append(entry)
    tested = [a["verdict"] for a in arms if a["verdict"] != "baseline"]
    return {"verdict": stats.overall_verdict(tested), "primary": primary, "baseline": spec.baseline,
            "confidence": conf, "min_effect": min_effect, "arms": arms}


def run_ablation(spec: AblationSpec, ctx: Any) -> dict[str, Any]:
    """Run the ablation into ctx.run_dir; return the summary (what `--json` prints). Usable from
    the CLI (a LocalContext) and the queue job alike."""
    import torch

    from models import build_model, count_params

    started, t0 = datetime.now(UTC), time.monotonic()
    run_dir = Path(ctx.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    task = make_task(spec.task, spec.task_dir or None, seed=0)
    configs = [arm_config(spec, arm, task, f"ablation.arms[{i}]") for i, arm in enumerate(spec.arms)]
    torch.set_num_threads(1)
    params = [count_params(build_model(c)) for c in configs]
    items = _work_items(spec, configs, getattr(ctx, "device", "cpu"))
    ctx.log(f"ablation: task {task.name}, {len(spec.arms)} arms x {spec.seeds} seeds, "
            f"{f'{spec.seconds:.0f} s' if spec.seconds else f'{items[0].steps} steps'} per arm and seed, "
            f"{config.ABLATION.parallel_seeds} processes")
    results = _run_all(items, spec, ctx)
    summary = _summarise(spec, task, configs, params, results)
    summary["baselines"] = _baselines(spec, task)
    summary["run_dir"] = str(run_dir)
    minutes = (time.monotonic() - t0) / 60
    summary["minutes"] = minutes
    summary = _finite(summary)  # strict JSON: an undefined interval (one seed) is null

    record = {
        "spec": spec.to_dict(), "task": {"name": task.name, "vocab": task.vocab, "splits": list(task.splits),
                                         "unit": task.unit, "chance": task.chance,
                                         "sizes": dataclasses.asdict(config.TASKS)},
        "configs": [c.to_dict() for c in configs], "ablation_config": dataclasses.asdict(config.ABLATION),
        "per_seed": [{"arm": spec.arms[r.arm_index].name, "seed": r.seed, "steps": r.steps,
                      "wall_s": r.wall_s, "cpu_s": r.cpu_s, "final_loss": r.final_loss,
                      "accuracy": r.accuracy,
                      "by_depth": {str(d): v for d, v in r.by_depth.items()}, "curve": r.curve}
                     for r in sorted(results, key=lambda r: (r.arm_index, r.seed))],
        "summary": summary, "git_commit": _git_commit(), "versions": _versions(),
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"), "host": config.paths().host,
    }
    _write_json(run_dir / "ablation.json", _finite(record))
    (run_dir / "report.md").write_text(render_report(spec, task, summary), encoding="utf-8")
    from harness.plot import plot_accuracy

    plot_accuracy(record, run_dir / "accuracy.png")
    for arm in summary["arms"]:
        ctx.log(f"{arm['name']}: {_pct(arm['mean'])} [{_pct(arm['ci_low'])}, {_pct(arm['ci_high'])}] "
                f"{arm['verdict']}")
    ctx.log(f"minutes: {minutes:.2f}")
    ctx.log(f"verdict: {summary['verdict']}")
    return summary


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable), encoding="utf-8")
    os.replace(tmp, path)


def _jsonable(x: Any) -> Any:
    return str(x)


def _finite(x: Any) -> Any:
    """A copy of x with every nan or inf float replaced by None."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _pct(x: float | None, sign: str = "") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{sign}.3f}"


def _interval(d: dict[str, Any], sign: str = "") -> str:
    return f"{_pct(d['mean'], sign)} [{_pct(d['ci_low'], sign)}, {_pct(d['ci_high'], sign)}]"


def render_report(spec: AblationSpec, task: Task, summary: dict[str, Any]) -> str:
    primary = summary["primary"]
    conf = int(round(summary["confidence"] * 100))
    lines = [f"# Ablation on `{task.name}`: **{summary['verdict']}**", "",
             f"{spec.seeds} seeds; split `{primary}` ({task.unit} accuracy); {conf}% t intervals; "
             f"`better` needs the paired interval above 0 and a gain >= {summary['min_effect']}.", "",
             f"| arm | params | train FLOPs/token | depth | {primary} mean [{conf}% CI] "
             f"| vs {spec.baseline} [{conf}% CI] | verdict |",
             "|---|---:|---:|---:|---|---|---|"]
    for a in summary["arms"]:
        d = a["diff"]
        vs = "—" if d is None else _interval(d, "+")
        lines.append(f"| {a['name']} | {a['params']:,} | {a['flops_per_token']:.3g} | {a['test_depth']} | "
                     f"{_interval(a)} | {vs} | {a['verdict']} |")
    lines += ["", "Accuracy by split (mean over seeds, at each arm's test depth):", "",
              "| arm | " + " | ".join(task.splits) + " |", "|---|" + "---:|" * len(task.splits)]
    for a in summary["arms"]:
        cells = [_pct(a["splits"][s]["mean"]) for s in task.splits]
        lines.append(f"| {a['name']} | " + " | ".join(cells) + " |")
    for name in summary["baselines"].get(primary, {}):
        lines.append(f"| *{name}* (trivial) | "
                     + " | ".join(_pct(summary["baselines"][s].get(name)) for s in task.splits) + " |")
    lines += ["", f"Accuracy by test depth on `{primary}` (depths a reasoner owns only):", ""]
    depths = sorted({int(d) for a in summary["arms"] for d in a["by_depth"]})
    lines += ["| arm | " + " | ".join(str(d) for d in depths) + " |", "|---|" + "---:|" * len(depths)]
    for a in summary["arms"]:
        cells = [_pct(a["by_depth"][str(d)][primary]["mean"]) if str(d) in a["by_depth"] else "—"
                 for d in depths]
        lines.append(f"| {a['name']} | " + " | ".join(cells) + " |")
    lines += ["", f"verdict: {summary['verdict']}", ""]
    return "\n".join(lines)


def new_run_dir(prefix: str = "ablate") -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return Path(config.paths().runs) / f"{prefix}-{stamp}"
