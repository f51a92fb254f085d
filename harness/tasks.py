"""Tasks for the ablation harness: generated tasks where depth does work, and bring-your-own
task directories. Deterministic by seed; a small character vocabulary, not r50k.

Every generated task writes its answers into placeholder positions of the input, and the
targets sit at those positions (dense labels). No answer is ever fed back as an input, so no
answer can lean on an earlier one (no teacher-forcing leak): each answer position must be
computed from the problem alone, in one forward pass, and evaluation is the argmax there.

khop (pointer chasing), the default
    input   `#..# .. d1 d2 ... dL`: the hop count k in unary ("###..." is k=3, padded to the
            largest k of any split), then L pointers d in 1..m, each "jump d positions back".
    target  at every digit position i: start at i, k times jump i <- i - d_i, answer d_i at
            the end (no target where the chain runs off the start). Dense: ~L answers per line.
    depth   one hop is one content-dependent attention (read d at an offset set by your own
            digit); k hops need k sequential reads (or ~log2 k with pointer doubling). A
            1-layer model composes nothing, but can read a window of fixed offsets with its
            heads (see the measured table below: it is well above chance on k=2, not on k=3).
    splits  `test`: the training mixture k = 1..3; `hops1`..`hops3` one k each; `hops4`,
            `hops6`: more hops than ever trained (out of distribution).
    scored  per answer position (each is an independent query on a shared context).
    chance  1/m. Trivial baselines (computed on the real test sets and reported beside the
            arms): majority answer ~1/m; "answer your own digit" ~1/m; the one-hop shortcut
            (answer the 1-hop value whatever k says) = 1 on k=1, ~1/m on k>1, ~0.5 on `test`.

lookup (compositional table lookup)
    input   `x f1 f2 ... fL` then pad: x a symbol of the domain, f letters naming fixed random
            permutations of the domain (the tables are drawn from the seed and learned in the
            weights). Targets at every f position: the running value f_j(...f_1(x)).
    depth   applying chain step j needs the value after step j-1: one composition per layer.
            Trained on chains of length 1..5, tested on 1..5 and on lengths 6 and 8.
    scored  the final value of each chain (one answer per line). chance 1/|domain|; baselines:
            majority, "x unchanged", "last function applied to x".

addition (multi-digit, least significant digit first)
    input   `a+b=` then n+1 placeholders, a and b of n digits each written reversed.
    target  the n+1 digits of a+b, reversed, at the placeholders.
    depth   a digit needs the carry, which needs every lower digit: a carry chain.
            Trained on n = 1..3, tested on 1..3 and on n = 4 and 5.
    scored  per line, all digits right. chance 10^-(n+1); baselines: majority per position,
            "no carry" (digit-wise (a_i+b_i) mod 10) — right whenever no carry occurs.

What each arm reaches in the default budget (the `ablation` preset: d_model 64, 600 steps of
32 lines, AdamW lr 3e-3; sizes in config.TASKS), measured on 2 shared CPU cores; mean over 3
seeds for khop, 1 seed for lookup and addition; at each arm's test depth (refiner: 4 loop passes
after 1 prelude block; flat-n: a reasoner of n layers):

    task      split     refiner-k4  flat-4  flat-1  trivial baselines
    khop      test      0.973       1.000   0.780   one_hop 0.510, majority 0.254, chance 0.25
    khop      hops1/2/3 1.00/0.99/0.93  1.00/1.00/1.00  1.00/0.90/0.43  one_hop 1.00/0.25/0.25
    khop      hops4/6   0.353/0.266 0.331/0.253  0.270/0.248  chance 0.25
    lookup    test      0.80        0.85    0.53    last_function_only 0.36, chance 0.17
    lookup    len6/8    0.22/0.15   0.23/0.15  0.17/0.19  chance 0.17
    addition  test      0.34        0.82    0.32    no_carry 0.34, chance 0.004
    addition  digits4/5 0           0       0       no_carry 0.09/0.05

Read against the baselines: on addition the refiner and flat-1 sit exactly on the no-carry
shortcut; on khop flat-1 beats the one-hop shortcut on k=2 (0.90) without composing hops: with
jumps of at most m a k-hop answer lies within k*m positions, and several heads of one layer can
read that window; on k=3 it falls to 0.43. The refiner's khop `test` accuracy at test depth
1/2/4/8 is 0.907/0.969/0.973/0.969 (same weights); flat-4's at depth 1/2/4 is 0.30/0.95/1.00.
More loop passes at test do not buy more hops: hops4 stays ~0.35 at every depth.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import config
from config import ConfigError

IGNORE = -100
PAD = "."


@dataclass
class Batch:
    """Aligned arrays: inputs x (N, T), targets y (N, T) with IGNORE where nothing is learned,
    and `scored` (N, T) marking the answers a metric counts."""

    x: np.ndarray
    y: np.ndarray
    scored: np.ndarray


@dataclass
class GenExample:
    """Bring-your-own test line: the prompt ids and the target ids to generate greedily."""

    prompt: list[int]
    target: list[int]


@dataclass
class Task:
    """A task's vocabulary, its splits and how it is scored. Subclasses generate the data."""

    name: str
    vocab: str
    block_size: int
    splits: tuple[str, ...]  # test splits, easiest first; the last one is the hardest
    unit: str  # "position": every scored answer counts; "example": all of a line must be right
    chance: dict[str, float] = field(default_factory=dict)
    generative: bool = False  # bring-your-own: evaluated by greedy generation

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.vocab.index(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.vocab[i] for i in ids)

    def train_batch(self, rng: np.random.Generator, n: int) -> Batch:
        raise NotImplementedError

    def test_batch(self, split: str, rng: np.random.Generator, n: int) -> Batch:
        raise NotImplementedError

    def baselines(self, split: str, batch: Batch, train: Batch) -> dict[str, float]:
        """Accuracy of trivial predictors (no learning of the task) on this split."""
        raise NotImplementedError


def score(task: Task, pred: np.ndarray, batch: Batch) -> float:
    """Accuracy of predictions `pred` (N, T) under the task's unit."""
    hit = (pred == batch.y) | ~batch.scored
    if task.unit == "position":
        return float(hit[batch.scored].mean()) if batch.scored.any() else float("nan")
    return float(hit.all(axis=1).mean())


def _majority(train: Batch) -> int:
    return Counter(train.y[train.scored].tolist()).most_common(1)[0][0]


# --------------------------------------------------------------------------------------------
# khop


class KHop(Task):
    def __init__(self, sizes: config.TaskSizes):
        self.m, self.length = sizes.khop_max_jump, sizes.khop_length
        self.train_hops = tuple(range(1, sizes.khop_train_hops + 1))
        self.ood_hops = sizes.khop_ood_hops
        self.width = max(self.ood_hops + self.train_hops)  # the hop count, in unary
        super().__init__(
            name="khop", vocab="".join(str(d) for d in range(1, self.m + 1)) + "#" + PAD,
            block_size=self.width + self.length,
            # `test` is the training mixture; hopsK isolates one k (in distribution up to
            # khop_train_hops, beyond it out of distribution)
            splits=("test",) + tuple(f"hops{k}" for k in self.train_hops + self.ood_hops), unit="position",
        )
        self.chance = {s: 1.0 / self.m for s in self.splits}

    def _hops(self, split: str) -> tuple[int, ...]:
        return self.train_hops if split == "test" else (int(split.removeprefix("hops")),)

    def _make(self, rng: np.random.Generator, n: int, hops: tuple[int, ...]) -> Batch:
        k = rng.choice(np.array(hops), size=n)
        d = rng.integers(1, self.m + 1, size=(n, self.length))  # jumps 1..m
        rows = np.arange(n)[:, None]
        pos = np.broadcast_to(np.arange(self.length), (n, self.length)).copy()
        alive = np.ones_like(pos, dtype=bool)
        for step in range(int(k.max())):
            moving = (step < k)[:, None]
            nxt = pos - d[rows, np.clip(pos, 0, None)]
            pos = np.where(moving, nxt, pos)
            alive &= pos >= 0
        answer = d[rows, np.clip(pos, 0, None)]
        W = self.width
        x = np.empty((n, W + self.length), dtype=np.int64)
        # k written in unary ("###..." for k=3) so a hop count never seen in training is still
        # made of known symbols: the out-of-distribution splits measure extrapolation, not an
        # untrained embedding
        x[:, :W] = np.where(np.arange(W)[None, :] < k[:, None], self.m, self.m + 1)
        x[:, W:] = d - 1  # digit j has id j-1
        y = np.full_like(x, IGNORE)
        y[:, W:] = np.where(alive, answer - 1, IGNORE)
        return Batch(x, y, y != IGNORE)

    def train_batch(self, rng: np.random.Generator, n: int) -> Batch:
        return self._make(rng, n, self.train_hops)

    def test_batch(self, split: str, rng: np.random.Generator, n: int) -> Batch:
        return self._make(rng, n, self._hops(split))

    def baselines(self, split: str, batch: Batch, train: Batch) -> dict[str, float]:
        n, T = batch.x.shape
        W = self.width
        d = batch.x[:, W:] + 1
        i = np.arange(T - W)[None, :]
        back = i - d
        one_hop = np.where(back >= 0, d[np.arange(n)[:, None], np.clip(back, 0, None)] - 1, -1)
        pred_one = np.full_like(batch.x, -1)
        pred_one[:, W:] = one_hop
        pred_own = np.full_like(batch.x, -1)
        pred_own[:, W:] = batch.x[:, W:]
        return {
            "chance": self.chance[split],
            "majority": score(self, np.full_like(batch.x, _majority(train)), batch),
            "own_digit": score(self, pred_own, batch),
            "one_hop": score(self, pred_one, batch),
        }


# --------------------------------------------------------------------------------------------
# lookup


class Lookup(Task):
    def __init__(self, sizes: config.TaskSizes, seed: int):
        self.domain, self.n_funcs = sizes.lookup_domain, sizes.lookup_functions
        self.train_len, self.ood_lens = sizes.lookup_train_length, sizes.lookup_ood_lengths
        self.max_len = max((self.train_len,) + self.ood_lens)
        symbols = "0123456789"[: self.domain]
        letters = "ABCDEFGHIJKLMNOP"[: self.n_funcs]
        super().__init__(
            name="lookup", vocab=symbols + letters + PAD, block_size=self.max_len + 1,
            splits=("test",) + tuple(f"len{k}" for k in self.ood_lens), unit="example",
        )
        self.chance = {s: 1.0 / self.domain for s in self.splits}
        # the tables are part of the task: drawn from the seed, the same for every arm
        table_rng = np.random.default_rng([seed, 7919])
        self.tables = np.stack([table_rng.permutation(self.domain) for _ in range(self.n_funcs)])

    def _lengths(self, split: str) -> tuple[int, ...]:
        return tuple(range(1, self.train_len + 1)) if split == "test" else (int(split.removeprefix("len")),)

    def _make(self, rng: np.random.Generator, n: int, lengths: tuple[int, ...]) -> Batch:
        T = self.max_len + 1
        length = rng.choice(np.array(lengths), size=n)
        value = rng.integers(0, self.domain, size=n)
        funcs = rng.integers(0, self.n_funcs, size=(n, self.max_len))
        x = np.full((n, T), self.vocab.index(PAD), dtype=np.int64)
        y = np.full((n, T), IGNORE, dtype=np.int64)
        scored = np.zeros((n, T), dtype=bool)
        x[:, 0] = value
        for j in range(self.max_len):
            live = j < length
            value = np.where(live, self.tables[funcs[:, j], value], value)
            x[:, j + 1] = np.where(live, self.domain + funcs[:, j], x[:, j + 1])
            y[:, j + 1] = np.where(live, value, IGNORE)
        scored[np.arange(n), length] = True  # the final value of each chain
        return Batch(x, y, scored)

    def train_batch(self, rng: np.random.Generator, n: int) -> Batch:
        return self._make(rng, n, tuple(range(1, self.train_len + 1)))

    def test_batch(self, split: str, rng: np.random.Generator, n: int) -> Batch:
        return self._make(rng, n, self._lengths(split))

    def baselines(self, split: str, batch: Batch, train: Batch) -> dict[str, float]:
        rows = np.arange(len(batch.x))
        last = batch.scored.argmax(axis=1)
        pred_same = np.full_like(batch.x, -1)
        pred_same[rows, last] = batch.x[:, 0]
        pred_last = np.full_like(batch.x, -1)
        pred_last[rows, last] = self.tables[batch.x[rows, last] - self.domain, batch.x[:, 0]]
        return {
            "chance": self.chance[split],
            "majority": score(self, np.full_like(batch.x, _majority(train)), batch),
            "x_unchanged": score(self, pred_same, batch),
            "last_function_only": score(self, pred_last, batch),
        }


# --------------------------------------------------------------------------------------------
# addition


class Addition(Task):
    def __init__(self, sizes: config.TaskSizes):
        self.train_digits, self.ood_digits = sizes.addition_train_digits, sizes.addition_ood_digits
        n = max((self.train_digits,) + self.ood_digits)
        super().__init__(
            name="addition", vocab="0123456789+=_" + PAD, block_size=3 * n + 3,
            splits=("test",) + tuple(f"digits{k}" for k in self.ood_digits), unit="example",
        )
        self.chance = {"test": float(np.mean([10.0 ** -(k + 1) for k in range(1, self.train_digits + 1)]))}
        self.chance.update({f"digits{k}": 10.0 ** -(k + 1) for k in self.ood_digits})

    def _digits(self, split: str) -> tuple[int, ...]:
        if split == "test":
            return tuple(range(1, self.train_digits + 1))
        return (int(split.removeprefix("digits")),)

    def _make(self, rng: np.random.Generator, n: int, digit_counts: tuple[int, ...]) -> Batch:
        T = self.block_size
        x = np.full((n, T), self.vocab.index(PAD), dtype=np.int64)
        y = np.full((n, T), IGNORE, dtype=np.int64)
        counts = rng.choice(np.array(digit_counts), size=n)
        a = rng.integers(0, 10, size=(n, T))
        b = rng.integers(0, 10, size=(n, T))
        plus, eq, hole = self.vocab.index("+"), self.vocab.index("="), self.vocab.index("_")
        for k in np.unique(counts):
            r = counts == k
            ak, bk = a[r, :k], b[r, :k]  # least significant digit first
            carry = np.zeros(int(r.sum()), dtype=np.int64)
            total = np.zeros((int(r.sum()), k + 1), dtype=np.int64)
            for i in range(k):
                s = ak[:, i] + bk[:, i] + carry
                total[:, i], carry = s % 10, s // 10
            total[:, k] = carry
            line = np.concatenate([ak, np.full((len(ak), 1), plus), bk, np.full((len(ak), 1), eq),
                                   np.full((len(ak), k + 1), hole)], axis=1)
            x[r, : line.shape[1]] = line
            y[r, 2 * k + 2 : 3 * k + 3] = total
        return Batch(x, y, y != IGNORE)

    def train_batch(self, rng: np.random.Generator, n: int) -> Batch:
        return self._make(rng, n, tuple(range(1, self.train_digits + 1)))

    def test_batch(self, split: str, rng: np.random.Generator, n: int) -> Batch:
        return self._make(rng, n, self._digits(split))

    def baselines(self, split: str, batch: Batch, train: Batch) -> dict[str, float]:
        no_carry = np.full_like(batch.x, -1)
        for r in range(len(batch.x)):
            cols = np.flatnonzero(batch.scored[r])
            k = len(cols) - 1
            a, b = batch.x[r, :k], batch.x[r, k + 1 : 2 * k + 1]
            no_carry[r, cols] = np.append((a + b) % 10, 0)
        # majority per answer slot (slot = index within the answer)
        slot_major: dict[int, int] = {}
        for i in range(int(train.scored.sum(axis=1).max())):
            vals = [int(row[np.flatnonzero(s)[i]]) for row, s in zip(train.y, train.scored, strict=True)
                    if s.sum() > i]
            slot_major[i] = Counter(vals).most_common(1)[0][0]
        major = np.full_like(batch.x, -1)
        for r in range(len(batch.x)):
            for i, c in enumerate(np.flatnonzero(batch.scored[r])):
                major[r, c] = slot_major.get(i, 0)
        return {"chance": self.chance[split], "majority_per_position": score(self, major, batch),
                "no_carry": score(self, no_carry, batch)}


# --------------------------------------------------------------------------------------------
# bring your own


def _read_jsonl(path: Path) -> list[tuple[str, str]]:
    """Lines of {"input": str, "target": str}; a bad line raises ConfigError naming file:line."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"task_dir: {path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(obj, dict) or set(obj) != {"input", "target"}:
                raise ConfigError(f'{where}: expected an object with keys "input" and "target"')
            if not isinstance(obj["input"], str) or not isinstance(obj["target"], str):
                raise ConfigError(f"{where}: input and target must be strings")
            if not obj["target"]:
                raise ConfigError(f"{where}: target is empty")
            pairs.append((obj["input"], obj["target"]))
    if not pairs:
        raise ConfigError(f"task_dir: {path} has no examples")
    return pairs


class DirTask(Task):
    """A bring-your-own task. Training lines are drawn with replacement from train.jsonl."""

    def __init__(self, directory: str | Path):
        d = Path(directory)
        if not d.is_dir():
            raise ConfigError(f"task_dir: {str(d)!r} is not a directory")
        train_path = d / "train.jsonl"
        if not train_path.is_file():
            raise ConfigError(f"task_dir: {train_path} is missing")
        test_paths = sorted(d.glob("test*.jsonl"))
        if not test_paths:
            raise ConfigError(f"task_dir: no test*.jsonl in {d}")
        self.train_pairs = _read_jsonl(train_path)
        self.test_pairs = {p.stem: _read_jsonl(p) for p in test_paths}
        every = [pair for pairs in [self.train_pairs, *self.test_pairs.values()] for pair in pairs]
        chars = {c for i, t in every for c in i + t}
        longest = max(len(i) + len(t) for i, t in every)
        super().__init__(name=f"dir:{d.name}", vocab="".join(sorted(chars)) + "\x00",
                         block_size=max(8, longest), splits=tuple(self.test_pairs), unit="example",
                         generative=True)
        self.pad_id = len(self.vocab) - 1
        self.chance = {s: float("nan") for s in self.splits}

    def train_batch(self, rng: np.random.Generator, n: int) -> Batch:
        T = self.block_size
        x = np.full((n, T), self.pad_id, dtype=np.int64)
        y = np.full((n, T), IGNORE, dtype=np.int64)
        for r, j in enumerate(rng.integers(0, len(self.train_pairs), size=n)):
            inp, tgt = self.train_pairs[j]
            ids = self.encode(inp + tgt)
            x[r, : len(ids) - 1] = ids[:-1]
            # predict each target character from everything before it
            y[r, len(inp) - 1 : len(ids) - 1] = self.encode(tgt)
        return Batch(x, y, y != IGNORE)

    def test_examples(self, split: str) -> list[GenExample]:
        return [GenExample(self.encode(i), self.encode(t)) for i, t in self.test_pairs[split]]

    def test_batch(self, split: str, rng: np.random.Generator, n: int) -> Batch:
        raise NotImplementedError("bring-your-own tasks are evaluated by generation")

    def baselines(self, split: str, batch: Batch, train: Batch) -> dict[str, float]:
        counts = Counter(t for _, t in self.train_pairs)
        top = counts.most_common(1)[0][0]
        tests = self.test_pairs[split]
        return {"majority_target": sum(t == top for _, t in tests) / len(tests)}


TASK_NAMES = ("khop", "lookup", "addition")


def make_task(name: str | None, task_dir: str | None = None, seed: int = 0,
              sizes: config.TaskSizes | None = None) -> Task:
    """The task called `name` (or the directory `task_dir`); unknown names raise ConfigError."""
    sizes = sizes or config.TASKS
    if task_dir:
        return DirTask(task_dir)
    if name == "khop":
        return KHop(sizes)
    if name == "lookup":
        return Lookup(sizes, seed)
    if name == "addition":
        return Addition(sizes)
    raise ConfigError(f"task: unknown task {name!r} (allowed: {', '.join(TASK_NAMES)}, or task_dir)")
