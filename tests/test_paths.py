"""jobs/paths.py: the files and runs a spec may name. Real files and real symlinks in a stand-in
checkout under tmp_path: the token file (.env), .git, the queue database, links that lead out,
and paths outside the allowed roots, which must be refused alike whether they exist or not."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

import jobs
from config import ConfigError
from jobs import paths
from jobs.paths import ALLOWED_ROOTS, CHECKOUT, check_spec_paths

TASK_LINE = '{"input": "ab=", "target": "ba"}\n'
OUTSIDE = "outside the lab's allowed directories"  # the one refusal of a path outside the roots


@pytest.fixture
def checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A checkout with the allowed roots, the secrets a spec must not reach, and, beside it, a
    directory outside every root. LAB_DB, LAB_RUNS and LAB_ARCHIVE point into it, as on the
    owner's machine; the working directory is the checkout, as the daemon's is."""
    root = tmp_path / "lab"
    for d in ("harness/specs", "models/assets", "data/task", ".git", "runs/7", "archive"):
        (root / d).mkdir(parents=True)
    (root / ".env").write_text("GITHUB_TOKEN=ghp_secret\n")
    (root / ".env").chmod(0o600)
    (root / ".git/config").write_text("[core]\n")
    for name in ("queue.db", "queue.db-wal", "queue.db-shm"):
        (root / name).write_bytes(b"SQLite format 3\0")
    (root / "models/assets/sample.txt").write_text("to be or not to be\n")
    (root / "data/book.txt").write_text("call me ishmael\n")
    (root / "data/.hidden.txt").write_text("not for jobs\n")
    (root / "data/task/train.jsonl").write_text(TASK_LINE)
    (root / "data/task/test.jsonl").write_text(TASK_LINE)
    (root / "harness/specs/mine.toml").write_text('task = "khop"\n')
    (root / "runs/7/log.txt").write_text("a job's log\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("someone else's file\n")
    monkeypatch.setenv("LAB_DB", str(root / "queue.db"))
    monkeypatch.setenv("LAB_RUNS", str(root / "runs"))
    monkeypatch.setenv("LAB_ARCHIVE", str(root / "archive"))
    monkeypatch.chdir(root)
    return root


def refused(kind: str, values: dict, root: Path) -> str:
    with pytest.raises(ConfigError) as info:
        check_spec_paths(kind, values, root)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_allowed_paths_pass(checkout: Path) -> None:
    check_spec_paths("tokenize", {"src": ["models/assets/sample.txt", "data/book.txt"]}, checkout)
    check_spec_paths("tokenize", {"src": [str(checkout / "data/book.txt")]}, checkout)  # absolute
    check_spec_paths("ablation", {"spec_file": "harness/specs/mine.toml", "task_dir": "data/task"}, checkout)
    check_spec_paths("ablation", {"control": "negative", "task_dir": ""}, checkout)  # "" names nothing
    check_spec_paths("eval", {"run": "7"}, checkout)
    check_spec_paths("sleep", {"seconds": 1}, checkout)  # a kind without paths


@pytest.mark.parametrize("kind, values, field", [
    ("tokenize", {"src": [".env"], "name": "leak"}, "tokenize.src"),  # the token file, chmod 600
    ("tokenize", {"src": ["data/book.txt", ".git/config"]}, "tokenize.src"),
    ("tokenize", {"src": ["data/.hidden.txt"]}, "tokenize.src"),
    ("ablation", {"spec_file": ".git/config"}, "ablation.spec_file"),
    ("ablation", {"task_dir": ".git"}, "ablation.task_dir"),
])
def test_dotfiles_and_dot_directories_are_refused(checkout: Path, kind: str, values: dict,
                                                  field: str) -> None:
    message = refused(kind, values, checkout)
    assert message.startswith(f"{field}: ") and "hidden" in message


def test_the_spec_alone_accepts_the_token_file(checkout: Path) -> None:
    """The finding: validation checked only that the file exists, so `.env` became a dataset."""
    spec = jobs.parse_spec("tokenize", {"src": [".env"], "name": "leak"})
    assert spec.src == (".env",)
    assert "hidden" in refused("tokenize", {"src": [".env"], "name": "leak"}, checkout)


@pytest.mark.parametrize("given", ["queue.db", "queue.db-wal", "queue.db-shm", "runs/7/log.txt",
                                   "harness/ablate.py", "README.md", "."])
def test_files_of_the_checkout_outside_the_roots_are_refused(checkout: Path, given: str) -> None:
    (checkout / "README.md").write_text("readme\n")
    message = refused("tokenize", {"src": [given]}, checkout)
    assert OUTSIDE in message and "models/assets/ or data/" in message


def test_the_queue_database_is_refused_even_inside_an_allowed_root(checkout: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    (checkout / "data/queue.db").write_bytes(b"SQLite format 3\0")
    (checkout / "data/queue.db-wal").write_bytes(b"")
    monkeypatch.setenv("LAB_DB", str(checkout / "data/queue.db"))
    for given in ("data/queue.db", "data/queue.db-wal"):
        assert "the queue database" in refused("tokenize", {"src": [given]}, checkout)


def test_runs_are_refused_by_path_even_inside_an_allowed_root(checkout: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    (checkout / "data/runs/3").mkdir(parents=True)
    (checkout / "data/runs/3/log.txt").write_text("log\n")
    monkeypatch.setenv("LAB_RUNS", str(checkout / "data/runs"))
    assert "run id" in refused("tokenize", {"src": ["data/runs/3/log.txt"]}, checkout)


def test_climbing_out_is_refused_by_its_text(checkout: Path) -> None:
    message = refused("tokenize", {"src": ["data/../.env"]}, checkout)
    assert "'..'" in message and "outside the lab" in message
    assert "'..'" in refused("ablation", {"task_dir": "data/task/../../../outside"}, checkout)


def test_symlinks_are_followed(checkout: Path, tmp_path: Path) -> None:
    (checkout / "data/env.txt").symlink_to(checkout / ".env")  # a link to the token file
    (checkout / "data/out.txt").symlink_to(tmp_path / "outside/secret.txt")  # out of the checkout
    (checkout / "data/outdir").symlink_to(tmp_path / "outside")  # a directory link
    (checkout / "data/db.txt").symlink_to(checkout / "queue.db")
    (checkout / "harness/specs/evil.toml").symlink_to("../../.git/config")
    (checkout / "data/book-link.txt").symlink_to("book.txt")  # inside: fine
    check_spec_paths("tokenize", {"src": ["data/book-link.txt"]}, checkout)
    for given in ("data/env.txt", "data/out.txt", "data/outdir/secret.txt", "data/db.txt"):
        message = refused("tokenize", {"src": [given]}, checkout)
        assert message.startswith("tokenize.src: ") and OUTSIDE in message, message
    assert OUTSIDE in refused("ablation", {"spec_file": "harness/specs/evil.toml"}, checkout)
    assert OUTSIDE in refused("ablation", {"task_dir": "data/outdir"}, checkout)


def test_a_refusal_outside_the_roots_does_not_say_whether_the_path_exists(checkout: Path,
                                                                          tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "loop").symlink_to(outside / "loop")
    (outside / "link").symlink_to(outside / "secret.txt")
    (checkout / "data/loop").symlink_to(checkout / "data/loop")
    (checkout / "data/to-missing.txt").symlink_to(outside / "missing.txt")
    (checkout / "data/to-secret.txt").symlink_to(outside / "secret.txt")
    givens = [str(outside / "secret.txt"), str(outside / "missing.txt"), str(outside), str(outside / "loop"),
              str(outside / "link"), str(outside / "no/such/dir"), "/etc/passwd", "/etc/no-such-file",
              "data/loop", "data/to-missing.txt", "data/to-secret.txt"]
    messages = {refused("tokenize", {"src": [g]}, checkout).replace(repr(g), "PATH") for g in givens}
    assert len(messages) == 1, messages


def test_a_task_directory_is_checked_file_by_file(checkout: Path, tmp_path: Path) -> None:
    """harness/tasks.DirTask reads train.jsonl and test*.jsonl: a link among them that leads
    out is refused like the directory would be."""
    (checkout / "data/task/test_leak.jsonl").symlink_to(tmp_path / "outside/secret.txt")
    message = refused("ablation", {"task_dir": "data/task"}, checkout)
    assert message.startswith("ablation.task_dir (test_leak.jsonl): ") and OUTSIDE in message
    (checkout / "data/task/test_leak.jsonl").unlink()
    (checkout / "data/task/train.jsonl").unlink()
    (checkout / "data/task/train.jsonl").symlink_to(checkout / ".env")
    assert OUTSIDE in refused("ablation", {"task_dir": "data/task"}, checkout)


def test_a_spec_files_own_task_dir_is_checked(checkout: Path, tmp_path: Path) -> None:
    """harness/ablate.load_spec_file reads task_dir relative to the spec file."""
    (checkout / "harness/specs/task").mkdir()
    for name in ("train.jsonl", "test.jsonl"):
        (checkout / "harness/specs/task" / name).write_text(TASK_LINE)
    (checkout / "harness/specs/near.toml").write_text('task_dir = "task"\n')
    check_spec_paths("ablation", {"spec_file": "harness/specs/near.toml"}, checkout)
    (checkout / "harness/specs/far.toml").write_text(f'task_dir = "{tmp_path / "outside"}"\n')
    assert refused("ablation", {"spec_file": "harness/specs/far.toml"}, checkout).startswith(
        "ablation.spec_file (its task_dir): ")
    (checkout / "harness/specs/up.toml").write_text('task_dir = "../../.git"\n')
    assert "ablation.spec_file (its task_dir)" in refused("ablation", {"spec_file": "harness/specs/up.toml"},
                                                          checkout)


@pytest.mark.parametrize("value", [{"a": 1}, 3, ["x", 4], True])
def test_a_path_key_that_is_not_a_string_is_refused(checkout: Path, value: object) -> None:
    message = refused("tokenize", {"src": value}, checkout)
    assert message.startswith("tokenize.src: expected a path")


@pytest.mark.parametrize("given", ["a\0b", "d" * 5000])
def test_unusable_path_text_is_refused(checkout: Path, given: str) -> None:
    assert "not a usable path" in refused("tokenize", {"src": [given]}, checkout)


@pytest.mark.parametrize("run", ["/etc", "runs/7", "../7", "7/", ".git", str(Path.home())])
def test_a_run_is_named_by_run_id_never_by_path(checkout: Path, run: str) -> None:
    message = refused("eval", {"run": run}, checkout)
    assert message.startswith("eval.run: ") and "give the run id" in message
    with pytest.raises(ConfigError, match="give the run id"):  # the Spec itself refuses it too
        jobs.parse_spec("eval", {"run": run})
    assert refused("archive", {"runs": ["7", run]}, checkout).startswith("archive.runs: ")


@pytest.mark.parametrize("run", ["data", "x\n", "a b", "-x"])
def test_a_run_id_is_one_plain_name(checkout: Path, run: str) -> None:
    assert "is not a run id" in refused("eval", {"run": run}, checkout)


def test_every_field_of_every_kind_is_classified() -> None:
    """A kind that gains a field naming a file must add it to PATH_KEYS (or RUN_ID_KEYS), or say
    it names none in NOT_PATHS: otherwise the check would let it through unseen."""
    for kind in jobs.kind_names():
        known = {*paths.PATH_KEYS.get(kind, ()), *paths.RUN_ID_KEYS.get(kind, ()),
                 *paths.NOT_PATHS.get(kind, ()), *paths.NESTED_SPECS.get(kind, {})}
        fields = {f.name for f in dataclasses.fields(jobs.get_kind(kind).spec)}
        assert fields == known, f"{kind}: classify {sorted(fields ^ known)} in jobs/paths.py"
    for key in {k for keys in paths.PATH_KEYS.values() for k in keys}:
        assert ALLOWED_ROOTS[key]


@pytest.mark.parametrize("kind, values, field", [
    ("train", {"task_dir": "/etc"}, "train.task_dir"),
    ("smoke", {"ablation": {"task_dir": "../../x"}}, "smoke.ablation.task_dir"),
    ("smoke", {"ablation": {"spec_file": "/etc/passwd"}}, "smoke.ablation.spec_file"),
])
def test_a_task_run_and_a_smoke_of_arms_are_checked_too(kind: str, values: dict, field: str) -> None:
    """The full run's task directory and the ablation a smoke carries inside it name files too."""
    with pytest.raises(ConfigError, match=f"^{field}: .*outside the lab"):
        paths.check_spec_paths(kind, values)


def test_the_allowed_roots_hold_no_secret() -> None:
    for roots in ALLOWED_ROOTS.values():
        for r in roots:
            assert not Path(r).is_absolute() and not any(p.startswith(".") for p in Path(r).parts)
            assert Path(r).parts[0] not in ("runs", "archive")


def test_the_shipped_specs_and_sample_pass_in_the_real_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(CHECKOUT)
    for spec in sorted((CHECKOUT / "harness/specs").glob("*.toml")):
        check_spec_paths("ablation", {"spec_file": str(spec.relative_to(CHECKOUT))})
    check_spec_paths("ablation", {"spec_file": "harness/specs/khop_default.toml"})  # the README's example
    check_spec_paths("tokenize", {"src": ["models/assets/shakespeare.txt"], "name": "s"})
    assert "hidden" in refused("tokenize", {"src": [".env"]}, CHECKOUT)


def test_lab_eval_takes_a_run_id_not_a_path(tmp_runs: Path, tmp_path: Path) -> None:
    """The finding: `eval.run` named any directory, and the error said whether it existed."""
    from cli import main

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    runner = CliRunner()
    for run in (str(elsewhere), str(tmp_runs), "/etc", str(tmp_path / "missing")):
        out = runner.invoke(main, ["eval", run])
        assert out.exit_code == 2 and "give the run id" in out.output, out.output


def test_run_dir_of_stays_under_runs(tmp_runs: Path, tmp_path: Path) -> None:
    from jobs.eval import run_dir_of

    (tmp_runs / "12").mkdir()
    assert run_dir_of("12") == tmp_runs / "12"
    outside = tmp_path / "outside-run"
    outside.mkdir()
    (tmp_runs / "escape").symlink_to(outside)  # a link under runs/ that leads out of it
    with pytest.raises(FileNotFoundError) as linked:
        run_dir_of("escape")
    with pytest.raises(FileNotFoundError) as missing:
        run_dir_of("nope")
    assert str(linked.value).replace("escape", "X") == str(missing.value).replace("nope", "X")
    with pytest.raises(ConfigError, match="give the run id"):
        run_dir_of(str(tmp_runs / "12"))


def test_check_spec_paths_is_safe_on_every_odd_value(checkout: Path) -> None:
    """Only ConfigError, whatever the value: the check runs before the Spec's own types."""
    deep: list = []
    for _ in range(200):
        deep = [deep]
    odd = [None, "", {"a": "b"}, [], deep, 10**400, float("nan"), True, "x" * 100_000, ["a\0"], [[["x"]]]]
    for kind in jobs.kind_names():
        for key in {*paths.PATH_KEYS.get(kind, ()), *paths.RUN_ID_KEYS.get(kind, ())}:
            for value in odd:
                try:
                    check_spec_paths(kind, {key: value}, checkout)
                except ConfigError as e:
                    assert str(e).startswith(f"{kind}.{key}") and len(str(e)) < 1000
    check_spec_paths("tokenize", ["not", "a", "mapping"], checkout)  # type: ignore[arg-type]


def test_an_allowed_root_may_itself_be_a_link(checkout: Path, tmp_path: Path) -> None:
    """The owner may keep data/ on another disk: a root is followed too, and what lies in it
    is checked against where it really is."""
    disk = tmp_path / "bigdisk"
    (disk / "task").mkdir(parents=True)
    (disk / "big.txt").write_text("many words\n")
    for name in ("train.jsonl", "test.jsonl"):
        (disk / "task" / name).write_text(TASK_LINE)
    (disk / "token").symlink_to(checkout / ".env")
    os.rename(checkout / "data", tmp_path / "old-data")
    (checkout / "data").symlink_to(disk)
    check_spec_paths("tokenize", {"src": ["data/big.txt"]}, checkout)
    check_spec_paths("ablation", {"task_dir": "data/task"}, checkout)
    assert OUTSIDE in refused("tokenize", {"src": ["data/token"]}, checkout)
