"""models/tokenizer.py: the offline r50k_base encoding and its hash check."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from config import TOKENIZER_SHA256, TOKENIZER_VOCAB
from models.tokenizer import DEFAULT_PATH, EOT, SAMPLE_TEXT, TokenizerError, file_sha256, get_tokenizer


def test_known_strings_encode_as_gpt2() -> None:
    enc = get_tokenizer()
    assert enc.encode_ordinary("Hello world") == [15496, 995]  # GPT-2's ids
    assert enc.encode_ordinary(" the") == [262]
    assert enc.n_vocab == TOKENIZER_VOCAB
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT] == [50256]
    text = "Ünïcödé, tabs\tand  spaces\n"
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_shipped_files() -> None:
    assert file_sha256(DEFAULT_PATH) == TOKENIZER_SHA256
    assert 200_000 < SAMPLE_TEXT.stat().st_size < 1_000_000


def test_hash_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    copy = tmp_path / "r50k_base.tiktoken"
    shutil.copyfile(DEFAULT_PATH, copy)
    assert get_tokenizer(str(copy)).encode_ordinary("Hello world") == [15496, 995]  # an intact copy loads
    flipped = tmp_path / "flipped.tiktoken"
    raw = bytearray(copy.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    flipped.write_bytes(bytes(raw))
    with pytest.raises(TokenizerError, match=rf"^tokenizer file: {flipped} has sha256 [0-9a-f]{{64}}, "
                                            rf"expected {TOKENIZER_SHA256}"):
        get_tokenizer(str(flipped))
    with pytest.raises(TokenizerError, match="does not exist"):
        get_tokenizer(str(tmp_path / "absent.tiktoken"))

