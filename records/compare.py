"""`lab compare A B`: two training runs, or two ablations, side by side.

A and B are run names under $LAB_RUNS (a job's run is its id, "12"), hot or cold. Everything is
read from the runs' own files (config.json, metrics.jsonl, summary.json, ablation.json) through
the readers in records; the queue is asked only for each run's kind and status. Deltas are B
minus A, so "B is better" reads as a negative val_loss delta or a positive accuracy delta.

    compare("12", "13") -> {"kind": "train", "a": {...}, "b": {...}, "metrics": [...],
                            "arms": None, "config_diff": {"train.lr": [0.001, 0.003]},
                            "verdicts": {"a": None, "b": None}}
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import common
import records
from config import ConfigError

# The two families a comparison is between: what a run's files say it is. A smoke run writes
# what a training run writes (config.json, metrics.jsonl), so it compares as one.
TRAIN, ABLATION = "train", "ablation"
_WHAT = {TRAIN: "a train run", ABLATION: "an ablation"}


def _locate(name: str) -> Path:
    """The run's directory, or a ConfigError naming the run (a CLI's exit 2: the input is wrong)."""
    try:
        run_dir, _tier = records.locate_run(name)
        return run_dir
    except FileNotFoundError:
        # a job whose run directory is not $LAB_RUNS/<id> (another LAB_RUNS then) is found by its row
        row = records._job_row(name) if name.isdigit() else None
        if row and row.get("run_dir") and Path(row["run_dir"]).is_dir():
            return Path(row["run_dir"])
        raise ConfigError(f"compare: run {name} does not exist (no {records.runs_root() / name}, "
                          "and none in the archive)") from None
    except ConfigError as e:
        raise ConfigError(f"compare: run {name!r}: {e}") from None


def _family(run_dir: Path) -> str | None:
    if (run_dir / "ablation.json").is_file():
        return ABLATION
    if any((run_dir / f).is_file() for f in ("config.json", "metrics.jsonl", "summary.json")):
        return TRAIN
    return None


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys; a list of named tables (an ablation's arms) keyed by name, so
    that reordering arms is no difference and a changed arm names itself; other lists as values."""
    out: dict[str, Any] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif (isinstance(value, list) and value and all(isinstance(x, dict) and isinstance(x.get("name"), str)
                                                     for x in value)):
        for x in value:
            out.update(flatten({k: v for k, v in x.items() if k != "name"}, f"{prefix}{x['name']}."))
    else:
        out[prefix.rstrip(".")] = value
    return out


def config_diff(a: Any, b: Any) -> dict[str, list[Any]]:
    """Only the keys whose values differ, as {key: [a, b]}; a key one side lacks is None there."""
    fa, fb = flatten(a), flatten(b)
    out = {}
    for key in sorted(set(fa) | set(fb)):
        va, vb = fa.get(key), fb.get(key)
        if json.dumps(va, sort_keys=True, default=str) != json.dumps(vb, sort_keys=True, default=str):
            out[key] = [va, vb]
    return out


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return v


def _delta(a: Any, b: Any) -> float | None:
    na, nb = _number(a), _number(b)
    return None if na is None or nb is None else nb - na


def _row(name: str, a: Any, b: Any) -> dict[str, Any]:
    return {"name": name, "a": a, "b": b, "delta": _delta(a, b)}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise records.RecordError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def train_metrics(run_dir: Path) -> dict[str, Any]:
    """The numbers a training run is judged by, from its metrics.jsonl (summary.json and
    config.json where the log lacks one): best and last val_loss, last train loss, steps, params,
    tokens/s (tokens over training seconds, at the last logged step)."""
    rows = records.read_metrics(run_dir / "metrics.jsonl")
    summary = _read_json(run_dir / "summary.json")
    run_cfg = _read_json(run_dir / "config.json")
    evals = [r for r in rows if r.get("event") == "eval" and _number(r.get("val_loss")) is not None]
    trains = [r for r in rows if r.get("event", "train") == "train" and _number(r.get("loss")) is not None]
    best = records.best_metric(run_dir)
    last_train = trains[-1] if trains else {}
    tokens, seconds = _number(last_train.get("tokens")), _number(last_train.get("train_s"))
    steps = max((r["step"] for r in rows if isinstance(r.get("step"), int)), default=None)
    return {
        "best_val_loss": best["value"] if best and best.get("name") == "val_loss" else
        _number(summary.get("best_val_loss")),
        "last_val_loss": evals[-1]["val_loss"] if evals else _number(summary.get("val_loss")),
        "last_train_loss": last_train.get("loss"),
        "steps": summary.get("steps", steps),
        "params": run_cfg.get("params", summary.get("params")),
        "tokens_per_s": tokens / seconds if tokens is not None and seconds else None,
    }


def train_config(run_dir: Path) -> dict[str, Any]:
    """The resolved config a training run trained with (config.json's `config`)."""
    run_cfg = _read_json(run_dir / "config.json")
    resolved = run_cfg.get("config", run_cfg)
    return resolved if isinstance(resolved, dict) else {}


def _arm_numbers(arm: dict[str, Any]) -> dict[str, Any]:
    d = arm.get("diff") if isinstance(arm.get("diff"), dict) else {}
    return {"mean": arm.get("mean"), "ci_low": arm.get("ci_low"), "ci_high": arm.get("ci_high"),
            "diff": d.get("mean"), "diff_ci_low": d.get("ci_low"), "diff_ci_high": d.get("ci_high"),
            "p_holm": d.get("p_holm"), "verdict": arm.get("verdict")}


def _arms(abl_a: dict[str, Any], abl_b: dict[str, Any]) -> dict[str, Any]:
    """Per arm present in both: A's and B's mean and paired difference, with deltas; the arms in
    only one, by name (a renamed arm is two arms: nothing says it is the same model)."""
    by_a = {a["name"]: a for a in abl_a.get("arms") or [] if isinstance(a, dict) and "name" in a}
    by_b = {a["name"]: a for a in abl_b.get("arms") or [] if isinstance(a, dict) and "name" in a}
    both = []
    for name in [n for n in by_a if n in by_b]:
        na, nb = _arm_numbers(by_a[name]), _arm_numbers(by_b[name])
        both.append({"name": name, "a": na, "b": nb, "delta_mean": _delta(na["mean"], nb["mean"]),
                     "delta_diff": _delta(na["diff"], nb["diff"])})
    return {"both": both, "only_a": [n for n in by_a if n not in by_b],
            "only_b": [n for n in by_b if n not in by_a]}


def _side(name: str) -> dict[str, Any]:
    run_dir = _locate(name)
    family = _family(run_dir)
    if family is None:
        raise ConfigError(f"compare: run {name} is neither a training run nor an ablation (no ablation.json, "
                          f"config.json or metrics.jsonl in {run_dir})")
    try:
        info = records.summarize_run(name)
    except FileNotFoundError:  # found by its queue row, outside $LAB_RUNS: the row still knows
        info = records._job_row(name) or {}
    abl = records.read_ablation(run_dir) if family == ABLATION else None
    return {"run": name, "family": family, "kind": info.get("kind") or family, "status": info.get("status"),
            "path": str(run_dir), "ablation": abl,
            "verdict": (abl or {}).get("verdict"), "primary": (abl or {}).get("primary")}


def compare(a: str, b: str) -> dict[str, Any]:
    """Runs A and B side by side (deltas are B minus A).

    {"kind": "train" | "ablation",
     "a": {"run", "kind", "status", "path", "verdict", "primary"}, "b": {...},
     "metrics": [{"name", "a", "b", "delta"}, ...],   # train: best/last val_loss, last train
                 # loss, steps, params, tokens/s; ablation: verdict, primary (delta None)
     "arms": None | {"both": [{"name", "a": {mean, ci_low, ci_high, diff, diff_ci_low,
                     diff_ci_high, p_holm, verdict}, "b": {...}, "delta_mean", "delta_diff"}],
                     "only_a": [name], "only_b": [name]},
     "config_diff": {key: [a, b]},   # train: config.json's resolved config; ablation:
                                     # "spec.<key>" and "configs.<arm>.<section>.<key>"
     "verdicts": {"a": verdict | None, "b": verdict | None}}

    A run that does not exist, or runs of different families, is a ConfigError naming it."""
    sa, sb = _side(a), _side(b)
    if sa["family"] != sb["family"]:
        raise ConfigError(f"compare: run {b} is {_WHAT[sb['family']]}, run {a} {_WHAT[sa['family']]}: "
                          "compare like with like")
    arms = None
    if sa["family"] == TRAIN:
        da, db = Path(sa["path"]), Path(sb["path"])
        ma, mb = train_metrics(da), train_metrics(db)
        metrics = [_row(k, ma[k], mb[k]) for k in ma]
        diff = config_diff(train_config(da), train_config(db))
    else:
        abl_a, abl_b = sa["ablation"] or {}, sb["ablation"] or {}
        metrics = [_row(k, sa[k], sb[k]) for k in ("verdict", "primary")]
        arms = _arms(abl_a, abl_b)
        # what was asked (the spec) and what it resolved to (each arm's config, by arm name)
        diff = config_diff(_ablation_setup(abl_a), _ablation_setup(abl_b))
    side = ("run", "kind", "status", "path", "verdict", "primary")
    return {"kind": sa["family"], "a": {k: sa[k] for k in side}, "b": {k: sb[k] for k in side},
            "metrics": metrics, "arms": arms, "config_diff": diff,
            "verdicts": {"a": sa["verdict"], "b": sb["verdict"]}}


def _ablation_setup(abl: dict[str, Any]) -> dict[str, Any]:
    spec = abl.get("spec") if isinstance(abl.get("spec"), dict) else {}
    names = [a.get("name") for a in spec.get("arms") or [] if isinstance(a, dict)]
    configs = abl.get("configs") if isinstance(abl.get("configs"), list) else []
    by_arm = {str(n): c for n, c in zip(names, configs, strict=False) if isinstance(c, dict)}
    return {"spec": spec, "configs": by_arm}


# --- for people ---------------------------------------------------------------------------------


def sig(v: Any, sign: bool = False) -> str:
    """Three significant digits (common.sig), "-" for none."""
    return common.sig(v, sign, missing="-")


def _columns(header: list[str], rows: list[list[str]]) -> list[str]:
    """Left-aligned columns, as wide as their widest cell, under one header line."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]


def _value(v: Any) -> str:
    if isinstance(v, str):
        return v
    return sig(v) if isinstance(v, (int, float)) or v is None else json.dumps(v)


def compare_text(result: dict[str, Any]) -> str:
    """`compare`'s result for a person: who is compared, the metrics with B - A, the arms (for
    ablations), the config keys that differ."""
    a, b = result["a"], result["b"]
    lines = [f"compare {result['kind']}: A = run {a['run']} ({a['kind']}, {a['status'] or '?'}), "
             f"B = run {b['run']} ({b['kind']}, {b['status'] or '?'}); deltas are B - A", ""]
    lines += _columns(["METRIC", "A", "B", "B-A"],
                      [[m["name"], _value(m["a"]), _value(m["b"]), sig(m["delta"], sign=True)]
                       for m in result["metrics"]])
    arms = result.get("arms")
    if arms:
        if arms["both"]:
            lines += ["", *_columns(
                ["ARM", "MEAN A", "MEAN B", "B-A", "DIFF A", "DIFF B", "B-A", "VERDICT A", "VERDICT B"],
                [[r["name"], sig(r["a"]["mean"]), sig(r["b"]["mean"]), sig(r["delta_mean"], sign=True),
                  sig(r["a"]["diff"], sign=True), sig(r["b"]["diff"], sign=True),
                  sig(r["delta_diff"], sign=True), str(r["a"]["verdict"]), str(r["b"]["verdict"])]
                 for r in arms["both"]])]
        for side in ("a", "b"):
            if arms[f"only_{side}"]:
                lines.append(f"only in {side.upper()}: " + ", ".join(arms[f"only_{side}"]))
    diff = result["config_diff"]
    lines.append("")
    if diff:
        lines += _columns(["CONFIG", "A", "B"], [[k, _value(va), _value(vb)] for k, (va, vb) in diff.items()])
    else:
        lines.append("config: no key differs")
    return "\n".join(lines)
