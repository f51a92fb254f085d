"""Minutes for the default ablation (harness/specs/khop_default.toml: refiner-k4 vs flat-1 on
khop, 3 seeds). Target: <= 10 minutes on 2 CPU cores. Prints the minutes on its last line,
with the CPU time of the training processes (a figure that other load on the cores does not
inflate). Extra arguments are `key=value` overrides of the spec (e.g. seeds=5).

    .venv/bin/python bench/ablation_time.py
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
    spec = load_spec_file(ROOT / "harness" / "specs" / "khop_default.toml")
    overrides = config.parse_assignments(sys.argv[1:])
    if overrides:
        spec = parse_spec({**spec.to_dict(), **overrides})
    started = time.monotonic()
    summary = run_ablation(spec, LocalContext(new_run_dir("ablation-time")))
    minutes = (time.monotonic() - started) / 60
    for a in summary["arms"]:
        depths = " ".join(f"d{d}={v[summary['primary']]['mean']:.3f}" for d, v in a["by_depth"].items())
        print(f"{a['name']}: {a['mean']:.3f} [{a['ci_low']}, {a['ci_high']}] {a['verdict']}; {depths}")
    cpu = sum(sum(a["cpu_s"]) for a in summary["arms"])
    print(f"verdict: {summary['verdict']}; training CPU time {cpu / 60:.1f} min")
    print(f"ablation_minutes: {minutes:.2f} (target <= 10 on 2 cores; CPU-bound floor {cpu / 120:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
