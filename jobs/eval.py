"""eval: evaluate a training run's checkpoint on its dataset's held-out split, at the model's
inference depth or at `n_steps`. The eval batches are the ones training used, so evaluating
ckpt_best.pt at the default depth reproduces the run's best val_loss."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import config
from config import Validated, setting
from jobs.paths import check_run_id
from records import archive

LANES = ("gpu", "cpu")


@dataclass(frozen=True)
class Spec(Validated):
    run: str  # a run id under $LAB_RUNS (a job id, or train-YYYYmmdd-HHMMSS-abc123); never a path
    n_steps: int | None = setting(None, 1, 1024, "depth at eval (loop passes or layers); "
                                  "default the model's depth_eval")
    batches: int | None = setting(None, 1, 100_000, "eval batches; default the run's eval_batches")
    checkpoint: Literal["best", "last"] = "best"

    def _check_relations(self) -> None:
        # A run id only: a path would let a spec point the job at any directory of the machine,
        # and the error (no such run) say whether it exists.
        check_run_id(self.run, "eval.run")


def run_dir_of(run: str) -> Path:
    """The directory of run id `run`: $LAB_RUNS/<run>, which must resolve (symlinks followed)
    inside $LAB_RUNS. FileNotFoundError when there is none (archive.ArchivedRun, a subclass, when
    it is in the cold tier); ConfigError for a non-id."""
    check_run_id(run, "run")
    path = Path(config.paths().runs) / run
    # A link under runs/ that leads out of it is no run of this lab: the same answer as none.
    if not _inside_runs(path) or not path.is_dir():
        raise FileNotFoundError(f"run: no run {run!r} in {config.paths().runs}")
    # An archived run keeps only its pointer here: say so (where, and `lab restore`), not that the
    # checkpoint does not exist. Eval reads hot files only; the cold disk may be slow or absent.
    try:
        pointer = archive.read_pointer(path)
    except archive.ArchiveError as e:  # a damaged pointer: where the files are is not known
        raise FileNotFoundError(f"run: {e}") from None
    if pointer is not None:
        raise archive.ArchivedRun(run, pointer["archive_path"])
    return path


def _inside_runs(path: Path) -> bool:
    return path.resolve().is_relative_to(Path(config.paths().runs).resolve())


def checkpoint_of(spec: Spec) -> Path:
    ckpt = run_dir_of(spec.run) / f"ckpt_{spec.checkpoint}.pt"
    # torch.load unpickles: a checkpoint linked from outside $LAB_RUNS is not loaded either.
    if not ckpt.exists() or not _inside_runs(ckpt):
        raise FileNotFoundError(f"run: {ckpt} does not exist (not a training run, or not checkpointed yet)")
    return ckpt


def run(spec: Spec, ctx: Any) -> dict[str, Any]:
    import torch

    from models.data import TokenData, dataset_dir
    from models.train import evaluate, load_model

    ckpt_path = checkpoint_of(spec)
    device = torch.device(ctx.device)
    model, cfg, ckpt = load_model(ckpt_path, device)
    if "data" not in ckpt:  # a task run (train with `task`): its measure is the grid, not a val loss
        raise ValueError(f"run: {ckpt_path.parent.name} trained on a harness task, not a token corpus; "
                         "its depth x difficulty grid is in its result (`lab show`) and summary.json")
    data_dir = Path(ckpt["data"]["dir"])
    if not data_dir.is_dir():  # the run moved hosts or tiers: find the dataset by name
        data_dir = dataset_dir(ckpt["data"]["name"], config.paths().runs)
    data = TokenData(data_dir, cfg.model.vocab_size, cfg.train.val_fraction)
    data.check_fits(cfg.model.block_size)
    depth = spec.n_steps or cfg.model.depth_eval
    metrics = evaluate(model, data, cfg, device, batches=spec.batches or None, n_steps=depth)
    result = {
        "run": str(ckpt_path.parent), "checkpoint": str(ckpt_path), "step": ckpt["step"],
        "arch": cfg.model.arch, "n_steps": depth, "batches": spec.batches or cfg.train.eval_batches,
        "eval_split": data.eval_split, "data": ckpt["data"]["name"], **metrics,
    }
    (Path(ctx.run_dir) / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    ctx.log("---")
    for key in ("val_loss", "val_bpb", "n_steps", "step"):
        ctx.log(f"{key}: {result[key]}")
    return result
