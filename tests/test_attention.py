"""daemon/attention.py (`lab next`) on a real SQLite queue: each kind of item appears when its
cause does, ranked, with a command that deals with it, and goes when the cause goes or when it is
dismissed; `lab jobs` filters."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers_daemon import queue_env, set_env

from bridge.outbox import Outbox
from cli import main
from config import ConfigError
from daemon import attention, service
from store import Store


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    set_env(monkeypatch, queue_env(tmp_path, LAB_DOCS=str(tmp_path / "docs")))
    return Store(str(tmp_path / "queue.db"))


def finish(store: Store, job_id: int, status: str, result: dict | None = None, error: str = "boom") -> None:
    job = store.get(job_id)
    claimed = store.claim_next(job["lane"], "test", "testhost", os.environ["LAB_RUNS"], 30)
    assert claimed["id"] == job_id
    store.finish(job_id, claimed["attempts"], status, exit_code=0 if status == "succeeded" else 1,
                 result=result, error=None if status == "succeeded" else error)


def keys(store: Store) -> list[str]:
    return [i["key"] for i in attention.needs_attention(store)["items"]]


def test_an_empty_lab_says_so(store: Store) -> None:
    out = attention.needs_attention(store)
    assert out["empty"] and out["items"] == []
    assert out["summary"] == "nothing needs attention; the queue is empty"


def test_each_cause_is_an_item_ranked_with_its_command(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    failed = store.submit("sleep", "cpu", {"seconds": 1}, timeout_s=60, max_attempts=1)
    finish(store, failed, "failed", error="exit code 3\nmore lines")
    ablation = store.submit("ablation", "cpu", {"spec_file": "x"}, timeout_s=60, max_attempts=1)
    finish(store, ablation, "succeeded", {"verdict": "inconclusive", "primary": "test"})
    control = store.submit("ablation", "cpu", {"control": "negative"}, timeout_s=60, max_attempts=1)
    finish(store, control, "succeeded", {"verdict": "inconclusive", "primary": "hops3"})
    outbox = Outbox(store)
    outbox.put_comment("invalid:7:ab", "invalid", 7, "<!-- m -->", "bad spec", editable=False)
    outbox.put_comment("result:99", "result", 8, "<!-- r -->", "body")
    row = outbox.row("result:99")
    outbox.mark_failed(row["id"], "403 forbidden", 0.0, give_up=True)
    waiting = store.submit("sleep", "gpu", {"seconds": 1}, timeout_s=60, max_attempts=1)

    items = attention.needs_attention(store)["items"]
    by_key = {i["key"]: i for i in items}
    # by rank (what stops the lab, what waits on a decision, failures, records owed), newest first
    ranked = [(i["rank"], i["key"]) for i in items]
    assert ranked == [(0, "daemon"), (1, f"outbox:{row['id']}"), (1, "needs-fix:7"), (2, f"job:{failed}"),
                      (3, f"finding:{ablation}")]
    assert "1 job(s) wait" in by_key["daemon"]["reason"]
    assert by_key["daemon"]["command"].startswith("lab daemon")
    assert by_key[f"job:{failed}"]["reason"] == f"job {failed} (sleep) failed: exit code 3"
    assert f"lab retry {failed}" in by_key[f"job:{failed}"]["command"]
    assert by_key[f"finding:{ablation}"]["mcp"] == {"tool": "finding", "arguments": {"job_id": ablation,
                                                                                      "title": "one claim"}}
    assert "403 forbidden" in by_key[f"outbox:{row['id']}"]["reason"]
    assert f"finding:{control}" not in by_key  # a control checks the instrument: no finding owed

    # Causes that go take their items with them; the rest go by dismissal, with a reason.
    service.cancel(waiting, "not now", store)
    store.retry(failed)
    assert "daemon" in keys(store)  # the retried job waits now, and still no daemon
    service.cancel(failed, "enough", store)
    assert "daemon" not in keys(store) and f"job:{failed}" not in keys(store)
    with pytest.raises(ConfigError, match="--reason"):
        attention.dismiss(f"finding:{ablation}", " ", store)
    attention.dismiss(f"finding:{ablation}", "inconclusive on a broken spec; rerun as job 9", store)
    assert sorted(keys(store)) == sorted(["needs-fix:7", f"outbox:{row['id']}"])

    # A full disk stops the lab: rank 0, first.
    monkeypatch.setenv("LAB_QUEUE_DISK_MIN_FREE_GB", "100000")
    first = attention.needs_attention(store)["items"][0]
    assert (first["key"], first["rank"]) == ("disk", 0) and "disk guard" in first["reason"]


def test_a_stopped_idea_asks_for_its_finding_and_graveyard_line(store: Store) -> None:
    pid, [smoke] = store.create_pipeline({"hypothesis": "h"}, "abc", "cpu", "smoke", [dict(
        kind="sleep", lane="cpu", spec={}, timeout_s=60, max_attempts=1)])
    p = store.pipeline(pid)
    store.move_pipeline(pid, p["version"], status="stopped", reason="ablation job 4: inconclusive",
                        outcome={"graveyard": "- line", "ablation": 4})
    service.cancel(smoke, "test", store)
    [item] = attention.needs_attention(store)["items"]
    assert item["key"] == f"pipeline:{pid}" and "graveyard" in item["reason"]
    assert item["command"].startswith("lab finding 4")


def test_lab_next_and_lab_jobs_from_the_cli(store: Store) -> None:
    runner = CliRunner()
    job = store.submit("sleep", "cpu", {"seconds": 1}, timeout_s=60, max_attempts=1)
    finish(store, job, "failed")
    out = json.loads(runner.invoke(main, ["next", "--json"]).output)
    assert [i["key"] for i in out["items"]] == [f"job:{job}"]
    text = runner.invoke(main, ["next"]).output
    assert text.splitlines()[0].split() == ["#", "KEY", "WHAT", "REASON", "/", "COMMAND"]
    assert runner.invoke(main, ["next", "--dismiss", f"job:{job}", "--reason", "known"]).exit_code == 0
    assert json.loads(runner.invoke(main, ["next", "--json"]).output)["empty"]

    store.submit("smoke", "gpu", {}, timeout_s=60, max_attempts=1)
    listed = json.loads(runner.invoke(main, ["jobs", "--status", "failed", "--json"]).output)
    assert [j["id"] for j in listed["jobs"]] == [job]
    assert [j["kind"] for j in service.list_jobs(status="active", store=store)["jobs"]] == ["smoke"]
    assert service.list_jobs(since="1h", store=store)["count"] == 2
    assert service.list_jobs(since="2999-01-01T00:00Z", store=store)["count"] == 0
    for args, field in ((["--status", "done"], "--status"), (["--kind", "nope"], "--kind"),
                        (["--since", "yesterday"], "--since"), (["--limit", "0"], "--limit")):
        r = runner.invoke(main, ["jobs", *args, "--json"])
        assert r.exit_code == 2 and json.loads(r.stderr)["field"] == field
    table = runner.invoke(main, ["jobs"]).output.splitlines()
    assert table[0].split()[:4] == ["ID", "KIND", "LANE", "STATUS"] and len(table) == 3
