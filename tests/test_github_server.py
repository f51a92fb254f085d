"""The stand-in GitHub behaves like GitHub for what the bridge uses: checked with the real PyGithub
(its parsing of GitHub's JSON shapes, Link pagination, exceptions) over real HTTP."""

from __future__ import annotations

import threading
import time

import github
import pytest
import requests
from github import GithubException, RateLimitExceededException, UnknownObjectException
from github_server import COMMENT_LIMIT, FakeGitHub

TOKEN = "stand-in-token"


@pytest.fixture
def gh():
    with FakeGitHub(TOKEN) as server:
        yield server


def client(server: FakeGitHub, per_page: int = 30, timeout: int = 15) -> github.Github:
    return github.Github(auth=github.Auth.Token(TOKEN), base_url=server.url, retry=0, per_page=per_page,
                         timeout=timeout, seconds_between_requests=None, seconds_between_writes=None,
                         lazy=True)


def test_issues_paginate_with_link_headers_and_pull_requests_are_marked(gh: FakeGitHub) -> None:
    for i in range(7):
        gh.open_issue(f"issue {i}", "body", labels=("gpu",) if i % 2 else (), pull_request=i == 3)
    repo = client(gh, per_page=3).get_repo(gh.repo)
    issues = list(repo.get_issues(state="all", sort="created", direction="asc"))
    assert [i.number for i in issues] == list(range(1, 8))
    assert [i.number for i in issues if i.pull_request is not None] == [4]
    assert gh.count("GET", r"/issues$") == 3  # 3 + 3 + 1, following rel="next"
    pages = [r.query for r in gh.requests if r.path.endswith("/issues")]
    assert "&page=" not in pages[0] and "page=2" in pages[1] and "page=3" in pages[2]
    labelled = list(repo.get_issues(labels=["gpu"]))
    assert sorted(i.number for i in labelled) == [2, 4, 6] and labelled[0].labels[0].name == "gpu"
    assert repo.get_issue(2).user.login == "alice" and repo.get_issue(2).html_url.endswith("/issues/2")


def test_since_filters_by_update_time(gh: FakeGitHub) -> None:
    old = gh.open_issue("old", "b")
    gh.issues[old]["updated_at"] -= 3600
    new = gh.open_issue("new", "b")
    since = time.time() - 60
    from datetime import UTC, datetime
    got = list(client(gh).get_repo(gh.repo).get_issues(state="all", since=datetime.fromtimestamp(since, UTC)))
    assert [i.number for i in got] == [new]


def test_etag_gives_304_that_costs_no_rate_limit(gh: FakeGitHub) -> None:
    gh.open_issue("x", "b")
    r = client(gh).requester
    status, headers, _ = r.requestJson("GET", f"/repos/{gh.repo}/issues")
    remaining = int(headers["x-ratelimit-remaining"])
    status2, headers2, body2 = r.requestJson("GET", f"/repos/{gh.repo}/issues",
                                             headers={"If-None-Match": headers["etag"]})
    assert (status, status2, body2) == (200, 304, "")
    assert int(headers2["x-ratelimit-remaining"]) == remaining
    gh.comment(1, "changes the issue", user="bob")
    status3, _, _ = r.requestJson("GET", f"/repos/{gh.repo}/issues",
                                  headers={"If-None-Match": headers["etag"]})
    assert status3 == 200


def test_comments_labels_events_and_permissions(gh: FakeGitHub) -> None:
    gh.add_user("bob", "maintain")
    gh.add_user("carol", "triage")
    gh.add_user("stranger", None)
    n = gh.open_issue("x", "b", labels=("cpu",), user="stranger")
    gh.label(n, "gpu", actor="bob")
    assert client(gh).get_user().login == "lab-bot"  # the token's account writes the comments
    repo = client(gh).get_repo(gh.repo)
    issue = repo.get_issue(n)
    c = issue.create_comment("hello <!-- lab:status 1 -->")
    issue.get_comment(c.id).edit("edited")
    assert [x.body for x in issue.get_comments()] == ["edited"] and c.user.login == "lab-bot"
    issue.add_to_labels("queued")
    issue.remove_from_labels("cpu")
    with pytest.raises(GithubException) as e:  # GitHub: 404 "Label does not exist"
        issue.remove_from_labels("never-there")
    assert e.value.status == 404
    assert gh.labels_on(n) == ["gpu", "queued"]
    events = [(e.event, e.actor.login, e.label.name) for e in issue.get_events()]
    assert events == [("labeled", "stranger", "cpu"), ("labeled", "bob", "gpu"),
                      ("labeled", "lab-bot", "queued"), ("unlabeled", "lab-bot", "cpu")]
    assert repo.get_collaborator_permission("bob") == "write"  # GitHub folds maintain into write ...
    assert repo.get_collaborator_role_name("bob") == "maintain"  # ... and names the role here
    assert repo.get_collaborator_permission("carol") == "read"
    assert repo.get_collaborator_permission("stranger") == "read"
    assert repo.get_collaborator_permission("lab") == "admin"
    with pytest.raises(UnknownObjectException):
        repo.get_collaborator_permission("nobody-at-all")
    with pytest.raises(UnknownObjectException):
        repo.get_issue(999).create_comment("x")


def test_validation_errors_are_422(gh: FakeGitHub) -> None:
    n = gh.open_issue("x", "b")
    repo = client(gh).get_repo(gh.repo)
    repo.create_label("bug", "d73a4a", "Something isn't working")
    with pytest.raises(GithubException) as e:
        repo.create_label("Bug", "ffffff")
    assert e.value.status == 422 and e.value.data["errors"][0]["code"] == "already_exists"
    with pytest.raises(GithubException) as e:
        repo.get_issue(n).create_comment("x" * (COMMENT_LIMIT + 1))
    assert e.value.status == 422 and "too long" in e.value.data["errors"][0]["message"]
    repo.get_issue(n).create_comment("x" * COMMENT_LIMIT)
    label = repo.get_label("bug")
    label.edit("bug", "000000", "new words")
    assert gh.labels["bug"]["color"] == "000000" and gh.labels["bug"]["description"] == "new words"


def test_bad_token_and_primary_rate_limit(gh: FakeGitHub) -> None:
    bad = github.Github(auth=github.Auth.Token("wrong"), base_url=gh.url, retry=0, lazy=True)
    with pytest.raises(github.BadCredentialsException):
        bad.get_repo(gh.repo).get_issue(1).create_comment("x")
    gh.rate_limit, gh.rate_remaining = 2, 2
    repo = client(gh).get_repo(gh.repo)
    list(repo.get_labels())
    list(repo.get_labels())
    with pytest.raises(RateLimitExceededException) as e:
        list(repo.get_labels())
    assert e.value.status == 403 and e.value.headers["x-ratelimit-remaining"] == "0"
    assert int(e.value.headers["x-ratelimit-reset"]) > time.time()


def test_faults_on_demand(gh: FakeGitHub) -> None:
    n = gh.open_issue("x", "b")
    issue = client(gh, timeout=1).get_repo(gh.repo).get_issue(n)
    gh.timeout_sleep = 1.2
    gh.force_fault("POST", r"/comments$", "ambiguous_error")
    with pytest.raises(GithubException) as e:
        issue.create_comment("applied anyway")
    assert e.value.status == 502 and len(gh.comments_on(n)) == 1  # the write landed
    gh.force_fault("POST", r"/comments$", "error")
    with pytest.raises(GithubException) as e:
        issue.create_comment("not applied")
    assert e.value.status >= 500 and len(gh.comments_on(n)) == 1
    gh.force_fault("POST", r"/comments$", "ambiguous_timeout")
    with pytest.raises(requests.exceptions.Timeout):
        issue.create_comment("applied, answer too late")
    assert len(gh.comments_on(n)) == 2
    gh.force_fault("GET", r"/labels$", "secondary_rate")
    with pytest.raises(GithubException) as e:
        list(issue.get_labels())
    assert e.value.status == 403 and e.value.headers["retry-after"] == "1"
    assert gh.count(fault=True) == 4
    assert [r.applied for r in gh.requests if r.fault] == [True, False, True, False]
    # a random fault rate hits roughly that share of requests
    gh.fault_rate, gh.fault_kinds = 0.3, ("error",)
    failed = 0
    for _ in range(100):
        try:
            issue.get_labels().totalCount  # noqa: B018
        except GithubException:
            failed += 1
    assert 15 <= failed <= 45


def test_hold_parks_a_request_until_released(gh: FakeGitHub) -> None:
    n = gh.open_issue("x", "b")
    issue = client(gh).get_repo(gh.repo).get_issue(n)
    after = gh.hold("POST", r"/comments$", after_apply=True)
    t = threading.Thread(target=issue.create_comment, args=("held",))
    t.start()
    assert after.reached.wait(5) and len(gh.comments_on(n)) == 1 and t.is_alive()
    gh.release()
    t.join(5)
    before = gh.hold("POST", r"/comments$", after_apply=False)
    errors: list[Exception] = []

    def post() -> None:
        try:
            issue.create_comment("dropped")
        except GithubException as e:
            errors.append(e)

    t = threading.Thread(target=post)
    t.start()
    assert before.reached.wait(5)
    gh.release()
    t.join(5)
    assert len(gh.comments_on(n)) == 1 and errors and errors[0].status == 502
