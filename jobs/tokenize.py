"""tokenize: text files (.txt, .md), JSON lines (.jsonl) and parquet (.parquet) -> uint16 token
shards under $LAB_RUNS/data/<name>/ with a meta.json (token and byte counts, sha256 per shard),
for `train` jobs to read by memmap. Files are streamed, so a corpus may be far larger than memory."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import config
from config import DATASET_NAME_RE, ConfigError, Validated, show

LANES = ("cpu",)
SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")
MAX_FIELD_CHARS = 256


@dataclass(frozen=True)
class Spec(Validated):
    src: tuple[str, ...]  # .txt/.md: each file one document; .jsonl line / .parquet row: one each
    name: str  # the dataset name under $LAB_RUNS/data
    text_field: str = "text"  # the JSON key (.jsonl) or column (.parquet) that holds the text
    force: bool = False  # replace an existing dataset of that name (once the new one is complete)

    def _check_relations(self) -> None:
        if not self.src:
            raise ConfigError("tokenize.src: give at least one text file")
        for path in self.src:
            # The suffix first: it needs no filesystem, and says what a file must be. A file with
            # none is read as text (models.data.source_format), as before formats existed.
            suffix = Path(path).suffix.lower() if path else ""
            if suffix and suffix not in SUFFIXES:
                raise ConfigError(f"tokenize.src: {show(path)} has suffix {suffix!r}; allowed: "
                                  f"{', '.join(SUFFIXES)} (a file with no suffix is read as text)")
            try:
                is_file = Path(path).is_file()
            except (OSError, ValueError):  # is_file() raises on a name too long for the filesystem
                is_file = False
            if not is_file:
                raise ConfigError(f"tokenize.src: {show(path)} does not exist or is not a file")
        # A field name goes into one-line error messages and meta.json: printable, bounded.
        if not self.text_field or len(self.text_field) > MAX_FIELD_CHARS or not self.text_field.isprintable():
            raise ConfigError(f"tokenize.text_field: {show(self.text_field)} is not a field name "
                              f"(1 to {MAX_FIELD_CHARS} printable characters)")
        # fullmatch: with re.match a `$` would also accept "name\n"
        if not re.fullmatch(DATASET_NAME_RE, self.name):
            raise ConfigError(f"tokenize.name: {show(self.name)} is not a dataset name "
                              "(letters, digits, '_.-')")
        target = Path(config.paths().runs) / "data" / self.name
        if target.exists() and not self.force:
            raise ConfigError(f"tokenize.name: dataset {self.name!r} already exists at {target} "
                              "(`lab tokenize --force` or force = true replaces it)")


def run(spec: Spec, ctx: Any) -> dict[str, Any]:
    from models.data import dataset_dir, tokenize_files

    runs = config.paths().runs
    started = time.monotonic()

    def progress(done: int, total: int) -> None:
        ctx.progress(done, total, mb_per_s=done / 1e6 / max(1e-9, time.monotonic() - started))

    meta = tokenize_files(list(spec.src), spec.name, runs, text_field=spec.text_field,
                          force=spec.force, progress=progress)
    result = {"name": meta["name"], "dir": str(dataset_dir(spec.name, runs)), "tokens": meta["tokens"],
              "bytes": meta["bytes"], "documents": meta["documents"], "shards": len(meta["shards"])}
    ctx.log(f"tokenized {len(meta['sources'])} file(s), {meta['documents']:,} document(s): "
            f"{meta['tokens']:,} tokens in {result['shards']} shard(s) at {result['dir']}")
    return result
