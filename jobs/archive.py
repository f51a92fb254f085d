"""archive: move finished runs from the hot disk (LAB_RUNS) to the archive (LAB_ARCHIVE).

Each run is copied, every file's sha256 verified, and only then is the hot copy deleted, leaving
a pointer file; `lab restore RUN` brings it back. Name runs, or give `older_than_days` to take
every finished run whose newest file is older than that (both may be given). A run the queue
says is still queued, blocked or running is never archived.

    lab submit archive --set 'runs=["abc123"]'
    lab submit archive --set older_than_days=30
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from config import ConfigError, Validated, setting

LANES = ("cpu",)


@dataclass(frozen=True)
class Spec(Validated):
    runs: tuple[str, ...] = ()
    older_than_days: float | None = setting(None, 0.0, 36_500.0, "archive finished runs older than this")

    def _check_relations(self) -> None:
        if not self.runs and self.older_than_days is None:
            raise ConfigError("archive.runs: name runs to archive, or set older_than_days")
        for name in self.runs:
            if not name or "/" in name or name.startswith("."):
                raise ConfigError(f"archive.runs: {name!r} is not a run name")


def run(spec: Spec, ctx: Any) -> dict[str, Any]:
    import records

    older = spec.older_than_days
    # Never archive the directory this job is writing its own log into.
    result = records.archive_runs(list(spec.runs), older, exclude=frozenset({ctx.run_dir.name}))
    total = len(result["archived"]) + len(result["failed"])
    for i, info in enumerate(result["archived"], 1):
        ctx.log(f"archived {info['run']}: {info.get('files')} files, {info.get('bytes')} bytes "
                f"-> {info.get('archive_path')}")
        ctx.progress(i, total)
    for bad in result["failed"]:
        ctx.log(f"not archived {bad['run']}: {bad['error']}")
    ctx.log("---")
    ctx.log(f"archived: {len(result['archived'])}")
    ctx.log(f"failed: {len(result['failed'])}")
    ctx.log(f"bytes_moved: {result['bytes_moved']}")
    if result["failed"]:
        raise RuntimeError(f"{len(result['failed'])} run(s) not archived: "
                           + "; ".join(f"{b['run']}: {b['error']}" for b in result["failed"][:3]))
    return result
