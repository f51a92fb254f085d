"""Train one arm on one seed of a task and measure it: the unit of work of an ablation.

Training is models/step.py's TrainStep, the same step a full run takes (optimizer groups,
warmup + cosine, grad accumulation, fp16 autocast + GradScaler on CUDA, clipping).

Pairing: the training batches come from a generator seeded by (seed) alone and the test sets
from (seed, split), so every arm of a seed sees the same data; only the init differs, seeded by
(seed, arm name) — never by the arm's place in the list, so an arm scores the same in any
ablation that holds it. Runs in a child process with one torch thread (see harness/ablate.py).

Measurement: every split at every applicable test depth, accuracy over all answers and per
difficulty bucket (the depth x bucket grid), and how many test lines occur in the training
stream this arm actually saw (0 for generated tasks, by their partition).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import config
from harness.tasks import Batch, Cells, Task, cells, counts, line_hash, units
from models.step import TrainingDiverged, TrainStep, autocast_for


@dataclass(frozen=True)
class Work:
    """One (arm, seed) to train: everything a child process needs, picklable. The budget is
    cfg.train.max_steps, or cfg.train.max_seconds when that is > 0."""

    arm_index: int
    arm_name: str
    seed: int
    cfg: config.Config
    n_steps: int | None  # the arm's test depth (None: the model's depth_eval)
    eval_depths: tuple[int, ...]
    eval_examples: int
    task_name: str | None
    task_dir: str | None
    task_sizes: config.TaskSizes
    device: str = "cpu"
    train_examples: int = 0  # > 0: batches drawn from a fixed pool of this many lines; 0: fresh lines
    train_max_difficulty: int | None = None  # cut the training targets here (None: the task's own)


@dataclass
class WorkResult:
    arm_index: int
    seed: int
    steps: int
    wall_s: float
    cpu_s: float  # this process's CPU time: a load-independent cost (other jobs share the cores)
    final_loss: float
    curve: list[tuple[int, float]]  # (step, smoothed train loss)
    grid: dict[int, dict[str, Cells]]  # test depth -> split -> "all" | bucket -> accuracy
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> cell -> answers scored
    overlap: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> lines, in_train
    skipped_steps: int = 0  # fp16 steps the scaler skipped (overflow)


def data_rng(seed: int, split: str | None = None) -> np.random.Generator:
    """Training data (split None) or a test split's data for `seed`: the same for every arm."""
    key = [seed, 1] if split is None else [seed, 2, *split.encode()]
    return np.random.default_rng(key)


def init_seed(seed: int, arm_name: str) -> int:
    """The torch seed of an arm's init and training depths: from the seed and the arm's name."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{arm_name}".encode()).digest()[:7], "big")


def make_task_for(work: Work) -> Task:
    from harness.tasks import make_task

    return make_task(work.task_name, work.task_dir, seed=work.seed, sizes=work.task_sizes)


def _tensor(a: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


@torch.no_grad()
def predict(model: torch.nn.Module, cfg: config.Config, batch: Batch, depth: int | None,
            chunk: int = 256) -> np.ndarray:
    """The argmax at every position: one forward pass, since no answer of a generated task is
    ever fed back as input."""
    model.eval()
    device = next(model.parameters()).device
    preds = []
    for s in range(0, len(batch.x), chunk):
        with autocast_for(cfg, device):
            logits, _ = model(_tensor(batch.x[s : s + chunk], device), n_steps=depth)
        preds.append(logits.argmax(-1).cpu().numpy())
    return np.concatenate(preds)


@torch.no_grad()
def generate_hits(model: Any, task: Any, split: str, depth: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Bring-your-own: (exact match of the greedy target, difficulty) per line, generated with
    the KV cache. Lines are grouped by prompt length so a batch needs no padding."""
    model.eval()
    examples = task.test_examples(split)
    by_len: dict[int, list[int]] = {}
    for i, ex in enumerate(examples):
        by_len.setdefault(len(ex.prompt), []).append(i)
    hits = np.zeros(len(examples), dtype=float)
    for idxs in by_len.values():
        width = max(len(examples[i].target) for i in idxs)
        prompt = torch.tensor([examples[i].prompt for i in idxs], device=next(model.parameters()).device)
        out = model.generate(prompt, width, n_steps=depth, temperature=0.0)[:, prompt.size(1):].tolist()
        for j, i in enumerate(idxs):
            hits[i] = out[j][: len(examples[i].target)] == examples[i].target
    return hits, np.array([ex.difficulty for ex in examples])


def applicable_depths(cfg: config.ModelConfig, depths: tuple[int, ...]) -> tuple[int, ...]:
    """The reasoner cannot apply more layers than it owns; the refiner loops any number."""
    return tuple(d for d in depths if cfg.arch == "refiner" or d <= cfg.n_layers)


def arm_depth(cfg: config.ModelConfig, n_steps: int | None) -> int:
    return n_steps or cfg.depth_eval


def train_and_eval(work: Work, report: Callable[[int, int, float], None] | None = None) -> WorkResult:
    """Train work.cfg on the task for the budget, then measure every split at the arm's depth
    and at each applicable eval depth. `report(step, total, loss)` is called every log interval."""
    from models import build_model

    torch.set_num_threads(1)
    tcfg = work.cfg.train
    task = make_task_for(work)
    torch.manual_seed(init_seed(work.seed, work.arm_name))  # init and training depths
    model = build_model(work.cfg).to(work.device)
    step_fn = TrainStep(model, work.cfg, work.device)
    rng = data_rng(work.seed)
    cut = work.train_max_difficulty
    pool = task.train_batch(rng, work.train_examples, cut) if work.train_examples else None
    seen: list[np.ndarray] = []  # hashes of every training line drawn

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        if pool is None:
            batch = task.train_batch(rng, tcfg.batch_size, cut)
        else:
            batch = pool.rows(rng.integers(0, len(pool.x), size=tcfg.batch_size))
        seen.append(line_hash(batch.x))
        return _tensor(batch.x, work.device), _tensor(batch.y, work.device)

    started, cpu_started = time.monotonic(), time.process_time()
    curve: list[tuple[int, float]] = []
    smooth = float("nan")
    step = 0
    model.train()
    while True:
        elapsed = time.monotonic() - started
        if (tcfg.max_seconds > 0 and elapsed >= tcfg.max_seconds) or step >= tcfg.max_steps:
            break
        try:
            value, _lr = step_fn(next_batch, step, elapsed)
        except TrainingDiverged as e:
            raise TrainingDiverged(f"{work.arm_name} seed {work.seed}: {e}") from None
        step += 1
        smooth = value if math.isnan(smooth) else 0.95 * smooth + 0.05 * value
        if step % tcfg.log_interval == 0:
            curve.append((step, smooth))
            if report is not None:
                if tcfg.max_seconds > 0:
                    est_total = max(step, int(step * tcfg.max_seconds / max(elapsed, 1e-9)))
                else:
                    est_total = tcfg.max_steps
                report(step, est_total, smooth)
    wall = time.monotonic() - started

    own = arm_depth(work.cfg.model, work.n_steps)
    depths = sorted(set(applicable_depths(work.cfg.model, work.eval_depths)) | {own})
    grid: dict[int, dict[str, Cells]] = {d: {} for d in depths}
    n_cells: dict[str, dict[str, int]] = {}
    overlap: dict[str, dict[str, int]] = {}
    trained = set(np.concatenate(seen).tolist()) if seen else set()
    for split in task.splits:
        if task.generative:
            for d in depths:
                hits, diff = generate_hits(model, task, split, d)
                grid[d][split] = cells(task, hits, diff)
            n_cells[split] = counts(task, diff)
            overlap[split] = task.overlap()[split]  # type: ignore[attr-defined]
            continue
        test = task.test_batch(split, data_rng(work.seed, split), work.eval_examples)
        overlap[split] = {"lines": len(test.x),
                          "in_train": sum(h in trained for h in line_hash(test.x).tolist())}
        for d in depths:
            hit, diff = units(task, predict(model, work.cfg, test, d), test)
            grid[d][split] = cells(task, hit.astype(float), diff)
        n_cells[split] = counts(task, diff)
    return WorkResult(arm_index=work.arm_index, seed=work.seed, steps=step, wall_s=wall,
                      cpu_s=time.process_time() - cpu_started, final_loss=smooth, curve=curve,
                      grid=grid, counts=n_cells, overlap=overlap, skipped_steps=step_fn.skipped)
