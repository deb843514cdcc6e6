"""Validation loss against transformers' own loss on the same token windows."""

from __future__ import annotations

import json

import pytest
import torch
from test_eval_common import random_tokens, tiny_gpt2, tiny_gpt2_folder, write_shards

from data_prep import DataPrepError
from eval import val_loss
from eval.val_loss import evaluate_val_loss
from gpt2_scratch.conversion import from_gpt2_model
from gpt2_scratch.user_errors import UserError

SEQ_LEN, BATCH = 16, 4


def direct_val_loss(model, tokens, n_sequences: int) -> float:
    """GPT2LMHeadModel's own `labels` loss over the first consecutive (T + 1)-token windows at stride T
    (every window has T predictions, so its mean over the batch is the mean over all tokens)."""
    windows = torch.stack(
        [torch.as_tensor(tokens[i * SEQ_LEN : i * SEQ_LEN + SEQ_LEN + 1].astype("int64")) for i in range(n_sequences)]
    )
    with torch.no_grad():
        return model(windows, labels=windows).loss.item()


def test_val_loss_equals_direct_computation(tmp_path):
    tokens = random_tokens(500)  # 31 windows of 17 tokens: 7 batches of 4, and 3 windows in a padded eighth
    data_dir = write_shards(tmp_path / "data", tokens, train_tokens=random_tokens(500, seed=1))
    model = tiny_gpt2()
    expected = direct_val_loss(model, tokens, n_sequences=31)
    got = evaluate_val_loss(model, data_dir, batch_size=BATCH, seq_len=SEQ_LEN, device="cpu")
    assert got == pytest.approx(expected, rel=1e-5)
    capped = evaluate_val_loss(model, data_dir, batch_size=BATCH, seq_len=SEQ_LEN, max_batches=2)
    assert capped == pytest.approx(direct_val_loss(model, tokens, n_sequences=2 * BATCH), rel=1e-5)
    ours = from_gpt2_model(model).train()
    assert evaluate_val_loss(ours, data_dir, batch_size=BATCH, seq_len=SEQ_LEN) == pytest.approx(expected, rel=1e-5)
    assert ours.training


def test_cli_prints_and_writes_the_loss(tmp_path, capsys):
    tokens = random_tokens(300)
    data_dir = write_shards(tmp_path / "data", tokens)
    folder = tiny_gpt2_folder(tmp_path / "model")
    out = tmp_path / "val.json"
    argv = ["--model", str(folder), "--data_dir", str(data_dir), "--batch_size", "2", "--seq_len", "16"]
    val_loss.main([*argv, "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["val/loss"] == pytest.approx(direct_val_loss(tiny_gpt2(), tokens, n_sequences=18), rel=1e-5)
    assert json.loads(capsys.readouterr().out) == report


def test_errors_for_empty_split_and_too_long_sequences(tmp_path):
    model = tiny_gpt2()
    short = write_shards(tmp_path / "short", random_tokens(20))  # one window of 17 in a batch of 4: 3 padding rows
    got = evaluate_val_loss(model, short, batch_size=BATCH, seq_len=SEQ_LEN)
    assert got == pytest.approx(direct_val_loss(model, random_tokens(20), n_sequences=1), rel=1e-5)
    shorter = write_shards(tmp_path / "shorter", random_tokens(SEQ_LEN))
    with pytest.raises(DataPrepError, match=f"has no chunk of {SEQ_LEN + 1} tokens"):
        evaluate_val_loss(model, shorter, batch_size=BATCH, seq_len=SEQ_LEN)
    no_val = write_shards(tmp_path / "train_only", None, train_tokens=random_tokens(500))
    with pytest.raises(DataPrepError, match="lists no 'val' shards"):
        evaluate_val_loss(model, no_val, batch_size=BATCH, seq_len=SEQ_LEN)
    with pytest.raises(UserError, match="seq_len 256 is longer than the model's 128 positions"):
        evaluate_val_loss(model, short, batch_size=1, seq_len=256)
