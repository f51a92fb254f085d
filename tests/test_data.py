"""models/data.py and the tokenize job: shards round trip, meta hashes, batches, sample data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import jobs
from cli import main
from config import ConfigError
from jobs.context import LocalContext
from models.data import TokenData, dataset_dir, ensure_sample_data, tokenize_files, verify
from models.tokenizer import EOT, file_sha256, get_tokenizer

DOC_A = "First document. Ünïcödé bytes count as UTF-8.\nSecond line of it.\n"
DOC_B = "Another, shorter text: 12345 + 678 = 13023."


@pytest.fixture
def two_docs(tmp_path: Path) -> list[str]:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(DOC_A, encoding="utf-8")
    b.write_text(DOC_B, encoding="utf-8")
    return [str(a), str(b)]


def expected_stream() -> np.ndarray:
    enc = get_tokenizer()
    return np.array(enc.encode_ordinary(DOC_A) + [EOT] + enc.encode_ordinary(DOC_B) + [EOT])


def read_stream(directory: Path, meta: dict) -> np.ndarray:
    return np.concatenate([np.fromfile(directory / s["file"], dtype="<u2") for s in meta["shards"]])


def test_shards_round_trip_with_meta_hashes(tmp_path: Path, two_docs: list[str]) -> None:
    meta = tokenize_files(two_docs, "docs", tmp_path / "runs", shard_tokens=7)
    directory = dataset_dir("docs", tmp_path / "runs")
    stream = expected_stream()
    assert meta["tokens"] == len(stream) and len(meta["shards"]) == -(-len(stream) // 7)
    assert meta["bytes"] == len(DOC_A.encode("utf-8")) + len(DOC_B.encode("utf-8"))
    assert meta["bytes"] > len(DOC_A) + len(DOC_B)  # the non-ASCII letters are 2 bytes each
    np.testing.assert_array_equal(read_stream(directory, meta), stream)
    on_disk = json.loads((directory / "meta.json").read_text())
    assert on_disk == meta
    for shard in meta["shards"]:
        assert file_sha256(directory / shard["file"]) == shard["sha256"]
    assert verify(directory) == meta
    assert not [p for p in directory.parent.iterdir() if ".tmp-" in p.name]  # nothing half-written

    victim = directory / meta["shards"][1]["file"]
    raw = bytearray(victim.read_bytes())
    raw[0] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=meta["shards"][1]["file"]):
        verify(directory)


def test_tokenize_refuses_bad_input_and_keeps_existing(tmp_path: Path, two_docs: list[str]) -> None:
    runs = tmp_path / "runs"
    tokenize_files(two_docs[:1], "docs", runs)
    before = (dataset_dir("docs", runs) / "meta.json").read_text()
    with pytest.raises(ConfigError, match="^name: dataset 'docs' already exists"):
        tokenize_files(two_docs, "docs", runs)
    assert (dataset_dir("docs", runs) / "meta.json").read_text() == before
    with pytest.raises(ConfigError, match="^src: "):
        tokenize_files([str(tmp_path / "missing.txt")], "other", runs)
    with pytest.raises(ConfigError, match="^name: "):
        tokenize_files(two_docs, "../escape", runs)
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\xff\xfe\x00broken")
    with pytest.raises(ConfigError, match="not UTF-8"):
        tokenize_files([str(binary)], "blob", runs)
    assert sorted(p.name for p in (runs / "data").iterdir()) == ["docs"]


def test_batches_fold_ids_cross_shards_and_split(tmp_path: Path, two_docs: list[str]) -> None:
    tokenize_files(two_docs, "docs", tmp_path / "runs", shard_tokens=5)
    vocab = 300
    data = TokenData(dataset_dir("docs", tmp_path / "runs"), vocab_size=vocab, val_fraction=0.25)
    stream = expected_stream()
    assert (stream >= vocab).any() and (stream < vocab).any()
    n_val = round(len(stream) * 0.25)
    block, batch = 6, 16
    for split, (lo, hi) in (("train", (0, len(stream) - n_val)), ("val", (len(stream) - n_val, len(stream)))):
        x, y = data.get_batch(split, batch, block, np.random.default_rng(7))
        offsets = np.random.default_rng(7).integers(lo, hi - block, size=batch)
        windows = np.stack([np.minimum(stream[o : o + block + 1], vocab - 1) for o in offsets])
        assert x.dtype == np.int64 and x.shape == (batch, block)
        np.testing.assert_array_equal(x, windows[:, :-1])
        np.testing.assert_array_equal(y, windows[:, 1:])
        assert x.max() <= vocab - 1


def test_generator_state_is_the_data_position(tmp_path: Path, two_docs: list[str]) -> None:
    tokenize_files(two_docs, "docs", tmp_path / "runs")
    data = TokenData(dataset_dir("docs", tmp_path / "runs"), vocab_size=50257, val_fraction=0.1)
    gen = np.random.default_rng(3)
    data.get_batch("train", 4, 8, gen)
    saved = gen.bit_generator.state
    after = [data.get_batch("train", 4, 8, gen)[0] for _ in range(3)]
    restored = np.random.default_rng(0)
    restored.bit_generator.state = saved
    again = [data.get_batch("train", 4, 8, restored)[0] for _ in range(3)]
    for a, b in zip(after, again, strict=True):
        np.testing.assert_array_equal(a, b)


def test_too_little_data_names_block_size(tmp_path: Path, two_docs: list[str]) -> None:
    tokenize_files(two_docs[1:], "short", tmp_path / "runs")
    data = TokenData(dataset_dir("short", tmp_path / "runs"), vocab_size=50257, val_fraction=0.0)
    assert data.eval_split == "train"
    with pytest.raises(ConfigError, match="^block_size: "):
        data.check_fits(256)


def test_sample_data_is_tokenized_once(tmp_path: Path) -> None:
    first = ensure_sample_data(tmp_path)
    meta = json.loads((first / "meta.json").read_text())
    assert meta["tokens"] > 50_000 and meta["name"] == "sample"
    assert ensure_sample_data(tmp_path) == first
    assert json.loads((first / "meta.json").read_text()) == meta  # not rewritten


def test_tokenize_job_validates_at_submit(tmp_runs: Path, two_docs: list[str]) -> None:
    with pytest.raises(ConfigError, match=r"^tokenize\.src: .*missing\.txt"):
        jobs.parse_spec("tokenize", {"src": ["missing.txt"], "name": "x"})
    with pytest.raises(ConfigError, match=r"^lane: "):
        jobs.check_lane("tokenize", "gpu")
    spec = jobs.parse_spec("tokenize", {"src": two_docs, "name": "docs"})
    result = jobs.get_kind("tokenize").run(spec, LocalContext(tmp_runs / "job1", echo=lambda s: None))
    assert result["tokens"] == len(expected_stream())
    assert Path(result["dir"]) == tmp_runs / "data" / "docs"
    with pytest.raises(ConfigError, match=r"^tokenize\.name: dataset 'docs' already exists"):
        jobs.parse_spec("tokenize", {"src": two_docs, "name": "docs"})


def test_lab_tokenize_cli(tmp_runs: Path, two_docs: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    outside = runner.invoke(main, ["tokenize", *two_docs, "--name", "docs", "--json"])
    assert outside.exit_code == 2 and "tokenize.src" in outside.output  # not in the data root
    monkeypatch.setenv("LAB_DATA", str(Path(two_docs[0]).parent))
    ok = runner.invoke(main, ["tokenize", *two_docs, "--name", "docs", "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["tokens"] == len(expected_stream())
    bad = runner.invoke(main, ["tokenize", "nope.txt", "--name", "other"])
    assert bad.exit_code == 2 and "src" in bad.output
    assert not (tmp_runs / "data" / "other").exists()
