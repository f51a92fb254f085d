"""store.py on a real SQLite file: claims, guarded transitions, leases, dependencies."""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_daemon import fresh_postgres

from store import StateError, Store, db_url, public


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        yield Store(str(tmp_path / "queue.db"))
        return
    with fresh_postgres() as url:
        s = Store(url)
        yield s
        s.dispose()


def add(store: Store, lane: str = "cpu", priority: int = 0, after: int | None = None, **kw) -> int:
    return store.submit("sleep", lane, {"seconds": 0.1}, priority=priority, after=after, timeout_s=60,
                        max_attempts=kw.pop("max_attempts", 2), **kw)


def test_db_url_path_and_url(tmp_path: Path) -> None:
    assert db_url(str(tmp_path / "q.db")) == f"sqlite:///{tmp_path / 'q.db'}"
    assert db_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"


def test_submit_and_public_fields(store: Store) -> None:
    job_id = add(store, issue=7, earned_by=None)
    job = public(store.get(job_id))
    for key in ("id", "kind", "lane", "status", "spec", "created_at", "started_at", "finished_at",
                "attempts", "exit_code", "error", "result", "run_dir", "host", "issue", "after"):
        assert key in job
    assert job["status"] == "queued" and job["issue"] == 7
    assert job["created_at"].endswith("Z") and "T" in job["created_at"]
    assert [e["kind"] for e in store.events(job_id)] == ["submitted"]


def test_claim_order_priority_then_fifo(store: Store, tmp_path: Path) -> None:
    low, high, low2, high2 = add(store, priority=0), add(store, priority=5), add(store, priority=0), add(
        store, priority=5)
    order = []
    while (job := store.claim_next("cpu", "me", "h", tmp_path, 30)) is not None:
        order.append(job["id"])
        assert job["status"] == "running" and job["attempts"] == 1 and job["lease_owner"] == "me"
        assert job["run_dir"] == str(tmp_path / str(job["id"]))
    assert order == [high, high2, low, low2]


def test_gpu_claim_one_per_host(store: Store, tmp_path: Path) -> None:
    a, b, c = add(store, "gpu"), add(store, "gpu"), add(store, "gpu")
    assert store.claim_next("gpu", "d1", "h1", tmp_path, 30)["id"] == a
    assert store.claim_next("gpu", "d2", "h1", tmp_path, 30) is None  # another daemon, same host
    assert store.claim_next("gpu", "d3", "h2", tmp_path, 30)["id"] == b  # another host has its own card
    assert store.finish(a, 1, "succeeded", exit_code=0, result={"ok": 1})
    assert store.claim_next("gpu", "d2", "h1", tmp_path, 30)["id"] == c


def test_gpu_claim_passes_only_the_jobs_that_gave_the_card_back(store: Store, tmp_path: Path) -> None:
    """`released`: a running GPU job whose process said it gave the card back does not hold the
    host's card for the daemon that was told; one not named still does (the SQL behind the
    off-the-card hand-over, tests/test_scheduler.py, on each backend)."""
    a, b, c = add(store, "gpu"), add(store, "gpu"), add(store, "gpu")
    assert store.claim_next("gpu", "d1", "h1", tmp_path, 30)["id"] == a
    assert store.claim_next("gpu", "d1", "h1", tmp_path, 30, released=[b]) is None  # not a's
    assert store.claim_next("gpu", "d1", "h1", tmp_path, 30, released=[a])["id"] == b
    assert store.claim_next("gpu", "d1", "h1", tmp_path, 30, released=[a]) is None  # b holds it now
    assert store.claim_next("gpu", "d1", "h1", tmp_path, 30, released=[a, b])["id"] == c


def test_transitions_are_fenced_by_attempt(store: Store, tmp_path: Path) -> None:
    job_id = add(store)
    store.claim_next("cpu", "me", "h", tmp_path, 30)
    assert not store.finish(job_id, 2, "succeeded")  # not this attempt
    assert store.heartbeat(job_id, 2, 30) is None
    assert store.heartbeat(job_id, 1, 30)["status"] == "running"
    assert store.finish(job_id, 1, "failed", exit_code=-9, error="killed by signal SIGKILL")
    assert not store.finish(job_id, 1, "succeeded")  # already final
    job = store.get(job_id)
    assert (job["status"], job["exit_code"], job["error"]) == ("failed", -9, "killed by signal SIGKILL")


def test_cancel_and_retry(store: Store, tmp_path: Path) -> None:
    queued, running = add(store), add(store)
    store.claim_next("cpu", "me", "h", tmp_path, 30)  # takes `queued` (FIFO)
    assert store.cancel(running, "no longer needed") == "cancelled"
    assert store.cancel(queued, "stop it") == "running"
    assert store.get(queued)["cancel_requested"]
    with pytest.raises(StateError, match="already cancelled"):
        store.cancel(running)
    with pytest.raises(StateError, match="only failed or cancelled"):
        store.retry(queued)
    assert store.retry(running) == "queued"
    job = store.get(running)
    assert job["attempts"] == 0 and job["error"] is None and not job["cancel_requested"]
    with pytest.raises(StateError, match="no such job"):
        store.cancel(999)


def test_sweep_requeues_then_fails_expired_leases(store: Store, tmp_path: Path) -> None:
    job_id = add(store, max_attempts=2)
    cancelled = add(store)
    store.claim_next("cpu", "dead", "h", tmp_path, 0.05)
    store.claim_next("cpu", "dead", "h", tmp_path, 0.05)
    store.cancel(cancelled, "user")
    time.sleep(0.1)
    assert sorted(store.sweep_expired()) == [(job_id, "queued"), (cancelled, "cancelled")]
    assert store.get(job_id)["attempts"] == 1
    store.claim_next("cpu", "dead", "h", tmp_path, 0.05)
    time.sleep(0.1)
    assert store.sweep_expired() == [(job_id, "failed")]
    job = store.get(job_id)
    assert job["status"] == "failed" and "expired" in job["error"] and "2 attempts" in job["error"]
    assert store.sweep_expired() == []


def test_live_lease_is_not_swept(store: Store, tmp_path: Path) -> None:
    job_id = add(store)
    store.claim_next("cpu", "alive", "h", tmp_path, 0.3)
    for _ in range(4):
        time.sleep(0.1)
        store.heartbeat(job_id, 1, 0.3)
        assert store.sweep_expired() == []
    assert store.get(job_id)["status"] == "running"


def test_dependencies(store: Store, tmp_path: Path) -> None:
    first, doomed = add(store), add(store)
    waits = add(store, after=first)
    orphan = add(store, after=doomed)
    assert store.get(waits)["status"] == "blocked"
    assert store.resolve_blocked() == []
    store.claim_next("cpu", "me", "h", tmp_path, 30)
    store.claim_next("cpu", "me", "h", tmp_path, 30)
    store.finish(first, 1, "succeeded", exit_code=0)
    store.finish(doomed, 1, "failed", exit_code=1, error="boom")
    assert sorted(store.resolve_blocked()) == [(waits, "queued"), (orphan, "cancelled")]
    assert store.get(orphan)["error"] == f"dependency job {doomed} failed"
    after_done = add(store, after=first)
    assert store.get(after_done)["status"] == "queued"  # its dependency already succeeded


def test_hold_keeps_a_job_blocked(store: Store) -> None:
    job_id = add(store)
    assert store.hold(job_id, "issue labelled blocked")
    assert store.resolve_blocked() == []
    assert store.get(job_id)["status"] == "blocked"
    assert store.unhold(job_id)
    assert store.resolve_blocked() == [(job_id, "queued")]


def test_a_retried_held_job_stays_held(store: Store, tmp_path: Path) -> None:
    """A job held by the GitHub `blocked` label, cancelled, then retried comes back blocked with
    its hold (not queued: it would run while the label is still on), and no claim takes it
    until the hold is released."""
    job_id = add(store)
    assert store.hold(job_id, "issue #3 has the `blocked` label")
    assert store.cancel(job_id) == "cancelled"
    assert store.retry(job_id) == "blocked"
    job = store.get(job_id)
    assert (job["status"], job["held"]) == ("blocked", "issue #3 has the `blocked` label")
    assert store.resolve_blocked() == []
    assert store.claim_next("cpu", "d", "h", tmp_path, 30) is None
    assert "held" in store.events(job_id)[-1]["message"]
    assert store.unhold(job_id)
    assert store.resolve_blocked() == [(job_id, "queued")]
    assert store.claim_next("cpu", "d", "h", tmp_path, 30)["id"] == job_id
    # Held behind a dependency as well: still blocked after the dependency succeeds.
    first = add(store)
    later = add(store, after=first)
    assert store.hold(later, "held") and store.cancel(later) == "cancelled"
    assert store.retry(later) == "blocked"
    claimed = store.claim_next("cpu", "d", "h", tmp_path, 30)
    assert claimed["id"] == first and store.finish(first, claimed["attempts"], "succeeded", exit_code=0)
    assert store.resolve_blocked() == []
    assert store.get(later)["status"] == "blocked"


def test_ids_beyond_64_bits_name_no_job(store: Store) -> None:
    """An id no column can hold (`lab show 99999999999999999999`) is no such job, not an
    OverflowError from the driver."""
    for big in (2**63, -(2**63) - 1, 10**30):
        assert store.get(big) is None
        assert store.events(big) == [] and store.list_jobs(issue=big) == []
        assert store.hold(big, "x") is False and store.unhold(big) is False
        with pytest.raises(StateError, match="no such job"):
            store.cancel(big)
        with pytest.raises(StateError, match="no such job"):
            store.retry(big)


def _claimer(db: str, runs: str, owner: str, out: str) -> None:
    s = Store(db)
    got = []
    while (job := s.claim_next("cpu", owner, "h", runs, 30)) is not None:
        got.append(job["id"])
    Path(out).write_text(",".join(map(str, got)))


def test_concurrent_claimers_never_take_one_job_twice(store: Store, tmp_path: Path) -> None:
    ids = [add(store) for _ in range(30)]
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_claimer, args=(store.url, str(tmp_path), f"p{i}",
                                                str(tmp_path / f"got{i}"))) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    got = [int(x) for i in range(3) for x in (tmp_path / f"got{i}").read_text().split(",") if x]
    assert sorted(got) == ids  # every job exactly once
    assert all(store.get(i)["attempts"] == 1 for i in ids)
