"""Tasks for the ablation harness: generated tasks where depth does work, and bring-your-own
task directories. Deterministic by seed; a small character vocabulary, not r50k.

Every generated task writes its answers into placeholder positions of the input, and the
targets sit at those positions (dense labels). No answer is ever fed back as an input, so no
answer can lean on an earlier one (no teacher-forcing leak): each answer position must be
computed from the problem alone, in one forward pass, and evaluation is the argmax there.

Every scored answer carries a **difficulty** (hops, jumps, chain length, carry-chain length)
and the harness reports accuracy per difficulty bucket as well as per split. A task's training
stream can be cut at a maximum difficulty: deeper answers are then measured, never trained.

No test line occurs in any training stream: one input line in `TaskSizes.test_partition` (by a
hash of its tokens) is reserved for test sets, and training never draws those (`is_test_line`).

chase (pointer chasing to a fixed point), the depth-extrapolation task
    input   L tokens, each a jump 1..m ("look that many places back") or a terminal label A..D.
    target  at every jump position i: the label of the first terminal reached by jumping back
            from i; difficulty = the number of jumps needed (no target if the chain runs off
            the start). Once a terminal is reached the answer is a fixed point: more passes of
            an iterative solver change nothing.
    train   terminal density 0.3, loss only on answers at most `chase_train_max_depth` (4) deep.
    splits  `test` (density 0.3, as trained: deeper buckets exist but were never trained),
            `sparse` (density 0.12: long chains). Buckets 1-2, 3-4, 5-6, 7-8, 9-12, 13+.
    chance  1/labels. Baselines: majority label; nearest terminal (the closest label to the
            left, no jumping); as deep as trained (follow at most 4 jumps, then guess the
            nearest terminal to the left of where it stopped).

khop (k-hop pointer following, k given in the input)
    input   a W-wide hop-count field with k `#` marks at random places (the rest `.`), then L
            pointers d in 1..m, each "jump d positions back". The marks are scattered so that
            every place of the field holds `#` and `.` in training: a k never trained is
            written with symbols seen at every place (the count, not an unseen token, is new).
    target  at every pointer position i: start at i, k times jump i <- i - d_i, answer d_i at
            the end (no target where the chain runs off the start); difficulty = k.
    splits  `test`: the training mixture k = 1..3; `hops1`..`hops3`; `hops4`, `hops6`: more
            hops than trained. Buckets: one per k.
    chance  1/m. Baselines: majority; own digit; one hop (the 1-hop value whatever k says);
            as deep as trained (the min(k, 3)-hop value: right on trained k, the 3-hop answer
            beyond).

lookup (compositional table lookup)
    input   `x f1 f2 ... fL` then pad: x a symbol of the domain, f letters naming fixed random
            permutations of the domain (drawn from the seed, learned in the weights). Targets at
            every f position: the running value f_j(...f_1(x)); the final one is scored.
            Difficulty = chain length. Trained on 1..5, tested on 1..5 and on 6 and 8.
    chance  1/|domain|; baselines: majority, "x unchanged", "last function applied to x".

addition (multi-digit, least significant digit first)
    input   `a+b=` then n+1 placeholders, a and b of n digits each written reversed.
    target  the n+1 digits of a+b, reversed; a line is right when all its digits are.
            Difficulty = the longest run of consecutive carries. Trained on n = 1..3, tested on
            1..3 and on n = 4 and 5. chance 10^-(n+1); baselines: majority per position, "no
            carry" (digit-wise (a_i+b_i) mod 10).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import config
from config import ConfigError

IGNORE = -100
PAD = "."
Cells = dict[str, float | None]  # "all" and each difficulty bucket -> accuracy (None: no answer there)
Preds = dict[str, np.ndarray]  # a trivial predictor's name -> its predictions (N, T)
# Not trivial: a solver exactly as deep as training went. Beside the trivial baselines it says
# what extrapolation must beat; it is not a shortcut, so it never decides "won on a shortcut".
REFERENCES = ("as_deep_as_trained",)


@dataclass
class Batch:
    """Aligned (N, T) arrays: inputs x; targets y (IGNORE where nothing is learned); `scored`,
    the answers a metric counts; `difficulty` of each scored answer (-1 elsewhere)."""

    x: np.ndarray
    y: np.ndarray
    scored: np.ndarray
    difficulty: np.ndarray

    def rows(self, pick: np.ndarray) -> Batch:
        return Batch(self.x[pick], self.y[pick], self.scored[pick], self.difficulty[pick])

    @staticmethod
    def concat(parts: list[Batch]) -> Batch:
        fields = ("x", "y", "scored", "difficulty")
        return Batch(*(np.concatenate([getattr(p, f) for p in parts]) for f in fields))


@dataclass
class GenExample:
    """Bring-your-own test line: the prompt ids, the target ids to generate greedily, and its
    difficulty (0 when the file gives none)."""

    prompt: list[int]
    target: list[int]
    difficulty: int = 0


def _bucket_name(lo: int, hi: int | None) -> str:
    return f"{lo}+" if hi is None else str(lo) if lo == hi else f"{lo}-{hi}"


@dataclass
class Task:
    """A task's vocabulary, splits, difficulty buckets and scoring. Subclasses generate data."""

    name: str
    vocab: str
    block_size: int
    splits: tuple[str, ...]  # test splits; `test` (when there is one) is the training mixture
    unit: str  # "position": every scored answer counts; "example": all of a line must be right
    answer_symbols: int = 0  # how many values one answer position can take (chance = 1/this)
    buckets: dict[str, tuple[int, int | None]] = field(default_factory=dict)  # name -> [lo, hi]
    trained_max: int | None = None  # deepest difficulty in the training stream (None: any)
    default_cut: int | None = None  # the training stream's difficulty cut when a spec sets none
    generative: bool = False  # bring-your-own: evaluated by greedy generation

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.vocab.index(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.vocab[i] for i in ids)

    def deepest_trained(self, cut: int | None = None) -> int | None:
        """The deepest difficulty a training stream with this cut holds (None: no bound)."""
        cut = self.default_cut if cut is None else cut
        bounds = [b for b in (self.trained_max, cut) if b is not None]
        return min(bounds) if bounds else None

    def bucket_of(self, difficulty: np.ndarray) -> np.ndarray:
        """The bucket name of each difficulty ("" where none holds it)."""
        out = np.full(difficulty.shape, "", dtype=object)
        for name, (lo, hi) in self.buckets.items():
            out[(difficulty >= lo) & ((difficulty <= hi) if hi is not None else True)] = name
        return out

    # -- data: subclasses write _train_lines / _test_lines; the partition is applied here --

    def _train_lines(self, rng: np.random.Generator, n: int) -> Batch:
        raise NotImplementedError

    def _test_lines(self, split: str, rng: np.random.Generator, n: int) -> Batch:
        raise NotImplementedError

    def train_batch(self, rng: np.random.Generator, n: int, max_difficulty: int | None = None) -> Batch:
        """n training lines (never a test-partition line), with targets deeper than the cut
        (max_difficulty, default the task's own) removed from the loss."""
        batch = _draw(lambda k: self._train_lines(rng, k), n, want_test=False)
        cut = self.default_cut if max_difficulty is None else max_difficulty
        if cut is not None:
            deep = batch.scored & (batch.difficulty > cut)
            batch.y[deep] = IGNORE
            batch.scored = batch.scored & ~deep
            batch.difficulty[deep] = -1
        return batch

    def test_batch(self, split: str, rng: np.random.Generator, n: int) -> Batch:
        """n test lines of `split`, all from the test partition."""
        if split not in self.splits:
            raise ConfigError(f"split: unknown split {split!r} (allowed: {', '.join(self.splits)})")
        return _draw(lambda k: self._test_lines(split, rng, k), n, want_test=True)

    def baseline_predictions(self, batch: Batch, train: Batch, cut: int | None = None) -> Preds:
        """Predictions (N, T) of trivial predictors that do not learn the task; `cut` is the
        training stream's difficulty cut (for "as deep as trained")."""
        raise NotImplementedError


def line_hash(x: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row of token ids (FNV-1a over the ids, then a splitmix finaliser)."""
    h = np.full(len(x), 0xCBF29CE484222325, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(x.shape[1]):
            h = (h ^ x[:, j].astype(np.uint64)) * np.uint64(0x100000001B3)
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
    return h


def is_test_line(x: np.ndarray) -> np.ndarray:
    """True for the rows reserved for test sets (one in config.TASKS.test_partition)."""
    return line_hash(x) % np.uint64(config.TASKS.test_partition) == 0


def _draw(make: Callable[[int], Batch], n: int, want_test: bool) -> Batch:
    """n rows of make() on the wanted side of the partition (rejection: draw, keep, repeat)."""
    parts, have = [], 0
    p = config.TASKS.test_partition
    while have < n:
        need = n - have
        batch = make(need * p + 8 if want_test else need + need // (p - 1) + 8)
        keep = np.flatnonzero(is_test_line(batch.x) == want_test)[:need]
        parts.append(batch.rows(keep))
        have += len(keep)
    return Batch.concat(parts) if len(parts) > 1 else parts[0]


def units(task: Task, pred: np.ndarray, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
    """(hit, difficulty) per scored unit: an answer position, or a line when unit is example."""
    if task.unit == "position":
        return (pred == batch.y)[batch.scored], batch.difficulty[batch.scored]
    has = batch.scored.any(axis=1)
    hit = ((pred == batch.y) | ~batch.scored).all(axis=1)
    return hit[has], np.where(batch.scored, batch.difficulty, -1).max(axis=1)[has]


def chance_units(task: Task, batch: Batch) -> np.ndarray:
    """The probability that uniform guessing gets each unit right."""
    if task.unit == "position":
        return np.full(int(batch.scored.sum()), 1.0 / task.answer_symbols)
    counts = batch.scored.sum(axis=1)
    return (1.0 / task.answer_symbols) ** counts[counts > 0]


def cells(task: Task, values: np.ndarray, difficulty: np.ndarray) -> Cells:
    """Mean of per-unit values over all units ("all") and per difficulty bucket (None: empty)."""
    out: Cells = {"all": float(values.mean()) if len(values) else None}
    names = task.bucket_of(difficulty)
    for b in task.buckets:
        sel = names == b
        out[b] = float(values[sel].mean()) if sel.any() else None
    return out


def counts(task: Task, difficulty: np.ndarray) -> dict[str, int]:
    names = task.bucket_of(difficulty)
    return {"all": len(difficulty), **{b: int((names == b).sum()) for b in task.buckets}}


def score(task: Task, pred: np.ndarray, batch: Batch) -> float:
    """Accuracy of predictions `pred` (N, T) under the task's unit."""
    hit, _ = units(task, pred, batch)
    return float(hit.mean()) if len(hit) else float("nan")


def baseline_cells(task: Task, batch: Batch, train: Batch, cut: int | None = None) -> dict[str, Cells]:
    """Each trivial predictor's accuracy per cell ("all" and every bucket), chance included."""
    _, diff = units(task, batch.y, batch)
    out = {"chance": cells(task, chance_units(task, batch), diff)}
    for name, pred in task.baseline_predictions(batch, train, cut).items():
        hit, d = units(task, pred, batch)
        out[name] = cells(task, hit.astype(float), d)
    return out


def _majority(train: Batch) -> int:
    return Counter(train.y[train.scored].tolist()).most_common(1)[0][0]


def _at(a: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """a[r, pos[r, j]] for every row r (pos clipped into range)."""
    return np.take_along_axis(a, np.clip(pos, 0, a.shape[1] - 1), axis=1)


# --------------------------------------------------------------------------------------------
# chase


class Chase(Task):
    def __init__(self, sizes: config.TaskSizes):
        self.length, self.m, self.n_labels = sizes.chase_length, sizes.chase_max_jump, sizes.chase_labels
        self.density = {"test": sizes.chase_train_density, "sparse": sizes.chase_sparse_density}
        edges = [(1, 2), (3, 4), (5, 6), (7, 8), (9, 12), (13, None)]
        super().__init__(
            name="chase", vocab="123456789"[: self.m] + "ABCDEFGHI"[: self.n_labels],
            block_size=self.length, splits=("test", "sparse"), unit="position",
            answer_symbols=self.n_labels, buckets={_bucket_name(lo, hi): (lo, hi) for lo, hi in edges},
            default_cut=sizes.chase_train_max_depth,
        )

    def _make(self, rng: np.random.Generator, n: int, density: float) -> Batch:
        L, m = self.length, self.m
        terminal = rng.random((n, L)) < density
        jumps = rng.integers(1, m + 1, size=(n, L))
        labels = rng.integers(0, self.n_labels, size=(n, L))
        x = np.where(terminal, m + labels, jumps - 1)  # jump j has id j-1, label l has id m+l
        y = np.full((n, L), IGNORE, dtype=np.int64)
        depth = np.full((n, L), -1, dtype=np.int64)
        cur = np.broadcast_to(np.arange(L), (n, L)).copy()
        active = ~terminal
        d = 0
        while active.any():
            d += 1
            cur = np.where(active, cur - _at(jumps, cur), cur)
            active &= cur >= 0  # ran off the start: no answer
            landed = active & _at(terminal, cur)
            y[landed] = (m + _at(labels, cur))[landed]
            depth[landed] = d
            active &= ~landed
        return Batch(x, y, y != IGNORE, depth)

    def _train_lines(self, rng: np.random.Generator, n: int) -> Batch:
        return self._make(rng, n, self.density["test"])

    def _test_lines(self, split: str, rng: np.random.Generator, n: int) -> Batch:
        return self._make(rng, n, self.density[split])

    def _nearest_terminal(self, x: np.ndarray, before: np.ndarray) -> np.ndarray:
        """The label id of the closest terminal strictly left of position `before` (-1: none)."""
        n, L = x.shape
        is_term = x >= self.m
        idx = np.where(is_term, np.arange(L)[None, :], -1)
        last = np.maximum.accumulate(idx, axis=1)  # last terminal at or before each position
        prev = np.where(before > 0, _at(last, before - 1), -1)
        return np.where(prev >= 0, _at(x, prev), -1)

    def baseline_predictions(self, batch: Batch, train: Batch, cut: int | None = None) -> Preds:
        x, L = batch.x, self.length
        pos = np.broadcast_to(np.arange(L), x.shape)
        deep = self.deepest_trained(cut) or L
        cur, done = pos.copy(), x >= self.m
        found = np.full(x.shape, -1)
        for _ in range(deep):
            step = ~done & (cur >= 0)
            cur = np.where(step, cur - (_at(x, cur) + 1), cur)
            landed = step & (cur >= 0) & (_at(x, cur) >= self.m)
            found = np.where(landed, _at(x, cur), found)
            done |= landed
        stopped = np.clip(cur, 0, L - 1) + 1  # guess from the left of where the walk stopped
        as_deep = np.where(found >= 0, found, self._nearest_terminal(x, stopped))
        return {"majority": np.full_like(x, _majority(train)),
                "nearest_terminal": self._nearest_terminal(x, pos),
                "as_deep_as_trained": as_deep}


# --------------------------------------------------------------------------------------------
# khop


class KHop(Task):
    def __init__(self, sizes: config.TaskSizes):
        self.m, self.length = sizes.khop_max_jump, sizes.khop_length
        self.train_hops = tuple(range(1, sizes.khop_train_hops + 1))
        self.ood_hops = sizes.khop_ood_hops
        hops = self.train_hops + self.ood_hops
        self.width = max(hops)  # the hop-count field
        super().__init__(
            name="khop", vocab="".join(str(d) for d in range(1, self.m + 1)) + "#" + PAD,
            block_size=self.width + self.length,
            splits=("test",) + tuple(f"hops{k}" for k in hops), unit="position", answer_symbols=self.m,
            buckets={str(k): (k, k) for k in sorted(set(hops))}, trained_max=max(self.train_hops),
        )

    def _hops(self, split: str) -> tuple[int, ...]:
        return self.train_hops if split == "test" else (int(split.removeprefix("hops")),)

    def follow(self, d: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(answer digit, alive) after k[r] hops from every position of the pointer rows d."""
        pos = np.broadcast_to(np.arange(d.shape[1]), d.shape).copy()
        alive = np.ones(d.shape, dtype=bool)
        for step in range(int(k.max())):
            moving = (step < k)[:, None]
            pos = np.where(moving, pos - _at(d, pos), pos)
            alive &= pos >= 0
        return _at(d, pos), alive

    def _make(self, rng: np.random.Generator, n: int, hops: tuple[int, ...]) -> Batch:
        k = rng.choice(np.array(hops), size=n)
        d = rng.integers(1, self.m + 1, size=(n, self.length))  # jumps 1..m
        answer, alive = self.follow(d, k)
        W = self.width
        x = np.empty((n, W + self.length), dtype=np.int64)
        places = np.argsort(rng.random((n, W)), axis=1)  # a random order of the field's places
        x[:, :W] = np.where(places < k[:, None], self.m, self.m + 1)  # k marks, scattered
        x[:, W:] = d - 1  # digit j has id j-1
        y = np.full_like(x, IGNORE)
        y[:, W:] = np.where(alive, answer - 1, IGNORE)
        diff = np.full_like(x, -1)
        diff[:, W:] = np.where(alive, k[:, None], -1)
        return Batch(x, y, y != IGNORE, diff)

    def _train_lines(self, rng: np.random.Generator, n: int) -> Batch:
        return self._make(rng, n, self.train_hops)

    def _test_lines(self, split: str, rng: np.random.Generator, n: int) -> Batch:
        return self._make(rng, n, self._hops(split))

    def baseline_predictions(self, batch: Batch, train: Batch, cut: int | None = None) -> Preds:
        W = self.width
        d = batch.x[:, W:] + 1
        k = (batch.x[:, :W] == self.m).sum(axis=1)

        def pred(hops: np.ndarray) -> np.ndarray:
            out = np.full_like(batch.x, -1)
            answer, alive = self.follow(d, hops)
            out[:, W:] = np.where(alive, answer - 1, -1)
            return out

        own = np.full_like(batch.x, -1)
        own[:, W:] = batch.x[:, W:]
        return {"majority": np.full_like(batch.x, _majority(train)), "own_digit": own,
                "one_hop": pred(np.ones_like(k)),
                "as_deep_as_trained": pred(np.minimum(k, self.deepest_trained(cut) or max(k)))}


# --------------------------------------------------------------------------------------------
# lookup


class Lookup(Task):
    def __init__(self, sizes: config.TaskSizes, seed: int):
        self.domain, self.n_funcs = sizes.lookup_domain, sizes.lookup_functions
        self.train_len, self.ood_lens = sizes.lookup_train_length, sizes.lookup_ood_lengths
        self.max_len = max((self.train_len,) + self.ood_lens)
        symbols = "0123456789"[: self.domain]
        letters = "ABCDEFGHIJKLMNOP"[: self.n_funcs]
        lengths = sorted(set(range(1, self.train_len + 1)) | set(self.ood_lens))
        super().__init__(
            name="lookup", vocab=symbols + letters + PAD, block_size=self.max_len + 1,
            splits=("test",) + tuple(f"len{k}" for k in self.ood_lens), unit="example",
            answer_symbols=self.domain, buckets={str(k): (k, k) for k in lengths}, trained_max=self.train_len,
        )
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
        diff = np.where(scored, length[:, None], -1)
        return Batch(x, y, scored, diff)

    def _train_lines(self, rng: np.random.Generator, n: int) -> Batch:
        return self._make(rng, n, tuple(range(1, self.train_len + 1)))

    def _test_lines(self, split: str, rng: np.random.Generator, n: int) -> Batch:
        return self._make(rng, n, self._lengths(split))

    def baseline_predictions(self, batch: Batch, train: Batch, cut: int | None = None) -> Preds:
        rows = np.arange(len(batch.x))
        last = batch.scored.argmax(axis=1)
        pred_same = np.full_like(batch.x, -1)
        pred_same[rows, last] = batch.x[:, 0]
        pred_last = np.full_like(batch.x, -1)
        func = np.clip(batch.x[rows, last] - self.domain, 0, None)
        pred_last[rows, last] = self.tables[func, batch.x[:, 0]]
        return {"majority": np.full_like(batch.x, _majority(train)), "x_unchanged": pred_same,
                "last_function_only": pred_last}


# --------------------------------------------------------------------------------------------
# addition


class Addition(Task):
    def __init__(self, sizes: config.TaskSizes):
        self.train_digits, self.ood_digits = sizes.addition_train_digits, sizes.addition_ood_digits
        n = max((self.train_digits,) + self.ood_digits)
        super().__init__(
            name="addition", vocab="0123456789+=_" + PAD, block_size=3 * n + 3,
            splits=("test",) + tuple(f"digits{k}" for k in self.ood_digits), unit="example",
            answer_symbols=10, buckets={str(c): (c, c) for c in range(n + 1)}, trained_max=self.train_digits,
        )

    def _digits(self, split: str) -> tuple[int, ...]:
        if split == "test":
            return tuple(range(1, self.train_digits + 1))
        return (int(split.removeprefix("digits")),)

    def _make(self, rng: np.random.Generator, n: int, digit_counts: tuple[int, ...]) -> Batch:
        T = self.block_size
        x = np.full((n, T), self.vocab.index(PAD), dtype=np.int64)
        y = np.full((n, T), IGNORE, dtype=np.int64)
        diff = np.full((n, T), -1, dtype=np.int64)
        counts = rng.choice(np.array(digit_counts), size=n)
        a = rng.integers(0, 10, size=(n, T))
        b = rng.integers(0, 10, size=(n, T))
        plus, eq, hole = self.vocab.index("+"), self.vocab.index("="), self.vocab.index("_")
        for k in np.unique(counts):
            r = counts == k
            ak, bk = a[r, :k], b[r, :k]  # least significant digit first
            carry = np.zeros(int(r.sum()), dtype=np.int64)
            run = np.zeros_like(carry)
            longest = np.zeros_like(carry)
            total = np.zeros((int(r.sum()), k + 1), dtype=np.int64)
            for i in range(k):
                s = ak[:, i] + bk[:, i] + carry
                total[:, i], carry = s % 10, s // 10
                run = np.where(carry > 0, run + 1, 0)
                longest = np.maximum(longest, run)
            total[:, k] = carry
            line = np.concatenate([ak, np.full((len(ak), 1), plus), bk, np.full((len(ak), 1), eq),
                                   np.full((len(ak), k + 1), hole)], axis=1)
            x[r, : line.shape[1]] = line
            y[r, 2 * k + 2 : 3 * k + 3] = total
            diff[r, 2 * k + 2 : 3 * k + 3] = longest[:, None]
        return Batch(x, y, y != IGNORE, diff)

    def _train_lines(self, rng: np.random.Generator, n: int) -> Batch:
        return self._make(rng, n, tuple(range(1, self.train_digits + 1)))

    def _test_lines(self, split: str, rng: np.random.Generator, n: int) -> Batch:
        return self._make(rng, n, self._digits(split))

    def baseline_predictions(self, batch: Batch, train: Batch, cut: int | None = None) -> Preds:
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
        return {"majority_per_position": major, "no_carry": no_carry}


# --------------------------------------------------------------------------------------------
# bring your own


@dataclass(frozen=True)
class Line:
    input: str
    target: str
    difficulty: int | None


_LINE_KEYS = {"input", "target", "difficulty"}


def _read_jsonl(path: Path) -> list[Line]:
    """Lines of {"input": str, "target": str, "difficulty": int (optional)}; a bad line raises
    ConfigError naming file:line."""
    lines = []
    with open(path, encoding="utf-8") as f:
        for lineno, text in enumerate(f, 1):
            if not text.strip():
                continue
            where = f"task_dir: {path}:{lineno}"
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not {"input", "target"} <= set(obj) <= _LINE_KEYS:
                raise ConfigError(f'{where}: expected an object with keys "input" and "target" '
                                  '(and optionally "difficulty")')
            if not isinstance(obj["input"], str) or not isinstance(obj["target"], str):
                raise ConfigError(f"{where}: input and target must be strings")
            if not obj["target"]:
                raise ConfigError(f"{where}: target is empty")
            diff = obj.get("difficulty")
            if diff is not None and (not isinstance(diff, int) or isinstance(diff, bool) or diff < 0):
                raise ConfigError(f"{where}: difficulty must be an integer >= 0, got {diff!r}")
            lines.append(Line(obj["input"], obj["target"], diff))
    if not lines:
        raise ConfigError(f"task_dir: {path} has no examples")
    return lines


class DirTask(Task):
    """A bring-your-own task. Training lines are drawn with replacement from train.jsonl; a line
    without a difficulty counts as difficulty 0 (one bucket when no line gives one)."""

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
        self.train_lines = _read_jsonl(train_path)
        self.test_lines = {p.stem: _read_jsonl(p) for p in test_paths}
        every = [line for lines in [self.train_lines, *self.test_lines.values()] for line in lines]
        chars = {c for line in every for c in line.input + line.target}
        longest = max(len(line.input) + len(line.target) for line in every)
        levels = sorted({line.difficulty for line in every if line.difficulty is not None})
        if levels and 0 not in levels:
            levels = [0, *levels]  # a line without a difficulty counts as 0
        super().__init__(name=f"dir:{d.name}", vocab="".join(sorted(chars)) + "\x00",
                         block_size=max(8, longest), splits=tuple(self.test_lines), unit="example",
                         buckets={str(v): (v, v) for v in levels},
                         trained_max=max((line.difficulty or 0 for line in self.train_lines), default=0),
                         generative=True)
        self.pad_id = len(self.vocab) - 1

    def overlap(self) -> dict[str, dict[str, int]]:
        """Per test split: its line count and how many of its lines occur verbatim in train."""
        seen = {(line.input, line.target) for line in self.train_lines}
        return {s: {"lines": len(lines), "in_train": sum((ln.input, ln.target) in seen for ln in lines)}
                for s, lines in self.test_lines.items()}

    def train_batch(self, rng: np.random.Generator, n: int, max_difficulty: int | None = None) -> Batch:
        cut = max_difficulty
        pool = [ln for ln in self.train_lines if cut is None or (ln.difficulty or 0) <= cut]
        if not pool:
            raise ConfigError(f"train_max_difficulty: {cut} leaves no training line in {self.name}")
        T = self.block_size
        x = np.full((n, T), self.pad_id, dtype=np.int64)
        y = np.full((n, T), IGNORE, dtype=np.int64)
        diff = np.full((n, T), -1, dtype=np.int64)
        for r, j in enumerate(rng.integers(0, len(pool), size=n)):
            line = pool[j]
            ids = self.encode(line.input + line.target)
            x[r, : len(ids) - 1] = ids[:-1]
            # predict each target character from everything before it
            span = slice(len(line.input) - 1, len(ids) - 1)
            y[r, span] = self.encode(line.target)
            diff[r, span] = line.difficulty or 0
        return Batch(x, y, y != IGNORE, diff)

    def test_examples(self, split: str) -> list[GenExample]:
        return [GenExample(self.encode(ln.input), self.encode(ln.target), ln.difficulty or 0)
                for ln in self.test_lines[split]]

    def test_batch(self, split: str, rng: np.random.Generator, n: int) -> Batch:
        raise NotImplementedError("bring-your-own tasks are evaluated by generation")

    def baseline_cells_of(self, split: str) -> dict[str, Cells]:
        """The majority target of train, scored per cell on `split`'s lines."""
        top = Counter(ln.target for ln in self.train_lines).most_common(1)[0][0]
        lines = self.test_lines[split]
        hit = np.array([ln.target == top for ln in lines], dtype=float)
        return {"majority_target": cells(self, hit, np.array([ln.difficulty or 0 for ln in lines]))}


TASK_NAMES = ("chase", "khop", "lookup", "addition")


def make_task(name: str | None, task_dir: str | None = None, seed: int = 0,
              sizes: config.TaskSizes | None = None) -> Task:
    """The task called `name` (or the directory `task_dir`); unknown names raise ConfigError."""
    sizes = sizes or config.TASKS
    if task_dir:
        return DirTask(task_dir)
    if name == "chase":
        return Chase(sizes)
    if name == "khop":
        return KHop(sizes)
    if name == "lookup":
        return Lookup(sizes, seed)
    if name == "addition":
        return Addition(sizes)
    raise ConfigError(f"task: unknown task {name!r} (allowed: {', '.join(TASK_NAMES)}, or task_dir)")
