"""A stand-in GitHub REST API for tests: a real HTTP server on 127.0.0.1 in a thread.

It speaks the part of the API the bridge uses, with GitHub's JSON shapes and status codes:
the authenticated user (`/user`), the repository, issues (pull requests included, with their
`pull_request` key), issue comments, labels (repository and issue), issue events (`labeled` with
its actor), collaborator permission and `/rate_limit`. Lists paginate with `per_page`/`page`
and `Link` headers; GETs carry an ETag and answer `If-None-Match` with 304 (which, as on GitHub,
costs no rate limit); every response carries the `X-RateLimit-*` headers and an exhausted budget
answers 403 "API rate limit exceeded". `GET /rate_limit` is free, as on GitHub, and answers even
when the budget is spent. `PUT .../issues/N/labels` sets an issue's whole label set.

Faults on demand: with probability `fault_rate` a request fails as one of `fault_kinds`:
  error              5xx before anything is applied
  timeout            sleep past the client's timeout, nothing applied
  ambiguous_error    the write IS applied, then a 502 (the caller cannot tell)
  ambiguous_timeout  the write IS applied, then sleep past the client's timeout
  secondary_rate     403 "secondary rate limit" with Retry-After
`hold(...)` parks one matching request until `release()` (after applying it, or before: then it
is dropped unapplied), so a test can kill a client at an exact moment. Every request is recorded
in `requests`.

Test helpers change the world as people would (open, label, comment, close) and return what
GitHub would show; they never go through HTTP, so they are never faulted.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

COMMENT_LIMIT = 65_536
FAULT_KINDS = ("error", "timeout", "ambiguous_error", "ambiguous_timeout", "secondary_rate")
# GitHub's `permission` field folds maintain into write and triage into read; `role_name` keeps them.
ROLE_TO_PERMISSION = {"admin": "admin", "maintain": "write", "write": "write", "triage": "read",
                      "read": "read"}


def _now_iso(t: float) -> str:
    return datetime.fromtimestamp(int(t), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_iso(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.headers = status, headers or {}
        self.body = {"message": message, "documentation_url": "https://docs.github.com/rest", **extra}


@dataclass
class RequestRecord:
    method: str
    path: str
    query: str
    status: int = 0
    fault: str | None = None
    applied: bool = False  # a write that changed the world
    at: float = field(default_factory=time.time)


@dataclass
class _Hold:
    method: str
    pattern: re.Pattern[str]
    after_apply: bool
    body_contains: str | None
    reached: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)
    used: bool = False


class FakeGitHub:
    """The stand-in. `with FakeGitHub(token) as gh:`; point clients at `gh.url`."""

    def __init__(self, token: str, repo: str = "lab/reasoning-lab", bot: str = "lab-bot",
                 seed: int = 0, rate_limit: int = 5000, rate_window_s: float = 3600.0):
        self.token, self.repo, self.bot = token, repo, bot
        self.owner = repo.split("/")[0]
        self.lock = threading.RLock()
        self.rng = random.Random(seed)
        self.fault_rate = 0.0
        self.fault_kinds: tuple[str, ...] = FAULT_KINDS
        self.timeout_sleep = 1.5  # longer than the client's timeout in tests
        self.retry_after = 1
        self.rate_limit, self.rate_window_s = rate_limit, rate_window_s
        self.rate_remaining, self.rate_reset = rate_limit, time.time() + rate_window_s
        self.requests: list[RequestRecord] = []
        self.holds: list[_Hold] = []
        self.forced: list[list[Any]] = []  # [method, pattern, kind, times left]
        self._ids = 1000
        # the world
        self.users: dict[str, str] = {self.owner: "admin", bot: "write"}  # login -> role
        self.known_users: set[str] = set(self.users)
        self.labels: dict[str, dict[str, Any]] = {}  # lower name -> label
        self.issues: dict[int, dict[str, Any]] = {}
        self.comments: dict[int, dict[str, Any]] = {}  # id -> comment (with "_issue")
        self.events: dict[int, list[dict[str, Any]]] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> FakeGitHub:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.app = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> FakeGitHub:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- fault and inspection controls ----------------------------------------------------

    def hold(self, method: str, path_regex: str, after_apply: bool = True, body_contains: str | None = None
             ) -> _Hold:
        """Park the next matching request until `release()`; `.reached` is set when it arrives."""
        h = _Hold(method, re.compile(path_regex), after_apply, body_contains)
        with self.lock:
            self.holds.append(h)
        return h

    def force_fault(self, method: str, path_regex: str, kind: str, times: int = 1) -> None:
        """The next `times` matching requests fail as `kind`, whatever the fault rate."""
        assert kind in FAULT_KINDS, kind
        with self.lock:
            self.forced.append([method, re.compile(path_regex), kind, times])

    def release(self) -> None:
        with self.lock:
            for h in self.holds:
                h.released.set()
            self.holds = []

    def count(self, method: str | None = None, path: str | None = None, fault: bool | None = None) -> int:
        with self.lock:
            return sum(1 for r in self.requests
                       if (method is None or r.method == method) and (path is None or re.search(path, r.path))
                       and (fault is None or (r.fault is not None) == fault))

    # ---- the world, as people change it ------------------------------------------------------

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    def add_user(self, login: str, role: str | None) -> None:
        """A GitHub account; `role` None = not a collaborator (a stranger)."""
        with self.lock:
            self.known_users.add(login)
            if role is None:
                self.users.pop(login, None)
            else:
                self.users[login] = role

    def create_label(self, name: str, color: str = "ededed", description: str = "") -> dict[str, Any]:
        with self.lock:
            url = f"{self.url}/repos/{self.repo}/labels/" + urllib.parse.quote(name)
            lab = {"id": self._next_id(), "node_id": f"LA_{name}", "url": url, "name": name, "color": color,
                   "default": False, "description": description or None}
            self.labels[name.lower()] = lab
            return lab

    def open_issue(self, title: str, body: str, labels: tuple[str, ...] = (), user: str = "alice",
                   pull_request: bool = False) -> int:
        with self.lock:
            self.known_users.add(user)
            number = len(self.issues) + 1
            now = time.time()
            issue = {"number": number, "id": self._next_id(), "title": title, "body": body, "state": "open",
                     "user": user, "labels": [], "created_at": now, "updated_at": now, "closed_at": None,
                     "pull_request": pull_request, "comments": 0, "last_edited_at": None, "editor": None}
            self.issues[number] = issue
            self.events[number] = []
            for name in labels:
                self._add_label(issue, name, user)
            return number

    def label(self, number: int, name: str, actor: str) -> None:
        with self.lock:
            self._add_label(self.issues[number], name, actor)

    def unlabel(self, number: int, name: str, actor: str) -> None:
        with self.lock:
            self._remove_label(self.issues[number], name, actor)

    def close(self, number: int, actor: str = "alice") -> None:
        with self.lock:
            issue = self.issues[number]
            issue["state"], issue["closed_at"] = "closed", time.time()
            self._event(issue, "closed", actor)

    def edit_body(self, number: int, body: str, editor: str | None = None) -> None:
        """An edit of the issue body (by its author unless `editor` says who): GitHub records
        when and by whom (GraphQL `lastEditedAt`, `editor`); no REST event says it."""
        with self.lock:
            issue = self.issues[number]
            self._set_body(issue, body, editor or issue["user"])

    def _set_body(self, issue: dict[str, Any], body: str, editor: str) -> None:
        issue["body"], issue["last_edited_at"], issue["editor"] = body, time.time(), editor
        self._touch(issue)

    def comment(self, number: int, body: str, user: str) -> int:
        with self.lock:
            self.known_users.add(user)
            return self._create_comment(self.issues[number], body, user)["id"]

    def comments_on(self, number: int) -> list[dict[str, Any]]:
        with self.lock:
            return [self._comment_json(c) for c in self.comments.values() if c["_issue"] == number]

    def labels_on(self, number: int) -> list[str]:
        with self.lock:
            return list(self.issues[number]["labels"])

    # ---- mutations shared by helpers and the API ---------------------------------------------

    def _touch(self, issue: dict[str, Any]) -> None:
        issue["updated_at"] = time.time()

    def _event(self, issue: dict[str, Any], kind: str, actor: str, label: str | None = None) -> None:
        ev: dict[str, Any] = {"id": self._next_id(), "event": kind, "actor": actor, "created_at": time.time()}
        if label is not None:
            ev["label"] = label
        self.events[issue["number"]].append(ev)
        self._touch(issue)

    def _add_label(self, issue: dict[str, Any], name: str, actor: str) -> None:
        if name.lower() not in self.labels:
            self.create_label(name)
        canonical = self.labels[name.lower()]["name"]
        if canonical not in issue["labels"]:
            issue["labels"].append(canonical)
            self._event(issue, "labeled", actor, canonical)

    def _remove_label(self, issue: dict[str, Any], name: str, actor: str) -> bool:
        for have in issue["labels"]:
            if have.lower() == name.lower():
                issue["labels"].remove(have)
                self._event(issue, "unlabeled", actor, have)
                return True
        return False

    def _create_comment(self, issue: dict[str, Any], body: str, user: str) -> dict[str, Any]:
        now = time.time()
        c = {"id": self._next_id(), "body": body, "user": user, "created_at": now, "updated_at": now,
             "_issue": issue["number"]}
        self.comments[c["id"]] = c
        issue["comments"] += 1
        self._touch(issue)
        return c

    # ---- JSON shapes (as GitHub's REST API returns them) ---------------------------------------

    def _api(self, path: str) -> str:
        return f"{self.url}{path}"

    def _user_json(self, login: str) -> dict[str, Any]:
        uid = int(hashlib.sha1(login.encode()).hexdigest()[:7], 16)
        return {"login": login, "id": uid, "node_id": f"U_{uid}", "avatar_url": "",
                "url": self._api(f"/users/{login}"), "html_url": f"https://github.com/{login}",
                "type": "Bot" if login == self.bot else "User", "site_admin": False}

    def _label_json(self, name: str) -> dict[str, Any]:
        return dict(self.labels[name.lower()])

    def _issue_json(self, issue: dict[str, Any]) -> dict[str, Any]:
        n = issue["number"]
        base = f"/repos/{self.repo}/issues/{n}"
        out = {
            "url": self._api(base), "repository_url": self._api(f"/repos/{self.repo}"),
            "labels_url": self._api(base + "/labels{/name}"), "comments_url": self._api(base + "/comments"),
            "events_url": self._api(base + "/events"),
            "html_url": f"https://github.com/{self.repo}/{'pull' if issue['pull_request'] else 'issues'}/{n}",
            "id": issue["id"], "node_id": f"I_{issue['id']}", "number": n, "title": issue["title"],
            "user": self._user_json(issue["user"]), "labels": [self._label_json(x) for x in issue["labels"]],
            "state": issue["state"], "state_reason": "completed" if issue["state"] == "closed" else None,
            "locked": False, "assignee": None, "assignees": [], "milestone": None,
            "comments": issue["comments"],
            "created_at": _now_iso(issue["created_at"]), "updated_at": _now_iso(issue["updated_at"]),
            "closed_at": _now_iso(issue["closed_at"]) if issue["closed_at"] else None,
            "author_association": "OWNER" if issue["user"] == self.owner else "NONE", "body": issue["body"],
        }
        if issue["pull_request"]:
            pr = f"/repos/{self.repo}/pulls/{n}"
            out["pull_request"] = {"url": self._api(pr), "html_url": f"https://github.com/{self.repo}/pull/{n}",
                                   "diff_url": f"https://github.com/{self.repo}/pull/{n}.diff",
                                   "patch_url": f"https://github.com/{self.repo}/pull/{n}.patch",
                                   "merged_at": None}
        return out

    def _comment_json(self, c: dict[str, Any]) -> dict[str, Any]:
        n = c["_issue"]
        return {"url": self._api(f"/repos/{self.repo}/issues/comments/{c['id']}"),
                "html_url": f"https://github.com/{self.repo}/issues/{n}#issuecomment-{c['id']}",
                "issue_url": self._api(f"/repos/{self.repo}/issues/{n}"), "id": c["id"],
                "node_id": f"IC_{c['id']}",
                "user": self._user_json(c["user"]), "created_at": _now_iso(c["created_at"]),
                "updated_at": _now_iso(c["updated_at"]), "author_association": "NONE", "body": c["body"]}

    def _event_json(self, n: int, ev: dict[str, Any]) -> dict[str, Any]:
        out = {"id": ev["id"], "node_id": f"LE_{ev['id']}",
               "url": self._api(f"/repos/{self.repo}/issues/events/{ev['id']}"),
               "actor": self._user_json(ev["actor"]), "event": ev["event"], "commit_id": None,
               "commit_url": None,
               "created_at": _now_iso(ev["created_at"]), "performed_via_github_app": None}
        if "label" in ev:
            out["label"] = {"name": ev["label"], "color": self.labels[ev["label"].lower()]["color"]}
        return out

    def _repo_json(self) -> dict[str, Any]:
        owner, name = self.repo.split("/")
        return {"id": 1, "node_id": "R_1", "name": name, "full_name": self.repo, "private": False,
                "owner": self._user_json(owner), "html_url": f"https://github.com/{self.repo}",
                "url": self._api(f"/repos/{self.repo}"),
                "issues_url": self._api(f"/repos/{self.repo}/issues{{/number}}"),
                "labels_url": self._api(f"/repos/{self.repo}/labels{{/name}}"), "has_issues": True,
                "open_issues_count": sum(1 for i in self.issues.values() if i["state"] == "open"),
                "default_branch": "main", "permissions": {"admin": False, "push": True, "pull": True}}

    # ---- request handling ----------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, headers: dict[str, str], body: bytes
               ) -> tuple[int, dict[str, str], bytes, float]:
        """One request -> (status, headers, body, seconds to sleep before answering)."""
        parsed = urllib.parse.urlsplit(raw_path)
        path, query = parsed.path, urllib.parse.parse_qs(parsed.query)
        rec = RequestRecord(method, path, parsed.query)
        with self.lock:
            self.requests.append(rec)
        out_headers: dict[str, str] = {"Content-Type": "application/json; charset=utf-8"}
        delay = 0.0
        try:
            if headers.get("authorization", "") not in (f"token {self.token}", f"Bearer {self.token}"):
                raise ApiError(401, "Bad credentials")
            fault = self._draw_fault(method, path)
            rec.fault = fault
            if fault == "error":
                raise ApiError(self.rng.choice((500, 502, 503)), "Server Error")
            if fault == "timeout":
                raise _Sleep(self.timeout_sleep, ApiError(502, "Server Error"))
            if fault == "secondary_rate":
                raise ApiError(403, "You have exceeded a secondary rate limit. Please wait a few minutes "
                               "before you try again.", {"Retry-After": str(self.retry_after)})
            if path != "/rate_limit":  # as on GitHub, asking for the rate limit costs none of it
                self._spend_rate(method, headers)
            hold = self._match_hold(method, path, body)
            if hold and not hold.after_apply:
                self._park(hold)  # then drop it: the client is gone before anything was applied
                raise ApiError(502, "Server Error")
            status, payload, extra = self._route(method, path, query, body, rec)
            rec.applied = method != "GET"
            if hold and hold.after_apply:
                self._park(hold)
            if fault == "ambiguous_error":
                raise ApiError(502, "Server Error")
            if fault == "ambiguous_timeout":
                delay = self.timeout_sleep
            data = b"" if payload is None else json.dumps(payload).encode()
            out_headers.update(extra)
            if method == "GET" and status == 200:
                etag = 'W/"' + hashlib.sha256(data).hexdigest()[:32] + '"'
                out_headers["ETag"] = etag
                if headers.get("if-none-match") == etag:
                    self._refund_rate()  # a 304 costs nothing on GitHub
                    status, data = 304, b""
        except _Sleep as s:
            delay, err = s.seconds, s.error
            status, data = err.status, json.dumps(err.body).encode()
            out_headers.update(err.headers)
        except ApiError as err:
            status, data = err.status, json.dumps(err.body).encode()
            out_headers.update(err.headers)
        out_headers.update(self._rate_headers())
        rec.status = status
        return status, out_headers, data, delay

    def _draw_fault(self, method: str, path: str) -> str | None:
        with self.lock:
            for f in self.forced:
                if f[3] > 0 and f[0] == method and f[1].search(path):
                    f[3] -= 1
                    return f[2]
            if self.fault_rate and self.rng.random() < self.fault_rate:
                return self.rng.choice(self.fault_kinds)
        return None

    def _match_hold(self, method: str, path: str, body: bytes) -> _Hold | None:
        with self.lock:
            for h in self.holds:
                if not h.used and h.method == method and h.pattern.search(path) \
                        and (h.body_contains is None or h.body_contains.encode() in body):
                    h.used = True
                    return h
        return None

    def _park(self, hold: _Hold) -> None:
        hold.reached.set()
        hold.released.wait(60)

    def _roll_window(self) -> None:
        """A new window once the reset time has passed: the full budget again."""
        with self.lock:
            now = time.time()
            if now >= self.rate_reset:
                self.rate_remaining, self.rate_reset = self.rate_limit, now + self.rate_window_s

    def _spend_rate(self, method: str, headers: dict[str, str]) -> None:
        with self.lock:
            self._roll_window()
            if self.rate_remaining <= 0:
                raise ApiError(403, "API rate limit exceeded for user ID 1. If you reach out to GitHub "
                               "Support for help, please include the request ID.",
                               {"X-RateLimit-Remaining": "0"})
            self.rate_remaining -= 1

    def _refund_rate(self) -> None:
        with self.lock:
            self.rate_remaining = min(self.rate_limit, self.rate_remaining + 1)

    def _rate_headers(self) -> dict[str, str]:
        with self.lock:
            return {"X-RateLimit-Limit": str(self.rate_limit),
                    "X-RateLimit-Remaining": str(self.rate_remaining),
                    "X-RateLimit-Reset": str(int(self.rate_reset) + 1), "X-RateLimit-Resource": "core",
                    "X-RateLimit-Used": str(self.rate_limit - self.rate_remaining)}

    # ---- routes ----------------------------------------------------------------------------------

    def _route(self, method: str, path: str, query: dict[str, list[str]], body: bytes, rec: RequestRecord
               ) -> tuple[int, Any, dict[str, str]]:
        q = {k: v[-1] for k, v in query.items()}
        data = json.loads(body) if body else None
        with self.lock:
            if path == "/user" and method == "GET":  # the token's own account
                return 200, self._user_json(self.bot), {}
            if path == "/graphql" and method == "POST":
                return self._graphql(data)
            if path == "/rate_limit" and method == "GET":
                self._roll_window()
                core = {"limit": self.rate_limit, "remaining": self.rate_remaining,
                        "reset": int(self.rate_reset) + 1, "used": self.rate_limit - self.rate_remaining,
                        "resource": "core"}
                return 200, {"resources": {"core": core}, "rate": core}, {}
            prefix = f"/repos/{self.repo}"
            if not (path == prefix or path.startswith(prefix + "/")):
                raise ApiError(404, "Not Found")
            rest = path[len(prefix):]
            for pattern, verb, fn in self._routes():
                m = re.fullmatch(pattern, rest)
                if m and verb == method:
                    return fn(q, data, *m.groups())
            if any(re.fullmatch(p, rest) for p, _, _ in self._routes()):
                raise ApiError(404, "Not Found")  # GitHub answers an unsupported verb with 404
            raise ApiError(404, "Not Found")

    def _routes(self) -> list[tuple[str, str, Any]]:
        return [
            (r"", "GET", lambda q, d: (200, self._repo_json(), {})),
            (r"/issues", "GET", self._list_issues),
            (r"/issues/(\d+)", "GET", lambda q, d, n: (200, self._issue_json(self._issue(n)), {})),
            (r"/issues/(\d+)", "PATCH", self._edit_issue),
            (r"/issues/(\d+)/comments", "GET", self._list_comments),
            (r"/issues/(\d+)/comments", "POST", self._post_comment),
            (r"/issues/comments/(\d+)", "GET",
             lambda q, d, i: (200, self._comment_json(self._comment(i)), {})),
            (r"/issues/comments/(\d+)", "PATCH", self._edit_comment),
            (r"/issues/(\d+)/labels", "GET", lambda q, d, n: self._page(
                q, [self._label_json(x) for x in self._issue(n)["labels"]], f"/issues/{n}/labels")),
            (r"/issues/(\d+)/labels", "POST", self._add_issue_labels),
            (r"/issues/(\d+)/labels", "PUT", self._set_issue_labels),
            (r"/issues/(\d+)/labels/([^/]+)", "DELETE", self._remove_issue_label),
            (r"/issues/(\d+)/events", "GET", lambda q, d, n: self._page(
                q, [self._event_json(int(n), e) for e in self.events[self._issue(n)["number"]]],
                f"/issues/{n}/events")),
            (r"/labels", "GET", lambda q, d: self._page(q, list(self.labels.values()), "/labels")),
            (r"/labels", "POST", self._create_label_api),
            (r"/labels/([^/]+)", "GET", lambda q, d, name: (200, self._repo_label(name), {})),
            (r"/labels/([^/]+)", "PATCH", self._update_label),
            (r"/collaborators/([^/]+)/permission", "GET", self._permission),
        ]

    # The one GraphQL query the bridge sends: an issue's body with its last edit (time and editor),
    # which GitHub's REST API does not expose. Answered in GraphQL's shapes: 200 with `data`, and
    # `errors` of type NOT_FOUND for an issue that does not exist.
    GRAPHQL_ISSUE = re.compile(
        r"repository\(owner:\s*\$owner,\s*name:\s*\$name\)\s*\{\s*issue\(number:\s*\$number\)")

    def _graphql(self, d: Any) -> tuple[int, Any, dict[str, str]]:
        query, variables = (d or {}).get("query") or "", (d or {}).get("variables") or {}
        if not self.GRAPHQL_ISSUE.search(query):
            return 200, {"errors": [{"message": "the stand-in answers only the bridge's issue query"}]}, {}
        owner, name = self.repo.split("/")
        issue = self.issues.get(variables.get("number")) if (variables.get("owner"), variables.get("name")) \
            == (owner, name) else None
        if issue is None:
            return 200, {"data": {"repository": {"issue": None}}, "errors": [{
                "type": "NOT_FOUND", "path": ["repository", "issue"],
                "message": f"Could not resolve to an Issue with the number of {variables.get('number')}.",
            }]}, {}
        node = {"number": issue["number"], "body": issue["body"], "createdAt": _now_iso(issue["created_at"]),
                "lastEditedAt": _now_iso(issue["last_edited_at"]) if issue["last_edited_at"] else None,
                "editor": {"login": issue["editor"]} if issue["editor"] else None,
                "author": {"login": issue["user"]}}
        return 200, {"data": {"repository": {"issue": node}}}, {}

    def _issue(self, n: str | int) -> dict[str, Any]:
        issue = self.issues.get(int(n))
        if issue is None:
            raise ApiError(404, "Not Found")
        return issue

    def _comment(self, i: str) -> dict[str, Any]:
        c = self.comments.get(int(i))
        if c is None:
            raise ApiError(404, "Not Found")
        return c

    def _repo_label(self, name: str) -> dict[str, Any]:
        lab = self.labels.get(urllib.parse.unquote(name).lower())
        if lab is None:
            raise ApiError(404, "Not Found")
        return dict(lab)

    def _page(self, q: dict[str, str], items: list[Any], rest: str, params: dict[str, str] | None = None
              ) -> tuple[int, Any, dict[str, str]]:
        """GitHub pagination: `per_page` (default 30, max 100), `page`, and a Link header."""
        try:
            per_page = max(1, min(100, int(q.get("per_page", 30))))
            page = max(1, int(q.get("page", 1)))
        except ValueError:
            raise ApiError(422, "Validation Failed") from None
        last = max(1, -(-len(items) // per_page))
        chunk = items[(page - 1) * per_page: page * per_page]
        keep = {k: v for k, v in q.items() if k not in ("page", "per_page")}

        def link(p: int) -> str:
            qs = urllib.parse.urlencode({**keep, "per_page": per_page, "page": p})
            return f"<{self.url}/repos/{self.repo}{rest}?{qs}>"

        rels = []
        if page < last:
            rels += [f'{link(page + 1)}; rel="next"', f'{link(last)}; rel="last"']
        if page > 1:
            rels = [f'{link(page - 1)}; rel="prev"', f'{link(1)}; rel="first"'] + rels
        return 200, chunk, ({"Link": ", ".join(rels)} if rels else {})

    def _list_issues(self, q: dict[str, str], d: Any) -> tuple[int, Any, dict[str, str]]:
        state = q.get("state", "open")
        if state not in ("open", "closed", "all"):
            raise ApiError(422, "Validation Failed")
        wanted = [x.strip().lower() for x in q.get("labels", "").split(",") if x.strip()]
        since = _parse_iso(q["since"]) if "since" in q else None
        items = [i for i in self.issues.values()
                 if (state == "all" or i["state"] == state)
                 and all(w in [x.lower() for x in i["labels"]] for w in wanted)
                 and (since is None or int(i["updated_at"]) >= since)]
        sort = q.get("sort", "created")
        key = {"created": "created_at", "updated": "updated_at", "comments": "comments"}.get(sort)
        if key is None:
            raise ApiError(422, "Validation Failed")
        items.sort(key=lambda i: (i[key], i["number"]), reverse=q.get("direction", "desc") == "desc")
        return self._page(q, [self._issue_json(i) for i in items], "/issues")

    def _edit_issue(self, q: dict[str, str], d: Any, n: str) -> tuple[int, Any, dict[str, str]]:
        issue = self._issue(n)
        d = d or {}
        if "body" in d:
            self._set_body(issue, d["body"], self.bot)
        if "title" in d:
            issue["title"] = d["title"]
        if d.get("state") in ("open", "closed") and d["state"] != issue["state"]:
            issue["state"] = d["state"]
            issue["closed_at"] = time.time() if d["state"] == "closed" else None
            self._event(issue, d["state"] if d["state"] == "closed" else "reopened", self.bot)
        self._touch(issue)
        return 200, self._issue_json(issue), {}

    def _list_comments(self, q: dict[str, str], d: Any, n: str) -> tuple[int, Any, dict[str, str]]:
        issue = self._issue(n)
        since = _parse_iso(q["since"]) if "since" in q else None
        items = [self._comment_json(c) for c in self.comments.values()
                 if c["_issue"] == issue["number"] and (since is None or int(c["updated_at"]) >= since)]
        return self._page(q, items, f"/issues/{n}/comments")

    def _check_body(self, d: Any) -> str:
        body = (d or {}).get("body")
        if not isinstance(body, str) or not body:
            raise ApiError(422, "Validation Failed", errors=[{"resource": "IssueComment",
                                                               "code": "missing_field", "field": "body"}])
        if len(body) > COMMENT_LIMIT:
            raise ApiError(422, "Validation Failed", errors=[{
                "resource": "IssueComment", "code": "unprocessable", "field": "data",
                "message": f"Body is too long (maximum is {COMMENT_LIMIT} characters)"}])
        return body

    def _post_comment(self, q: dict[str, str], d: Any, n: str) -> tuple[int, Any, dict[str, str]]:
        issue = self._issue(n)
        c = self._create_comment(issue, self._check_body(d), self.bot)
        return 201, self._comment_json(c), {"Location": self._comment_json(c)["url"]}

    def _edit_comment(self, q: dict[str, str], d: Any, i: str) -> tuple[int, Any, dict[str, str]]:
        c = self._comment(i)
        c["body"], c["updated_at"] = self._check_body(d), time.time()
        self._touch(self.issues[c["_issue"]])
        return 200, self._comment_json(c), {}

    def _label_names(self, d: Any) -> list[str]:
        names = d.get("labels") if isinstance(d, dict) else d
        if not isinstance(names, list) or not all(isinstance(x, str) for x in names):
            raise ApiError(422, "Invalid request.")
        return names

    def _add_issue_labels(self, q: dict[str, str], d: Any, n: str) -> tuple[int, Any, dict[str, str]]:
        issue = self._issue(n)
        for name in self._label_names(d):
            self._add_label(issue, name, self.bot)
        return 200, [self._label_json(x) for x in issue["labels"]], {}

    def _set_issue_labels(self, q: dict[str, str], d: Any, n: str) -> tuple[int, Any, dict[str, str]]:
        issue = self._issue(n)
        names = self._label_names(d)
        for have in list(issue["labels"]):
            if have.lower() not in [x.lower() for x in names]:
                self._remove_label(issue, have, self.bot)
        for name in names:
            self._add_label(issue, name, self.bot)
        return 200, [self._label_json(x) for x in issue["labels"]], {}

    def _remove_issue_label(self, q: dict[str, str], d: Any, n: str, name: str
                            ) -> tuple[int, Any, dict[str, str]]:
        issue = self._issue(n)
        if not self._remove_label(issue, urllib.parse.unquote(name), self.bot):
            raise ApiError(404, "Label does not exist")
        return 200, [self._label_json(x) for x in issue["labels"]], {}

    def _valid_color(self, color: Any) -> str:
        if not isinstance(color, str) or not re.fullmatch(r"[0-9a-fA-F]{6}", color):
            raise ApiError(422, "Validation Failed", errors=[{"resource": "Label", "code": "invalid",
                                                               "field": "color"}])
        return color.lower()

    def _create_label_api(self, q: dict[str, str], d: Any) -> tuple[int, Any, dict[str, str]]:
        d = d or {}
        name = d.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(422, "Validation Failed", errors=[{"resource": "Label", "code": "missing_field",
                                                               "field": "name"}])
        if name.lower() in self.labels:
            raise ApiError(422, "Validation Failed", errors=[{"resource": "Label", "code": "already_exists",
                                                               "field": "name"}])
        lab = self.create_label(name, self._valid_color(d.get("color", "ededed")), d.get("description") or "")
        return 201, dict(lab), {}

    def _update_label(self, q: dict[str, str], d: Any, name: str) -> tuple[int, Any, dict[str, str]]:
        lab = self.labels.get(urllib.parse.unquote(name).lower())
        if lab is None:
            raise ApiError(404, "Not Found")
        d = d or {}
        if "color" in d:
            lab["color"] = self._valid_color(d["color"])
        if "description" in d:
            lab["description"] = d["description"] or None
        if d.get("new_name"):
            del self.labels[lab["name"].lower()]
            lab["name"] = d["new_name"]
            self.labels[lab["name"].lower()] = lab
        return 200, dict(lab), {}

    def _permission(self, q: dict[str, str], d: Any, login: str) -> tuple[int, Any, dict[str, str]]:
        login = urllib.parse.unquote(login)
        if login not in self.known_users:
            raise ApiError(404, "Not Found")
        role = self.users.get(login, "read")  # a public repository: strangers can read
        perm = ROLE_TO_PERMISSION[role]
        user = self._user_json(login)
        user["permissions"] = {"admin": perm == "admin", "maintain": role in ("admin", "maintain"),
                               "push": perm in ("admin", "write"), "triage": role != "read", "pull": True}
        return 200, {"permission": perm, "role_name": role, "user": user}, {}


class _Sleep(Exception):
    def __init__(self, seconds: float, error: ApiError):
        self.seconds, self.error = seconds, error


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # One write per response and no Nagle delay: otherwise each keep-alive request waits ~40 ms
    # for a delayed ACK between the header and body writes.
    wbufsize = 1 << 16
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        app: FakeGitHub = self.server.app  # type: ignore[attr-defined]
        status, out_headers, data, delay = app.handle(self.command, self.path, headers, body)
        if delay:
            time.sleep(delay)
        try:
            self.send_response(status)
            for k, v in out_headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if data:
                self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve
