"""Which files and runs a job spec may name, checked before the job is queued.

A spec's values come from people the lab does not fully trust (an issue on GitHub, the agent
through MCP or the CLI). A spec that names a file makes a job read it: `tokenize` copies it into
a dataset that every user of the runs directory can read, `ablation` parses its spec file and
task files. So before a spec is validated (which looks at the files and says whether they
exist), `check_spec_paths` resolves every path it names (symlinks followed) and refuses any that
is not inside one of a few directories of the checkout (ALLOWED_ROOTS), any dotfile or
dot-directory (.env holds GITHUB_TOKEN, .git/config, .claude/...), and the queue database. Runs
are named by run id only, never by path.

    check_spec_paths("tokenize", {"src": [".env"], "name": "x"}, CHECKOUT)
    ConfigError: tokenize.src: '.env' names a hidden file or directory ...

A refusal of a path outside the allowed roots says the same whether or not it exists, and looks
at nothing there: the error is no way to probe the machine.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import config
from config import NOT_RUN_IDS, RUN_ID_RE, ConfigError, show

CHECKOUT = Path(__file__).resolve().parents[1]  # the lab's checkout; the daemon runs in it

# The directories, relative to the checkout, that each path key may name a file in. Jobs resolve
# a relative path against their working directory, the daemon's: the checkout.
ALLOWED_ROOTS: dict[str, tuple[str, ...]] = {
    # Ablation specs are committed here (harness/ablate.py SPECS_DIR; the controls live there).
    "spec_file": ("harness/specs",),
    "task_dir": (
        # A spec's task_dir is read relative to the spec file (harness/ablate.load_spec_file),
        # so a bring-your-own task ships beside the spec that uses it.
        "harness/specs",
        # Data a person puts on the machine for jobs to read: task directories
        # (train.jsonl, test*.jsonl: harness/tasks.DirTask) and texts to tokenize.
        "data",
    ),
    "src": (
        # The shipped sample text (models/tokenizer.SAMPLE_TEXT), and the tokenizer's files.
        "models/assets",
        "data",  # as above: texts a person put there to be tokenized
    ),
}
# Keys that name a run: a run id (config.RUN_ID_RE), one name under $LAB_RUNS, never a path. The
# runs directory holds every job's files (logs, results, checkpoints torch.load unpickles):
# no spec may name a file in it.
RUN_ID_KEYS: dict[str, tuple[str, ...]] = {"eval": ("run",), "archive": ("runs",)}
# Every other field of every kind's Spec, said to name no file: tests/test_paths.py fails when a
# kind gains a field that is in none of these three tables, so a new path key cannot go unchecked.
NOT_PATHS: dict[str, tuple[str, ...]] = {
    "sleep": ("seconds", "fail", "exit_code", "signal", "child"),
    "smoke": ("preset", "arch", "steps", "set", "arms"),  # ablation: checked as an ablation (NESTED_SPECS)
    "train": ("preset", "arch", "set", "data", "resume", "task", "n_steps", "eval_depths", "eval_examples",
              "train_max_difficulty", "primary", "seed", "arm"),  # data: a dataset name, DATASET_NAME_RE
    "eval": ("n_steps", "batches", "checkpoint"),
    "tokenize": ("name", "text_field", "force"),  # name: a dataset name, DATASET_NAME_RE
    "ablation": ("control", "arms", "baseline", "task", "seeds", "seed_offset", "steps", "seconds",
                 "preset", "primary", "why", "eval_examples", "eval_depths",
                 "train_max_difficulty", "matched"),
    "archive": ("older_than_days",),
}
# Path keys by kind (a key is checked only for the kinds that have it).
PATH_KEYS: dict[str, tuple[str, ...]] = {"tokenize": ("src",), "ablation": ("spec_file", "task_dir"),
                                         "train": ("task_dir",)}
# Keys that hold a whole spec of another kind, checked as that kind (a smoke of an ablation's arms).
NESTED_SPECS: dict[str, dict[str, str]] = {"smoke": {"ablation": "ablation"}}
# Longer than any path a person types; refused before it reaches the filesystem (ENAMETOOLONG).
MAX_PATH_CHARS = 1024
# The files of the queue's SQLite database besides the database itself.
DB_SUFFIXES = ("", "-wal", "-shm", "-journal")


def check_spec_paths(kind: str, values: Mapping[str, Any], root: Path | str = CHECKOUT) -> None:
    """Refuse, with a ConfigError naming the field (`tokenize.src: ...`), a spec of `kind` whose
    values name a file or directory the job must not read: outside ALLOWED_ROOTS of `root` after
    symlinks are resolved, a dotfile or dot-directory, the queue database, anything under
    $LAB_RUNS or the archive; or a run named other than by run id. Call it before the kind's
    Spec validates the values (parse_spec reports whether a file exists). `root` is the
    checkout, the directory the job will resolve relative paths against."""
    if not isinstance(values, Mapping):
        return  # parse_spec refuses it, naming the kind
    root = Path(root).resolve()
    for key in RUN_ID_KEYS.get(kind, ()):
        for run in _strings(kind, key, values.get(key)):
            check_run_id(run, f"{kind}.{key}")
    for key in PATH_KEYS.get(kind, ()):
        for given in _strings(kind, key, values.get(key)):
            resolved = check_path(f"{kind}.{key}", given, ALLOWED_ROOTS[key], root)
            if key == "task_dir":
                _check_task_files(f"{kind}.{key}", given, root)
            if key == "spec_file":
                _check_spec_file(f"{kind}.{key}", given, resolved, root)
    for key, inner in NESTED_SPECS.get(kind, {}).items():
        if isinstance(values.get(key), Mapping):
            try:
                check_spec_paths(inner, values[key], root)
            except ConfigError as e:
                raise ConfigError(f"{kind}.{key}.{str(e).removeprefix(inner + '.')}") from None


def check_run_id(run: str, where: str) -> str:
    """`run` if it is a run id (config.RUN_ID_RE: one name under $LAB_RUNS), else ConfigError
    naming `where`. A path is refused as a path, without looking at it."""
    if not run.strip():
        raise ConfigError(f"{where}: give a run id (a job id, or a run name like "
                          "train-20261125-173000-abc123)")
    if "/" in run or "\\" in run or run.startswith("."):
        raise ConfigError(f"{where}: {show(run)} is a path; give the run id, the name of its directory "
                          "under $LAB_RUNS (a job id, or e.g. train-20261125-173000-abc123)")
    if not re.fullmatch(RUN_ID_RE, run) or run in NOT_RUN_IDS:
        raise ConfigError(f"{where}: {show(run)} is not a run id (letters, digits, '_.-'; a job id, or "
                          "e.g. train-20261125-173000-abc123)")
    return run


def check_path(where: str, given: str, allowed: tuple[str, ...], root: Path) -> Path:
    """The resolved path `given` names (relative to `root` unless absolute), or ConfigError
    naming `where` when it is not a path the lab may read (the module docstring)."""
    if "\0" in given or len(given) > MAX_PATH_CHARS:
        raise ConfigError(f"{where}: {show(given)} is not a usable path (a NUL byte, or over "
                          f"{MAX_PATH_CHARS} characters)")
    if not Path(given).is_absolute():  # by its text, before anything is looked up
        if ".." in Path(given).parts:
            raise ConfigError(f"{where}: {given!r} climbs with '..' (outside the lab's allowed "
                              f"directories): name a path under {_listed(allowed)} in the lab's checkout")
        if _hidden(Path(given).parts):
            raise ConfigError(f"{where}: {given!r} names a hidden file or directory (a component "
                              "starting with '.', such as .env or .git); the lab reads none")
    outside = ConfigError(f"{where}: {given!r} is outside the lab's allowed directories: name a path "
                          f"under {_listed(allowed)} in the lab's checkout")
    roots = [_root_dir(root, r) for r in allowed]
    # First by the text alone (`..` folded), so a path outside the roots touches no filesystem
    # entry there: the refusal is the same whether it exists, is a link, or is not there at all.
    lexical = Path(os.path.normpath(root / given))
    inside = next((r for r in roots if lexical.is_relative_to(r)), None)
    if inside is None:
        raise outside
    if _hidden(lexical.relative_to(inside).parts):  # an absolute path to a dotfile in a root
        raise ConfigError(f"{where}: {given!r} names a hidden file or directory; the lab reads none")
    try:
        resolved = lexical.resolve()  # follows every symlink on the way
        real_roots = [r.resolve() for r in roots]
    except (OSError, RuntimeError, ValueError):  # a symlink loop (RuntimeError on Python 3.11)
        raise outside from None
    inside = next((r for r in real_roots if resolved.is_relative_to(r)), None)
    if inside is None:  # a link in an allowed root that leads out of them
        raise outside
    if _hidden(resolved.relative_to(inside).parts):  # a link to a dotfile inside a root
        raise ConfigError(f"{where}: {given!r} leads to a hidden file or directory; the lab reads none")
    paths = config.paths()
    if any(resolved == Path(paths.db + suffix).resolve() for suffix in DB_SUFFIXES):
        raise ConfigError(f"{where}: {given!r} is the queue database; the lab reads it only itself")
    # A LAB_RUNS or LAB_ARCHIVE set inside an allowed root: runs are named by run id, never path.
    for tree in (paths.runs, paths.archive):
        if resolved.is_relative_to(Path(tree).resolve()):
            raise ConfigError(f"{where}: {given!r} is in the runs directory or the archive; name a run "
                              "by its run id")
    return resolved


def _root_dir(root: Path, name: str) -> Path:
    """An allowed root as a directory: `data` may live elsewhere (LAB_DATA: a big disk, or a
    test's tmp dir); the others are always the checkout's own."""
    if name == "data" and os.environ.get("LAB_DATA"):
        return Path(os.path.normpath(Path(os.environ["LAB_DATA"]).absolute()))
    return root / name


def _listed(allowed: tuple[str, ...]) -> str:
    return " or ".join(r + "/" for r in allowed)


def _hidden(parts: tuple[str, ...]) -> bool:
    return any(p.startswith(".") for p in parts if p != "/")


def _strings(kind: str, key: str, value: Any) -> list[str]:
    """The non-empty strings a path key's value holds (one, or a list for tokenize.src). An
    empty one names nothing (the job ignores it); any other type is refused here."""
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        if item is None or item == "":
            continue
        if not isinstance(item, str):
            raise ConfigError(f"{kind}.{key}: expected a path (a string), "
                              f"got {type(item).__name__} {show(item)}")
        out.append(item)
    return out


def _check_task_files(where: str, task_dir: str, root: Path) -> None:
    """The files a task directory's task reads (harness/tasks.DirTask: train.jsonl, test*.jsonl)
    are checked like the directory: a link among them must not lead out of the allowed roots.
    `task_dir` is as given (already checked), so each file is named through it, as DirTask does."""
    d = root / task_dir
    if not d.is_dir():
        return  # the ablation's own validation says it is not a directory
    for f in [d / "train.jsonl", *sorted(d.glob("test*.jsonl"))]:
        if f.exists() or f.is_symlink():
            check_path(f"{where} ({f.name})", str(f), ALLOWED_ROOTS["task_dir"], root)


def _check_spec_file(where: str, given: str, spec_file: Path, root: Path) -> None:
    """A spec file's own task_dir (relative to the spec file, as harness/ablate.load_spec_file
    reads it) is checked like a task_dir given in the spec."""
    try:
        values = tomllib.loads(spec_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # not there, not TOML: the ablation says so
        return
    task_dir = values.get("task_dir")
    if not isinstance(task_dir, str) or not task_dir:
        return
    near = Path(given) if Path(given).is_absolute() else root / given
    path = task_dir if Path(task_dir).is_absolute() else str(near.parent / task_dir)
    check_path(f"{where} (its task_dir)", path, ALLOWED_ROOTS["task_dir"], root)
    _check_task_files(f"{where} (its task_dir)", path, root)
