"""config.py: presets, validation with one-line errors naming the field, the fp16 policy, and
that importing it never imports torch."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import config
from config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_every_preset_builds_for_both_archs():
    for name in config.PRESETS:
        for arch in config.ARCHS:
            cfg = config.preset(name, arch)
            assert cfg.name == name and cfg.model.arch == arch


def test_overrides_by_bare_and_dotted_key():
    cfg = config.preset("tiny", "refiner", d_model=32, **{"train.lr": 1e-3})
    assert cfg.model.d_model == 32 and cfg.train.lr == 1e-3
    assert config.preset("tiny", "refiner", lr=1).train.lr == 1.0  # int widened to float


def test_round_trip_through_dict():
    cfg = config.preset("ablation", "reasoner", d_model=64, n_heads=2)
    assert config.Config.from_dict(cfg.to_dict()) == cfg


def test_configs_are_frozen():
    cfg = config.preset("tiny", "refiner")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.d_model = 8  # type: ignore[misc]


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_preset_names_the_allowed_ones():
    message = one_line_error(config.preset, "huge", "refiner")
    assert "preset" in message and "'huge'" in message
    for name in config.PRESETS:
        assert name in message


def test_unknown_key_names_the_key():
    assert "d_modle" in one_line_error(config.preset, "tiny", "refiner", d_modle=32)
    assert "train.d_model" in one_line_error(config.preset, "tiny", "refiner", **{"train.d_model": 32})


@pytest.mark.parametrize("key, value, field", [
    ("d_model", "big", "model.d_model"),
    ("d_model", 64.0, "model.d_model"),
    ("n_heads", True, "model.n_heads"),  # a bool is not an int here
    ("lr", "fast", "train.lr"),
    ("activation_checkpointing", 1, "model.activation_checkpointing"),
])
def test_wrong_type_names_the_field(key, value, field):
    message = one_line_error(config.preset, "tiny", "refiner", **{key: value})
    assert field in message and "expected" in message


@pytest.mark.parametrize("key, value, field", [
    ("d_model", 0, "model.d_model"),
    ("vocab_size", 1, "model.vocab_size"),
    ("beta2", 1.5, "train.beta2"),
    ("val_fraction", 0.9, "train.val_fraction"),
])
def test_out_of_range_names_the_field_and_range(key, value, field):
    message = one_line_error(config.preset, "tiny", "refiner", **{key: value})
    assert field in message and "out of range" in message and "allowed" in message


def test_relations_between_fields():
    assert "n_heads" in one_line_error(config.preset, "tiny", "refiner", d_model=64, n_heads=3)
    assert "depth_min" in one_line_error(config.preset, "tiny", "refiner", depth_min=5, depth_max=3)
    # the reasoner cannot apply more layers than it owns; the refiner can loop any number of times
    assert "n_layers" in one_line_error(config.preset, "tiny", "reasoner", n_layers=2, depth_max=3)
    assert config.preset("tiny", "refiner", n_layers=1, depth_max=8).model.depth_max == 8


def test_refiner_variants_default_to_the_seed_design():
    m = config.ModelConfig()
    assert (m.update_rule, m.time_signal, m.init_state, m.init_scale_depth) == (
        "gated_residual", "sinusoid", "zeros", "depth_eval")
    assert m.progressive_loss_weight == 0.0
    # an old run's config (no variant keys) loads as the seed design
    d = config.preset("tiny", "refiner").to_dict()
    for key in ("update_rule", "time_signal", "time_offset_max", "init_state", "state_noise_std",
                "init_scale_depth", "progressive_loss_weight"):
        del d["model"][key]
    assert config.Config.from_dict(d) == config.preset("tiny", "refiner")
    assert config.parse_assignments(["update_rule=replace"]) == {"update_rule": "replace"}
    assert config.preset("tiny", "refiner", update_rule="replace").model.update_rule == "replace"


@pytest.mark.parametrize("key, value, words", [
    ("update_rule", "gru", ["model.update_rule", "gated_residual", "gated_blend", "replace"]),
    ("time_signal", "rope", ["model.time_signal", "sinusoid", "none", "learned", "random_offset"]),
    ("init_state", "ones", ["model.init_state", "zeros", "noise"]),
    ("init_scale_depth", "depth_max", ["model.init_scale_depth", "distinct_blocks"]),
    ("progressive_loss_weight", 1.5, ["model.progressive_loss_weight", "out of range"]),
    ("progressive_loss_weight", -0.1, ["model.progressive_loss_weight", "out of range"]),
    ("state_noise_std", -1.0, ["model.state_noise_std", "out of range"]),
    ("time_offset_max", -1, ["model.time_offset_max", "out of range"]),
    ("time_offset_max", 2.0, ["model.time_offset_max", "expected int"]),
])
def test_bad_refiner_variant_values_name_the_field(key, value, words):
    message = one_line_error(config.preset, "tiny", "refiner", **{key: value})
    assert all(w in message for w in words), message


def test_refiner_variant_relations():
    message = one_line_error(config.preset, "tiny", "refiner", time_signal="random_offset",
                             time_offset_max=0)
    assert "model.time_offset_max" in message and "random_offset" in message
    message = one_line_error(config.preset, "tiny", "refiner", init_state="noise", state_noise_std=0.0)
    assert "model.state_noise_std" in message and "noise" in message
    # the knobs alone (their variant not chosen) are harmless, so a sweep may keep them set
    assert config.preset("tiny", "refiner", time_offset_max=0, state_noise_std=0.0).model.time_offset_max == 0


def test_bad_arch_names_the_allowed_ones():
    message = one_line_error(config.preset, "tiny", "transformer")
    assert "'transformer'" in message and "refiner" in message and "reasoner" in message
    assert "model.arch" in one_line_error(config.ModelConfig, arch="rnn")


def test_model_arch_default_and_environment_override(monkeypatch):
    monkeypatch.delenv("LAB_MODEL_ARCH", raising=False)
    assert config.preset("tiny").model.arch == config.MODEL_ARCH
    other = next(a for a in config.ARCHS if a != config.MODEL_ARCH)
    monkeypatch.setenv("LAB_MODEL_ARCH", other)
    assert config.preset("tiny").model.arch == other
    assert config.preset("tiny", config.MODEL_ARCH).model.arch == config.MODEL_ARCH  # explicit wins
    monkeypatch.setenv("LAB_MODEL_ARCH", "lstm")
    assert "LAB_MODEL_ARCH" in one_line_error(config.preset, "tiny")


def test_parse_assignments():
    assert config.parse_assignments(["d_model=128", "lr=1e-3", "depth_dist=poisson",
                                      "activation_checkpointing=true"]) == {
        "d_model": 128, "lr": 1e-3, "depth_dist": "poisson", "activation_checkpointing": True}
    assert "--set" in one_line_error(config.parse_assignments, ["d_model"])
    assert "--set" in one_line_error(config.parse_assignments, ["=3"])


def test_from_mapping_validates_untrusted_keys():
    @dataclasses.dataclass(frozen=True)
    class Spec(config.Validated):
        steps: int = config.setting(10, 1, 100)
        name: str = "x"

    assert config.from_mapping(Spec, {"steps": 5}, "spec").steps == 5
    assert "spec.stepz" in one_line_error(config.from_mapping, Spec, {"stepz": 5}, "spec")
    assert "Spec.steps" in one_line_error(config.from_mapping, Spec, {"steps": 0}, "spec")


def _literal_choices(cls: type) -> list[object]:
    hints = typing.get_type_hints(cls)
    return [a for f in dataclasses.fields(cls) if typing.get_origin(hints[f.name]) is typing.Literal
            for a in typing.get_args(hints[f.name])]


def test_no_bfloat16_anywhere():
    # Turing has no bfloat16: no choice of any config section may offer it
    for cls in (config.ModelConfig, config.TrainConfig, config.PrecisionConfig):
        assert not any("bf16" in str(c) or "bfloat16" in str(c) for c in _literal_choices(cls))
    assert "cuda_dtype" in one_line_error(config.PrecisionConfig, cuda_dtype="bfloat16")
    policy = config.PrecisionConfig()
    assert policy.cuda_dtype == "float16" and policy.cpu_dtype == "float32"
    assert policy.norm_fp32 is True and policy.loss_fp32 is True


def test_import_config_does_not_import_torch():
    code = "import sys, config; config.preset('rtx2060', 'reasoner'); assert 'torch' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


def test_an_unknown_key_suggests_the_closest_and_every_fault_is_reported():
    """One line, every fault: unknown keys (with the closest known name) and bad values."""
    message = one_line_error(config.preset, "tiny", "refiner", d_modle=8)
    assert message.startswith("d_modle: unknown config key (did you mean d_model?)")
    both = one_line_error(config.preset, "tiny", "refiner", d_model=0, lr="fast")
    assert "model.d_model: 0 is out of range" in both and "train.lr: expected float" in both

    import jobs

    sleep = one_line_error(jobs.parse_spec, "sleep", {"secs": 1, "fail": "maybe", "exit_code": 900})
    assert "sleep.secs: unknown key (did you mean seconds?)" in sleep
    assert "sleep.fail: expected bool" in sleep and "sleep.exit_code: 900 is out of range" in sleep
    assert "did you mean sleep?" in one_line_error(jobs.parse_spec, "sleeep", {})


# --- numbers, odd values and names (a security review's findings) ------------------------------


@pytest.mark.parametrize("value, text", [
    (float("nan"), "sleep.seconds: nan is not a finite number"),
    (float("inf"), "sleep.seconds: inf is not a finite number"),
    (float("-inf"), "sleep.seconds: -inf is not a finite number"),
    (10**399, "sleep.seconds: 1000...0 (400 digits) is beyond 2^53"),
    (int("9" * 400), "sleep.seconds: 9999...9 (400 digits) is beyond 2^53"),
    (-(10**399), "sleep.seconds: -1000...0 (400 digits) is beyond -2^53"),
    (10**5000, "sleep.seconds: an integer of about 5001 digits is beyond 2^53"),  # past str()'s limit
], ids=["nan", "inf", "-inf", "1e399", "9x400", "-1e399", "1e5000"])
def test_non_finite_and_huge_numbers_are_refused_naming_the_field(value, text):
    """nan passed every range check (its comparisons are all false); a 400-digit integer
    raised OverflowError in float()."""
    assert one_line_error(jobs_parse, "sleep", {"seconds": value}) == text


def jobs_parse(kind, values):
    import jobs

    return jobs.parse_spec(kind, values)


def test_the_2_to_the_53_bound_is_exact():
    @dataclasses.dataclass(frozen=True)
    class Spec(config.Validated):
        n: int = 0
        x: float = 0.0

    assert config.from_mapping(Spec, {"n": 2**53, "x": -(2**53)}, "s").x == -float(2**53)
    assert one_line_error(config.from_mapping, Spec, {"n": 2**53 + 1}, "s") == \
        "Spec.n: 9007199254740993 is beyond 2^53"
    assert "Spec.x" in one_line_error(config.from_mapping, Spec, {"x": -(2**53) - 1}, "s")
    assert config.from_mapping(Spec, {"x": 1e300}, "s").x == 1e300  # finite: the range decides


@pytest.mark.parametrize("key, value, field", [
    ("lr", float("nan"), "train.lr"), ("lr", float("inf"), "train.lr"),
    ("beta2", float("nan"), "train.beta2"), ("d_model", 10**400, "model.d_model"),
    ("rope_base", 10**400, "model.rope_base"),
], ids=["lr-nan", "lr-inf", "beta2-nan", "d_model-huge", "rope_base-huge"])
def test_config_overrides_refuse_nan_and_huge(key, value, field):
    message = one_line_error(config.preset, "tiny", "refiner", **{key: value})
    assert message.startswith(field) and ("finite" in message or "2^53" in message)


def test_nested_values_are_walked_and_named():
    assert one_line_error(jobs_parse, "train", {"set": {"lr": float("nan")}}) == \
        "train.set.lr: nan is not a finite number"
    assert "smoke.set.x[1]: " in one_line_error(jobs_parse, "smoke", {"set": {"x": [1, 10**30]}})
    deep: list = []
    for _ in range(200):
        deep = [deep]
    assert "train.set.d_model" in one_line_error(jobs_parse, "train", {"set": {"d_model": deep}})
    assert "nested more than" in one_line_error(jobs_parse, "train", {"set": {"d_model": deep}})
    assert "table key 3 is not a string" in one_line_error(jobs_parse, "train", {"set": {3: 1}})


def test_set_cannot_collide_with_presets_own_arguments():
    """`set = {name = "x"}` raised TypeError (preset() got multiple values for 'name')."""
    assert "name: unknown config key" in one_line_error(jobs_parse, "train", {"set": {"name": "x"}})
    assert "arch: given twice" in one_line_error(jobs_parse, "smoke", {"arch": "refiner",
                                                                       "set": {"arch": "reasoner"}})
    assert config.preset("tiny", arch="reasoner").model.arch == "reasoner"  # the keyword still works


@pytest.mark.parametrize("text, field", [
    ("nan", "--set x: nan is not a finite number"), ("inf", "--set x: inf is not a finite number"),
    ("-inf", "--set x: -inf is not a finite number"), ("9" * 400, "--set x: 9999...9 (400 digits) is beyond"),
    ("9" * 5000, "--set x: an integer of 5000 digits is beyond 2^53"),
    ("[" * 2000 + "]" * 2000, "--set x: the value is nested too deeply"),
    ("[1, nan]", "--set x[1]: nan is not a finite number"), ("{a = inf}", "--set x.a: inf is not"),
], ids=["nan", "inf", "-inf", "400-digits", "5000-digits", "deep", "list", "table"])
def test_set_values_are_checked_when_parsed(text, field):
    assert one_line_error(config.parse_assignments, [f"x={text}"]).startswith(field)


def test_a_quoted_nan_is_a_string():
    assert config.parse_assignments(['name="nan"']) == {"name": "nan"}
    assert "quote it" in one_line_error(config.parse_assignments, ["name=nan"])


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "1" * 400, "1" * 5000, "[" * 3000],
                         ids=["nan", "inf", "-inf", "400-digits", "5000-digits", "deep"])
def test_queue_environment_refuses_nan_and_huge(monkeypatch, text):
    monkeypatch.setenv("LAB_QUEUE_LEASE_SECONDS", text)
    assert "LAB_QUEUE_" in one_line_error(config.queue_config)
    monkeypatch.setenv("LAB_QUEUE_LEASE_SECONDS", "60")
    assert config.queue_config().lease_seconds == 60.0


@pytest.mark.parametrize("kind, values, field", [
    ("train", {"data": "books\n"}, "train.data"),
    ("tokenize", {"src": ["models/assets/shakespeare.txt"], "name": "books\n"}, "tokenize.name"),
])
def test_a_name_with_a_trailing_newline_is_refused(kind, values, field, tmp_runs, monkeypatch):
    """re.match with `$` accepted "books\\n": `$` matches before a final newline."""
    monkeypatch.chdir(ROOT)
    assert one_line_error(jobs_parse, kind, values).startswith(field)


def test_the_dataset_name_pattern_is_whole_even_with_re_match():
    import re

    assert re.match(config.DATASET_NAME_RE, "books\n") is None  # models/data.check_name uses match
    assert re.fullmatch(config.DATASET_NAME_RE, "books.v2-x_1")


def _nested(depth: int) -> list:
    v: list = []
    for _ in range(depth):
        v = [v]
    return v


# Wrong values of every type: each kind's every field gets each of these, alone and on top of a
# spec that is valid without it; only ConfigError may come out, and it must name a field.
ODD_VALUES = {
    "dict": {"name": "x"}, "list": [1, "a"], "nested": _nested(200), "huge": 10**400,
    "huge_past_str": 10**5000, "nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"),
    "bool": True, "empty": "", "long": "a" * 100_000, "nul": "a\0b", "negative": -1,
    "path": "/etc/passwd", "str": "zzz", "float": 0.5, "none": None,
}
VALID = {
    "sleep": {}, "smoke": {}, "train": {}, "eval": {"run": "7"},
    "tokenize": {"src": ["models/assets/shakespeare.txt"], "name": "fresh"},
    "ablation": {"control": "negative"}, "archive": {"runs": ["7"]},
}
ARM = {"name": "a", "arch": "reasoner", "n_steps": 2}


def _fuzz_cases(kind: str, field: str) -> typing.Iterator[tuple[str, dict]]:
    for name, bad in ODD_VALUES.items():
        yield name, {field: bad}
        yield name, {**VALID[kind], field: bad}
        if field == "set":  # inside the table of config overrides
            for key in ("lr", "d_model", "name", "arch", "depth_dist", name):
                yield f"set.{key}={name}", {**VALID[kind], "set": {key: bad}}
        if field == "arms":  # inside an arm, and as an arm
            arms_spec = {"baseline": "a", "primary": "test", "seeds": 3}
            for key in ("name", "arch", "n_steps", "set"):
                yield f"arms[1].{key}={name}", {"arms": [ARM, {**ARM, "name": "b", key: bad}], **arms_spec}
            yield f"arms[1].set.lr={name}", {"arms": [ARM, {**ARM, "name": "b", "set": {"lr": bad}}],
                                             **arms_spec}
            yield f"arms[1]={name}", {"arms": [ARM, bad], **arms_spec}


def test_odd_values_in_every_field_of_every_kind_raise_only_config_error(tmp_runs, monkeypatch):
    import jobs

    monkeypatch.chdir(ROOT)
    seen = 0
    for kind in jobs.kind_names():
        for f in dataclasses.fields(jobs.get_kind(kind).spec):
            for name, values in _fuzz_cases(kind, f.name):
                seen += 1
                try:
                    jobs.parse_spec(kind, values)
                except ConfigError as e:
                    message = str(e)
                    where = f"{kind}/{f.name}/{name}"
                    assert "\n" not in message, where
                    # the last-resort wrapper of jobs.parse_spec was not needed: a field is named
                    assert "could not be validated" not in message, f"{where}: {message}"
                    assert len(message) < 12_000, where
                    # <kind>.<field>, or (train and smoke resolve a config) the preset, the arch,
                    # a config field (model.lr) or the override key as written in `set`
                    named = message.split(":")[0]
                    overrides = values.get("set") if isinstance(values.get("set"), dict) else {}
                    assert named.startswith(kind) or named in ("preset", "arch") or named in overrides \
                        or named.split(".")[0] in config._SECTIONS, f"{where}: {message[:200]}"
                except Exception as e:  # noqa: BLE001 - the point: nothing else may come out
                    pytest.fail(f"{kind}/{f.name}/{name}: {type(e).__name__}: {str(e)[:200]}")
    assert seen > 1000
