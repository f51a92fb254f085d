"""`lab serve`, the read-only dashboard.

In process (Starlette's TestClient over a real store with real jobs): GET only, the token,
the Host check, escaping, filters and paging, run files kept inside the run dir, no asset from
anywhere but the package. In a browser (headless Chromium driven by selenium, against a real
`lab daemon` running sleep, smoke and ablation jobs and a real `lab serve` process): the pages
render without console errors, a running job's progress moves on screen without a reload, a
filter works, an ablation's grid shows. Screenshots of the main pages go to the test's runs dir
and to runs/screenshots/ of the checkout.

Without Chromium the browser test skips, saying how to install it; with LAB_REQUIRE_BROWSER=1
(.ci/run) it fails instead.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers_daemon import ROOT, queue_env, set_env, start_daemon, stop_daemon, wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL = ("headless Chromium is not installed: `sudo apt-get install -y chromium chromium-driver` "
           "(Debian) and `pip install -e '.[dev]'` (selenium)")


# --- in process ----------------------------------------------------------------------------------


@pytest.fixture
def client(tmp_runs: Path) -> Iterator[Any]:
    """A real store with real rows (submitted through the service, as `lab submit` does) and the
    app over it; no daemon, so the jobs wait."""
    from starlette.testclient import TestClient

    from daemon import service
    from store import Store
    from web.app import create_app

    store = Store(os.environ["LAB_DB"])
    service.submit("sleep", {"seconds": 1}, lane="gpu", store=store)
    service.submit("sleep", {"seconds": 1}, lane="gpu", after=1, store=store)  # job 2, blocked
    for i in range(59):
        service.submit("sleep", {"seconds": 1}, lane="cpu" if i % 2 == 0 else "gpu", store=store)
    with TestClient(create_app(), base_url="http://localhost") as c:
        yield c


def test_every_method_but_get_is_405(client: Any) -> None:
    for method in ("POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"):
        r = client.request(method, "/jobs/1")
        assert r.status_code == 405 and r.headers["allow"] == "GET", method
    assert client.get("/jobs/1").status_code == 200


def test_pages_render_with_a_strict_csp_and_no_outside_asset(client: Any) -> None:
    for path in ("/", "/jobs", "/jobs/1", "/ablations", "/research", "/pipelines"):
        r = client.get(path)
        assert r.status_code == 200, path
        assert "default-src 'self'" in r.headers["content-security-policy"]
        # every script and stylesheet is ours: nothing from a CDN
        for ref in re.findall(r'(?:src|href)="([^"]+)"', r.text):
            assert not re.match(r"(https?:)?//", ref), (path, ref)
        assert "<script>" not in r.text and " style=" not in r.text  # the CSP forbids inline ones
    for asset in ("uPlot.iife.min.js", "uPlot.min.css", "uPlot.LICENSE", "app.js", "app.css"):
        assert client.get(f"/static/{asset}").status_code == 200
    assert "http" not in (Path(ROOT) / "web" / "static" / "app.js").read_text().replace("https://", "")


def test_jobs_filter_and_pages(client: Any) -> None:
    r = client.get("/jobs?lane=cpu")
    ids = [int(i) for i in re.findall(r'<tr data-job="(\d+)"', r.text)]
    assert len(ids) == 30 and "30 job(s) match" in r.text
    r = client.get("/jobs")
    assert "61 job(s)" in r.text and "page 1 of 2" in r.text and 'rel="next"' in r.text
    ids = [int(i) for i in re.findall(r'<tr data-job="(\d+)"', r.text)]
    assert ids == list(range(61, 11, -1))  # newest first, 50 a page
    second = client.get("/jobs?page=2")
    assert [int(i) for i in re.findall(r'<tr data-job="(\d+)"', second.text)] == list(range(11, 0, -1))
    assert client.get("/jobs?status=blocked").text.count("<tr data-job=") == 1
    assert client.get("/jobs?page=x").status_code == 400


def test_overview_says_why_jobs_wait(client: Any) -> None:
    text = client.get("/").text
    assert "no daemon is alive" in text
    assert "waits for job 1 to succeed (it is queued)" in text
    assert "lab next" in text and "no bridge has run" in text


def test_the_job_page_files_stay_inside_the_run_dir(client: Any, tmp_runs: Path) -> None:
    from store import Store

    store = Store(os.environ["LAB_DB"])
    run = tmp_runs / "1"
    run.mkdir()
    (run / "log.txt").write_text("<script>alert(1)</script>\n")
    (tmp_runs / "secret.txt").write_text("no")
    with store.transaction() as c:
        from sqlalchemy import update

        from store import jobs as jobs_table

        c.execute(update(jobs_table).where(jobs_table.c.id == 1).values(run_dir=str(run)))
    page = client.get("/jobs/1").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert" not in page
    r = client.get("/jobs/1/files/log.txt")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert r.headers["x-content-type-options"] == "nosniff"
    for bad in ("..%2Fsecret.txt", "%2E%2E%2Fsecret.txt", ".hidden", "nosuch.txt"):
        assert client.get(f"/jobs/1/files/{bad}").status_code == 404, bad


def test_markdown_is_escaped(tmp_runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from starlette.testclient import TestClient

    from web.app import create_app, render_markdown

    docs = tmp_path / "docs"
    (docs / "findings").mkdir(parents=True)
    (docs / "ROADMAP.md").write_text("# Roadmap\n\n<script>alert(1)</script>\n\n[x](javascript:alert(1))\n\n"
                                     "[finding](findings/2026-12-01-x.md)\n\n"
                                     "| a | b |\n|---|---|\n| 1 | 2 |\n")
    (docs / "findings" / "2026-12-01-x.md").write_text('---\ntitle: "A <b>bold</b> claim"\n---\n\n## Claim\n')
    monkeypatch.setenv("LAB_DOCS", str(docs))
    with TestClient(create_app(), base_url="http://localhost") as c:
        page = c.get("/research").text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert" not in page
        assert 'href="javascript:' not in page and "<table>" in page
        assert 'href="/research/findings/2026-12-01-x.md"' in page  # a link between docs stays inside
        assert "A &lt;b&gt;bold&lt;/b&gt; claim" in page
        finding = c.get("/research/findings/2026-12-01-x.md")
        assert finding.status_code == 200 and "<h2>Claim</h2>" in finding.text
        assert c.get("/research/findings/..%2FROADMAP.md").status_code == 404
    assert str(render_markdown("a <i>b</i>")) == "<p>a &lt;i&gt;b&lt;/i&gt;</p>\n"


def test_the_token_is_checked_on_every_request(tmp_runs: Path) -> None:
    from starlette.testclient import TestClient

    from store import Store
    from web.app import create_app

    Store(os.environ["LAB_DB"])
    with TestClient(create_app(token="s3cret", loopback=False), base_url="http://box.example") as c:
        assert c.get("/").status_code == 401
        assert c.get("/static/app.js").status_code == 401
        assert c.get("/", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        r = c.get("/?token=s3cret")
        assert r.status_code == 200 and "HttpOnly" in r.headers["set-cookie"]
        assert c.get("/jobs").status_code == 200  # the cookie the first visit set
        assert c.post("/?token=s3cret").status_code == 405


def test_loopback_refuses_a_foreign_host_header(tmp_runs: Path) -> None:
    """DNS rebinding: a page at evil.example resolving to 127.0.0.1 must not read the lab."""
    from starlette.testclient import TestClient

    from web.app import create_app

    with TestClient(create_app(), base_url="http://evil.example:8008") as c:
        assert c.get("/").status_code == 421
    with TestClient(create_app(), base_url="http://127.0.0.1:8008") as c:
        assert c.get("/api/status.json").status_code == 200


def test_binding_another_address_needs_a_token(tmp_runs: Path) -> None:
    from click.testing import CliRunner

    import cli

    r = CliRunner().invoke(cli.main, ["serve", "--host", "0.0.0.0", "--json"], env={"LAB_SERVE_TOKEN": ""})
    assert r.exit_code == 2
    assert "--host" in json.loads(r.stderr)["error"] and "token" in json.loads(r.stderr)["error"]


# --- in a browser, against a real daemon and a real `lab serve` ---------------------------------


ABLATION = """task = "khop"
seeds = 1
why = "a dashboard test, not a claim"
steps = 10
eval_examples = 10
eval_depths = [1, 2]
baseline = "flat-1"
primary = "hops2"
[[arms]]
name = "flat-2"
arch = "reasoner"
n_steps = 2
[[arms]]
name = "flat-1"
arch = "reasoner"
n_steps = 1
"""


def _browser_or_skip() -> Any:
    try:
        from selenium import webdriver
    except ImportError:
        webdriver = None
    if webdriver is None or not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        if os.environ.get("LAB_REQUIRE_BROWSER") == "1":
            pytest.fail(INSTALL + " and LAB_REQUIRE_BROWSER=1")
        pytest.skip(INSTALL)
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--disable-extensions", "--no-first-run"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def test_without_chromium_the_browser_test_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", "/nonexistent/chromium")
    monkeypatch.delenv("LAB_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install -y chromium chromium-driver"):
        _browser_or_skip()
    monkeypatch.setenv("LAB_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="LAB_REQUIRE_BROWSER=1"):
        _browser_or_skip()


def _start_serve(env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    out = open(log, "w")  # noqa: SIM115 - the server writes here for its whole life
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--port", "0", "--json"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=out, text=True)
    assert proc.stdout is not None
    text = ""
    while True:  # `--json` prints the URL as one JSON document before it serves
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"lab serve exited: {log.read_text()[-2000:]}")
        text += line
        if line.startswith("}"):
            return proc, json.loads(text)["url"]


def _read(driver: Any, css: str, attr: str | None = None) -> Any:
    """Text (or an attribute) of the first match, read in one script: the live part is replaced
    under selenium's feet, so a found element may be gone by the time it is read."""
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]);"
        "return e ? (arguments[1] ? e.getAttribute(arguments[1]) : e.textContent) : null;", css, attr)


def _errors(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _shot(driver: Any, dirs: list[Path], name: str) -> None:
    height = driver.execute_script("return Math.max(document.body.scrollHeight, "
                                   "document.documentElement.scrollHeight)")
    driver.set_window_size(1400, max(800, min(int(height) + 160, 5000)))  # + the window's own chrome
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(d / f"{name}.png"))
    driver.set_window_size(1400, 1000)


def test_dashboard_in_a_browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    driver = _browser_or_skip()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    env = queue_env(tmp_path, LAB_DOCS=str(ROOT / "docs"))
    set_env(monkeypatch, env)
    runs = Path(env["LAB_RUNS"])
    shots = [runs / "screenshots", ROOT / "runs" / "screenshots"]
    # The jobs, submitted through the service as `lab submit` does (in process: five CLI processes
    # would cost ~10 s of this test): the ablation first, so it starts first on the CPU lane; a
    # long sleep on the GPU lane (the one whose progress must move on screen), one blocked behind
    # it, a smoke (its loss curves) and a failure.
    from daemon import service
    from store import Store

    store = Store(env["LAB_DB"])
    spec = tomllib.loads(ABLATION)
    for kind, values, lane, after in (("ablation", spec, "cpu", None),
                                      ("sleep", {"seconds": 10}, "gpu", None),
                                      ("sleep", {"seconds": 1}, "gpu", 2),
                                      ("smoke", {"steps": 10}, "cpu", None),
                                      ("sleep", {"seconds": 0.2, "fail": True}, "cpu", None)):
        service.submit(kind, values, lane=lane, after=after, store=store)
    daemon = start_daemon(env, "--cpu-workers", "2")
    serve, url = _start_serve(env, tmp_path / "serve.log")
    try:
        assert url.startswith("http://127.0.0.1:")
        base = url.rstrip("/")
        wait_for(lambda: (store.get(2) or {}).get("progress"), 30, "job 2 to report progress")

        # Now: job 2 runs, its bar moves without a reload; job 3 waits on it and says so.
        driver.get(base + "/")
        wait_for(lambda: driver.find_element(By.ID, "live-state").text == "live", 10, "the event stream")
        loaded_at = driver.execute_script("return window.labLoadedAt")
        bar = 'article[data-job="2"] progress'
        first = _read(driver, bar, "value")
        assert first is not None and "waits for job 2 to succeed" in _read(driver, "#waiting")
        wait_for(lambda: _read(driver, bar, "value") not in (first, None), 8,
                 "job 2's progress to move on screen")
        # Latency: from a new progress row in the store to that step on screen (the stream polls
        # every 0.5 s). Generous bound: 2 loaded cores run the jobs, the browser and the server.
        seen = (store.get(2) or {}).get("progress", {}).get("step")
        step = wait_for(lambda: (((store.get(2) or {}).get("progress") or {}).get("step") or 0) > (seen or 0)
                        and store.get(2)["progress"]["step"], 5, "a new progress report")
        t0 = time.monotonic()
        wait_for(lambda: int(_read(driver, bar, "value") or 0) >= step, 5, f"step {step} on screen")
        latency = time.monotonic() - t0
        print(f"progress report -> on screen: {latency:.2f} s")
        assert latency < 3.0
        assert driver.execute_script("return window.labLoadedAt") == loaded_at  # no reload
        assert "testhost" in driver.page_source and "lab next" in driver.page_source
        _shot(driver, shots, "overview")
        assert not _errors(driver)

        # Jobs: the failed filter leaves only the failed sleep.
        wait_for(lambda: (store.get(5) or {}).get("status") == "failed", 20, "job 5 to fail")
        driver.get(base + "/jobs")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#jobs tr[data-job]")) == 5
        Select(driver.find_element(By.NAME, "status")).select_by_value("failed")  # submits on change
        wait_for(lambda: "status=failed" in driver.current_url, 5, "the filter to apply")
        # the URL changes before the new page has replaced the old one's rows: read them in one
        # script (as _read does), until the filtered page is the one in the window
        listed = """return [...document.querySelectorAll('#jobs tr[data-job]')].map(r => r.dataset.job)"""
        wait_for(lambda: driver.execute_script(listed) == ["5"], 5, "only the failed job listed")
        assert not _errors(driver)
        _shot(driver, shots, "jobs-failed")
        driver.get(base + "/jobs")
        _shot(driver, shots, "jobs")

        # A job page: the smoke's curves (live while it runs), its files, curves.png.
        wait_for(lambda: (store.get(4) or {}).get("status") in ("running", "succeeded"), 30, "the smoke")
        driver.get(base + "/jobs/4")
        # the chart appears once metrics.jsonl has lines: from the stream, without a reload
        wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#chart canvas"), 30, "the loss chart")
        wait_for(lambda: (store.get(4) or {}).get("status") == "succeeded", 40, "the smoke to succeed")
        wait_for(lambda: "curves.png" in _read(driver, "#live"), 5, "curves.png listed")
        assert "succeeded" in _read(driver, "#live")
        _shot(driver, shots, "job")
        assert not _errors(driver)

        # The ablation: verdict, the arms table, one heatmap per arm with the primary cell boxed.
        done = wait_for(lambda: (store.get(1) or {}).get("status") in ("succeeded", "failed")
                        and store.get(1), 90, "the ablation")
        assert done["status"] == "succeeded", done["error"]
        driver.get(base + "/ablations")
        driver.find_element(By.CSS_SELECTOR, "#ablations a").click()
        maps = driver.find_elements(By.CSS_SELECTOR, "figure.heatmap")
        assert [m.get_attribute("data-arm") for m in maps] == ["flat-2", "flat-1"]
        assert driver.find_elements(By.CSS_SELECTOR, "td.cell.primary")
        assert "hops2" in driver.find_element(By.CSS_SELECTOR, "p.verdict").text
        assert "not matched" in driver.find_element(By.ID, "matching").text
        _shot(driver, shots, "ablation")
        assert not _errors(driver)

        driver.get(base + "/research")
        assert driver.find_element(By.CSS_SELECTOR, "#roadmap h1")
        _shot(driver, shots, "research")
        driver.get(base + "/pipelines")
        assert not _errors(driver)
        _shot(driver, shots, "pipelines")
    finally:
        driver.quit()
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(10)
        except subprocess.TimeoutExpired:
            serve.kill()
        stop_daemon(daemon)
    assert serve.returncode in (0, -signal.SIGTERM), (tmp_path / "serve.log").read_text()[-2000:]
    for name in ("overview", "jobs", "job", "ablation", "research"):
        assert (runs / "screenshots" / f"{name}.png").stat().st_size > 10_000
