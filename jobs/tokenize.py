"""tokenize: text files -> uint16 token shards under $LAB_RUNS/data/<name>/ with a meta.json
(token and byte counts, sha256 per shard), for `train` jobs to read by memmap."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import config
from config import DATASET_NAME_RE, ConfigError, Validated, show

LANES = ("cpu",)


@dataclass(frozen=True)
class Spec(Validated):
    src: tuple[str, ...]  # text files; each is one document
    name: str  # the dataset name under $LAB_RUNS/data

    def _check_relations(self) -> None:
        if not self.src:
            raise ConfigError("tokenize.src: give at least one text file")
        for path in self.src:
            try:
                is_file = bool(path) and Path(path).is_file()
            except (OSError, ValueError):  # is_file() raises on a name too long for the filesystem
                is_file = False
            if not is_file:
                raise ConfigError(f"tokenize.src: {show(path)} does not exist or is not a file")
        # fullmatch: with re.match a `$` would also accept "name\n"
        if not re.fullmatch(DATASET_NAME_RE, self.name):
            raise ConfigError(f"tokenize.name: {show(self.name)} is not a dataset name "
                              "(letters, digits, '_.-')")
        target = Path(config.paths().runs) / "data" / self.name
        if target.exists():
            raise ConfigError(f"tokenize.name: dataset {self.name!r} already exists at {target}")


def run(spec: Spec, ctx: Any) -> dict[str, Any]:
    from models.data import dataset_dir, tokenize_files

    runs = config.paths().runs
    meta = tokenize_files(list(spec.src), spec.name, runs)
    result = {"name": meta["name"], "dir": str(dataset_dir(spec.name, runs)), "tokens": meta["tokens"],
              "bytes": meta["bytes"], "documents": meta["documents"], "shards": len(meta["shards"])}
    ctx.log(f"tokenized {meta['documents']} file(s): {meta['tokens']:,} tokens in {result['shards']} "
            f"shard(s) at {result['dir']}")
    return result
