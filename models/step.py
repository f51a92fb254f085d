"""One training step, shared by the full-run trainer (models/train.py) and the ablation harness
(harness/train_task.py), so an idea that changes how a model is trained reaches the ablation
that is meant to earn it.

    step = TrainStep(model, cfg, device)      # AdamW (decay on matrices only) + GradScaler
    loss, lr = step(next_batch, i, elapsed_s)  # warmup + cosine lr, grad_accum micro-batches
                                               # under fp16 autocast on CUDA, unscale, clip,
                                               # scaler.step (skipped on overflow), update

The fp16 path is nanoGPT's. On CPU the scaler is disabled and everything is fp32; there is no
bfloat16 anywhere (the target card has none).

`train.compile` (config.TrainConfig) runs the model's forward and loss through torch.compile
(AOTAutograd compiles their backward too); the optimizer, the scaler and clipping stay eager,
and `model` itself is untouched, so its state_dict, checkpoints and exact resume are the same
either way. Off by default: bench/train_speed.py --compile measures when it pays.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch

from config import Config, TrainConfig


class TrainingDiverged(RuntimeError):
    """The loss (or the weights) became NaN or inf."""


def lr_at(step: int, t: TrainConfig, elapsed_s: float = 0.0) -> float:
    """Linear warmup, then cosine from lr to min_lr. Under a wall-clock budget the cosine follows
    whichever budget is further along, so a time-limited run still ends at min_lr."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / (t.warmup_steps + 1)
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    if t.max_seconds > 0:
        progress = max(progress, elapsed_s / t.max_seconds)
    coeff = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return t.min_lr + coeff * (t.lr - t.min_lr)


def make_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (and the tied embedding) only, not norms or biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2))


def uses_fp16(cfg: Config, device: torch.device) -> bool:
    return device.type == "cuda" and cfg.precision.cuda_dtype == "float16"


def autocast_for(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if uses_fp16(cfg, device):
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


class TrainStep:
    """The optimizer, the scaler and the step. `skipped` counts steps the scaler skipped because
    fp16 gradients overflowed."""

    def __init__(self, model: torch.nn.Module, cfg: Config, device: torch.device | str):
        self.model, self.cfg = model, cfg
        self.device = torch.device(device)
        self.optimizer = make_optimizer(model, cfg.train)
        self.fp16 = uses_fp16(cfg, self.device)
        self.scaler = torch.amp.GradScaler("cuda", init_scale=cfg.precision.grad_scaler_init,
                                           growth_interval=cfg.precision.grad_scaler_growth_interval,
                                           enabled=self.fp16)
        self.skipped = 0
        # The callable that computes (logits, loss); compiled lazily by torch on its first call
        # (seconds to minutes on a CPU: each new depth a refiner samples is a recompile).
        self.forward: Callable[..., Any] = torch.compile(model) if cfg.train.compile else model

    def __call__(self, next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]], step: int,
                 elapsed_s: float = 0.0) -> tuple[float, float]:
        """One optimizer step at index `step` (0-based) from grad_accum micro-batches drawn with
        next_batch() -> (inputs, targets) on the device; returns (mean loss, lr). Raises
        TrainingDiverged on a non-finite loss, with the gradients cleared and no update made."""
        t = self.cfg.train
        lr = self.set_lr(step, elapsed_s)
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(t.grad_accum):
            x, y = next_batch()
            with autocast_for(self.cfg, self.device):
                _, loss = self.forward(x, y)
                loss = loss / t.grad_accum
            self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        value = float(loss_sum)  # one host sync per optimizer step
        self.update(value, step)
        return value, lr

    # set_lr and update are the step's two ends, apart so that harness/batched.py can compute
    # the gradients of several stacked seeds at once (under vmap) and finish each seed's step here.
    def set_lr(self, step: int, elapsed_s: float = 0.0) -> float:
        lr = lr_at(step, self.cfg.train, elapsed_s)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def update(self, loss_value: float, step: int) -> None:
        """Apply the (scaled) gradients in the parameters' .grad: check the loss, unscale, clip,
        scaler.step, update the scale, clear the gradients."""
        t = self.cfg.train
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(f"training diverged: loss is {loss_value} at step {step + 1}")
        if t.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        scale_before = self.scaler.get_scale()
        self.scaler.step(self.optimizer)  # skipped by the scaler when gradients overflowed
        self.scaler.update()
        if self.fp16 and self.scaler.get_scale() < scale_before:
            self.skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
