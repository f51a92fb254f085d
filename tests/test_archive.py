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
    assert r.exit_code == 1 and "no run directory" in r.output
    assert records.summarize_run(run)["tier"] == "hot"
