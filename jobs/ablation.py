"""ablation: arms x seeds on a generated task (or a task directory) -> a verdict with its
statistics (harness/ablate.py). The spec is the toml spec of `lab ablate --spec` (task, seeds,
steps or seconds, preset, baseline, primary (required: the cell the verdict reads),
arms), or `spec_file` naming such a file, or
`control` = negative | positive. Writes ablation.json, report.md and accuracy.png.

A key left out means: from the spec file, or the harness's default (harness/ablate.py
AblationSpec).

Example: lab submit ablation --lane cpu --set spec_file=harness/specs/khop_default.toml
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

from config import ConfigError, check_nested, show

LANES = ("cpu", "gpu")
# What harness/ablate.py (and harness/tasks.py under it) can still raise for a strange value
# that passed the checks here: OSError from a task_dir or spec_file name too long for the
# filesystem (Path.is_file/is_dir raise ENAMETOOLONG), or unreadable; UnicodeDecodeError (a
# ValueError) from a spec or task file that is not UTF-8 text.
_HARNESS_LEAKS = (TypeError, ValueError, OverflowError, RecursionError, OSError)
# The harness names a few fields by their bare key; the job's errors name them ablation.<key>,
# like every other field, so the bridge's fix hint and a person find the key they wrote.
_BARE_FIELDS = re.compile(r"(^|; )(spec|task_dir|control)(?=[:. ])")
_FIELD_OF = {"spec": "spec_file", "task_dir": "task_dir", "control": "control"}
# Fields the harness hands to Path() or uses as a dict key before it checks their type.
_PATHLIKE = ("spec_file", "control", "task_dir")


@dataclass(frozen=True)
class Spec:
    """Every key is optional here: one left out comes from spec_file (or the control), else
    from the harness's own default (harness/ablate.py AblationSpec), which requires `arms`,
    `baseline` and `primary`."""

    spec_file: str | None = None  # a toml spec; keys given here as well override the file's
    control: str | None = None  # "negative" | "positive": a shipped control instead
    arms: list | None = None  # [{name, arch, n_steps, set}, ...]
    baseline: str | None = None
    task: str | None = None
    task_dir: str | None = None
    seeds: int | None = None
    seed_offset: int | None = None
    steps: int | None = None
    seconds: float | None = None
    preset: str | None = None
    primary: str | None = None  # the cell the verdict reads: split[:bucket][@depth]
    why: str | None = None
    eval_examples: int | None = None
    eval_depths: list | None = None  # test depths, e.g. [1, 2, 4, 8, 16, 32]
    train_max_difficulty: int | None = None
    matched: list | None = None  # axes the comparison claims to match

    def __post_init__(self) -> None:
        # Before the harness sees them: nan, inf, a 400-digit integer, nesting 200 deep or a
        # string of megabytes anywhere, and a path or control that is not a string, each refused
        # naming its field (the harness would raise TypeError, or ValueError from repr()).
        for f in fields(self):
            value = getattr(self, f.name)
            check_nested(f"ablation.{f.name}", value)
            if f.name in _PATHLIKE and value is not None and not isinstance(value, str):
                raise ConfigError(f"ablation.{f.name}: expected str, got {type(value).__name__} "
                                  f"{show(value)}")
        resolve(self)  # validate everything at submit time: the error names the field

    def given(self) -> dict[str, Any]:
        """The harness keys this spec sets (None means "not given")."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("spec_file", "control") and getattr(self, f.name) is not None}


def resolve(spec: Spec) -> Any:
    """The validated harness.ablate.AblationSpec for this job spec. Only ConfigError comes out,
    naming the field (`ablation.<key>`)."""
    from harness.ablate import control_spec, load_spec_file, parse_spec

    given = spec.given()
    if spec.control and spec.spec_file:
        raise ConfigError("ablation.control: give control or spec_file, not both")
    base = None
    if spec.control or spec.spec_file:
        field = "control" if spec.control else "spec_file"
        with _named(field):
            base = control_spec(spec.control) if spec.control else load_spec_file(spec.spec_file)
        if not given:
            return base
    # The arms, the task (task_dir is read here) and the rest: a leak most likely comes from
    # the task directory, the one place the harness reads files.
    with _named("task_dir" if given.get("task_dir") or (base is not None and base.task_dir) else "arms"):
        return parse_spec({**base.to_dict(), **given} if base is not None else given)


@contextmanager
def _named(field: str) -> Iterator[None]:
    """A harness ConfigError gets its bare field names prefixed (`spec:` -> `ablation.spec_file:`);
    any other exception of _HARNESS_LEAKS becomes a ConfigError naming `ablation.<field>`."""
    try:
        yield
    except ConfigError as e:
        text = _BARE_FIELDS.sub(lambda m: f"{m.group(1)}ablation.{_FIELD_OF[m.group(2)]}", str(e))
        raise ConfigError(text) from None
    except _HARNESS_LEAKS as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise ConfigError(f"ablation.{field}: could not be read ({why})") from None


def run(spec: Spec, ctx: Any) -> dict[str, Any]:
    from harness.ablate import run_ablation

    abl = resolve(spec)
    result = run_ablation(abl, ctx)
    # What each arm changed, as the run read it: the gate compares a full run against these
    # (daemon/admission.py earned_match), not against a spec file that may change later.
    result["arm_specs"] = [{"name": a.name, "arch": a.arch, "n_steps": a.n_steps, "set": dict(a.set)}
                           for a in abl.arms]
    return result
