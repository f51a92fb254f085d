"""The disk guard: below QUEUE.disk_min_free_gb free under the runs directory no new job starts
(daemon.scheduler pauses both lanes); `lab status` and `lab next` show the same figure. A module
of its own so that asking for it does not import huey (~0.3 s of every `lab status`)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import config


def disk_status(runs: Path, q: config.QueueConfig) -> dict[str, Any]:
    runs.mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(runs).free / 1e9
    ok = free_gb >= q.disk_min_free_gb
    reason = None if ok else (
        f"disk guard: {free_gb:.2f} GB free under {runs} < {q.disk_min_free_gb:g} GB "
        "(QUEUE.disk_min_free_gb, LAB_QUEUE_DISK_MIN_FREE_GB); no new job starts on the GPU or the CPU lane")
    return {"path": str(runs), "free_gb": round(free_gb, 2), "min_free_gb": q.disk_min_free_gb,
            "ok": ok, "reason": reason}
