"""harness/tasks.py: generated tasks against plain-Python references, determinism, trivial
baselines, and bring-your-own directories (good and bad files)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import config
from config import ConfigError
from harness.tasks import IGNORE, DirTask, make_task, score


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_generation_is_deterministic_by_seed():
    for name in ("khop", "lookup", "addition"):
        task = make_task(name, seed=3)
        a, b, c = task.train_batch(_rng(1), 16), task.train_batch(_rng(1), 16), task.train_batch(_rng(2), 16)
        assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
        assert not np.array_equal(a.x, c.x)
        assert a.x.shape[1] <= task.block_size and a.x.max() < task.vocab_size


def test_khop_targets_follow_the_pointers():
    task = make_task("khop")
    batch = task.train_batch(_rng(5), 64)
    W = task.width
    for row_x, row_y in zip(batch.x, batch.y, strict=True):
        k = task.decode(row_x[:W].tolist()).count("#")
        digits = [int(v) + 1 for v in row_x[W:]]
        for i, got in enumerate(row_y[W:]):
            pos = i
            for _ in range(k):
                pos -= digits[pos] if pos >= 0 else 0
            want = digits[pos] - 1 if pos >= 0 else IGNORE
            assert got == want
    # dense labels: most positions of a line carry a target
    assert batch.scored.sum(axis=1).mean() > 0.6 * task.length


def test_khop_one_hop_shortcut_is_exact_on_one_hop_and_near_chance_beyond():
    one_hop_task = make_task("khop", sizes=dataclasses.replace(config.TASKS, khop_train_hops=1))
    test = one_hop_task.test_batch("test", _rng(1), 300)
    train = one_hop_task.train_batch(_rng(2), 300)
    assert one_hop_task.baselines("test", test, train)["one_hop"] == 1.0
    task = make_task("khop")
    far = task.test_batch(task.splits[-1], _rng(1), 300)
    b = task.baselines(task.splits[-1], far, task.train_batch(_rng(2), 300))
    assert abs(b["one_hop"] - 1 / task.m) < 0.05 and abs(b["majority"] - 1 / task.m) < 0.05


def test_lookup_targets_are_the_composed_tables():
    task = make_task("lookup", seed=4)
    batch = task.test_batch("len6", _rng(0), 32)
    for row_x, row_y, row_s in zip(batch.x, batch.y, batch.scored, strict=True):
        value = int(row_x[0])
        for j in range(1, 7):
            value = int(task.tables[int(row_x[j]) - task.domain, value])
            assert row_y[j] == value
        assert row_s.sum() == 1 and row_s[6]


def test_addition_targets_are_the_sum_reversed():
    task = make_task("addition")
    batch = task.test_batch("digits4", _rng(0), 32)
    for row_x, row_y in zip(batch.x, batch.y, strict=True):
        text = task.decode(row_x.tolist())
        a, b = text.split("=")[0].split("+")
        answer = "".join(str(v) for v in row_y if v != IGNORE)
        assert int(answer[::-1]) == int(a[::-1]) + int(b[::-1]) and len(answer) == 5


def test_score_units():
    task = make_task("khop")
    batch = task.test_batch("test", _rng(0), 20)
    assert score(task, batch.y, batch) == 1.0
    wrong_one = batch.y.copy()
    r, c = np.argwhere(batch.scored)[0]
    wrong_one[r, c] = (wrong_one[r, c] + 1) % task.m
    assert 0.99 < score(task, wrong_one, batch) < 1.0  # per position
    add = make_task("addition")
    ab = add.test_batch("test", _rng(0), 20)
    wrong = ab.y.copy()
    r, c = np.argwhere(ab.scored)[0]
    wrong[r, c] = (wrong[r, c] + 1) % 10
    assert score(add, wrong, ab) == pytest.approx(19 / 20)  # per example


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_task_dir_vocab_and_target_only_loss(tmp_path):
    _write(tmp_path / "train.jsonl", [json.dumps({"input": "ab>", "target": "ba"}),
                                      json.dumps({"input": "xy>", "target": "yx"})])
    _write(tmp_path / "test_easy.jsonl", [json.dumps({"input": "ab>", "target": "ba"})])
    _write(tmp_path / "test_hard.jsonl", [json.dumps({"input": "ya>", "target": "ay"})])
    task = make_task(None, str(tmp_path))
    assert isinstance(task, DirTask) and task.splits == ("test_easy", "test_hard")
    assert set("abxy>") <= set(task.vocab)
    batch = task.train_batch(_rng(0), 8)
    for row_x, row_y in zip(batch.x, batch.y, strict=True):
        learned = [int(v) for v in row_y if v != IGNORE]
        assert len(learned) == 2  # the target characters only
        first = int(np.flatnonzero(row_y != IGNORE)[0])
        assert task.decode(row_x[: first + 1].tolist()).endswith(">")  # predicted after the input
    assert task.test_examples("test_hard")[0].target == task.encode("ay")


@pytest.mark.parametrize("content, expect", [
    ('{"input": "a"', "train.jsonl:2: not JSON"),
    ('{"input": "a", "tgt": "b"}', "train.jsonl:2: expected an object"),
    ('{"input": "a", "target": 3}', "train.jsonl:2: input and target must be strings"),
])
def test_task_dir_bad_line_names_file_and_line(tmp_path, content, expect):
    _write(tmp_path / "train.jsonl", [json.dumps({"input": "a", "target": "b"}), content])
    _write(tmp_path / "test.jsonl", [json.dumps({"input": "a", "target": "b"})])
    with pytest.raises(ConfigError, match=expect) as e:
        make_task(None, str(tmp_path))
    assert "\n" not in str(e.value)


def test_task_dir_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="train.jsonl is missing"):
        make_task(None, str(tmp_path))
    _write(tmp_path / "train.jsonl", [json.dumps({"input": "a", "target": "b"})])
    with pytest.raises(ConfigError, match="no test"):
        make_task(None, str(tmp_path))
    with pytest.raises(ConfigError, match="task_dir"):
        make_task(None, str(tmp_path / "nope"))


def test_unknown_task_names_the_field():
    with pytest.raises(ConfigError, match="task: unknown task 'chess'"):
        make_task("chess")
