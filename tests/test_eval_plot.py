"""`python -m eval.plot`: PNGs from a trainer log, and clear errors for bad logs."""

from __future__ import annotations

import json
import math

import pytest

from eval import plot
from eval.plot import plot_training, read_log, series
from gpt2_scratch.user_errors import UserError

PNG = b"\x89PNG\r\n\x1a\n"


def write_log(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def training_records(steps: int = 40, with_hellaswag: bool = True) -> list[dict]:
    records = []
    for step in range(steps):
        record = {"step": step, "tokens": step * 4096, "train/loss": 10 * math.exp(-step / 15) + 3, "lr": 6e-4}
        if step % 10 == 0:
            record["val/loss"] = record["train/loss"] + 0.1
            if with_hellaswag:
                record["hellaswag/acc_norm"] = 0.25 + step / 1000
        records.append(record)
    return records


def test_plot_writes_loss_and_hellaswag_pngs(tmp_path, capsys):
    write_log(tmp_path / "log.jsonl", training_records())
    plot.main([str(tmp_path)])
    for name in ("loss.png", "hellaswag.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == PNG
    assert "hellaswag.png" in capsys.readouterr().out


def test_plot_without_hellaswag_writes_only_the_loss(tmp_path):
    write_log(tmp_path / "log.jsonl", training_records(with_hellaswag=False))
    written = plot_training(tmp_path, tmp_path / "elsewhere")
    assert [p.name for p in written] == ["loss.png"]
    assert not (tmp_path / "plots").exists()


def test_a_resumed_step_keeps_its_last_value():
    records = training_records(steps=5)
    records.append({"step": 2, "tokens": 2 * 4096, "train/loss": 1.5})  # resumed from step 2
    tokens, values = series(records, "train/loss")
    assert tokens == [0, 4096, 8192, 12288, 16384]
    assert values[2] == 1.5 and values[3] == records[3]["train/loss"]


def test_bad_logs_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="log.jsonl not found"):
        plot_training(tmp_path)
    (tmp_path / "log.jsonl").write_text('{"step": 0, "tokens": 0, "train/loss": 9.0}\n{oops\n')
    with pytest.raises(UserError, match=r"log.jsonl:2: not valid JSON"):
        read_log(tmp_path / "log.jsonl")
    (tmp_path / "log.jsonl").write_text('{"step": 0, "train/loss": 9.0}\n')
    with pytest.raises(UserError, match="integer 'step' and 'tokens'"):
        read_log(tmp_path / "log.jsonl")
    write_log(tmp_path / "log.jsonl", [{"step": 0, "tokens": 0, "lr": 1e-4}])
    with pytest.raises(UserError, match="no 'train/loss' or 'val/loss'"):
        plot_training(tmp_path)
