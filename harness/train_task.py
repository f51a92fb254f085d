"""Train one arm on one seed of a task and measure it: the unit of work of an ablation.

Pairing: the training batches come from a generator seeded by (seed) alone and the test sets
from (seed, split), so every arm of a seed sees the same data; only the init differs, seeded
by (seed, arm index). Runs in a child process with one torch thread (see harness/ablate.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import config
from harness.tasks import Batch, Task, score


@dataclass(frozen=True)
class Work:
    """One (arm, seed) to train: everything a child process needs, picklable."""

    arm_index: int
    arm_name: str
    seed: int
    cfg: config.Config
    n_steps: int | None  # the arm's test depth (None: the model's depth_eval)
    eval_depths: tuple[int, ...]
    steps: int  # optimizer steps (cosine length); ignored when seconds > 0
    seconds: float  # wall-clock budget; 0 means steps only
    eval_examples: int
    task_name: str | None
    task_dir: str | None
    task_sizes: config.TaskSizes
    device: str = "cpu"
    train_examples: int = 0  # > 0: batches drawn from a fixed pool of this many lines; 0: fresh lines


@dataclass
class WorkResult:
    arm_index: int
    seed: int
    steps: int
    wall_s: float
    cpu_s: float  # this process's CPU time: a load-independent cost (other jobs share the cores)
    final_loss: float
    curve: list[tuple[int, float]]  # (step, smoothed train loss)
    accuracy: dict[str, float]  # split -> accuracy at the arm's depth
    by_depth: dict[int, dict[str, float]] = field(default_factory=dict)  # depth -> split -> acc


def data_rng(seed: int, split: str | None = None) -> np.random.Generator:
    """Training data (split None) or a test split's data for `seed`: the same for every arm."""
    key = [seed, 1] if split is None else [seed, 2, *split.encode()]
    return np.random.default_rng(key)


def make_task_for(work: Work) -> Task:
    from harness.tasks import make_task

    return make_task(work.task_name, work.task_dir, seed=work.seed, sizes=work.task_sizes)


def lr_at(tcfg: config.TrainConfig, progress: float, step: int) -> float:
    """Linear warmup then cosine from lr to min_lr; `progress` in [0, 1] of the budget."""
    if step < tcfg.warmup_steps:
        return tcfg.lr * (step + 1) / tcfg.warmup_steps
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return tcfg.min_lr + (tcfg.lr - tcfg.min_lr) * cos


def _tensor(a: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


@torch.no_grad()
def evaluate(model: torch.nn.Module, task: Task, batch: Batch, depth: int | None, chunk: int = 256) -> float:
    """Accuracy of the argmax at the answer positions: one forward pass, since no answer of a
    generated task is ever fed back as input."""
    model.eval()
    device = next(model.parameters()).device
    preds = []
    for s in range(0, len(batch.x), chunk):
        logits, _ = model(_tensor(batch.x[s : s + chunk], device), n_steps=depth)
        preds.append(logits.argmax(-1).cpu().numpy())
    return score(task, np.concatenate(preds), batch)


@torch.no_grad()
def evaluate_generative(model: Any, task: Any, split: str, depth: int | None) -> float:
    """Bring-your-own: exact match of the greedy target, generated with the KV cache. Lines are
    grouped by prompt length so a batch needs no padding."""
    model.eval()
    examples = task.test_examples(split)
    by_len: dict[int, list[int]] = {}
    for i, ex in enumerate(examples):
        by_len.setdefault(len(ex.prompt), []).append(i)
    right = 0
    for idxs in by_len.values():
        width = max(len(examples[i].target) for i in idxs)
        prompt = torch.tensor([examples[i].prompt for i in idxs], device=next(model.parameters()).device)
        out = model.generate(prompt, width, n_steps=depth, temperature=0.0)[:, prompt.size(1):].tolist()
        right += sum(out[j][: len(examples[i].target)] == examples[i].target for j, i in enumerate(idxs))
    return right / len(examples)


def applicable_depths(cfg: config.ModelConfig, depths: tuple[int, ...]) -> tuple[int, ...]:
    """The reasoner cannot apply more layers than it owns; the refiner loops any number."""
    return tuple(d for d in depths if cfg.arch == "refiner" or d <= cfg.n_layers)


def train_and_eval(work: Work, report: Callable[[int, int, float], None] | None = None) -> WorkResult:
    """Train work.cfg on the task for the budget, then evaluate every split at the arm's depth
    and at each applicable eval depth. `report(step, total, loss)` is called every log interval."""
    from models import build_model

    torch.set_num_threads(1)
    tcfg = work.cfg.train
    task = make_task_for(work)
    torch.manual_seed(1_000_003 * work.seed + work.arm_index)  # init and training depths
    model = build_model(work.cfg).to(work.device)
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2),
                            weight_decay=tcfg.weight_decay)
    rng = data_rng(work.seed)
    pool = task.train_batch(rng, work.train_examples) if work.train_examples else None
    total = work.steps
    started, cpu_started = time.monotonic(), time.process_time()
    curve: list[tuple[int, float]] = []
    smooth = float("nan")
    step = 0
    model.train()
    while True:
        elapsed = time.monotonic() - started
        if work.seconds > 0:
            if elapsed >= work.seconds:
                break
            progress = elapsed / work.seconds
        else:
            if step >= total:
                break
            progress = step / total
        for group in opt.param_groups:
            group["lr"] = lr_at(tcfg, progress, step)
        if pool is None:
            batch = task.train_batch(rng, tcfg.batch_size)
        else:
            pick = rng.integers(0, len(pool.x), size=tcfg.batch_size)
            batch = Batch(pool.x[pick], pool.y[pick], pool.scored[pick])
        _, loss = model(_tensor(batch.x, work.device), _tensor(batch.y, work.device))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{work.arm_name} seed {work.seed}: loss {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tcfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt.step()
        step += 1
        value = loss.item()
        smooth = value if math.isnan(smooth) else 0.95 * smooth + 0.05 * value
        if step % tcfg.log_interval == 0:
            curve.append((step, smooth))
            if report is not None:
                est_total = total if work.seconds <= 0 else max(step, int(step / max(progress, 1e-9)))
                report(step, est_total, smooth)
    wall = time.monotonic() - started

    accuracy: dict[str, float] = {}
    by_depth: dict[int, dict[str, float]] = {}
    depths = applicable_depths(work.cfg.model, work.eval_depths)
    arm_depth = work.n_steps
    for split in task.splits:
        if task.generative:
            def measure(d: int | None, split: str = split) -> float:
                return evaluate_generative(model, task, split, d)
        else:
            test = task.test_batch(split, data_rng(work.seed, split), work.eval_examples)

            def measure(d: int | None, test: Batch = test) -> float:
                return evaluate(model, task, test, d)
        accuracy[split] = measure(arm_depth)
        for d in depths:
            by_depth.setdefault(d, {})[split] = accuracy[split] if d == arm_depth else measure(d)
    return WorkResult(arm_index=work.arm_index, seed=work.seed, steps=step, wall_s=wall,
                      cpu_s=time.process_time() - cpu_started,
                      final_loss=smooth, curve=curve, accuracy=accuracy, by_depth=by_depth)
