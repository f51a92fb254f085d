"""Minutes for an ablation, by default harness/specs/khop_default.toml (refiner-k4 vs flat-2
vs flat-1 on khop, 3 seeds). Target: <= 10 minutes on 2 CPU cores. The ablation runs three
times on this machine's lane:
- pool: the process pool (`parallel_seeds` processes of one torch thread, each (arm, seed) a
  Work of its own), the CPU lane's path;
- stacked: every Work in one process, each arm's seeds stacked under vmap (harness/batched.py),
  the GPU lane's path;
- grouped: every Work in one process, one step of each in turn (ABLATION.stack_seeds off).
The per-seed results of each are compared with the pool's. Prints each run's arms and verdict,
the CPU time of training (a figure that other load on the cores does not inflate), and on its
last line the minutes of each and the speed-up of the stacked path over the pool. `--spec
FILE` times another spec (e.g. harness/specs/chase_depth.toml); `--only pool|stacked|grouped`
runs one path; extra arguments are `key=value` overrides of the spec (seeds=5).

    .venv/bin/python bench/ablation_time.py
    .venv/bin/python bench/ablation_time.py --spec harness/specs/chase_depth.toml
    .venv/bin/python bench/ablation_time.py steps=60 --only stacked
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dataclasses  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import config  # noqa: E402
from harness.ablate import AblationSpec, load_spec_file, new_run_dir, parse_spec, run_ablation  # noqa: E402
from jobs.context import LocalContext  # noqa: E402

PATHS = ("pool", "stacked", "grouped")


def timed(spec: AblationSpec, path: str) -> tuple[float, dict[str, Any]]:
    """(minutes, summary) of the ablation on the CPU lane, by the process pool, stacked or grouped."""
    before = config.ABLATION
    config.ABLATION = dataclasses.replace(before, batched_cpu=path != "pool",  # what _run_all reads
                                          stack_seeds=path == "stacked")
    try:
        started = time.monotonic()
        summary = run_ablation(spec, LocalContext(new_run_dir(f"ablation-time-{path}")))
        return (time.monotonic() - started) / 60, summary
    finally:
        config.ABLATION = before


def show(path: str, minutes: float, summary: dict[str, Any]) -> None:
    cell = summary["primary_cell"]
    for a in summary["arms"]:
        grid = a["grid"][cell["split"]]
        depths = " ".join(f"d{d}={v[cell['bucket']] or 0:.3f}" for d, v in grid.items())
        print(f"[{path}] {a['name']}: {a['mean']:.3f} [{a['ci_low']}, {a['ci_high']}] {a['verdict']}; "
              f"{depths}")
    cpu = sum(sum(a["cpu_s"]) for a in summary["arms"])
    print(f"[{path}] verdict: {summary['verdict_line']}; training CPU time {cpu / 60:.1f} min")
    print(f"[{path}] ablation_minutes: {minutes:.2f} (target <= 10 on 2 cores; "
          f"CPU-bound floor {cpu / 120:.2f})")


def compare(a: dict[str, Any], b: dict[str, Any], name: str) -> str:
    """How far apart two runs' per-seed results are: final losses, primary values."""
    loss = max(abs(x - y) for p, q in zip(a["arms"], b["arms"], strict=True)
               for x, y in zip(p["final_loss"], q["final_loss"], strict=True))
    primary = max(abs(x - y) for p, q in zip(a["arms"], b["arms"], strict=True)
                  for x, y in zip(p["per_seed"], q["per_seed"], strict=True))
    return (f"per-seed results, pool vs {name}: final loss max |diff| {loss:.2e}, "
            f"primary cell max |diff| {primary:.3f}")


def main() -> int:
    args = sys.argv[1:]
    path = ROOT / "harness" / "specs" / "khop_default.toml"
    if args[:1] == ["--spec"] and len(args) > 1:
        path, args = Path(args[1]), args[2:]
    paths = PATHS
    if "--only" in args:
        i = args.index("--only")
        paths, args = (args[i + 1],), args[:i] + args[i + 2:]
        if paths[0] not in PATHS:
            raise SystemExit(f"--only: {paths[0]!r} is not one of {', '.join(PATHS)}")
    spec = load_spec_file(path)
    overrides = config.parse_assignments(args)
    if overrides:
        spec = parse_spec({**spec.to_dict(), **overrides})
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} before the runs")
    runs = {}
    for p in paths:
        runs[p] = timed(spec, p)
        show(p, *runs[p])
    if len(runs) == 1:
        (p, (minutes, _)), = runs.items()
        print(f"ablation: {minutes:.2f} min ({p})")
        return 0
    if "pool" not in runs:
        print("ablation: " + ", ".join(f"{p} {m:.2f} min" for p, (m, _) in runs.items()))
        return 0
    for p in runs:
        if p != "pool":
            print(compare(runs["pool"][1], runs[p][1], p))
    pool = runs["pool"][0]
    others = [f"{p} {m:.2f} min ({pool / m:.2f}x)" for p, (m, _) in runs.items() if p != "pool"]
    print(f"ablation: per-process {pool:.2f} min; " + ", ".join(others) + " (speed-up over the pool)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
