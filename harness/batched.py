"""Several (arm, seed) Works trained in one process: one CUDA context for a whole ablation, and
the seeds of one config stacked into one model.

    train_group(works, report) -> [WorkResult, ...]   # in the order of `works`

Each Work keeps its own ArmRun (harness/train_task.py): its own model, TrainStep (optimizer,
schedule, GradScaler), data stream and torch RNG. The group takes one optimizer step of each
member in turn until every budget is spent, then measures each member.

Stacking (config.ABLATION.stack_seeds). Members of one config (the seeds of an arm, and arms
with the same settings) form a stack: each step, their parameters are stacked along a new first
dimension and one torch.func.vmap(grad) computes every member's loss and gradients in one
forward and one backward, so three seeds cost about one (larger) forward on a GPU. Each
member's gradients then go back into its own parameters and its own TrainStep.update finishes
its step (unscale, clip, scaler.step): the optimizer, schedule and data are the unbatched
path's. What the vmapped forward has to do differently, and why it gives the same numbers:
- random ops do not run under vmap, and each member must draw from its own stream: so each
  member's Draws (its depth K, time offset, state noise: models/layers.py) are drawn first,
  from its own RNG state, in the order its forward would draw them, and passed in;
- the members' depths differ, and a vmapped loop runs one Python loop for all: it runs to the
  deepest member's K, and a member past its own K keeps its state (torch.where), which is
  exactly its own K passes; passes before its last backprop_steps have their output detached,
  which is what the unbatched loop's no-grad passes give. A reasoner's blocks beyond a
  member's depth get no gradient at all (None, not zero: AdamW skips them as it would);
- torch.utils.checkpoint does not run under torch.func: activations are kept instead
  (models.layers.keep_activations), the same values at more memory.
Batched matmuls sum in another order, so stacked members match their unbatched runs within
float tolerance, not bit for bit (tests/test_batched.py). The extra passes of the shallower
members (up to the deepest K drawn) are paid for in FLOPs; on a GPU a small model is launch
bound, so one stacked step costs about one member's. A config that cannot stack (the
progressive loss draws inside its forward; train.compile; a wall-clock budget, see below)
trains one step of each in turn.

Unstacked members run one after another: the same code (ArmRun.advance), the same batches
(data_rng(seed)), the same init (init_seed(seed, arm name)) and the same random draws, because
the torch RNG state (CPU and CUDA) of each member is swapped in before its step and saved
after it, so what one member draws never moves another's stream. With the same torch thread
count their results are bit-identical to train_and_eval per Work.

Under a wall-clock budget (`seconds`) each member is charged the time of its own steps, so
every member gets its budget of compute whatever the group's size; a stacked step is no one
member's time, so such members never stack. The steps a budget buys depend on timing, so such
runs match the unbatched path in distribution only, never step for step.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch.func import functional_call, grad_and_value, vmap

import config
from harness.train_task import ArmRun, Work, WorkResult
from models.layers import Draws, keep_activations
from models.refiner import CausalRefiner
from models.step import TrainingDiverged, autocast_for

# report(work, step, est_total, smoothed loss): the progress of one member
GroupReport = Callable[[Work, int, int, float], None]


@dataclasses.dataclass
class _RngState:
    """One member's torch RNG streams: the CPU generator, and the CUDA one on the GPU lane."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None

    @staticmethod
    def save(device: torch.device) -> _RngState:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return _RngState(torch.get_rng_state(), cuda)

    def load(self, device: torch.device) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, device)


def group_threads(device: str, cores: int) -> int:
    """Torch threads for a group: on CPU the one process gets every core (the process pool gives
    each of its processes one); on CUDA the host only launches kernels, so one thread."""
    return max(1, cores) if device == "cpu" else 1


def train_group(works: list[Work], report: GroupReport | None = None,
                on_done: Callable[[Work, WorkResult], None] | None = None,
                threads: int | None = None) -> list[WorkResult]:
    """Train every Work in this process, one step of each in turn, then measure each (results in
    the order of `works`). `threads` replaces each Work's torch thread count when given.
    `on_done(work, result)` follows each member's measurement. A TrainingDiverged of any member
    is raised as it is: the ablation has failed, as in the process pool."""
    if threads is not None:
        works = [dataclasses.replace(w, threads=threads) for w in works]
    cuda = sorted({w.device for w in works if w.device.startswith("cuda")})
    threads_before = torch.get_num_threads()
    # the members reseed and swap the global RNG: the caller's stream (and thread count) is
    # left as it was, as when the Works trained in child processes
    with torch.random.fork_rng(devices=cuda):
        try:
            return _train_group(works, report, on_done)
        finally:
            torch.set_num_threads(threads_before)


def stack_key(work: Work) -> str | None:
    """Members with the same key train as one stack; None: this member cannot be stacked."""
    cfg = work.cfg
    # under a wall-clock budget a member is charged its own steps' time, and a stack's step has
    # no time of one member's: stacking would give a stacked arm another budget than the rest
    if (not config.ABLATION.stack_seeds or cfg.train.compile or cfg.model.progressive_loss_weight > 0
            or cfg.train.max_seconds > 0 or cfg.model.arch not in ("refiner", "reasoner")):
        return None
    # the model and its training decide the shapes and the computation; the task and its cut
    # decide the batches' shapes (checked again each step)
    return repr((cfg.to_dict(), work.device, work.task_name, work.task_dir, work.task_sizes,
                 work.train_examples, work.train_max_difficulty))


def stacks(works: list[Work]) -> list[list[int]]:
    """The indices of `works` that train as one stack, in order; a member alone is a list of one."""
    by_key: dict[str, list[int]] = {}
    for i, w in enumerate(works):
        key = stack_key(w)
        by_key.setdefault(f"alone {i}" if key is None else key, []).append(i)
    return list(by_key.values())


def _train_group(works: list[Work], report: GroupReport | None,
                 on_done: Callable[[Work, WorkResult], None] | None) -> list[WorkResult]:

    runs: list[ArmRun] = []
    rngs: list[_RngState] = []
    for w in works:
        run = ArmRun(w)  # seeds the global torch RNG by (seed, arm name) and builds the model
        runs.append(run)
        rngs.append(_RngState.save(torch.device(w.device)))  # the stream as its training starts
    train_s = [0.0] * len(runs)  # each member's own seconds of training: what its budget counts
    cpu_s = [0.0] * len(runs)  # and its own CPU seconds: the process's are every member's
    for run in runs:
        run.model.train()
    units = stacks(works)
    stacked = {u[0]: _Stack([runs[i] for i in u]) for u in units if len(u) > 1}
    active = list(units)
    while active:
        for unit in list(active):
            if runs[unit[0]].budget_spent(train_s[unit[0]]):  # a stack's members share a budget
                active.remove(unit)
                continue
            t0, c0 = time.monotonic(), time.process_time()
            if unit[0] in stacked:
                stacked[unit[0]].advance(rngs, unit, train_s[unit[0]], report)
            else:
                i = unit[0]
                device = torch.device(runs[i].work.device)
                rngs[i].load(device)
                runs[i].advance(train_s[i], None if report is None else _member_report(report, runs[i].work))
                rngs[i] = _RngState.save(device)
            wall, cpu = time.monotonic() - t0, time.process_time() - c0
            for i in unit:
                train_s[i] += wall / len(unit)
                cpu_s[i] += cpu / len(unit)
                runs[i].train_s = runs[i].wall_s = train_s[i]
    results = []
    for i, run in enumerate(runs):
        rngs[i].load(torch.device(run.work.device))  # measuring draws from the member's stream too
        # measure() reports process_time() - cpu_started: start it so that it counts this
        # member's training CPU time and then its own measurement, as an unbatched run does
        run.cpu_started = time.process_time() - cpu_s[i]
        result = run.measure()
        results.append(result)
        if on_done is not None:
            on_done(run.work, result)
    return results


class _Stack:
    """Members of one config, one optimizer step of all of them at once (see the module's doc)."""

    def __init__(self, runs: list[ArmRun]):
        self.runs = runs
        self.forward = _StackedLoss(runs[0].model)  # the template whose parameters vmap replaces

    def advance(self, rngs: list[_RngState], members: list[int], elapsed: float,
                report: GroupReport | None) -> None:
        runs, cfg = self.runs, self.runs[0].work.cfg
        device = torch.device(runs[0].work.device)
        for r in runs:
            r.step_fn.set_lr(r.step, elapsed)
        # every member's micro-batches first: the data streams are numpy's, apart from torch's
        batches = [[r.next_batch() for _ in range(cfg.train.grad_accum)] for r in runs]
        if len({tuple(b[0].shape) for bs in batches for b in bs}) > 1:
            self._one_by_one(rngs, members, batches, elapsed, report)
            return
        values = [0.0] * len(runs)
        for micro in range(cfg.train.grad_accum):
            draws = []
            for r, i, bs in zip(runs, members, batches, strict=True):
                rngs[i].load(device)
                draws.append(r.model.draw(bs[micro][0]))
                rngs[i] = _RngState.save(device)
            grads, losses = self._gradients([b[micro] for b in batches], draws)
            for j, r in enumerate(runs):
                unused = self.forward.unused(draws[j].depth)
                for name, p in r.model.named_parameters():
                    if name in unused:
                        continue
                    g = grads[name][j]
                    p.grad = g.clone() if p.grad is None else p.grad + g
                values[j] += float(losses[j])
        for r, value in zip(runs, values, strict=True):
            try:
                r.step_fn.update(value, r.step)
            except TrainingDiverged as e:
                raise TrainingDiverged(f"{r.work.arm_name} seed {r.work.seed}: {e}") from None
            r.record(value, elapsed, None if report is None else _member_report(report, r.work))

    def _gradients(self, batches: list[tuple[torch.Tensor, torch.Tensor]], draws: list[Any]
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Every member's gradients (scaled by its GradScaler's scale, divided by grad_accum, as
        TrainStep's backward gives them) and its unscaled loss / grad_accum, stacked."""
        runs, cfg = self.runs, self.runs[0].work.cfg
        device = torch.device(runs[0].work.device)
        own = [dict(r.model.named_parameters()) for r in runs]
        params = {n: torch.stack([o[n].detach() for o in own]) for n in own[0]}
        own_buffers = [dict(r.model.named_buffers()) for r in runs]
        buffers = {n: torch.stack([o[n] for o in own_buffers]) for n in own_buffers[0]}
        x = torch.stack([b[0] for b in batches])
        y = torch.stack([b[1] for b in batches])
        depth = torch.tensor([d.depth for d in draws], device=device)
        offset = torch.tensor([float(d.offset) for d in draws], device=device)
        noise = None if draws[0].noise is None else torch.stack([d.noise for d in draws])
        # scaler.scale of a one: the scale as a tensor (1 when the scaler is off), and the
        # scaler's lazy start, which its unscale_ and step need, as scaler.scale(loss) does it
        scale = torch.stack([r.step_fn.scaler.scale(torch.ones((), device=device)) for r in runs])
        deepest, accum, forward = max(d.depth for d in draws), cfg.train.grad_accum, self.forward

        def loss_of(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x: torch.Tensor,
                    y: torch.Tensor, depth: torch.Tensor, offset: torch.Tensor, noise: torch.Tensor | None,
                    scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with autocast_for(cfg, device):  # the forward only: grad_and_value's backward runs outside
                loss = functional_call(forward, ({f"model.{k}": v for k, v in p.items()},
                                                 {f"model.{k}": v for k, v in b.items()}),
                                       (x, y, depth, offset, noise, deepest)) / accum
            return loss * scale, loss.detach()

        in_dims = (0, 0, 0, 0, 0, 0, None if noise is None else 0, 0)
        with keep_activations(), warnings.catch_warnings():
            # the CPU attention kernel has no vmap rule: torch loops over the members there
            warnings.filterwarnings("ignore", message="There is a performance drop")
            grads, (_, losses) = vmap(grad_and_value(loss_of, has_aux=True), in_dims=in_dims)(
                params, buffers, x, y, depth, offset, noise, scale)
        return grads, losses

    def _one_by_one(self, rngs: list[_RngState], members: list[int],
                    batches: list[list[tuple[torch.Tensor, torch.Tensor]]], elapsed: float,
                    report: GroupReport | None) -> None:
        """A step whose members' batches differ in shape: each member's own step, unstacked, on
        the batches already drawn for it."""
        for r, i, bs in zip(self.runs, members, batches, strict=True):
            device = torch.device(r.work.device)
            rngs[i].load(device)
            queue = iter(bs)
            original, r.next_batch = r.next_batch, lambda q=queue: next(q)  # type: ignore[method-assign]
            try:
                r.advance(elapsed, None if report is None else _member_report(report, r.work))
            finally:
                r.next_batch = original  # type: ignore[method-assign]
            rngs[i] = _RngState.save(device)


class _StackedLoss(nn.Module):
    """One member's training loss given its draws, run to the stack's deepest depth; under
    vmap its parameters are the member's slice of the stacked ones."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def unused(self, depth: int) -> set[str]:
        """The parameters a forward of this depth never reads (their .grad stays None)."""
        m = self.model
        if isinstance(m, CausalRefiner):
            return set()
        return {f"blocks.{i}.{n}" for i in range(depth, len(m.blocks))
                for n, _ in m.blocks[i].named_parameters()}

    def forward(self, x: torch.Tensor, y: torch.Tensor, depth: torch.Tensor, offset: torch.Tensor,
                noise: torch.Tensor | None, deepest: int) -> torch.Tensor:
        m = self.model
        if isinstance(m, CausalRefiner):
            e, times, h = m.start(x, Draws(deepest, offset, noise))
            first_grad = depth - m.cfg.backprop_steps  # CausalRefiner.loop's truncated backprop
            for k in range(deepest):
                new = m.refine(h, e, None if times is None else times[k])
                new = torch.where(k >= first_grad, new, new.detach())
                h = torch.where(k < depth, new, h)  # past its own depth a member keeps its state
            return m.loss(m.norm_f(h), y)
        h = m.wte(x)
        for i in range(deepest):
            h = torch.where(i < depth, m.blocks[i](h, m.rope), h)
        return m.loss(m.norm_f(h), y)


def _member_report(report: GroupReport, work: Work) -> Callable[[int, int, float], None]:
    def one(step: int, total: int, loss: float) -> None:
        report(work, step, total, loss)

    return one
