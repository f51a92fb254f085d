"""Token datasets: text files -> uint16 shards on disk -> random (B, T) batches by memmap.

    runs/data/<name>/
        shard_00000.bin ...   little-endian uint16 token ids, documents separated by EOT
        meta.json             tokenizer, token and byte counts, sha256 of every shard and source

A dataset is written to a temporary directory and renamed into place, so a reader sees a
complete dataset or none. The last `val_fraction` of the token stream is the validation split.
Batches are drawn at random offsets by a numpy Generator the caller owns: its state is the whole
"data position", which the trainer checkpoints for exact resume.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from common import utc_now
from config import (
    DATA_SHARD_TOKENS,
    DATASET_NAME_RE,
    SAMPLE_DATASET,
    TOKENIZER_NAME,
    TOKENIZER_SHA256,
    ConfigError,
)
from models.tokenizer import EOT, SAMPLE_TEXT, file_sha256, get_tokenizer

DTYPE = np.dtype("<u2")  # r50k ids < 65,536
META = "meta.json"
_NAME = re.compile(DATASET_NAME_RE)
# Texts larger than this are encoded piecewise, cut after a newline, to bound memory.
_ENCODE_CHARS = 1 << 24


def check_name(name: str, field: str = "name") -> str:
    """A dataset name is one path component: letters, digits, `_.-`."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{field}: {name!r} is not a dataset name (letters, digits, '_', '.', '-')")
    return name


def data_root(runs_dir: str | os.PathLike[str]) -> Path:
    return Path(runs_dir) / "data"


def dataset_dir(name: str, runs_dir: str | os.PathLike[str]) -> Path:
    return data_root(runs_dir) / check_name(name)


def _encode_document(path: Path, enc: Any) -> tuple[list[np.ndarray], int]:
    """One file = one document. Returns its token arrays and its size in UTF-8 bytes."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"src: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    pieces, start = [], 0
    while start < len(text):
        end = min(len(text), start + _ENCODE_CHARS)
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        pieces.append(np.asarray(enc.encode_ordinary(text[start:end]), dtype=DTYPE))
        start = end
    return pieces, len(text.encode("utf-8"))


class _ShardWriter:
    def __init__(self, directory: Path, shard_tokens: int):
        self.directory, self.shard_tokens = directory, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.buffer: list[np.ndarray] = []
        self.buffered = 0

    def add(self, tokens: np.ndarray) -> None:
        while len(tokens):
            take = min(len(tokens), self.shard_tokens - self.buffered)
            self.buffer.append(tokens[:take])
            self.buffered += take
            tokens = tokens[take:]
            if self.buffered == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if not self.buffered:
            return
        name = f"shard_{len(self.shards):05d}.bin"
        path = self.directory / name
        with open(path, "wb") as f:
            f.write(np.concatenate(self.buffer).astype(DTYPE, copy=False).tobytes())
            f.flush()
            os.fsync(f.fileno())
        self.shards.append({"file": name, "tokens": self.buffered, "sha256": file_sha256(path)})
        self.buffer, self.buffered = [], 0


def tokenize_files(src_paths: list[str] | tuple[str, ...], name: str,
                   runs_dir: str | os.PathLike[str], shard_tokens: int = DATA_SHARD_TOKENS) -> dict[str, Any]:
    """Tokenize text files into runs_dir/data/<name>/ and return its meta. Each file is one
    document, followed by EOT. An existing dataset of that name is an error (nothing lost)."""
    check_name(name)
    sources = [Path(p) for p in src_paths]
    if not sources:
        raise ConfigError("src: give at least one text file")
    for p in sources:
        if not p.is_file():
            raise ConfigError(f"src: {p} is not a file")
    target = dataset_dir(name, runs_dir)
    if target.exists():
        raise ConfigError(f"name: dataset {name!r} already exists at {target} (choose another name)")
    enc = get_tokenizer()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    try:
        writer = _ShardWriter(tmp, shard_tokens)
        source_meta, total_bytes = [], 0
        eot = np.asarray([EOT], dtype=DTYPE)
        for p in sources:
            pieces, nbytes = _encode_document(p, enc)
            for piece in pieces:
                writer.add(piece)
            writer.add(eot)
            total_bytes += nbytes
            source_meta.append({"path": str(p), "bytes": nbytes, "sha256": file_sha256(p),
                                "tokens": int(sum(len(x) for x in pieces)) + 1})
        writer.flush()
        meta = {
            "name": name,
            "tokenizer": TOKENIZER_NAME,
            "tokenizer_sha256": TOKENIZER_SHA256,
            "dtype": "uint16",
            "eot": EOT,
            "tokens": int(sum(s["tokens"] for s in writer.shards)),
            "bytes": total_bytes,  # of the source text: bits per byte = loss * tokens / bytes / ln 2
            "documents": len(sources),
            "sources": source_meta,
            "shards": writer.shards,
            "created_at": utc_now(),
        }
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a dataset is meant to be shared
        os.replace(tmp, target)  # atomic: the dataset appears complete or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def ensure_sample_data(runs_dir: str | os.PathLike[str]) -> Path:
    """runs_dir/data/sample: the shipped text, tokenized once. Safe when called concurrently."""
    target = dataset_dir(SAMPLE_DATASET, runs_dir)
    if (target / META).exists():
        return target
    try:
        tokenize_files([str(SAMPLE_TEXT)], SAMPLE_DATASET, runs_dir)
    except (ConfigError, OSError):
        if not (target / META).exists():  # not a race lost to another process: a real error
            raise
    return target


def read_meta(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(data_dir) / META
    if not path.exists():
        raise FileNotFoundError(f"data: no dataset at {data_dir} (missing {META}; run `lab tokenize`)")
    return json.loads(path.read_text())


def verify(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Re-hash every shard against meta.json; a mismatch raises ValueError naming the shard."""
    meta = read_meta(data_dir)
    for shard in meta["shards"]:
        digest = file_sha256(Path(data_dir) / shard["file"])
        if digest != shard["sha256"]:
            raise ValueError(f"data: {shard['file']} has sha256 {digest}, meta.json says {shard['sha256']}")
    return meta


class TokenData:
    """A tokenized dataset opened for training: train/val splits over the concatenated shards."""

    def __init__(self, data_dir: str | os.PathLike[str], vocab_size: int, val_fraction: float):
        self.dir = Path(data_dir)
        self.meta = read_meta(self.dir)
        self.vocab_size = vocab_size
        self.files = [self.dir / s["file"] for s in self.meta["shards"]]
        lengths = [int(s["tokens"]) for s in self.meta["shards"]]
        self.starts = [0]
        for n in lengths:
            self.starts.append(self.starts[-1] + n)
        self.n_tokens = self.starts[-1]
        n_val = int(round(self.n_tokens * val_fraction))
        # With no held-out tail, eval reads the training stream (and says so: `eval_split`).
        self.ranges = {"train": (0, self.n_tokens - n_val),
                       "val": (self.n_tokens - n_val, self.n_tokens) if n_val else (0, self.n_tokens)}
        self.eval_split = "val" if n_val else "train"
        self.bytes_per_token = self.meta["bytes"] / max(1, self.meta["tokens"])

    def check_fits(self, block_size: int) -> None:
        for split, (lo, hi) in self.ranges.items():
            if hi - lo < block_size + 1:
                raise ConfigError(
                    f"block_size: the {split} split of dataset {self.meta['name']!r} has {hi - lo} tokens, "
                    f"fewer than block_size + 1 = {block_size + 1} (use more text or a smaller val_fraction)"
                )

    def _window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the whole stream, across shard boundaries. The
        memmap is reopened per read (as nanoGPT does) so touched pages are not held forever."""
        parts = []
        while length > 0:
            i = bisect.bisect_right(self.starts, start) - 1
            offset = start - self.starts[i]
            take = min(length, self.starts[i + 1] - start)
            shard = np.memmap(self.files[i], dtype=DTYPE, mode="r")
            parts.append(np.array(shard[offset : offset + take]))
            start, length = start + take, length - take
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def get_batch(self, split: str, batch_size: int, block_size: int,
                  generator: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """x, y int64 arrays (B, T) with y = x shifted by one; ids >= vocab_size fold into
        vocab_size - 1 (small test vocabularies keep the real tokenizer)."""
        lo, hi = self.ranges[split]
        if hi - lo < block_size + 1:
            self.check_fits(block_size)
        offsets = generator.integers(lo, hi - block_size, size=batch_size)
        windows = np.stack([self._window(int(o), block_size + 1) for o in offsets]).astype(np.int64)
        np.minimum(windows, self.vocab_size - 1, out=windows)
        return windows[:, :-1], windows[:, 1:]
