"""Storage tiers: move a run between the hot disk (LAB_RUNS) and the cold one (LAB_ARCHIVE).

Archiving is copy -> verify the sha256 of every file -> only then delete the hot files, leaving
a small pointer file (config.RECORDS.pointer_file) in the run directory, so `lab runs` still
lists the run and knows where it went. A copy that fails verification deletes nothing in the hot
tier; the bad copy stays in the archive as `<run>.partial` for inspection. Restore is the same
move in the other direction, verified against the manifest written at archive time.

Crash safety: the pointer is written (atomically and durably: fsynced, renamed, directory
fsynced) only after the archived copy is verified and renamed into place, and hot files are
deleted only after the pointer is on disk. A crash at any step is finished by archiving again:
before the cold rename, the `.partial` copy is redone; between the rename and the pointer, the
verified cold copy is matched against the untouched hot files and the pointer written; after the
pointer, the leftovers that match the manifest are deleted.

A pointer that cannot be read (empty, torn, edited by hand) raises ArchiveError naming the file:
listings show that run as tier "unknown" with the error, and nothing archives or deletes it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import config
from common import fsync_dir, sha256_file, utc_now, write_json_atomic

CopyFile = Callable[[Path, Path], Any]


class ArchiveError(RuntimeError):
    """The move could not be completed; the message says what was left where."""


class ArchivedRun(FileNotFoundError):
    """The run's files are in the cold tier, not under LAB_RUNS. A FileNotFoundError, so a
    command that needs the hot files refuses as for a missing run (exit 2), but the message says
    where the files are and how to bring them back instead of "does not exist"."""

    def __init__(self, run: str, archive_path: str):
        self.run, self.archive_path = run, archive_path
        self.restore = restore_command(run)
        super().__init__(f"run {run} is archived: its files are in the cold tier at {archive_path}; "
                         f"`{self.restore}` brings them back to LAB_RUNS")

    def as_dict(self) -> dict[str, Any]:
        return {"run": self.run, "tier": "cold", "archive_path": self.archive_path,
                "restore": self.restore, "error": str(self)}


def restore_command(run: str) -> str:
    return f"lab restore {run}"


def pointer_path(run_dir: Path) -> Path:
    return run_dir / config.RECORDS.pointer_file


def read_pointer(run_dir: Path) -> dict[str, Any] | None:
    """The run's pointer, None when it has none. ArchiveError when it has one that cannot be
    read: the pointer may be the only record of where the run went, so a damaged one is reported
    (with where the copy would be), never taken as "not archived"."""
    p = pointer_path(run_dir)
    if not p.is_file():
        return None
    where = (f"if it was archived, its copy is at {Path(config.paths().archive) / run_dir.name}; "
             "compare by hand, then fix or remove the pointer")
    try:
        data = json.loads(p.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArchiveError(f"run {run_dir.name}: {p} is not valid JSON ({e}); {where}") from None
    if not isinstance(data, dict) or not isinstance(data.get("archive_path"), str):
        raise ArchiveError(f"run {run_dir.name}: {p} names no archive_path; {where}")
    return data


def whereabouts(run_dir: Path) -> dict[str, Any]:
    """Where a run's files are now, for `lab show` and `lab logs`: tier "hot" (in run_dir),
    "cold" (with archive_path and the restore command), "unknown" (an unreadable pointer, with
    the error) or None (no files yet)."""
    try:
        pointer = read_pointer(run_dir) if run_dir.is_dir() else None
    except (ArchiveError, OSError) as e:
        return {"tier": "unknown", "error": str(e)}
    restore = restore_command(run_dir.name)
    if pointer is not None:
        return {"tier": "cold", "archive_path": pointer["archive_path"], "restore": restore}
    if run_dir.is_dir():
        return {"tier": "hot"}
    cold = Path(config.paths().archive) / run_dir.name  # archived, and the hot pointer since removed
    if (cold / config.RECORDS.manifest_file).is_file():
        return {"tier": "cold", "archive_path": str(cold.resolve()), "restore": restore}
    return {"tier": None}


def _remove_torn_pointer_writes(hot: Path) -> None:
    """A kill inside write_json_atomic leaves its temp file (`.<pointer>.tmp-<pid>`) beside the
    pointer: never run data, so it is neither archived nor kept."""
    for p in hot.glob(f".{config.RECORDS.pointer_file}.tmp-*"):
        p.unlink()


def _files(root: Path, skip: frozenset[str] = frozenset()) -> list[Path]:
    """Every file under root, relative, sorted; links and devices are refused, not followed."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            rel = p.relative_to(root)
            if str(rel) in skip:
                continue
            if p.is_symlink() or not p.is_file():
                raise ArchiveError(f"{p}: not a regular file (links and devices are not archived)")
            out.append(rel)
    return out


def manifest_of(root: Path, skip: frozenset[str] = frozenset()) -> dict[str, dict[str, Any]]:
    return {str(rel): {"bytes": (root / rel).stat().st_size, "sha256": sha256_file(root / rel)}
            for rel in _files(root, skip)}


def _verify(root: Path, manifest: dict[str, dict[str, Any]]) -> list[str]:
    """Paths under root whose size or hash differs from the manifest (or that are missing)."""
    bad = []
    for rel, want in manifest.items():
        p = root / rel
        if not p.is_file() or p.stat().st_size != want["bytes"] or sha256_file(p) != want["sha256"]:
            bad.append(rel)
    return bad


def _copy_tree(src: Path, dst: Path, rels: list[str], copy_file: CopyFile) -> None:
    for rel in rels:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        copy_file(src / rel, dst / rel)


def dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def archive_run(name: str, runs: str | Path | None = None, archive: str | Path | None = None,
                copy_file: CopyFile = shutil.copy2, summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """Move runs/<name> to archive/<name>; returns {run, files, bytes, archive_path, manifest_sha256}.

    `summary` (kind, status, best metric) is kept in the pointer so listings need not read the
    cold disk. `copy_file` is the function that copies one file (a test passes one that corrupts a byte to
    prove that a failed verify deletes nothing)."""
    paths = config.paths()
    runs_root = Path(runs if runs is not None else paths.runs)
    cold_root = Path(archive if archive is not None else paths.archive)
    hot = runs_root / name
    if not name or "/" in name or name in (".", ".."):
        raise config.ConfigError(f"run: {name!r} is not a run name")
    if not hot.is_dir():
        raise FileNotFoundError(f"run: {hot} does not exist")
    cold = cold_root / name
    mf_name = config.RECORDS.manifest_file
    _remove_torn_pointer_writes(hot)
    pointer = read_pointer(hot)
    if pointer is not None:
        # Archived before; finish a delete that a crash interrupted, else there is nothing to do.
        leftovers = [str(p) for p in _files(hot, frozenset({config.RECORDS.pointer_file}))]
        _delete_verified_leftovers(hot, Path(pointer["archive_path"]), leftovers)
        return {**pointer, "run": name, "already_archived": True}
    if cold.exists():
        # A crash between the cold rename and the pointer leaves a verified copy and untouched hot
        # files: finish the move when they are the same files, byte for byte; else a person decides.
        resumed = _verified_copy_of(hot, cold)
        if resumed is None:
            raise ArchiveError(f"run {name}: {cold} already exists in the archive and {hot} has no pointer; "
                               "compare them by hand")
        return _point_and_delete(hot, cold, resumed, summary)

    manifest = manifest_of(hot)
    rels = sorted(manifest)
    partial = cold_root / f"{name}.partial"
    if partial.exists():
        shutil.rmtree(partial)  # an earlier failed attempt of ours; never a verified copy
    partial.mkdir(parents=True)
    _copy_tree(hot, partial, rels, copy_file)
    bad = _verify(partial, manifest)
    if bad:
        raise ArchiveError(f"run {name}: {len(bad)} file(s) differ after copy ({', '.join(bad[:3])}); "
                           f"nothing deleted, the bad copy is at {partial}")
    # The source may have changed while we copied (a run still writing): hash it again.
    now = manifest_of(hot)
    changed = sorted(rel for rel in set(now) | set(manifest) if now.get(rel) != manifest.get(rel))
    if changed:
        raise ArchiveError(f"run {name}: files changed while archiving ({', '.join(changed[:3])}); "
                           f"nothing deleted, the copy is at {partial}")
    manifest_text = json.dumps({"run": name, "archived_at": utc_now(), "files": manifest}, indent=1)
    (partial / mf_name).write_text(manifest_text)
    # The verify read the page cache; only what is on the platter survives a power cut.
    _fsync_tree(partial)
    os.replace(partial, cold)
    fsync_dir(cold_root)
    return _point_and_delete(hot, cold, manifest, summary)


def _verified_copy_of(hot: Path, cold: Path) -> dict[str, dict[str, Any]] | None:
    """The manifest of the cold copy when it verifies and the hot files are exactly its files
    (the state a crash before the pointer leaves), else None."""
    mf = cold / config.RECORDS.manifest_file
    try:
        manifest = json.loads(mf.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(manifest, dict) or _verify(cold, manifest) or manifest_of(hot) != manifest:
        return None
    return manifest


def _point_and_delete(hot: Path, cold: Path, manifest: dict[str, dict[str, Any]],
                      summary: dict[str, Any] | None) -> dict[str, Any]:
    """Write the pointer to the verified copy `cold`, then delete the hot files it holds."""
    mf = cold / config.RECORDS.manifest_file
    info = {"run": hot.name, "tier": "cold", "archive_path": str(cold.resolve()), "files": len(manifest),
            "bytes": sum(m["bytes"] for m in manifest.values()), "manifest_sha256": sha256_file(mf),
            "archived_at": utc_now(), "summary": summary or {}}
    # Written atomically and fsynced (file and directory) before the first hot file goes: from
    # then on it is the only record of where the run went, and must survive a power cut.
    write_json_atomic(pointer_path(hot), info, indent=1)
    for rel in sorted(manifest):
        (hot / rel).unlink()
    _remove_empty_dirs(hot)
    return info


def _delete_verified_leftovers(hot: Path, cold: Path, leftovers: list[str]) -> None:
    if not leftovers:
        return
    manifest = json.loads((cold / config.RECORDS.manifest_file).read_text())["files"]
    for rel in leftovers:
        want = manifest.get(rel)
        if want and sha256_file(hot / rel) == want["sha256"]:
            (hot / rel).unlink()
    _remove_empty_dirs(hot)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            with open(Path(dirpath) / name, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


def _remove_empty_dirs(root: Path) -> None:
    for dirpath, _dirnames, _filenames in sorted(os.walk(root), key=lambda t: -len(t[0])):
        if Path(dirpath) != root and not os.listdir(dirpath):
            os.rmdir(dirpath)


def restore_run(name: str, runs: str | Path | None = None, archive: str | Path | None = None,
                copy_file: CopyFile = shutil.copy2) -> dict[str, Any]:
    """Bring archive/<name> back to runs/<name>, verified against its manifest; the archived copy
    and the pointer are removed only after every restored file matches."""
    paths = config.paths()
    hot = Path(runs if runs is not None else paths.runs) / name
    pointer = read_pointer(hot) if hot.is_dir() else None
    if pointer is None:
        raise FileNotFoundError(f"run: {name} is not archived (no {config.RECORDS.pointer_file} in {hot})")
    cold = Path(pointer["archive_path"]) if archive is None else Path(archive) / name
    mf = cold / config.RECORDS.manifest_file
    if not mf.is_file():
        raise ArchiveError(f"run {name}: the archived copy {cold} has no {mf.name}; nothing changed")
    manifest = json.loads(mf.read_text())["files"]
    bad = _verify(cold, manifest)
    if bad:
        raise ArchiveError(f"run {name}: the archived copy is damaged ({', '.join(bad[:3])}); "
                           "nothing changed")
    staging = hot.parent / f".{name}.restoring"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    _copy_tree(cold, staging, sorted(manifest), copy_file)
    bad = _verify(staging, manifest)
    if bad:
        raise ArchiveError(f"run {name}: {len(bad)} file(s) differ after restore ({', '.join(bad[:3])}); "
                           f"nothing deleted, the copy is at {staging}")
    _fsync_tree(staging)
    for rel in sorted(manifest):
        (hot / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, hot / rel)
    _fsync_tree(hot)
    shutil.rmtree(staging)
    pointer_path(hot).unlink()
    shutil.rmtree(cold)
    total = sum(m["bytes"] for m in manifest.values())
    return {"run": name, "tier": "hot", "path": str(hot.resolve()), "files": len(manifest), "bytes": total,
            "restored_at": utc_now()}


def run_age_days(run_dir: Path, now: float | None = None) -> float:
    """Days since the newest file in the run changed (the run's last sign of life)."""
    newest = max((p.stat().st_mtime for p in run_dir.rglob("*") if p.is_file()),
                 default=run_dir.stat().st_mtime)
    return ((now if now is not None else time.time()) - newest) / 86_400.0
