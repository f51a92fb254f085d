"""Card idle between jobs: back-to-back training jobs on the GPU lane of a real `lab daemon`.

Idle = the start of the next job's first optimizer step minus the end of the previous job's last
one, as the jobs record them (workers.run.WorkerContext: `progress.first_step_at`, when the
first step ended, less that step's own time from metrics.jsonl; the `step_at` of the last
progress write, which is always the last step's end). So it counts everything
the card does not train in: the previous job's final eval and whatever else it does before it
gives the card back, the daemon noticing, the claim, the hand-over to a standby process, the GPU
lock, the next job's imports, model build, data and its baseline eval. Each gap is split into
those phases, so a slow one says where: `tail` (last step -> the card given back: progress's
`card_released_at`, or `finished_at` for a job that holds the card to its end), `daemon` (->
the next job's claimed_at), `handover` (-> its started_at: the standby, the GPU lock) and
`to_first_step`. The jobs' own evals (metrics.jsonl's eval_s) are shown apart: card work, but
not optimizer steps. So is `off_card`, what the previous job still did after it gave the card
back (curves.png, its result, its exit: -> finished_at), which the card no longer waits for and
which is not in idle.

    python bench/card_idle.py [--jobs 6] [--steps 40] [--preset tiny] [--cuda-preinit]

`--cuda-preinit` (a card only) runs the jobs twice, with the standbys' CUDA context made ahead of
time (QUEUE.standby_cuda_init) and without, and reports both; without a card it says "no CUDA
here" and exits 2. Last line: `card_idle_median_s: 0.25 (less the jobs' evals: 0.08)` (target
<= 0.1 s on CPU; the first figure is the gap as defined above, the second the same gap without
the two evals, whose cost is the model's and the preset's, not the queue's), or with
`--cuda-preinit` both figures for both runs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from store import FINAL, Store  # noqa: E402

FAST = {"LAB_QUEUE_POLL_SECONDS": "0.5", "LAB_QUEUE_DISK_MIN_FREE_GB": "0"}
PHASES = ("tail", "daemon", "handover", "to_first_step")


def has_cuda() -> bool:
    # In a child: the bench's own process must not make a CUDA context beside the jobs'.
    code = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def wait_all(store: Store, ids: list[int], timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = [store.get(i) for i in ids]
        if all(r is not None and r["status"] in FINAL for r in rows):
            bad = [r for r in rows if r["status"] != "succeeded"]  # type: ignore[index]
            if bad:
                raise SystemExit(f"job {bad[0]['id']} {bad[0]['status']}: {bad[0]['error']}")
            return rows  # type: ignore[return-value]
        time.sleep(0.2)
    raise SystemExit("jobs did not finish in time")


def metrics(row: dict[str, Any]) -> list[dict[str, Any]]:
    path = Path(row["run_dir"]) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def gaps(rows: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Per consecutive pair: idle (the end of the last step -> the start of the first: the first
    step's own time, metrics.jsonl's train_s at step 1, is taken off its recorded end) and its
    phases; `evals` is the part that is the jobs' own evaluation (the next one's baseline, the
    previous one's final eval), work on the card that is not an optimizer step."""
    rows = sorted(rows, key=lambda r: r["started_at"])
    out = []
    for prev, nxt in zip(rows, rows[1:], strict=False):
        mine = metrics(nxt)
        first_step = next(m["train_s"] for m in mine if m.get("event") == "train" and m["step"] == 1)
        last, first = prev["progress"]["step_at"], nxt["progress"]["first_step_at"] - first_step
        released = prev["progress"].get("card_released_at") or prev["finished_at"]
        evals = (sum(m["eval_s"] for m in mine if m.get("event") == "eval" and m["step"] == 0)
                 + sum(m["eval_s"] for m in metrics(prev) if m.get("event") == "eval" and m["step"] > 0))
        out.append({"idle": first - last, "tail": released - last,
                    "daemon": nxt["claimed_at"] - released, "off_card": prev["finished_at"] - released,
                    "handover": nxt["started_at"] - nxt["claimed_at"],
                    "to_first_step": first - nxt["started_at"], "evals": evals})
    return out


def run_arm(name: str, n: int, steps: int, preset: str, extra_env: dict[str, str]) -> tuple[float, float]:
    """(median idle, median idle less the jobs' evals) of n back-to-back smokes."""
    tmp = Path(tempfile.mkdtemp(prefix=f"lab-bench-idle-{name}-"))
    env = dict(os.environ, **FAST, **extra_env, LAB_RUNS=str(tmp / "runs"), LAB_HOST="bench",
               LAB_GPU_LOCK_DIR=str(tmp / "gpu-lock"), LAB_DB=str(tmp / "queue.db"))
    env.pop("LAB_BROKER", None)
    (tmp / "runs").mkdir()
    store = Store(env["LAB_DB"])
    ids = [store.submit("smoke", "gpu", {"preset": preset, "steps": steps}, timeout_s=600, max_attempts=1)
           for _ in range(n)]
    with open(tmp / "runs" / "daemon.log", "ab") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "cli", "daemon", "--lanes", "gpu"], cwd=ROOT,
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        rows = wait_all(store, ids, timeout=120 + 30 * n)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
    found = gaps(rows)
    for i, g in enumerate(found):
        print(f"{name} gap {i + 1}: idle {g['idle']:.3f} s = " +
              " + ".join(f"{p} {g[p]:.3f}" for p in PHASES) +
              f" (of which the jobs' evals {g['evals']:.3f}; off the card after it {g['off_card']:.3f})",
              flush=True)
    med = statistics.median(g["idle"] for g in found)
    less_evals = statistics.median(g["idle"] - g["evals"] for g in found)
    phases = ", ".join(f"{p} {statistics.median(g[p] for g in found):.3f}"
                       for p in (*PHASES, "evals", "off_card"))
    print(f"{name}: {len(found)} gaps, median idle {med:.3f} s ({phases}); less the jobs' evals "
          f"{less_evals:.3f} s; device {rows[0]['result']['device']}; runs in {tmp}", flush=True)
    return med, less_evals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=6)
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per smoke job (smoke's default)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--cuda-preinit", action="store_true",
                    help="a card only: also run with the standbys' CUDA context made ahead of time")
    args = ap.parse_args()
    if args.cuda_preinit and not has_cuda():
        print("card_idle: no CUDA here; --cuda-preinit needs a card (run without it on CPU)")
        sys.exit(2)
    base, base_less = run_arm("default", args.jobs, args.steps, args.preset,
                              {"LAB_QUEUE_STANDBY_CUDA_INIT": "false"})
    if not args.cuda_preinit:
        print(f"card_idle_median_s: {base:.3f} (less the jobs' evals: {base_less:.3f})")
        return
    pre, pre_less = run_arm("cuda-preinit", args.jobs, args.steps, args.preset,
                            {"LAB_QUEUE_STANDBY_CUDA_INIT": "true"})
    print(f"card_idle_median_s: {base:.3f} (less the jobs' evals: {base_less:.3f}; cuda pre-init: "
          f"{pre:.3f}, less evals {pre_less:.3f})")


if __name__ == "__main__":
    main()
