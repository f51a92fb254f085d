"""Several hosts on one queue (Postgres + Redis): two real `lab daemon` processes with different
LAB_HOST and LAB_RUNS share a fresh Postgres database and a Redis broker.

Covered: GPU jobs spread over both hosts and never run two at once on one host; a pinned job
(`--host`) runs only there; a host's death (kill -9 of its daemon AND of its jobs' process
groups) requeues its job to the other host, which finishes it, with no two attempts running at
the same time; a host cut off from the database (its login refused, its connections killed)
stops its own job before another host reruns it; `lab status` and `lab show` from any host; the
GitHub bridge's role lease moving to another host when its holder dies. Sleep jobs record their
own wall-clock start and end (times.json), so overlap is measured by the jobs, not by the
bookkeeping under test.

Skips with the reason when PostgreSQL or Redis is not reachable, fails instead when
LAB_REQUIRE_SERVICES=1 (CI)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers_daemon import (
    PG_ADMIN_URL,
    ROOT,
    _unavailable,
    assert_no_overlap,
    fresh_postgres,
    job_times,
    lab,
    pid_alive,
    queue_env,
    redis_broker,
    start_daemon,
    stop_daemon,
    wait_for,
    wait_jobs,
)

from daemon import service
from store import Store

pytestmark = pytest.mark.timeout(90)


class Cluster:
    """One Postgres database + one Redis broker; per host its own env (LAB_HOST, LAB_RUNS)."""

    def __init__(self, tmp: Path, url: str, broker: str):
        self.url = url
        self.store = Store(url)
        self.env = {h: queue_env(tmp / h, LAB_HOST=h, LAB_DB=url, LAB_BROKER=broker)
                    for h in ("hostA", "hostB")}
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, host: str, *args: str) -> subprocess.Popen:
        self.procs[host] = start_daemon(self.env[host], *args)
        return self.procs[host]

    def wait_alive(self, *hosts: str) -> None:
        def up() -> bool:
            alive = {d["host"] for d in self.store.daemons(alive_within=3.0)}
            return set(hosts) <= alive
        wait_for(up, 30, f"daemons on {', '.join(hosts)} to heartbeat")

    def submit(self, lane: str, seconds: float, host: str | None = None) -> int:
        return service.submit("sleep", {"seconds": seconds}, lane=lane, host=host, store=self.store)["id"]

    def job_running_on_a(self, seconds: float) -> tuple[subprocess.Popen, dict[str, Any]]:
        """hostA (GPU lane only) claims and starts a `seconds` sleep job; hostB is up beside it
        but must not get that job. Returns hostA's daemon and the running job's row."""
        a = self.start("hostA", "--lanes", "gpu")
        self.wait_alive("hostA")
        victim = self.submit("gpu", seconds)
        wait_for(lambda: self.store.get(victim)["host"] == "hostA", 30, "hostA to claim the job")
        self.start("hostB", "--lanes", "gpu")
        job = wait_for(lambda: (j := self.store.get(victim))["started_at"] and j, 30,
                       "the job to start on hostA")
        return a, job


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with fresh_postgres() as url:
        c = Cluster(tmp_path, url, redis_broker())
        try:
            yield c
        finally:
            for p in c.procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait()
            c.store.dispose()


def max_concurrency(intervals: list[tuple[float, float]]) -> int:
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    level = peak = 0
    for _, step in points:  # an end sorts before a start at the same instant (-1 < 1)
        level += step
        peak = max(peak, level)
    return peak


def descendants(pid: int) -> list[int]:
    """Every live process under `pid` (from /proc), children first found first."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_host(daemon: subprocess.Popen, job_pid: int) -> float:
    """A host's death: SIGKILL to its daemon, the job's process group and everything the daemon
    started (standby workers); returns the wall-clock time of death."""
    groups = {job_pid} | {os.getpgid(p) for p in descendants(daemon.pid) if pid_alive(p)}
    daemon.send_signal(signal.SIGKILL)
    t = time.time()
    for g in groups:
        try:
            os.killpg(g, signal.SIGKILL)
        except ProcessLookupError:
            pass
    daemon.wait()
    return t


def test_gpu_jobs_spread_over_hosts_one_at_a_time_per_host(cluster: Cluster) -> None:
    for h in ("hostA", "hostB"):
        cluster.start(h, "--lanes", "gpu,cpu", "--cpu-workers", "1")
    cluster.wait_alive("hostA", "hostB")
    gpu = [cluster.submit("gpu", 0.8) for _ in range(6)]
    pinned = cluster.submit("gpu", 0.3, host="hostB")
    cpu = [cluster.submit("cpu", 0.5) for _ in range(2)]
    # While they run, `lab status` on either host shows both hosts, their lanes and heartbeats.
    wait_for(lambda: cluster.store.list_jobs(["running"]), 30, "a job to run")
    status = json.loads(lab(cluster.env["hostA"], "status", "--json").stdout)
    hosts = {h["host"]: h for h in status["hosts"]}
    assert set(hosts) == {"hostA", "hostB"}
    for h in hosts.values():
        assert h["alive"] and h["lanes"] == ["gpu", "cpu"] and h["heartbeat"].endswith("Z")
    text = lab(cluster.env["hostB"], "status").stdout
    assert "host hostA: alive, lanes gpu,cpu" in text and "host hostB: alive" in text

    rows = wait_jobs(cluster.store, gpu + [pinned] + cpu, 60)
    assert all(r["status"] == "succeeded" and r["attempts"] == 1 for r in rows), [
        (r["id"], r["status"], r["error"]) for r in rows]
    by_id = {r["id"]: r for r in rows}
    assert by_id[pinned]["host"] == "hostB"
    figures = {}
    for h in ("hostA", "hostB"):
        spans = [job_times(r) for r in rows if r["lane"] == "gpu" and r["host"] == h]
        assert len(spans) >= 1, f"{h} ran no GPU job"
        assert_no_overlap(spans)  # never two GPU jobs at once on one host
        assert all(Path(r["run_dir"]).is_relative_to(cluster.env[h]["LAB_RUNS"])
                   for r in rows if r["host"] == h), "run files belong under the host's own LAB_RUNS"
        figures[h] = (len(spans), max_concurrency(spans))
    all_gpu = [job_times(r) for r in rows if r["lane"] == "gpu"]
    assert max_concurrency(all_gpu) == 2, "the two hosts' GPU lanes should have run side by side"
    print(f"\nmultihost spread: GPU jobs per host {({h: n for h, (n, _) in figures.items()})}, "
          f"max concurrency per host {({h: m for h, (_, m) in figures.items()})}, across hosts 2")
    for p in cluster.procs.values():
        assert stop_daemon(p) < 30


def test_host_death_requeues_its_job_to_the_other_host(cluster: Cluster) -> None:
    store = cluster.store
    a, job = cluster.job_running_on_a(3.0)
    victim = job["id"]
    others = [cluster.submit("gpu", 0.3) for _ in range(2)]  # hostA's card is busy: these go to hostB
    time.sleep(0.3)  # mid-job
    died = kill_host(a, job["pid"])
    first_pids = json.loads((Path(job["run_dir"]) / "pids.json").read_text())
    wait_for(lambda: not any(pid_alive(p) for p in first_pids.values()), 5, "hostA's job to die")

    rows = {r["id"]: r for r in wait_jobs(store, [victim, *others], 60)}
    assert all(r["status"] == "succeeded" for r in rows.values()), [
        (r["id"], r["status"], r["error"]) for r in rows.values()]
    done = rows[victim]
    assert done["host"] == "hostB" and done["attempts"] == 2
    assert not (Path(job["run_dir"]) / "times.json").exists(), "attempt 1 should have died mid-job"
    start2, _ = job_times(done)
    assert start2 > died, "attempt 2 started before attempt 1 was dead"
    events = store.events(victim)
    expired = next(e for e in events if e["kind"] == "queued" and "expired" in e["message"])
    reclaimed = next(e for e in events if e["kind"] == "claimed" and e["at"] >= expired["at"])
    assert "hostB" in reclaimed["message"]
    # No overlap on hostB (attempt 2 among the others); attempt 1 ran alone on hostA until death.
    assert_no_overlap([job_times(rows[i]) for i in rows if rows[i]["host"] == "hostB"])
    started1 = next(e["at"] for e in events if e["kind"] == "started")
    spans_a = [(started1, died)] + [job_times(rows[i]) for i in others if rows[i]["host"] == "hostA"]
    assert_no_overlap(spans_a)

    # Any host sees the dead host as not alive, and where the job's run files are.
    status = json.loads(lab(cluster.env["hostB"], "status", "--json").stdout)
    hosts = {h["host"]: h for h in status["hosts"]}
    assert hosts["hostA"]["alive"] is False and hosts["hostA"]["running"] == []
    assert hosts["hostB"]["alive"] is True and hosts["hostB"]["lanes"] == ["gpu"]
    shown = json.loads(lab(cluster.env["hostA"], "show", str(victim), "--json").stdout)
    assert shown["run_files"] == {"host": "hostB", "path": done["run_dir"], "here": False,
                                  "tier": None}  # the tier is known only where the files are
    assert shown["run_dir"].startswith(cluster.env["hostB"]["LAB_RUNS"])
    text = lab(cluster.env["hostA"], "show", str(victim)).stdout  # the Files section says where
    assert "\nFiles:\n  host  hostB (not this host)\n" in text and f"  path  {done['run_dir']}\n" in text
    print(f"\nmultihost death: job {victim} killed on hostA mid-job, requeued "
          f"{expired['at'] - died:.2f} s after the kill, claimed by hostB {reclaimed['at'] - died:.2f} s "
          f"after, started {start2 - died:.2f} s after; attempts {done['attempts']}; "
          f"jobs per host {({h: sum(r['host'] == h for r in rows.values()) for h in ('hostA', 'hostB')})}")
    assert stop_daemon(cluster.procs["hostB"]) < 30


HOLD_ROLE = """
import sys, time
from bridge.outbox import Outbox
from store import Store
from bridge.github import LEASE_ROLE
outbox = Outbox(Store(sys.argv[1]))
while True:  # renew like the bridge does each cycle
    if outbox.acquire_lease(LEASE_ROLE, "hostA:bridge", float(sys.argv[2]), host="hostA"):
        print("held", flush=True)
    time.sleep(0.2)
"""


def test_bridge_role_moves_when_its_host_dies(cluster: Cluster) -> None:
    from bridge.github import LEASE_ROLE
    from bridge.outbox import Outbox

    ttl = 1.5
    holder = subprocess.Popen([sys.executable, "-c", HOLD_ROLE, cluster.url, str(ttl)], cwd=ROOT,
                              env=cluster.env["hostA"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        outbox = Outbox(cluster.store)
        for _ in range(3):  # hostA renews: hostB never gets the role while A lives
            assert not outbox.acquire_lease(LEASE_ROLE, "hostB:bridge", ttl, host="hostB")
            time.sleep(ttl / 2)
        holder.send_signal(signal.SIGKILL)
        died = time.time()
        holder.wait()
        took = wait_for(lambda: outbox.acquire_lease(LEASE_ROLE, "hostB:bridge", ttl, host="hostB")
                        and time.time() - died, ttl + 10, "hostB to take the bridge role")
        lease: dict[str, Any] = outbox.lease(LEASE_ROLE)  # type: ignore[assignment]
        assert (lease["owner"], lease["host"]) == ("hostB:bridge", "hostB")
        assert took <= ttl + 2
        print(f"\nmultihost bridge: role moved to hostB {took:.2f} s after hostA died (lease {ttl} s)")
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_submit_host_is_checked_and_an_unknown_host_warned(tmp_path: Path) -> None:
    env = queue_env(tmp_path)  # SQLite: no servers needed for the submit side
    bad = lab(env, "submit", "sleep", "--host", " ", "--json")
    assert bad.returncode == 2 and "--host" in bad.stderr
    assert Store(env["LAB_DB"]).list_jobs() == []
    out = lab(env, "submit", "sleep", "--host", "nosuchbox", "--json")
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout)
    assert job["status"] == "queued" and job["want_host"] == "nosuchbox"
    assert "nosuchbox" in job["warning"]


@pytest.fixture
def pg_role() -> Iterator[str]:
    """A login role of its own for one host, so the test can cut that host off the database."""
    import uuid

    import sqlalchemy as sa

    name = f"lab_host_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    try:
        with admin.connect() as c:
            c.execute(sa.text(f'CREATE ROLE "{name}" LOGIN'))
    except Exception as e:  # noqa: BLE001 - any failure to reach the server means "not available"
        admin.dispose()
        _unavailable("PostgreSQL", e)
    try:
        yield name
    finally:  # after the cluster's database is dropped (fixtures tear down in reverse order)
        with admin.connect() as c:
            c.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = :n"),
                      {"n": name})
            c.execute(sa.text(f'DROP ROLE IF EXISTS "{name}"'))
        admin.dispose()


def test_a_host_cut_off_from_the_database_stops_its_job_before_another_host_reruns_it(
        pg_role: str, cluster: Cluster) -> None:
    import sqlalchemy as sa

    store = cluster.store
    admin = sa.create_engine(cluster.url, isolation_level="AUTOCOMMIT")  # the cluster's database, as admin
    with admin.connect() as c:
        for sql in ("GRANT USAGE, CREATE ON SCHEMA public TO", "GRANT ALL ON ALL TABLES IN SCHEMA public TO",
                    "GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO"):
            c.execute(sa.text(f'{sql} "{pg_role}"'))
    user_part = cluster.url.split("://", 1)[1].split("@", 1)[0]
    cluster.env["hostA"]["LAB_DB"] = cluster.url.replace(f"://{user_part}@", f"://{pg_role}@", 1)
    a, job = cluster.job_running_on_a(5.0)
    victim = job["id"]
    time.sleep(0.3)
    with admin.connect() as c:  # the partition: hostA's daemon and job lose the database
        c.execute(sa.text(f'ALTER ROLE "{pg_role}" NOLOGIN'))
        c.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = :n"),
                  {"n": pg_role})
    cut = time.time()
    first_pids = json.loads((Path(job["run_dir"]) / "pids.json").read_text())
    rerun = wait_for(lambda: (j := store.get(victim))["host"] == "hostB" and j["started_at"] and j, 30,
                     "hostB to start the job again")
    assert not any(pid_alive(p) for p in first_pids.values()), \
        "hostA's attempt was still running when hostB started the job"
    done = wait_jobs(store, [victim], 30)[0]
    assert done["status"] == "succeeded" and done["host"] == "hostB" and done["attempts"] == 2
    assert not (Path(job["run_dir"]) / "times.json").exists(), "hostA's attempt should have stopped"
    assert "no lease renewal" in (Path(job["run_dir"]) / "log.txt").read_text()
    assert a.poll() is None, "hostA's daemon itself lives on, cut off"
    hosts = {h["host"]: h for h in json.loads(lab(cluster.env["hostB"], "status", "--json").stdout)["hosts"]}
    assert hosts["hostA"]["alive"] is False
    print(f"\nmultihost partition: hostA's attempt stopped itself; hostB started the job "
          f"{rerun['started_at'] - cut:.2f} s after the cut")
    admin.dispose()
    assert stop_daemon(cluster.procs["hostB"]) < 30
