"""What a job will cost, from its spec alone (no model built, no torch): the training FLOPs it
will spend and its own wall-clock budget. The queue's gate reads it (daemon/service.py): a GPU
job above `config.GATE` is a full run, whatever its kind or preset.

FLOPs are models/flops.py's training FLOPs per token (over the training depth distribution)
times the tokens the budget trains on: steps x batch_size x grad_accum x block_size, summed over
an ablation's arms and seeds, or a smoke's arms. Evaluation is not counted: it is a forward pass
over a fraction of the tokens. A budget in seconds only (an ablation's `seconds`) has no FLOP
figure; the gate then reads the seconds.
"""

from __future__ import annotations

from typing import Any

import config


def _train_flops(cfg: config.Config, steps: int | None = None) -> tuple[float, int]:
    from models.flops import train_flops_per_token

    t = cfg.train
    steps = t.max_steps if steps is None else steps
    tokens = steps * t.batch_size * t.grad_accum * cfg.model.block_size
    return train_flops_per_token(cfg.model) * tokens, tokens


def estimate(kind: str, spec: Any) -> dict[str, Any] | None:
    """{"flops", "tokens", "budget_s", "basis"} for a validated Spec of a kind that trains; None
    for a kind that does not (sleep, eval, tokenize, archive)."""
    if kind == "train":
        from jobs.train import resolve_config

        cfg = resolve_config(spec)
        flops, tokens = _train_flops(cfg)
        budget = cfg.train.max_seconds or None
        return {"flops": flops, "tokens": tokens, "budget_s": budget,
                "basis": f"{cfg.train.max_steps} steps x {cfg.train.batch_size * cfg.train.grad_accum} x "
                         f"{cfg.model.block_size} tokens, {cfg.model.arch} {cfg.name}"}
    if kind == "smoke":
        return _smoke(spec)
    if kind == "ablation":
        from jobs.ablation import resolve

        return _ablation(resolve(spec))
    return None


def _smoke(spec: Any) -> dict[str, Any]:
    ablation = getattr(spec, "ablation", None)
    if ablation:
        from harness.ablate import arm_config, parse_spec
        from harness.tasks import make_task

        abl = parse_spec(dict(ablation))
        task = make_task(abl.task, abl.task_dir or None, seed=0)
        names = set(getattr(spec, "arms", None) or [a.name for a in abl.arms])
        flops = tokens = 0.0
        for arm in abl.arms:
            if arm.name in names:
                f, n = _train_flops(arm_config(abl, arm, task), spec.steps)
                flops, tokens = flops + f, tokens + n
        return {"flops": flops, "tokens": int(tokens), "budget_s": None,
                "basis": f"{len(names)} arm(s) x {spec.steps} steps on {abl.task_dir or abl.task}"}
    from jobs.smoke import smoke_config

    cfg = smoke_config(spec)
    flops, tokens = _train_flops(cfg)
    return {"flops": flops, "tokens": tokens, "budget_s": None,
            "basis": f"{spec.steps} steps x {cfg.train.batch_size * cfg.train.grad_accum} x "
                     f"{cfg.model.block_size} tokens, {cfg.model.arch} {cfg.name}"}


def _ablation(abl: Any) -> dict[str, Any]:
    from harness.ablate import arm_config
    from harness.tasks import make_task

    task = make_task(abl.task, abl.task_dir or None, seed=0)
    if abl.seconds:
        # The clock decides the steps: no FLOP figure, only the wall-clock budget (seeds run
        # config.ABLATION.parallel_seeds at a time).
        rounds = -(-abl.seeds // config.ABLATION.parallel_seeds)
        return {"flops": None, "tokens": None, "budget_s": abl.seconds * len(abl.arms) * rounds,
                "basis": f"{len(abl.arms)} arms x {abl.seeds} seeds x {abl.seconds:g} s"}
    flops = tokens = 0.0
    for arm in abl.arms:
        f, n = _train_flops(arm_config(abl, arm, task))
        flops, tokens = flops + f * abl.seeds, tokens + n * abl.seeds
    return {"flops": flops, "tokens": int(tokens), "budget_s": None,
            "basis": f"{len(abl.arms)} arms x {abl.seeds} seeds on {abl.task_dir or abl.task}"}


def is_full_run(cost: dict[str, Any] | None) -> str | None:
    """Why a GPU job with this cost is a full run (the gate's threshold, config.GATE), or None."""
    if cost is None:
        return None
    g = config.GATE
    if cost.get("flops") is not None and cost["flops"] >= g.full_run_flops:
        return f"{cost['flops']:.3g} training FLOPs (the full-run threshold is {g.full_run_flops:.3g})"
    if cost.get("budget_s") is not None and cost["budget_s"] >= g.full_run_seconds:
        return f"a {cost['budget_s']:.0f} s budget (the full-run threshold is {g.full_run_seconds:.0f} s)"
    return None
