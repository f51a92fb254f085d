"""Storage tiers: archive (copy, verify sha256, delete, pointer) and restore, on a real training
run directory written by the real trainer."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import config
import jobs
import records
from cli import main
from jobs.context import LocalContext
from records import archive


@pytest.fixture
def run(tmp_runs: Path, trained_run: Path) -> str:
    shutil.copytree(trained_run, tmp_runs / "7")
    return "7"


def hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): archive.sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def test_round_trip_keeps_every_byte(tmp_runs: Path, run: str) -> None:
    hot = tmp_runs / run
    before = hashes(hot)
    assert {"ckpt_best.pt", "ckpt_last.pt", "metrics.jsonl", "config.json", "log.txt"} <= set(before)

    info = archive.archive_run(run)
    cold = Path(config.paths().archive) / run
    assert os.listdir(hot) == [config.RECORDS.pointer_file]  # only the pointer stays hot
    assert info["files"] == len(before)
    assert info["bytes"] == sum((cold / rel).stat().st_size for rel in before)
    manifest = json.loads((cold / config.RECORDS.manifest_file).read_text())["files"]
    assert {rel: m["sha256"] for rel, m in manifest.items()} == before
    assert json.loads((hot / config.RECORDS.pointer_file).read_text())["archive_path"] == str(cold.resolve())

    back = archive.restore_run(run)
    assert back["files"] == len(before)
    assert hashes(hot) == before
    assert not (hot / config.RECORDS.pointer_file).exists()
    assert not cold.exists()


def corrupting_copy(victim: str):
    def copy(src: Path, dst: Path) -> None:
        shutil.copy2(src, dst)
        if src.name == victim:
            data = bytearray(dst.read_bytes())
            data[len(data) // 2] ^= 0xFF
            dst.write_bytes(bytes(data))
    return copy


def test_a_failed_verify_deletes_nothing(tmp_runs: Path, run: str) -> None:
    hot = tmp_runs / run
    before = hashes(hot)
    with pytest.raises(archive.ArchiveError, match="differ after copy.*ckpt_best.pt.*nothing deleted"):
        archive.archive_run(run, copy_file=corrupting_copy("ckpt_best.pt"))
    assert hashes(hot) == before
    assert archive.read_pointer(hot) is None
    archive_root = Path(config.paths().archive)
    assert not (archive_root / run).exists()
    assert (archive_root / f"{run}.partial").is_dir()  # kept for inspection
    # A later attempt starts afresh and succeeds.
    assert archive.archive_run(run)["files"] == len(before)


def test_a_run_that_changes_while_copied_is_not_deleted(tmp_runs: Path, run: str) -> None:
    hot = tmp_runs / run

    def copy_then_append(src: Path, dst: Path) -> None:
        shutil.copy2(src, dst)
        if src.name == "metrics.jsonl":  # the run is still writing
            with open(src, "a") as f:
                f.write('{"step": 6}\n')

    with pytest.raises(archive.ArchiveError, match="changed while archiving.*metrics.jsonl"):
        archive.archive_run(run, copy_file=copy_then_append)
    assert (hot / "metrics.jsonl").read_text().endswith('{"step": 6}\n')
    assert archive.read_pointer(hot) is None


def test_a_damaged_archive_is_not_restored(tmp_runs: Path, run: str) -> None:
    archive.archive_run(run)
    cold = Path(config.paths().archive) / run
    with open(cold / "log.txt", "a") as f:
        f.write("bit rot\n")
    with pytest.raises(archive.ArchiveError, match="damaged.*log.txt"):
        archive.restore_run(run)
    assert archive.read_pointer(tmp_runs / run) is not None
    assert (cold / "ckpt_best.pt").exists()


def test_archiving_again_finishes_an_interrupted_delete(tmp_runs: Path, run: str, trained_run: Path) -> None:
    archive.archive_run(run)
    shutil.copy2(trained_run / "log.txt", tmp_runs / run / "log.txt")  # left over by a crash
    again = archive.archive_run(run)
    assert again["already_archived"]
    assert os.listdir(tmp_runs / run) == [config.RECORDS.pointer_file]


def age(path: Path, days: float) -> None:
    t = time.time() - days * 86_400
    for p in [path, *path.rglob("*")]:
        os.utime(p, (t, t))


def test_archive_job_takes_old_finished_runs_only(tmp_runs: Path, run: str, trained_run: Path) -> None:
    from daemon import service

    # Job 1 waits in the queue: its (old) run directory must stay hot.
    job = service.submit("sleep", {"seconds": 0.1}, lane="cpu")
    shutil.copytree(trained_run, tmp_runs / str(job["id"]))
    shutil.copytree(trained_run, tmp_runs / "train-recent")
    shutil.copytree(trained_run.parent / "data", tmp_runs / "data")
    for name in (run, str(job["id"])):
        age(tmp_runs / name, 40)
    age(tmp_runs / "data", 40)  # token datasets are not runs

    spec = jobs.parse_spec("archive", {"older_than_days": 30})
    ctx = LocalContext(tmp_runs / "archive-job", echo=lambda s: None)
    result = jobs.get_kind("archive").run(spec, ctx)
    assert [a["run"] for a in result["archived"]] == [run]
    assert archive.read_pointer(tmp_runs / run) is not None
    for hot in (str(job["id"]), "train-recent", "data", "archive-job"):
        assert archive.read_pointer(tmp_runs / hot) is None
    assert "archived: 1" in (ctx.run_dir / "log.txt").read_text()


def test_archive_spec_is_validated() -> None:
    with pytest.raises(config.ConfigError, match="archive.runs"):
        jobs.parse_spec("archive", {})
    with pytest.raises(config.ConfigError, match="'../etc'"):
        jobs.parse_spec("archive", {"runs": ["../etc"]})
    with pytest.raises(config.ConfigError, match="lane"):
        jobs.check_lane("archive", "gpu")


def test_cli_archive_runs_and_restore(tmp_runs: Path, run: str) -> None:
    cli = CliRunner()
    r = cli.invoke(main, ["archive", run, "--json"])
    assert r.exit_code == 0, r.output
    moved = json.loads(r.output)
    assert moved["archived"][0]["run"] == run and moved["bytes_moved"] > 3_000_000

    listing = json.loads(cli.invoke(main, ["runs", "--json"]).output)
    (row,) = [x for x in listing if x["run"] == run]
    assert (row["tier"], row["kind"], row["status"]) == ("cold", "train", "succeeded")
    assert row["bytes"] == moved["bytes_moved"]
    assert row["best"]["name"] == "val_loss"

    r = cli.invoke(main, ["restore", run, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["tier"] == "hot"
    r = cli.invoke(main, ["restore", run])
    assert r.exit_code == 2 and "is not archived" in r.output
    r = cli.invoke(main, ["archive", "no-such-run"])
    assert r.exit_code == 2 and "no-such-run" in r.output  # bad input, as `lab restore` says it
    assert records.summarize_run(run)["tier"] == "hot"


# --- a damaged pointer, the pointer's durability, and archived runs at the CLI ------------------


def pointer_of(runs: Path, name: str) -> Path:
    return runs / name / config.RECORDS.pointer_file


def test_a_bad_pointer_hides_no_other_run(tmp_runs: Path, run: str, trained_run: Path) -> None:
    archive.archive_run(run)  # "7": cold, with a good pointer
    shutil.copytree(trained_run, tmp_runs / "8")  # hot
    (tmp_runs / "9").mkdir()
    pointer_of(tmp_runs, "9").write_text("")  # empty: a pointer written by hand, or a lost block
    shutil.copytree(trained_run, tmp_runs / "10")  # a pointer torn in half, hot files still there
    good = pointer_of(tmp_runs, run).read_text()
    pointer_of(tmp_runs, "10").write_text(good[: len(good) // 2])

    cli = CliRunner()
    r = cli.invoke(main, ["runs", "--json"])
    assert r.exit_code == 0, r.output
    rows = {x["run"]: x for x in json.loads(r.output)}
    assert set(rows) == {run, "8", "9", "10"}
    assert (rows[run]["tier"], rows["8"]["tier"]) == ("cold", "hot")
    for bad in ("9", "10"):
        assert rows[bad]["tier"] == "unknown"
        assert config.RECORDS.pointer_file in rows[bad]["error"] and "not valid JSON" in rows[bad]["error"]
    text = cli.invoke(main, ["runs"])
    assert text.exit_code == 0 and "unknown" in text.output

    # The archive job takes the old hot run and skips the two it cannot read, saying why.
    for name in ("8", "9", "10"):
        age(tmp_runs / name, 40)
    spec = jobs.parse_spec("archive", {"older_than_days": 30})
    ctx = LocalContext(tmp_runs / "archive-job", echo=lambda s: None)
    result = jobs.get_kind("archive").run(spec, ctx)
    assert [a["run"] for a in result["archived"]] == ["8"]
    skipped = {s["run"]: s["reason"] for s in result["skipped"]}
    assert set(skipped) == {"9", "10"} and all("not valid JSON" in why for why in skipped.values())
    assert (tmp_runs / "10" / "ckpt_best.pt").is_file()  # never deleted on an unreadable pointer
    # Named explicitly, it is refused (exit 1) with the reason, and the others still move.
    r = cli.invoke(main, ["archive", "10", "--json"])
    assert r.exit_code == 1 and "not valid JSON" in json.loads(r.output)["failed"][0]["error"]


def test_the_pointer_is_durable_before_any_hot_file_goes(tmp_runs: Path, run: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The order, from the system calls themselves: the pointer's bytes are fsynced, renamed into
    place and the directory fsynced (a power cut then keeps it) before the first hot unlink."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the file each fsync was for")
    hot = (tmp_runs / run).resolve()
    pointer = pointer_of(tmp_runs, run).resolve()
    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_unlink = os.fsync, os.replace, Path.unlink

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append(("replace", str(Path(dst).resolve())))
        real_replace(src, dst)

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if self.resolve().parent == hot and self.name != config.RECORDS.pointer_file:
            if not any(e[0] == "unlink" for e in events):
                # What a reader finds at the first delete: a whole pointer naming the cold copy.
                assert json.loads(pointer.read_text())["archive_path"] == info_path
            events.append(("unlink", str(self)))
        real_unlink(self, missing_ok=missing_ok)

    info_path = str((Path(config.paths().archive) / run).resolve())
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(Path, "unlink", unlink)
    archive.archive_run(run)
    first_unlink = next(i for i, e in enumerate(events) if e[0] == "unlink")
    assert ("replace", str(pointer)) in events, "the pointer was not renamed into place (not atomic)"
    renamed = events.index(("replace", str(pointer)))
    assert renamed < first_unlink
    tmp_fsynced = [i for i, (what, p) in enumerate(events[:renamed])
                   if what == "fsync" and Path(p).parent == hot and config.RECORDS.pointer_file in p]
    assert tmp_fsynced, "the pointer's bytes were not fsynced before the rename"
    assert ("fsync", str(hot)) in events[renamed:first_unlink], "the rename was not made durable"


CRASH = """
import os, sys
from pathlib import Path
from records import archive

step, when = sys.argv[1], int(sys.argv[2])
seen = {"unlink": 0, "replace": 0}
real_unlink, real_replace = Path.unlink, os.replace

def unlink(self, missing_ok=False):
    if step == "unlink" and self.name != "ARCHIVED.json":
        if seen["unlink"] == when:
            os._exit(137)  # killed here, as by SIGKILL: no cleanup, no flush
        seen["unlink"] += 1
    real_unlink(self, missing_ok=missing_ok)

def replace(src, dst):
    if step == "replace" and seen["replace"] == when:
        os._exit(137)
    seen["replace"] += 1
    real_replace(src, dst)

Path.unlink, os.replace = unlink, replace
archive.archive_run(sys.argv[3])
sys.exit(0)
"""


@pytest.mark.parametrize(("step", "when"), [("replace", 0), ("replace", 1), ("unlink", 0), ("unlink", 3)],
                         ids=["before-cold-rename", "before-pointer-rename", "before-first-delete",
                              "mid-delete"])
def test_a_kill_at_any_step_loses_nothing_and_the_next_archive_finishes(
        tmp_runs: Path, run: str, step: str, when: int) -> None:
    """A real process killed between the steps of an archive: afterwards every byte is either
    still hot or in a verified cold copy that a whole pointer names, and archiving again completes."""
    import subprocess
    import sys

    hot = tmp_runs / run
    before = hashes(hot)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", CRASH, step, str(when), run], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 137, proc.stderr
    pointer = archive.read_pointer(hot)
    torn = f".{config.RECORDS.pointer_file}.tmp-"  # a pointer write the kill cut short
    left = {rel: h for rel, h in hashes(hot).items() if not rel.startswith(torn)}
    if pointer is None:
        assert left == before  # the pointer was not there yet, so nothing was deleted
    else:
        cold = Path(pointer["archive_path"])
        assert cold == (Path(config.paths().archive) / run).resolve()
        assert (hashes(cold) | left).items() >= before.items()  # every file hot or in the cold copy

    archive.archive_run(run)
    assert os.listdir(hot) == [config.RECORDS.pointer_file]
    archive.restore_run(run)
    assert hashes(hot) == before


def finished_job(tmp_runs: Path, trained_run: Path) -> str:
    """A queue job that ran here and succeeded, its run directory a real training run."""
    from daemon import service

    job = service.submit("sleep", {"seconds": 0.1}, lane="cpu")
    store = service.open_store()
    try:
        claimed = store.claim_next("cpu", "test", config.paths().host, tmp_runs, 60.0)
        assert claimed is not None and claimed["id"] == job["id"]
        shutil.copytree(trained_run, tmp_runs / str(job["id"]))
        assert store.finish(job["id"], 1, "succeeded", exit_code=0)
    finally:
        store.dispose()
    return str(job["id"])


def test_an_archived_job_says_where_it_is_and_how_to_restore_it(tmp_runs: Path, trained_run: Path) -> None:
    job = finished_job(tmp_runs, trained_run)
    log = (tmp_runs / job / "log.txt").read_text()
    archive.archive_run(job)
    cold = str((Path(config.paths().archive) / job).resolve())
    restore = f"lab restore {job}"
    cli = CliRunner()

    # logs: the log is read from the cold copy, with a note saying where and how to bring it back.
    r = cli.invoke(main, ["logs", job])
    assert r.exit_code == 0, r.output
    assert r.stdout == log
    assert "cold" in r.stderr and cold in r.stderr and restore in r.stderr
    assert "no log yet" not in r.output
    r = cli.invoke(main, ["logs", job, "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert (out["tier"], out["restore"], out["log"]) == ("cold", restore, log)
    assert out["path"] == str(Path(cold) / "log.txt") and out["archive_path"] == cold

    # show: run_files names the tier and where the files are now.
    r = cli.invoke(main, ["show", job, "--json"])
    assert r.exit_code == 0, r.output
    rf = json.loads(r.stdout)["run_files"]
    assert (rf["tier"], rf["path"], rf["restore"]) == ("cold", cold, restore)
    assert rf["hot_path"] == str(tmp_runs / job)
    r = cli.invoke(main, ["show", job])
    assert r.exit_code == 0 and cold in r.output and restore in r.output

    # eval: refused as bad input (exit 2), naming the cold tier and the restore command.
    r = cli.invoke(main, ["eval", job])
    assert r.exit_code == 2
    assert "cold" in r.stderr and cold in r.stderr and restore in r.stderr
    assert "does not exist" not in r.stderr
    r = cli.invoke(main, ["eval", job, "--json"])
    assert r.exit_code == 2
    out = json.loads(r.stdout)
    assert (out["tier"], out["restore"], out["archive_path"]) == ("cold", restore, cold)
    assert not [p for p in tmp_runs.iterdir() if p.name.startswith("eval-")]  # no run dir made for it

    # Restored, each is as before: the hot log and path, and eval runs.
    archive.restore_run(job)
    r = cli.invoke(main, ["show", job, "--json"])
    rf = json.loads(r.stdout)["run_files"]
    assert (rf["tier"], rf["path"]) == ("hot", str(tmp_runs / job))
    r = cli.invoke(main, ["logs", job])
    assert r.exit_code == 0 and r.stdout == log and r.stderr == ""


def test_the_queue_files_are_ignored_and_not_tracked() -> None:
    """huey's queue beside the database and its SQLite journals are machine state, never source:
    `*.huey` alone let queue.db.huey-wal and -shm be committed once."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    names = ["queue.db", "queue.db-wal", "queue.db.huey", "queue.db.huey-wal", "queue.db.huey-shm",
             "queue.db.huey-journal", "other.db.huey-wal"]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *names], cwd=root, capture_output=True,
                             text=True).stdout.split()
    assert sorted(ignored) == sorted(names)
    tracked = subprocess.run(["git", "ls-files", "-ci", "--exclude-standard"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.split()
    assert tracked == [], f"tracked files the ignore rules exclude (git rm --cached them): {tracked}"
