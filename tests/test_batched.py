"""harness/batched.py: several (arm, seed) Works trained in one process, one step of each in
turn, give each Work the results the unbatched path (train_and_eval, one Work per process)
gives it: the same final loss, curve and depth x bucket grid. Real training, tiny budgets."""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import pytest

import config
from harness.ablate import _run_all, _work_items, arm_config, parse_spec, use_batched
from harness.batched import train_group
from harness.tasks import make_task
from harness.train_task import Work, WorkResult, train_and_eval

# a refiner (random training depth: it draws from the torch RNG every step, so a member that
# moved another's stream would show) and a flat reasoner, 2 seeds: 4 Works of 2 shapes
SPEC = {
    "task": "khop", "seeds": 2, "why": "a test", "steps": 6, "eval_examples": 40,
    "eval_depths": [1, 2], "baseline": "flat-1", "primary": "hops3",
    "arms": [{"name": "refiner", "arch": "refiner", "n_steps": 2, "set": {"d_model": 32, "log_interval": 2}},
             {"name": "flat-1", "arch": "reasoner", "n_steps": 1, "set": {"d_model": 32, "log_interval": 2}}],
}


@functools.cache  # validating the spec builds its tasks: once per test session is enough
def _work_tuple() -> tuple[Work, ...]:
    spec = parse_spec(SPEC)
    task = make_task(spec.task, None, seed=0)
    configs = [arm_config(spec, arm, task) for arm in spec.arms]
    return tuple(_work_items(spec, configs, "cpu"))


def _works() -> list[Work]:
    return list(_work_tuple())


def _assert_same(a: WorkResult, b: WorkResult, tol: float) -> None:
    assert (a.arm_index, a.seed, a.steps) == (b.arm_index, b.seed, b.steps)
    assert math.isclose(a.final_loss, b.final_loss, rel_tol=tol, abs_tol=tol)
    assert [s for s, _ in a.curve] == [s for s, _ in b.curve]
    pairs = zip(a.curve, b.curve, strict=True)
    assert all(math.isclose(x, y, rel_tol=tol, abs_tol=tol) for (_, x), (_, y) in pairs)
    assert a.grid == b.grid and a.counts == b.counts and a.overlap == b.overlap
    assert a.skipped_steps == b.skipped_steps


def test_group_matches_the_unbatched_path_per_seed(one_thread: None) -> None:
    """Each member's final loss, curve and grid are the unbatched run's (same data, same init per
    seed, same depth draws). With one thread in both the float order is the same too, so the
    tolerance is only a guard against a platform's nondeterministic kernels."""
    works = _works()
    assert {(w.arm_name, w.seed) for w in works} == {(a, s) for a in ("refiner", "flat-1") for s in (0, 1)}
    alone = [train_and_eval(w) for w in works]
    grouped = train_group(works, threads=1)
    for a, b in zip(alone, grouped, strict=True):
        _assert_same(a, b, tol=1e-6)
    # the seeds differ (their data and init do): a group that reused one member's stream for
    # another would make them equal
    by = {(r.arm_index, r.seed): r for r in grouped}
    assert by[(0, 0)].final_loss != by[(0, 1)].final_loss


def test_group_leaves_the_callers_rng_and_threads(one_thread: None) -> None:
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    torch.set_num_threads(2)  # the fixture puts back 1 afterwards
    train_group(_works()[-1:], threads=1)  # a member reseeds and draws from the global RNG
    assert torch.equal(torch.rand(3), expected) and torch.get_num_threads() == 2


class _Ctx:
    """What _run_all reports to (the LocalContext's progress and log), kept in memory."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.progress_calls: list[tuple[int, int]] = []

    def log(self, line: str) -> None:
        self.lines.append(line)

    def progress(self, done: int, total: int, **_: object) -> None:
        self.progress_calls.append((done, total))


def test_ablation_runs_grouped_when_configured(one_thread: None, monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    """The CPU lane takes the grouped path when config says so (the GPU lane always does), and
    gives the same results as each Work trained alone."""
    assert use_batched("cuda") and use_batched("cpu") == config.ABLATION.batched_cpu
    monkeypatch.setattr(config, "ABLATION", dataclasses.replace(config.ABLATION, batched_cpu=True))
    works = [w for w in _works() if w.seed == 1]
    ctx = _Ctx()
    results = _run_all(works, parse_spec(SPEC), ctx)
    assert any(line.startswith("grouped: 2 (arm, seed) runs in one process") for line in ctx.lines)
    assert sum(line.startswith("done ") for line in ctx.lines) == 2
    assert ctx.progress_calls[-1] == (12, 12)  # 2 runs x 6 steps, and the last report says done
    for w, r in zip(works, results, strict=True):
        _assert_same(train_and_eval(w), r, tol=1e-6)
