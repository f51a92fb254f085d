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

ArmRun holds one (arm, seed) while it trains, so the same loop serves beyond an ablation: the
full run on a task (jobs/train.py: an `after_step` hook for metrics and checkpoints, `state` /
`restore` for an exact resume) and the smoke of an ablation's arms (jobs/smoke.py: `eval_loss`
on a `held_out` batch before and after). train_and_eval is what an ablation runs: no hook.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

import config
from harness.tasks import Batch, Cells, Task, cells, counts, line_hash, units

if TYPE_CHECKING:
    import torch

# torch is imported where it is used, not here: the data and seed helpers (data_rng, Work, ...)
# serve validation at submit time too (harness/ablate.py check_primary), where the daemon must
# not load torch.


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
    threads: int = 1  # torch CPU threads (0: torch's default); an ablation's seed processes take one each


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
    import torch

    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


def predict(model: torch.nn.Module, cfg: config.Config, batch: Batch, depth: int | None,
            chunk: int = 256) -> np.ndarray:
    """The argmax at every position: one forward pass, since no answer of a generated task is
    ever fed back as input."""
    import torch

    from models.step import autocast_for

    model.eval()
    device = next(model.parameters()).device
    preds = []
    with torch.no_grad():
        for s in range(0, len(batch.x), chunk):
            with autocast_for(cfg, device):
                logits, _ = model(_tensor(batch.x[s : s + chunk], device), n_steps=depth)
            preds.append(logits.argmax(-1).cpu().numpy())
    return np.concatenate(preds)


def generate_hits(model: Any, task: Any, split: str, depth: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Bring-your-own: (exact match of the greedy target, difficulty) per line, generated with
    the KV cache. Lines are grouped by prompt length so a batch needs no padding."""
    import torch

    model.eval()
    examples = task.test_examples(split)
    by_len: dict[int, list[int]] = {}
    for i, ex in enumerate(examples):
        by_len.setdefault(len(ex.prompt), []).append(i)
    hits = np.zeros(len(examples), dtype=float)
    with torch.no_grad():
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


class ArmRun:
    """One (arm, seed) being trained: the model, its TrainStep, the data stream and where the
    loop stands. `state()` / `restore()` hold all of it, so a run continued from a state takes
    the steps an uninterrupted one would have taken."""

    def __init__(self, work: Work):
        import torch

        from models import build_model
        from models.step import TrainStep

        if work.threads > 0:
            torch.set_num_threads(work.threads)
        self.work = work
        self.task = make_task_for(work)
        torch.manual_seed(init_seed(work.seed, work.arm_name))  # init and training depths
        self.model = build_model(work.cfg).to(work.device)
        self.step_fn = TrainStep(self.model, work.cfg, work.device)
        self.rng = data_rng(work.seed)
        cut = work.train_max_difficulty
        # the pool is drawn before any state is restored, so a resumed run draws the same pool
        self.pool = self.task.train_batch(self.rng, work.train_examples, cut) if work.train_examples else None
        self.seen: list[np.ndarray] = []  # hashes of every training line drawn
        self.step = 0
        self.smooth = float("nan")
        self.curve: list[tuple[int, float]] = []
        self.train_s = 0.0  # seconds inside the loop, over every session: what max_seconds budgets
        self.wall_s = 0.0  # this session's
        self.cpu_started = time.process_time()

    @property
    def own_depth(self) -> int:
        return arm_depth(self.work.cfg.model, self.work.n_steps)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        tcfg, work = self.work.cfg.train, self.work
        if self.pool is None:
            batch = self.task.train_batch(self.rng, tcfg.batch_size, work.train_max_difficulty)
        else:
            batch = self.pool.rows(self.rng.integers(0, len(self.pool.x), size=tcfg.batch_size))
        self.seen.append(line_hash(batch.x))
        return _tensor(batch.x, work.device), _tensor(batch.y, work.device)

    def train(self, report: Callable[[int, int, float], None] | None = None,
              after_step: Callable[[ArmRun, float, float], None] | None = None) -> None:
        """Steps until the budget is spent (from self.step: a restored run goes on from there).
        `after_step(run, raw loss, lr)`, the hook of a run outside an ablation, follows each step."""
        started, before = time.monotonic(), self.train_s
        self.cpu_started = time.process_time()
        self.model.train()
        while True:
            elapsed = before + (time.monotonic() - started)
            if self.budget_spent(elapsed):
                break
            value, lr = self.advance(elapsed, report)
            self.train_s = before + (time.monotonic() - started)
            if after_step is not None:
                after_step(self, value, lr)
        self.wall_s = time.monotonic() - started

    # budget_spent and advance are the loop's body, apart so that harness/batched.py can step
    # several runs in one process, one step of each in turn, through the same code as train().
    def budget_spent(self, elapsed: float) -> bool:
        """Whether the budget is spent after `elapsed` seconds of this run's training."""
        tcfg = self.work.cfg.train
        return (tcfg.max_seconds > 0 and elapsed >= tcfg.max_seconds) or self.step >= tcfg.max_steps

    def advance(self, elapsed: float, report: Callable[[int, int, float], None] | None = None
                ) -> tuple[float, float]:
        """One optimizer step at `elapsed` seconds of training: the smoothed loss, the curve and
        `report` every log interval. Returns (raw loss, lr)."""
        from models.step import TrainingDiverged

        try:
            value, lr = self.step_fn(self.next_batch, self.step, elapsed)
        except TrainingDiverged as e:
            raise TrainingDiverged(f"{self.work.arm_name} seed {self.work.seed}: {e}") from None
        self.record(value, elapsed, report)
        return value, lr

    def record(self, value: float, elapsed: float, report: Callable[[int, int, float], None] | None = None
               ) -> None:
        """The bookkeeping of a step taken (by advance, or by harness/batched.py for stacked
        seeds): the step count, the smoothed loss, the curve and `report` every log interval."""
        tcfg = self.work.cfg.train
        self.step += 1
        self.smooth = value if math.isnan(self.smooth) else 0.95 * self.smooth + 0.05 * value
        if self.step % tcfg.log_interval == 0:
            self.curve.append((self.step, self.smooth))
            if report is not None:
                if tcfg.max_seconds > 0:
                    est_total = max(self.step, int(self.step * tcfg.max_seconds / max(elapsed, 1e-9)))
                else:
                    est_total = tcfg.max_steps
                report(self.step, est_total, self.smooth)

    def eval_loss(self, batch: Batch, chunk: int = 0) -> float:
        """The mean loss of the batch's rows at the arm's own depth, in chunks of a training
        batch. The RNGs are forked, so measuring never changes what training does next."""
        import torch

        from models.step import autocast_for

        device = torch.device(self.work.device)
        chunk = chunk or self.work.cfg.train.batch_size
        was_training = self.model.training
        self.model.eval()
        losses = []
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for s in range(0, len(batch.x), chunk):
                with autocast_for(self.work.cfg, device):
                    _, loss = self.model(_tensor(batch.x[s : s + chunk], device),
                                         _tensor(batch.y[s : s + chunk], device), n_steps=self.own_depth)
                losses.append(float(loss))
        self.model.train(was_training)
        return sum(losses) / len(losses)

    def held_out(self, n: int) -> Batch:
        """n lines of the training distribution from a stream of their own (neither the training
        stream nor a test split's), the same for every call: a fixed batch to compare losses on."""
        return self.task.train_batch(np.random.default_rng([self.work.seed, 3]), n,
                                     self.work.train_max_difficulty)

    def state(self) -> dict[str, Any]:
        """Everything a continued run needs: plain values and tensors (torch.load weights_only)."""
        import torch

        device = torch.device(self.work.device)
        if len(self.seen) > 1:
            self.seen = [np.concatenate(self.seen)]
        seen = self.seen[0] if self.seen else np.zeros(0, dtype=np.uint64)
        return {
            "model": self.model.state_dict(), "optimizer": self.step_fn.optimizer.state_dict(),
            "scaler": self.step_fn.scaler.state_dict(), "step": self.step,
            "skipped_steps": self.step_fn.skipped,
            "smooth": self.smooth, "curve": [list(c) for c in self.curve], "train_s": self.train_s,
            "data_rng": self.rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
            "seen": torch.from_numpy(seen.view(np.int64).copy()),
            "config": self.work.cfg.to_dict(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        import torch

        device = torch.device(self.work.device)
        self.model.load_state_dict(state["model"])
        self.step_fn.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:
            self.step_fn.scaler.load_state_dict(state["scaler"])
        self.step, self.step_fn.skipped = int(state["step"]), int(state["skipped_steps"])
        self.smooth, self.train_s = float(state["smooth"]), float(state["train_s"])
        self.curve = [(int(s), float(v)) for s, v in state["curve"]]
        self.rng.bit_generator.state = state["data_rng"]
        torch.set_rng_state(state["torch_rng"].cpu())
        if device.type == "cuda" and state["cuda_rng"]:
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        self.seen = [state["seen"].numpy().view(np.uint64).copy()]

    def measure(self) -> WorkResult:
        """Every split at the arm's own depth and at each applicable eval depth."""
        work, task, model = self.work, self.task, self.model
        depths = sorted(set(applicable_depths(work.cfg.model, work.eval_depths)) | {self.own_depth})
        grid: dict[int, dict[str, Cells]] = {d: {} for d in depths}
        n_cells: dict[str, dict[str, int]] = {}
        overlap: dict[str, dict[str, int]] = {}
        trained = set(np.concatenate(self.seen).tolist()) if self.seen else set()
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
        return WorkResult(arm_index=work.arm_index, seed=work.seed, steps=self.step, wall_s=self.wall_s,
                          cpu_s=time.process_time() - self.cpu_started, final_loss=self.smooth,
                          curve=self.curve, grid=grid, counts=n_cells, overlap=overlap,
                          skipped_steps=self.step_fn.skipped)


def train_and_eval(work: Work, report: Callable[[int, int, float], None] | None = None) -> WorkResult:
    """Train work.cfg on the task for the budget, then measure every split at the arm's depth
    and at each applicable eval depth. `report(step, total, smoothed loss)` is called every log
    interval."""
    run = ArmRun(work)
    run.train(report)
    return run.measure()
