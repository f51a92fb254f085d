"""Several (arm, seed) Works trained in one process: one CUDA context for a whole ablation.

    train_group(works, report) -> [WorkResult, ...]   # in the order of `works`

Each Work keeps its own ArmRun (harness/train_task.py): its own model, TrainStep (optimizer,
schedule, GradScaler), data stream and torch RNG. The group takes one optimizer step of each
member in turn until every budget is spent, then measures each member. A member's step is the
unbatched path's step: the same code (ArmRun.advance), the same batches (data_rng(seed)), the
same init (init_seed(seed, arm name)) and the same random draws, because the torch RNG state
(CPU and CUDA) of each member is swapped in before its step and saved after it, so what one
member draws never moves another's stream. With the same torch thread count the results are
bit-identical to train_and_eval per Work (tests/test_batched.py); with more threads they differ
only by float summation order.

Why not torch.func (stacked parameters under vmap), as the issue first proposed:
- the members do not run the same computation: a refiner draws its training depth K (and its
  time offset and state noise) per step from its own seeded RNG stream, so three seeds draw
  three different K. Grouping only members whose draws agree would almost never group (3 seeds
  of U[1, 6]: 1 step in 36), and forcing one shared K would couple the seeds' depth draws, so the
  seeds would no longer be the independent replicates the paired test assumes;
- models/layers.py's RMSNorm is an autograd.Function without setup_context, which torch.func
  transforms refuse ("must override the setup_context staticmethod"), and the loss goes through
  torch.utils.checkpoint; making them vmap-able is a change to models/, not to the harness.
So the group is "one process, one after another per step": it removes the per-process cost (a
spawned interpreter, a torch import, a CUDA context and its memory per process) and keeps the
unbatched path's numbers. What it does not do is overlap the members' kernels on one GPU.

Under a wall-clock budget (`seconds`) each member is charged the time of its own steps, so every
member gets its budget of compute whatever the group's size; the steps a budget buys depend on
timing, so such runs match the unbatched path in distribution only, never step for step.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from harness.train_task import ArmRun, Work, WorkResult

if TYPE_CHECKING:
    import torch

# report(work, step, est_total, smoothed loss): the progress of one member
GroupReport = Callable[[Work, int, int, float], None]


@dataclasses.dataclass
class _RngState:
    """One member's torch RNG streams: the CPU generator, and the CUDA one on the GPU lane."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None

    @staticmethod
    def save(device: torch.device) -> _RngState:
        import torch

        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return _RngState(torch.get_rng_state(), cuda)

    def load(self, device: torch.device) -> None:
        import torch

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
    import torch

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


def _train_group(works: list[Work], report: GroupReport | None,
                 on_done: Callable[[Work, WorkResult], None] | None) -> list[WorkResult]:
    import torch

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
    active = list(range(len(runs)))
    while active:
        for i in list(active):
            run, device = runs[i], torch.device(runs[i].work.device)
            if run.budget_spent(train_s[i]):
                active.remove(i)
                continue
            member_report = None if report is None else _member_report(report, run.work)
            rngs[i].load(device)
            t0, c0 = time.monotonic(), time.process_time()
            run.advance(train_s[i], member_report)
            train_s[i] += time.monotonic() - t0
            cpu_s[i] += time.process_time() - c0
            rngs[i] = _RngState.save(device)
            run.train_s = run.wall_s = train_s[i]
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


def _member_report(report: GroupReport, work: Work) -> Callable[[int, int, float], None]:
    def one(step: int, total: int, loss: float) -> None:
        report(work, step, total, loss)

    return one
