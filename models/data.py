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
import codecs
import errno
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
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
    show,
)
from models.tokenizer import EOT, SAMPLE_TEXT, file_sha256, get_tokenizer

DTYPE = np.dtype("<u2")  # r50k ids < 65,536
META = "meta.json"
_NAME = re.compile(DATASET_NAME_RE)
# Formats by suffix; anything else is read as text (the tokenize job allows only these four).
FORMATS = {".txt": "text", ".md": "text", ".jsonl": "jsonl", ".parquet": "parquet"}
DEFAULT_TEXT_FIELD = "text"
# A unit of encoding work in characters: big enough that tiktoken's per-call cost vanishes,
# small enough that a few in flight per thread keep memory to tens of MB.
CHUNK_CHARS = 1 << 20
_READ_BYTES = 1 << 22
# A text with no whitespace for this long has no cut that keeps BPE unchanged; cutting it
# anyway bounds memory at the cost of possibly different tokens at that one seam.
_MAX_UNSPLIT_CHARS = 1 << 26
_PROGRESS_SECONDS = 1.0
# r50k's pre-tokenizer (models/tokenizer._PAT) starts a new piece at a whitespace character
# followed by a non-whitespace one, and the piece before it ends the same whether or not the
# text ends there: its only lookahead, `\s+(?!\S)`, backs off by exactly that one character
# in the whole text and stops at the end of a chunk. Python's \s (str.isspace) holds every
# Unicode White_Space character (and \x1c-\x1f besides), so a Python \S is a \S for tiktoken.
_CUT_NEWLINE = re.compile(r"\n(?=\S)")
_CUT_SPACE = re.compile(r"[ \n](?=\S)")


def check_name(name: str, field: str = "name") -> str:
    """A dataset name is one path component: letters, digits, `_.-`."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{field}: {name!r} is not a dataset name (letters, digits, '_', '.', '-')")
    return name


def data_root(runs_dir: str | os.PathLike[str]) -> Path:
    return Path(runs_dir) / "data"


def dataset_dir(name: str, runs_dir: str | os.PathLike[str]) -> Path:
    return data_root(runs_dir) / check_name(name)


def source_format(path: str | os.PathLike[str]) -> str:
    """'text', 'jsonl' or 'parquet', by suffix; an unknown suffix is read as text."""
    return FORMATS.get(Path(path).suffix.lower(), "text")


def _last_cut(pattern: re.Pattern[str], text: str, lo: int, hi: int) -> int | None:
    """The largest i in (lo, hi] where `pattern` matches (a safe cut: text[:i] | text[i:]).
    Searched backwards in doubling windows: a cut is almost always near hi."""
    width = 4096
    while True:
        a = max(lo + 1, hi - width)
        found = None
        for m in pattern.finditer(text, a, hi + 2):  # hi + 2: the lookahead sees text[hi + 1]
            found = m.start()
        if found is not None or a == lo + 1:
            return found
        width *= 2


def _find_cut(text: str, lo: int, target: int) -> int | None:
    """A cut near lo + target that leaves r50k's tokens unchanged: the last newline before it
    that is followed by a non-space, else the last such space, else the first one after it."""
    hi = min(target, len(text) - 2)
    if hi > lo:
        for pattern in (_CUT_NEWLINE, _CUT_SPACE):
            cut = _last_cut(pattern, text, lo, hi)
            if cut is not None:
                return cut
    m = _CUT_SPACE.search(text, max(lo + 1, target))
    return m.start() if m else None


def split_text(text: str, chunk_chars: int = CHUNK_CHARS, final: bool = True) -> tuple[list[str], str]:
    """Cut `text` into pieces of about chunk_chars whose encodings, concatenated, equal the
    encoding of the whole. Returns (pieces, rest): with final, rest is "" and the last piece
    runs to the end; without, rest is the tail that may still join text yet to come."""
    pieces, pos = [], 0
    while len(text) - pos > chunk_chars:
        cut = _find_cut(text, pos, pos + chunk_chars)
        if cut is None:
            if len(text) - pos <= _MAX_UNSPLIT_CHARS:
                break
            cut = pos + chunk_chars
        pieces.append(text[pos:cut])
        pos = cut
    rest = text[pos:] if pos else text
    if final:
        pieces.append(rest)
        rest = ""
    return pieces, rest


# A source yields (text, ends_document) pieces; a document is its pieces' tokens then EOT.
Pieces = Iterator[tuple[str, bool]]


def _text_pieces(path: Path, info: dict[str, Any], chunk_chars: int,
                 on_bytes: Callable[[int], None]) -> Pieces:
    """One file = one document, read in blocks. Newlines are translated as read_text() does
    ("\r\n" and "\r" become "\n"), so a file's tokens are those of its whole text."""
    decoder = io.IncrementalNewlineDecoder(codecs.getincrementaldecoder("utf-8")(), translate=True)
    digest, offset, rest = hashlib.sha256(), 0, ""
    with open(path, "rb") as f:
        while True:
            raw = f.read(_READ_BYTES)
            digest.update(raw)
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                at = offset - pending + e.start
                raise ConfigError(f"src: {path} is not UTF-8 text ({e.reason} at byte {at})") from None
            offset += len(raw)
            on_bytes(len(raw))
            pieces, rest = split_text(rest + text, chunk_chars, final=not raw)
            for i, piece in enumerate(pieces):
                yield piece, not raw and i == len(pieces) - 1
            if not raw:
                break
    info["sha256"] = digest.hexdigest()


def _document_pieces(text: str, chunk_chars: int) -> Pieces:
    pieces, _ = split_text(text, chunk_chars)
    for i, piece in enumerate(pieces):
        yield piece, i == len(pieces) - 1


def _clean(text: str) -> str:
    """JSON may hold lone surrogates ("\ud800"), which UTF-8 cannot; replace them as
    tiktoken's encode_ordinary does, so the byte count and the tokens agree."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _jsonl_pieces(path: Path, field: str, info: dict[str, Any], chunk_chars: int,
                  on_bytes: Callable[[int], None]) -> Pieces:
    """One line = one JSON object = one document, its text in `field`. Blank lines are skipped."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            digest.update(raw)
            on_bytes(len(raw))
            where = f"src: {path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(f"{where}: not UTF-8 ({e.reason} at byte {e.start} of the line)") from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a BOM, as some editors write
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as e:
                reason = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
                raise ConfigError(f"{where}: not valid JSON ({reason})") from None
            if not isinstance(record, dict):
                raise ConfigError(f"{where}: expected a JSON object, got {type(record).__name__}")
            if field not in record:
                keys = ", ".join(show(k) for k in list(record)[:8]) or "none"
                raise ConfigError(f"{where}: no field {field!r} (fields: {keys}; choose one with "
                                  "--field / text_field)")
            text = record[field]
            if not isinstance(text, str):
                raise ConfigError(f"{where}: field {field!r} is {type(text).__name__}, not a string")
            yield from _document_pieces(_clean(text), chunk_chars)
    info["sha256"] = digest.hexdigest()


def _parquet_pieces(path: Path, field: str, info: dict[str, Any], chunk_chars: int,
                    on_bytes: Callable[[int], None]) -> Pieces:
    """One row = one document, its text in column `field`, read a record batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"src: {path} is not a readable parquet file ({e})") from None
    schema = pf.schema_arrow
    if field not in schema.names:
        names = ", ".join(show(n) for n in schema.names[:8]) or "none"
        raise ConfigError(f"src: {path}: no column {field!r} (columns: {names}; choose one with "
                          "--field / text_field)")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or getattr(pa.types, "is_string_view", lambda t: False)(kind)):
        raise ConfigError(f"src: {path}: column {field!r} is {kind}, not a string column")
    size, rows = path.stat().st_size, max(1, pf.metadata.num_rows)
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=4096, columns=[field]):
            for text in batch.column(0).to_pylist():
                row += 1
                if text is None:
                    raise ConfigError(f"src: {path}: row {row} has no text (null in column {field!r})")
                yield from _document_pieces(text, chunk_chars)
            on_bytes(size * batch.num_rows // rows)
    except pa.ArrowException as e:
        raise ConfigError(f"src: {path}: cannot read row {row + 1} ({e})") from None
    info["sha256"] = file_sha256(path)


def _encode_unit(enc: Any, pieces: list[tuple[str, bool]]) -> tuple[np.ndarray, int, int]:
    """Tokens of some pieces (EOT after each document's last), their UTF-8 bytes, documents."""
    arrays, nbytes, docs = [], 0, 0
    eot = np.asarray([EOT], dtype=DTYPE)
    for text, ends in pieces:
        if text:
            arrays.append(_encode(enc, text))
            nbytes += len(text) if text.isascii() else len(text.encode("utf-8"))
        if ends:
            arrays.append(eot)
            docs += 1
    tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype=DTYPE)
    return tokens, nbytes, docs


def _encode(enc: Any, text: str) -> np.ndarray:
    # encode_to_numpy (tiktoken >= 0.8) skips building a Python int per token; with no special
    # token allowed it is encode_ordinary (tests/test_tokenize_formats.py checks that).
    if hasattr(enc, "encode_to_numpy"):
        return enc.encode_to_numpy(text, disallowed_special=()).astype(DTYPE)
    return np.asarray(enc.encode_ordinary(text), dtype=DTYPE)


class _ShardWriter:
    """Tokens appended to shard files as they come, each hashed while written: memory stays
    one write's worth however large a shard is."""

    def __init__(self, directory: Path, shard_tokens: int):
        self.directory, self.shard_tokens = directory, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.file: Any = None
        self.digest = hashlib.sha256()
        self.written = 0

    def add(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self.file is None:
                self.file = open(self.directory / f"shard_{len(self.shards):05d}.bin", "wb")
                self.digest, self.written = hashlib.sha256(), 0
            take = min(len(tokens), self.shard_tokens - self.written)
            data = tokens[:take].astype(DTYPE, copy=False).tobytes()
            self.file.write(data)
            self.digest.update(data)
            self.written += take
            tokens = tokens[take:]
            if self.written == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if self.file is None:
            return
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.shards.append({"file": Path(self.file.name).name, "tokens": self.written,
                            "sha256": self.digest.hexdigest()})
        self.file = None

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE): a reader sees the old
    dataset or the new one, never none. False where the system cannot."""
    if sys.platform != "linux":
        return False
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace_dataset(tmp: Path, target: Path) -> None:
    """Put the complete dataset at tmp in place of the one at target, then delete the old."""
    if _exchange(tmp, target):
        old = tmp
    else:  # two renames: for a moment there is no dataset of that name, never a torn one
        old = tmp.with_name(tmp.name.replace(".tmp-", ".old-"))
        os.replace(target, old)
        os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def tokenize_files(src_paths: list[str] | tuple[str, ...], name: str,
                   runs_dir: str | os.PathLike[str], shard_tokens: int = DATA_SHARD_TOKENS, *,
                   text_field: str = DEFAULT_TEXT_FIELD, force: bool = False,
                   progress: Callable[[int, int], None] | None = None,
                   chunk_chars: int = CHUNK_CHARS, threads: int | None = None) -> dict[str, Any]:
    """Tokenize files into runs_dir/data/<name>/ and return its meta. A text file (.txt, .md,
    any other suffix) is one document; a .jsonl line or a .parquet row is one, its text in
    `text_field`; EOT follows every document. Files are streamed: memory stays bounded by
    chunk_chars and threads however large they are. progress(done_bytes, total_bytes) is
    called about once a second. An existing dataset of that name is an error (nothing lost)
    unless force: then it is replaced once the new one is complete, and kept on any failure."""
    check_name(name)
    sources = [Path(p) for p in src_paths]
    if not sources:
        raise ConfigError("src: give at least one text file")
    for p in sources:
        if not p.is_file():
            raise ConfigError(f"src: {p} is not a file")
    if not isinstance(text_field, str) or not text_field:
        raise ConfigError(f"text_field: {show(text_field)} is not a field name")
    target = dataset_dir(name, runs_dir)
    if target.exists() and not force:
        raise ConfigError(f"name: dataset {name!r} already exists at {target} (choose another name, "
                          "or force it to replace it)")
    enc = get_tokenizer()
    threads = threads or max(1, min(8, os.cpu_count() or 1))
    total = sum(p.stat().st_size for p in sources)
    done, shown = 0, time.monotonic()

    def on_bytes(n: int) -> None:
        nonlocal done, shown
        done = min(total, done + n)
        if progress is not None and time.monotonic() - shown >= _PROGRESS_SECONDS:
            shown = time.monotonic()
            progress(done, total)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    writer = _ShardWriter(tmp, shard_tokens)
    pool = ThreadPoolExecutor(threads, thread_name_prefix="tokenize")
    try:
        source_meta = []
        for p in sources:
            fmt = source_format(p)
            info: dict[str, Any] = {"path": str(p), "format": fmt}
            if fmt == "jsonl":
                pieces = _jsonl_pieces(p, text_field, info, chunk_chars, on_bytes)
            elif fmt == "parquet":
                pieces = _parquet_pieces(p, text_field, info, chunk_chars, on_bytes)
            else:
                pieces = _text_pieces(p, info, chunk_chars, on_bytes)
            counts = _encode_source(pieces, enc, pool, threads, chunk_chars, writer)
            source_meta.append({"path": info["path"], "bytes": counts[1], "sha256": info["sha256"],
                                "tokens": counts[0], "format": fmt, "documents": counts[2],
                                **({"text_field": text_field} if fmt != "text" else {})})
        writer.flush()
        if progress is not None:
            progress(total, total)
        meta = {
            "name": name,
            "tokenizer": TOKENIZER_NAME,
            "tokenizer_sha256": TOKENIZER_SHA256,
            "dtype": "uint16",
            "eot": EOT,
            "tokens": int(sum(s["tokens"] for s in writer.shards)),
            # of the source text: bits per byte = loss * tokens / bytes / ln 2
            "bytes": int(sum(s["bytes"] for s in source_meta)),
            "documents": int(sum(s["documents"] for s in source_meta)),
            "sources": source_meta,
            "shards": writer.shards,
            "created_at": utc_now(),
        }
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a dataset is meant to be shared
        if force and target.exists():
            _replace_dataset(tmp, target)
        else:
            os.replace(tmp, target)  # atomic: the dataset appears complete or not at all
    except BaseException:
        writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return meta


def _encode_source(pieces: Pieces, enc: Any, pool: ThreadPoolExecutor, threads: int,
                   chunk_chars: int, writer: _ShardWriter) -> tuple[int, int, int]:
    """Encode one source's pieces on the pool, in order, a few units in flight per thread (the
    bound on memory), writing tokens as they come back. Returns (tokens, bytes, documents)."""
    in_flight: deque[Future[tuple[np.ndarray, int, int]]] = deque()
    tokens = nbytes = docs = 0

    def collect(limit: int) -> None:
        nonlocal tokens, nbytes, docs
        while len(in_flight) > limit:
            arr, b, d = in_flight.popleft().result()
            writer.add(arr)
            tokens, nbytes, docs = tokens + len(arr), nbytes + b, docs + d

    unit: list[tuple[str, bool]] = []
    size = 0
    for piece in pieces:
        unit.append(piece)
        size += len(piece[0]) + 64  # + 64: a unit of many empty documents still ends
        if size >= chunk_chars:
            in_flight.append(pool.submit(_encode_unit, enc, unit))
            unit, size = [], 0
            collect(2 * threads)
    if unit:
        in_flight.append(pool.submit(_encode_unit, enc, unit))
    collect(0)
    return tokens, nbytes, docs


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
