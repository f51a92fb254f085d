"""The training loop: AdamW, warmup + cosine, fp16 with a GradScaler on CUDA, crash-safe
checkpoints and exact resume.

    run_dir/
        config.json      resolved config, data, git commit, package versions
        metrics.jsonl    one JSON object per logged train step and per eval
        ckpt_last.pt     everything needed to continue bit for bit (written atomically)
        ckpt_best.pt     the lowest val_loss so far
        summary.json     the final result (also returned by train())
        log.txt          via ctx.log; ends with a greppable block of `key: value` lines

The step itself (optimizer, schedule, fp16 autocast + GradScaler on CUDA, grad accumulation,
clipping) is models/step.py, the same one the ablation harness trains with.

The budget is max_steps or max_seconds, whichever ends first; max_seconds counts the time spent
in training steps (not evals or checkpoints, as in autoresearch), summed over resumes.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import resource
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import code_commit, replace_atomic, utc_now, write_atomic, write_json_atomic
from config import CKPT_BEST, CKPT_LAST, EVAL_SEED_OFFSET, Config, ConfigError
from models import build_model, count_params
from models.data import TokenData
from models.step import TrainingDiverged, TrainStep, autocast_for, lr_at, make_optimizer, uses_fp16

__all__ = ["BEST", "LAST", "TrainingDiverged", "evaluate", "load_checkpoint", "load_model", "lr_at",
           "make_optimizer", "save_atomic", "train", "uses_fp16"]

LAST, BEST = CKPT_LAST, CKPT_BEST


def peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("tiktoken", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save, crash-safe: a crash at any moment leaves the old file or the new one."""
    replace_atomic(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> dict[str, Any]:
    if not Path(path).exists():
        raise FileNotFoundError(f"checkpoint: {path} does not exist")
    # Checkpoints hold only tensors and plain Python values, so the safe loader suffices.
    return torch.load(path, map_location=device, weights_only=True)


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[Any, Config, dict]:
    """A checkpoint -> (model in eval mode on device, its config, the checkpoint dict)."""
    ckpt = load_checkpoint(path, device)
    cfg = Config.from_dict(ckpt["config"])
    model = build_model(cfg).to(device)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, cfg, ckpt


def _rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),  # plain values: safe to load
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
    }


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(_as_tuple(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and state["cuda"]:
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line; a torn line (killed mid-write) sorts after everything."""
    try:
        return json.loads(line).get("step", 0)
    except (json.JSONDecodeError, AttributeError):
        return math.inf


def params_finite(model: torch.nn.Module) -> bool:
    return bool(torch.stack([p.isfinite().all() for p in model.parameters()]).all())


# --------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: TokenData, cfg: Config, device: torch.device,
             batches: int | None = None, n_steps: int | None = None) -> dict[str, float]:
    """Mean loss over a fixed set of eval batches -> {val_loss, val_bpb}. Leaves the global
    RNGs untouched, so evaluating never changes what training does next."""
    was_training = model.training
    model.eval()
    gen = np.random.default_rng(cfg.train.seed + EVAL_SEED_OFFSET)
    batches = batches or cfg.train.eval_batches
    total = 0.0
    for _ in range(batches):
        x, y = data.get_batch(data.eval_split, cfg.train.batch_size, cfg.model.block_size, gen)
        with autocast_for(cfg, device):
            _, loss = model(_to(x, device), _to(y, device), n_steps=n_steps)
        total += float(loss)
    model.train(was_training)
    val_loss = total / batches
    return {"val_loss": val_loss, "val_bpb": val_loss / math.log(2) / data.bytes_per_token}


def _to(a: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(a)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


# --------------------------------------------------------------------------------------------
# The loop


def check_resume_config(saved: Config, cfg: Config) -> None:
    """Resuming may change training settings (budget, intervals), never the model or precision."""
    for section in ("model", "precision"):
        a, b = getattr(saved, section), getattr(cfg, section)
        for key in a.__dataclass_fields__:
            if getattr(a, key) != getattr(b, key):
                raise ConfigError(f"{key}: cannot change on resume ({getattr(a, key)!r} in the checkpoint, "
                                  f"{getattr(b, key)!r} asked; only train settings may change)")


class _Trainer:
    def __init__(self, cfg: Config, data_dir: str | os.PathLike[str], run_dir: str | os.PathLike[str],
                 ctx: Any, checkpoints: bool):
        self.cfg, self.ctx, self.checkpoints = cfg, ctx, checkpoints
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = Path(data_dir)
        self.device = torch.device(getattr(ctx, "device", "cpu") or "cpu")
        t = cfg.train
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        if self.device.type == "cuda" and cfg.precision.gpu_memory_fraction > 0:
            torch.cuda.set_per_process_memory_fraction(cfg.precision.gpu_memory_fraction, self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

        self.data = TokenData(self.data_dir, cfg.model.vocab_size, t.val_fraction)
        self.data.check_fits(cfg.model.block_size)
        random.seed(t.seed)
        np.random.seed(t.seed)
        torch.manual_seed(t.seed)
        self.model = build_model(cfg).to(self.device)
        self.model.train()
        self.params = count_params(self.model)
        self.stepper = TrainStep(self.model, cfg, self.device)  # shared with the ablation harness
        self.optimizer, self.scaler = self.stepper.optimizer, self.stepper.scaler
        self.fp16 = self.stepper.fp16
        self.data_rng = np.random.default_rng(t.seed)
        self.step = 0
        self.train_s = 0.0  # time inside training steps: what max_seconds budgets
        self.best_val: float | None = None
        self.last_eval: dict[str, float] | None = None
        self.last_eval_step: int | None = None
        self.saved_step: int | None = None  # step of the checkpoint on disk (ckpt_last.pt)
        self.resumed_from: int | None = None

    @property
    def skipped(self) -> int:
        return self.stepper.skipped

    @skipped.setter
    def skipped(self, value: int) -> None:
        self.stepper.skipped = value

    # -- state -------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "skipped_steps": self.skipped,
            "train_s": self.train_s,
            "best_val_loss": self.best_val,
            "last_eval": self.last_eval,
            "last_eval_step": self.last_eval_step,
            "data_rng": self.data_rng.bit_generator.state,
            "rng": _rng_state(self.device),
            "config": self.cfg.to_dict(),
            "data": {"name": self.data.meta["name"], "dir": str(self.data_dir.resolve())},
            "params": self.params,
            "saved_at": utc_now(),
        }

    def restore(self, path: Path) -> None:
        ckpt = load_checkpoint(path, self.device)
        check_resume_config(Config.from_dict(ckpt["config"]), self.cfg)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"]:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        self.skipped = int(ckpt["skipped_steps"])
        self.train_s = float(ckpt["train_s"])
        self.best_val = ckpt["best_val_loss"]
        self.last_eval = ckpt["last_eval"]
        self.last_eval_step = ckpt["last_eval_step"]
        self.saved_step = self.step
        self.data_rng.bit_generator.state = ckpt["data_rng"]
        _set_rng_state(ckpt["rng"], self.device)
        self.resumed_from = self.step
        self._truncate_metrics(self.step)

    def _truncate_metrics(self, step: int) -> None:
        """Drop records a killed session wrote after its last checkpoint: they will be redone."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        kept = [line for line in path.read_text().splitlines() if _step_of(line) <= step]
        write_atomic(path, "".join(line + "\n" for line in kept))

    def save(self, name: str) -> None:
        if not self.checkpoints:
            return
        if not params_finite(self.model):
            raise TrainingDiverged(f"training diverged: the weights became NaN or inf by step {self.step}; "
                                   f"{self._kept()}")
        save_atomic(self.state(), self.run_dir / name)
        if name == LAST:
            self.saved_step = self.step

    def _kept(self) -> str:
        if self.saved_step is None:
            return "no checkpoint was written"
        return f"the last good checkpoint {self.run_dir / LAST} (step {self.saved_step}) is kept"

    def metric(self, record: dict[str, Any]) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"time": utc_now(), **record}) + "\n")

    def write_config(self, resume: bool) -> None:
        path = self.run_dir / "config.json"
        info = json.loads(path.read_text()) if resume and path.exists() else {"created_at": utc_now()}
        info.update({
            "config": self.cfg.to_dict(),
            "data": {"name": self.data.meta["name"], "dir": str(self.data_dir.resolve()),
                     "tokens": self.data.n_tokens, "tokenizer": self.data.meta["tokenizer"]},
            "params": self.params,
            "device": str(self.device),
            "git_commit": code_commit(),
            "versions": package_versions(),
        })
        if resume:
            info.setdefault("resumes", []).append({"at": utc_now(), "step": self.step})
        write_json_atomic(path, info)

    # -- one optimizer step ---------------------------------------------------------------------

    def train_step(self) -> tuple[float, float]:
        t = self.cfg.train

        def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
            x, y = self.data.get_batch("train", t.batch_size, self.cfg.model.block_size, self.data_rng)
            return _to(x, self.device), _to(y, self.device)

        try:
            loss, lr = self.stepper(next_batch, self.step, self.train_s)
        except TrainingDiverged as e:
            raise TrainingDiverged(f"{e}; {self._kept()}") from None
        self.step += 1
        return loss, lr

    def expected_steps(self) -> int:
        """The step the run will end at: max_steps, or sooner under a wall-clock budget."""
        t = self.cfg.train
        if t.max_seconds <= 0 or self.train_s <= 0:
            return t.max_steps
        return min(t.max_steps, max(self.step, round(self.step * t.max_seconds / self.train_s)))

    def eval_now(self) -> dict[str, float]:
        t0 = time.monotonic()
        result = evaluate(self.model, self.data, self.cfg, self.device)
        if not math.isfinite(result["val_loss"]):
            raise TrainingDiverged(f"training diverged: val_loss is {result['val_loss']} "
                                   f"at step {self.step}; {self._kept()}")
        self.last_eval, self.last_eval_step = result, self.step
        self.metric({"event": "eval", "step": self.step, **result, "eval_s": time.monotonic() - t0})
        self.ctx.log(f"step {self.step}: val_loss {result['val_loss']:.4f} val_bpb {result['val_bpb']:.4f}")
        if self.best_val is None or result["val_loss"] < self.best_val:
            self.best_val = result["val_loss"]
            self.save(BEST)
        return result

    # -- the run --------------------------------------------------------------------------------

    def run(self, resume: bool, eval_first: bool) -> dict[str, Any]:
        t = self.cfg.train
        started = time.monotonic()
        if resume:
            self.restore(self.run_dir / LAST)
            self.ctx.log(f"resumed from {self.run_dir / LAST} at step {self.step}")
        else:
            (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
        self.write_config(resume)
        self.ctx.log(f"training {self.cfg.model.arch} ({self.params:,} parameters) on {self.device}, "
                     f"data {self.data.meta['name']} ({self.data.n_tokens:,} tokens), "
                     f"{'fp16 + GradScaler' if self.fp16 else 'fp32'}")
        if eval_first and self.step == 0:
            self.eval_now()  # the untrained model on the same eval batches: a baseline
        stop_reason = "max_steps"
        tokens_per_step = t.batch_size * t.grad_accum * self.cfg.model.block_size
        while self.step < t.max_steps:
            if t.max_seconds > 0 and self.train_s >= t.max_seconds:
                stop_reason = "max_seconds"
                break
            t0 = time.monotonic()
            loss, lr = self.train_step()
            self.train_s += time.monotonic() - t0
            if self.step % t.log_interval == 0 or self.step == 1:
                self.metric({"event": "train", "step": self.step, "loss": loss, "lr": lr,
                             "tokens": self.step * tokens_per_step, "train_s": self.train_s,
                             "skipped_steps": self.skipped})
                self.ctx.progress(self.step, self.expected_steps(), loss=loss, lr=lr)
            if self.step % t.eval_interval == 0 and self.step < t.max_steps:
                self.eval_now()
            if self.step % t.ckpt_interval == 0 and self.step < t.max_steps:
                self.save(LAST)
        if self.last_eval_step != self.step:
            self.eval_now()
        self.save(LAST)
        summary = {
            "status": "finished",
            "stop_reason": stop_reason,
            "val_loss": self.last_eval["val_loss"],  # type: ignore[index]
            "val_bpb": self.last_eval["val_bpb"],  # type: ignore[index]
            "best_val_loss": self.best_val,
            "eval_split": self.data.eval_split,
            "steps": self.step,
            "tokens": self.step * tokens_per_step,
            "skipped_steps": self.skipped,
            "peak_mem_mb": round(peak_mem_mb(self.device), 1),
            "wall_s": round(time.monotonic() - started, 3),
            "train_s": round(self.train_s, 3),
            "params": self.params,
            "arch": self.cfg.model.arch,
            "preset": self.cfg.name,
            "device": str(self.device),
            "precision": "float16" if self.fp16 else "float32",
            "data": self.data.meta["name"],
            "resumed_from_step": self.resumed_from,
            "run_dir": str(self.run_dir),
            "checkpoint": str(self.run_dir / BEST) if self.checkpoints else None,
        }
        write_json_atomic(self.run_dir / "summary.json", summary)
        self.ctx.log("---")
        for key in ("val_loss", "val_bpb", "steps", "tokens", "skipped_steps", "peak_mem_mb", "wall_s",
                    "params", "stop_reason"):
            value = summary[key]
            self.ctx.log(f"{key}: {value:.6f}" if key in ("val_loss", "val_bpb") else f"{key}: {value}")
        return summary


def train(cfg: Config, data_dir: str | os.PathLike[str], run_dir: str | os.PathLike[str], ctx: Any,
          resume: bool = False, checkpoints: bool = True, eval_first: bool = False) -> dict[str, Any]:
    """Train `cfg` on the dataset in data_dir, writing into run_dir; return the summary.
    resume=True continues from run_dir/ckpt_last.pt exactly where it was saved (the same losses
    as a run never interrupted). eval_first also evaluates the untrained model (step 0).
    Raises TrainingDiverged on a NaN/inf loss, after logging it.
    Once the card work is done (the last step, the final eval, the checkpoint), the model and
    optimizer are dropped and `ctx.release_card()` is called where the context has one (a queue
    job's: workers/run.py), so the next GPU job trains while curves.png is drawn. A diverged run
    keeps the card to its process's exit."""
    trainer = _Trainer(cfg, data_dir, run_dir, ctx, checkpoints)
    if resume and not (trainer.run_dir / LAST).exists():
        raise FileNotFoundError(f"resume: no checkpoint {trainer.run_dir / LAST} to resume from")
    try:
        summary = trainer.run(resume, eval_first)
    except TrainingDiverged as e:
        write_curves(trainer.run_dir, ctx)  # a diverged run's curves show where it went wrong
        trainer.metric({"event": "diverged", "step": trainer.step, "error": str(e)})
        write_json_atomic(trainer.run_dir / "summary.json",
                          {"status": "diverged", "error": str(e), "steps": trainer.step,
                           "skipped_steps": trainer.skipped, "run_dir": str(trainer.run_dir)})
        ctx.log(str(e))
        ctx.log("---")
        ctx.log("status: diverged")
        ctx.log(f"steps: {trainer.step}")
        raise
    out_dir = trainer.run_dir
    del trainer  # its model and optimizer: release_card frees their card memory
    release = getattr(ctx, "release_card", None)  # a foreground run's context holds the card to its end
    if release is not None:
        release()
    write_curves(out_dir, ctx)
    return summary


def write_curves(run_dir: Path, ctx: Any) -> Path | None:
    """run_dir/curves.png from metrics.jsonl: train and validation loss, the learning rate and
    the fp16 steps the GradScaler skipped, against the step. A plot is a convenience: any failure
    is logged and the run's result stands."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on a GPU box or in the queue
        import matplotlib.pyplot as plt

        rows = []
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a torn last line (killed mid-write)
        train = [r for r in rows if r.get("event") == "train"]
        evals = [r for r in rows if r.get("event") == "eval" and r.get("val_loss") is not None]
        fig, (ax_loss, ax_lr, ax_skip) = plt.subplots(1, 3, figsize=(13, 3.6))
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="train")
        ax_loss.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", ms=3,
                     label="validation")
        ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
        ax_loss.legend(fontsize=8)
        ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], lw=1, color="tab:green")
        ax_lr.set(xlabel="step", ylabel="learning rate", title="schedule")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax_skip.step([r["step"] for r in train], [r.get("skipped_steps", 0) for r in train], where="post",
                     color="tab:red")
        ax_skip.set(xlabel="step", ylabel="skipped steps (cumulative)", title="fp16 overflow skips")
        ax_skip.yaxis.get_major_locator().set_params(integer=True)
        ax_skip.set_ylim(0, max([1, *(r.get("skipped_steps", 0) for r in train)]) * 1.1)  # 0 skips: flat at 0
        for ax in (ax_loss, ax_lr, ax_skip):
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = run_dir / "curves.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return path
    except Exception as e:  # noqa: BLE001 - the plot must never fail a finished run
        ctx.log(f"curves.png not written: {type(e).__name__}: {e}")
        return None


