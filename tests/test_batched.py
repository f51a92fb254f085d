"""harness/batched.py: several (arm, seed) Works trained in one process, the seeds of one config
stacked under vmap and the rest one step of each in turn, give each Work the results the
unbatched path (train_and_eval, one Work per process) gives it: the same final loss, curve and
depth x bucket grid, bit for bit when nothing is stacked and within float tolerance when it is.
Real training, tiny budgets."""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import pytest

import config
from harness.ablate import _run_all, _work_items, arm_config, parse_spec, use_batched
from harness.batched import stacks, train_group
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


@functools.cache  # the unbatched reference run of one of _works(): the tests only read it
def _alone(index: int) -> WorkResult:
    """train_and_eval of _works()[index], made once (callers run under `one_thread`)."""
    return train_and_eval(_work_tuple()[index])


def _assert_same(a: WorkResult, b: WorkResult, tol: float) -> None:
    assert (a.arm_index, a.seed, a.steps) == (b.arm_index, b.seed, b.steps)
    assert math.isclose(a.final_loss, b.final_loss, rel_tol=tol, abs_tol=tol)
    assert [s for s, _ in a.curve] == [s for s, _ in b.curve]
    pairs = zip(a.curve, b.curve, strict=True)
    assert all(math.isclose(x, y, rel_tol=tol, abs_tol=tol) for (_, x), (_, y) in pairs)
    assert a.grid == b.grid and a.counts == b.counts and a.overlap == b.overlap
    assert a.skipped_steps == b.skipped_steps


@pytest.mark.parametrize("stack", [False, True], ids=["one-by-one", "stacked"])
def test_group_matches_the_unbatched_path_per_seed(one_thread: None, monkeypatch: pytest.MonkeyPatch,
                                                   stack: bool) -> None:
    """Each member's final loss, curve and grid are the unbatched run's (same data, same init per
    seed, same depth draws). One by one, with one thread in both, the float order is the same
    too, so the tolerance only guards against a platform's nondeterministic kernels; stacked,
    batched matmuls sum in another order."""
    monkeypatch.setattr(config, "ABLATION", dataclasses.replace(config.ABLATION, stack_seeds=stack))
    works = _works()
    assert {(w.arm_name, w.seed) for w in works} == {(a, s) for a in ("refiner", "flat-1") for s in (0, 1)}
    assert stacks(works) == ([[0, 1], [2, 3]] if stack else [[0], [1], [2], [3]])
    alone = [_alone(i) for i in range(len(works))]
    grouped = train_group(works, threads=1)
    for a, b in zip(alone, grouped, strict=True):
        _assert_same(a, b, tol=1e-5 if stack else 1e-6)
    # the seeds differ (their data and init do): a group that reused one member's stream for
    # another would make them equal
    by = {(r.arm_index, r.seed): r for r in grouped}
    assert by[(0, 0)].final_loss != by[(0, 1)].final_loss


# every random draw a training forward makes (depth, time offset, state noise), micro-batches,
# a reasoner whose depth is random (its unused blocks must get no gradient, not a zero one:
# AdamW would still decay them) and two arms of one config, which stack together
DRAWS_SPEC = {
    "task": "khop", "seeds": 2, "why": "a test", "steps": 8, "eval_examples": 40,
    "eval_depths": [1, 3], "baseline": "deep", "primary": "hops3",
    "arms": [{"name": "noisy", "arch": "refiner", "n_steps": 2,
              "set": {"d_model": 16, "log_interval": 2, "init_state": "noise", "time_signal": "random_offset",
                      "grad_accum": 2, "depth_min": 1, "depth_max": 5, "backprop_steps": 2}},
             {"name": "deep", "arch": "reasoner", "n_steps": 3,
              "set": {"d_model": 16, "log_interval": 2, "n_layers": 4, "depth_min": 1, "depth_max": 4}},
             {"name": "deep-again", "arch": "reasoner", "n_steps": 3,
              "set": {"d_model": 16, "log_interval": 2, "n_layers": 4, "depth_min": 1, "depth_max": 4}}],
}


def test_stacked_members_draw_what_they_would_alone(one_thread: None) -> None:
    spec = parse_spec(DRAWS_SPEC)
    task = make_task(spec.task, None, seed=0)
    works = _work_items(spec, [arm_config(spec, arm, task) for arm in spec.arms], "cpu")
    assert stacks(works) == [[0, 1], [2, 3, 4, 5]]  # the two reasoner arms are one config
    alone = [train_and_eval(w) for w in works]
    grouped = train_group(works, threads=1)
    for a, b in zip(alone, grouped, strict=True):
        _assert_same(a, b, tol=1e-5)


def test_what_cannot_stack_trains_one_by_one() -> None:
    works = _works()
    def changed(w: Work, section: str, **values: object) -> Work:
        part = dataclasses.replace(getattr(w.cfg, section), **values)
        return dataclasses.replace(w, cfg=dataclasses.replace(w.cfg, **{section: part}))

    seconds = [changed(w, "train", max_seconds=5.0) for w in works]
    progressive = [changed(w, "model", progressive_loss_weight=0.5) for w in works[:2]]
    assert stacks(seconds) == [[0], [1], [2], [3]]  # a stacked step is no one member's time
    assert stacks(progressive) == [[0], [1]]  # it draws inside its forward


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
    picked = [i for i, w in enumerate(_works()) if w.seed == 1]
    works = [_works()[i] for i in picked]
    ctx = _Ctx()
    results = _run_all(works, parse_spec(SPEC), ctx)
    assert any(line.startswith("grouped: 2 (arm, seed) runs in one process") for line in ctx.lines)
    assert sum(line.startswith("done ") for line in ctx.lines) == 2
    assert ctx.progress_calls[-1] == (12, 12)  # 2 runs x 6 steps, and the last report says done
    for i, r in zip(picked, results, strict=True):
        _assert_same(_alone(i), r, tol=1e-6)


@pytest.mark.parametrize("scaler", [False, True], ids=["fp32", "grad-scaler"])
def test_a_stacked_step_moves_each_members_weights_as_its_own_step_would(one_thread: None,
                                                                        scaler: bool) -> None:
    """Sharper than the results: after a few steps every weight of every member is where its
    unbatched run puts it, and AdamW has stepped each weight as often (a block that a reasoner's
    drawn depth skipped got no gradient, None and not zero, so AdamW left it alone). With a
    GradScaler on (CUDA fp16's path; here torch's CPU scaler, as no card is at hand), the stacked
    gradients are scaled and unscaled as the unbatched backward's are."""
    import torch

    from harness.batched import _RngState, _Stack
    from harness.train_task import ArmRun

    spec = parse_spec(DRAWS_SPEC)
    task = make_task(spec.task, None, seed=0)
    works = _work_items(spec, [arm_config(spec, arm, task) for arm in spec.arms], "cpu")
    cpu = torch.device("cpu")

    def scaled(run: ArmRun) -> ArmRun:
        if scaler:
            run.step_fn.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
            run.step_fn.fp16 = True
        return run

    for unit in stacks(works):
        alone = []
        for i in unit:
            run = scaled(ArmRun(works[i]))
            run.model.train()
            for _ in range(3):
                run.advance(0.0)
            alone.append(run)
        runs, rngs = [], []
        for i in unit:
            runs.append(scaled(ArmRun(works[i])))
            runs[-1].model.train()
            rngs.append(_RngState.save(cpu))
        stack = _Stack(runs)
        for _ in range(3):
            stack.advance(rngs, list(range(len(unit))), 0.0, None)
        untouched = 0
        for a, b in zip(alone, runs, strict=True):
            pa, pb = dict(a.model.named_parameters()), dict(b.model.named_parameters())
            for name in pa:
                assert torch.allclose(pa[name], pb[name], rtol=0, atol=1e-7), (works[unit[0]].arm_name, name)
            steps = [{n: int(r.step_fn.optimizer.state[p]["step"]) if p in r.step_fn.optimizer.state else 0
                      for n, p in r.model.named_parameters()} for r in (a, b)]
            assert steps[0] == steps[1]
            untouched += sum(n < 3 for n in steps[0].values())
        assert (untouched > 0) == (works[unit[0]].cfg.model.arch == "reasoner")
