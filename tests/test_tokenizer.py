"""The offline GPT-2 tokenizer: verified files, and tiktoken and transformers agreeing."""

import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import tiktoken_ext.openai_public
from transformers import AutoTokenizer

import modeling_gpt2_scratch
from data_prep import tokenizer

TEXTS = [
    "Hello world",
    " Hello world",
    "The quick brown fox jumps over the lazy dog.\n\nIt's 3.14159 o'clock; we'll've done.",
    "Ünïcödé: naïve café, Straße, 東京タワー, 안녕하세요, Здравствуйте, مرحبا 🎉🚀👩‍💻",
    "tabs\tand   multiple    spaces\r\nand trailing   ",
    "def f(x):\n    return x ** 2  # comment\n",
    "<|endoftext|> is special only when allowed",
    "emoji joiners 👨‍👩‍👧‍👦 and combining e\u0301 marks",
    "",
]


def test_pinned_hashes_are_tiktokens():
    """Our pins are the ones tiktoken itself uses for `gpt2` (read from its source, not copied)."""
    source = Path(tiktoken_ext.openai_public.__file__).read_text()
    gpt2_source = source[source.index("def gpt2") : source.index("def r50k_base")]
    assert re.search(rf'vocab_bpe_hash="{tokenizer.VOCAB_BPE_SHA256}"', gpt2_source)
    assert re.search(rf'encoder_json_hash="{tokenizer.ENCODER_JSON_SHA256}"', gpt2_source)
    assert tokenizer.GPT2_PAT_STR in source


def test_bpe_files_are_verified():
    vocab_bpe, encoder_json = tokenizer.bpe_files()
    assert hashlib.sha256(vocab_bpe.read_bytes()).hexdigest() == tokenizer.VOCAB_BPE_SHA256
    assert hashlib.sha256(encoder_json.read_bytes()).hexdigest() == tokenizer.ENCODER_JSON_SHA256


def test_tampered_file_is_a_clear_error(tmp_path):
    vocab_bpe, _ = tokenizer.bpe_files()
    tampered = tmp_path / "vocab.bpe"
    tampered.write_bytes(vocab_bpe.read_bytes() + b"x")
    with pytest.raises(tokenizer.TokenizerFileError, match="vocab.bpe is not the official GPT-2 file"):
        tokenizer.verify_file(tampered, tokenizer.VOCAB_BPE_SHA256)
    with pytest.raises(tokenizer.TokenizerFileError, match="not found"):
        tokenizer.verify_file(tmp_path / "missing.bpe", tokenizer.VOCAB_BPE_SHA256)


def test_known_encodings():
    enc = tokenizer.get_encoding()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.n_vocab == tokenizer.VOCAB_SIZE == 50257
    assert enc.eot_token == tokenizer.EOT_ID == 50256
    # the model file declares them too (it loads alone, without this project): the same numbers
    assert (modeling_gpt2_scratch.GPT2_VOCAB_SIZE, modeling_gpt2_scratch.EOT_TOKEN_ID) == (enc.n_vocab, enc.eot_token)


@pytest.mark.parametrize("text", TEXTS)
def test_tiktoken_and_transformers_agree(text):
    enc = tokenizer.get_encoding()
    hf = tokenizer.load_hf_tokenizer()
    expected = enc.encode(text, allowed_special="all")
    assert hf(text)["input_ids"] == expected
    assert hf.decode(expected) == enc.decode(expected) == text


def test_saved_tokenizer_loads_with_auto_tokenizer(tmp_path):
    tokenizer.save_hf_tokenizer(tmp_path, model_max_length=1024)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    enc = tokenizer.get_encoding()
    text = " ".join(TEXTS)
    assert hf(text)["input_ids"] == enc.encode(text, allowed_special="all")
    assert hf.eos_token_id == tokenizer.EOT_ID


def test_the_published_tokenizer_config_holds_no_loader_settings(tmp_path):
    """transformers 5 records how a folder was loaded (`is_local`, `local_files_only`) among a
    tokenizer's settings; an export pushed to the Hub must not carry them, nor pass them back to the
    `from_pretrained` of whoever loads it."""
    tokenizer.save_hf_tokenizer(tmp_path, model_max_length=256)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert not set(tokenizer.LOADER_SETTINGS) & set(config), config
    assert config["model_max_length"] == 256 and config["eos_token"] == tokenizer.EOT_TOKEN


# OpenAI's GPT-2 `encoder.py`, the algorithm of transformers' slow `GPT2Tokenizer`: the regex split,
# bytes mapped to printable characters, then the lowest-ranked merge of `merges.txt` first.
SLOW_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_to_unicode() -> dict[int, str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def slow_encode(folder: Path, text: str) -> list[int]:
    """`text` encoded from `vocab.json` and `merges.txt` alone, `<|endoftext|>` as its special token."""
    import regex

    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]  # line 1 is a version header
    ranks = {tuple(line.split()): i for i, line in enumerate(merges) if line}
    to_unicode = byte_to_unicode()

    def bpe(word: tuple[str, ...]) -> tuple[str, ...]:
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:], strict=False)}
            best = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if word[i : i + 2] == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    ids = []
    for n, part in enumerate(text.split(tokenizer.EOT_TOKEN)):
        if n:
            ids.append(vocab[tokenizer.EOT_TOKEN])
        for piece in regex.findall(SLOW_SPLIT, part):
            ids += [vocab[token] for token in bpe(tuple(to_unicode[b] for b in piece.encode("utf-8")))]
    return ids


def test_saved_bpe_files_encode_like_the_fast_tokenizer(tmp_path):
    """The files the slow tokenizer and converters read: `vocab.json` and `merges.txt` beside
    `tokenizer.json`, with the special tokens and the model's length limit."""
    tokenizer.save_hf_tokenizer(tmp_path, model_max_length=64)
    fast = AutoTokenizer.from_pretrained(tmp_path)
    assert fast.model_max_length == 64
    special = json.loads((tmp_path / "special_tokens_map.json").read_text())
    assert special == {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (tmp_path / "tokenizer.json").unlink()  # now transformers too builds it from the two BPE files
    from_bpe = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        expected = fast(text)["input_ids"]
        assert slow_encode(tmp_path, text) == from_bpe(text)["input_ids"] == expected, text
    assert slow_encode(tmp_path, "a<|endoftext|>b")[1] == tokenizer.EOT_ID


# What GPT-2's pre-tokenization treats specially: runs of spaces and newlines (`\s+(?!\S)`, `\s++$`), digits,
# contractions (also cut short: "'l"), a space before letters, digits or punctuation, Unicode letters,
# digits and spaces (U+00A0, U+3000, U+2028, U+0085), combining marks, emoji, U+001C (whitespace to Python,
# not to tiktoken), and the EOT text (ordinary text here).
ATOMS = ["a", "Zebra", "é", "東京", "안녕", "1", "2024", "９", "Ⅷ", " ", "  ", " " * 9, "\n", "\n\n", "\n \n", "\t"]
ATOMS += ["\r\n", "'s", "'ll", "'l", "'ve", "'re", "'", "!", "...", " !", "🎉", "👩‍💻", "e\u0301", "\u00a0", "\u3000"]
ATOMS += ["\u2028", "\u0085", "\x1c", "<|endoftext|>", " 3", " x"]


def adversarial_text(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(ATOMS) for _ in range(n))


@pytest.mark.parametrize("piece_chars", [1, 7, 64, 4096])
def test_a_long_text_encodes_in_pieces_to_the_tokens_of_the_whole(piece_chars):
    """The pieces' tokens, concatenated, are tiktoken's for the whole text, with pieces as short as the cuts
    allow (1: every safe cut is taken) and many of them."""
    enc = tokenizer.get_encoding()
    text = adversarial_text(30_000, seed=piece_chars)
    pieces = tokenizer.encode_pieces(text, piece_chars)
    assert len(pieces) > len(text) // (2 * max(piece_chars, 64))
    assert np.concatenate(pieces).tolist() == enc.encode_ordinary(text)


def test_only_cuts_before_whitespace_after_other_characters_are_taken():
    """The cuts fall between a character that is not whitespace and whitespace, and a stretch without one
    stays whole; cuts elsewhere (in a contraction, after spaces, after newlines) change the tokens."""
    enc = tokenizer.get_encoding()
    text = "It's  here:\n\nnumbers 12345 \u3000東京\n" * 50
    cuts = tokenizer.safe_cuts(text, 1)
    assert cuts and all(not text[c - 1].isspace() and text[c].isspace() for c in cuts)
    line = "It's  here:\n\n"
    for unsafe in (line.index("'") + 1, line.index("h"), len(line)):  # in 's; after two spaces; after \n\n
        assert enc.encode_ordinary(text[:unsafe]) + enc.encode_ordinary(text[unsafe:]) != enc.encode_ordinary(text)
    word = "x" * 5000
    assert tokenizer.safe_cuts(word, 10) == [] and len(tokenizer.encode_pieces(word, 10)) == 1
