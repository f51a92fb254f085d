"""Minutes for an ablation, by default harness/specs/khop_default.toml (refiner-k4 vs flat-2
vs flat-1 on khop, 3 seeds). Target: <= 10 minutes on 2 CPU cores. Prints the minutes on its
last line, with the CPU time of the training processes (a figure that other load on the cores
does not inflate). `--spec FILE` times another spec (e.g. harness/specs/chase_depth.toml);
extra arguments are `key=value` overrides of the spec (e.g. seeds=5).

    .venv/bin/python bench/ablation_time.py
    .venv/bin/python bench/ablation_time.py --spec harness/specs/chase_depth.toml
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import config  # noqa: E402
from harness.ablate import load_spec_file, new_run_dir, parse_spec, run_ablation  # noqa: E402
from jobs.context import LocalContext  # noqa: E402


def main() -> int:
    args = sys.argv[1:]
    path = ROOT / "harness" / "specs" / "khop_default.toml"
    if args[:1] == ["--spec"] and len(args) > 1:
        path, args = Path(args[1]), args[2:]
    spec = load_spec_file(path)
    overrides = config.parse_assignments(args)
    if overrides:
        spec = parse_spec({**spec.to_dict(), **overrides})
    started = time.monotonic()
    summary = run_ablation(spec, LocalContext(new_run_dir("ablation-time")))
    minutes = (time.monotonic() - started) / 60
    cell = summary["primary_cell"]
    for a in summary["arms"]:
        grid = a["grid"][cell["split"]]
        depths = " ".join(f"d{d}={v[cell['bucket']] or 0:.3f}" for d, v in grid.items())
        print(f"{a['name']}: {a['mean']:.3f} [{a['ci_low']}, {a['ci_high']}] {a['verdict']}; {depths}")
    cpu = sum(sum(a["cpu_s"]) for a in summary["arms"])
    print(f"verdict: {summary['verdict_line']}; training CPU time {cpu / 60:.1f} min")
    print(f"ablation_minutes: {minutes:.2f} (target <= 10 on 2 cores; CPU-bound floor {cpu / 120:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
