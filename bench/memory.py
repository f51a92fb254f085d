"""Peak memory of one fp16 training step of a preset (target: <= 5.5 GiB for rtx2060).

    python bench/memory.py --preset rtx2060 [--arch refiner|reasoner] [--batch B] [--cap-gib 6]

The step is the trainer's: autocast fp16 forward at the deepest training depth (depth_max; the
refiner records a graph for its last backprop_steps passes only), backward through the chunked
loss, AdamW (fp32 master weights, two fp32 moments). It is run twice with two micro-batches
each, so the peak includes gradients held across gradient accumulation and the AdamW state.

On CUDA: torch.cuda.max_memory_allocated over the second step, optionally with the process
capped to --cap-gib of the card (torch.cuda.set_per_process_memory_fraction); an out-of-memory
error under the cap is a failure.

Without a GPU nothing is computed: the model and batch are fake tensors (FakeTensorMode: shapes
and dtypes, no data), at the full batch and sequence length, under CPU autocast fp16. CPU and CUDA
autocast cast the same ops of these models to fp16 (linear, matmul, scaled_dot_product_attention;
the norms and the loss run in fp32 by construction), so every tensor has the dtype it would have
on the card. Two figures:
  accounted  params + grads + AdamW state (fp32) + the tensors autograd saves for backward
             (torch.autograd.graph.saved_tensors_hooks, counted once per storage, parameters
             excluded, autocast's fp16 weight copies included) + one loss chunk in backward
             (fp16 logits, fp32 logits, fp32 log-probabilities, fp32 gradient).
  simulated  the peak of live tensor storage over the whole step, from torch's MemTracker (every
             allocation and free, including backward temporaries).
The last line is the larger of the two. Neither counts the CUDA context or allocator
fragmentation (typically a few hundred MB): that is what the 0.5 GiB below 6 GiB is for.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import config  # noqa: E402
from models import build_model, count_params  # noqa: E402
from workers.gpu_lock import hold_card_if_cuda  # noqa: E402

GIB = 2**30
MICRO_BATCHES = 2


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, idx: torch.Tensor, depth: int,
               device_type: str, scaler: torch.amp.GradScaler | None = None,
               before_forward: Callable[[], None] | None = None) -> None:
    for _ in range(MICRO_BATCHES):
        if before_forward:
            before_forward()
        with torch.autocast(device_type, dtype=torch.float16):
            _, loss = model(idx, idx, n_steps=depth)
        (scaler.scale(loss) if scaler else loss).backward()
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)


def measure_cuda(cfg: config.Config, batch: int, cap_gib: float) -> float:
    torch.cuda.empty_cache()
    if cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total))
    model = build_model(cfg).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    scaler = torch.amp.GradScaler("cuda")
    idx = torch.randint(0, cfg.model.vocab_size, (batch, cfg.model.block_size), device="cuda")
    train_step(model, opt, idx, cfg.model.depth_max, "cuda", scaler)  # creates the AdamW state
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    train_step(model, opt, idx, cfg.model.depth_max, "cuda", scaler)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / GIB


def loss_chunk_bytes(cfg: config.ModelConfig, tokens: int) -> int:
    rows = min(cfg.loss_chunk_tokens, tokens)
    return rows * cfg.vocab_size * (2 + 4 + 4 + 4)


def measure_fake(cfg: config.Config, batch: int) -> dict[str, float]:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.multiprocessing.reductions import StorageWeakRef

    def key(t: torch.Tensor) -> int:
        return StorageWeakRef(t.untyped_storage()).cdata

    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[key(t)] = t.untyped_storage().nbytes()
        return t

    mcfg = cfg.model
    with FakeTensorMode():
        model = build_model(cfg).train()
        n_params = count_params(model)
        idx = torch.randint(0, mcfg.vocab_size, (batch, mcfg.block_size))
        with torch.autocast("cpu", dtype=torch.float16), torch.autograd.graph.saved_tensors_hooks(
                pack, lambda t: t):
            _, loss = model(idx, idx, n_steps=mcfg.depth_max)
        param_keys = {key(p) for p in model.parameters()}
        activations = sum(n for k, n in saved.items() if k not in param_keys)
        del loss
        simulated = simulate_peak(model, idx, mcfg.depth_max)
    state = 4 * n_params  # one fp32 copy
    accounted = 4 * state + activations + loss_chunk_bytes(mcfg, batch * mcfg.block_size)
    return {"params_gib": state / GIB, "grads_gib": state / GIB, "adamw_gib": 2 * state / GIB,
            "activations_gib": activations / GIB,
            "loss_chunk_gib": loss_chunk_bytes(mcfg, batch * mcfg.block_size) / GIB,
            "accounted_gib": accounted / GIB, "simulated_gib": simulated / GIB}


def simulate_peak(model: torch.nn.Module, idx: torch.Tensor, depth: int) -> float:
    """Peak live bytes over two full training steps, or nan where MemTracker is unavailable."""
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:  # a torch build without torch.distributed
        return float("nan")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    tracker = MemTracker()
    tracker.track_external(model, opt)
    with tracker:
        for _ in range(2):
            # MemTracker's per-module bookkeeping wants a reset before each forward; the peak stays
            train_step(model, opt, idx, depth, "cpu", before_forward=tracker.reset_mod_stats)
    peak = tracker.get_tracker_snapshot("peak")
    return float(max(stats["Total"] for stats in peak.values()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="rtx2060", choices=list(config.PRESETS))
    ap.add_argument("--arch", default=None, choices=list(config.ARCHS))
    ap.add_argument("--batch", type=int, default=None, help="micro-batch (default: the preset's)")
    ap.add_argument("--cap-gib", type=float, default=0.0, help="CUDA only: cap the process memory")
    ap.add_argument("--cpu", action="store_true", help="use the CPU accounting even with a GPU")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    cfg = config.preset(args.preset, args.arch, **config.parse_assignments(args.set))
    batch = args.batch or cfg.train.batch_size
    m = cfg.model
    with torch.device("meta"):
        n_params = count_params(build_model(cfg))
    print(f"preset {cfg.name}, arch {m.arch}: {n_params / 1e6:.1f}M params, micro-batch {batch} x "
          f"{m.block_size} (grad_accum {cfg.train.grad_accum}), training depth {m.depth_max}, "
          f"loss chunk {m.loss_chunk_tokens}, activation checkpointing {m.activation_checkpointing}")
    if torch.cuda.is_available() and not args.cpu:
        hold_card_if_cuda("cuda")  # never beside the GPU lane's job: one lock per card, machine-wide
        print(f"device: {torch.cuda.get_device_name(0)}, cap {args.cap_gib or 'none'} GiB")
        try:
            peak = measure_cuda(cfg, batch, args.cap_gib)
        except torch.OutOfMemoryError:
            print(f"peak_gib: out of memory under the {args.cap_gib} GiB cap")
            sys.exit(1)
    else:
        figures = measure_fake(cfg, batch)
        for name, value in figures.items():
            print(f"{name}: {value:.2f}")
        peak = max(figures["accounted_gib"], figures["simulated_gib"])
        print("device: none (fake tensors, CPU autocast fp16; see the module docstring)")
    print(f"peak_gib: {peak:.2f}")


if __name__ == "__main__":
    main()
