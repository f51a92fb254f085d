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
    # Each once crashed (OverflowError from the driver) or was queued though it could never run.
    (["sleep", "--after", str(2**63)], "--after: 9223372036854775808 is not a job id"),
    (["sleep", "--earned-by", str(2**64)], "--earned-by: 18446744073709551616 is not a job id"),
    (["sleep", "--after", "-3"], "--after: -3 is not a job id"),
    (["sleep", "--issue", "-1"], "--issue: -1 is not an issue number"),
    (["sleep", "--issue", "0"], "--issue: 0 is not an issue number"),
    (["sleep", "--host", "gpu-box\n"], None),  # stripped: accepted (below)
    (["sleep", "--host", "gpu\nbox"], "--host: 'gpu\\nbox' is not a host name"),
    (["sleep", "--host", "gpu box"], "--host: 'gpu box' is not a host name"),
    (["sleep", "--set", "signal=SIG_DFL"], "sleep.signal: 'SIG_DFL' is not a signal name"),
    (["sleep", "--set", "signal=SIG_BLOCK"], "sleep.signal: 'SIG_BLOCK' is not a signal name"),
    (["train", "--set", "data=nosuchdata"], "train.data: no dataset 'nosuchdata'"),
    (["eval", "--set", "run=nosuchrun"], "eval.run: no run 'nosuchrun'"),
    (["eval", "--set", "run='4242'"], "eval.run: no run '4242'"),  # a job id, quoted: a string
    (["eval", "--set", "run=nosuchrun", "--host", "testhost"], "eval.run: no run 'nosuchrun'"),
    (["archive", "--set", "runs=['nosuchrun']"], "archive.runs: no run 'nosuchrun'"),
])
def test_bad_submissions_exit_2_and_queue_nothing(store: Store, args, needle) -> None:
    if args == "wrong-lane":
        args = _wrong_lane_case()
        if args is None:
            pytest.skip("no job kind restricted to one lane exists yet")
    code, out, err = lab("submit", *args)
    if needle is None:  # a case beside the refusals that must still be accepted
        assert code == 0, err
        return
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


ARMS = [{"name": "flat-1", "arch": "reasoner", "n_steps": 1, "set": {}},
        {"name": "wide", "arch": "refiner", "n_steps": 4, "set": {"depth_min": 2, "depth_max": 8}}]


def _ablation(store: Store, status: str, verdict: str) -> int:
    """A finished ablation whose tested arm `wide` (a refiner trained at depths 2-8) got `verdict`."""
    job_id = store.submit("ablation", "cpu", {}, timeout_s=60, max_attempts=1)
    finish(store, job_id, status, {"verdict": verdict, "baseline": "flat-1", "primary": "test",
                                   "arm_specs": ARMS,
                                   "arms": [{"name": "flat-1", "verdict": "baseline"},
                                            {"name": "wide", "verdict": verdict}]})
    return job_id


FULL = {"flops": 1e18, "budget_s": None}  # a cost above config.GATE
SMALL = {"flops": 1e9, "budget_s": None}


def test_the_gate_reads_cost_and_identity(store: Store) -> None:
    won = _ablation(store, "succeeded", "better")
    lost = _ablation(store, "succeeded", "inconclusive")
    crashed = _ablation(store, "failed", "better")
    same = {"preset": "rtx2060", "arch": "refiner", "n_steps": 4,
            "set": {"depth_min": 2, "depth_max": 8, "d_model": 768, "max_steps": 20000}}
    with pytest.raises(service.GateError, match="is a full run .* and was not earned: give --earned-by"):
        service.check_gate(store, "train", "gpu", same, None, False, None, FULL)
    with pytest.raises(service.GateError, match="has verdict wide 'inconclusive'"):
        service.check_gate(store, "train", "gpu", same, lost, False, None, FULL)
    with pytest.raises(service.GateError, match="is failed, not succeeded"):
        service.check_gate(store, "train", "gpu", same, crashed, False, None, FULL)
    with pytest.raises(service.GateError, match="needs --reason"):
        service.check_gate(store, "train", "gpu", same, None, True, "  ", FULL)
    # Another change than the arm that won: refused, naming what each arm changed.
    other = {**same, "set": {"depth_min": 1, "depth_max": 8}}
    with pytest.raises(service.GateError, match="no tested arm of ablation .* made this run's change"):
        service.check_gate(store, "train", "gpu", other, won, False, None, FULL)
    earned = service.check_gate(store, "train", "gpu", same, won, False, None, FULL)
    assert earned == (f"full run (1e+18 training FLOPs (the full-run threshold is 1e+15)), "
                      f"earned by ablation {won}, arm wide")
    forced = service.check_gate(store, "train", "gpu", same, None, True, "paper baseline", FULL)
    assert forced is not None and forced.endswith("forced: paper baseline")
    assert service.check_gate(store, "train", "cpu", same, None, False, None, FULL) is None  # GPU only
    assert service.check_gate(store, "train", "gpu", same, None, False, None, SMALL) is None  # below it
    with pytest.raises(service.GateError, match="this smoke job is a full run"):
        service.check_gate(store, "smoke", "gpu", {}, won, False, None, FULL)


def test_the_gate_through_submit(store: Store) -> None:
    won = _ablation(store, "succeeded", "better")
    same = ["--set", "preset=rtx2060_task", "--set", "task=khop", "--set", "arch=refiner", "--set",
            "n_steps=4", "--set", "set={depth_min = 2, depth_max = 8}"]
    code, _, err = lab("submit", "train", "--lane", "gpu", "--set", "preset=rtx2060")
    assert code == 2 and "--earned-by" in err and "full run" in err and store.list_jobs(kind="train") == []
    code, out, err = lab("submit", "train", "--lane", "gpu", *same, "--earned-by", str(won), "--json")
    assert code == 0, err
    job = json.loads(out)
    assert job["earned_by"] == won and job["cost"]["flops"] > 1e15
    assert any(e["kind"] == "gate" for e in service.show(job["id"], events=True)["events"])
    code, out, err = lab("submit", "train", "--lane", "gpu", "--set", "preset=rtx2060", "--force",
                         "--reason", "calibration run", "--json")
    assert code == 0, err
    assert json.loads(out)["force_reason"] == "calibration run"


def test_the_two_bypasses_are_refused_saying_what_would_earn_the_run(store: Store) -> None:
    """A smoke with a huge step count and a `tiny` train made big by overrides were both full
    runs the old gate let through (it read only kind == train and the preset's name)."""
    code, _, err = lab("submit", "smoke", "--lane", "gpu", "--set", "steps=100000", "--set", "preset=rtx2060")
    assert code == 2 and "smoke.steps: 100000 steps is not a smoke" in err and "--earned-by" in err
    code, _, err = lab("submit", "smoke", "--lane", "gpu", "--set", "steps=1000", "--set", "preset=rtx2060")
    assert code == 2 and "full run" in err and "--earned-by" in err
    code, _, err = lab("submit", "train", "--lane", "gpu", "--set", "preset=tiny", "--set",
                       "set={d_model = 1024, n_heads = 16, block_size = 1024, max_steps = 20000}")
    assert code == 2 and "full run" in err and "same change" in err and "lab submit idea" in err
    assert store.list_jobs() == []
    code, out, _ = lab("submit", "train", "--lane", "gpu", "--set", "preset=tiny", "--dry-run", "--json")
    plan = json.loads(out)
    assert code == 0 and plan["queued"] is False and plan["full_run"] is False and plan["cost"]["flops"] > 0
    assert store.list_jobs() == []


def test_a_retried_held_job_comes_back_blocked(store: Store) -> None:
    """Cancel and retry do not drop the GitHub `blocked` label's hold: the job comes back
    blocked, held, and `lab retry` says why; it is not queued to run while the label is on."""
    job_id = json.loads(lab("submit", "sleep", "--json")[1])["id"]
    assert store.hold(job_id, "issue #5 has the `blocked` label")
    assert lab("cancel", str(job_id))[0] == 0
    code, out, err = lab("retry", str(job_id), "--json")
    assert code == 0, err
    job = json.loads(out)
    assert (job["status"], job["held"]) == ("blocked", "issue #5 has the `blocked` label")
    assert store.claim_next("cpu", "test", "testhost", os.environ["LAB_RUNS"], 30) is None
    assert store.cancel(job_id) == "cancelled"
    code, out, _ = lab("retry", str(job_id))
    assert code == 0 and out.strip() == f"job {job_id}: blocked (held: issue #5 has the `blocked` label)"


def test_datasets_and_runs_that_exist_or_will_are_accepted(store: Store, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The submit-time checks of train.data and eval.run refuse only what cannot be: the sample
    dataset is built on demand, a queued tokenize job will make its dataset, a queued job's run
    dir appears when it runs, and a job for another host is that host's to check."""
    import config

    runs = Path(os.environ["LAB_RUNS"])
    runs.mkdir(parents=True, exist_ok=True)

    def ok(*args: str) -> dict:
        code, out, err = lab("submit", *args, "--json")
        assert code == 0, err
        return json.loads(out)

    ok("train", "--set", f"data={config.SAMPLE_DATASET}")
    (runs / "data" / "mine").mkdir(parents=True)
    (runs / "data" / "mine" / "meta.json").write_text("{}")
    ok("train", "--set", "data=mine")
    monkeypatch.setenv("LAB_DATA", str(tmp_path / "texts"))
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("some text\n")
    ok("tokenize", "--set", f"src=['{tmp_path / 'texts' / 'a.txt'}']", "--set", "name=coming")
    ok("train", "--set", "data=coming")  # the queued tokenize job makes it
    trained = ok("train")
    ok("eval", "--set", f"run='{trained['id']}'", "--after", str(trained["id"]))
    (runs / "train-20261201-120000-abc123").mkdir()
    ok("eval", "--set", "run=train-20261201-120000-abc123")
    ok("archive", "--set", "runs=['train-20261201-120000-abc123']")
    # Another host's runs and datasets are under its LAB_RUNS: not checked here.
    ok("eval", "--set", "run=nosuchrun", "--host", "other-host")
    ok("train", "--set", "data=nosuchdata", "--host", "other-host")
    # A finished job that ran on another host: its run is there, and a daemon there may take it.
    elsewhere = store.submit("train", "gpu", {}, priority=1000, timeout_s=60, max_attempts=1)
    claimed = store.claim_next("gpu", "d", "other-host", runs, 30)
    assert claimed["id"] == elsewhere and store.finish(elsewhere, 1, "succeeded", exit_code=0)
    ok("eval", "--set", f"run='{elsewhere}'")
    code, _, err = lab("submit", "eval", "--set", f"run='{elsewhere}'", "--host", "testhost")
    assert code == 2 and f"eval.run: no run '{elsewhere}'" in err


@pytest.mark.parametrize("timeout", ["-1", "-0.5", "nan", "inf"])
def test_wait_refuses_a_timeout_submit_would_refuse(store: Store, timeout: str) -> None:
    job_id = json.loads(lab("submit", "sleep", "--json")[1])["id"]
    code, out, err = lab("wait", str(job_id), "--timeout", timeout)
    assert code == 2 and "--timeout" in err and out == "", (code, out, err)


def test_archive_and_restore_agree_on_a_run_that_does_not_exist(store: Store) -> None:
    Path(os.environ["LAB_RUNS"]).mkdir(parents=True, exist_ok=True)
    for command in ("archive", "restore"):
        code, out, err = lab(command, "nosuchrun")
        assert code == 2 and "nosuchrun" in err and err.startswith("Error"), (command, code, out, err)
    code, _, err = lab("archive", "../etc")
    assert code == 2 and "not a run name" in err


def _daemon(store: Store, lanes: str, heartbeat_age: float, host: str = "testhost") -> None:
    """A daemon row as `lab daemon` leaves it, last heartbeat `heartbeat_age` seconds ago."""
    import time

    from sqlalchemy import update

    from store import daemons

    daemon_id = f"{host}:{lanes}:{heartbeat_age}"
    store.register_daemon(daemon_id, host, 4321, lanes, 1)
    with store.transaction() as c:
        c.execute(update(daemons).where(daemons.c.id == daemon_id)
                  .values(heartbeat_at=time.time() - heartbeat_age))


def test_wait_with_no_daemon_says_so_and_exits_3(store: Store) -> None:
    """With no daemon alive nothing will run the job: `lab wait` says so (and since when) on
    stderr and exits 3 at once instead of hanging; --json stays one document on stdout."""
    import time

    job_id = json.loads(lab("submit", "sleep", "--lane", "cpu", "--json")[1])["id"]
    t0 = time.monotonic()
    code, out, err = lab("wait", str(job_id), "--json")
    assert code == 3 and time.monotonic() - t0 < 5
    assert "no daemon is alive for lane cpu" in err and "none has ever run" in err
    assert "--keep-waiting" in err and err.count("\n") == 1
    shown = json.loads(out)
    assert (shown["id"], shown["status"]) == (job_id, "queued")
    assert shown["timed_out"] is True and shown["no_daemon"] is True

    _daemon(store, "cpu", heartbeat_age=3600)  # dead an hour
    _daemon(store, "gpu", heartbeat_age=0)  # alive, but not on the job's lane
    code, out, err = lab("wait", str(job_id))
    assert code == 3 and "no daemon is alive for lane cpu (none seen since 20" in err and out == ""

    # Asked to keep waiting: said once, then the ordinary timeout.
    t0 = time.monotonic()
    code, out, err = lab("wait", str(job_id), "--keep-waiting", "--timeout", "0.6", "--json")
    assert code == 3 and time.monotonic() - t0 >= 0.6
    assert err.count("no daemon is alive") == 1 and "after 0.6 s" in err
    assert json.loads(out)["no_daemon"] is False

    # A live daemon on the lane: wait waits (here until its timeout), with nothing said about daemons.
    _daemon(store, "gpu,cpu", heartbeat_age=0)
    code, _, err = lab("wait", str(job_id), "--timeout", "0.3")
    assert code == 3 and "still queued after 0.3 s" in err and "daemon" not in err
    # A job for a host with no live daemon is stuck too, whatever other hosts run.
    pinned = json.loads(lab("submit", "sleep", "--lane", "cpu", "--host", "other-host", "--json")[1])["id"]
    code, _, err = lab("wait", str(pinned))
    assert code == 3 and "no daemon is alive for lane cpu on host 'other-host'" in err


def test_the_read_commands_load_neither_torch_nor_scipy(store: Store) -> None:
    """`lab show`, `lab logs` and `lab status` of a smoke and of an ablation in a fresh process:
    an agent calls them all day, and torch (~2 s) or scipy.stats (~1 s) made each take seconds."""
    import subprocess
    import sys

    smoke = service.submit("smoke", {"steps": 5}, lane="gpu")["id"]
    ablation = service.submit("ablation", {"control": "positive"}, lane="cpu")["id"]
    code = ("import sys; from daemon import service; "
            f"[service.show(i) and service.logs(i) for i in ({smoke}, {ablation})]; service.status(); "
            "bad = sorted({'torch', 'scipy.stats', 'huey'} & set(sys.modules)); assert not bad, bad")
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
