"""sleep: a diagnostic job that waits, reports progress, and can fail on purpose.

It exercises the queue without a model: `seconds` of sleep in ten progress steps. `fail` raises
an error at the end; `exit_code` leaves the process with that code without a result; `signal`
kills the process with that signal (e.g. "SIGKILL"); `child` starts a child process that sleeps
as long (to test that cancel and timeout kill the whole process group). The job writes
`times.json` (wall-clock start/end) and `pids.json` into its run dir so tests can check overlap.
"""

from __future__ import annotations

import json
import os
import signal as signal_mod
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from config import ConfigError, Validated, setting, show

LANES = ("cpu", "gpu")


@dataclass(frozen=True)
class Spec(Validated):
    seconds: float = setting(1.0, 0.0, 86_400.0, "how long to sleep")
    fail: bool = False
    exit_code: int = setting(0, 0, 255, "leave the process with this code (no result)")
    signal: str | None = None  # e.g. "SIGKILL": the job kills itself with it
    child: bool = False

    def _check_relations(self) -> None:
        # Signals' members only: the signal module also holds SIG_DFL, SIG_IGN (handlers) and
        # SIG_BLOCK (a mask operation), which start with SIG but are no signal to send.
        if self.signal and self.signal not in signal_mod.Signals.__members__:
            raise ConfigError(f"sleep.signal: {show(self.signal)} is not a signal name (e.g. SIGKILL)")


def run(spec: Spec, ctx: Any) -> dict[str, Any]:
    start = time.time()
    pids = {"job": os.getpid()}
    child = None
    if spec.child:
        child = subprocess.Popen(["sleep", str(max(spec.seconds, 0.1))])
        pids["child"] = child.pid
    (ctx.run_dir / "pids.json").write_text(json.dumps(pids))
    steps = 10
    for step in range(1, steps + 1):
        time.sleep(spec.seconds / steps)
        ctx.progress(step, steps, slept=round(spec.seconds * step / steps, 3))
    if child is not None:
        child.wait()
    end = time.time()
    (ctx.run_dir / "times.json").write_text(json.dumps({"start": start, "end": end}))
    if spec.signal:
        os.kill(os.getpid(), getattr(signal_mod, spec.signal))
        time.sleep(5)  # a catchable signal that was ignored: fall through to the result
    if spec.exit_code:
        os._exit(spec.exit_code)
    if spec.fail:
        raise RuntimeError(f"failed on purpose after {spec.seconds:g} s")
    ctx.log(f"slept {spec.seconds:g} s")
    return {"slept": spec.seconds, "start": start, "end": end}
