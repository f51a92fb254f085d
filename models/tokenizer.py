"""tiktoken r50k_base, loaded offline from the copy shipped in models/assets.

The file's sha256 is checked on every load: a corrupt or substituted vocabulary would make
every token id of every run mean something else, silently.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from common import sha256_file
from config import TOKENIZER_NAME, TOKENIZER_SHA256, TOKENIZER_VOCAB

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_PATH = ASSETS / "r50k_base.tiktoken"
SAMPLE_TEXT = ASSETS / "shakespeare.txt"
EOT = TOKENIZER_VOCAB - 1  # <|endoftext|>

# The same split pattern tiktoken uses for r50k_base (tiktoken_ext/openai_public.py).
_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class TokenizerError(RuntimeError):
    pass


file_sha256 = sha256_file  # the name the data and tokenizer code read


def get_tokenizer(path: str | None = None) -> tiktoken.Encoding:
    """The r50k_base encoding from `path` (default: $LAB_TOKENIZER, else the shipped copy)."""
    return _load(path or os.environ.get("LAB_TOKENIZER") or str(DEFAULT_PATH))


@lru_cache(maxsize=4)
def _load(path: str) -> tiktoken.Encoding:
    if not os.path.exists(path):
        raise TokenizerError(f"tokenizer file: {path} does not exist")
    digest = file_sha256(path)
    if digest != TOKENIZER_SHA256:
        raise TokenizerError(
            f"tokenizer file: {path} has sha256 {digest}, expected {TOKENIZER_SHA256} (r50k_base)"
        )
    ranks = load_tiktoken_bpe(path, expected_hash=TOKENIZER_SHA256)
    return tiktoken.Encoding(
        name=TOKENIZER_NAME,
        pat_str=_PAT,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT},
    )
