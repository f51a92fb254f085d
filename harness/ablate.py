"""Arms x seeds -> ablation.json, report.md, accuracy.png and a verdict on one primary cell.

    spec (toml or dict) --validate all--> arms' configs --(arm, seed) work, in seed processes-->
    per-seed depth x bucket grids --stats--> intervals, paired differences (Holm), verdicts
    --> files + summary

The whole spec is validated (task, splits, presets, every arm's overrides, the primary cell,
declared matches) before anything is trained, so bad input costs nothing. Seeds pair the arms:
every arm of a seed trains on the same batches and is tested on the same test sets
(harness/train_task.py).

The primary cell is chosen before the run and is required: `split[:bucket][@depth]`, e.g.
`hops3`, `test:3` (bucket 3 of split test) or `sparse:7-8@16` (refiner arms read at 16 loop
passes; flat arms always at their own depth). The verdict reads that cell and nothing else.

Arm depth: `n_steps` is the depth at test. For a reasoner arm it also sets its size: a flat
model of `n_steps` layers trained at that depth ("flat-1"), unless `set` names n_layers or a
depth_* key itself. A refiner arm trains with the preset's random depth unless `set` says.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing as mp
import queue
import re
import time
import tomllib
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

import config
from common import code_commit, utc_now, write_json_atomic
from config import ConfigError
from harness import stats
from harness.tasks import TASK_NAMES, Task, make_task

SPECS_DIR = Path(__file__).parent / "specs"
CONTROLS = ("negative", "positive")
CONTROL_EXPECTED = {"negative": "inconclusive", "positive": "better"}
_ARM_KEYS = ("name", "arch", "n_steps", "set")
_DEPTH_KEYS = ("n_layers", "depth_min", "depth_max", "depth_eval")
# Config keys an arm may not `set`: the harness decides them for every arm alike, or they
# belong to a full run on token data. Setting one would describe a change that never ran.
NOT_APPLIED = {
    "vocab_size": "the task sets it", "block_size": "the task sets it",
    "max_steps": "the spec's `steps` budgets every arm",
    "max_seconds": "the spec's `seconds` budgets every arm",
    "seed": "the harness seeds each arm by (seed, arm name)", "threads": "one torch thread per seed process",
    "eval_interval": "a full run's setting", "eval_batches": "a full run's setting",
    "ckpt_interval": "a full run's setting", "val_fraction": "a full run's setting",
    "gpu_memory_fraction": "a full run's setting",
}
MATCH_AXES = ("params", "distinct_blocks", "train_flops", "inference_flops")
# Arm names, task names and a task directory's split names are printed as they are into
# report.md, the verdict line and the issue's result comment: a name is letters, digits, `_`,
# `.` and `-` only, so it can carry no markdown (no line break, heading, emphasis, `|`, `<!--`).
PLAIN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_NAME_RULE = "is not a name: use 1-64 letters, digits, '_', '.' or '-'"


def check_name(where: str, name: str, what: str = "") -> None:
    """ConfigError `<where>: <what>'<name>' is not a name...` (one line: the name is repr'd)."""
    if not PLAIN_NAME.fullmatch(name):
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise ConfigError(f"{where}: {what}{shown!r} {_NAME_RULE}")


@dataclass(frozen=True)
class ArmSpec(config.Validated):
    FIELD_PREFIX = "arm"  # parse_spec names it ablation.arms[i]

    name: str
    arch: Literal["refiner", "reasoner"]
    n_steps: int | None = config.setting(None, 1, 128, "the arm's depth at test")
    set: dict = field(default_factory=dict)  # config overrides

    def _check_relations(self) -> None:
        check_name("arm.name", self.name)


@dataclass(frozen=True)
class PrimaryCell:
    """What the verdict reads: a split, a difficulty bucket of it ("all": every answer), and the
    test depth of looped arms (None: each arm's own depth)."""

    split: str
    bucket: str = "all"
    depth: int | None = None

    def __str__(self) -> str:
        text = self.split if self.bucket == "all" else f"{self.split}:{self.bucket}"
        return text if self.depth is None else f"{text}@{self.depth}"

    @staticmethod
    def parse(text: str, where: str = "ablation.primary") -> PrimaryCell:
        m = re.fullmatch(r"([^:@\s]+)(?::([^:@\s]+))?(?:@(\d+))?", text.strip())
        if not m:
            raise ConfigError(f"{where}: {text!r} is not split[:bucket][@depth] "
                              "(e.g. hops3, test:3, sparse:7-8@16)")
        return PrimaryCell(m.group(1), m.group(2) or "all", int(m.group(3)) if m.group(3) else None)


@dataclass(frozen=True)
class AblationSpec(config.Validated):
    """A validated ablation. Construction checks everything that can be checked without
    training (types and ranges here, relations in _check_relations): the errors are one line
    and name the field, `ablation.<key>`."""

    FIELD_PREFIX = "ablation"

    arms: tuple[ArmSpec, ...]
    baseline: str
    primary: str  # the cell the verdict reads, split[:bucket][@depth]; chosen before the run
    task: str = "khop"
    task_dir: str = ""
    seeds: int = config.setting(config.ABLATION.seeds, 1, 100)
    seed_offset: int = config.setting(0, 0, 1_000_000, "seeds are seed_offset .. seed_offset + seeds - 1")
    steps: int = config.setting(0, 0, 100_000_000, "0: the preset's max_steps")
    seconds: float = config.setting(0.0, 0.0, 1e9, "> 0: a wall-clock budget per (arm, seed)")
    preset: str = "ablation"
    why: str = ""  # required when seeds < 3: why fewer seeds are enough
    eval_examples: int = config.setting(config.ABLATION.eval_examples, 10, 1_000_000)
    eval_depths: tuple[int, ...] = config.setting(config.ABLATION.eval_depths, 1, 1024)
    train_max_difficulty: int | None = config.setting(None, 0, 1_000_000, "cut the training targets here")
    matched: tuple[str, ...] = ()  # axes on which the verdict's comparison (first tested arm vs
    # baseline) is matched, within ABLATION.match_ratio (MATCH_AXES); checked at validation

    def _check_relations(self) -> None:
        _check_spec(self)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["train_max_difficulty"] is None:
            del d["train_max_difficulty"]  # TOML has no null: absent means the task's own cut
        return d

    @property
    def cell(self) -> PrimaryCell:
        return PrimaryCell.parse(self.primary)

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seed_offset, self.seed_offset + self.seeds))


def parse_spec(values: dict[str, Any]) -> AblationSpec:
    """Untrusted mapping (a toml file, a queue spec) -> AblationSpec, or ConfigError naming the
    field. The task directory is read here too, so a bad file fails before training."""
    values = dict(values)
    allowed = {f.name for f in dataclasses.fields(AblationSpec)}
    unknown = [f"ablation.{key}: unknown key{config.did_you_mean(key, allowed)} "
               f"(allowed: {', '.join(sorted(allowed))})" for key in values if key not in allowed]
    if unknown:
        raise ConfigError("; ".join(unknown))
    raw_arms = values.pop("arms", None)
    if not isinstance(raw_arms, (list, tuple)) or len(raw_arms) < 2:
        raise ConfigError("ablation.arms: at least 2 arms are needed ([[arms]] tables)")
    arms = []
    for i, raw in enumerate(raw_arms):
        where = f"ablation.arms[{i}]"
        if isinstance(raw, ArmSpec):
            raw = dataclasses.asdict(raw)
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a table, got {type(raw).__name__} {raw!r}")
        try:
            arms.append(config.from_mapping(ArmSpec, raw, where))
        except ConfigError as e:  # the arm's own fault names read ablation.arms[i].<key>
            raise ConfigError(re.sub(r"(^|; )arm\.", rf"\g<1>{where}.", str(e))) from None
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ConfigError(f"ablation.arms: arm names must be unique (got {', '.join(names)})")
    for key in ("baseline", "primary"):
        if key not in values:
            hint = (" (the cell the verdict reads, chosen before the run: split[:bucket][@depth], "
                    "e.g. primary = \"hops3\")") if key == "primary" else ""
            raise ConfigError(f"ablation.{key}: required key is missing{hint}")
    return AblationSpec(arms=tuple(arms), **values)  # types, ranges, then _check_spec


def _check_spec(spec: AblationSpec) -> None:
    check_name("ablation.task", spec.task)  # recorded and shown even when task_dir replaces it
    if spec.baseline not in [a.name for a in spec.arms]:
        raise ConfigError(f"ablation.baseline: {spec.baseline!r} is not an arm "
                          f"(arms: {', '.join(a.name for a in spec.arms)})")
    if spec.seeds < 3 and not spec.why:
        raise ConfigError(f"ablation.seeds: {spec.seeds} < 3 needs a reason in `why`")
    if spec.steps and spec.seconds:
        raise ConfigError("ablation.seconds: give steps or seconds, not both")
    if not spec.eval_depths:
        raise ConfigError("ablation.eval_depths: give at least one test depth")
    for axis in spec.matched:
        if axis not in MATCH_AXES:
            raise ConfigError(f"ablation.matched: unknown axis {axis!r} (allowed: {', '.join(MATCH_AXES)})")
    if spec.preset not in config.PRESETS:
        raise ConfigError(f"ablation.preset: unknown preset {spec.preset!r} "
                          f"(allowed: {', '.join(config.PRESETS)})")
    if not spec.task_dir and spec.task not in TASK_NAMES:
        raise ConfigError(f"ablation.task: unknown task {spec.task!r} (allowed: {', '.join(TASK_NAMES)}, "
                          "or task_dir)")
    task = make_task(spec.task, spec.task_dir or None, seed=0)
    if spec.task_dir:  # the directory names the task (dir:NAME) and its test*.jsonl files the splits
        if Path(spec.task_dir).name:
            check_name("ablation.task_dir", Path(spec.task_dir).name, "the directory ")
        for split in task.splits:
            check_name("ablation.task_dir", split, "the split (a test*.jsonl file's name) ")
    _check_primary(spec, task)
    configs = [arm_config(spec, arm, task, where=f"ablation.arms[{i}]") for i, arm in enumerate(spec.arms)]
    if spec.matched:
        sizes = [arm_sizes(c, arm, spec.cell) for c, arm in zip(configs, spec.arms, strict=True)]
        base = [a.name for a in spec.arms].index(spec.baseline)
        i = next(j for j in range(len(spec.arms)) if j != base)  # the arm the verdict is about
        for axis in spec.matched:
            r = ratio(sizes[i][axis], sizes[base][axis])
            if r > config.ABLATION.match_ratio:
                raise ConfigError(f"ablation.matched: {axis} of {spec.arms[i].name} ({sizes[i][axis]:,.0f}) "
                                  f"and {spec.baseline} ({sizes[base][axis]:,.0f}) differ {r:.2f}x "
                                  f"(> {config.ABLATION.match_ratio}x): not matched")


def _check_primary(spec: AblationSpec, task: Task) -> None:
    check_primary(spec.cell, task, spec.seed_offset, spec.eval_examples)


def check_primary(cell: PrimaryCell, task: Task, seed: int, eval_examples: int,
                  where: str = "ablation.primary") -> None:
    """A cell the task can fill: a split it has, a bucket of it (holding answers in the test set
    of `seed`), a depth in range. Also the full run's check (jobs/train.py), named by `where`."""
    if cell.split not in task.splits:
        raise ConfigError(f"{where}: unknown split {cell.split!r} "
                          f"(allowed: {', '.join(task.splits)})")
    if cell.bucket != "all" and cell.bucket not in task.buckets:
        raise ConfigError(f"{where}: unknown bucket {cell.bucket!r} of {task.name} "
                          f"(allowed: all, {', '.join(task.buckets)})")
    if cell.depth is not None and not 1 <= cell.depth <= 1024:
        raise ConfigError(f"{where}: depth {cell.depth} is out of range (allowed: [1, 1024])")
    if cell.bucket != "all" and not task.generative:
        from harness.tasks import counts, units
        from harness.train_task import data_rng

        test = task.test_batch(cell.split, data_rng(seed, cell.split), eval_examples)
        n = counts(task, units(task, test.y, test)[1])
        if not n[cell.bucket]:
            held = ", ".join(b for b in task.buckets if n[b])
            raise ConfigError(f"{where}: bucket {cell.bucket!r} has no answers in split "
                              f"{cell.split!r} (it holds: {held})")


def distinct_blocks(m: config.ModelConfig) -> int:
    """Blocks with their own weights: the refiner's prelude plus its one shared block."""
    return m.n_prelude + 1 if m.arch == "refiner" else m.n_layers


def read_depth(m: config.ModelConfig, n_steps: int | None, cell: PrimaryCell) -> int:
    """The depth an arm's primary value is read at: the cell's depth for a looped arm, else the
    arm's own depth (a flat model has one depth of its own)."""
    if m.arch == "refiner" and cell.depth is not None:
        return cell.depth
    return n_steps or m.depth_eval


def arm_sizes(cfg: config.Config, arm: ArmSpec, cell: PrimaryCell) -> dict[str, float]:
    """Parameters, distinct blocks and FLOPs per token (training, and inference at the read
    depth) of an arm, the axes of MATCH_AXES: from the config alone, so that validating a spec
    (at submit, and in the daemon's pipeline decisions) imports no torch."""
    from models.flops import forward_flops_per_token, param_count, train_flops_per_token

    params = param_count(cfg.model)
    depth = read_depth(cfg.model, arm.n_steps, cell)
    return {"params": float(params), "distinct_blocks": float(distinct_blocks(cfg.model)),
            "train_flops": train_flops_per_token(cfg.model),
            "inference_flops": forward_flops_per_token(cfg.model, depth)}


def ratio(a: float, b: float) -> float:
    lo, hi = min(a, b), max(a, b)
    return math.inf if lo <= 0 else hi / lo


def arm_config(spec: AblationSpec, arm: ArmSpec, task: Task, where: str = "arm") -> config.Config:
    """The arm's full config: the preset for its arch, the task's vocabulary and length, the
    spec's budget, the flat-n rule for reasoners (module docstring), then the arm's overrides."""
    budget: dict[str, Any] = {}
    if spec.seconds:
        budget.update(max_seconds=spec.seconds, max_steps=100_000_000)  # the clock decides
    elif spec.steps:
        budget["max_steps"] = spec.steps
    for key in arm.set:
        try:
            _section, bare = config.split_key(key)
        except ConfigError as e:
            raise ConfigError(f"{where}.set.{key}: unknown config key") from e
        if bare in NOT_APPLIED:
            raise ConfigError(f"{where}.set.{key}: the harness does not apply this key ({NOT_APPLIED[bare]})")
    try:
        overrides = task_overrides(arm.arch, arm.n_steps, task, arm.set, budget)
        cfg = config.preset(spec.preset, arm.arch, **overrides)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    check_arm_depth(cfg, arm.arch, arm.n_steps, where)
    return cfg


def task_overrides(arch: str, n_steps: int | None, task: Task, settings: dict[str, Any],
                   budget: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config overrides that train `arch` at depth `n_steps` on `task`: the task's vocabulary
    and length, the budget, the flat-n rule for reasoners (module docstring), then `settings`.
    An arm's config and a full run's on a task (jobs/train.py) are both built from it, so a full
    run trains the model the ablation tested."""
    overrides: dict[str, Any] = {"vocab_size": task.vocab_size, "block_size": task.block_size}
    overrides.update(budget or {})
    if arch == "reasoner" and n_steps is not None and not set(settings) & set(_DEPTH_KEYS):
        overrides.update(n_layers=n_steps, depth_min=n_steps, depth_max=n_steps, depth_eval=n_steps)
    overrides.update(settings)
    return overrides


def check_arm_depth(cfg: config.Config, arch: str, n_steps: int | None, where: str) -> None:
    """A reasoner cannot be read at more layers than it owns (`<where>.n_steps`)."""
    if arch == "reasoner" and n_steps is not None and n_steps > cfg.model.n_layers:
        raise ConfigError(f"{where}.n_steps: {n_steps} > n_layers {cfg.model.n_layers}")


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


def _depths_for(spec: AblationSpec, cfg: config.Config) -> tuple[int, ...]:
    return measured_depths(spec.eval_depths, spec.cell, cfg)


def measured_depths(eval_depths: tuple[int, ...], cell: PrimaryCell | None,
                    cfg: config.Config) -> tuple[int, ...]:
    """The test depths an arm is measured at: the spec's, plus the primary cell's for a looped arm."""
    depths = set(eval_depths)
    if cfg.model.arch == "refiner" and cell is not None and cell.depth is not None:
        depths.add(cell.depth)
    return tuple(sorted(depths))


def _work_items(spec: AblationSpec, configs: list[config.Config], device: str) -> list[Any]:
    from harness.train_task import Work

    items = [Work(arm_index=i, arm_name=arm.name, seed=seed, cfg=configs[i], n_steps=arm.n_steps,
                  eval_depths=_depths_for(spec, configs[i]), eval_examples=spec.eval_examples,
                  task_name=None if spec.task_dir else spec.task, task_dir=spec.task_dir or None,
                  task_sizes=config.TASKS, device=device, train_examples=config.ABLATION.train_examples,
                  train_max_difficulty=spec.train_max_difficulty)
             for seed in spec.seed_list for i, arm in enumerate(spec.arms)]
    # the costliest first, so the last item to finish is a cheap one (better packing)
    from models.flops import train_flops_per_token

    return sorted(items, key=lambda w: -train_flops_per_token(w.cfg.model) * (w.cfg.train.batch_size))


_progress_queue: Any = None  # in a child process: where progress goes (set by _init_child)
# What every seed process imports before its first step, loaded once in the fork server.
CHILD_PRELOAD = ["harness.train_task", "harness.tasks", "models.refiner", "models.reasoner", "models.step",
                 "torch._dynamo"]  # a process's first optimizer step imports torch._dynamo (~1 s)


def _child_context() -> Any:
    """The seed processes' start method: a fork server that has imported torch and the harness
    once (CHILD_PRELOAD), so each seed process is a fork of it and not a fresh interpreter that
    imports them again (~2.5 CPU-s each); fork from this process is not safe once torch has run
    here. The server starts on the first pool and serves this process's later ones."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(CHILD_PRELOAD)
    return ctx


def _init_child(progress_queue: Any) -> None:
    global _progress_queue
    _progress_queue = progress_queue


def _run_in_child(work: Any) -> Any:
    from harness.train_task import train_and_eval

    def report(step: int, total: int, loss: float) -> None:
        _progress_queue.put((work.arm_index, work.seed, step, total, loss))

    return train_and_eval(work, report)


def use_batched(device: str) -> bool:
    """Whether an ablation's Works train as one group in this process (harness/batched.py): on
    the GPU lane always (one process, one CUDA context); on CPU as config.ABLATION.batched_cpu
    says (chosen by measurement: see its comment)."""
    return device != "cpu" or config.ABLATION.batched_cpu


def _run_all(items: list[Any], spec: AblationSpec, ctx: Any) -> list[Any]:
    """Run every (arm, seed): as one group in this process (use_batched), else in
    `parallel_seeds` child processes (one torch thread each); forward their progress to
    ctx.progress as one overall step count."""
    if items and use_batched(items[0].device):
        return _run_grouped(items, spec, ctx)
    return _run_pool(items, spec, ctx)


def _log_done(ctx: Any, w: Any, r: Any) -> None:
    own = r.grid[max(d for d in r.grid if d <= (w.n_steps or w.cfg.model.depth_eval))]
    accs = " ".join(f"{k}={_pct(v['all'])}" for k, v in own.items())
    ctx.log(f"done {w.arm_name} seed {w.seed}: {r.steps} steps in {r.wall_s:.0f}s "
            f"({r.cpu_s:.0f} CPU s), {accs}")


def _run_grouped(items: list[Any], spec: AblationSpec, ctx: Any) -> list[Any]:
    """Every (arm, seed) in this process (harness/batched.py: the seeds of one config stacked
    under vmap, the rest one step of each in turn): the same results as the process pool within
    float tolerance, one CUDA context on the GPU lane."""
    from harness.batched import group_threads, stacks, train_group

    done_steps: dict[tuple[int, int], int] = {}
    totals = {(w.arm_index, w.seed): 0 if w.cfg.train.max_seconds else w.cfg.train.max_steps for w in items}
    last_report = 0.0

    def report(w: Any, step: int, total: int, loss: float) -> None:
        nonlocal last_report
        done_steps[(w.arm_index, w.seed)], totals[(w.arm_index, w.seed)] = step, total
        if time.monotonic() - last_report >= config.ABLATION.progress_seconds:
            last_report = time.monotonic()
            ctx.progress(sum(done_steps.values()), sum(totals.values()), arm=w.arm_name, seed=w.seed,
                         arm_step=step, loss=float(loss))

    # the pool's core budget: parallel_seeds processes of one thread, or one group of that many
    threads = group_threads(items[0].device, config.ABLATION.parallel_seeds)
    stacked = ", ".join(f"{items[u[0]].arm_name} x{len(u)}" for u in stacks(items) if len(u) > 1)
    ctx.log(f"grouped: {len(items)} (arm, seed) runs in one process on {items[0].device}, "
            f"{threads} torch threads; stacked under vmap: {stacked or 'none'}")
    results = train_group(items, report, on_done=lambda w, r: _log_done(ctx, w, r), threads=threads)
    steps = sum(r.steps for r in results)
    ctx.progress(steps, steps, arms=len({w.arm_index for w in items}), seeds=spec.seeds)
    return results


def _run_pool(items: list[Any], spec: AblationSpec, ctx: Any) -> list[Any]:
    """Every (arm, seed) in `parallel_seeds` spawned child processes of one torch thread each."""
    workers = max(1, min(config.ABLATION.parallel_seeds, len(items)))
    spawn = _child_context()
    progress_queue = spawn.Queue()
    done_steps: dict[tuple[int, int], int] = {}
    # under a wall-clock budget the total is not known until a child estimates it
    totals = {(w.arm_index, w.seed): 0 if w.cfg.train.max_seconds else w.cfg.train.max_steps for w in items}
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
                    _log_done(ctx, w, r)
    finally:
        progress_queue.close()
    steps = sum(r.steps for r in results)
    ctx.progress(steps, steps, arms=len(names), seeds=spec.seeds)  # the last report says done
    return results


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("torch", "numpy", "scipy", "matplotlib"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def _baselines(spec: AblationSpec, task: Task) -> dict[str, dict[str, dict[str, float | None]]]:
    return trivial_baselines(spec.task, task, spec.seed_list, spec.eval_examples, spec.train_max_difficulty)


def trivial_baselines(task_name: str, task: Task, seeds: list[int], eval_examples: int, cut: int | None
                      ) -> dict[str, dict[str, dict[str, float | None]]]:
    """Trivial predictors on the same test sets as the arms, per cell, averaged over seeds:
    split -> predictor -> "all" | bucket -> accuracy."""
    from harness.tasks import baseline_cells
    from harness.train_task import data_rng

    if task.generative:
        return {s: task.baseline_cells_of(s) for s in task.splits}  # type: ignore[attr-defined]
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for split in task.splits:
        per_seed = []
        for seed in seeds:
            t = make_task(task_name, None, seed=seed)
            test = t.test_batch(split, data_rng(seed, split), eval_examples)
            per_seed.append(baseline_cells(t, test, t.train_batch(data_rng(seed), 2000, cut), cut))
        out[split] = {name: {c: _mean([b[name][c] for b in per_seed]) for c in per_seed[0][name]}
                      for name in per_seed[0]}
    return out


def trivial_on(baselines: dict[str, dict[str, dict[str, float | None]]], cell: PrimaryCell
               ) -> dict[str, float | None]:
    """Each trivial predictor's (and reference's, REFERENCES) accuracy on the primary cell."""
    return {name: cells.get(cell.bucket) for name, cells in baselines.get(cell.split, {}).items()}


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def _interval_of(values: list[float | None], conf: float) -> dict[str, Any]:
    iv = stats.t_interval([v for v in values if v is not None], conf)
    return {"mean": iv.mean, "ci_low": iv.low, "ci_high": iv.high, "n": iv.n}


def _summarise(spec: AblationSpec, task: Task, configs: list[config.Config], sizes: list[dict[str, float]],
               results: list[Any], baselines: dict[str, Any]) -> dict[str, Any]:
    """Intervals, the Holm-corrected verdicts on the primary cell, the grids and the matching."""
    from models.flops import forward_flops_per_token

    conf, min_effect, cell = config.ABLATION.confidence, config.ABLATION.min_effect, spec.cell
    by = {(r.arm_index, r.seed): r for r in results}
    seeds = spec.seed_list
    base_i = [a.name for a in spec.arms].index(spec.baseline)

    def values(i: int, split: str, depth: int, bucket: str) -> list[float | None]:
        return [by[(i, s)].grid[depth][split][bucket] for s in seeds]

    arms: list[dict[str, Any]] = []
    primary_values: list[list[float]] = []
    for i, arm in enumerate(spec.arms):
        m = configs[i].model
        depth = read_depth(m, arm.n_steps, cell)
        own = arm.n_steps or m.depth_eval
        per_seed = values(i, cell.split, depth, cell.bucket)
        if any(v is None for v in per_seed):
            raise ConfigError(f"ablation.primary: cell {cell} has no answers for {arm.name} on some seed")
        primary_values.append([float(v) for v in per_seed])  # type: ignore[arg-type]
        iv = stats.t_interval(primary_values[-1], conf)
        depths = sorted(by[(i, seeds[0])].grid)
        grid = {sp: {str(d): {c: _mean(values(i, sp, d, c)) for c in ("all", *task.buckets)} for d in depths}
                for sp in task.splits}
        arms.append({
            "name": arm.name, "arch": arm.arch, "n_steps": arm.n_steps, "test_depth": own,
            "read_depth": depth,
            "params": int(sizes[i]["params"]), "distinct_blocks": int(sizes[i]["distinct_blocks"]),
            "flops_per_token": sizes[i]["train_flops"],  # training, over the training depth distribution
            "inference_flops_per_token": {str(d): forward_flops_per_token(m, d) for d in depths},
            "mean": iv.mean, "ci_low": iv.low, "ci_high": iv.high, "per_seed": primary_values[-1],
            "splits": {sp: _interval_of(values(i, sp, own, "all"), conf) for sp in task.splits},
            "grid": grid,
            "steps": [by[(i, s)].steps for s in seeds], "wall_s": [by[(i, s)].wall_s for s in seeds],
            "cpu_s": [by[(i, s)].cpu_s for s in seeds],
            "final_loss": [by[(i, s)].final_loss for s in seeds],
            "skipped_steps": [by[(i, s)].skipped_steps for s in seeds],
        })
    tested = [i for i in range(len(arms)) if i != base_i]
    diffs = {i: stats.paired_difference(primary_values[i], primary_values[base_i], conf) for i in tested}
    adjusted = stats.holm([diffs[i].p for i in tested])
    for i, entry in enumerate(arms):
        if i == base_i:
            entry.update(verdict="baseline", diff=None, matching=None)
            continue
        diff, p_holm = diffs[i], adjusted[tested.index(i)]
        entry["diff"] = {"mean": diff.mean, "ci_low": diff.low, "ci_high": diff.high, "p": diff.p,
                         "p_holm": p_holm}
        entry["verdict"] = stats.verdict(diff, min_effect, p_holm, conf)
        entry["matching"] = {axis: {"arm": sizes[i][axis], "baseline": sizes[base_i][axis],
                                    "ratio": ratio(sizes[i][axis], sizes[base_i][axis]),
                                    "matched": ratio(sizes[i][axis], sizes[base_i][axis])
                                    <= config.ABLATION.match_ratio}
                             for axis in MATCH_AXES}
    verdict = stats.overall_verdict([arms[i]["verdict"] for i in tested])
    from harness.tasks import REFERENCES

    trivial = trivial_on(baselines, cell)
    known = {k: v for k, v in trivial.items() if v is not None and k not in REFERENCES}
    best = max(known, key=lambda k: known[k]) if known else None
    references = {k: v for k, v in trivial.items() if v is not None and k in REFERENCES}
    overlap = {sp: {"lines": max(by[k].overlap[sp]["lines"] for k in by),
                    "in_train": max(by[k].overlap[sp]["in_train"] for k in by)} for sp in task.splits}
    deepest = task.deepest_trained(spec.train_max_difficulty)
    never = [b for b, (lo, _) in task.buckets.items() if deepest is not None and lo > deepest]
    held = {b for r in results for b, n in r.counts.get(cell.split, {}).items() if n and b != "all"}
    # the cell measures extrapolation when every answer in it is deeper than training went
    extrapolation = cell.bucket in never if cell.bucket != "all" else bool(held) and held <= set(never)
    summary = {"verdict": verdict, "primary": str(cell), "primary_cell": dataclasses.asdict(cell),
               "baseline": spec.baseline, "confidence": conf, "min_effect": min_effect,
               "correction": "holm" if len(tested) > 1 else "none", "tested_arms": len(tested),
               "matched": list(spec.matched), "match_ratio": config.ABLATION.match_ratio,
               "best_trivial": {"name": best, "value": known[best]} if best else None,
               "references": references,
               "deepest_trained": deepest,
               "never_trained": never, "extrapolation": extrapolation,
               "overlap": overlap, "arms": arms, "baselines": baselines}
    summary["verdict_line"] = verdict_line(summary)
    return summary


def verdict_line(summary: dict[str, Any]) -> str:
    """One line that names the verdict, the primary cell, the comparison and any shortcut."""
    arms = summary["arms"]
    subject = next((a for a in arms if a["verdict"] != "baseline"), None)
    base = next(a for a in arms if a["verdict"] == "baseline")
    text = f"{summary['verdict']} on {summary['primary']}"
    if subject is None:
        return text
    d = subject["diff"]
    text += (f" ({subject['name']} {_pct(subject['mean'])} vs {base['name']} {_pct(base['mean'])}, "
             f"paired {_pct(d['mean'], '+')} [{_pct(d['ci_low'], '+')}, {_pct(d['ci_high'], '+')}]")
    if summary["correction"] == "holm":
        text += f", Holm p {_pct(d['p_holm'])} over {summary['tested_arms']} arms"
    text += ")"
    best = summary.get("best_trivial")
    winner = subject if summary["verdict"] == "better" else base if summary["verdict"] == "worse" else None
    if winner is not None and best and winner["mean"] is not None and winner["mean"] <= best["value"]:
        text += (f"; the winner does not clear the trivial baseline {best['name']} "
                 f"({_pct(best['value'])}): a shortcut, not reasoning")
    for name, value in (summary.get("references") or {}).items() if summary.get("extrapolation") else ():
        if winner is not None and winner["mean"] is not None and winner["mean"] <= value:
            text += f"; the winner does not beat the reference {name} ({_pct(value)})"
    unmatched = [a for a, m in (subject.get("matching") or {}).items() if not m["matched"]]
    if unmatched:
        text += f"; not matched: {', '.join(unmatched)}"
    return text


def run_ablation(spec: AblationSpec, ctx: Any) -> dict[str, Any]:
    """Run the ablation into ctx.run_dir; return the summary (what `--json` prints). Usable from
    the CLI (a LocalContext) and the queue job alike."""
    import torch

    started, t0 = datetime.now(UTC), time.monotonic()
    commit = code_commit()  # the code that runs: read now, not after a later commit
    run_dir = Path(ctx.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    task = make_task(spec.task, spec.task_dir or None, seed=0)
    configs = [arm_config(spec, arm, task, f"ablation.arms[{i}]") for i, arm in enumerate(spec.arms)]
    torch.set_num_threads(1)
    sizes = [arm_sizes(c, arm, spec.cell) for c, arm in zip(configs, spec.arms, strict=True)]
    items = _work_items(spec, configs, getattr(ctx, "device", "cpu"))
    budget = f"{spec.seconds:.0f} s" if spec.seconds else f"{configs[0].train.max_steps} steps"
    ctx.log(f"ablation: task {task.name}, {len(spec.arms)} arms x {spec.seeds} seeds, {budget} per arm "
            f"and seed, {config.ABLATION.parallel_seeds} processes; primary cell {spec.cell} "
            "(chosen before the run)")
    from models.step import TrainingDiverged

    try:
        results = _run_all(items, spec, ctx)
    except TrainingDiverged as e:  # a NaN loss: the ablation failed (not the input)
        raise FloatingPointError(str(e)) from None
    summary = _summarise(spec, task, configs, sizes, results, _baselines(spec, task))
    if task.generative:
        summary["overlap"] = task.overlap()  # type: ignore[attr-defined]
    summary["run_dir"] = str(run_dir)
    minutes = (time.monotonic() - t0) / 60
    summary["minutes"] = minutes
    summary = _finite(summary)  # strict JSON: an undefined interval (one seed) is null

    record = {
        "spec": spec.to_dict(), "task": {"name": task.name, "vocab": task.vocab, "splits": list(task.splits),
                                         "unit": task.unit, "buckets": list(task.buckets),
                                         "sizes": dataclasses.asdict(config.TASKS)},
        "configs": [c.to_dict() for c in configs], "ablation_config": dataclasses.asdict(config.ABLATION),
        "per_seed": [{"arm": spec.arms[r.arm_index].name, "seed": r.seed, "steps": r.steps,
                      "wall_s": r.wall_s, "cpu_s": r.cpu_s, "final_loss": r.final_loss,
                      "grid": {str(d): v for d, v in r.grid.items()}, "counts": r.counts,
                      "overlap": r.overlap, "curve": r.curve}
                     for r in sorted(results, key=lambda r: (r.arm_index, r.seed))],
        "summary": summary, "git_commit": commit, "versions": _versions(),
        "started": started.isoformat(timespec="seconds"),
        "finished": utc_now(), "host": config.paths().host,
    }
    write_json_atomic(run_dir / "ablation.json", _finite(record))
    (run_dir / "report.md").write_text(render_report(spec, task, summary), encoding="utf-8")
    from harness.plot import plot_accuracy

    plot_accuracy(record, run_dir / "accuracy.png")
    for arm in summary["arms"]:
        ctx.log(f"{arm['name']}: {_pct(arm['mean'])} [{_pct(arm['ci_low'])}, {_pct(arm['ci_high'])}] "
                f"on {summary['primary']} at depth {arm['read_depth']}: {arm['verdict']}")
    ctx.log(f"minutes: {minutes:.2f}")
    ctx.log(f"primary: {summary['primary']}")
    ctx.log(f"verdict: {summary['verdict_line']}")
    return summary


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


def _ratio_text(m: dict[str, Any]) -> str:
    return f"{m['ratio']:.2f}x" if math.isfinite(m["ratio"]) else "inf"


def render_report(spec: AblationSpec, task: Task, summary: dict[str, Any]) -> str:
    """report.md. Every name in it is printed as it is, which is safe because validation made
    each one plain (PLAIN_NAME: arms, the task, a task directory's splits) or the harness chose
    it (buckets, trivial baselines, verdicts); the result comment embeds this file."""
    from harness.tasks import REFERENCES

    cell, conf = spec.cell, int(round(summary["confidence"] * 100))
    arms, baselines = summary["arms"], summary["baselines"]
    lines = [f"# Ablation on `{task.name}`: **{summary['verdict']}** on `{summary['primary']}`", "",
             f"verdict: {summary['verdict_line']}", "",
             f"Primary cell `{cell}` (chosen before the run): split `{cell.split}`, "
             + ("every answer" if cell.bucket == "all" else f"difficulty bucket `{cell.bucket}`")
             + (f", looped arms read at {cell.depth} passes" if cell.depth else ", each arm at its own depth")
             + f"; {task.unit} accuracy; {spec.seeds} seeds ({spec.seed_list[0]}..{spec.seed_list[-1]}); "
             f"{conf}% t intervals; `better` needs the paired difference significant"
             + (f" after a Holm correction over {summary['tested_arms']} tested arms"
                if summary["correction"] == "holm" else "")
             + f" and a gain >= {summary['min_effect']}.", "",
             f"| arm | params | distinct blocks | train FLOPs/token | read depth | inference FLOPs/token "
             f"| {cell} mean [{conf}% CI] | vs {spec.baseline} [{conf}% CI] | p (Holm) | verdict |",
             "|---|---:|---:|---:|---:|---:|---|---|---:|---|"]
    for a in arms:
        d = a["diff"]
        vs = "—" if d is None else _interval(d, "+")
        p = "—" if d is None else _pct(d.get("p_holm"))
        inf = a["inference_flops_per_token"].get(str(a["read_depth"]))
        lines.append(f"| {a['name']} | {a['params']:,} | {a['distinct_blocks']} | {a['flops_per_token']:.3g} "
                     f"| {a['read_depth']} | {inf:.3g} | {_interval(a)} | {vs} | {p} | {a['verdict']} |")
    lines += ["", f"**Matching** (flagged beyond {summary['match_ratio']}x; declared in the spec: "
              f"{', '.join(summary['matched']) or 'nothing'}):", ""]
    for a in arms:
        if not a.get("matching"):
            continue
        ok = [f"{k} {_ratio_text(m)}" for k, m in a["matching"].items() if m["matched"]]
        bad = [f"{k} {_ratio_text(m)}" for k, m in a["matching"].items() if not m["matched"]]
        lines.append(f"- {a['name']} vs {spec.baseline}: matched {', '.join(ok) or 'nothing'}; "
                     f"**not matched: {', '.join(bad) or 'nothing'}**")
    best = summary.get("best_trivial")
    lines += ["", f"**Trivial baselines (and references) on `{cell.split}` / `{cell.bucket}`:** "
              + ", ".join(f"{k} {_pct(v.get(cell.bucket))}" for k, v in baselines.get(cell.split, {}).items())
              + (f" (best: {best['name']})" if best else ""), ""]
    overlap = summary.get("overlap") or {}
    lines += ["**Test lines found in the training stream:** "
              + ", ".join(f"{s} {o['in_train']}/{o['lines']}" for s, o in overlap.items()), ""]
    deepest = summary.get("deepest_trained")
    if deepest is not None:
        never = summary.get("never_trained") or []
        lines += [f"Trained on difficulty <= {deepest}; buckets never trained: "
                  f"{', '.join(never) or 'none'}.", ""]
    lines += ["Accuracy by split (every answer, at each arm's own depth):", "",
              "| arm | " + " | ".join(task.splits) + " |", "|---|" + "---:|" * len(task.splits)]
    for a in arms:
        lines.append(f"| {a['name']} | " + " | ".join(_pct(a["splits"][s]["mean"]) for s in task.splits)
                     + " |")
    for name in baselines.get(cell.split, {}):
        kind = "reference" if name in REFERENCES else "trivial"
        lines.append(f"| *{name}* ({kind}) | "
                     + " | ".join(_pct(baselines[s].get(name, {}).get("all")) for s in task.splits) + " |")
    for split in task.splits:
        held = [b for b in task.buckets if any(
            a["grid"][split][d][b] is not None for a in arms for d in a["grid"][split])]
        cols = ["all", *held]
        never = summary.get("never_trained", [])
        heads = [c + (" (never trained)" if c in never else "") for c in cols]
        lines += ["", f"Depth x difficulty on `{split}` (mean over seeds; ← marks the depth the verdict "
                  "reads):", "", "| arm | depth | " + " | ".join(heads) + " |",
                  "|---|---:|" + "---:|" * len(cols)]
        for a in arms:
            for d, row in a["grid"][split].items():
                arrow = " ←" if split == cell.split and int(d) == a["read_depth"] else ""
                lines.append(f"| {a['name']} | {d}{arrow} | " + " | ".join(_pct(row[c]) for c in cols) + " |")
        for name, row in baselines.get(split, {}).items():
            lines.append(f"| *{name}* | — | " + " | ".join(_pct(row.get(c)) for c in cols) + " |")
    lines += ["", f"verdict: {summary['verdict_line']}", ""]
    return "\n".join(lines)


def new_run_dir(prefix: str = "ablate") -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return Path(config.paths().runs) / f"{prefix}-{stamp}"
