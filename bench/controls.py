"""The harness's calibration, as an agent would run it. The negative control (an arm against
itself; only the init seeds differ, by the arms' names) is run at `--offsets` disjoint seed
sets: every verdict other than `inconclusive` is a false positive, and their share is the
observed false-positive rate of the verdict rule at this budget (expected well under 0.1; the
rule's nominal rate is below 0.05, the minimum effect lowers it further). The positive control
(4-layer vs 1-layer flat on khop's 3-hop split) must say `better`. Prints both on its last
line, the rate with its exact binomial interval (10 repetitions cannot tell 0.05 from 0.1:
extend with --first); exit 1 if the positive control fails or the observed rate exceeds 0.1.
Other processes on the cores inflate the minutes, not the verdicts (they are deterministic).

    .venv/bin/python bench/controls.py [--offsets 10] [--first 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.ablate import control_spec, new_run_dir, run_ablation  # noqa: E402
from jobs.context import LocalContext  # noqa: E402

MAX_FALSE_POSITIVE_RATE = 0.1


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact binomial interval of a rate k/n: what n repetitions can and cannot rule out."""
    from scipy.stats import beta

    a = (1 - confidence) / 2
    return (0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1)),
            1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k)))


def quiet(run_dir: Path) -> LocalContext:
    return LocalContext(run_dir, echo=lambda s: None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--offsets", type=int, default=10, help="negative-control repetitions (>= 8)")
    parser.add_argument("--first", type=int, default=0, help="the first repetition (extends an earlier run)")
    args = parser.parse_args()
    if args.offsets < 8:
        parser.error("--offsets: at least 8 repetitions, or the rate says little")
    started = time.monotonic()
    negative = control_spec("negative")
    false_positives = []
    for i in range(args.first, args.first + args.offsets):
        spec = dataclasses.replace(negative, seed_offset=i * negative.seeds)  # disjoint seed sets
        summary = run_ablation(spec, quiet(new_run_dir(f"control-negative-{i}")))
        line = summary["verdict_line"]
        print(f"negative, seeds {spec.seed_list}: {line}", flush=True)
        if summary["verdict"] != "inconclusive":
            false_positives.append(i)
    positive = run_ablation(control_spec("positive"), quiet(new_run_dir("control-positive")))
    print(f"positive: {positive['verdict_line']}")
    k, n = len(false_positives), args.offsets
    rate = k / n
    low, high = clopper_pearson(k, n)
    ok = positive["verdict"] == "better" and rate <= MAX_FALSE_POSITIVE_RATE
    minutes = (time.monotonic() - started) / 60
    print(f"controls: false_positive_rate={rate:.2f} [{low:.2f}, {high:.2f}] ({k}/{n} A/A runs, 95% "
          f"Clopper-Pearson) positive={positive['verdict']} {'ok' if ok else 'FAILED'} minutes={minutes:.1f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
