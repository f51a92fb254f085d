"""A JobContext for running a job in the foreground (the CLI, tests): progress goes to a
callback (stderr by default) and log lines to run_dir/log.txt as well."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path


class LocalContext:
    def __init__(self, run_dir: str | Path, lane: str = "cpu", device: str = "cpu",
                 echo: Callable[[str], None] | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.lane, self.device = lane, device
        self.echo = echo if echo is not None else (lambda s: print(s, file=sys.stderr, flush=True))
        self.started = time.monotonic()

    def progress(self, step: int, total: int, **metrics: float) -> None:
        elapsed = time.monotonic() - self.started
        eta = elapsed / step * (total - step) if step else float("nan")
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        self.echo(f"[{step}/{total}] {shown} eta={eta:.0f}s")

    def log(self, message: str) -> None:
        with open(self.run_dir / "log.txt", "a") as f:
            f.write(message.rstrip("\n") + "\n")
        self.echo(message)
