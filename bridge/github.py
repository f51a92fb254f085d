"""The GitHub bridge: labelled issues become jobs, and jobs answer on their issues, exactly once.

One sync cycle (`sync_once`, `lab github sync --once`, or the daemon's poller every
LAB_GITHUB_POLL seconds):

1. read the issues that changed since the last cycle (a conditional request: an unchanged repo
   costs one 304, which GitHub does not count against the rate limit);
2. for each: an open issue (not a pull request) labelled `gpu` or `cpu` with a ```toml block
   becomes a job once per (issue, spec hash); a `/rerun` comment runs it again; `blocked` holds
   it; closing the issue or removing the lane label cancels it; a bad spec gets one answer;
3. turn every job linked to an issue into outbox rows: its status comment (edited in place),
   its state label, and once it ends its result comment;
4. send the outbox rows that are due, each retried with backoff that honours Retry-After and
   X-RateLimit-Reset. A create that failed ambiguously (timeout or 5xx: GitHub may have applied
   it) is never simply repeated: the sender first looks for the row's marker among the issue's
   comments. That, and counting each attempt in the database before its request leaves, is what
   keeps a comment single through faults and a kill -9.

GitHub asks for a second between writes, so writes are the bridge's scarce resource: a job
costs its status comment, its result comment and one label write per state it is seen in (a
label change is ONE request), plus a status edit when it was first posted while still waiting.
Bodies are rendered from the job as it is when a cycle starts, so states a job passes through
between two cycles are never sent; a running job's status is edited at most once per
STATUS_EDIT_SECONDS; new comments go before edits, edits before labels; and the daemon's poller
sends for at most FLUSH_SECONDS per cycle, so the next cycle renders what happened meanwhile.
A primary rate limit pauses the bridge until its reset; then GET /rate_limit (free) says whether
the budget is back. `lab status` shows the last cycle, the pause and the rows that gave up.

Safety: a spec only selects a job kind and values validated by that kind's Spec; nothing from an
issue is ever executed. Only a labeller (or `/rerun` author) with write, maintain or admin
permission, or listed in LAB_ALLOWED_USERS, starts work. The token is scrubbed from every
error, log line and comment.

Environment: GITHUB_TOKEN, GITHUB_REPOSITORY (owner/name), GITHUB_API_URL (default the public
API), LAB_GITHUB_POLL (seconds), LAB_ALLOWED_USERS (comma-separated logins); the other knobs are
the `github_*` fields of config.QueueConfig (LAB_QUEUE_GITHUB_TIMEOUT_SECONDS=5 and so on).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import threading
import time
import tomllib
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import common
import config
import jobs as job_kinds
from bridge import render
from bridge.outbox import Outbox
from config import ConfigError
from jobs.paths import check_spec_paths
from store import ACTIVE, FINAL, PIPELINE_STAGES, Store

log = logging.getLogger("lab.github")

DEFAULT_API_URL = "https://api.github.com"
LANE_LABELS = ("gpu", "cpu")
STATE_LABELS = ("queued", "running", "succeeded", "failed", "stopped")
# An idea's pipeline (daemon/pipeline.py) shows its stage as a label beside its state.
STAGE_LABELS = tuple(f"stage:{s}" for s in PIPELINE_STAGES)
WRITE_ROLES = ("admin", "maintain", "write")
LEASE_ROLE = "github-bridge"

# name -> (colour, description): what `lab labels sync` makes true on the repository.
LABELS: dict[str, tuple[str, str]] = {
    "gpu": ("5319e7", "Lane: run this issue's spec on the GPU (one job at a time)"),
    "cpu": ("1d76db", "Lane: run this issue's spec on the CPU lane"),
    "blocked": ("b60205", "Hold: the lab does not start this issue's job until the label is removed"),
    "queued": ("fbca04", "State: the job waits in the lab's queue"),
    "running": ("0e8a16", "State: the job runs now"),
    "succeeded": ("2ea44f", "State: the latest job succeeded"),
    "failed": ("d93f0b", "State: the latest job failed"),
    "stopped": ("cfd3d7", "State: the idea's pipeline stopped (a stage failed, or did not earn the next)"),
    "stage:smoke": ("c2e0c6", "Idea pipeline: the smoke stage (both arms build, learn, stay finite)"),
    "stage:ablation": ("bfe5bf", "Idea pipeline: the ablation (the idea's arm against its baseline)"),
    "stage:full": ("a2eeef", "Idea pipeline: the full run, earned by the ablation's verdict"),
    "needs-fix": ("e99695", "The spec in this issue is invalid: see the lab's comment"),
    "architecture": ("c5def5", "Type: model architecture"),
    "tools": ("bfd4f2", "Type: tooling, the queue, the lab itself"),
    "ideas": ("d4c5f9", "Type: an idea to test with an ablation"),
    "optimization": ("bfdadc", "Type: speed or memory"),
    "documentation": ("0075ca", "Type: docs, findings, roadmap"),
    "bug": ("d73a4a", "Something isn't working"),
}

EXAMPLE_SPEC = 'kind = "sleep"\nseconds = 1'
# Caps checked before any TOML is parsed: an issue body is a stranger's input, and tomllib
# recurses once per nesting level (a deep array is a RecursionError, not a TOMLDecodeError).
BODY_MAX_CHARS = 65_536  # GitHub's own limit on an issue body
SPEC_MAX_CHARS = 16_384
SPEC_MAX_NESTING = 16
# `/run <hash>`: a writer approves one exact spec (the hash the status comment shows).
RUN_COMMAND = re.compile(r"/run\s+([0-9a-f]{16})\b", re.I)
# A running job's status comment is edited at most once per this many seconds: its progress
# changes on every poll, and at GitHub's pace of one write a second, edits of a few long jobs
# would otherwise hold back every other issue's answer. Its end is sent at once.
STATUS_EDIT_SECONDS = 10.0
# The daemon's poller sends for at most this long per cycle, then starts the next one at once:
# that cycle renders each job as it is by then (a job that ended meanwhile gets its final body,
# not an edit per state it passed through) and sees new issues and cancellations.
FLUSH_SECONDS = 10.0
FENCE = re.compile(r"^[ ]{0,3}(`{3,}|~{3,})[ \t]*([^`\s]*)[^`]*$")


# --- settings ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    token: str
    repository: str
    api_url: str
    queue: config.QueueConfig  # config.queue_config() with LAB_GITHUB_POLL applied
    allowed_users: frozenset[str]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings | None:
        """None when GITHUB_TOKEN or GITHUB_REPOSITORY is missing (the daemon runs CLI-only)."""
        env = os.environ if env is None else env
        # A systemd credential, a descriptor or a chmod-600 file first: a token in the environment
        # is readable in /proc/<pid>/environ by every process of the daemon's user.
        token, repo = common.github_token(env) or "", env.get("GITHUB_REPOSITORY", "").strip()
        if not token or not repo:
            return None
        if not re.fullmatch(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+", repo):
            raise ConfigError(f"GITHUB_REPOSITORY: {repo!r} is not owner/name")
        allowed = frozenset(u.strip().lower() for u in env.get("LAB_ALLOWED_USERS", "").split(",")
                            if u.strip())
        q = config.queue_config()
        if env.get("LAB_GITHUB_POLL"):
            try:
                q = dataclasses.replace(q, github_poll_seconds=config.parse_value(env["LAB_GITHUB_POLL"]))
            except ConfigError as e:
                raise ConfigError(f"LAB_GITHUB_POLL: {e}") from None
        api_url = (env.get("GITHUB_API_URL") or DEFAULT_API_URL).rstrip("/")
        return cls(token=token, repository=repo, api_url=api_url, queue=q, allowed_users=allowed)

    def scrub(self, text: str) -> str:
        return scrub(text, self.token)

    def __repr__(self) -> str:  # never print the token
        return f"Settings(repository={self.repository!r}, api_url={self.api_url!r})"


def scrub(text: str, token: str | None) -> str:
    if token and len(token) >= 4:
        text = text.replace(token, "***")
    return text


# --- errors -----------------------------------------------------------------------------------


class BridgeError(Exception):
    """A GitHub request failed; the message is scrubbed of the token."""

    def __init__(self, message: str, status: int | None = None, retry_at: float | None = None):
        super().__init__(message)
        self.status, self.retry_at = status, retry_at


class Transient(BridgeError):
    """Worth retrying: 5xx, timeout, connection trouble, secondary rate limit."""


class Stop(BridgeError):
    """Stop this cycle: the rate limit is spent, or the token is refused."""


class RateLimited(Stop):
    """The primary rate limit is spent: nothing until X-RateLimit-Reset."""


class Permanent(BridgeError):
    """The request itself is wrong (404, 422): retrying the same request will not help."""


def classify(exc: BaseException, token: str | None) -> BridgeError:
    import requests
    from github import GithubException

    if isinstance(exc, BridgeError):
        return exc
    if isinstance(exc, GithubException):
        headers = {str(k).lower(): str(v) for k, v in (exc.headers or {}).items()}
        message = (exc.data or {}).get("message") if isinstance(exc.data, dict) else None
        text = scrub(f"GitHub answered {exc.status}: {message or exc.data}", token)
        t = time.time()
        if exc.status in (403, 429) and headers.get("x-ratelimit-remaining") == "0":
            reset = _float(headers.get("x-ratelimit-reset"))
            return RateLimited(text, exc.status, retry_at=(reset + 1) if reset else t + 60)
        if exc.status in (403, 429) and "retry-after" in headers:
            return Transient(text, exc.status, retry_at=t + (_float(headers["retry-after"]) or 60))
        if exc.status in (401, 403):
            return Stop(text, exc.status, retry_at=t + 300)
        if exc.status >= 500:
            return Transient(text, exc.status)
        return Permanent(text, exc.status)
    if isinstance(exc, (requests.RequestException, OSError)):
        return Transient(scrub(f"no answer from GitHub: {type(exc).__name__}: {exc}", token))
    return Permanent(scrub(f"{type(exc).__name__}: {exc}", token))


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


# --- the API, through PyGithub ----------------------------------------------------------------


class Api:
    """The requests the bridge makes, through PyGithub, with errors classified and counted.

    PyGithub's own retry is off (`retry=0`): its default retries POST on 5xx and timeouts, which
    would create a second comment whenever the first one landed but its answer was lost. The
    outbox retries instead, looking before it posts again.

    Writes are paced here, not by PyGithub: its `seconds_between_writes` counts every non-GET as
    a write, so each GraphQL query (a read, sent as POST /graphql) would cost a write slot too."""

    def __init__(self, settings: Settings):
        import github

        q = settings.queue
        self.s = settings
        self.gh = github.Github(
            auth=github.Auth.Token(settings.token), base_url=settings.api_url,
            timeout=q.github_timeout_seconds, retry=0, per_page=q.github_per_page,
            user_agent="reasoning-lab-bridge",
            seconds_between_requests=q.github_seconds_between_requests or None,
            seconds_between_writes=None, lazy=True)  # None: off (see `write`); left out, PyGithub paces 1 s
        self.repo = self.gh.get_repo(settings.repository)
        self.repo_path = f"/repos/{settings.repository}"
        self.requests = 0
        self.writes = 0
        self.last_write = 0.0  # when the last write ended (time.time())
        self.bot_login: str | None = None

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.requests += 1
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - every failure is classified, none escapes raw
            raise classify(e, self.s.token) from None

    def write(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A request that changes something on GitHub, at least github_seconds_between_writes
        after the previous one ended (GitHub asks for a second between writes)."""
        wait = self.last_write + self.s.queue.github_seconds_between_writes - time.time()
        if wait > 0:
            time.sleep(wait)
        self.writes += 1
        try:
            return self.call(fn, *args, **kwargs)
        finally:
            self.last_write = time.time()

    @property
    def rate(self) -> tuple[int, int, int]:
        """(remaining, limit, reset epoch) as of the last response; (-1, -1, 0) before any."""
        remaining, limit = self.gh.requester.rate_limiting
        return remaining, limit, self.gh.requester.rate_limiting_resettime

    def refresh_rate(self) -> tuple[int, int, int]:
        """Ask GitHub for the rate limit now (GET /rate_limit, which costs none of it). The count
        `rate` reports is the last response's: after a pause nothing else would refresh it."""
        _, _, data = self.get("/rate_limit")
        core = ((data or {}).get("resources") or {}).get("core") or (data or {}).get("rate") or {}
        try:
            remaining, limit, reset = int(core["remaining"]), int(core["limit"]), int(core["reset"])
        except (KeyError, TypeError, ValueError):
            raise Transient("GitHub's /rate_limit answer has no core limit") from None
        self.gh.requester.rate_limiting = (remaining, limit)
        self.gh.requester.rate_limiting_resettime = reset
        return remaining, limit, reset

    def get(self, url: str, params: dict[str, Any] | None = None, etag: str | None = None
            ) -> tuple[int, dict[str, Any], Any]:
        """A GET with an optional If-None-Match: (status, headers, data); 304 -> data None."""
        from github.Requester import Requester

        headers = {"If-None-Match": etag} if etag else {}
        status, h, out = self.call(self.gh.requester.requestJson, "GET", url, params, headers)
        if status == 304:
            return status, h, None
        try:
            data = json.loads(out) if out else None
        except ValueError:
            raise Transient(f"GitHub answered {status} with a body that is not JSON", status) from None
        if status >= 400:
            raise classify(Requester.createException(status, h, data), self.s.token)
        return status, h, data

    def get_all(self, url: str, params: dict[str, Any] | None = None, etag: str | None = None
                ) -> tuple[list[Any] | None, str | None]:
        """Every page of a list (Link rel="next"); (None, etag) when the first page is a 304."""
        status, h, data = self.get(url, {**(params or {}), "per_page": self.s.queue.github_per_page}, etag)
        if status == 304:
            return None, etag
        first_etag, items = h.get("etag"), list(data or [])
        nxt = _next_link(h.get("link"))
        while nxt:
            _, h, data = self.get(nxt)
            items += data or []
            nxt = _next_link(h.get("link"))
        return items, first_etag

    def create_comment(self, issue: int, body: str) -> int:
        return int(self.write(lambda: self.repo.get_issue(issue).create_comment(body).id))

    def edit_comment(self, issue: int, comment_id: int, body: str) -> None:
        self.write(lambda: self.repo.get_issue(issue).get_comment(comment_id).edit(body))

    def comments(self, issue: int) -> list[dict[str, Any]]:
        items, _ = self.get_all(f"{self.repo_path}/issues/{issue}/comments")
        return items or []

    def whoami(self) -> str:
        """The token's login: only its own comments count as the bridge's."""
        if self.bot_login is None:
            _, _, data = self.get("/user")
            self.bot_login = str(data["login"])
        return self.bot_login

    def find_comment(self, issue: int, marker: str) -> dict[str, Any] | None:
        """The bridge's own comment on `issue` that carries `marker`, if one landed (anyone can
        paste a marker into a comment; the bridge must neither trust nor edit theirs)."""
        me = self.whoami()
        for c in self.comments(issue):
            # At the start only: a bot comment may quote text that carries another row's marker.
            if marker in leading_markers(c.get("body") or "") and (c.get("user") or {}).get("login") == me:
                return c
        return None

    def change_labels(self, issue: int, add: list[str], remove: list[str]) -> bool:
        """Make `add` on and `remove` off `issue` in ONE write, keeping every other label (a
        person's `ideas`, `bug`, ...); False when it already was so (nothing sent).

        Adding only: POST, which adds atomically, so no label anyone sets meanwhile is lost.
        Removing too: the labels as they are now, read after waiting for the write slot, then
        PUT of the whole new set; a label changed in the few milliseconds between the two is
        the one risk, and a smaller one than a POST plus a DELETE per label, each a second apart."""
        if not remove:
            self.write(lambda: self.repo.get_issue(issue).add_to_labels(*add))
            return True
        wait = self.last_write + self.s.queue.github_seconds_between_writes - time.time()
        if wait > 0:
            time.sleep(wait)
        have, _ = self.get_all(f"{self.repo_path}/issues/{issue}/labels")
        names = [str(lab["name"]) for lab in have or []]
        lower = {x.lower() for x in names}
        drop = {x.lower() for x in remove}
        if {x.lower() for x in add} <= lower and not (lower & drop):
            return False
        wanted = [x for x in names if x.lower() not in drop] + [x for x in add if x.lower() not in lower]
        self.write(lambda: self.repo.get_issue(issue).set_labels(*wanted))
        return True

    def role(self, login: str) -> str:
        """admin, maintain, write, triage, read or none (the collaborator permission endpoint)."""
        try:
            _, _, data = self.get(f"{self.repo_path}/collaborators/{login}/permission")
        except Permanent as e:
            if e.status == 404:  # not a GitHub user we can see
                return "none"
            raise
        except RateLimited:
            raise
        except Stop as e:
            if e.status != 403:
                raise
            # A token that may not read permissions: only LAB_ALLOWED_USERS can start work.
            log.warning("cannot read %s's permission (%s); only LAB_ALLOWED_USERS can start work", login, e)
            return "none"
        return str(data.get("role_name") or data.get("permission") or "none")

    def labeller(self, issue: int, label: str) -> tuple[str | None, float]:
        """Who added `label` to `issue` most recently, and when (its latest `labeled` event)."""
        events, _ = self.get_all(f"{self.repo_path}/issues/{issue}/events")
        who, at = None, 0.0
        for ev in events or []:
            if ev.get("event") == "labeled" and (ev.get("label") or {}).get("name", "").lower() == label:
                who, at = (ev.get("actor") or {}).get("login"), github_time(ev.get("created_at"))
        return who, at

    def last_edit(self, issue: int) -> dict[str, Any]:
        """The issue's body with when and by whom it was last edited: {body, edited_at (epoch or
        None if never edited), editor}. Only GraphQL says this (REST has no event for a body edit)."""
        owner, name = self.s.repository.split("/")
        _, data = self.call(self.gh.requester.graphql_query, LAST_EDIT_QUERY,
                            {"owner": owner, "name": name, "number": issue})
        node = ((data.get("data") or {}).get("repository") or {}).get("issue")
        if not isinstance(node, dict):
            raise Permanent(f"GraphQL gave no issue #{issue}")
        edited = node.get("lastEditedAt")
        return {"body": node.get("body") or "", "edited_at": github_time(edited) if edited else None,
                "editor": (node.get("editor") or {}).get("login")}

    def sync_labels(self) -> list[dict[str, str]]:
        """Create or update LABELS on the repository; what was done to each."""
        have = {lab.name.lower(): lab for lab in self.call(lambda: list(self.repo.get_labels()))}
        done = []
        for name, (color, description) in LABELS.items():
            lab = have.get(name)
            if lab is None:
                self.write(self.repo.create_label, name, color, description)
                action = "created"
            elif (lab.color or "").lower() != color or (lab.description or "") != description:
                self.write(lab.edit, lab.name, color, description)
                action = "updated"
            else:
                action = "unchanged"
            done.append({"label": name, "color": color, "action": action})
        return done


LAST_EDIT_QUERY = """query($owner: String!, $name: String!, $number: Int!) {
  repository(owner: $owner, name: $name) { issue(number: $number) { body lastEditedAt editor { login } } }
}"""


MARKER_LINE = re.compile(r"<!-- lab:[a-z]+(?: [A-Za-z0-9:_.-]+)? -->")


def leading_markers(body: str) -> list[str]:
    """The marker lines a bot comment opens with; a marker quoted further down does not count."""
    out = []
    for line in body.splitlines():
        if not MARKER_LINE.fullmatch(line.strip()):
            break
        out.append(line.strip())
    return out


def github_time(text: str | None) -> float:
    """GitHub's `2026-12-01T10:00:00Z` as epoch seconds (0.0 when absent or unreadable)."""
    try:
        return datetime.strptime(str(text), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return 0.0


def _next_link(header: str | None) -> str | None:
    for part in (header or "").split(","):
        m = re.match(r'\s*<([^>]+)>;\s*rel="next"', part)
        if m:
            return m.group(1)
    return None


# --- issue -> spec ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class IssueSpec:
    kind: str
    lane: str
    spec: dict[str, Any]  # validated by the kind's Spec, defaults filled in
    depends_on: int | None
    earned_by: int | None  # the ablation job that earned a full GPU run (the rtx2060 gate)
    hash: str


class SpecProblem(Exception):
    def __init__(self, field: str, problem: str, fix: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem, self.fix = field, problem, fix


def parse_issue_spec(body: str | None, labels: list[str], number: int) -> IssueSpec:
    """An issue body and its lane label -> a validated spec, or SpecProblem naming the field."""
    lanes = [x for x in LANE_LABELS if x in labels]
    if len(lanes) != 1:
        raise SpecProblem("label", "the issue has both lane labels `gpu` and `cpu`",
                          "remove one of them: the label is the lane the job runs in")
    if len(body or "") > BODY_MAX_CHARS:
        raise SpecProblem("body", f"the issue body has {len(body or '')} characters "
                          f"(at most {BODY_MAX_CHARS})",
                          "shorten the body: the spec block is all the lab reads")
    blocks = toml_blocks(body or "")
    if not blocks:
        raise SpecProblem("toml", "the issue body has no fenced ```toml block",
                          f'add one with `kind = "..."` (one of: {", ".join(job_kinds.kind_names())}) '
                          "and that kind's keys")
    if len(blocks) > 1:
        raise SpecProblem("toml", f"the issue body has {len(blocks)} ```toml blocks",
                          "keep exactly one spec block (put examples in another language fence)")
    values = _load_toml(blocks[0])
    kind = values.pop("kind", None)
    kinds = ", ".join([*job_kinds.kind_names(), "idea"])
    if kind is None:
        raise SpecProblem("kind", "missing", f'add `kind = "..."`, one of: {kinds}')
    if kind == "idea":  # not a job: a pipeline of them (daemon/pipeline.py)
        return _parse_idea_spec(values, lanes[0])
    if not isinstance(kind, str) or kind not in job_kinds.kind_names():
        raise SpecProblem("kind", f"{kind!r} is not a job kind", f"set `kind` to one of: {kinds}")
    depends_on = values.pop("depends-on", None)
    if depends_on is not None and (not _positive_int(depends_on) or depends_on == number):
        raise SpecProblem("depends-on", f"{depends_on!r} is not another issue's number",
                          "write `depends-on = 12` (a plain number, not this issue) or remove the line")
    earned_by = values.pop("earned-by", None)
    if earned_by is not None and not _positive_int(earned_by):
        raise SpecProblem("earned-by", f"{earned_by!r} is not a job id",
                          "write `earned-by = 17`, the id of the ablation job whose verdict was better")
    try:
        lane = job_kinds.check_lane(kind, lanes[0])
        # Paths resolved in the checkout's allowed roots, never a dotfile or the queue database,
        # runs by id only; before the Spec, which would say whether a file exists.
        check_spec_paths(kind, values)
        spec = job_kinds.parse_spec(kind, values)
    except ConfigError as e:
        field, _, problem = str(e).partition(": ")
        if field.startswith("Spec."):  # a kind's Spec names itself by class; the reader knows the kind
            field = f"{kind}.{field[5:]}"
        raise SpecProblem(field, problem or str(e), _fix_for(field, problem, kind)) from None
    except (TypeError, ValueError, OverflowError, RecursionError, AttributeError, KeyError) as e:
        # A value no kind's validation foresaw: the issue gets an answer, the bridge goes on.
        raise SpecProblem(kind, f"the spec could not be validated ({type(e).__name__})",
                          "check each value's type against `lab kinds` "
                          "(strings in quotes, numbers bare)") from None
    spec_dict = job_kinds.spec_to_dict(spec)
    canon = json.dumps({"kind": kind, "lane": lane, "spec": spec_dict, "depends_on": depends_on,
                        "earned_by": earned_by}, sort_keys=True, default=str)
    digest = hashlib.sha256(canon.encode()).hexdigest()[:16]
    return IssueSpec(kind, lane, spec_dict, depends_on, earned_by, digest)


def _parse_idea_spec(values: dict[str, Any], lane: str) -> IssueSpec:
    """An idea's spec (daemon/pipeline.py IdeaSpec): its pipeline earns its own full run, so
    neither `depends-on` nor `earned-by` belongs in it."""
    from daemon.pipeline import idea_dict, parse_idea

    for key in ("depends-on", "earned-by"):
        if key in values:
            raise SpecProblem(key, "an idea's pipeline decides its own stages",
                              f"remove `{key}`: the full run is earned by the idea's own ablation")
    try:
        lane = job_kinds.check_lane("smoke", lane)
        spec = idea_dict(parse_idea(values))
    except ConfigError as e:
        field, _, problem = str(e).partition(": ")
        raise SpecProblem(field, problem or str(e), _fix_for(field, problem, "idea")) from None
    except (TypeError, ValueError, OverflowError, RecursionError, AttributeError, KeyError) as e:
        raise SpecProblem("idea", f"the spec could not be validated ({type(e).__name__})",
                          "check each value's type against the Idea issue form") from None
    canon = json.dumps({"kind": "idea", "lane": lane, "spec": spec, "depends_on": None, "earned_by": None},
                       sort_keys=True, default=str)
    return IssueSpec("idea", lane, spec, None, None, hashlib.sha256(canon.encode()).hexdigest()[:16])


def toml_blocks(body: str) -> list[str]:
    """The bodies of the top-level ```toml fences, read line by line as CommonMark does (a fence
    closes on a line of the same character at least as long). Linear in the body's length: a
    regex with a lazy `.*?` rescans the rest of the body from every unclosed opening."""
    blocks: list[str] = []
    lines = body.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info = m.group(1), m.group(2).lower()
        closing = re.compile(rf"^[ ]{{0,3}}{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        j = i + 1
        while j < len(lines) and not closing.match(lines[j]):
            j += 1
        if info == "toml":
            if j == len(lines):
                raise SpecProblem("toml", "the ```toml block is never closed",
                                  "end the spec block with a line of ``` (as many backticks as opened it)")
            blocks.append("\n".join(lines[i + 1:j]) + "\n")
        i = j + 1
    return blocks


def _load_toml(text: str) -> dict[str, Any]:
    if len(text) > SPEC_MAX_CHARS:
        raise SpecProblem("toml", f"the spec block has {len(text)} characters (at most {SPEC_MAX_CHARS})",
                          "a spec is a few keys: move long text out of the block")
    depth = deepest = 0
    for ch in text:  # brackets inside strings count too: a cap that errs on the safe side
        depth += (ch in "[{") - (ch in "]}")
        deepest = max(deepest, depth)
    if deepest > SPEC_MAX_NESTING:
        raise SpecProblem("toml", f"the spec nests {deepest} levels deep (at most {SPEC_MAX_NESTING})",
                          "flatten the arrays and tables")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecProblem("toml", f"invalid TOML ({e})",
                          "fix the syntax: `key = value`, strings in quotes") from None
    except (RecursionError, ValueError, OverflowError, MemoryError) as e:
        raise SpecProblem("toml", f"the spec block could not be read ({type(e).__name__})",
                          "simplify the block: plain keys, numbers, strings and short arrays") from None


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _fix_for(field: str, problem: str, kind: str) -> str:
    key = field.split(".")[-1]
    if field.startswith("--earned-by") or field.startswith("--force"):
        return ("add `earned-by = ID` naming a succeeded ablation whose verdict was better "
                "(a full rtx2060 GPU run must be earned)")
    if field == "lane":
        return "move the issue to a lane this kind allows: swap the `gpu`/`cpu` label"
    if "unknown key" in problem:
        return f"remove `{key}` or rename it to one of the allowed keys listed above"
    if "required key is missing" in problem:
        return f"add `{key} = ...` to the toml block"
    if "expected" in problem:
        return f"give `{key}` a value of the type named above (strings in quotes, numbers bare)"
    if "out of range" in problem or "not allowed" in problem:
        return f"choose a value for `{key}` from the allowed values above"
    return f"correct `{key}` as described above"


def _problem_hash(body: str | None, labels: list[str]) -> str:
    try:
        blocks = toml_blocks(body or "")
    except SpecProblem:
        blocks = [body or ""]
    seen = json.dumps({"blocks": blocks, "lanes": [x for x in LANE_LABELS if x in labels]}, sort_keys=True)
    return hashlib.sha256(seen.encode()).hexdigest()[:16]


# --- the bridge ---------------------------------------------------------------------------------


class Bridge:
    """One GitHub repository <-> one queue. `cycle()` is one full sync."""

    def __init__(self, store: Store, settings: Settings, api: Api | None = None):
        self.store, self.s = store, settings
        self.outbox = Outbox(store)
        self.api = api or Api(settings)
        self.owner = f"{config.paths().host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.rng = random.Random()
        self._roles: dict[str, str] = {}
        self._issue: dict[str, Any] = {}
        self._labels: list[str] = []
        self.summary: dict[str, Any] = {}

    # --- one cycle ---------------------------------------------------------------------------

    def cycle(self, flush_budget_s: float | None = None) -> dict[str, Any]:
        """One sync; `flush_budget_s` bounds the sending (None: send everything that is due)."""
        q = self.s.queue
        start_requests, start_writes = self.api.requests, self.api.writes
        self.summary = {"repository": self.s.repository, "issues_read": 0, "submitted": [], "cancelled": [],
                        "answered": 0, "sent": 0, "failed": 0, "errors": []}
        if not self.outbox.acquire_lease(LEASE_ROLE, self.owner, q.github_lease_seconds,
                                          host=config.paths().host):
            held = self.outbox.lease(LEASE_ROLE) or {}
            self.summary["skipped"] = f"another bridge holds the lease ({held.get('owner')})"
            return self.summary
        self._roles = {}
        paused = self.outbox.get_state("paused_until", 0.0)
        if paused > time.time():
            self.summary["paused_until"] = render.iso(paused)
        else:
            try:
                self.adopt_undecided()
                self.read_issues()
                self.reflect_jobs()
                self.flush(flush_budget_s)
            except Stop as e:
                self._pause(e)
        self.summary["requests"] = self.api.requests - start_requests
        self.summary["writes"] = self.api.writes - start_writes
        remaining, limit, reset = self.api.rate
        self.summary["rate_remaining"] = remaining
        self.summary["outbox"] = self.outbox.counts()
        # What `lab status` shows (status_summary): the daemon's poller has no other voice than its log.
        if remaining < 0:  # no answer from GitHub in this process yet: the last figures still stand
            last = self.outbox.get_state("status") or {}
            remaining, limit, reset = last.get("remaining", -1), last.get("limit", -1), last.get("reset", 0)
        self.outbox.set_state("status", {
            "at": time.time(), "repository": self.s.repository, "remaining": remaining, "limit": limit,
            "reset": reset, "requests": self.summary["requests"], "writes": self.summary["writes"],
            "sent": self.summary["sent"], "errors": self.summary["errors"][-5:]})
        return self.summary

    def _pause(self, e: BridgeError) -> None:
        until = e.retry_at or time.time() + 60
        self.outbox.set_state("paused_until", until)
        self.outbox.set_state("paused_because", str(e))
        self.summary["paused_until"] = render.iso(until)
        self._error(f"paused until {render.iso(until)}: {e}")

    def _error(self, message: str) -> None:
        message = self.s.scrub(message)
        self.summary["errors"].append(message)
        log.warning("%s", message)

    def _check_rate(self) -> None:
        """Stop the cycle while fewer requests than the reserve are left. The count is the one the
        last response carried: once its window has reset it is stale (and after a pause no
        response came to refresh it), so ask GitHub, at no cost, before believing it."""
        reserve = self.s.queue.github_rate_reserve
        remaining, _, reset = self.api.rate
        if 0 <= remaining < reserve and reset <= time.time():
            try:
                remaining, _, reset = self.api.refresh_rate()
            except (Transient, Permanent) as e:
                raise Stop(f"cannot read the rate limit after its reset: {e}", e.status,
                           retry_at=time.time() + 60) from None
        if 0 <= remaining < reserve:
            raise RateLimited(f"rate limit: {remaining} requests left, below the reserve of {reserve}",
                              retry_at=reset + 1 if reset > time.time() else time.time() + 60)

    def _read(self, fn: Callable[[], Any]) -> Any:
        """A read, tried a few times within the cycle (reads are safe to repeat)."""
        q = self.s.queue
        for attempt in range(q.github_read_attempts):
            self._check_rate()
            try:
                return fn()
            except Transient as e:
                if attempt + 1 == q.github_read_attempts:
                    raise
                wait = (e.retry_at - time.time()) if e.retry_at else q.github_backoff_seconds * 2 ** attempt
                time.sleep(min(max(wait, 0.0), 10.0))
        raise AssertionError("unreachable")

    # --- issues -> jobs ----------------------------------------------------------------------

    def read_issues(self) -> None:
        """Handle every issue updated since the watermark; advance it only if all went well."""
        since = self.outbox.get_state("issues_since")
        cached = self.outbox.get_state("issues_etag") or {}
        params: dict[str, Any] = {"state": "all" if since else "open", "sort": "updated", "direction": "asc"}
        if since:
            params["since"] = since
        etag = cached.get("etag") if cached.get("since") == since else None
        url = f"{self.api.repo_path}/issues"
        try:
            items, new_etag = self._read(lambda: self.api.get_all(url, params, etag))
        except (Transient, Permanent) as e:
            self._error(f"reading issues: {e}")
            return
        ok = True
        if items is not None:
            self.summary["issues_read"] = len(items)
            for issue in sorted(items, key=lambda i: i["number"]):
                ok = self._handle_safely(issue) and ok
        for number in self.outbox.waiting_issues():
            if items is None or number not in {i["number"] for i in items}:
                try:
                    _, _, issue = self._read(lambda n=number: self.api.get(f"{url}/{n}"))
                except (Transient, Permanent) as e:
                    self._error(f"issue #{number}: {e}")
                    continue
                self._handle_safely(issue)
        if items is not None and ok:
            newest = max((i["updated_at"] for i in items), default=since)
            if newest and newest != since:
                # A margin: GitHub times have one-second resolution, and reprocessing is idempotent.
                t = datetime.strptime(newest, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp() - 2
                newest = datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            self.outbox.set_state("issues_since", newest)
            self.outbox.set_state("issues_etag", {"since": since, "etag": new_etag})

    def _handle_safely(self, issue: dict[str, Any]) -> bool:
        try:
            self.handle_issue(issue)
            return True
        except Transient as e:  # read it again next cycle (the watermark stays)
            self._error(f"issue #{issue.get('number')}: {e}")
            return False
        except Permanent as e:  # retrying would not help; say so and move on
            self._error(f"issue #{issue.get('number')}: {e}")
            return True
        except Stop:
            raise  # the rate limit or the token: the whole cycle pauses
        except Exception as e:  # noqa: BLE001 - one issue never stops the bridge
            number = f"E-{uuid.uuid4().hex[:8]}"
            log.error("issue #%s: error %s", issue.get("number"), number, exc_info=True)
            self._error(f"issue #{issue.get('number')}: error {number}: {type(e).__name__}: {e}")
            n = issue.get("number")
            if isinstance(n, int) and not self.outbox.has(f"error:{n}"):
                self._answer_notice(n, f"error:{n}", render.error_comment(f"error:{n}", number))
            return True  # the issue is read again when it changes; the others go on now

    def handle_issue(self, issue: dict[str, Any]) -> None:
        n = int(issue["number"])
        if "pull_request" in issue:
            return  # a pull request with a lane label is not an experiment
        labels = [lab["name"].lower() for lab in issue.get("labels", [])]
        self._issue, self._labels = issue, labels
        lane_labels = [x for x in LANE_LABELS if x in labels]
        pipelines = self.store.list_pipelines(issue=n)
        staged = [link["job_id"] for p in pipelines for link in self.store.pipeline_jobs(p["id"])]
        mine = [self.store.get(j) for j in dict.fromkeys([*self.outbox.issue_jobs(n), *staged])]
        active = [j for j in mine if j and j["status"] in ACTIVE]
        if issue["state"] != "open" or not lane_labels:
            why = (f"issue #{n} was closed" if issue["state"] != "open"
                   else f"the lane label was removed from #{n}")
            from daemon import pipeline

            for p in pipelines:
                if p["status"] == "running":
                    pipeline.cancel(p["id"], why, self.store)
            for j in active:
                if not j.get("cancel_requested"):
                    self.store.cancel(j["id"], why)
                    self.summary["cancelled"].append(j["id"])
            if mine:
                self.outbox.withdraw(n)
            if self.outbox.issue_state(n)["waiting"]:
                self.outbox.set_issue_state(n, waiting=None)
            return
        blocked = "blocked" in labels
        for j in active:
            if blocked and j["status"] in ("queued", "blocked") and not j.get("held"):
                self.store.hold(j["id"], f"issue #{n} has the `blocked` label")
            elif not blocked and j.get("held"):
                self.store.unhold(j["id"])
        try:
            spec = parse_issue_spec(issue.get("body"), labels, n)
        except SpecProblem as p:
            self._answer_invalid(n, issue, labels, p)
            return
        if "needs-fix" in labels:
            self.outbox.put_labels(f"needs-fix:{n}", n, add=[], remove=["needs-fix"])
        st = self.outbox.issue_state(n)
        reruns: list[dict[str, Any]] = []
        runs: list[tuple[dict[str, Any], str]] = []
        cursor: dict[str, Any] = {}
        if int(issue.get("comments") or 0) != st["comments_seen"]:
            comments = self._read(lambda: self.api.comments(n))
            fresh = [c for c in comments if int(c["id"]) > st["last_comment_id"]]
            for c in fresh:
                words = (c.get("body") or "").strip().split()[:2]
                if words[:1] == ["/rerun"]:
                    reruns.append(c)
                elif words[:1] == ["/run"]:
                    m = RUN_COMMAND.match(" ".join(words))
                    runs.append((c, m.group(1).lower() if m else ""))
            cursor = {"comments_seen": int(issue.get("comments") or 0),
                      "last_comment_id": max([st["last_comment_id"]] + [int(c["id"]) for c in comments])}
        trigger = self._approved_trigger(n, issue, spec, reruns, runs)
        if trigger == "reread":
            return  # the body changed while we read it: the next cycle sees the new one
        if trigger is not None:
            self._start(n, spec, trigger[0], trigger[1], cursor, blocked)
        elif cursor:
            self.outbox.set_issue_state(n, **cursor)

    def _approved_trigger(self, n: int, issue: dict[str, Any], spec: IssueSpec,
                          reruns: list[dict[str, Any]], runs: list[tuple[dict[str, Any], str]]
                          ) -> tuple[str, str | None] | str | None:
        """Whether a writer approved this exact spec, and who: ("spec" | "rerun" | "run", login).

        A writer approves the spec the body holds now by adding the lane label (or commenting
        `/rerun`) after the body's last edit, or by commenting `/run <hash>` with this spec's hash
        (the hash binds the approval to the text, whenever it was edited). A body last edited by a
        writer is that writer's. Anything else is held, with a note on the issue saying why: the
        author of an issue can edit it at any time, and a label is not a signature on later text."""
        edit: dict[str, Any] | None = None

        def edited_after(t: float) -> bool | str:
            nonlocal edit
            if edit is None:
                try:
                    edit = self._read(lambda: self.api.last_edit(n))
                except Permanent as e:  # cannot tell when it was edited: only `/run <hash>` approves
                    self._error(f"issue #{n}: reading its last edit: {e}")
                    edit = {"body": issue.get("body") or "", "edited_at": float("inf"), "editor": None}
                if (edit["body"] or "") != (issue.get("body") or ""):
                    return "reread"
            if edit["edited_at"] is None or t > edit["edited_at"]:
                return False
            return not (edit["editor"] and self._authorised(edit["editor"]))

        trigger: tuple[str, str | None] | None = None
        for c, digest in runs:
            author = (c.get("user") or {}).get("login")
            if not self._authorised(author):
                self._answer_unauthorised(n, author, "A `/run` comment")
            elif digest == spec.hash:
                trigger = trigger or ("run", author)
            else:
                self._answer_notice(n, f"run-mismatch:{n}:{c['id']}", render.run_mismatch_comment(
                    f"run-mismatch:{n}:{c['id']}", author, digest, spec.hash))
        if trigger is not None:
            return trigger
        if not self.outbox.ran(n, spec.hash):
            actor, labelled_at = self._read(lambda: self.api.labeller(n, spec.lane))
            if not self._authorised(actor):
                self._answer_unauthorised(n, actor, f"Adding the `{spec.lane}` label")
            else:
                after = edited_after(labelled_at)
                if after == "reread":
                    return "reread"
                if not after:
                    trigger = ("spec", actor)
                else:
                    self._answer_held(n, spec, actor, f"the `{spec.lane}` label", (edit or {}).get("editor"))
        for c in reruns:  # several `/rerun` comments since the last look make one run
            author = (c.get("user") or {}).get("login")
            if not self._authorised(author):
                self._answer_unauthorised(n, author, "A `/rerun` comment", key_suffix="rerun")
                continue
            after = False if self.outbox.ran(n, spec.hash) else edited_after(github_time(c.get("created_at")))
            if after == "reread":
                return "reread"
            if not after:
                trigger = trigger or ("rerun", author)
            else:
                self._answer_held(n, spec, author, "the `/rerun` comment", (edit or {}).get("editor"))
        return trigger

    def _answer_held(self, n: int, spec: IssueSpec, approver: str | None, what: str,
                     editor: str | None) -> None:
        key = f"held:{n}:{spec.hash}"
        self._answer_notice(n, key, render.held_comment(key, spec.hash, approver, what, editor, spec.lane))

    def _answer_notice(self, n: int, key: str, body: str) -> None:
        if self.outbox.has(key):
            return
        self.outbox.put_comment(key, "notice", n, render.key_marker(key), self.s.scrub(body), editable=False)
        self.summary["answered"] += 1

    def _authorised(self, login: str | None) -> bool:
        if not login:
            return False
        if login.lower() in self.s.allowed_users:
            return True
        if login not in self._roles:
            self._roles[login] = self._read(lambda: self.api.role(login))
        return self._roles[login] in WRITE_ROLES

    def _start(self, n: int, spec: IssueSpec, reason: str, actor: str | None, cursor: dict[str, Any],
               blocked: bool) -> None:
        after = None
        if spec.depends_on is not None:
            dep = self.store.list_jobs(issue=spec.depends_on, newest_first=True, limit=1)
            if not dep:
                self.outbox.set_issue_state(n, waiting=spec.hash, **cursor)
                key = f"waiting:{n}:{spec.hash}"
                self.outbox.put_comment(key, "notice", n, render.key_marker(key),
                                        render.waiting_comment(key, spec.depends_on), editable=False)
                return
            after = dep[0]["id"]
        run_id = self.outbox.decide_run(n, spec.hash, reason, actor, {**cursor, "waiting": None})
        try:
            self._submit(run_id, n, spec, after, blocked)
        except ConfigError as e:  # the queue refused it (the rtx2060 gate, a vanished dependency)
            self.outbox.drop_run(run_id)
            field, _, problem = str(e).partition(": ")
            self._answer_invalid(n, self._issue, self._labels, SpecProblem(
                field.lstrip("-"), problem or str(e), _fix_for(field, problem, spec.kind)))

    def _submit(self, run_id: int, n: int, spec: IssueSpec, after: int | None, blocked: bool) -> int:
        from daemon import service

        if spec.kind == "idea":
            return self._submit_idea(run_id, n, spec, blocked)

        job = service.submit(spec.kind, spec.spec, lane=spec.lane, after=after, issue=n,
                           earned_by=spec.earned_by, source="github", store=self.store,
                           held=f"issue #{n} has the `blocked` label" if blocked else None)
        job_id = int(job["id"])
        self.outbox.set_run_job(run_id, job_id)
        self.summary["submitted"].append(job_id)
        log.info("issue #%d -> job %d (%s on %s)", n, job_id, spec.kind, spec.lane)
        return job_id

    def _submit_idea(self, run_id: int, n: int, spec: IssueSpec, blocked: bool) -> int:
        """A new pipeline for the idea; or, when this exact idea's pipeline stopped (`/rerun`),
        the stage that stopped it again; one that still runs is left alone."""
        from daemon import pipeline

        same = [p for p in self.store.list_pipelines(issue=n) if p["spec"] == spec.spec]
        if same and same[0]["status"] == "running":
            view = pipeline.view(same[0]["id"], self.store)
        elif same and same[0]["status"] in ("stopped", "cancelled"):
            view = pipeline.rerun(same[0]["id"], self.store)
        else:
            view = pipeline.submit_idea(spec.spec, lane=spec.lane, issue=n, source="github", store=self.store,
                                        held=f"issue #{n} has the `blocked` label" if blocked else None)
        current = next(s for s in view["stages"] if s["stage"] == view["stage"])
        job_id = int(current["jobs"][0]["id"])
        self.outbox.set_run_job(run_id, job_id)
        self.summary["submitted"].append(job_id)
        log.info("issue #%d -> pipeline %d, stage %s (job %d)", n, view["id"], view["stage"], job_id)
        return job_id

    def adopt_undecided(self) -> None:
        """Runs decided but not marked submitted (a crash in between): find the job or submit."""
        for run in self.outbox.undecided_runs():
            found = [j for j in self.store.list_jobs(issue=run["issue"])
                     if j["source"] == "github" and j["created_at"] >= run["created_at"]
                     and j["id"] not in self.outbox.issue_jobs(run["issue"])]
            if found:
                self.outbox.set_run_job(run["id"], found[0]["id"])
            else:
                self.outbox.drop_run(run["id"])  # the issue is read again and decides afresh
                self.outbox.set_state("issues_since", None)

    def _answer_invalid(self, n: int, issue: dict[str, Any], labels: list[str], p: SpecProblem) -> None:
        key = f"invalid:{n}:{_problem_hash(issue.get('body'), labels)}"
        if self.outbox.has(key):
            return  # the same bad spec is answered once
        body = render.invalid_comment(key, p.field, p.problem, p.fix, EXAMPLE_SPEC)
        self.outbox.put_comment(key, "invalid", n, render.key_marker(key), self.s.scrub(body), editable=False)
        self.outbox.put_labels(f"needs-fix:{n}", n, add=["needs-fix"], remove=[])
        self.summary["answered"] += 1

    def _answer_unauthorised(self, n: int, login: str | None, what: str, key_suffix: str = "") -> None:
        key = f"unauthorised:{n}:{login or '-'}" + (f":{key_suffix}" if key_suffix else "")
        if self.outbox.has(key):
            return
        self.outbox.put_comment(key, "notice", n, render.key_marker(key),
                                render.unauthorised_comment(key, login, what), editable=False)
        self.summary["answered"] += 1

    # --- jobs -> outbox ------------------------------------------------------------------------

    def reflect_jobs(self) -> None:
        latest: dict[int, dict[str, Any]] = {}
        lanes_paused = self._lanes_paused()
        for job in self.outbox.jobs_to_report():
            n = int(job["issue"])
            paused = lanes_paused  # the disk guard holds both lanes
            run = self.outbox.run_of_job(job["id"])
            link = self.store.pipeline_of_job(job["id"])
            settle = STATUS_EDIT_SECONDS if job["status"] == "running" else 0.0  # its end goes at once
            if link is None:  # a pipeline's stage is a row of the pipeline's one status comment
                self.outbox.put_comment(f"status:{job['id']}", "status", n, render.status_marker(job["id"]),
                                        self.s.scrub(render.status_comment(job, paused, run)),
                                        job_id=job["id"], min_edit_interval=settle)
            if job["status"] in FINAL:
                body = render.result_comment(job, run, stage=link)
                self.outbox.put_comment(f"result:{job['id']}", "result", n, render.result_marker(job["id"]),
                                        self.s.scrub(body), job_id=job["id"], source_at=job["finished_at"])
            latest[n] = job
        staged = self.reflect_pipelines(lanes_paused)
        for n in latest:
            if n in staged:
                continue  # its labels say the pipeline's state and stage
            newest = self.store.list_jobs(issue=n, newest_first=True, limit=1)[0]
            state = {"queued": "queued", "blocked": "queued"}.get(newest["status"], newest["status"])
            add = [state] if state in STATE_LABELS else []
            self.outbox.put_labels(f"labels:{n}", n, add=add, remove=[], job_id=newest["id"])

    def reflect_pipelines(self, lanes_paused: str | None) -> set[int]:
        """One status comment per idea pipeline (every stage's state, progress and job), and the
        issue's labels: the pipeline's state and `stage:<stage>`. Pipelines that ended more than a
        day ago are settled and not rendered again. Returns the issues they answer."""
        from daemon import pipeline

        issues: set[int] = set()
        for p in self.store.list_pipelines():
            if p["issue"] is None:
                continue
            n = int(p["issue"])
            newest_for_issue = n not in issues
            issues.add(n)
            if p["status"] != "running" and (p["finished_at"] or 0) < time.time() - 86_400:
                continue
            view = pipeline.view(p["id"], self.store)
            key = f"pipeline:{p['id']}"
            settle = STATUS_EDIT_SECONDS if p["status"] == "running" else 0.0
            self.outbox.put_comment(key, "status", n, render.key_marker(key),
                                    self.s.scrub(render.pipeline_comment(view, lanes_paused)),
                                    min_edit_interval=settle)
            if newest_for_issue:  # list_pipelines is newest first: the issue's labels are its newest's
                state = p["status"] if p["status"] in STATE_LABELS else None  # cancelled: none
                add = [x for x in (state, f"stage:{p['stage']}") if x]
                self.outbox.put_labels(f"labels:{n}", n, add=add, remove=[])
        return issues

    def _lanes_paused(self) -> str | None:
        """Why a live daemon takes no new job on either lane (the disk guard), if one says so."""
        from daemon.service import alive_window

        alive = self.store.daemons(alive_within=alive_window(self.s.queue))
        return next((d["paused"] for d in alive if d.get("paused")), None)

    # --- outbox -> GitHub ----------------------------------------------------------------------

    def flush(self, budget_s: float | None = None) -> None:
        """Send the due rows, what a person waits for first (see `_rank`), for at most
        `budget_s` seconds: at one write a second, a burst of issues is a queue of writes."""
        started = time.monotonic()
        # Within a rank, job by job (a job's status comment, then its result), so that at one
        # write a second the first jobs are answered while the later ones wait, not all at the end.
        for row in sorted(self.outbox.due(), key=lambda r: (self._rank(r), r["job_id"] or 0, r["id"])):
            if budget_s is not None and time.monotonic() - started > budget_s:
                break  # the rest is still due: the poller starts the next cycle at once
            if row["kind"] == "result" and not self._status_posted(row["job_id"]):
                continue  # "the result is in the comment below": the status comment comes first
            self._check_rate()
            try:
                if row["op"] == "comment":
                    self._send_comment(row)
                else:
                    self._send_labels(row)
                self.summary["sent"] += 1
            except Stop as e:
                self.outbox.mark_failed(row["id"], str(e), e.retry_at or time.time() + 60, give_up=False)
                raise
            except BridgeError as e:
                self._failed(row, e)
                if e.status in (403, 429):  # a secondary rate limit: the next write would meet it too
                    break

    @staticmethod
    def _rank(row: dict[str, Any]) -> int:
        """0: a new comment (a result, a job's first status, an answer), what a person waits
        for; 1: an edit of a status comment, which says what the result below already says;
        2: state labels, which only restate it."""
        if row["op"] == "labels":
            return 2
        return 1 if row["kind"] == "status" and row["comment_id"] is not None else 0

    def _status_posted(self, job_id: int | None) -> bool:
        status = self.outbox.row(f"status:{job_id}")
        return status is None or status["comment_id"] is not None or status["status"] != "pending"

    def _failed(self, row: dict[str, Any], e: BridgeError) -> None:
        q = self.s.queue
        attempts = row["attempts"] + 1
        give_up = isinstance(e, Permanent) or attempts >= q.outbox_max_attempts
        delay = min(q.github_backoff_max_seconds, q.github_backoff_seconds * 2 ** (attempts - 1))
        retry_at = time.time() + delay * (0.5 + self.rng.random() / 2)
        if e.retry_at:
            retry_at = max(retry_at, e.retry_at)
        self.outbox.mark_failed(row["id"], str(e), retry_at, give_up)
        self.summary["failed"] += 1
        self._error(f"outbox {row['key']} (attempt {attempts}){' gave up' if give_up else ''}: {e}")

    def _send_comment(self, row: dict[str, Any]) -> None:
        n, body, marker = row["issue"], row["body"], row["marker"]
        comment_id = row["comment_id"]
        if comment_id is None and row["posts"] > 0:
            # An earlier create may have landed (timeout, 5xx, or a crash mid-request): look first.
            self.outbox.begin_attempt(row["id"], creating=False)
            found = self._read(lambda: self.api.find_comment(n, marker))
            if found is not None:
                comment_id = int(found["id"])
                self.outbox.set_comment_id(row["id"], comment_id)
                if found.get("body") == body:
                    self.outbox.mark_sent(row["id"], row["version"], comment_id)
                    return
        if comment_id is None:
            self.outbox.begin_attempt(row["id"], creating=True)
            comment_id = self.api.create_comment(n, body)
            self.outbox.mark_sent(row["id"], row["version"], comment_id)
            return
        self.outbox.begin_attempt(row["id"], creating=False)
        try:
            self.api.edit_comment(n, comment_id, body)
        except Permanent as e:
            if e.status == 404:  # someone deleted it: post it again on the next try
                self.outbox.forget_comment(row["id"])
            raise
        self.outbox.mark_sent(row["id"], row["version"], comment_id)

    def _send_labels(self, row: dict[str, Any]) -> None:
        add, remove = list(row["labels_add"] or []), list(row["labels_remove"] or [])
        if add or remove:
            self.outbox.begin_attempt(row["id"], creating=False)
            self.api.change_labels(row["issue"], add, remove)  # one write, or none if already so
        self.outbox.mark_sent(row["id"], row["version"])

    def close(self) -> None:
        self.outbox.release_lease(LEASE_ROLE, self.owner)


# --- entry points -------------------------------------------------------------------------------


def sync_once(db: str | None = None, settings: Settings | None = None, store: Store | None = None
              ) -> dict[str, Any]:
    """One full cycle: read issues, enqueue, post what is due. Raises ConfigError when the
    environment does not name a token and a repository."""
    settings = settings or Settings.from_env()
    if settings is None:
        raise ConfigError("GITHUB_TOKEN and GITHUB_REPOSITORY: both must be set for the GitHub bridge")
    own = store is None
    store = store or Store(db or config.paths().db)
    bridge = Bridge(store, settings)
    try:
        return bridge.cycle()
    except Exception as e:  # noqa: BLE001 - the token must not leave in a traceback
        raise RuntimeError(settings.scrub(f"GitHub sync failed: {type(e).__name__}: {e}")) from None
    finally:
        bridge.close()
        if own:
            store.dispose()


def sync_labels(settings: Settings | None = None) -> list[dict[str, str]]:
    settings = settings or Settings.from_env()
    if settings is None:
        raise ConfigError("GITHUB_TOKEN and GITHUB_REPOSITORY: both must be set to sync labels")
    try:
        return Api(settings).sync_labels()
    except BridgeError as e:
        raise RuntimeError(str(e)) from None


def status_summary(store: Store) -> dict[str, Any] | None:
    """The bridge as `lab status` shows it: its last cycle, the rate limit then, a pause and why,
    and the outbox rows it gave up on (which nothing else shows a person). None when no bridge
    ever ran against this queue."""
    outbox = Outbox(store)
    last = outbox.get_state("status")
    if not last:
        return None
    paused = outbox.get_state("paused_until", 0.0)
    now = time.time()
    gave_up = [{"key": r["key"], "issue": r["issue"], "kind": r["kind"], "job_id": r["job_id"],
                "reason": f"gave up: {r['last_error'] or 'no error recorded'}",
                "at": render.iso(r["updated_at"])} for r in outbox.dead()]
    return {"repository": last.get("repository"), "last_sync": render.iso(last.get("at")),
            "requests_left": last.get("remaining"), "rate_limit": last.get("limit"),
            "rate_reset": render.iso(last.get("reset")) if last.get("reset") else None,
            "paused_until": render.iso(paused) if paused > now else None,
            "paused_because": outbox.get_state("paused_because") if paused > now else None,
            "outbox": outbox.counts(), "gave_up": gave_up, "errors": last.get("errors") or []}


def status_lines(b: dict[str, Any] | None) -> list[str]:
    """status_summary as a few lines for a person (nothing when the bridge never ran)."""
    if not b:
        return []
    n = b["requests_left"]
    left = "unknown" if n is None or n < 0 else f"{n} of {b['rate_limit']}"
    out = b["outbox"]
    lines = [f"github: {b['repository']}, last sync {b['last_sync']}, {left} requests left, "
             f"outbox {out.get('pending', 0)} pending, {out.get('dead', 0)} gave up"]
    if b["paused_until"]:
        why = b["paused_because"] or "no reason recorded"
        lines.append(f"github: paused until {b['paused_until']}: {why}")
    for d in b["gave_up"]:
        lines.append(f"  {d['key']} (issue #{d['issue']}): {d['reason']}")
    return lines


class Poller(threading.Thread):
    """The daemon's GitHub thread: a cycle every poll interval (sooner when an outbox row is due)."""

    def __init__(self, db: str, settings: Settings, say: Callable[[str], None]):
        super().__init__(name="lab-github", daemon=True)
        self.db, self.s, self.say = db, settings, say
        self.stopping = threading.Event()

    def run(self) -> None:
        store = Store(self.db)
        bridge: Bridge | None = None
        try:
            bridge = Bridge(store, self.s)
            while not self.stopping.is_set():
                try:
                    summary = bridge.cycle(FLUSH_SECONDS)
                    if summary["submitted"] or summary["cancelled"] or summary["sent"]:
                        self.say(self.s.scrub(
                            f"github: submitted {summary['submitted']}, cancelled {summary['cancelled']}, "
                            f"sent {summary['sent']}, {summary['requests']} requests"))
                except Exception as e:  # noqa: BLE001 - a poller logs and goes on
                    self.say(self.s.scrub(f"github: cycle failed: {type(e).__name__}: {e}"))
                self.stopping.wait(self._wait(bridge))
        finally:
            if bridge is not None:
                bridge.close()
            store.dispose()

    def _wait(self, bridge: Bridge) -> float:
        """Until the next poll, or sooner when an outbox row is due (but not before a pause ends)."""
        poll = self.s.queue.github_poll_seconds
        due = bridge.outbox.next_due_at()
        if due is not None:
            due = max(due, bridge.outbox.get_state("paused_until", 0.0))
            poll = min(poll, max(0.2, due - time.time()))
        return poll

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        self.join(timeout)


def maybe_start(db: str, say: Callable[[str], None] = print, env: Mapping[str, str] | None = None
                ) -> Poller | None:
    """Start the poller when GITHUB_TOKEN and GITHUB_REPOSITORY are set; otherwise say once
    that the daemon runs CLI-only, and return None."""
    settings = Settings.from_env(env)
    if settings is None:
        say("GitHub bridge off (GITHUB_TOKEN and GITHUB_REPOSITORY not set): CLI only")
        return None
    poller = Poller(db, settings, say)
    poller.start()
    say(f"GitHub bridge on: {settings.repository} every {settings.queue.github_poll_seconds:g} s")
    return poller


__all__ = ["Settings", "Bridge", "Api", "sync_once", "sync_labels", "maybe_start", "Poller",
           "parse_issue_spec", "SpecProblem", "LABELS", "status_summary", "status_lines"]
