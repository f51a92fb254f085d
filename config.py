"""The single source of truth for every constant of the lab.

Architecture, training, precision, ablation and queue settings are frozen dataclasses; named
presets combine them; overrides are validated by name. Importing this module never imports
torch, so the daemon and the CLI stay light.

    >>> cfg = preset("tiny", arch="reasoner", d_model=32)
    >>> cfg.model.d_model
    32
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import reprlib
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

# The architecture used when a caller names none; `LAB_MODEL_ARCH` overrides it.
MODEL_ARCH = "refiner"
ARCHS = ("refiner", "reasoner")

TOKENIZER_NAME = "r50k_base"
TOKENIZER_VOCAB = 50257
# `smoke` passes only when the eval loss on fixed batches falls by at least this fraction.
SMOKE_MIN_DROP = 0.01
# A smoke stays a smoke: it asks "does it build and learn at all?" in seconds to minutes, so a
# longer budget is a training run (the `train` kind), not a check that may skip the queue's gate.
SMOKE_MAX_STEPS = 1000
TOKENIZER_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

# Token datasets (models/data.py) live in $LAB_RUNS/data/<name>/ as uint16 shards of at most
# DATA_SHARD_TOKENS tokens (128 MB); the shipped text is tokenized on first use as SAMPLE_DATASET.
DATA_SHARD_TOKENS = 1 << 26
SAMPLE_DATASET = "sample"
# One path component. Use it with re.fullmatch; the `\Z` (not `$`, which also matches before a
# trailing newline) keeps a caller that still uses re.match from accepting "name\n" too.
DATASET_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}\Z"
# A run's directory name under $LAB_RUNS, one path component: a queue job's id ("12"), a
# foreground run (`kind-YYYYmmdd-HHMMSS-<6 hex>`, cli._new_run_id), an ablation from the CLI
# (`ablate-<UTC stamp>`, harness/ablate.new_run_dir). Never a path; use it with re.fullmatch.
RUN_ID_RE = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"
# Directories under $LAB_RUNS that are not runs (records.NOT_RUNS says the same): token datasets.
NOT_RUN_IDS = frozenset({"data"})

# Every number a spec or setting accepts is finite and, if an integer, at most 2^53 in
# magnitude: nan passes every range check (all its comparisons are false), and a 400-digit
# integer overflows float() or str() somewhere downstream instead of being refused here.
MAX_INT = 2**53
# Spec values are TOML or JSON written by people: a few levels of tables and lists at most. A
# deeper value is refused before anything recurses into it (repr, asdict, a walk) and overflows.
MAX_NESTING = 32
# No name, path or reason (`why`) needs more; a longer string would only come back, whole, in
# the error that refuses it (an issue comment, a log line).
MAX_STRING_CHARS = 10_000


class ConfigError(ValueError):
    """A bad preset, key, type or value. The message is one line and names the field."""


def _meta(lo: float | None = None, hi: float | None = None, doc: str = "") -> dict[str, Any]:
    return {"min": lo, "max": hi, "doc": doc}


def setting(default: Any, lo: float | None = None, hi: float | None = None, doc: str = "") -> Any:
    """A dataclass field with its allowed range [lo, hi] and a one-line doc (`lab kinds` shows it);
    job Specs declare their fields with it too."""
    return field(default=default, metadata=_meta(lo, hi, doc))


def did_you_mean(key: str, known: typing.Iterable[str]) -> str:
    """" (did you mean d_model?)" for the closest known name, or "" when none is close."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


class Validated:
    """Mixin: every construction checks types, choices and ranges of all fields, and reports
    every bad field at once, each named `<owner>.<field>` (`model.d_model`, `sleep.seconds`).
    Before any of that, every value (and everything nested in a table or list) must be a finite
    number, an integer of at most 2^53, a string of at most MAX_STRING_CHARS, nested at most
    MAX_NESTING deep (check_nested)."""

    FIELD_PREFIX: typing.ClassVar[str] = ""  # the owner in error names; default the class name

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        owner = type(self).FIELD_PREFIX or type(self).__name__
        problems = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            try:
                checked = _check_value(owner, f.name, hints[f.name], value, f.metadata)
            except ConfigError as e:
                problems.append(str(e))
                continue
            if checked is not value:
                object.__setattr__(self, f.name, checked)
        if problems:
            raise ConfigError("; ".join(problems))
        self._check_relations()

    def _check_relations(self) -> None:
        pass


def type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if type(None) in args and len(args) == 2:  # X | None: an optional X
        return type_name(next(a for a in args if a is not type(None)))
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


class _ShortRepr(reprlib.Repr):
    """repr for error messages: bounded in length and depth, and safe for an integer too long
    for str() (Python refuses to print more than 4300 digits)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother = 3, 120, 120
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = 6

    def repr_int(self, x: int, level: int) -> str:
        return describe_int(x)


_short = _ShortRepr()


def show(value: Any) -> str:
    """`value` as an error message shows it: repr, cut to a few dozen characters."""
    return _short.repr(value)


def describe_int(x: int) -> str:
    """An integer, shortened when long: `1000...0 (400 digits)`."""
    if x.bit_length() > 14_000:  # beyond ~4200 digits str() refuses; say roughly how many
        return f"{'-' if x < 0 else ''}an integer of about {int(x.bit_length() * math.log10(2)) + 1} digits"
    digits = str(abs(x))
    sign = "-" if x < 0 else ""
    if len(digits) <= 20:
        return f"{sign}{digits}"
    return f"{sign}{digits[:4]}...{digits[-1]} ({len(digits)} digits)"


def check_number(where: str, value: Any) -> None:
    """Refuse a non-finite float or an integer beyond 2^53 (see MAX_INT); anything else passes."""
    if isinstance(value, bool):
        return
    if isinstance(value, int) and abs(value) > MAX_INT:
        raise ConfigError(f"{where}: {describe_int(value)} is beyond {'-' if value < 0 else ''}2^53")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {value!r} is not a finite number")


def check_nested(where: str, value: Any, depth: int = 0) -> None:
    """Walk a value of tables and lists (a `set = {...}`, ablation arms) and refuse, naming the
    path to it (`train.set.lr`, `ablation.arms[1].set`): a non-finite or huge number, a table
    key that is not a string, nesting deeper than MAX_NESTING, a string longer than
    MAX_STRING_CHARS. Types are the owner's to check."""
    if depth > MAX_NESTING:
        raise ConfigError(f"{where}: nested more than {MAX_NESTING} levels deep")
    if isinstance(value, dict):
        for key, inner in value.items():
            if not isinstance(key, str):
                raise ConfigError(f"{where}: table key {show(key)} is not a string")
            check_nested(f"{where}.{key}", inner, depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, inner in enumerate(value):
            check_nested(f"{where}[{i}]", inner, depth + 1)
    elif isinstance(value, str) and len(value) > MAX_STRING_CHARS:
        raise ConfigError(f"{where}: a string of {len(value):,} characters is too long "
                          f"(at most {MAX_STRING_CHARS:,})")
    else:
        check_number(where, value)


def _check_value(owner: str, name: str, tp: Any, value: Any, meta: Any) -> Any:
    """Return `value` (coerced int->float, list->tuple) or raise ConfigError naming the field.
    An optional field (`X | None`) accepts None, meaning "not given"."""
    args = typing.get_args(tp)
    if type(None) in args and len(args) == 2:
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
    origin = typing.get_origin(tp)
    where = f"{owner}.{name}"
    # First, before any comparison, conversion or repr can trip over it: nan, inf, a 400-digit
    # integer (float() of it overflows, str() of a longer one raises), absurd nesting.
    check_nested(where, value)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {show(value)} is not allowed "
                              f"(allowed: {', '.join(map(str, allowed))})")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {type_name(tp)}, got {type(value).__name__} {show(value)}")
        inner = typing.get_args(tp)[0]
        return tuple(_check_value(owner, name, inner, v, meta) for v in value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # exact: |value| <= 2^53 was checked above
    ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{where}: expected {type_name(tp)}, got {type(value).__name__} {show(value)}")
    lo, hi = (meta.get("min"), meta.get("max")) if meta else (None, None)
    if lo is not None and value < lo or hi is not None and value > hi:
        span = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ConfigError(f"{where}: {show(value)} is out of range (allowed: {span})")
    return value


# --------------------------------------------------------------------------------------------
# Model, training, precision


@dataclass(frozen=True)
class ModelConfig(Validated):
    FIELD_PREFIX = "model"
    arch: Literal["refiner", "reasoner"] = "refiner"
    vocab_size: int = setting(TOKENIZER_VOCAB, 2, 1_000_000, "ids >= vocab_size fold into the last id")
    block_size: int = setting(256, 8, 65_536, "context length in tokens")
    d_model: int = setting(256, 8, 8192)
    n_heads: int = setting(4, 1, 128)
    mlp_hidden: int = setting(0, 0, 65_536, "SwiGLU hidden width; 0 means 8/3 * d_model rounded to 64")
    n_prelude: int = setting(2, 0, 128, "refiner: causal blocks before the shared loop")
    n_layers: int = setting(4, 1, 128, "reasoner: blocks it owns (the most it can apply)")
    depth_min: int = setting(1, 1, 128, "training depth range (refiner: loop passes K; reasoner: layers)")
    depth_max: int = setting(6, 1, 128)
    depth_eval: int = setting(4, 1, 128, "depth at inference unless n_steps is given")
    depth_dist: Literal["uniform", "poisson"] = "uniform"
    backprop_steps: int = setting(4, 1, 128, "refiner: gradients flow through the last N passes only")
    activation_checkpointing: bool = False
    rope_base: float = setting(10_000.0, 1.0, 1e9)
    norm_eps: float = setting(1e-6, 0.0, 1.0)
    gate_bias_init: float = setting(0.0, -10.0, 10.0, "refiner: sigmoid(bias) is the initial blend")
    # Refiner design variants (models/refiner.py's docstring shows each); the defaults are the
    # seed design, so a config that names none of them builds exactly the original model.
    update_rule: Literal["gated_residual", "gated_blend", "replace"] = setting(
        "gated_residual", doc="refiner: how a pass's output c = block(x) enters the state h")
    time_signal: Literal["sinusoid", "none", "learned", "random_offset"] = setting(
        "sinusoid", doc="refiner: what tells a pass its index k")
    time_offset_max: int = setting(8, 0, 1024,
                                   "refiner, random_offset: training pass indices start at U{0..this}")
    init_state: Literal["zeros", "noise"] = setting("zeros", doc="refiner: the state h before the first pass")
    state_noise_std: float = setting(0.02, 0.0, 100.0, "refiner, init_state=noise: h0 ~ N(0, this^2)")
    init_scale_depth: Literal["depth_eval", "distinct_blocks"] = setting(
        "depth_eval", doc="refiner: output projections init as if n_prelude + depth_eval (or + 1) blocks")
    progressive_loss_weight: float = setting(
        0.0, 0.0, 1.0, "refiner: weight w of Bansal et al.'s progressive loss; 0 turns it off")
    init_std: float = setting(0.02, 0.0, 1.0)
    loss_chunk_tokens: int = setting(2048, 16, 1 << 24, "rows of logits computed at once in the loss")

    def _check_relations(self) -> None:
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ConfigError(
                f"model.n_heads: d_model={self.d_model} must split into {self.n_heads} "
                "heads of even size"
            )
        if self.depth_min > self.depth_max:
            raise ConfigError(f"model.depth_min: {self.depth_min} > depth_max {self.depth_max}")
        if self.arch == "reasoner" and self.depth_max > self.n_layers:
            raise ConfigError(
                f"model.depth_max: {self.depth_max} > n_layers {self.n_layers} "
                "(the reasoner cannot apply more layers than it owns)"
            )
        if self.arch == "reasoner" and self.depth_eval > self.n_layers:
            raise ConfigError(f"model.depth_eval: {self.depth_eval} > n_layers {self.n_layers}")
        # A variant whose knob makes it the default in disguise is refused, so an ablation arm
        # cannot silently test nothing.
        if self.time_signal == "random_offset" and self.time_offset_max < 1:
            raise ConfigError(f"model.time_offset_max: {self.time_offset_max} must be >= 1 with "
                              "time_signal='random_offset' (0 is plain 'sinusoid')")
        if self.init_state == "noise" and self.state_noise_std <= 0:
            raise ConfigError(f"model.state_noise_std: {self.state_noise_std:g} must be > 0 with "
                              "init_state='noise' (0 is plain 'zeros')")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        return ((8 * self.d_model // 3) + 63) // 64 * 64


@dataclass(frozen=True)
class TrainConfig(Validated):
    FIELD_PREFIX = "train"
    batch_size: int = setting(16, 1, 65_536)
    grad_accum: int = setting(1, 1, 4096)
    lr: float = setting(6e-4, 0.0, 10.0)
    min_lr: float = setting(6e-5, 0.0, 10.0)
    warmup_steps: int = setting(100, 0, 10_000_000)
    max_steps: int = setting(2000, 1, 100_000_000, "budget in optimizer steps (and the cosine length)")
    max_seconds: float = setting(0.0, 0.0, 1e9, "wall-clock budget; 0 means steps only")
    weight_decay: float = setting(0.1, 0.0, 10.0)
    beta1: float = setting(0.9, 0.0, 1.0)
    beta2: float = setting(0.95, 0.0, 1.0)
    grad_clip: float = setting(1.0, 0.0, 1e6, "0 disables clipping")
    eval_interval: int = setting(200, 1, 100_000_000)
    eval_batches: int = setting(20, 1, 100_000)
    log_interval: int = setting(10, 1, 100_000_000)
    ckpt_interval: int = setting(200, 1, 100_000_000)
    val_fraction: float = setting(0.05, 0.0, 0.5, "tail of the token stream held out for eval")
    seed: int = setting(1337, 0, 2**31 - 1)
    threads: int = setting(0, 0, 1024, "torch CPU threads; 0 leaves torch's default")
    # torch.compile of the model's forward + loss in the training step (models/step.py; the
    # optimizer stays eager). Off by default, by bench/train_speed.py --compile on 2 CPU cores:
    # compiled steps 1.42x (refiner) and 1.40x (plain GPT) faster on a quiet box (2026-12-02;
    # 1.25x / 1.21x under load the day before), but compiling took 37 s and 17 s per graph from
    # a cold cache (118 s / 51 s under load), and a refiner compiles one graph per loop depth it
    # samples: ~850 steps per depth before it pays (43 ms saved a step), where the default
    # ablation's refiner arm trains 600 steps over 6 depths and a smoke 40. On a card, run the
    # bench there (compile time and speed-up both change) before turning it on.
    compile: bool = setting(False, doc="torch.compile the model's forward and loss in training "
                            "(CPU: 1.2-1.4x per step, 0.5-2 min of compiling per depth; see config.py)")


@dataclass(frozen=True)
class PrecisionConfig(Validated):
    FIELD_PREFIX = "precision"
    # Turing (RTX 2060) has fp16 tensor cores and no bfloat16; there is no bfloat16 choice.
    cuda_dtype: Literal["float16", "float32"] = "float16"
    cpu_dtype: Literal["float32"] = "float32"
    grad_scaler_init: float = setting(2.0**16, 1.0, 2.0**32)
    grad_scaler_growth_interval: int = setting(2000, 1, 1_000_000)
    # RMSNorm and the loss always run in fp32; these are statements of the policy, not knobs.
    norm_fp32: Literal[True] = True
    loss_fp32: Literal[True] = True
    gpu_memory_fraction: float = setting(0.0, 0.0, 1.0, "cap the card (0 = no cap)")


@dataclass(frozen=True)
class Config:
    name: str
    model: ModelConfig
    train: TrainConfig
    precision: PrecisionConfig = PrecisionConfig()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Config:
        return Config(
            name=d["name"],
            model=ModelConfig(**d["model"]),
            train=TrainConfig(**d["train"]),
            precision=PrecisionConfig(**d.get("precision", {})),
        )


_SECTIONS = {"model": ModelConfig, "train": TrainConfig, "precision": PrecisionConfig}


def _key_owner() -> dict[str, str]:
    owners: dict[str, str] = {}
    for section, cls in _SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.name not in owners, f"config key {f.name} is defined twice"
            owners[f.name] = section
    return owners


CONFIG_KEYS = _key_owner()

# Presets: partial overrides of the defaults above, per section; "refiner" and "reasoner" hold
# model overrides for that architecture only (its depth range, mostly).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # Tests: well under 1M parameters, a forward pass in milliseconds. The small vocabulary
    # folds rare r50k tokens (high BPE ranks) into one id, so the real tokenizer still works.
    "tiny": {
        "model": dict(vocab_size=2048, block_size=64, d_model=64, n_heads=2, n_prelude=1,
                      n_layers=3, backprop_steps=2, loss_chunk_tokens=256),
        "refiner": dict(depth_min=1, depth_max=3, depth_eval=2),
        "reasoner": dict(depth_min=1, depth_max=3, depth_eval=3),
        "train": dict(batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=5, max_steps=60,
                      eval_interval=20, eval_batches=2, log_interval=5, ckpt_interval=20,
                      weight_decay=0.0, threads=1),  # ops this small gain nothing from threads
    },
    # The ablation harness: a small model that learns generated tasks on 2 CPU cores in minutes.
    # vocab_size and block_size are set by the task.
    # Calibrated by measurement (README "Ablations"): d_model 64 halves the step time of 128
    # (matmuls dominate) and still learns khop; 600 steps keep 3 seeds x 2 arms under 10 min.
    "ablation": {
        "model": dict(vocab_size=64, block_size=64, d_model=64, n_heads=4, n_prelude=1,
                      n_layers=4, backprop_steps=4, loss_chunk_tokens=4096),
        "refiner": dict(depth_min=1, depth_max=6, depth_eval=4),
        "reasoner": dict(depth_min=4, depth_max=4, depth_eval=4),
        "train": dict(batch_size=32, lr=3e-3, min_lr=3e-4, warmup_steps=50, max_steps=600,
                      eval_interval=250, eval_batches=4, weight_decay=0.0, grad_clip=1.0,
                      threads=1),
    },
    # The full run on one RTX 2060 (6 GB, fp16): the widest model whose fp16 training step at
    # micro-batch 8 x 1024 peaks under 5.5 GiB at the deepest training depth (bench/memory.py:
    # refiner 89.9M params 5.03 GiB, reasoner 109.4M params 5.12 GiB). The 512-row loss chunk
    # keeps the 50,257-wide logits of backward near 0.35 GiB.
    "rtx2060": {
        "model": dict(block_size=1024, d_model=768, n_heads=12, n_prelude=6, n_layers=10,
                      backprop_steps=4, activation_checkpointing=False, loss_chunk_tokens=512),
        "refiner": dict(depth_min=1, depth_max=8, depth_eval=4),
        "reasoner": dict(depth_min=6, depth_max=10, depth_eval=10),
        "train": dict(batch_size=8, grad_accum=8, lr=6e-4, min_lr=6e-5, warmup_steps=500,
                      max_steps=20_000, eval_interval=500, eval_batches=40, ckpt_interval=500),
        "precision": dict(gpu_memory_fraction=0.0),
    },
    # A full run on a harness task (a `train` job with `task` or `task_dir`) on the RTX 2060:
    # the rtx2060 model dims, fp16. vocab_size and block_size are placeholders: the task sets
    # them (jobs/train.resolve_config), so a task line is 9-54 tokens and 64 lines make a step;
    # the loss chunk covers a whole micro-batch since a task's logits are a few ids wide. The
    # recipe is the ablation preset's (no weight decay) at an lr for this width.
    # Measured: nothing on a card (none was available). Estimated with bench/memory.py on fake
    # tensors (fp16 autocast, deepest training depth, `--set vocab_size=14 block_size=54`, the
    # largest of the four tasks, micro-batch 64): peak 2.19 GiB for the refiner (51.3M params),
    # 2.42 GiB for the reasoner (70.8M, all 10 layers); ~1.4 GiB of it activations. Fitting 6 GB
    # is an estimate that leaves ~3.5 GiB for the CUDA context and fragmentation, not a
    # measurement; nor is any step time.
    "rtx2060_task": {
        "model": dict(vocab_size=64, block_size=64, d_model=768, n_heads=12, n_prelude=6, n_layers=10,
                      backprop_steps=4, activation_checkpointing=False, loss_chunk_tokens=4096),
        "refiner": dict(depth_min=1, depth_max=8, depth_eval=4),
        "reasoner": dict(depth_min=6, depth_max=10, depth_eval=10),
        "train": dict(batch_size=64, grad_accum=1, lr=6e-4, min_lr=6e-5, warmup_steps=500,
                      max_steps=20_000, eval_interval=500, eval_batches=8, ckpt_interval=500,
                      weight_decay=0.0, grad_clip=1.0),
        "precision": dict(gpu_memory_fraction=0.0),
    },
}


# A training run's checkpoints: the latest (to resume) and the best by val_loss (to use).
CKPT_LAST, CKPT_BEST = "ckpt_last.pt", "ckpt_best.pt"


@dataclass(frozen=True)
class GateConfig(Validated):
    """The earned-run gate (daemon/service.py check_gate). A GPU job whose compute estimate
    (jobs/cost.py) reaches either threshold is a full run, whatever its kind or preset: the queue
    takes it only when an ablation earned it (--earned-by: a tested arm that made the same change,
    verdict `better`) or a person forced it (--force --reason).

    1e15 FLOPs is about 40 times the pre-registered chase ablation (4 arms x 3 seeds, ~2.5e13)
    and about two minutes of an RTX 2060 at a third of its 25.8 TFLOPS fp16 peak; a full run at
    rtx2060_task is ~3e16 and at rtx2060 ~1e18."""

    FIELD_PREFIX = "gate"
    full_run_flops: float = setting(1e15, 1.0, 1e30, "training FLOPs from which a GPU job is a full run")
    full_run_seconds: float = setting(3600.0, 1.0, 1e9, "a GPU job's own wall-clock budget from which "
                                      "it is a full run (a budget in seconds only has no FLOP figure)")


GATE = GateConfig()
# The keys a full run may set differently from the arm that earned it: how big it is and how
# long it trains, never what the idea changed (the gate compares every other key).
FULL_RUN_SIZE_KEYS = frozenset({
    "d_model", "n_heads", "n_prelude", "n_layers", "mlp_hidden", "vocab_size", "block_size",
    "loss_chunk_tokens", "activation_checkpointing", "batch_size", "grad_accum", "lr", "min_lr",
    "warmup_steps", "max_steps", "max_seconds", "eval_interval", "eval_batches", "log_interval",
    "ckpt_interval", "val_fraction", "seed", "threads", "gpu_memory_fraction"})
# Eval batches are drawn from the training seed plus this offset, so every eval of a run (and a
# later `lab eval` of its checkpoint) sees the same batches, none of them training batches.
EVAL_SEED_OFFSET = 1_000_003


def default_arch() -> str:
    arch = os.environ.get("LAB_MODEL_ARCH", MODEL_ARCH)
    if arch not in ARCHS:
        raise ConfigError(f"LAB_MODEL_ARCH: {show(arch)} is not an architecture "
                          f"(allowed: {', '.join(ARCHS)})")
    return arch


def with_budget(cfg: Config, **train_overrides: Any) -> Config:
    """cfg with some train settings replaced (validated)."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train_overrides))


def preset(name: str, arch: str | None = None, /, **overrides: Any) -> Config:
    """Build the named preset for `arch`, with overrides by bare key (`d_model=128`) or dotted
    key (`model.d_model`). Every error is a one-line ConfigError naming the field."""
    # name and arch are positional-only, so an override dict (a spec's `set = {name = "x"}`)
    # cannot collide with them: "name" is then an unknown key, not a TypeError. `arch=` still
    # works as a keyword, once.
    if "arch" in overrides:
        if arch is not None:
            raise ConfigError(f"arch: given twice ({show(arch)} and {show(overrides['arch'])} as an "
                              "override); give the architecture once")
        arch = overrides.pop("arch")
    if not isinstance(name, str) or name not in PRESETS:  # a dict is unhashable: `in` would raise
        raise ConfigError(f"preset: unknown preset {show(name)} (allowed: {', '.join(PRESETS)})")
    arch = arch or default_arch()
    if not isinstance(arch, str) or arch not in ARCHS:
        raise ConfigError(f"arch: {show(arch)} is not an architecture (allowed: {', '.join(ARCHS)})")
    values: dict[str, dict[str, Any]] = {s: dict(PRESETS[name].get(s, {})) for s in _SECTIONS}
    values["model"].update(PRESETS[name].get(arch, {}), arch=arch)
    problems = []
    for key, value in overrides.items():
        try:
            section, bare = split_key(key)
        except ConfigError as e:
            problems.append(str(e))
            continue
        values[section][bare] = value
    built = {}
    for section, cls in _SECTIONS.items():  # every section's faults, not only the first one's
        try:
            built[section] = cls(**values[section])
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError("; ".join(problems))
    return Config(name=name, **built)


def split_key(key: str) -> tuple[str, str]:
    """`d_model` or `model.d_model` -> ("model", "d_model"); unknown keys raise ConfigError."""
    if "." in key:
        section, bare = key.split(".", 1)
        if section not in _SECTIONS or bare not in CONFIG_KEYS or CONFIG_KEYS[bare] != section:
            raise ConfigError(f"{key}: unknown config key (sections: {', '.join(_SECTIONS)})")
        return section, bare
    if key not in CONFIG_KEYS:
        raise ConfigError(f"{key}: unknown config key{did_you_mean(key, CONFIG_KEYS)} "
                          f"(allowed: {', '.join(sorted(CONFIG_KEYS))})")
    return CONFIG_KEYS[key], key


def parse_value(text: str, where: str = "value") -> Any:
    """Parse the right side of `--set key=value` (or an environment variable) as a TOML value;
    bare words are strings. A non-finite or huge number, or a value nested too deep for the
    parser, is a ConfigError naming `where`: "nan" is refused, not passed on as a float that
    every range check lets through."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    except RecursionError:  # tomllib recurses once per level of [[[...]]]
        raise ConfigError(f"{where}: the value is nested too deeply") from None
    except ValueError:  # an integer literal past Python's 4300-digit int/str limit
        digits = sum(c.isdigit() for c in text)
        raise ConfigError(f"{where}: an integer of {digits} digits is beyond 2^53") from None
    check_nested(where, value)
    return value


def parse_assignments(pairs: typing.Iterable[str]) -> dict[str, Any]:
    """["d_model=128", "lr=1e-3"] -> {"d_model": 128, "lr": 0.001}; malformed pairs raise."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set: {show(pair)} is not key=value")
        key, text = key.strip(), text.strip()
        try:
            out[key] = parse_value(text, where=f"--set {key}")
        except ConfigError as e:
            if "not a finite number" not in str(e):
                raise
            # TOML reads the bare words nan and inf as floats; as a string they need quotes.
            raise ConfigError(f"{e} (for the word, quote it: {key}='\"{text}\"')") from None
    return out


def from_mapping(cls: type, values: dict[str, Any], where: str) -> Any:
    """Build a validated dataclass (a job's Spec, say) from untrusted keys and values. Every
    unknown and missing key is reported at once, on one line, each named `<where>.<key>`."""
    names = {f.name for f in dataclasses.fields(cls)}
    bad_keys = [k for k in values if not isinstance(k, str)]
    if bad_keys:  # JSON and TOML keys are strings; a Python caller's may not be (difflib needs str)
        raise ConfigError(f"{where}: key {show(bad_keys[0])} is not a string")
    problems = [f"{where}.{key}: unknown key{did_you_mean(key, names)} (allowed: {', '.join(sorted(names))})"
                for key in values if key not in names]
    problems += [f"{where}.{f.name}: required key is missing" for f in dataclasses.fields(cls)
                 if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                 and f.name not in values]
    if problems:
        try:  # the known keys' own faults belong in the same report
            cls(**{k: v for k, v in values.items() if k in names})
        except ConfigError as e:
            problems.append(str(e))
        except TypeError:
            pass  # a required key is missing: already said
        raise ConfigError("; ".join(problems))
    return cls(**values)


# --------------------------------------------------------------------------------------------
# The ablation harness


@dataclass(frozen=True)
class AblationConfig(Validated):
    FIELD_PREFIX = "ablation_config"
    seeds: int = setting(3, 1, 100)
    confidence: float = setting(0.95, 0.5, 0.999)
    # `better` needs the paired interval to exclude zero AND a mean gain of at least this much
    # exact-match accuracy (absolute), so a tiny but consistent difference is not a win.
    min_effect: float = setting(0.05, 0.0, 1.0)
    # Test depths every arm is measured at (a reasoner only at depths it owns, and always at
    # its own); a spec's `eval_depths` replaces them.
    eval_depths: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    # A comparison whose arms differ by more than this factor in parameters, FLOPs per token or
    # distinct blocks is flagged in the report as not matched on that axis.
    match_ratio: float = setting(1.5, 1.0, 100.0)
    eval_examples: int = setting(500, 10, 1_000_000)
    train_examples: int = setting(0, 0, 10_000_000, "0 means fresh examples every step")
    parallel_seeds: int = setting(2, 1, 64, "seed processes at once (one torch thread each)")
    progress_seconds: float = setting(2.0, 0.0, 3600.0, "at most one progress report this often")
    # The CPU lane's path; the GPU lane always trains an ablation's (arm, seed) runs as one group
    # in one process, one CUDA context (harness/batched.py). False: the process pool. Measured
    # (bench/ablation_time.py, default ablation, 2 shared cores): pool 16.19 min and 11.0 training
    # CPU-min, grouped on 2 torch threads 15.74 min but 19.8 CPU-min (the pool ran under the
    # heavier load); at 20 steps pool 1.02 min, grouped 1.33. Small matrices do not split well over
    # threads: the pool's floor is half the group's, so the pool stays.
    batched_cpu: bool = False
    # Within a group, seeds (and arms) of one config train as one stacked model: their parameters
    # stacked under torch.func.vmap, one forward and backward for all (harness/batched.py). The
    # same results as apart within float tolerance (tests/test_batched.py). False: one after another.
    stack_seeds: bool = True


ABLATION = AblationConfig()


@dataclass(frozen=True)
class TaskSizes(Validated):
    """Sizes of the generated tasks (harness/tasks.py documents what each must do)."""

    FIELD_PREFIX = "tasks"

    khop_max_jump: int = setting(4, 1, 9, "khop: pointers jump 1..m back; chance is 1/m")
    khop_length: int = setting(48, 8, 4096, "khop: pointers per line")
    khop_train_hops: int = setting(3, 1, 16, "khop: trained (and `test`) on k = 1..this")
    khop_ood_hops: tuple[int, ...] = (4, 6)
    lookup_domain: int = setting(6, 2, 10)
    lookup_functions: int = setting(4, 1, 16)
    lookup_train_length: int = setting(5, 1, 32)
    lookup_ood_lengths: tuple[int, ...] = (6, 8)
    addition_train_digits: int = setting(3, 1, 32)
    addition_ood_digits: tuple[int, ...] = (4, 5)
    chase_length: int = setting(48, 8, 4096, "chase: tokens per line")
    chase_max_jump: int = setting(4, 1, 9, "chase: a jump token says 'look 1..this many places back'")
    chase_labels: int = setting(4, 2, 9, "chase: terminal labels; chance is 1/this")
    chase_train_density: float = setting(0.3, 0.01, 0.99, "chase: share of terminals in a training line")
    chase_sparse_density: float = setting(0.12, 0.01, 0.99, "chase: share of terminals in the `sparse` split")
    chase_train_max_depth: int = setting(4, 1, 4096, "chase: only answers this many jumps deep are trained")
    # One input line in `test_partition` (by a hash of its tokens) may be a test line; training
    # never draws those, so no test line can occur in any training stream.
    test_partition: int = setting(5, 2, 1000)


TASKS = TaskSizes()


# --------------------------------------------------------------------------------------------
# The queue, the daemon and the GitHub bridge


@dataclass(frozen=True)
class QueueConfig(Validated):
    FIELD_PREFIX = "queue"
    lease_seconds: float = setting(30.0, 1.0, 86_400.0, "a running job's lease; renewed by heartbeats")
    heartbeat_seconds: float = setting(5.0, 0.1, 3600.0)
    sweep_seconds: float = setting(10.0, 0.5, 3600.0, "how often expired leases are requeued")
    poll_seconds: float = setting(0.5, 0.01, 60.0, "how often the scheduler looks for runnable jobs")
    max_attempts: int = setting(3, 1, 100)
    cpu_workers: int = setting(2, 1, 256)
    kill_grace_seconds: float = setting(5.0, 0.0, 600.0, "SIGTERM, then SIGKILL after this long")
    shutdown_seconds: float = setting(20.0, 0.0, 600.0, "running jobs may finish this long at stop")
    default_timeout_seconds: float = setting(24 * 3600.0, 1.0, 30 * 86_400.0)
    disk_min_free_gb: float = setting(5.0, 0.0, 100_000.0, "below this no new GPU job starts")
    github_poll_seconds: float = setting(60.0, 1.0, 86_400.0)
    # Reads are few (conditional, mostly 304s); writes stay under GitHub's secondary limit of 80
    # content-creating requests a minute (one a second at most).
    github_seconds_between_requests: float = setting(0.05, 0.0, 10.0)
    github_seconds_between_writes: float = setting(1.0, 0.0, 60.0)
    outbox_max_attempts: int = setting(20, 1, 1000)
    # Job processes started ahead of time per lane (python and imports already loaded), so the
    # GPU lane does not wait for a start-up between two jobs; more there, since short GPU jobs
    # come faster than one process warms up.
    standby_gpu: int = setting(3, 0, 16)
    standby_cpu: int = setting(1, 0, 16)
    # Off by default: a CUDA context costs VRAM (~0.3-0.5 GiB per process, more with cuBLAS
    # handles) that the running job may need, and every GPU standby would hold one while it
    # waits. On, it saves the next job the context's creation (a few hundred ms on a card).
    standby_preload: bool = setting(True, doc="a lane that runs training jobs gets standbys with torch, "
                                    "the models and the sample loaded (~3.5 CPU-s each, beside the running "
                                    "job); off: standbys import only the queue's own code")
    standby_fork: bool = setting(True, doc="a lane's standbys are forked from one process per commit "
                                 "(workers.fork_server: ms each, not ~3.5 CPU-s where the lane trains and "
                                 "the server preloaded torch once, ~0.35 elsewhere); off: each standby is "
                                 "a python of its own")
    standby_cuda_init: bool = setting(False, doc="GPU-lane standbys make their CUDA context ahead of "
                                      "time (VRAM per standby: ~0.3-0.5 GiB beside the running job)")
    # For this long after handing a job to its process the supervisor leaves the job's start
    # (store read, GPU lock, mark started: ~10 ms) to itself: no new standby (a python start-up
    # takes a core), no pid or heartbeat write (two writers make one wait on SQLite's lock). But
    # one is started at once where the job took the lane's last (workers.supervise.ProcessPool).
    handover_seconds: float = setting(0.05, 0.0, 10.0, "after a hand-over: no standby start or store write")
    # A training job's start goes on past that: data, model, its baseline eval, its first steps
    # (on a card, also its CUDA context). A standby forked or started meanwhile took a core from
    # it: on 2 cores the baseline eval took 0.07-0.17 s instead of 0.065-0.08 s, and the card idled
    # 0.25-0.28 s between 40-step smokes instead of ~0.20 s (bench/card_idle.py).
    handover_train_seconds: float = setting(0.5, 0.0, 60.0, "after handing over a training job: no "
                                            "standby start on its lane for this long")
    # The GitHub bridge (bridge/github.py); each can be overridden by LAB_QUEUE_<FIELD> (upper case).
    github_timeout_seconds: int = setting(15, 1, 300, "per request; a POST that times out is ambiguous")
    github_backoff_seconds: float = setting(2.0, 0.0, 3600.0, "first retry delay of an outbox row; doubles")
    github_backoff_max_seconds: float = setting(900.0, 0.0, 86_400.0)
    github_read_attempts: int = setting(3, 1, 20, "tries of one read within a sync cycle")
    github_rate_reserve: int = setting(200, 0, 100_000, "requests left when the bridge pauses until reset")
    github_lease_seconds: float = setting(300.0, 5.0, 86_400.0,
                                          "the bridge role lease (one poster at a time)")
    github_per_page: int = setting(100, 1, 100)
    hosts_seen_seconds: float = setting(7 * 86_400.0, 60.0, 365 * 86_400.0,
                                   "a host whose last daemon heartbeat is older drops off `lab status`")
    attention_days: float = setting(14.0, 0.01, 3650.0,
                                    "`lab next`: a failed job or an ablation without a finding asks for "
                                    "attention this long after it ended")

    def _check_relations(self) -> None:
        # A job stops itself after 3/4 of the lease without a renewal (workers/run.py): a lease
        # shorter than a few heartbeats would kill every job (and let healthy ones be requeued).
        if self.heartbeat_seconds * 3 > self.lease_seconds:
            raise ConfigError(f"queue.heartbeat_seconds: {self.heartbeat_seconds:g} must be at most "
                              f"a third of lease_seconds ({self.lease_seconds:g})")


QUEUE = QueueConfig()


def queue_config(env: Mapping[str, str] | None = None) -> QueueConfig:
    """QUEUE with per-field overrides from the environment (`env`, default os.environ),
    `LAB_QUEUE_<FIELD>` (e.g. LAB_QUEUE_LEASE_SECONDS=2 for fast tests,
    LAB_QUEUE_DISK_MIN_FREE_GB=50 on a small disk); read on every call, validated like any field."""
    env = os.environ if env is None else env
    overrides: dict[str, Any] = {}
    for f in dataclasses.fields(QueueConfig):
        var = f"LAB_QUEUE_{f.name.upper()}"
        text = env.get(var)
        if text is not None:
            overrides[f.name] = parse_value(text, where=var)  # nan, inf, 10**400 refused here
    try:
        return dataclasses.replace(QUEUE, **overrides)
    except ConfigError as e:
        raise ConfigError(f"LAB_QUEUE_*: {e}") from None


# --------------------------------------------------------------------------------------------
# Records (findings, cards), storage tiers and operations


@dataclass(frozen=True)
class RecordsConfig(Validated):
    FIELD_PREFIX = "records"
    # A hot run directory whose files moved to the archive keeps only this small file.
    pointer_file: str = "ARCHIVED.json"
    # Written into the archived copy: relative path -> size and sha256 of every file.
    manifest_file: str = "MANIFEST.json"
    hash_chunk_bytes: int = setting(1 << 20, 4096, 1 << 30)


RECORDS = RecordsConfig()


@dataclass(frozen=True)
class SystemdConfig(Validated):
    """The unit `lab service print` writes (daemon/systemd.py)."""

    FIELD_PREFIX = "systemd"
    # TimeoutStopSec: the daemon needs QueueConfig.shutdown_seconds + kill grace to stop.
    stop_seconds: int = setting(60, 30, 3600)
    restart_seconds: int = setting(5, 1, 3600)


SYSTEMD = SystemdConfig()


@dataclass(frozen=True)
class CommentConfig(Validated):
    """What a comment of the GitHub bridge may hold (bridge/render.py)."""

    FIELD_PREFIX = "comments"
    max_chars: int = setting(65_536, 1_000, 1_000_000, "GitHub refuses a longer comment body")
    log_tail_lines: int = setting(60, 1, 10_000, "a failed job's comment quotes this much of its log")
    log_tail_chars: int = setting(8_000, 100, 1_000_000)
    report_chars: int = setting(30_000, 100, 1_000_000, "an ablation's report.md is cut to this")
    table_rows: int = setting(40, 1, 10_000)
    curve_points: int = setting(40, 2, 1_000, "points of the loss curve (mermaid xychart)")


COMMENTS = CommentConfig()


@dataclass(frozen=True)
class McpConfig(Validated):
    """Bounds of the MCP tools' arguments (daemon/mcp_server.py)."""

    FIELD_PREFIX = "mcp"
    max_wait_seconds: float = setting(3600.0, 1.0, 86_400.0, "one `wait` call blocks at most this long")
    max_log_lines: int = setting(2000, 1, 1_000_000, "one `logs` call returns at most this many lines")


MCP = McpConfig()


def docs_dir() -> str:
    """Where findings (docs/findings) and model cards (docs/registry) are written; `LAB_DOCS`."""
    return os.environ.get("LAB_DOCS", "docs")


@dataclass(frozen=True)
class Paths:
    db: str
    runs: str
    archive: str
    host: str


def paths() -> Paths:
    """Where the queue and runs live; read from the environment on every call."""
    import socket

    runs = os.environ.get("LAB_RUNS", "runs")
    return Paths(
        db=os.environ.get("LAB_DB", "queue.db"),
        runs=runs,
        archive=os.environ.get("LAB_ARCHIVE", os.path.join(runs, "..", "archive")),
        host=os.environ.get("LAB_HOST", socket.gethostname()),
    )


@dataclass(frozen=True)
class AgentConfig(Validated):
    """`lab agent` (daemon/agent.py): Claude Code run headless, one turn at a time."""

    FIELD_PREFIX = "agent"
    idle_seconds: float = setting(120.0, 0.01, 86_400.0,
                                  "sleep this long when nothing needs the agent and no job has ended")
    turn_timeout_seconds: float = setting(1800.0, 0.1, 86_400.0, "a turn's wall time; then it is killed")
    max_turns: int = setting(40, 1, 10_000, "passed to claude as --max-turns (its own agentic turns)")
    backoff_base_seconds: float = setting(30.0, 0.0, 86_400.0, "after a failed turn; doubles each time")
    backoff_max_seconds: float = setting(1800.0, 0.0, 86_400.0, "the longest backoff")
    stop_grace_seconds: float = setting(10.0, 0.0, 600.0, "SIGTERM to the turn, then SIGKILL after this")
    prompt_max_chars: int = setting(20_000, 100, 1_000_000, "AGENT_TURN.md is refused when longer")
    tail_chars: int = setting(4_000, 100, 1_000_000, "stdout/stderr tails kept in turns.jsonl")
    recent_jobs: int = setting(50, 1, 10_000, "finished jobs read: has one ended since the last turn?")
    revisit_seconds: float = setting(3600.0, 1.0, 7 * 86_400.0,
                                     "attention items a successful turn saw start a turn again after this")
    # Allowed without a prompt (claude --allowedTools); the guard hook still vets every Bash call.
    allowed_tools: tuple[str, ...] = ("Bash(lab:*)", "Bash(.venv/bin/lab:*)", "mcp__lab", "Read", "Glob",
                                      "Grep", "Edit", "Write", "Bash(make test)", "Bash(.venv/bin/ruff:*)",
                                      "Bash(git status)", "Bash(git diff:*)", "Bash(git log:*)")

    def _check_relations(self) -> None:
        if self.backoff_base_seconds > self.backoff_max_seconds:
            raise ConfigError(f"agent.backoff_base_seconds: {self.backoff_base_seconds:g} > "
                              f"backoff_max_seconds {self.backoff_max_seconds:g}")


AGENT = AgentConfig()
