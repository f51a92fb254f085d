"""`lab serve`: the read-only dashboard. Starlette routes, Jinja2 templates (autoescaped), one
server-sent-events stream per open page, served by uvicorn.

Safety: every method but GET is 405 before anything else runs, so nothing on a page (or a
forged cross-site request) can change the queue; the handlers only call readers. A token, when
set, is checked on every request (a `?token=` that matches also sets an HttpOnly cookie, so the
links and the event stream of that tab carry it); binding anything but a loopback address
requires one. On loopback the Host header must name localhost, so a DNS-rebinding page in the
person's browser cannot read the dashboard. Every page sends a CSP of `default-src 'self'`: no
inline script or style runs, and nothing loads from anywhere but this server.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import re
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markdown_it import MarkdownIt
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

import common
from config import ConfigError
from web import data

HERE = Path(__file__).resolve().parent
COOKIE = "lab_token"
# How often an open page's stream re-reads its view: a progress report (at most two a second per
# job) shows within about this long plus the render.
STREAM_POLL_S = 0.5
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")

# Markdown from the docs and findings: raw HTML is not passed through (html=False escapes it), and
# markdown-it refuses javascript:/vbscript:/data: links on its own.
_md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False}).enable("table")


def _page_link(href: str) -> str:
    """A relative link between the docs (`findings/x.md`, `../ROADMAP.md`) as the dashboard's
    own page for it; anything else unchanged."""
    if re.match(r"^[a-z][a-z0-9+.-]*:|^/|^#", href) or not href.split("#")[0].endswith(".md"):
        return href
    name = href.split("#")[0].rstrip("/").rsplit("/", 1)[-1]
    if name == "ROADMAP.md":
        return "/research"
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}-[\w.-]+\.md", name):
        return f"/research/findings/{name}"
    return href


def render_markdown(text: str) -> Markup:
    tokens = _md.parse(text)
    for t in tokens:
        for child in t.children or []:
            if child.type == "link_open" and isinstance(child.attrs.get("href"), str):
                child.attrs["href"] = _page_link(child.attrs["href"])
    # markdown-it escaped every raw HTML in `text` (html=False), and checked every link
    return Markup(_md.renderer.render(tokens, _md.options, {}))  # noqa: S704


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --- formatting for the templates ----------------------------------------------------------------


def _num(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.{digits}g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.{digits}f}".rstrip("0").rstrip(".")


def _signed(v: Any) -> str:
    return "–" if not isinstance(v, (int, float)) else f"{v:+.3f}"


def _duration(s: Any) -> str:
    return common.duration(s, missing="–")


def _short_time(t: Any) -> str:
    """An ISO time from the store as `2026-12-01 15:22:45Z` (UTC, to the second)."""
    if not isinstance(t, str):
        return "–"
    return t.replace("T", " ").split(".")[0].split("+")[0].rstrip("Z") + "Z"


def templates() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"),
                      autoescape=select_autoescape(["html"], default=True), trim_blocks=True,
                      lstrip_blocks=True)
    env.filters.update(num=_num, signed=_signed, duration=_duration, t=_short_time,
                       markdown=render_markdown)
    return env


# --- pages: each is a view (read in a worker thread) and the templates that show it ---------------


class Page:
    """One page: `read(request)` -> context (blocking reads: run in a thread); `head` is drawn once,
    `live` is drawn at load and again, by the event stream, whenever it changes."""

    def __init__(self, name: str, title: Callable[[dict[str, Any]], str],
                 read: Callable[[Request], dict[str, Any] | None], nav: str, live: bool = True):
        self.name, self.title, self.read, self.nav, self.live = name, title, read, nav, live


def _int(request: Request, key: str, default: int | None = None) -> int | None:
    v = request.query_params.get(key, "")
    try:
        return int(v) if v.strip() else default
    except ValueError:
        raise ConfigError(f"{key}: {v!r} is not a whole number") from None


def _read_overview(request: Request) -> dict[str, Any]:
    return data.overview(request.app.state.open_store(), request.app.state.attention.get)


def _read_jobs(request: Request) -> dict[str, Any]:
    q = request.query_params
    return data.job_page(request.app.state.open_store(), status=q.get("status") or None,
                         kind=q.get("kind") or None, lane=q.get("lane") or None, issue=_int(request, "issue"),
                         page=_int(request, "page", 1) or 1)


def _read_job(request: Request) -> dict[str, Any] | None:
    try:
        return {"job": data.job_detail(request.app.state.open_store(), int(request.path_params["job_id"]))}
    except ConfigError:
        return None


def _read_ablations(request: Request) -> dict[str, Any]:
    return {"runs": data.ablation_runs()}


def _read_ablation(request: Request) -> dict[str, Any] | None:
    abl = data.ablation(request.path_params["run"])
    return None if abl is None else {"a": abl}


def _read_research(request: Request) -> dict[str, Any]:
    roadmap = data.docs_file("ROADMAP.md")
    return {"roadmap": roadmap.read_text(errors="replace") if roadmap else None,
            "findings": data.findings(), "cards": data.cards()}


def _read_finding(request: Request) -> dict[str, Any] | None:
    path = data.docs_file(f"findings/{request.path_params['name']}")
    if path is None:
        return None
    fm, body = data.strip_front_matter(path.read_text(errors="replace"))
    return {"fm": fm, "body": body, "name": path.name}


def _read_pipelines(request: Request) -> dict[str, Any]:
    return {"pipelines": data.pipelines(request.app.state.open_store())}


PAGES = {
    "overview": Page("overview", lambda c: "Lab", _read_overview, "overview"),
    "jobs": Page("jobs", lambda c: f"Jobs ({c['total']})", _read_jobs, "jobs"),
    "job": Page("job", lambda c: f"Job {c['job']['id']} {c['job']['kind']}", _read_job, "jobs"),
    "ablations": Page("ablations", lambda c: "Ablations", _read_ablations, "ablations", live=False),
    "ablation": Page("ablation", lambda c: f"Ablation {c['a']['run']}", _read_ablation, "ablations",
                     live=False),
    "research": Page("research", lambda c: "Research", _read_research, "research", live=False),
    "finding": Page("finding", lambda c: c["fm"].get("title") or c["name"], _read_finding, "research",
                    live=False),
    "pipelines": Page("pipelines", lambda c: "Pipelines", _read_pipelines, "pipelines"),
}


def _page_from_path(path: str) -> tuple[Page, dict[str, str]] | None:
    """The page (and its path parameters) a stream was opened for."""
    parts = [p for p in path.split("/") if p]
    if not parts:
        return PAGES["overview"], {}
    if parts == ["jobs"]:
        return PAGES["jobs"], {}
    if len(parts) == 2 and parts[0] == "jobs" and parts[1].isdigit():
        return PAGES["job"], {"job_id": parts[1]}
    if parts == ["pipelines"]:
        return PAGES["pipelines"], {}
    return None


async def _context(page: Page, request: Request) -> dict[str, Any] | None:
    return await anyio.to_thread.run_sync(page.read, request)


def _html(request: Request, page: Page, ctx: dict[str, Any], status: int = 200) -> HTMLResponse:
    env = request.app.state.env
    live = Markup(env.get_template(f"{page.name}.html").render(**ctx, request=request))  # noqa: S704
    stream = f"{request.url.path}?{request.url.query}" if page.live else ""
    body = env.get_template("base.html").render(title=page.title(ctx), nav=page.nav, live=live,
                                                page_name=page.name, stream=stream, request=request, **ctx)
    return HTMLResponse(body, status_code=status)


def _not_found(request: Request, what: str) -> HTMLResponse:
    env = request.app.state.env
    body = env.get_template("base.html").render(title="Not found", nav="", page_name="missing", stream="",
                                                live=Markup("<p>") + what + Markup("</p>"), request=request)
    return HTMLResponse(body, status_code=404)


def _handler(name: str) -> Callable[[Request], Any]:
    page = PAGES[name]

    async def handle(request: Request) -> Response:
        try:
            ctx = await _context(page, request)
        except ConfigError as e:
            return PlainTextResponse(str(e), status_code=400)
        if ctx is None:
            return _not_found(request, f"nothing at {request.url.path}")
        return _html(request, page, ctx)

    return handle


async def stream(request: Request) -> Response:
    """Server-sent events for one open page: its live part as HTML (rendered here, escaped by
    the same templates) whenever it changes, and a job's curves as JSON for its chart."""
    target = request.query_params.get("page", "/")
    path, _, query = target.partition("?")
    found = _page_from_path(path)
    if found is None:
        return PlainTextResponse("no live page there", status_code=404)
    page, params = found
    # A request for the page itself, as it was loaded: the same reader, the same template.
    scope = {**request.scope, "path": path, "query_string": query.encode(), "path_params": params}
    inner = Request(scope, request.receive)
    env = request.app.state.env

    async def events() -> AsyncIterator[str]:
        last_html = last_curves = ""
        yield "retry: 1000\n\n"
        while not await request.is_disconnected():
            try:
                ctx = await _context(page, inner)
            except Exception as e:  # a failed read (a locked or moved database) must not end the stream
                ctx = None
                yield f"event: problem\ndata: {json.dumps(f'{type(e).__name__}: {e}')}\n\n"
            if ctx is not None:
                html = env.get_template(f"{page.name}.html").render(**ctx, request=inner)
                digest = hashlib.sha256(html.encode()).hexdigest()
                if digest != last_html:
                    last_html = digest
                    yield f"event: live\ndata: {json.dumps(html)}\n\n"
                if page.name == "job":
                    c = json.dumps(await anyio.to_thread.run_sync(data.curves, ctx["job"].get("run_dir")))
                    if c != last_curves:
                        last_curves = c
                        yield f"event: curves\ndata: {c}\n\n"
            await asyncio.sleep(STREAM_POLL_S)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


async def job_curves(request: Request) -> Response:
    ctx = await _context(PAGES["job"], request)
    if ctx is None:
        return JSONResponse({"error": "no such job"}, status_code=404)
    return JSONResponse(await anyio.to_thread.run_sync(data.curves, ctx["job"].get("run_dir")))


async def job_file(request: Request) -> Response:
    ctx = await _context(PAGES["job"], request)
    path = None if ctx is None else data.run_file(ctx["job"].get("run_dir"), request.path_params["name"])
    if path is None:
        return PlainTextResponse("no such file", status_code=404)
    if path.suffix in data.IMAGE_SUFFIXES:
        return FileResponse(path, media_type="image/png")
    # Text as text/plain with nosniff: a log line holding HTML is shown, never run.
    return FileResponse(path, media_type="text/plain; charset=utf-8")


async def ablation_png(request: Request) -> Response:
    run = request.path_params["run"]
    path = None if "/" in run or run.startswith(".") else data.run_file(
        str(data.records.runs_root() / run), "accuracy.png")
    if path is None:
        return PlainTextResponse("no such plot", status_code=404)
    return FileResponse(path, media_type="image/png")


async def api_status(request: Request) -> Response:
    ctx = await _context(PAGES["overview"], request)
    return JSONResponse(json.loads(json.dumps(ctx, default=str)))


# --- the guard in front of every request ---------------------------------------------------------


def _host_name(header: str) -> str:
    """The name in a Host header without its port: `localhost:8008` -> localhost, `[::1]:8008` -> [::1]."""
    if header.startswith("["):
        return header.split("]", 1)[0] + "]"
    return header.rsplit(":", 1)[0]


class Guard:
    """GET only; the Host check on loopback; the token on every request when one is set."""

    def __init__(self, app: ASGIApp, token: str | None, loopback: bool):
        self.app, self.token, self.loopback = app, token, loopback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if request.method != "GET":
            await PlainTextResponse("read-only: GET only", status_code=405, headers={"Allow": "GET"})(
                scope, receive, send)
            return
        host = _host_name(request.headers.get("host") or "")
        if self.loopback and host not in LOOPBACK_NAMES:
            await PlainTextResponse(f"unexpected Host {host!r}", status_code=421)(scope, receive, send)
            return
        set_cookie = False
        if self.token is not None:
            given = request.query_params.get("token")
            auth = request.headers.get("authorization", "")
            candidates = [given, auth[7:] if auth.lower().startswith("bearer ") else None,
                          request.cookies.get(COOKIE)]
            if not any(c is not None and hmac.compare_digest(c.encode(), self.token.encode())
                       for c in candidates):
                await PlainTextResponse("a token is required: open the URL `lab serve` printed "
                                        "(…?token=...) or send Authorization: Bearer", status_code=401)(
                    scope, receive, send)
                return
            set_cookie = given is not None

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"content-security-policy", CSP.encode()),
                            (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                            (b"x-frame-options", b"DENY")]
                if set_cookie and self.token is not None:
                    headers.append((b"set-cookie", f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; "
                                                   "Path=/".encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(token: str | None = None, loopback: bool = True,
               open_store: Callable[[], Any] | None = None) -> ASGIApp:
    routes = [
        Route("/", _handler("overview")),
        Route("/jobs", _handler("jobs")),
        Route("/jobs/{job_id:int}", _handler("job")),
        Route("/jobs/{job_id:int}/curves.json", job_curves),
        Route("/jobs/{job_id:int}/files/{name}", job_file),
        Route("/ablations", _handler("ablations")),
        Route("/ablations/{run}", _handler("ablation")),
        Route("/ablations/{run}/accuracy.png", ablation_png),
        Route("/research", _handler("research")),
        Route("/research/findings/{name}", _handler("finding")),
        Route("/pipelines", _handler("pipelines")),
        Route("/stream", stream),
        Route("/api/status.json", api_status),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes)
    app.state.env = templates()
    if open_store is None:
        # One Store (one engine, one connection pool) for the server's life, opened on first use.
        cache: list[Any] = []

        def open_store() -> Any:
            if not cache:
                cache.append(data.open_store())
            return cache[0]

    app.state.open_store = open_store
    app.state.attention = data.Stale(lambda: data.attention.needs_attention(open_store()), ttl=2.0)
    return Guard(app, token, loopback)


def check_bind(host: str, token: str | None) -> None:
    if not is_loopback(host) and not token:
        raise ConfigError(f"--host: binding {host} lets anyone who reaches this machine read the lab; "
                          "give --token (or LAB_SERVE_TOKEN), or use an SSH tunnel to 127.0.0.1 "
                          "(ssh -L 8008:localhost:8008 box)")


def bind(host: str, port: int) -> socket.socket:
    """Bound before uvicorn starts, so `--port 0` prints the real port and a busy port is an
    error at once, with the address in it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"--port: cannot listen on {host}:{port} ({e.strerror})") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_of(host: str, port: int, token: str | None) -> str:
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def serve(sock: socket.socket, token: str | None, loopback: bool) -> None:
    import uvicorn

    config = uvicorn.Config(create_app(token, loopback), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=1, lifespan="off")
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        sys.stdout.flush()
