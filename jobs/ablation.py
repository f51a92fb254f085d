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

from dataclasses import dataclass, fields
from typing import Any

LANES = ("cpu", "gpu")


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
        resolve(self)  # validate everything at submit time: the error names the field

    def given(self) -> dict[str, Any]:
        """The harness keys this spec sets (None means "not given")."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("spec_file", "control") and getattr(self, f.name) is not None}


def resolve(spec: Spec) -> Any:
    """The validated harness.ablate.AblationSpec for this job spec."""
    from config import ConfigError
    from harness.ablate import control_spec, load_spec_file, parse_spec

    given = spec.given()
    if spec.control and spec.spec_file:
        raise ConfigError("ablation.control: give control or spec_file, not both")
    if spec.control or spec.spec_file:
        base = control_spec(spec.control) if spec.control else load_spec_file(spec.spec_file)
        return parse_spec({**base.to_dict(), **given}) if given else base
    return parse_spec(given)


def run(spec: Spec, ctx: Any) -> dict[str, Any]:
    from harness.ablate import run_ablation

    return run_ablation(resolve(spec), ctx)
