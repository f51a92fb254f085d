"""Tokenizing throughput of `lab tokenize` (models.data.tokenize_files) on a large corpus, against
tiktoken's own batch encoder on the same text.

A corpus of --mb megabytes is written to a temporary directory, streamed (the shipped sample
text repeated, as .txt or as .jsonl records of a few paragraphs each), or --src names your own
files. tokenize_files then turns it into shards as `lab tokenize` does: reading, UTF-8
decoding, cutting, encoding on a thread pool, writing and hashing shards, meta.json. The
baseline reads the same texts in chunks of the same size and times only
`encode_ordinary_batch` on them, with as many threads: ratio = ours / tiktoken's, so 1.0 means
the streaming, writing and hashing cost nothing beside the encoding. Nothing is ever held
whole, so --mb 2000 (or more) runs in the memory of a few chunks; peak RSS is printed.

    .venv/bin/python bench/tokenize_speed.py                   # 200 MB of .txt (~1 min on 2 cores)
    .venv/bin/python bench/tokenize_speed.py --mb 2000 --format jsonl
    .venv/bin/python bench/tokenize_speed.py --src data/books/a.txt data/books/b.txt

Last line: `tokenize: 1.23e6 tokens/s (tiktoken batch 1.50e6 tokens/s, ratio 0.82) on 200 MB`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.data import CHUNK_CHARS, source_format, split_text, tokenize_files  # noqa: E402
from models.tokenizer import SAMPLE_TEXT, get_tokenizer  # noqa: E402

MB = 1_000_000


def write_corpus(path: Path, n_bytes: int, fmt: str) -> None:
    """About n_bytes of the sample text, written a block at a time."""
    sample = SAMPLE_TEXT.read_text(encoding="utf-8")
    paragraphs = [p for p in sample.split("\n\n") if p.strip()]
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < n_bytes:
            if fmt == "jsonl":
                for i in range(0, len(paragraphs), 8):
                    line = json.dumps({"text": "\n\n".join(paragraphs[i:i + 8]), "id": written}) + "\n"
                    written += f.write(line)
            else:
                written += f.write(sample)


def texts(paths: list[Path], field: str) -> Iterator[tuple[str, bool]]:
    """(text, ends a document) as tokenize_files reads them, for the baseline: a text file is
    one document in chunks, a .jsonl line or a .parquet row one each."""
    for p in paths:
        fmt = source_format(p)
        if fmt == "jsonl":
            with open(p, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        yield json.loads(line)[field], True
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(p).iter_batches(columns=[field]):
                yield from ((text, True) for text in batch.column(0).to_pylist())
        else:
            with open(p, encoding="utf-8") as f:
                rest = ""
                while block := f.read(1 << 22):
                    chunks, rest = split_text(rest + block, CHUNK_CHARS, final=False)
                    yield from ((chunk, False) for chunk in chunks)
                yield rest, True


def baseline(paths: list[Path], field: str, threads: int) -> tuple[int, float]:
    """Tokens and seconds inside tiktoken's encode_ordinary_batch over batches of ~CHUNK_CHARS."""
    enc = get_tokenizer()
    tokens, seconds, batch, size = 0, 0.0, [], 0

    def run(batch: list[str]) -> None:
        nonlocal tokens, seconds
        t0 = time.perf_counter()
        out = enc.encode_ordinary_batch(batch, num_threads=threads)
        seconds += time.perf_counter() - t0
        tokens += sum(len(x) for x in out)

    for text, ends in texts(paths, field):
        tokens += ends  # the EOT after a document, which ours counts too
        batch.append(text)
        size += len(text)
        if size >= 4 * threads * CHUNK_CHARS:
            run(batch)
            batch, size = [], 0
    if batch:
        run(batch)
    return tokens, seconds


def rate(x: float) -> str:
    """1.23e6, not Python's 1.23e+06."""
    mantissa, exponent = f"{x:.2e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=200, help="corpus size to generate, in MB (10^6 bytes)")
    ap.add_argument("--format", choices=("txt", "jsonl"), default="txt", help="of the generated corpus")
    ap.add_argument("--src", nargs="+", type=Path, help="tokenize these files instead")
    ap.add_argument("--field", default="text", help="the text field of .jsonl/.parquet sources")
    ap.add_argument("--tmp", default=None, help="directory for the corpus and the shards")
    args = ap.parse_args()
    threads = max(1, min(8, os.cpu_count() or 1))  # what tokenize_files uses by default
    with tempfile.TemporaryDirectory(prefix="bench-tokenize-", dir=args.tmp) as tmp:
        if args.src:
            paths = list(args.src)
        else:
            paths = [Path(tmp) / f"corpus.{args.format}"]
            t0 = time.perf_counter()
            write_corpus(paths[0], int(args.mb * MB), args.format)
            print(f"corpus: {paths[0].stat().st_size / MB:.0f} MB of {args.format} written in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
        size_mb = sum(p.stat().st_size for p in paths) / MB
        last = [0.0]

        def progress(done: int, total: int) -> None:
            if time.monotonic() - last[0] >= 10:
                last[0] = time.monotonic()
                print(f"  {done / MB:.0f}/{total / MB:.0f} MB", flush=True)

        t0 = time.perf_counter()
        meta = tokenize_files([str(p) for p in paths], "bench", Path(tmp) / "runs", text_field=args.field,
                              progress=progress)
        ours_s = time.perf_counter() - t0
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        ours = meta["tokens"] / ours_s
        print(f"ours: {meta['tokens']:,} tokens, {meta['documents']:,} documents, "
              f"{len(meta['shards'])} shard(s) in {ours_s:.1f} s on {threads} thread(s); "
              f"peak RSS {peak_mb:.0f} MB", flush=True)
        base_tokens, base_s = baseline(paths, args.field, threads)
        if base_tokens != meta["tokens"]:
            raise SystemExit(f"token counts differ: ours {meta['tokens']}, tiktoken {base_tokens}")
        theirs = base_tokens / base_s
        print(f"tiktoken encode_ordinary_batch: {base_tokens:,} tokens in {base_s:.1f} s of encoding")
    print(f"tokenize: {rate(ours)} tokens/s (tiktoken batch {rate(theirs)} tokens/s, "
          f"ratio {ours / theirs:.2f}) on {size_mb:.0f} MB")


if __name__ == "__main__":
    main()
