"""`python -m eval.compare`: the table, JSON and chart, with numbers equal to the scoring functions'."""

from __future__ import annotations

import json

import pytest
from test_eval_common import random_tokens, tiny_gpt2, write_hellaswag, write_shards

from eval import compare
from eval.hellaswag import evaluate_hellaswag, load_examples
from eval.val_loss import evaluate_val_loss
from gpt2_scratch.conversion import from_gpt2_model
from gpt2_scratch.training.export import write_exports
from gpt2_scratch.user_errors import UserError
from modeling_gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM


def test_compare_writes_markdown_json_and_chart(tmp_path, capsys):
    official = tiny_gpt2(seed=0)
    official.save_pretrained(tmp_path / "gpt2")
    from_gpt2_model(official).save_pretrained(tmp_path / "ours_same")
    from_gpt2_model(tiny_gpt2(seed=1)).save_pretrained(tmp_path / "ours_other")
    data_dir = write_shards(tmp_path / "data", random_tokens(300))
    hellaswag_file = write_hellaswag(tmp_path / "hellaswag_val.jsonl")
    out = tmp_path / "cmp"
    argv = ["--model", str(tmp_path / "ours_same"), "--model", str(tmp_path / "ours_other")]
    argv += ["--baseline", str(tmp_path / "gpt2"), "--data_dir", str(data_dir), "--seq_len", "16"]
    argv += ["--val_batches", "3", "--batch_size", "2", "--hellaswag", str(hellaswag_file), "--limit", "4"]
    argv += ["--prompt", "Hello, I'm a language model,", "--prompt", "The sky", "--max_new_tokens", "6"]
    compare.main([*argv, "--out_dir", str(out)])

    result = json.loads((out / "compare.json").read_text())
    rows = {r["model"]: r for r in result["models"]}
    assert list(rows) == [str(tmp_path / n) for n in ("ours_same", "ours_other", "gpt2")]
    assert [r["baseline"] for r in rows.values()] == [False, False, True]
    examples = load_examples(hellaswag_file, limit=4)
    for name, model in (("gpt2", official), ("ours_other", tiny_gpt2(seed=1))):
        row = rows[str(tmp_path / name)]
        assert row["parameters"] == model.num_parameters()
        loss = evaluate_val_loss(model, data_dir, batch_size=2, seq_len=16, max_batches=3)
        assert row["val_loss"] == pytest.approx(loss, rel=1e-5)
        hs = evaluate_hellaswag(model, examples)
        assert (row["hellaswag_acc"], row["hellaswag_acc_norm"]) == (hs["acc"], hs["acc_norm"])
    same, other, base = rows.values()
    # the same weights under the same seed draw the same samples, whatever the model class
    assert same["samples"] == base["samples"] != other["samples"]
    assert all(
        s.startswith(p) for s, p in zip(base["samples"], ["Hello, I'm a language model,", "The sky"], strict=True)
    )

    markdown = (out / "compare.md").read_text()
    assert f"`{tmp_path / 'gpt2'} (baseline)`" in markdown
    assert f"| {base['val_loss']:.4f} |" in markdown
    assert "HellaSwag acc_norm (4 examples)" in markdown and "### 'The sky'" in markdown
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert markdown in capsys.readouterr().out


def test_compare_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no model folder at"):
        compare.main(["--model", str(tmp_path / "nope"), "--out_dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit):
        compare.parse_args(["--out_dir", str(tmp_path)])  # no model at all


def test_compare_takes_either_export_layout_and_fits_the_window_to_the_shortest_context(tmp_path):
    ours = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("cpu-nano", n_positions=16)).eval()
    hf, gpt2 = write_exports(ours, tmp_path / "run", step=1)  # hf/ (our class) and hf-gpt2/ (official layout)
    tiny_gpt2(seed=1, n_positions=128).save_pretrained(tmp_path / "longer")
    data_dir = write_shards(tmp_path / "data", random_tokens(300))
    argv = ["--model", str(hf), "--model", str(gpt2), "--baseline", str(tmp_path / "longer")]
    argv += ["--data_dir", str(data_dir), "--val_batches", "2", "--batch_size", "2", "--max_new_tokens", "4"]
    compare.main([*argv, "--out_dir", str(tmp_path / "cmp")])

    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert (result["settings"]["seq_len"], result["settings"]["seq_len_from"]) == (16, "shortest context")
    scratch_row, gpt2_row, longer_row = result["models"]
    assert scratch_row["val_loss"] == pytest.approx(gpt2_row["val_loss"], rel=1e-5)
    assert scratch_row["val_loss"] == pytest.approx(
        evaluate_val_loss(ours, data_dir, batch_size=2, seq_len=16, max_batches=2), rel=1e-5
    )
    assert scratch_row["samples"] == gpt2_row["samples"] and scratch_row["parameters"] == gpt2_row["parameters"]
    assert "val loss (16-token windows, the shortest context compared)" in (tmp_path / "cmp" / "compare.md").read_text()

    with pytest.raises(UserError, match=f"--seq_len 64 is longer than the 16 positions of {hf}"):
        compare.main([*argv, "--seq_len", "64", "--out_dir", str(tmp_path / "cmp2")])
