"""ablation: arms x seeds on a generated task (or a task directory) -> a verdict with its
statistics (harness/ablate.py). The spec is the toml spec of `lab ablate --spec` (task, seeds,
steps or seconds, preset, baseline, primary (required: the cell the verdict reads),
arms), or `spec_file` naming such a file, or
`control` = negative | positive. Writes ablation.json, report.md and accuracy.png.

Keys left at their defaults here ("", 0, -1, []) mean: from the spec file, or the harness's
default (harness/ablate.py AblationSpec).

Example: lab submit ablation --lane cpu --set spec_file=harness/specs/khop_default.toml
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LANES = ("cpu", "gpu")


@dataclass(frozen=True)
class Spec:
    spec_file: str = ""  # a toml spec; keys given here as well override the file's
    control: str = ""  # "negative" | "positive": a shipped control instead
    arms: list = field(default_factory=list)  # [{name, arch, n_steps, set}, ...]
    baseline: str = ""
    task: str = ""
    task_dir: str = ""
    seeds: int = 0
    seed_offset: int = -1
    steps: int = -1
    seconds: float = -1.0
    preset: str = ""
    primary: str = ""
    why: str = ""
    eval_examples: int = 0
    eval_depths: list = field(default_factory=list)  # test depths, e.g. [1, 2, 4, 8, 16, 32]
    train_max_difficulty: int = -1
    matched: list = field(default_factory=list)  # axes the comparison claims to match

    def __post_init__(self) -> None:
        resolve(self)  # validate everything at submit time: the error names the field

    def given(self) -> dict[str, Any]:
        """The harness keys this spec sets (the sentinels above mean 'not given')."""
        unset = {"arms": [], "baseline": "", "task": "", "task_dir": "", "seeds": 0, "seed_offset": -1,
                 "steps": -1, "seconds": -1.0, "preset": "", "primary": "", "why": "", "eval_examples": 0,
                 "eval_depths": [], "train_max_difficulty": -1, "matched": []}
        return {k: getattr(self, k) for k, v in unset.items() if getattr(self, k) != v}


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
