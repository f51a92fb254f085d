"""harness/train_task.py: one (arm, seed) in-process: the pairing of data across arms, the
wall-clock budget, a fixed training pool, and evaluation at the depths an arm can run."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

import config
from harness.tasks import make_task
from harness.train_task import Work, applicable_depths, data_rng, train_and_eval


def _work(arch: str, **changes) -> Work:
    task = make_task("khop")
    cfg = config.preset("ablation", arch, vocab_size=task.vocab_size, block_size=task.block_size,
                        d_model=32, n_heads=2, batch_size=8, warmup_steps=2, log_interval=2)
    base = Work(arm_index=0, arm_name=arch, seed=5, cfg=cfg, n_steps=None, eval_depths=(1, 2, 4, 8),
                steps=6, seconds=0.0, eval_examples=20, task_name="khop", task_dir=None,
                task_sizes=config.TASKS)
    return dataclasses.replace(base, **changes)


def test_data_is_paired_by_seed_not_by_arm():
    task = make_task("khop")
    a = task.train_batch(data_rng(3), 8)
    b = task.train_batch(data_rng(3), 8)
    assert np.array_equal(a.x, b.x)
    assert not np.array_equal(task.test_batch("test", data_rng(3, "test"), 8).x,
                              task.test_batch("test", data_rng(4, "test"), 8).x)


def test_steps_budget_curve_and_depths():
    torch.set_num_threads(1)
    seen = []
    r = train_and_eval(_work("refiner"), report=lambda step, total, loss: seen.append((step, total)))
    assert r.steps == 6 and seen[-1] == (6, 6) and len(r.curve) == 3
    assert set(r.by_depth) == {1, 2, 4, 8} and set(r.accuracy) == set(make_task("khop").splits)
    assert all(0.0 <= v <= 1.0 for d in r.by_depth.values() for v in d.values())
    flat = _work("reasoner")
    assert applicable_depths(flat.cfg.model, (1, 2, 4, 8)) == (1, 2, 4)


def test_seconds_budget_and_fixed_pool():
    torch.set_num_threads(1)
    r = train_and_eval(_work("reasoner", seconds=1.0, steps=1, train_examples=16))
    assert r.steps > 1 and 0.9 <= r.wall_s < 5.0 and np.isfinite(r.final_loss)
