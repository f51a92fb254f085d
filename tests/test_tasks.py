"""harness/tasks.py: generated tasks against plain-Python references, determinism, difficulty
labels and the training cut, the train/test partition, trivial baselines, and bring-your-own
directories (good and bad files, difficulty, overlap)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from config import ConfigError
from harness.tasks import IGNORE, TASK_NAMES, DirTask, baseline_cells, line_hash, make_task, score, units


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_generation_is_deterministic_by_seed():
    for name in TASK_NAMES:
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
    task = make_task("khop")
    train = task.train_batch(_rng(2), 300)
    one = baseline_cells(task, task.test_batch("hops1", _rng(1), 300), train)
    assert one["one_hop"]["all"] == 1.0
    far = baseline_cells(task, task.test_batch("hops6", _rng(1), 300), train)
    assert abs(far["one_hop"]["all"] - 1 / task.m) < 0.05 and abs(far["majority"]["all"] - 1 / task.m) < 0.05
    mixed = baseline_cells(task, task.test_batch("test", _rng(1), 300), train)
    assert mixed["one_hop"]["1"] == 1.0 and mixed["one_hop"]["3"] < 0.35  # per-bucket, not only per split


def test_khop_difficulty_is_k_and_as_deep_as_trained_answers_three_hops():
    task = make_task("khop")
    batch = task.test_batch("hops4", _rng(3), 64)
    assert set(batch.difficulty[batch.scored].tolist()) == {4}
    pred = task.baseline_predictions(batch, task.train_batch(_rng(0), 64))["as_deep_as_trained"]
    W = task.width
    d = batch.x[:, W:] + 1
    three, alive = task.follow(d, np.full(len(d), 3))
    sel = batch.scored[:, W:] & alive
    assert np.array_equal(pred[:, W:][sel], (three - 1)[sel])  # the 3-hop answer, not the 4-hop one


def test_khop_hop_field_uses_every_place_in_training():
    """Fault: k was unary padded to 6 places, so places 4-6 held `#` in no training line and
    hops4/hops6 tested reading an unseen token. Now every place of the field holds both."""
    task = make_task("khop")
    batch = task.train_batch(_rng(0), 2000)
    field = batch.x[:, : task.width]
    mark = task.vocab.index("#")
    for place in range(task.width):
        assert (field[:, place] == mark).any() and (field[:, place] != mark).any(), place
    assert ((field == mark).sum(axis=1) <= 3).all()  # still only k = 1..3 in training


def _chase_reference(tokens: str, i: int) -> tuple[str | None, int]:
    """Plain Python: follow the jumps back from i to a label; (label, jumps) or (None, jumps)."""
    jumps = 0
    while tokens[i].isdigit():
        i -= int(tokens[i])
        jumps += 1
        if i < 0:
            return None, jumps
    return tokens[i], jumps


def test_chase_targets_and_difficulty_follow_the_chain():
    task = make_task("chase")
    for split in task.splits:
        batch = task.test_batch(split, _rng(4), 40)
        for row_x, row_y, row_d in zip(batch.x, batch.y, batch.difficulty, strict=True):
            text = task.decode(row_x.tolist())
            for i, ch in enumerate(text):
                label, jumps = _chase_reference(text, i) if ch.isdigit() else (None, 0)
                if label is None:
                    assert row_y[i] == IGNORE
                else:
                    assert task.decode([int(row_y[i])]) == label and row_d[i] == jumps


def test_chase_training_is_cut_at_its_depth_and_deeper_buckets_are_measured():
    task = make_task("chase")
    train = task.train_batch(_rng(0), 500)
    assert train.difficulty[train.scored].max() == 4  # trained <= 4 jumps deep
    cut2 = task.train_batch(_rng(0), 500, max_difficulty=2)
    assert cut2.difficulty[cut2.scored].max() == 2 and np.array_equal(cut2.x, train.x)
    sparse = task.test_batch("sparse", _rng(1), 300)
    _, diff = units(task, sparse.y, sparse)
    assert (diff >= 7).sum() > 500  # plenty of never-trained answers to measure
    cells = baseline_cells(task, sparse, train)
    assert cells["chance"]["7-8"] == pytest.approx(0.25)
    assert cells["nearest_terminal"]["7-8"] < cells["nearest_terminal"]["1-2"]
    assert cells["as_deep_as_trained"]["3-4"] == 1.0 and cells["as_deep_as_trained"]["7-8"] < 0.8


@pytest.mark.parametrize("name", TASK_NAMES)
def test_no_test_line_occurs_in_the_training_stream(name):
    """Fault: 87 % of lookup and 47 % of addition test lines were training lines. The
    partition reserves test lines; this checks a default ablation's whole stream (600 x 32)."""
    task = make_task(name, seed=0)
    rng = _rng(11)
    seen = set()
    for _ in range(600):
        seen.update(line_hash(task.train_batch(rng, 32).x).tolist())
    for split in task.splits:
        test = task.test_batch(split, _rng(12), 500)
        assert not seen & set(line_hash(test.x).tolist()), split


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
    ('{"input": "a", "target": "b", "difficulty": -1}', "train.jsonl:2: difficulty must be"),
    ('{"input": "a", "target": 3}', "train.jsonl:2: input and target must be strings"),
])
def test_task_dir_bad_line_names_file_and_line(tmp_path, content, expect):
    _write(tmp_path / "train.jsonl", [json.dumps({"input": "a", "target": "b"}), content])
    _write(tmp_path / "test.jsonl", [json.dumps({"input": "a", "target": "b"})])
    with pytest.raises(ConfigError, match=expect) as e:
        make_task(None, str(tmp_path))
    assert "\n" not in str(e.value)


def test_task_dir_difficulty_buckets_cut_and_overlap(tmp_path):
    _write(tmp_path / "train.jsonl", [json.dumps({"input": "ab>", "target": "ba", "difficulty": 1}),
                                      json.dumps({"input": "abc>", "target": "cba", "difficulty": 2}),
                                      json.dumps({"input": "x>", "target": "x"})])
    _write(tmp_path / "test.jsonl", [json.dumps({"input": "ab>", "target": "ba", "difficulty": 1}),
                                     json.dumps({"input": "cab>", "target": "bac", "difficulty": 3})])
    task = make_task(None, str(tmp_path))
    assert list(task.buckets) == ["0", "1", "2", "3"]
    assert [ex.difficulty for ex in task.test_examples("test")] == [1, 3]
    assert task.overlap() == {"test": {"lines": 2, "in_train": 1}}  # the first test line is a train line
    cut = task.train_batch(_rng(0), 64, max_difficulty=1)
    assert cut.difficulty[cut.scored].max() <= 1
    with pytest.raises(ConfigError, match="difficulty must be an integer"):
        _write(tmp_path / "test.jsonl", [json.dumps({"input": "a", "target": "b", "difficulty": "hard"})])
        make_task(None, str(tmp_path))


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
