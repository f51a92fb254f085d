"""`lab tokenize` on corpora a person would bring: .jsonl and .parquet, text files streamed in
chunks whose tokens equal the whole file's, --field and --force, and the bench's last line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import jobs
from cli import main
from config import ConfigError
from jobs.context import LocalContext
from models.data import dataset_dir, read_meta, split_text, tokenize_files, verify
from models.tokenizer import EOT, get_tokenizer

ROOT = Path(__file__).resolve().parents[1]
# Whitespace runs of every kind at every position, letters of 2, 3 and 4 UTF-8 bytes, contractions,
# a special token's text (ordinary text here), CRLF and lone CR (read_text makes them "\n").
TRICKY = ("Line one.\nLine two\n\n\nAfter blanks  \n  indented\t\ttabs \n\u00a0nbsp\u2003em\u3000ideo\n"
          "It's we'll they've I'd\n\n  \n\t\nmixed\n \nunicode: Ünïcödé 中文字符 😀🎉 👩‍👩‍👧\n"
          "<|endoftext|> not special\r\nwindows\r\nold mac\rend   \n\n" * 3 + "no newline at end  ")


def stream(directory: Path) -> np.ndarray:
    meta = read_meta(directory)
    return np.concatenate([np.fromfile(directory / s["file"], dtype="<u2") for s in meta["shards"]])


def whole(*docs: str) -> np.ndarray:
    enc = get_tokenizer()
    return np.array([t for d in docs for t in [*enc.encode_ordinary(d), EOT]])


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64])
def test_split_text_pieces_encode_like_the_whole(chunk: int) -> None:
    enc = get_tokenizer()
    text = TRICKY.replace("\r\n", "\n").replace("\r", "\n")
    pieces, rest = split_text(text, chunk)
    assert rest == "" and "".join(pieces) == text and len(pieces) > 10
    assert [t for p in pieces for t in enc.encode_ordinary(p)] == enc.encode_ordinary(text)
    head, tail = split_text(text, chunk, final=False)
    assert "".join(head) + tail == text


def test_a_text_file_read_in_tiny_chunks_is_the_whole_file(tmp_path: Path) -> None:
    src = tmp_path / "tricky.txt"
    src.write_bytes(TRICKY.encode("utf-8"))
    expected = whole(src.read_text(encoding="utf-8"))  # read_text translates newlines
    for chunk in (1, 5, 1 << 20):
        meta = tokenize_files([str(src)], f"t{chunk}", tmp_path / "runs", shard_tokens=50,
                              chunk_chars=chunk, threads=2)
        np.testing.assert_array_equal(stream(dataset_dir(f"t{chunk}", tmp_path / "runs")), expected)
        assert meta["bytes"] == len(src.read_text(encoding="utf-8").encode("utf-8"))
        assert meta["sources"][0]["format"] == "text" and "text_field" not in meta["sources"][0]


def test_multibyte_characters_across_read_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 7 bytes cut every 3- and 4-byte character somewhere; the decoder must carry it."""
    import models.data

    monkeypatch.setattr(models.data, "_READ_BYTES", 7)
    text = "中文 😀 x\r\n" * 40
    src = tmp_path / "u.txt"
    src.write_bytes(text.encode("utf-8"))
    tokenize_files([str(src)], "u", tmp_path / "runs", chunk_chars=3)
    np.testing.assert_array_equal(stream(dataset_dir("u", tmp_path / "runs")),
                                  whole(text.replace("\r\n", "\n")))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text " * 3 + b"\xff rest")
    with pytest.raises(ConfigError, match=r"^src: .*bad\.txt is not UTF-8 text .* at byte 30\)"):
        tokenize_files([str(bad)], "bad", tmp_path / "runs")


def test_jsonl_records_are_documents(tmp_path: Path) -> None:
    docs = ["first record\n\nwith paragraphs", "", "second: Ünïcödé 😀", "lone \ud800 surrogate"]
    src = tmp_path / "c.jsonl"
    src.write_text("\n".join(json.dumps({"body": d, "n": i}) for i, d in enumerate(docs)) + "\n\n")
    meta = tokenize_files([str(src)], "j", tmp_path / "runs", text_field="body", chunk_chars=4)
    cleaned = [d.encode("utf-16", "surrogatepass").decode("utf-16", "replace") for d in docs]
    np.testing.assert_array_equal(stream(dataset_dir("j", tmp_path / "runs")), whole(*cleaned))
    assert meta["documents"] == 4 and meta["bytes"] == sum(len(d.encode("utf-8")) for d in cleaned)
    source = meta["sources"][0]
    assert source["format"] == "jsonl" and source["text_field"] == "body" and source["documents"] == 4
    assert verify(dataset_dir("j", tmp_path / "runs")) == meta


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"', r"not valid JSON \("),
    ('["a list"]', "expected a JSON object, got list"),
    ('{"other": "x"}', r"no field 'text' \(fields: 'other'"),
    ('{"text": 5}', "field 'text' is int, not a string"),
])
def test_a_bad_jsonl_line_names_file_and_line_and_leaves_nothing(tmp_path: Path, line: str,
                                                                 message: str) -> None:
    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "fine"}\n\n' + line + "\n")
    runs = tmp_path / "runs"
    with pytest.raises(ConfigError) as e:
        tokenize_files([str(src)], "j", runs)
    text = str(e.value)
    assert "\n" not in text and re.match(rf"^src: {re.escape(str(src))}:3: {message}", text), text
    assert list((runs / "data").iterdir()) == []  # no dataset, no temporary directory


def write_parquet(path: Path, texts: list[str | None], column: str = "content") -> None:
    table = pa.table({column: pa.array(texts, type=pa.string()), "id": list(range(len(texts)))})
    pq.write_table(table, path, row_group_size=2)


def test_parquet_rows_are_documents(tmp_path: Path) -> None:
    texts = ["row one", "row two\n\n  spaced", "", "Ünïcödé 😀 " * 50, "last"]
    src = tmp_path / "p.parquet"
    write_parquet(src, texts)
    seen: list[tuple[int, int]] = []
    meta = tokenize_files([str(src)], "p", tmp_path / "runs", text_field="content", chunk_chars=16,
                          progress=lambda done, total: seen.append((done, total)))
    np.testing.assert_array_equal(stream(dataset_dir("p", tmp_path / "runs")), whole(*texts))
    assert meta["documents"] == 5 and meta["sources"][0]["format"] == "parquet"
    assert meta["sources"][0]["text_field"] == "content"
    assert seen[-1] == (src.stat().st_size, src.stat().st_size)  # the bar ends full
    with pytest.raises(ConfigError, match=r"no column 'text' \(columns: 'content', 'id'"):
        tokenize_files([str(src)], "p2", tmp_path / "runs")
    with pytest.raises(ConfigError, match=r"column 'id' is int64, not a string column"):
        tokenize_files([str(src)], "p2", tmp_path / "runs", text_field="id")
    nulls = tmp_path / "n.parquet"
    write_parquet(nulls, ["a", "b", None])
    with pytest.raises(ConfigError, match=r"row 3 has no text"):
        tokenize_files([str(nulls)], "p2", tmp_path / "runs", text_field="content")
    assert sorted(p.name for p in (tmp_path / "runs" / "data").iterdir()) == ["p"]


def test_mixed_sources_in_one_dataset(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# Title\n\nbody\n")
    (tmp_path / "b.jsonl").write_text('{"text": "j1"}\n{"text": "j2"}\n')
    write_parquet(tmp_path / "c.parquet", ["p1"], column="text")
    meta = tokenize_files([str(tmp_path / n) for n in ("a.md", "b.jsonl", "c.parquet")], "mix",
                          tmp_path / "runs")
    np.testing.assert_array_equal(stream(dataset_dir("mix", tmp_path / "runs")),
                                  whole("# Title\n\nbody\n", "j1", "j2", "p1"))
    assert [s["format"] for s in meta["sources"]] == ["text", "jsonl", "parquet"]
    assert meta["documents"] == 4 and sum(s["tokens"] for s in meta["sources"]) == meta["tokens"]


def test_force_replaces_and_a_failed_force_keeps_the_old(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    old, new, bad = tmp_path / "old.txt", tmp_path / "new.txt", tmp_path / "bad.jsonl"
    old.write_text("the old text")
    new.write_text("the new text, longer than the old")
    bad.write_text('{"text": "fine"}\nnot json\n')
    tokenize_files([str(old)], "d", runs)
    with pytest.raises(ConfigError, match="^name: dataset 'd' already exists"):
        tokenize_files([str(new)], "d", runs)
    with pytest.raises(ConfigError, match=r"bad\.jsonl:2: "):
        tokenize_files([str(bad)], "d", runs, force=True)
    np.testing.assert_array_equal(stream(dataset_dir("d", runs)), whole("the old text"))
    tokenize_files([str(new)], "d", runs, force=True)
    np.testing.assert_array_equal(stream(dataset_dir("d", runs)), whole(new.read_text()))
    verify(dataset_dir("d", runs))
    assert sorted(p.name for p in (runs / "data").iterdir()) == ["d"]  # the old one is gone


def test_the_job_validates_suffix_field_and_force(tmp_runs: Path, tmp_path: Path) -> None:
    src = tmp_path / "c.jsonl"
    src.write_text('{"body": "hello"}\n')
    (tmp_path / "c.csv").write_text("a,b\n")
    allowed = r"allowed: \.txt, \.md, \.jsonl, \.parquet \("
    with pytest.raises(ConfigError, match=r"^tokenize\.src: .*c\.csv.* " + allowed):
        jobs.parse_spec("tokenize", {"src": [str(tmp_path / "c.csv")], "name": "x"})
    for bad in ("", "a\nb", "x" * 300):
        with pytest.raises(ConfigError, match=r"^tokenize\.text_field: "):
            jobs.parse_spec("tokenize", {"src": [str(src)], "name": "x", "text_field": bad})
    with pytest.raises(ConfigError, match=r"^tokenize\.force: "):
        jobs.parse_spec("tokenize", {"src": [str(src)], "name": "x", "force": "yes"})
    ctx = LocalContext(tmp_runs / "job1", echo=lambda s: None)
    spec = jobs.parse_spec("tokenize", {"src": [str(src)], "name": "x", "text_field": "body"})
    assert jobs.get_kind("tokenize").run(spec, ctx)["documents"] == 1
    exists = r"^tokenize\.name: dataset 'x' already exists.*--force.*force = true"
    with pytest.raises(ConfigError, match=exists):
        jobs.parse_spec("tokenize", {"src": [str(src)], "name": "x", "text_field": "body"})
    spec = jobs.parse_spec("tokenize", {"src": [str(src)], "name": "x", "text_field": "body", "force": True})
    assert jobs.get_kind("tokenize").run(spec, ctx)["tokens"] == len(whole("hello"))


def test_lab_tokenize_field_and_force(tmp_runs: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    data.mkdir()
    write_parquet(data / "web.parquet", ["one page", "another page"])
    monkeypatch.setenv("LAB_DATA", str(data))
    runner = CliRunner()
    argv = ["tokenize", str(data / "web.parquet"), "--name", "web", "--field", "content", "--json"]
    ok = runner.invoke(main, argv)
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["documents"] == 2
    assert re.search(r"\[\d+/\d+\]", ok.stderr)  # the progress line
    again = runner.invoke(main, argv)
    assert again.exit_code == 2 and "--force" in again.output
    forced = runner.invoke(main, [*argv, "--force"])
    assert forced.exit_code == 0, forced.output
    missing = runner.invoke(main, ["tokenize", str(data / "web.parquet"), "--name", "w2", "--force"])
    assert missing.exit_code == 2 and "no column 'text'" in missing.output
    assert sorted(p.name for p in (tmp_runs / "data").iterdir()) == ["web"]


def test_bench_smoke_last_line() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "tokenize_speed.py"), "--mb", "1"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"tokenize: \d\.\d\de\d+ tokens/s \(tiktoken batch \d\.\d\de\d+ tokens/s, "
                        r"ratio \d+\.\d\d\) on 1 MB", last), last
