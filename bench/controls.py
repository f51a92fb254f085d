"""Both controls of the ablation harness, as an agent would run them: the negative control (an
arm against itself, other init seeds) must say `inconclusive`, the positive control (4-layer
flat vs 1-layer flat on khop) must say `better`. Prints both verdicts and the minutes taken on
its last line; exit 1 if a control fails. Other processes on the cores inflate the minutes.

    .venv/bin/python bench/controls.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.ablate import CONTROL_EXPECTED, control_spec, new_run_dir, run_ablation  # noqa: E402
from jobs.context import LocalContext  # noqa: E402


def main() -> int:
    started = time.monotonic()
    verdicts, cpu = {}, 0.0
    for name in ("negative", "positive"):
        summary = run_ablation(control_spec(name), LocalContext(new_run_dir(f"control-{name}")))
        verdicts[name] = summary["verdict"]
        cpu += sum(sum(a["cpu_s"]) for a in summary["arms"])
        print(f"{name}: {summary['verdict']} (expected {CONTROL_EXPECTED[name]}), run {summary['run_dir']}")
    minutes = (time.monotonic() - started) / 60
    ok = all(verdicts[n] == CONTROL_EXPECTED[n] for n in verdicts)
    print(f"training CPU time {cpu / 60:.1f} min (over 2 cores: >= {cpu / 120:.1f} min of wall clock)")
    print(f"controls: negative={verdicts['negative']} positive={verdicts['positive']} "
          f"{'ok' if ok else 'FAILED'} minutes={minutes:.1f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
