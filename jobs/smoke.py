"""smoke: does the model build and learn at all? Trains a few dozen steps on the shipped
sample text and checks that nothing is NaN and that the loss falls: the eval loss on fixed
batches must drop by at least SMOKE_MIN_DROP (relative) from the untrained model's. Comparing the same
batches makes the check deterministic; a noisy train loss could "fall" by chance. A few seconds
on CPU. The job fails (raises SmokeFailed) when the check does not hold; `check` returns why.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import config
from config import SAMPLE_DATASET, SMOKE_MIN_DROP, Validated, setting

LANES = ("gpu", "cpu")


class SmokeFailed(RuntimeError):
    def __init__(self, result: dict[str, Any]):
        super().__init__(f"smoke failed: {result['reason']}")
        self.result = result


@dataclass(frozen=True)
class Spec(Validated):
    preset: str = "tiny"
    arch: str | None = None  # None: config.default_arch()
    steps: int = setting(40, 4, 100_000, "optimizer steps")
    set: dict = field(default_factory=dict)  # config overrides by key

    def _check_relations(self) -> None:
        from jobs.train import check_config

        check_config(self)


def smoke_config(spec: Spec) -> config.Config:
    """The spec's config with a smoke budget: `steps` steps, one eval at the end, a warmup
    short enough that the learning rate is reached, the loss logged every step."""
    from jobs.train import resolve_config
    from models.train import with_budget

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


def _records(path: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(spec: Spec, ctx: Any) -> dict[str, Any]:
    result = check(spec, ctx)
    ctx.log(f"smoke: {'ok' if result['ok'] else 'FAILED'}: {result['reason']}")
    if not result["ok"]:
        raise SmokeFailed(result)
    return result
