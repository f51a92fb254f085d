"""The queue commands of `lab` (click's CliRunner on a real SQLite file; no daemon needed):
validation with exit 2 and nothing queued, the JSON shapes, cancel/retry/wait exit codes, the
rtx2060 gate."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers_daemon import queue_env, set_env

import jobs
from cli import main
from daemon import service
from store import Store


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    set_env(monkeypatch, queue_env(tmp_path))
    return Store(str(tmp_path / "queue.db"))


def lab(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.stdout, r.stderr


def finish(store: Store, job_id: int, status: str, result: dict | None = None) -> None:
    """Run a job's bookkeeping to an end, as a worker would (claim, then finish)."""
    job = store.get(job_id)
    claimed = store.claim_next(job["lane"], "test", "testhost", os.environ["LAB_RUNS"], 30)
    assert claimed["id"] == job_id
    store.finish(job_id, claimed["attempts"], status, exit_code=0 if status == "succeeded" else 1,
                 result=result, error=None if status == "succeeded" else "boom")


def test_submit_json_show_and_status_without_daemon(store: Store) -> None:
    code, out, err = lab("submit", "sleep", "--lane", "gpu", "--set", "seconds=0.5", "--priority", "3",
                         "--issue", "12", "--json")
    assert code == 0, err
    job = json.loads(out)
    assert job["status"] == "queued" and job["lane"] == "gpu" and job["spec"]["seconds"] == 0.5
    code, out, _ = lab("show", str(job["id"]), "--json")
    shown = json.loads(out)
    for key in ("id", "kind", "lane", "status", "spec", "created_at", "started_at", "finished_at", "attempts",
                "exit_code", "error", "result", "run_dir", "host", "issue", "priority"):
        assert key in shown
    assert shown["issue"] == 12 and shown["priority"] == 3
    code, out, _ = lab("status", "--json")
    status = json.loads(out)
    assert code == 0 and status["daemon"]["alive"] is False
    assert status["lanes"]["gpu"]["queued"] == 1 and status["lanes"]["cpu"]["queued"] == 0
    assert [j["id"] for j in status["jobs"]] == [job["id"]]
    assert set(status["disk"]) >= {"free_gb", "min_free_gb", "ok"}
    code, out, _ = lab("status")
    assert code == 0 and "daemon: not running" in out


def _wrong_lane_case() -> list[str] | None:
    for name in jobs.kind_names():
        try:
            lanes = jobs.get_kind(name).lanes
        except Exception:
            continue
        missing = [lane for lane in jobs.LANES if lane not in lanes]
        if missing:
            return [name, "--lane", missing[0]]
    return None


@pytest.mark.parametrize("args, needle", [
    (["nosuchkind"], "unknown job kind 'nosuchkind'"),
    (["sleep", "--set", "sceonds=1"], "sleep.sceonds: unknown key"),
    (["sleep", "--set", "seconds=soon"], "seconds: expected float"),
    (["sleep", "--set", "seconds=-1"], "out of range"),
    (["sleep", "--set", "novalue"], "is not key=value"),
    (["sleep", "--lane", "tpu"], "tpu"),
    (["sleep", "--after", "999"], "--after: job 999 does not exist"),
    (["sleep", "--after", "x1"], "--after: expected a job id"),
    (["sleep", "--force"], "--force: needs --reason"),
    (["sleep", "--timeout", "0"], "--timeout"),
    ("wrong-lane", "cannot run in lane"),
])
def test_bad_submissions_exit_2_and_queue_nothing(store: Store, args, needle) -> None:
    if args == "wrong-lane":
        args = _wrong_lane_case()
        if args is None:
            pytest.skip("no job kind restricted to one lane exists yet")
    code, out, err = lab("submit", *args)
    assert code == 2, (out, err)
    assert needle in err and err.startswith("Error") and err.count("\n") == 1
    assert store.list_jobs() == []


def test_cancel_retry_and_wait_exit_codes(store: Store) -> None:
    job_id = json.loads(lab("submit", "sleep", "--json")[1])["id"]
    code, _, err = lab("wait", str(job_id), "--timeout", "0.3")
    assert code == 3 and "still queued" in err
    code, out, _ = lab("cancel", str(job_id), "--json")
    assert code == 0 and json.loads(out)["status"] == "cancelled"
    code, _, err = lab("cancel", str(job_id))
    assert code == 2 and "already cancelled" in err
    code, out, _ = lab("wait", str(job_id), "--json")
    assert code == 1 and json.loads(out)["status"] == "cancelled"
    code, out, _ = lab("retry", str(job_id), "--json")
    assert code == 0 and json.loads(out)["status"] == "queued"
    finish(store, job_id, "succeeded", {"slept": 1.0})
    code, out, _ = lab("wait", str(job_id), "--json")
    assert code == 0 and json.loads(out)["result"] == {"slept": 1.0}
    code, _, err = lab("retry", str(job_id))
    assert code == 2 and "only failed or cancelled" in err
    code, _, err = lab("show", "4242")
    assert code == 2 and "no such job" in err


def test_after_blocks_until_the_dependency_succeeds(store: Store) -> None:
    first = json.loads(lab("submit", "sleep", "--json")[1])["id"]
    second = json.loads(lab("submit", "sleep", "--after", str(first), "--json")[1])
    assert second["status"] == "blocked" and second["after"] == first


def test_logs_of_a_job_without_a_run_and_with_one(store: Store, tmp_path: Path) -> None:
    job_id = json.loads(lab("submit", "sleep", "--json")[1])["id"]
    code, _, err = lab("logs", str(job_id))
    assert code == 0 and "no log yet" in err
    finish(store, job_id, "failed")
    run_dir = Path(store.get(job_id)["run_dir"])
    run_dir.mkdir(parents=True)
    (run_dir / "log.txt").write_text("line one\nline two\n")
    code, out, _ = lab("logs", str(job_id), "--follow")
    assert code == 0 and out == "line one\nline two\n"
    assert json.loads(lab("logs", str(job_id), "--json")[1])["log"].endswith("line two\n")


def test_kinds_lists_sleep_with_its_fields(store: Store) -> None:
    code, out, _ = lab("kinds", "--json")
    kinds = {k["kind"]: k for k in json.loads(out)}
    assert code == 0 and set(kinds["sleep"]["lanes"]) == {"cpu", "gpu"}
    fields = {f["name"]: f for f in kinds["sleep"]["fields"]}
    assert fields["seconds"]["type"] == "float" and fields["seconds"]["default"] == 1.0


def _ablation(store: Store, status: str, verdict: str) -> int:
    job_id = store.submit("ablation", "cpu", {}, timeout_s=60, max_attempts=1)
    finish(store, job_id, status, {"verdict": verdict})
    return job_id


def test_rtx2060_gate(store: Store) -> None:
    won = _ablation(store, "succeeded", "better")
    lost = _ablation(store, "succeeded", "inconclusive")
    crashed = _ablation(store, "failed", "better")
    spec = {"preset": "rtx2060"}
    with pytest.raises(service.GateError, match="--earned-by: a train job with preset rtx2060"):
        service.check_gate(store, "train", "gpu", spec, None, False, None)
    with pytest.raises(service.GateError, match="verdict 'inconclusive'"):
        service.check_gate(store, "train", "gpu", spec, lost, False, None)
    with pytest.raises(service.GateError, match="is failed, not succeeded"):
        service.check_gate(store, "train", "gpu", spec, crashed, False, None)
    with pytest.raises(service.GateError, match="needs --reason"):
        service.check_gate(store, "train", "gpu", spec, None, True, "  ")
    service.check_gate(store, "train", "gpu", spec, won, False, None)
    service.check_gate(store, "train", "gpu", spec, None, True, "baseline run for the paper")
    service.check_gate(store, "train", "cpu", spec, None, False, None)  # only the GPU lane is gated
    service.check_gate(store, "train", "gpu", {"preset": "tiny"}, None, False, None)


def test_rtx2060_gate_through_submit(store: Store) -> None:
    if "train" not in jobs.kind_names():
        pytest.skip("the train kind does not exist yet")
    fields = {f.name for f in __import__("dataclasses").fields(jobs.get_kind("train").spec)}
    if "preset" not in fields:
        pytest.skip("the train kind has no preset field")
    won = _ablation(store, "succeeded", "better")
    code, _, err = lab("submit", "train", "--lane", "gpu", "--set", "preset=rtx2060")
    assert code == 2 and "--earned-by" in err and store.list_jobs(kind="train") == []
    code, out, err = lab("submit", "train", "--lane", "gpu", "--set", "preset=rtx2060", "--earned-by",
                         str(won), "--json")
    assert code == 0, err
    assert json.loads(out)["earned_by"] == won
    code, out, err = lab("submit", "train", "--lane", "gpu", "--set", "preset=rtx2060", "--force",
                         "--reason", "calibration run", "--json")
    assert code == 0, err
    assert json.loads(out)["force_reason"] == "calibration run"
