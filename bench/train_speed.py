"""Training speed of the CausalRefiner against a plain GPT of (nearly) equal FLOPs per token.

    python bench/train_speed.py [--preset P] [--depth K] [--rounds 21] [--set key=value ...]
    python bench/train_speed.py --compile [...]   # eager vs torch.compile, per model (train.compile)

The plain GPT is the reasoner at a fixed depth L, same width and parts, with L chosen so its
training FLOPs per token (models.flops) are as close as possible to the refiner's at K loop
passes (default: depth_max, so the truncated-backprop passes are part of the step when
K > backprop_steps). Both models train on the same batch in the same process; the runs are
interleaved (A, B, A, B, ... for --rounds rounds of --steps steps each, after a warm-up) and the
median per-round ratio is reported:

    ratio = (plain seconds / plain FLOPs) / (refiner seconds / refiner FLOPs)

so 1.0 means the refiner turns FLOPs into progress as fast as a plain GPT, and >= 0.95 (the
target) means its machinery (loop, time signal, gate, truncated backprop) costs at most 5 %.
A timed step is forward + backward (fp16 autocast and a GradScaler on CUDA, fp32 on CPU); the
optimizer step is left out, since it scales with parameter count, not with FLOPs, and would
favour the refiner, which shares its loop weights.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import config  # noqa: E402
from models import build_model  # noqa: E402
from models.flops import train_flops_at_depth  # noqa: E402
from workers.gpu_lock import hold_card_if_cuda  # noqa: E402

# CPU default: the harness preset pinned to d_model 128 and a 512-token vocabulary (a step takes
# ~0.15 s on one thread), so tuning the harness does not move this figure.
CPU_OVERRIDES = {"block_size": 128, "vocab_size": 512, "batch_size": 8, "d_model": 128, "n_heads": 4}


def plain_config(refiner: config.Config, depth: int, overrides: dict) -> tuple[config.Config, int]:
    """The reasoner of the refiner's width whose training FLOPs/token at fixed depth L are closest
    to the refiner's at `depth` passes."""
    target = train_flops_at_depth(refiner.model, depth)

    def at(L: int) -> config.Config:
        return config.preset(refiner.name, "reasoner", **{**overrides, "n_layers": L, "depth_min": L,
                                                           "depth_max": L, "depth_eval": L})

    best = min(range(1, 129), key=lambda L: abs(train_flops_at_depth(at(L).model, L) - target))
    return at(best), best


class Timer:
    """Times forward + backward steps of one model at a fixed depth; `compiled`: through
    torch.compile, as models/step.py does with `train.compile` (the forward and loss)."""

    def __init__(self, cfg: config.Config, depth: int, device: str, idx: torch.Tensor,
                 compiled: bool = False):
        torch.manual_seed(0)
        self.model = build_model(cfg).to(device).train()
        self.forward = torch.compile(self.model) if compiled else self.model
        self.depth, self.device, self.idx = depth, device, idx
        self.scaler = torch.amp.GradScaler("cuda") if device == "cuda" else None
        self.flops = train_flops_at_depth(cfg.model, depth) * idx.numel()

    def step(self) -> None:
        with torch.autocast(self.device, dtype=torch.float16, enabled=self.device == "cuda"):
            _, loss = self.forward(self.idx, self.idx, n_steps=self.depth)
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        self.model.zero_grad(set_to_none=True)

    def seconds(self, steps: int) -> float:
        sync = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync()
        return time.perf_counter() - t0


def compare_compiled(refiner_cfg: config.Config, depth: int, plain_cfg: config.Config, plain_depth: int,
                     device: str, idx: torch.Tensor, args: argparse.Namespace) -> None:
    """`--compile`: per model, eager and compiled steps interleaved; the median per-round
    speed-up (eager seconds / compiled seconds: above 1 the compiled step is faster). The first
    compiled steps (the compilation) are timed apart and left out."""
    speedups: dict[str, float] = {}
    for name, cfg, d in (("refiner", refiner_cfg, depth), ("gpt", plain_cfg, plain_depth)):
        eager, compiled = Timer(cfg, d, device, idx), Timer(cfg, d, device, idx, compiled=True)
        eager.seconds(2)
        t0 = time.perf_counter()
        compiled.seconds(2)  # compiles (one graph: the depth is fixed)
        print(f"{name}: compiled in {time.perf_counter() - t0:.1f} s", flush=True)
        ratios = []
        for r in range(args.rounds):
            pair = (eager, compiled) if r % 2 == 0 else (compiled, eager)
            t = {id(x): x.seconds(args.steps) for x in pair}
            ratios.append(t[id(eager)] / t[id(compiled)])
            print(f"{name} round {r}: eager {t[id(eager)] / args.steps * 1e3:.1f} ms/step, compiled "
                  f"{t[id(compiled)] / args.steps * 1e3:.1f} ms/step, speed-up {ratios[-1]:.3f}", flush=True)
        speedups[name] = statistics.median(ratios)
    print(f"compile: refiner {speedups['refiner']:.2f}x, gpt {speedups['gpt']:.2f}x "
          "(eager/compiled step time; > 1: compiled is faster)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=None, choices=list(config.PRESETS),
                    help="default: rtx2060 on CUDA, ablation (pinned, see CPU_OVERRIDES) on CPU")
    ap.add_argument("--depth", type=int, default=None, help="refiner loop passes (default depth_max)")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--steps", type=int, default=4, help="steps per model per round")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--compile", action="store_true",
                    help="instead: each model eager vs torch.compile'd (what train.compile does)")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hold_card_if_cuda(device)  # never beside the GPU lane's job: one lock per card, machine-wide
    torch.set_num_threads(args.threads)
    args.preset = args.preset or ("rtx2060" if device == "cuda" else "ablation")
    overrides = dict(CPU_OVERRIDES) if device == "cpu" and args.preset == "ablation" else {}
    overrides.update(config.parse_assignments(args.set))
    refiner_cfg = config.preset(args.preset, "refiner", **overrides)
    depth = args.depth or refiner_cfg.model.depth_max
    plain_cfg, plain_depth = plain_config(refiner_cfg, depth, overrides)
    m = refiner_cfg.model
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, m.vocab_size, (refiner_cfg.train.batch_size, m.block_size), generator=gen)
    idx = idx.to(device)

    if args.compile:
        compare_compiled(refiner_cfg, depth, plain_cfg, plain_depth, device, idx, args)
        return
    refiner = Timer(refiner_cfg, depth, device, idx)
    plain = Timer(plain_cfg, plain_depth, device, idx)
    print(f"device {device}, preset {args.preset} {overrides}: batch {tuple(idx.shape)}, d_model {m.d_model}")
    print(f"refiner: {m.n_prelude} prelude + {depth} passes (backprop through "
          f"{min(depth, m.backprop_steps)}), {refiner.flops / idx.numel() / 1e6:.2f} MFLOP/token")
    print(f"plain:   {plain_depth} layers, {plain.flops / idx.numel() / 1e6:.2f} MFLOP/token")
    refiner.seconds(2)
    plain.seconds(2)  # warm-up: allocator, autotuning, caches
    ratios = []
    for r in range(args.rounds):
        # alternate which goes first, so a drift in machine load hits both alike
        pair = (refiner, plain) if r % 2 == 0 else (plain, refiner)
        t = {id(x): x.seconds(args.steps) for x in pair}
        t_ref, t_plain = t[id(refiner)], t[id(plain)]
        ratios.append((t_plain / plain.flops) / (t_ref / refiner.flops))
        print(f"round {r}: refiner {t_ref / args.steps * 1e3:.1f} ms/step, plain "
              f"{t_plain / args.steps * 1e3:.1f} ms/step, ratio {ratios[-1]:.3f}")
    print(f"ratio: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
