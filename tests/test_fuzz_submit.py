"""`lab submit` fuzzed: over a thousand calls, each a valid submission of some kind with one to
three of its flags or spec fields replaced by a value drawn from a pool of good and hostile ones
(integers past 2^63 and of thousands of digits, nan and inf, nesting thousands deep, control
characters, strings of megabytes, spec and task files that are not UTF-8, ...).

Every call must end in one of two ways: queued (exit 0, one job more, whose stored spec parses
back with jobs.parse_spec), or refused (exit 2, nothing queued, `Error: ...` naming the flag or
field that was changed). A traceback, exit 1, or a refusal that names something else fails.

Calls run in-process through click's CliRunner (a subprocess per call would take minutes), on a
private queue under tmp_path, values drawn from random.Random(SEED): a failure reproduces.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from helpers_daemon import queue_env, set_env

import config
import jobs
from cli import main
from jobs import paths as job_paths
from store import Store

SEED = 20261201
CALLS = 1200
# The flags of `lab submit` besides --set and --json, and the spec keys every kind has.
FLAGS = ("--lane", "--after", "--priority", "--timeout", "--issue", "--earned-by", "--force",
         "--reason", "--host")
HOST = "testhost"  # LAB_HOST of this process (queue_env)

# --- values ---------------------------------------------------------------------------------

# TOML texts for `--set key=TEXT` (parse_value reads TOML; bare words are strings).
HOSTILE_VALUES: tuple[str, ...] = (
    str(2**53), str(2**53 + 1), str(2**63 - 1), str(2**63), str(2**64), str(-(2**63) - 1),
    "1" + "0" * 400, "1" * 5000, "-" + "9" * 4400, "1" + "0" * 400 + ".0", "1e400", "-1e400",
    "nan", "inf", "-inf", "+inf", "'nan'", "-0.0", "5e-324", "1e308", "0", "-1", "true", "false",
    "[" * 3000 + "]" * 3000, "[" * 40 + "1" + "]" * 40, "{a=" * 50 + "1" + "}" * 50,
    "[1, 2, 3]", "[]", "{}", "{a = 1}", "['a', 1]", "[[1], [2]]", "[nan]", "{d_model = 1e308}",
    "{d_model = 64}", "{lr = inf}", "{n_layers = 99999999999999999999}", '"a\\nb"', '"a\\u0000b"',
    '"\\t"', '""', "''", "x" * 20_000, "é" * 50, "SIG_DFL", "SIGKILL", "SIGSTOP", "SIG_IGN",
    "../etc/passwd", "/etc/passwd", ".env", "queue.db", "harness/specs/khop_default.toml",
    "harness/specs", "data", "[", "{", "=", "'unterminated", "a=b", "1979-05-27T07:32:00Z",
    "0x10", "1_000", "0b11", "1e3", "best", "last", "tiny", "rtx2060", "ablation", "refiner",
    "reasoner", "negative", "positive", "khop", "sample",
)
# Values no field may accept: non-finite, past 2^53, deeper than config.MAX_NESTING, longer than
# config.MAX_STRING_CHARS. A call that sets one of them must be refused.
ALWAYS_BAD_VALUES = frozenset({
    str(2**53 + 1), str(2**63 - 1), str(2**63), str(2**64), str(-(2**63) - 1), "1" + "0" * 400,
    "1" * 5000, "-" + "9" * 4400, "1" + "0" * 400 + ".0", "1e400", "-1e400", "nan", "inf", "-inf",
    "+inf", "[" * 3000 + "]" * 3000, "[" * 40 + "1" + "]" * 40, "{a=" * 50 + "1" + "}" * 50, "[nan]",
    "{lr = inf}", "{n_layers = 99999999999999999999}", "x" * 20_000,
})
# Values a field must refuse though they are well-formed: not a signal to send.
BAD_FOR_FIELD = {("sleep", "signal"): frozenset({"SIG_DFL", "SIG_IGN"})}
# Flag values that must be refused whatever else the call says.
BAD_FLAG_VALUES: dict[str, frozenset[str]] = {
    "--lane": frozenset({"tpu", "", "GPU", "gpu\n", "gpu,cpu"}),
    "--after": frozenset({"999999", "0", "-1", "x1", "1.5", str(2**63), str(2**64), "9" * 5000, ""}),
    "--priority": frozenset({"1001", "-1001", str(2**63), str(-(2**63) - 1), "9" * 400, "1.5", "nan", "x"}),
    "--timeout": frozenset({"0", "-1", "nan", "inf", "-inf", "1e400", "2592001", "x"}),
    "--issue": frozenset({"0", "-1", str(2**31), str(2**63), "9" * 5000, "x"}),
    "--earned-by": frozenset({"999999", "0", "-1", str(2**63), "x"}),
    "--host": frozenset({"", " ", "a\nb", "a b", "a\tb", "h" * 129, "\x00"}),
}
# Texts for the flags (click parses --priority/--issue as int, --timeout as float).
FLAG_VALUES: dict[str, tuple[str, ...]] = {
    "--lane": ("gpu", "cpu", "tpu", "", "GPU", "gpu\n", "gpu,cpu"),
    "--after": ("1", "2", "999999", "0", "-1", "x1", "1.5", str(2**63), str(2**64), "9" * 5000, ""),
    "--priority": ("0", "5", "-5", "1000", "1001", "-1001", str(2**63), str(-(2**63) - 1), "9" * 400,
                   "1.5", "nan", "x"),
    "--timeout": ("10", "0.5", "0", "-1", "nan", "inf", "-inf", "1e400", "2592000", "2592001", "x", "1e-300"),
    "--issue": ("1", "999", "0", "-1", str(2**31 - 1), str(2**31), str(2**63), "9" * 5000, "x"),
    "--earned-by": ("1", "999999", "0", "-1", str(2**63), "x"),
    "--reason": ("calibration", "", "   ", "a\nb", "x" * 5000),
    "--host": (HOST, "other-host", "", " ", "a\nb", "a b", "a\tb", "h" * 129, "h" * 128, "\x00", "é-box",
               " other-host "),
}


def good_value(rng: random.Random, kind: str, name: str, tp: str, lo: float | None,
               hi: float | None, files: dict[str, str]) -> str:
    """A TOML text the field should accept (most of the time: relations may still refuse it)."""
    special = GOOD.get(kind, {}).get(name)
    if special:
        return rng.choice(special(files))
    if tp == "bool":
        return rng.choice(("true", "false"))
    if tp in ("int", "float"):
        a = lo if lo is not None else 0
        b = min(hi if hi is not None else 1000, a + 10_000)
        return repr(rng.uniform(a, b)) if tp == "float" else str(rng.randint(int(a), int(b)))
    return rng.choice(("x", "abc"))


GOOD: dict[str, dict[str, Callable[[dict[str, str]], list[str]]]] = {
    "sleep": {"seconds": lambda f: ["0.01", "0", "1", "2.5"],
              "signal": lambda f: ["SIGTERM", "SIGKILL", "''"], "exit_code": lambda f: ["0", "3", "255"]},
    "smoke": {"preset": lambda f: ["tiny", "ablation"], "arch": lambda f: ["refiner", "reasoner"],
              "set": lambda f: ["{}", "{d_model = 64}", "{lr = 0.001}"], "steps": lambda f: ["4", "40"]},
    "train": {"preset": lambda f: ["tiny", "ablation"], "arch": lambda f: ["refiner", "reasoner"],
              "set": lambda f: ["{}", "{d_model = 64}"], "data": lambda f: ["sample", "mine"]},
    "eval": {"run": lambda f: [f["run"], f"'{f['job']}'"], "checkpoint": lambda f: ["best", "last"],
             "n_steps": lambda f: ["1", "8"], "batches": lambda f: ["1", "10"]},
    "tokenize": {"src": lambda f: [f"['{f['text']}']", f"['{f['latin1_text']}']"],
                 "name": lambda f: ["newdata", "d.v2"]},
    "ablation": {"control": lambda f: ["negative", "positive"], "seeds": lambda f: ["2", "3"],
                 "steps": lambda f: ["10", "100"], "seconds": lambda f: ["5", "60.5"],
                 "why": lambda f: ["'a test'"], "spec_file": lambda f: ["harness/specs/khop_default.toml"],
                 "eval_examples": lambda f: ["100", "200"]},
    "archive": {"runs": lambda f: [f"['{f['run']}']"], "older_than_days": lambda f: ["30", "0"]},
}

# A valid spec per kind (TOML texts): every call starts from one and changes a few things.
def baseline(kind: str, files: dict[str, str]) -> dict[str, str]:
    return {
        "sleep": {"seconds": "0.01"},
        "smoke": {},
        "train": {},
        "eval": {"run": files["run"]},
        "tokenize": {"src": f"['{files['text']}']", "name": "newdata"},
        "ablation": {"control": "negative"},
        "archive": {"runs": f"['{files['run']}']"},
    }[kind]


# --- files the specs may name ----------------------------------------------------------------

SPEC_FILES = {  # name -> bytes of an ablation spec file
    "latin1.toml": 'why = "caf\xe9"\ntask = "khop"\n'.encode("latin-1"),
    "utf16.toml": 'task = "khop"\n'.encode("utf-16"),
    "binary.toml": bytes(range(256)) * 4,
    "inf.toml": b"seconds = inf\ntask = \"khop\"\n",
    "nan.toml": b"seconds = nan\n",
    "deep.toml": b"x = " + b"[" * 3000 + b"]" * 3000 + b"\n",
    "huge.toml": b"steps = 1" + b"0" * 400 + b"\n",
    "bigint.toml": b"seeds = 99999999999999999999\n",
    "empty.toml": b"",
}
TASK_FILES = {  # task dir -> train.jsonl bytes (and a test.jsonl like it)
    "task_latin1": '{"input": "caf\xe9", "target": "x"}\n'.encode("latin-1"),
    "task_utf16": '{"input": "a", "target": "x"}\n'.encode("utf-16"),
    "task_binary": bytes(range(256)),
    "task_deep": b'{"input": ' + b"[" * 3000 + b"]" * 3000 + b', "target": "x"}\n',
}


@pytest.fixture
def fuzz_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Store, dict[str, str]]:
    """A private queue and LAB_RUNS, and files for specs to name: a run, a dataset, texts, and
    under LAB_DATA (an allowed root) task directories and spec files that are not UTF-8."""
    set_env(monkeypatch, queue_env(tmp_path))
    data = tmp_path / "data"
    monkeypatch.setenv("LAB_DATA", str(data))
    # Spec files are only read from harness/specs of the checkout; the test writes none there,
    # and lets ablation.spec_file name LAB_DATA too, so the decode path of harness/ablate.py
    # load_spec_file is reached with files of its own.
    monkeypatch.setitem(job_paths.ALLOWED_ROOTS, "spec_file", ("harness/specs", "data"))
    runs = tmp_path / "runs"
    (runs / "train-20261201-120000-abc123").mkdir(parents=True)
    (runs / "data" / "mine").mkdir(parents=True)
    (runs / "data" / "mine" / "meta.json").write_text("{}")
    data.mkdir()
    (data / "a.txt").write_text("some text\n")
    (data / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    for name, body in SPEC_FILES.items():
        (data / name).write_bytes(body)
    for name, body in TASK_FILES.items():
        (data / name).mkdir()
        (data / name / "train.jsonl").write_bytes(body)
        (data / name / "test.jsonl").write_bytes(body)
    store = Store(str(tmp_path / "queue.db"))
    # Job 1, queued: an eval of run '1' is one the queue will make.
    job = store.submit("train", "gpu", {}, timeout_s=60, max_attempts=1)
    files = {"run": "train-20261201-120000-abc123", "job": str(job), "text": str(data / "a.txt"),
             "latin1_text": str(data / "latin1.txt"), "data": str(data)}
    return store, files


# --- one call ------------------------------------------------------------------------------


@dataclasses.dataclass
class Call:
    kind: str
    sets: dict[str, str]  # key -> TOML text
    flags: dict[str, str | None]  # flag -> value (None: a bare flag, --force)
    changed: list[str]  # what was changed from the valid baseline: flag or spec key names
    raw_sets: list[str] = dataclasses.field(default_factory=list)  # malformed --set arguments
    must_refuse: bool = False  # known bad (a review case): queueing it is a failure

    def known_bad(self) -> bool:
        """Whether the call holds a value that must be refused, whatever else it holds."""
        if self.must_refuse or self.raw_sets or "kind" in self.changed:
            return True
        if any(v in ALWAYS_BAD_VALUES or v in BAD_FOR_FIELD.get((self.kind, k), ())
               for k, v in self.sets.items()):
            return True
        if any(v in BAD_FLAG_VALUES.get(f, ()) for f, v in self.flags.items() if v is not None):
            return True
        return "--force" in self.flags and not (self.flags.get("--reason") or "").strip()

    def argv(self) -> list[str]:
        out = ["submit", self.kind]
        for k, v in self.sets.items():
            out += ["--set", f"{k}={v}"]
        for raw in self.raw_sets:
            out += ["--set", raw]
        for flag, value in self.flags.items():
            out += [flag] if value is None else [flag, value]
        return [*out, "--json"]


def spec_fields(kind: str) -> list[dataclasses.Field[Any]]:
    return list(dataclasses.fields(jobs.get_kind(kind).spec))


def type_of(kind: str, name: str) -> str:
    return next(f["type"] for k in KINDS for f in k["fields"] if k["kind"] == kind and f["name"] == name)


def draw(rng: random.Random, files: dict[str, str], kinds: list[str]) -> Call:
    kind = rng.choice(kinds)
    call = Call(kind, dict(baseline(kind, files)), {}, [])
    if rng.random() < 0.03:  # an unknown kind
        call.kind = rng.choice(("nosuchkind", "", "Sleep", "sleep\n", "x" * 300))
        call.sets, call.changed = {}, ["kind"]
        return call
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        what = rng.random()
        fields = spec_fields(kind)
        if what < 0.55:  # a spec field: a good value or a hostile one
            f = rng.choice(fields)
            meta = f.metadata or {}
            if rng.random() < 0.35:
                text = good_value(rng, kind, f.name, type_of(kind, f.name), meta.get("min"),
                                  meta.get("max"), files)
            else:
                text = rng.choice(HOSTILE_VALUES)
            call.sets[f.name] = text
            call.changed.append(f.name)
        elif what < 0.62 and kind == "ablation":  # spec files and task dirs that are not UTF-8
            if rng.random() < 0.5:
                call.sets.pop("control", None)
                call.sets["spec_file"] = str(Path(files["data"]) / rng.choice(sorted(SPEC_FILES)))
                call.changed.append("spec_file")
            else:
                call.sets["task_dir"] = str(Path(files["data"]) / rng.choice(sorted(TASK_FILES)))
                call.changed.append("task_dir")
        elif what < 0.66:  # an unknown key, or a required one left out
            if rng.random() < 0.5 or not call.sets:
                key = rng.choice(("sceonds", "nosuchkey", "x" * 200, "ru n", "é"))
                call.sets[key] = "1"
                call.changed.append(key)
            else:
                key = rng.choice(sorted(call.sets))
                del call.sets[key]
                call.changed.append(key)
        elif what < 0.69:  # --set that is not key=value
            call.raw_sets.append(rng.choice(("novalue", "=1", " =1", "", "==")))
            call.changed.append("--set")
        else:  # a flag
            flag = rng.choice(FLAGS)
            if flag == "--force":
                call.flags[flag] = None
            else:
                call.flags[flag] = rng.choice(FLAG_VALUES[flag])
            call.changed.append(flag)
    return call


# The fixed cases of the review that once printed a traceback or were queued though bad, each a
# change from a kind's valid baseline.
def review_cases(files: dict[str, str]) -> list[Call]:
    big = str(2**63)
    cases = [Call("sleep", {"seconds": "0.01"}, {flag: big}, [flag])
             for flag in ("--priority", "--issue", "--after", "--earned-by")]
    cases += [Call("sleep", {"seconds": "0.01"}, {flag: "1" * 5000}, [flag])
              for flag in ("--priority", "--issue", "--after", "--earned-by")]
    cases += [
        Call("sleep", {"seconds": "1" + "0" * 400}, {}, ["seconds"]),
        Call("sleep", {"seconds": "1" * 5000}, {}, ["seconds"]),
        Call("sleep", {"seconds": "[" * 3000 + "]" * 3000}, {}, ["seconds"]),
        Call("sleep", {"seconds": "nan"}, {}, ["seconds"]),
        Call("sleep", {"signal": "SIG_DFL"}, {}, ["signal"]),
        Call("sleep", {"seconds": "0.01"}, {"--host": "a\nb"}, ["--host"]),
        Call("sleep", {"seconds": "0.01"}, {"--issue": "-1"}, ["--issue"]),
        Call("ablation", {"control": "negative", "seconds": "inf"}, {}, ["seconds"]),
        Call("train", {"data": "nosuchdata"}, {}, ["data"]),
        Call("eval", {"run": "nosuchrun"}, {}, ["run"]),
    ]
    for name in SPEC_FILES:
        cases.append(Call("ablation", {"spec_file": str(Path(files["data"]) / name)}, {}, ["spec_file"]))
    for name in TASK_FILES:
        cases.append(Call("ablation", {"control": "negative", "task_dir": str(Path(files["data"]) / name)},
                          {}, ["task_dir"]))
    for case in cases:
        case.must_refuse = True
    return cases


# --- what a refusal must say -------------------------------------------------------------------

# Config keys a `set` table names in its errors (model.d_model, train.lr, ...).
CONFIG_SECTIONS = ("model.", "train.", "precision.", "set")


def names_a_change(call: Call, err: str) -> bool:
    """Whether the error names one of the things the call changed: a flag (`--priority: ...`, or
    click's `Invalid value for '--priority'`), `--set KEY`, `<kind>.<key>`, `kind:`, `lane:`."""
    for c in call.changed:
        if c.startswith("--"):
            bare = c[2:]
            if c in err or (bare == "lane" and "lane:" in err) or (c == "--set" and "--set" in err):
                return True
            continue
        if c == "kind":
            if "kind:" in err or "No such command" in err or "unknown job kind" in err:
                return True
            continue
        if f"{call.kind}.{c}" in err or f"--set {c}" in err:
            return True
        if c == "set" and any(s in err for s in CONFIG_SECTIONS):
            return True  # the override's own key is named: model.d_model
        if call.kind == "ablation" and ABLATION_FIELD.search(err):
            # The harness checks the spec as a whole: a changed (or removed) key can break a
            # relation stated on another field, and a spec file's own keys are named as fields
            # (`ablation.seconds` from spec_file). Still a field of the spec, named.
            return True
    return False


ABLATION_FIELD = re.compile(r"ablation\.[a-z_]+")


def test_fuzzed_submissions_are_queued_valid_or_refused_naming_the_field(
        fuzz_env: tuple[Store, dict[str, str]]) -> None:
    store, files = fuzz_env
    rng = random.Random(SEED)
    kinds = jobs.kind_names()
    calls = review_cases(files) + [draw(rng, files, kinds) for _ in range(CALLS)]
    runner = CliRunner()
    problems: list[str] = []
    outcomes = {"queued": 0, "refused": 0}

    def total() -> int:
        return sum(n for lane in store.counts().values() for n in lane.values())

    for i, call in enumerate(calls):
        before = total()
        argv = call.argv()
        r = runner.invoke(main, argv)
        where = f"call {i} {[a[:60] for a in argv]!r} (changed {call.changed})"
        after = total()
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            problems.append(f"{where}: {type(r.exception).__name__}: {str(r.exception)[:200]}")
            continue
        if r.exit_code == 0:
            outcomes["queued"] += 1
            if call.known_bad():
                problems.append(f"{where}: queued, but it holds a value that must be refused")
                continue
            try:
                job = json.loads(r.stdout)
                row = store.get(job["id"])
                assert row is not None and after == before + 1
                jobs.parse_spec(row["kind"], row["spec"])
            except Exception as e:  # collected, so one run reports every case
                problems.append(f"{where}: queued, but {type(e).__name__}: {str(e)[:200]}")
            continue
        outcomes["refused"] += 1
        err = r.stderr
        if r.exit_code != 2:
            problems.append(f"{where}: exit {r.exit_code}: {err[-300:]}")
        elif after != before:
            problems.append(f"{where}: refused but queued a job")
        elif not ("Error" in err or '"error"' in err) or not names_a_change(call, err):  # --json: JSON
            problems.append(f"{where}: the refusal names no changed field: {err[-300:]}")
        elif "Traceback" in err:
            problems.append(f"{where}: a traceback: {err[-300:]}")
    print(outcomes)  # with -s: how the calls ended
    assert not problems, f"{len(problems)} of {len(calls)} calls:\n" + "\n".join(problems[:40])
    # Both outcomes are exercised in earnest, not all refusals (nor all accepted).
    assert outcomes["queued"] > 0.15 * len(calls) and outcomes["refused"] > 0.3 * len(calls), outcomes


KINDS: list[dict[str, Any]] = []


@pytest.fixture(autouse=True)
def _kinds() -> None:
    """The kinds and their fields as `lab kinds --json` lists them (types for good values)."""
    if not KINDS:
        r = CliRunner().invoke(main, ["kinds", "--json"])
        assert r.exit_code == 0, r.output
        KINDS.extend(json.loads(r.stdout))


def test_a_spec_file_that_is_not_utf8_is_refused_naming_it(fuzz_env: tuple[Store, dict[str, str]]) -> None:
    """The decode path itself: latin-1, UTF-16 and binary spec files reach
    harness/ablate.load_spec_file (through the widened allowed root) and are refused as
    ablation.spec_file, with nothing queued."""
    store, files = fuzz_env
    for name in ("latin1.toml", "utf16.toml", "binary.toml"):
        r = CliRunner().invoke(main, ["submit", "ablation", "--set",
                                      f"spec_file={Path(files['data']) / name}"])
        assert r.exit_code == 2 and "ablation.spec_file" in r.stderr, (name, r.stderr)
    assert [j["id"] for j in store.list_jobs()] == [1]
    assert config.MAX_NESTING < 3000  # the deep files above are deeper than anything accepted
