"""The offline GPT-2 tokenizer: verified files, and tiktoken and transformers agreeing."""

import hashlib
import re
from pathlib import Path

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
    tokenizer.save_hf_tokenizer(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    enc = tokenizer.get_encoding()
    text = " ".join(TEXTS)
    assert hf(text)["input_ids"] == enc.encode(text, allowed_special="all")
    assert hf.eos_token_id == tokenizer.EOT_ID
