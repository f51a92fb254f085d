"""Job kinds. Each kind is one module with a frozen `Spec` dataclass (its parameters, validated
once, here, for the CLI, GitHub and MCP alike), the lanes it may run in, and `run(spec, ctx)`.

Importing this package never imports torch: job modules import it inside `run`, so the daemon
(which must never initialise CUDA) can validate specs and list kinds cheaply.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Protocol

from config import ConfigError, did_you_mean, from_mapping, show

LANES = ("gpu", "cpu")


class JobContext(Protocol):
    """The only way a job talks back to whoever runs it (a worker, the CLI, a test)."""

    run_dir: Path  # where the job writes its files (created before run is called)
    lane: str  # "gpu" or "cpu"
    device: str  # "cuda" on a GPU lane with a card, else "cpu"

    def progress(self, step: int, total: int, **metrics: float) -> None:
        """Report progress; metrics are the latest values (loss, accuracy, ...)."""

    def log(self, message: str) -> None:
        """One line for the job's log."""


@dataclass(frozen=True)
class JobKind:
    name: str
    spec: type  # a frozen dataclass
    lanes: tuple[str, ...]  # lanes this kind may run in; the first is the default
    run: Callable[[Any, JobContext], dict[str, Any]]  # returns the job's result (JSON-able)
    doc: str


# name -> module under jobs/. A module defines Spec, LANES, run, and a docstring.
_MODULES = {
    "sleep": "jobs.sleep",
    "smoke": "jobs.smoke",
    "train": "jobs.train",
    "eval": "jobs.eval",
    "tokenize": "jobs.tokenize",
    "ablation": "jobs.ablation",
    "archive": "jobs.archive",
}


def kind_names() -> list[str]:
    return [name for name in _MODULES if _module_exists(_MODULES[name])]


def _module_exists(module: str) -> bool:
    return (Path(__file__).parent / (module.split(".")[-1] + ".py")).exists()


def get_kind(name: str) -> JobKind:
    """The kind called `name`; an unknown name is a ConfigError listing the known ones."""
    if not isinstance(name, str) or name not in kind_names():
        close = did_you_mean(name, kind_names()) if isinstance(name, str) else ""
        raise ConfigError(f"kind: unknown job kind {show(name)}{close} (allowed: {', '.join(kind_names())})")
    mod = importlib.import_module(_MODULES[name])
    mod.Spec.FIELD_PREFIX = name  # errors name `<kind>.<field>`: sleep.seconds, not Spec.seconds
    return JobKind(name=name, spec=mod.Spec, lanes=tuple(mod.LANES), run=mod.run,
                   doc=(mod.__doc__ or "").strip())


# What a strange value (a dict where a string belongs, a 400-digit integer, an array nested 200
# deep) might still raise inside a kind's validation, past the checks of config.Validated.
_LEAKS = (TypeError, ValueError, OverflowError, RecursionError, OSError, LookupError, AttributeError)


def route_sets(kind: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """One meaning of `--set` for every kind that trains: a key that is a spec field stays one
    (`preset`, `steps`), a config key (`d_model`, `max_steps`, `model.d_model`) goes into the
    spec's `set` of overrides, and a key that is neither is refused saying so. Kinds without
    `set` are left as they are."""
    from dataclasses import fields

    from config import CONFIG_KEYS, split_key

    names = [f.name for f in fields(get_kind(kind).spec)]
    if "set" not in names:
        return dict(values)
    out = dict(values)
    overrides = out.get("set", {})
    if not isinstance(overrides, Mapping):
        return out  # the Spec names the bad type
    overrides = dict(overrides)
    for key in list(out):
        if key in names or not isinstance(key, str):
            continue
        try:
            split_key(key)
        except ConfigError:
            close = did_you_mean(key, [*names, *CONFIG_KEYS])
            raise ConfigError(f"{kind}.{key}: neither a {kind} field ({', '.join(names)}) nor a config "
                              f"key (model, train and precision settings: `lab kinds`, config.py){close}"
                              ) from None
        overrides[key] = out.pop(key)
    if overrides or "set" in out:
        out["set"] = overrides
    return out


def parse_spec(kind: str, values: Mapping[str, Any]) -> Any:
    """Untrusted keys and values -> the kind's validated Spec (ConfigError names the field).
    Only ConfigError comes out: the bridge, MCP and the CLI turn it into a message for a person,
    and anything else would be a crash (or a traceback in an issue comment) instead. A config
    key given beside the spec's fields is one of its overrides (`route_sets`)."""
    spec_cls = get_kind(kind).spec
    if not isinstance(values, Mapping):
        raise ConfigError(f"{kind}: expected a table of keys and values, got {type(values).__name__}")
    values = route_sets(kind, values)
    try:
        return from_mapping(spec_cls, dict(values), where=kind)
    except ConfigError:
        raise
    except _LEAKS as e:
        # A last resort: every known case is refused, naming its field, before it gets here
        # (tests/test_config.py feeds each kind's fields wrong values and asserts it).
        raise ConfigError(f"{kind}: a value could not be validated "
                          f"({type(e).__name__}: {show(str(e))})") from None


def check_lane(kind: str, lane: str | None) -> str:
    """The lane to use: `lane` if the kind allows it, the kind's default if None."""
    jk = get_kind(kind)
    if lane is None:
        return jk.lanes[0]
    if not isinstance(lane, str) or lane not in LANES:
        raise ConfigError(f"lane: {show(lane)} is not a lane (allowed: {', '.join(LANES)})")
    if lane not in jk.lanes:
        raise ConfigError(f"lane: kind {kind!r} cannot run in lane {lane!r} (allowed: {', '.join(jk.lanes)})")
    return lane


def spec_to_dict(spec: Any) -> dict[str, Any]:
    """The spec as a person would write it: keys left at None (not given) are left out."""
    assert is_dataclass(spec)
    return {k: v for k, v in asdict(spec).items() if v is not None}  # type: ignore[arg-type]
