"""train: train a model on a tokenized dataset; the run dir gets checkpoints, metrics and a
config.json (models/train.py). A requeued or resumed job continues from its own ckpt_last.pt
exactly where it stopped (`resume`, on by default, so a killed job loses no finished steps).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import config
from config import DATASET_NAME_RE, SAMPLE_DATASET, ConfigError, Validated, show
from jobs import spec_to_dict

LANES = ("gpu", "cpu")


@dataclass(frozen=True)
class Spec(Validated):
    preset: str = "tiny"
    arch: str | None = None  # None: config.default_arch()
    set: dict = field(default_factory=dict)  # config overrides by key, e.g. {"d_model": 128}
    data: str = SAMPLE_DATASET  # a dataset under $LAB_RUNS/data (`lab tokenize`)
    resume: bool = True  # continue from this run's ckpt_last.pt when there is one

    def _check_relations(self) -> None:
        check_config(self)  # names the bad preset, arch or key now, not when the job runs
        # fullmatch: with re.match a `$` would also accept "name\n"
        if not re.fullmatch(DATASET_NAME_RE, self.data):
            raise ConfigError(f"train.data: {show(self.data)} is not a dataset name (letters, digits, '_.-')")


def resolve_config(spec: Any) -> config.Config:
    """The config a train/smoke spec asks for: preset, arch and overrides, all validated."""
    return config.preset(spec.preset, spec.arch or None, **spec.set)


# config.preset names its arguments bare (`preset: ...`, `arch: ...`, `KEY: unknown config key`);
# a spec's error names them as the spec's fields, like every other (`train.preset`, `train.set.KEY`),
# so a person finds the key they wrote. A config field keeps its own name (`model.d_model`).
_BARE_ARGS = re.compile(r"(^|; )(preset|arch)(?=: )")
_BARE_OVERRIDE = re.compile(r"(^|; )([^;:]+)(?=: unknown config key)")


def check_config(spec: Any) -> None:
    """resolve_config at validation, its errors naming the spec's fields (`<kind>.preset`)."""
    kind = type(spec).FIELD_PREFIX or "train"
    try:
        resolve_config(spec)
    except ConfigError as e:
        text = _BARE_ARGS.sub(lambda m: f"{m.group(1)}{kind}.{m.group(2)}", str(e))
        text = _BARE_OVERRIDE.sub(lambda m: f"{m.group(1)}{kind}.set.{m.group(2)}", text)
        raise ConfigError(text) from None


def data_dir_for(name: str) -> Path:
    """$LAB_RUNS/data/<name>; the shipped sample is tokenized on first use."""
    from models.data import dataset_dir, ensure_sample_data

    runs = config.paths().runs
    if name == SAMPLE_DATASET:
        return ensure_sample_data(runs)
    path = dataset_dir(name, runs)
    if not (path / "meta.json").exists():
        raise FileNotFoundError(f"data: no dataset {name!r} at {path} (create it with `lab tokenize`)")
    return path


def resume_values(run_id: str) -> dict[str, Any]:
    """The spec values a foreground run was started with (its spec.json), so `lab train --resume`
    continues it; ConfigError naming --resume when the run cannot be resumed."""
    from jobs.paths import check_run_id

    run_dir = Path(config.paths().runs) / check_run_id(run_id, "--resume")  # a run id, never a path
    spec_file = run_dir / "spec.json"
    if not (run_dir / config.CKPT_LAST).exists() or not spec_file.exists():
        raise ConfigError(f"--resume: {run_dir} holds no resumable training run ({config.CKPT_LAST}, "
                          "spec.json)")
    return {k: v for k, v in json.loads(spec_file.read_text()).items() if k != "kind"}


def run(spec: Spec, ctx: Any) -> dict[str, Any]:
    from models.train import LAST, train

    cfg = resolve_config(spec)
    data_dir = data_dir_for(spec.data)
    resume = spec.resume and (Path(ctx.run_dir) / LAST).exists()
    # The latest session's spec, with the arch resolved now: `lab train --resume` starts from it.
    spec_json = json.dumps({"kind": "train", **spec_to_dict(spec), "arch": cfg.model.arch}, indent=2)
    (Path(ctx.run_dir) / "spec.json").write_text(spec_json + "\n")
    return train(cfg, data_dir, ctx.run_dir, ctx, resume=resume)
