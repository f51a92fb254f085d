"""train: train a model on a tokenized dataset; the run dir gets checkpoints, metrics and a
config.json (models/train.py). A requeued or resumed job continues from its own ckpt_last.pt
exactly where it stopped (`resume`, on by default, so a killed job loses no finished steps).

With `task` (a generated task) or `task_dir` (a bring-your-own task directory) instead of
`data`, it is the full run of an ablation's question: the model is built as the ablation builds
an arm (harness/ablate.py task_overrides: the task's vocabulary and length, the flat-n rule for
a reasoner with `n_steps`), trained by the harness's own loop (harness/train_task.py ArmRun, the
same TrainStep), and measured on the depth x split x bucket grid, the `primary` cell and the
task's trivial baselines read out. Checkpoints, metrics.jsonl and exact resume as above.

Example: lab submit train --set task=chase --set preset=rtx2060_task --set arch=refiner
         --set n_steps=16 --set primary='sparse:7-8@16'
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import config
from config import DATASET_NAME_RE, SAMPLE_DATASET, ConfigError, Validated, setting, show
from jobs import spec_to_dict

LANES = ("gpu", "cpu")
# The fields that describe a task run; a token-corpus run has none of them.
TASK_FIELDS = ("n_steps", "eval_depths", "eval_examples", "train_max_difficulty", "primary", "arm")
# Config keys a task run decides itself, as the ablation does for its arms (harness/ablate.py
# NOT_APPLIED): setting one would describe a run that never happened.
TASK_OWNED = {"vocab_size": "the task sets it", "block_size": "the task sets it",
              "seed": "the spec's `seed` seeds a task run", "val_fraction": "a token run's setting"}
# What reading a task directory can still raise for a strange value past the type checks: a
# name too long for the filesystem or with a NUL byte, a file that is not UTF-8, JSON nested
# too deep (jobs/ablation.py guards the same reads).
_TASK_LEAKS = (TypeError, ValueError, OverflowError, RecursionError, OSError)


@dataclass(frozen=True)
class Spec(Validated):
    preset: str = "tiny"
    arch: str | None = None  # None: config.default_arch()
    set: dict = field(default_factory=dict)  # config overrides by key, e.g. {"d_model": 128}
    data: str = SAMPLE_DATASET  # a dataset under $LAB_RUNS/data (`lab tokenize`)
    resume: bool = True  # continue from this run's ckpt_last.pt when there is one
    task: str | None = None  # a generated task (harness/tasks.py TASK_NAMES) instead of `data`
    task_dir: str | None = None  # a bring-your-own task directory (train.jsonl, test*.jsonl)
    n_steps: int | None = setting(None, 1, 128, "the depth at test; a reasoner's size too, as for an "
                                  "ablation arm (flat-n)")
    eval_depths: tuple[int, ...] | None = setting(None, 1, 1024, "test depths of the final grid "
                                                  "(default: the ablation's)")
    eval_examples: int | None = setting(None, 10, 1_000_000, "test lines per split (default: the ablation's)")
    train_max_difficulty: int | None = setting(None, 0, 1_000_000, "cut the training targets here")
    primary: str | None = None  # the cell the result reads, split[:bucket][@depth] (harness PrimaryCell)
    seed: int = setting(0, 0, 1_000_000, "a task run's seed: its data, test sets and init, as an "
                        "ablation seed's")
    # The ablation arm this run scales: recorded in the result, it seeds the init as the ablation
    # seeds that arm's, and with --earned-by the gate checks that this arm made the change.
    arm: str | None = None

    def _check_relations(self) -> None:
        if not is_task_run(self):
            for name in TASK_FIELDS:
                if getattr(self, name) is not None:
                    raise ConfigError(f"train.{name}: only a task run has it (give task or task_dir)")
            if self.seed:
                raise ConfigError("train.seed: only a task run has it (a token run sets train.seed "
                                  "in `set`)")
        elif self.arm is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.arm):
            raise ConfigError(f"train.arm: {show(self.arm)} is not an arm name (1-64 letters, digits, "
                              "'_', '.' or '-')")
        elif self.data != SAMPLE_DATASET:
            raise ConfigError(f"train.data: {show(self.data)} and task/task_dir exclude each other "
                              "(a task run trains on its task; leave data out)")
        check_config(self)  # names the bad preset, arch or key now, not when the job runs
        # fullmatch: with re.match a `$` would also accept "name\n"
        if not re.fullmatch(DATASET_NAME_RE, self.data):
            raise ConfigError(f"train.data: {show(self.data)} is not a dataset name (letters, digits, '_.-')")
        if is_task_run(self):
            task_cell(self, load_task(self))


def is_task_run(spec: Any) -> bool:
    return getattr(spec, "task", None) is not None or getattr(spec, "task_dir", None) is not None


def load_task(spec: Any) -> Any:
    """The spec's task (harness.tasks.Task), or ConfigError naming train.task / train.task_dir."""
    from harness.ablate import check_name
    from harness.tasks import TASK_NAMES, make_task

    if spec.task is not None and spec.task_dir is not None:
        raise ConfigError("train.task_dir: give task or task_dir, not both")
    if spec.task is not None:
        if spec.task not in TASK_NAMES:
            raise ConfigError(f"train.task: unknown task {show(spec.task)} "
                              f"(allowed: {', '.join(TASK_NAMES)}, or task_dir)")
        return make_task(spec.task, None, seed=spec.seed)
    if not spec.task_dir:
        raise ConfigError("train.task_dir: give a directory (train.jsonl, test*.jsonl)")
    try:
        task = make_task(None, spec.task_dir, seed=spec.seed)
        # task and split names reach the result and its issue comment as they are: plain names only
        if Path(spec.task_dir).name:
            check_name("train.task_dir", Path(spec.task_dir).name, "the directory ")
        for split in task.splits:
            check_name("train.task_dir", split, "the split (a test*.jsonl file's name) ")
    except ConfigError as e:
        raise ConfigError(re.sub(r"^task_dir(?=[:. ])", "train.task_dir", str(e))) from None
    except _TASK_LEAKS as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise ConfigError(f"train.task_dir: could not be read ({why})") from None
    return task


def task_cell(spec: Any, task: Any) -> Any:
    """The spec's primary cell (harness PrimaryCell) checked against the task, or None."""
    from harness.ablate import PrimaryCell, check_primary

    if spec.eval_depths is not None and not spec.eval_depths:
        raise ConfigError("train.eval_depths: give at least one test depth")
    if spec.train_max_difficulty is not None and task.generative:
        import numpy as np

        try:  # a bring-your-own task's cut can leave no training line: say so at submit
            task.train_batch(np.random.default_rng(0), 1, spec.train_max_difficulty)
        except ConfigError as e:
            raise ConfigError(f"train.{e}") from None
    if spec.primary is None:
        return None
    cell = PrimaryCell.parse(spec.primary, where="train.primary")
    check_primary(cell, task, spec.seed, spec.eval_examples or config.ABLATION.eval_examples,
                  where="train.primary")
    return cell


def resolve_config(spec: Any) -> config.Config:
    """The config a train/smoke spec trains, all validated: preset, arch and overrides; for a
    task run also the task's vocabulary and length and the flat-n rule, exactly as an ablation
    arm's (harness/ablate.py task_overrides). Imports no torch: the daemon calls it at submit."""
    if not is_task_run(spec):
        return config.preset(spec.preset, spec.arch or None, **spec.set)
    from harness.ablate import check_arm_depth, task_overrides

    task = load_task(spec)
    for key in spec.set:
        try:
            bare = config.split_key(key)[1]
        except ConfigError:
            continue  # config.preset names the unknown key below
        if bare in TASK_OWNED:
            raise ConfigError(f"train.set.{key}: a task run does not apply this key ({TASK_OWNED[bare]})")
    # the flat-n rule needs the arch before the preset resolves it
    arch = spec.arch or spec.set.get("arch") or config.default_arch()
    cfg = config.preset(spec.preset, spec.arch or None, **task_overrides(arch, spec.n_steps, task, spec.set))
    check_arm_depth(cfg, cfg.model.arch, spec.n_steps, "train")
    return cfg


# config.preset names its arguments bare (`preset: ...`, `arch: ...`, `KEY: unknown config key`);
# a spec's error names them as the spec's fields, like every other (`train.preset`, `train.set.KEY`),
# so a person finds the key they wrote. A config field keeps its own name (`model.d_model`).
_BARE_ARGS = re.compile(r"(^|; )(preset|arch)(?=: )")
_BARE_OVERRIDE = re.compile(r"(^|; )([^;:]+)(?=: unknown config key)")


def check_config(spec: Any) -> None:
    """resolve_config at validation, its errors naming the spec's fields (`<kind>.preset`)."""
    kind = type(spec).FIELD_PREFIX or "train"
    try:
        resolve_config(spec)
    except ConfigError as e:
        text = _BARE_ARGS.sub(lambda m: f"{m.group(1)}{kind}.{m.group(2)}", str(e))
        text = _BARE_OVERRIDE.sub(lambda m: f"{m.group(1)}{kind}.set.{m.group(2)}", text)
        raise ConfigError(text) from None


def data_dir_for(name: str) -> Path:
    """$LAB_RUNS/data/<name>; the shipped sample is tokenized on first use."""
    from models.data import dataset_dir, ensure_sample_data

    runs = config.paths().runs
    if name == SAMPLE_DATASET:
        return ensure_sample_data(runs)
    path = dataset_dir(name, runs)
    if not (path / "meta.json").exists():
        raise FileNotFoundError(f"data: no dataset {name!r} at {path} (create it with `lab tokenize`)")
    return path


def resume_values(run_id: str) -> dict[str, Any]:
    """The spec values a foreground run was started with (its spec.json), so `lab train --resume`
    continues it; ConfigError naming --resume when the run cannot be resumed."""
    from jobs.paths import check_run_id

    run_dir = Path(config.paths().runs) / check_run_id(run_id, "--resume")  # a run id, never a path
    spec_file = run_dir / "spec.json"
    if not (run_dir / config.CKPT_LAST).exists() or not spec_file.exists():
        raise ConfigError(f"--resume: {run_dir} holds no resumable training run ({config.CKPT_LAST}, "
                          "spec.json)")
    return {k: v for k, v in json.loads(spec_file.read_text()).items() if k != "kind"}


def run(spec: Spec, ctx: Any) -> dict[str, Any]:
    from models.train import LAST, train

    cfg = resolve_config(spec)
    resume = spec.resume and (Path(ctx.run_dir) / LAST).exists()
    # The latest session's spec, with the arch resolved now: `lab train --resume` starts from it.
    spec_json = json.dumps({"kind": "train", **spec_to_dict(spec), "arch": cfg.model.arch}, indent=2)
    (Path(ctx.run_dir) / "spec.json").write_text(spec_json + "\n")
    if is_task_run(spec):
        return run_task(spec, cfg, ctx, resume)
    return train(cfg, data_dir_for(spec.data), ctx.run_dir, ctx, resume=resume)


# --------------------------------------------------------------------------------------------
# A task run


def run_task(spec: Spec, cfg: config.Config, ctx: Any, resume: bool) -> dict[str, Any]:
    """Train cfg on the spec's task with the harness's loop, checkpointing as models/train.py
    does, then measure the grid. ckpt_best.pt is the final state (a task run has no val-loss
    selection: the grid is measured once, on the final model)."""
    import torch

    from common import utc_now, write_json_atomic
    from harness.ablate import measured_depths, read_depth, trivial_baselines, trivial_on
    from harness.train_task import ArmRun, Work
    from models import count_params
    from models.train import (
        BEST,
        LAST,
        TrainingDiverged,
        check_resume_config,
        load_checkpoint,
        params_finite,
        peak_mem_mb,
        save_atomic,
    )

    started = time.monotonic()
    run_dir = Path(ctx.run_dir)
    task = load_task(spec)
    cell = task_cell(spec, task)
    t = cfg.train
    device = torch.device(getattr(ctx, "device", "cpu") or "cpu")
    if device.type == "cuda":
        if cfg.precision.gpu_memory_fraction > 0:
            torch.cuda.set_per_process_memory_fraction(cfg.precision.gpu_memory_fraction, device)
        torch.cuda.reset_peak_memory_stats(device)
    work = Work(arm_index=0, arm_name=spec.arm or "train", seed=spec.seed, cfg=cfg, n_steps=spec.n_steps,
                eval_depths=measured_depths(spec.eval_depths or config.ABLATION.eval_depths, cell, cfg),
                eval_examples=spec.eval_examples or config.ABLATION.eval_examples,
                task_name=None if spec.task_dir else spec.task, task_dir=spec.task_dir,
                task_sizes=config.TASKS, device=str(device), train_examples=config.ABLATION.train_examples,
                train_max_difficulty=spec.train_max_difficulty, threads=t.threads)
    arm = ArmRun(work)
    params = count_params(arm.model)
    held_out = arm.held_out(t.batch_size * t.eval_batches)
    metrics_path = run_dir / "metrics.jsonl"
    task_info = {"name": task.name, "task": spec.task, "task_dir": spec.task_dir, "seed": spec.seed,
                 "splits": list(task.splits), "buckets": list(task.buckets), "unit": task.unit}
    resumed_from: int | None = None
    saved_step: int | None = None
    if resume:
        ckpt = load_checkpoint(run_dir / LAST, device)
        check_resume_config(config.Config.from_dict(ckpt["config"]), cfg)
        arm.restore(ckpt)
        resumed_from = saved_step = arm.step
        _truncate_metrics(metrics_path, arm.step)
        ctx.log(f"resumed from {run_dir / LAST} at step {arm.step}")
    else:
        metrics_path.unlink(missing_ok=True)
    _write_config(run_dir / "config.json", cfg, task_info, params, str(device), resume, arm.step)
    ctx.log(f"training {cfg.model.arch} ({params:,} parameters) on {device}, task {task.name}, "
            f"{'fp16 + GradScaler' if arm.step_fn.fp16 else 'fp32'}")

    def metric(record: dict[str, Any]) -> None:
        with open(metrics_path, "a") as f:
            f.write(json.dumps({"time": utc_now(), **record}) + "\n")

    def kept() -> str:
        return ("no checkpoint was written" if saved_step is None
                else f"the last good checkpoint {run_dir / LAST} (step {saved_step}) is kept")

    def save(names: tuple[str, ...]) -> None:
        nonlocal saved_step
        if not params_finite(arm.model):
            raise TrainingDiverged(f"training diverged: the weights became NaN or inf by step {arm.step}; "
                                   f"{kept()}")
        state = {**arm.state(), "task": task_info, "params": params, "saved_at": utc_now()}
        for name in names:
            save_atomic(state, run_dir / name)
        saved_step = arm.step

    last_eval: dict[str, Any] = {}

    def evaluate() -> None:
        t0 = time.monotonic()
        val_loss = arm.eval_loss(held_out)
        if not math.isfinite(val_loss):
            raise TrainingDiverged(f"training diverged: val_loss is {val_loss} at step {arm.step}; {kept()}")
        last_eval.update(step=arm.step, val_loss=val_loss)
        metric({"event": "eval", "step": arm.step, "val_loss": val_loss, "eval_s": time.monotonic() - t0})
        ctx.log(f"step {arm.step}: val_loss {val_loss:.4f}")

    tokens_per_step = t.batch_size * t.grad_accum * cfg.model.block_size

    def after_step(run: ArmRun, loss: float, lr: float) -> None:
        step = run.step
        if step % t.log_interval == 0 or step == 1:
            metric({"event": "train", "step": step, "loss": loss, "lr": lr, "tokens": step * tokens_per_step,
                    "train_s": run.train_s, "skipped_steps": run.step_fn.skipped})
            ctx.progress(step, _expected_steps(run), loss=loss, lr=lr)
        if step % t.eval_interval == 0 and step < t.max_steps:
            evaluate()
        if step % t.ckpt_interval == 0 and step < t.max_steps:
            save((LAST,))

    try:
        arm.train(after_step=after_step)
        if last_eval.get("step") != arm.step:
            evaluate()
        save((LAST, BEST))
    except TrainingDiverged as e:
        text = str(e) if "checkpoint" in str(e) else f"{e}; {kept()}"
        metric({"event": "diverged", "step": arm.step, "error": text})
        write_json_atomic(run_dir / "summary.json", {"status": "diverged", "error": text, "steps": arm.step,
                                                     "skipped_steps": arm.step_fn.skipped,
                                                     "run_dir": str(run_dir)})
        ctx.log(text)
        ctx.log("---")
        ctx.log("status: diverged")
        ctx.log(f"steps: {arm.step}")
        raise TrainingDiverged(text) from None
    measured = arm.measure()
    depth = read_depth(cfg.model, spec.n_steps, cell) if cell is not None else None
    baselines = trivial_baselines(spec.task or task.name, task, [spec.seed], work.eval_examples,
                                  spec.train_max_difficulty)
    primary = None if cell is None else {
        "cell": str(cell), "depth": depth,
        "accuracy": measured.grid[depth][cell.split][cell.bucket]}  # type: ignore[index]
    result = {
        "status": "finished", "task": task.name, "arm": spec.arm, "arch": cfg.model.arch, "preset": cfg.name,
        "params": params,
        "steps": measured.steps, "final_loss": measured.final_loss, "val_loss": last_eval["val_loss"],
        "grid": {str(d): v for d, v in measured.grid.items()}, "counts": measured.counts,
        "overlap": measured.overlap, "primary": primary,
        "trivial": None if cell is None else trivial_on(baselines, cell), "baselines": baselines,
        "seconds": round(time.monotonic() - started, 3), "train_s": round(arm.train_s, 3),
        "device": str(device), "precision": "float16" if arm.step_fn.fp16 else "float32",
        "skipped_steps": measured.skipped_steps, "peak_mem_mb": round(peak_mem_mb(device), 1),
        "resumed_from_step": resumed_from, "run_dir": str(run_dir), "checkpoint": str(run_dir / BEST),
    }
    write_json_atomic(run_dir / "summary.json", result)
    ctx.log("---")
    for key in ("final_loss", "val_loss", "steps", "skipped_steps", "params", "seconds"):
        value = result[key]
        shown = f"{value:.6f}" if isinstance(value, float) and key.endswith("loss") else f"{value}"
        ctx.log(f"{key}: {shown}")
    if primary is not None:
        ctx.log(f"primary: {primary['cell']} {primary['accuracy']}")
    return result


def _expected_steps(run: Any) -> int:
    """The step the run will end at: max_steps, or sooner under a wall-clock budget."""
    t = run.work.cfg.train
    if t.max_seconds <= 0 or run.train_s <= 0:
        return int(t.max_steps)
    return int(min(t.max_steps, max(run.step, round(run.step * t.max_seconds / run.train_s))))


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the records a killed session wrote after its last checkpoint: they will be redone
    (a torn last line goes too)."""
    from common import write_atomic

    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            at = json.loads(line).get("step", 0)
        except (json.JSONDecodeError, AttributeError):
            continue
        if at <= step:
            kept.append(line)
    write_atomic(path, "".join(line + "\n" for line in kept))


def _write_config(path: Path, cfg: config.Config, task_info: dict[str, Any], params: int, device: str,
                  resume: bool, step: int) -> None:
    """config.json as models/train.py writes it, with the task where a token run has its data."""
    from common import code_commit, utc_now, write_json_atomic
    from models.train import package_versions

    info = json.loads(path.read_text()) if resume and path.exists() else {"created_at": utc_now()}
    info.update({"config": cfg.to_dict(), "task": task_info, "params": params, "device": device,
                 "git_commit": code_commit(), "versions": package_versions()})
    if resume:
        info.setdefault("resumes", []).append({"at": utc_now(), "step": step})
    write_json_atomic(path, info)
