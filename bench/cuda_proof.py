"""The CUDA path in one prepared run, for the first session that has a card (issue 17):

1. fp16 autocast + GradScaler: both architectures train `--steps` steps (the ablation preset
   on khop, the harness's loop) with no NaN; the steps the scaler skipped are counted.
2. Peak memory of the `rtx2060` preset, the process capped at 6 GiB of the card
   (bench/memory.py --cap-gib 6, torch.cuda.set_per_process_memory_fraction), both archs.
3. The card-idle gap between back-to-back GPU-lane jobs, with and without a CUDA context made
   ahead of time (bench/card_idle.py --cuda-preinit).
4. MFU of an `rtx2060` training step: model FLOPs (models/flops.py) per second over the card's
   fp16 dense peak (a table by name, or --peak-tflops), and what that MFU would be on an RTX
   2060 (25.8 TFLOPS fp16 tensor peak); the card's measured fp16 matmul rate is shown beside.
5. An ablation's seeds stacked under vmap against one step of each in turn, on the card
   (harness/batched.py): the training time of each and the largest per-seed difference.

    python bench/cuda_proof.py                 # on a card; ~5 min on a datacentre GPU
    python bench/cuda_proof.py --rehearse      # on CPU, tiny sizes: checks the script runs

Without a card (and without --rehearse) it prints "cuda_proof: no CUDA here" and exits 2. Each
part prints its own lines; the last line sums them up. A failing part says why and the script
goes on, exiting 1 at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import config  # noqa: E402
from harness.ablate import _work_items, arm_config, load_spec_file, parse_spec  # noqa: E402
from harness.tasks import make_task  # noqa: E402

RTX2060_FP16_TFLOPS = 25.8
# Dense fp16 tensor-core peaks (TFLOPS, no sparsity), by a substring of the device name.
PEAKS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
         "RTX 4090": 165.2, "RTX 3090": 71.0, "RTX 2060": RTX2060_FP16_TFLOPS, "T4": 65.0, "V100": 125.0}


def works_of(spec_path: Path, device: str, **overrides: Any) -> list[Any]:
    spec = load_spec_file(spec_path)
    spec = parse_spec({**spec.to_dict(), **overrides})
    task = make_task(spec.task, None, seed=0)
    return list(_work_items(spec, [arm_config(spec, a, task) for a in spec.arms], device))


def fp16_part(device: str, steps: int) -> tuple[bool, str]:
    from harness.train_task import train_and_eval

    lines, ok = [], True
    for arch in ("refiner", "reasoner"):
        works = works_of(ROOT / "harness" / "specs" / "khop_default.toml", device, steps=steps, seeds=3,
                         eval_examples=100)
        work = next(w for w in works if w.cfg.model.arch == arch)
        t0 = time.monotonic()
        r = train_and_eval(dataclasses.replace(work, threads=0))
        finite = math.isfinite(r.final_loss) and all(math.isfinite(v) for _, v in r.curve)
        ok &= finite
        lines.append(f"{arch} {'ok' if finite else 'NaN'} ({r.steps} steps, final loss {r.final_loss:.3f}, "
                     f"{r.skipped_steps} skipped by the scaler, {time.monotonic() - t0:.0f} s)")
        print(f"[fp16] {work.arm_name} ({arch}): {lines[-1]}", flush=True)
    return ok, "; ".join(lines)


def last_line(cmd: list[str], timeout: float) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    out = (proc.stdout + proc.stderr).strip().splitlines()
    for line in out[-8:]:
        print(f"    {line}", flush=True)
    return proc.returncode, out[-1] if out else "(no output)"


def memory_part(rehearse: bool) -> tuple[bool, str]:
    found, ok = [], True
    for arch in ("refiner", "reasoner"):
        cmd = ["bench/memory.py", "--preset", "rtx2060", "--arch", arch]
        small = ["--set", "d_model=64", "--set", "n_heads=2", "--set", "block_size=64"]
        cmd += small if rehearse else ["--cap-gib", "6"]
        rc, line = last_line(cmd, 600)
        ok &= rc == 0 and "out of memory" not in line
        found.append(f"{arch} {line.removeprefix('peak_gib: ')} GiB")
        print(f"[memory] rtx2060 {arch}: {line} (exit {rc})", flush=True)
    return ok, ", ".join(found)


def idle_part(rehearse: bool) -> tuple[bool, str]:
    cmd = ["bench/card_idle.py", "--jobs", "3"] if rehearse else ["bench/card_idle.py", "--cuda-preinit"]
    rc, line = last_line(cmd, 600)
    print(f"[idle] {line} (exit {rc})", flush=True)
    return rc == 0, line.removeprefix("card_idle_median_s: ") + " (seconds)"


def matmul_tflops(device: str, n: int) -> float:
    dtype = torch.float16 if device == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    reps, t0 = 10, time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def mfu_part(device: str, rehearse: bool, peak_override: float) -> tuple[bool, str]:
    from models import build_model
    from models.flops import train_flops_per_token
    from models.step import TrainStep

    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    peak = peak_override or next((v for k, v in PEAKS.items() if k in name), 0.0)
    measured = matmul_tflops(device, 512 if rehearse else 8192)
    print(f"[mfu] {name}: fp16 matmul {measured:.1f} TFLOPS measured; table peak "
          f"{peak or 'unknown (give --peak-tflops)'}", flush=True)
    parts, ok = [], True
    for arch in ("refiner", "reasoner"):
        small = dict(d_model=64, n_heads=2, block_size=64, n_prelude=1, n_layers=2, depth_min=1, depth_max=2,
                     depth_eval=2, batch_size=2, grad_accum=1)
        cfg = config.preset("rtx2060", arch, **(small if rehearse else {}))
        torch.manual_seed(0)
        model = build_model(cfg).to(device).train()
        step = TrainStep(model, cfg, device)
        t = cfg.train
        x = torch.randint(0, cfg.model.vocab_size, (t.batch_size, cfg.model.block_size), device=device)

        def batch(x: torch.Tensor = x) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

        for i in range(3):  # warm-up: the allocator, cuBLAS handles, the first optimizer step
            step(batch, i)
        sync(device)
        n, t0 = (2 if rehearse else 10), time.perf_counter()
        losses = [step(batch, 3 + i)[0] for i in range(n)]
        sync(device)
        seconds = (time.perf_counter() - t0) / n
        tokens = t.batch_size * t.grad_accum * cfg.model.block_size
        achieved = train_flops_per_token(cfg.model) * tokens / seconds / 1e12
        ok &= all(math.isfinite(v) for v in losses)
        mfu = achieved / peak if peak else float("nan")
        parts.append(f"{arch} {100 * mfu:.1f}%")
        on_2060 = tokens / seconds * RTX2060_FP16_TFLOPS / peak if peak else float("nan")
        print(f"[mfu] rtx2060 {arch}: {seconds * 1000:.0f} ms/step, {tokens / seconds:,.0f} tokens/s, "
              f"{achieved:.2f} model TFLOPS = {100 * mfu:.1f}% of the {peak or '?'} TFLOPS peak, "
              f"{100 * achieved / measured:.1f}% of the measured matmul rate; at this MFU an RTX 2060 "
              f"does {mfu * RTX2060_FP16_TFLOPS:.2f} TFLOPS, {on_2060:,.0f} tokens/s", flush=True)
        del model, step
        if device == "cuda":
            torch.cuda.empty_cache()
    return ok, f"MFU {', '.join(parts)} of {name}'s fp16 peak"


def stacked_part(device: str, steps: int) -> tuple[bool, str]:
    from harness.batched import train_group

    works = works_of(ROOT / "harness" / "specs" / "khop_default.toml", device, steps=steps, eval_examples=100)
    times, results = {}, {}
    before = config.ABLATION
    try:
        for stack in (True, False):
            config.ABLATION = dataclasses.replace(before, stack_seeds=stack)
            t0 = time.monotonic()
            results[stack] = train_group(works, threads=1)
            times[stack] = time.monotonic() - t0
    finally:
        config.ABLATION = before
    diff = max(abs(a.final_loss - b.final_loss) for a, b in zip(results[True], results[False], strict=True))
    train = {k: sum(r.wall_s for r in v) for k, v in results.items()}
    print(f"[stacked] {len(works)} runs x {steps} steps: stacked {times[True]:.1f} s "
          f"(training {train[True]:.1f}), one by one {times[False]:.1f} s (training {train[False]:.1f}); "
          f"final loss max |diff| {diff:.1e}", flush=True)
    return diff < 1e-2, f"stacked ablation {train[False] / train[True]:.2f}x over one by one (training time)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="fp16 steps per architecture")
    ap.add_argument("--peak-tflops", type=float, default=0.0,
                    help="the card's fp16 dense peak, if not in the table")
    ap.add_argument("--rehearse", action="store_true", help="on CPU at tiny sizes: check the script itself")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.rehearse:
        print("cuda_proof: no CUDA here (run it on a card, or --rehearse on CPU)")
        return 2
    device = "cuda" if cuda and not args.rehearse else "cpu"
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name(0) if device == 'cuda' else 'cpu'}",
          flush=True)
    steps = 20 if args.rehearse else args.steps
    summary, failed = [], []
    parts = [("fp16", lambda: fp16_part(device, steps)), ("memory", lambda: memory_part(args.rehearse)),
             ("idle", lambda: idle_part(args.rehearse)),
             ("mfu", lambda: mfu_part(device, args.rehearse, args.peak_tflops)),
             ("stacked", lambda: stacked_part(device, 10 if args.rehearse else 100))]
    for name, part in parts:
        try:
            ok, line = part()
        except Exception as e:  # one part's fault must not hide the others' figures
            ok, line = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        summary.append(f"{name} {line}")
        if not ok:
            failed.append(name)
            print(f"[{name}] FAILED: {line}", flush=True)
    print(f"cuda_proof{' (rehearsal on cpu)' if args.rehearse else ''}: " + "; ".join(summary)
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
