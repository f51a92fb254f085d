"""smoke: does the model build and learn at all? Trains a few dozen steps on the shipped
sample text and checks that nothing is NaN and that the loss falls: the eval loss on fixed
batches must drop by at least SMOKE_MIN_DROP (relative) from the untrained model's. Comparing the same
batches makes the check deterministic; a noisy train loss could "fall" by chance. A few seconds
on CPU. The job fails (raises SmokeFailed) when the check does not hold; `check` returns why.

With `ablation` (an inline ablation spec: the keys of a harness/specs/*.toml) it smokes that
ablation's arms instead (`arms`: some of them; default all): each trains `steps` steps on the
ablation's task at its preset (seed 0, the harness's own loop and config per arm), and passes
when every training loss is finite and its loss on a fixed held-out batch of the task (lines of
the training distribution from a stream of their own) fell by SMOKE_MIN_DROP from the untrained
arm's. The same batch before and after, as above: deterministic, where the train losses of
different batches could fall or rise by chance.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import config
from config import SAMPLE_DATASET, SMOKE_MIN_DROP, ConfigError, Validated, setting

LANES = ("gpu", "cpu")


class SmokeFailed(RuntimeError):
    def __init__(self, result: dict[str, Any]):
        super().__init__(f"smoke failed: {result['reason']}")
        self.result = result


@dataclass(frozen=True)
class Spec(Validated):
    preset: str = "tiny"
    arch: str | None = None  # None: config.default_arch()
    # The range is wide so that a long smoke is refused below, saying what a longer run is.
    steps: int = setting(40, 4, 100_000_000, f"optimizer steps (at most {config.SMOKE_MAX_STEPS})")
    set: dict = field(default_factory=dict)  # config overrides by key
    ablation: dict | None = None  # an inline ablation spec (a harness/specs/*.toml's keys): smoke its arms
    arms: tuple[str, ...] | None = None  # the ablation's arms to smoke (default: all of them)

    def _check_relations(self) -> None:
        from jobs.train import check_config

        if self.steps > config.SMOKE_MAX_STEPS:
            raise ConfigError(
                f"smoke.steps: {self.steps} steps is not a smoke (at most {config.SMOKE_MAX_STEPS}, "
                "config.SMOKE_MAX_STEPS); a longer run is a `train` job, and a full run is earned by "
                "an ablation: `lab submit idea --spec idea.toml`, or `lab submit train --earned-by "
                "ABLATION_JOB`")
        if self.ablation is None:
            if self.arms is not None:
                raise ConfigError("smoke.arms: names arms of an ablation; give `ablation` too")
            check_config(self)
            return
        # Each arm trains at its own config (the ablation's preset, its arch and set): a value
        # here would be silently ignored, so it is refused.
        for name, default in (("preset", "tiny"), ("arch", None), ("set", {})):
            if getattr(self, name) != default:
                raise ConfigError(f"smoke.{name}: an ablation's arms train at their own preset, arch "
                                  f"and set; leave {name} out with `ablation`")
        smoked_arms(self, ablation_spec(self))


def smoke_config(spec: Spec) -> config.Config:
    """The spec's config with a smoke budget: `steps` steps, one eval at the end, a warmup
    short enough that the learning rate is reached, the loss logged every step."""
    from config import with_budget
    from jobs.train import resolve_config

    cfg = resolve_config(spec)
    t = cfg.train
    return with_budget(cfg, max_steps=spec.steps, max_seconds=0.0, log_interval=1,
                       eval_interval=spec.steps, ckpt_interval=spec.steps,
                       warmup_steps=min(t.warmup_steps, spec.steps // 4),
                       eval_batches=min(t.eval_batches, 4))


def check(spec: Spec, ctx: Any) -> dict[str, Any]:
    """Train and judge; never raises for a failed check (the result says why)."""
    from jobs.train import data_dir_for
    from models.train import TrainingDiverged, train

    started = time.monotonic()
    cfg = smoke_config(spec)
    result: dict[str, Any] = {"ok": False, "reason": "", "preset": cfg.name, "arch": cfg.model.arch,
                              "device": str(ctx.device), "steps": spec.steps}
    try:
        # The card is given back before curves.png and the judging below: CPU work only.
        summary = train(cfg, data_dir_for(SAMPLE_DATASET), ctx.run_dir, ctx, checkpoints=False,
                        eval_first=True)
    except TrainingDiverged as e:
        result.update(reason=str(e), seconds=round(time.monotonic() - started, 3))
        return result
    metrics = _records(ctx.run_dir / "metrics.jsonl")
    losses = [r["loss"] for r in metrics if r.get("event") == "train"]
    val_start = next(r["val_loss"] for r in metrics if r.get("event") == "eval" and r["step"] == 0)
    val_end = summary["val_loss"]
    quarter = max(1, len(losses) // 4)
    early, late = sum(losses[:quarter]) / quarter, sum(losses[-quarter:]) / quarter
    finite = all(math.isfinite(x) for x in [*losses, val_start, val_end])
    result.update(
        params=summary["params"], first_loss=losses[0], last_loss=losses[-1],
        early_mean=early, late_mean=late, val_loss_start=val_start, val_loss=val_end,
        skipped_steps=summary["skipped_steps"], peak_mem_mb=summary["peak_mem_mb"],
        seconds=round(time.monotonic() - started, 3),
    )
    if not finite:
        result["reason"] = "a loss is NaN or inf"
    elif not val_end < val_start * (1 - SMOKE_MIN_DROP):
        result["reason"] = (f"the loss did not fall: eval loss {val_start:.4f} untrained, {val_end:.4f} "
                            f"after {spec.steps} steps (need a {SMOKE_MIN_DROP:.0%} drop)")
    else:
        result.update(ok=True, reason=f"eval loss fell from {val_start:.4f} to {val_end:.4f}")
    return result


# The harness names an ablation's fields `ablation.<key>` and a task directory's faults `task_dir:`;
# here they are fields of the smoke's `ablation` table: `smoke.ablation.<key>`.
_ABLATION_FIELD = re.compile(r"(^|; )(?:ablation\.|(?=task_dir[:. ]))")
# What the harness can still raise for a strange value past the type checks (jobs/ablation.py).
_HARNESS_LEAKS = (TypeError, ValueError, OverflowError, RecursionError, OSError)


def ablation_spec(spec: Spec) -> Any:
    """The smoke's ablation, parsed and validated by the harness (harness/ablate.py parse_spec);
    its errors name `smoke.ablation.<key>`."""
    from harness.ablate import parse_spec

    try:
        return parse_spec(dict(spec.ablation or {}))
    except ConfigError as e:
        text = _ABLATION_FIELD.sub(lambda m: f"{m.group(1)}smoke.ablation.", str(e))
        raise ConfigError(text if text.startswith("smoke.") else f"smoke.ablation: {text}") from None
    except _HARNESS_LEAKS as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise ConfigError(f"smoke.ablation: could not be read ({why})") from None


def smoked_arms(spec: Spec, ablation: Any) -> list[Any]:
    """The ablation's arms the smoke trains, in the ablation's order (`smoke.arms` names them)."""
    names = [a.name for a in ablation.arms]
    if spec.arms is None:
        return list(ablation.arms)
    if not spec.arms:
        raise ConfigError("smoke.arms: name at least one arm (or leave arms out: all of them)")
    unknown = [a for a in spec.arms if a not in names]
    if unknown:
        raise ConfigError(f"smoke.arms: unknown arm {config.show(unknown[0])} (arms: {', '.join(names)})")
    return [a for a in ablation.arms if a.name in spec.arms]


def check_arms(spec: Spec, ctx: Any) -> dict[str, Any]:
    """Train each arm `steps` steps and judge it; never raises for a failed check."""
    from config import with_budget
    from harness.ablate import arm_config
    from harness.tasks import make_task
    from harness.train_task import ArmRun, Work
    from models import count_params
    from models.step import TrainingDiverged

    started = time.monotonic()
    ablation = ablation_spec(spec)
    task = make_task(ablation.task, ablation.task_dir or None, seed=0)
    arms: dict[str, dict[str, Any]] = {}
    for arm in smoked_arms(spec, ablation):
        i = list(ablation.arms).index(arm)
        t0 = time.monotonic()
        cfg = arm_config(ablation, arm, task, f"ablation.arms[{i}]")
        t = cfg.train
        cfg = with_budget(cfg, max_steps=spec.steps, max_seconds=0.0, log_interval=1,
                          warmup_steps=min(t.warmup_steps, spec.steps // 4))
        work = Work(arm_index=i, arm_name=arm.name, seed=0, cfg=cfg, n_steps=arm.n_steps, eval_depths=(),
                    eval_examples=ablation.eval_examples,
                    task_name=None if ablation.task_dir else ablation.task,
                    task_dir=ablation.task_dir or None, task_sizes=config.TASKS, device=str(ctx.device),
                    train_examples=config.ABLATION.train_examples,
                    train_max_difficulty=ablation.train_max_difficulty, threads=t.threads)
        run = ArmRun(work)
        held_out = run.held_out(t.batch_size * min(t.eval_batches, 4))
        before = run.eval_loss(held_out)
        entry: dict[str, Any] = {"ok": False, "reason": "", "first_loss": before, "last_loss": None,
                                 "params": count_params(run.model), "seconds": 0.0}
        try:
            run.train()
        except TrainingDiverged as e:  # a non-finite training loss
            entry["reason"] = str(e)
        else:
            after = run.eval_loss(held_out)
            entry["last_loss"] = after
            if not (math.isfinite(before) and math.isfinite(after)):
                entry["reason"] = f"a held-out loss is NaN or inf ({before}, {after})"
            elif not after < before * (1 - SMOKE_MIN_DROP):
                entry["reason"] = (f"the loss did not fall: held-out loss {before:.4f} untrained, "
                                   f"{after:.4f} after {spec.steps} steps (need a {SMOKE_MIN_DROP:.0%} drop)")
            else:
                entry.update(ok=True, reason=f"held-out loss fell from {before:.4f} to {after:.4f}")
        entry["seconds"] = round(time.monotonic() - t0, 3)
        ctx.log(f"smoke {arm.name}: {'ok' if entry['ok'] else 'FAILED'}: {entry['reason']}")
        arms[arm.name] = entry
    failed = [name for name, e in arms.items() if not e["ok"]]
    reason = ("; ".join(f"{name}: {arms[name]['reason']}" for name in failed) if failed
              else f"every arm's held-out loss fell ({', '.join(arms)})")
    return {"ok": not failed, "reason": reason, "steps": spec.steps, "device": str(ctx.device),
            "task": task.name, "preset": ablation.preset, "arms": arms,
            "seconds": round(time.monotonic() - started, 3)}


def _records(path: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(spec: Spec, ctx: Any) -> dict[str, Any]:
    result = check(spec, ctx) if spec.ablation is None else check_arms(spec, ctx)
    ctx.log(f"smoke: {'ok' if result['ok'] else 'FAILED'}: {result['reason']}")
    if not result["ok"]:
        raise SmokeFailed(result)
    return result
