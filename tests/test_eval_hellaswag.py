"""HellaSwag scoring against a straightforward re-computation with transformers' GPT-2."""

from __future__ import annotations

import json

import pytest
import torch
from test_eval_common import hellaswag_records, tiny_gpt2, tiny_gpt2_folder, write_hellaswag

from data_prep.tokenizer import load_hf_tokenizer
from eval import hellaswag
from eval.hellaswag import HellaSwagDataError, evaluate_hellaswag, load_examples, render_example
from gpt2_scratch.conversion import from_gpt2_model


def reference_scores(model, examples) -> list[dict]:
    """build-nanogpt's rule, one unpadded row at a time, with transformers' tokenizer (not tiktoken)."""
    tokenizer = load_hf_tokenizer()
    out = []
    for ex in examples:
        ctx = tokenizer.encode(ex["ctx"])
        losses, lengths = [], []
        for ending in ex["endings"]:
            end = tokenizer.encode(" " + ending)
            tokens = torch.tensor([ctx + end])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(tokens).logits[0].double(), dim=-1)
            # token at position p is predicted by the logits at p - 1
            losses.append(-sum(logprobs[p - 1, tokens[0, p]].item() for p in range(len(ctx), len(ctx) + len(end))))
            lengths.append(len(end))
        mean = [loss / n for loss, n in zip(losses, lengths, strict=True)]
        out.append(
            {
                "losses": losses,
                "lengths": lengths,
                "pred": min(range(4), key=losses.__getitem__),
                "pred_norm": min(range(4), key=mean.__getitem__),
            }
        )
    return out


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    return load_examples(write_hellaswag(tmp_path_factory.mktemp("hs") / "hellaswag_val.jsonl"))


def test_scores_match_straightforward_computation(examples):
    model = tiny_gpt2()
    expected = reference_scores(model, examples)
    result = evaluate_hellaswag(model, examples, batch_size=3, device="cpu", return_predictions=True)
    assert result["n"] == len(examples)
    for got, want, ex in zip(result["predictions"], expected, examples, strict=True):
        assert (got["ind"], got["label"]) == (ex["ind"], ex["label"])
        assert (got["pred"], got["pred_norm"]) == (want["pred"], want["pred_norm"])
        assert got["lengths"] == want["lengths"]
        assert got["losses"] == pytest.approx(want["losses"], rel=1e-5)
    n = len(examples)
    assert result["acc"] == pytest.approx(
        sum(w["pred"] == ex["label"] for w, ex in zip(expected, examples, strict=True)) / n
    )
    assert result["acc_norm"] == pytest.approx(
        sum(w["pred_norm"] == ex["label"] for w, ex in zip(expected, examples, strict=True)) / n
    )
    # the data must tell the two rules apart, or this test could not catch a swap of them
    assert [w["pred"] for w in expected] != [w["pred_norm"] for w in expected]


def test_batch_size_padding_and_model_class_do_not_change_results(examples):
    official = tiny_gpt2()
    ours = from_gpt2_model(official)
    # batch size 1 pads only within an example; 7 pads every row to the longest of all 28
    runs = [
        evaluate_hellaswag(m, examples, batch_size=b, return_predictions=True) for m in (official, ours) for b in (1, 7)
    ]
    first = runs[0]["predictions"]
    for run in runs[1:]:
        for a, b in zip(first, run["predictions"], strict=True):
            assert (a["pred"], a["pred_norm"], a["lengths"]) == (b["pred"], b["pred_norm"], b["lengths"])
            assert a["losses"] == pytest.approx(b["losses"], rel=1e-5)
        assert (run["acc"], run["acc_norm"]) == (runs[0]["acc"], runs[0]["acc_norm"])


def test_eval_mode_and_train_mode_restored(examples):
    model = tiny_gpt2().train()  # GPT2Config's dropout (0.1) would make train-mode scores random
    result = evaluate_hellaswag(model, examples[:2], batch_size=2, return_predictions=True)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    expected = evaluate_hellaswag(tiny_gpt2(), examples[:2], return_predictions=True)
    for got, want in zip(result["predictions"], expected["predictions"], strict=True):
        assert got["losses"] == pytest.approx(want["losses"], rel=1e-5)


def test_evaluate_metric_agrees_and_loads_offline(examples):
    result = evaluate_hellaswag(tiny_gpt2(), examples, return_predictions=True)
    preds = result["predictions"]
    metric = hellaswag.load_metric().compute(
        losses=[p["losses"] for p in preds],
        lengths=[p["lengths"] for p in preds],
        references=[p["label"] for p in preds],
    )
    assert metric == pytest.approx({"acc": result["acc"], "acc_norm": result["acc_norm"]})


def test_cli_writes_results_and_predictions(tmp_path, capsys):
    data = write_hellaswag(tmp_path / "hellaswag_val.jsonl")
    folder = tiny_gpt2_folder(tmp_path / "model")
    out = tmp_path / "results.json"
    argv = ["--model", str(folder), "--data", str(data), "--limit", "5", "--batch_size", "2", "--out", str(out)]
    hellaswag.main([*argv, "--predictions"])
    report = json.loads(out.read_text())
    expected = evaluate_hellaswag(tiny_gpt2(), load_examples(data, limit=5))
    assert report["n"] == 5 == len(report["predictions"])
    assert (report["acc"], report["acc_norm"]) == pytest.approx((expected["acc"], expected["acc_norm"]))
    assert json.loads(capsys.readouterr().out)["acc_norm"] == report["acc_norm"]


def test_long_context_is_cut_from_the_left():
    from data_prep.tokenizer import get_encoding

    enc = get_encoding()
    ex = {"ctx": "word " * 50, "endings": ["a b c", "d", "e f", "g h i j"], "label": 0}
    rows, ctx_lens = render_example(ex, enc, max_len=16)
    for row, ctx_len, ending in zip(rows, ctx_lens, ex["endings"], strict=True):
        assert len(row) == 16
        assert row[ctx_len:] == enc.encode_ordinary(" " + ending)  # the ending is whole
    with pytest.raises(HellaSwagDataError, match="does not fit"):
        render_example(ex, enc, max_len=4)


def test_load_examples_limit_and_string_labels(tmp_path):
    records = hellaswag_records()
    records[1]["label"] = str(records[1]["label"])  # the Hub's datasets copy stores labels as strings
    examples = load_examples(write_hellaswag(tmp_path / "h.jsonl", records), limit=3)
    assert [ex["ind"] for ex in examples] == [r["ind"] for r in records[:3]]
    assert examples[1]["label"] == records[0]["label"] + 1


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"h\.jsonl:2: not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"ctx": "x", "label": 0}', r"missing key\(s\) \['endings'\]"),
        ('{"ctx": "x", "endings": ["a", "b", "c"], "label": 0}', "list of 4 strings"),
        ('{"ctx": "x", "endings": ["a", "b", "c", "d"], "label": 4}', "'label' must be an int in 0..3, found 4"),
        ('{"ctx": "", "endings": ["a", "b", "c", "d"], "label": 1}', "'ctx' must be a non-empty string"),
    ],
)
def test_malformed_file_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "h.jsonl"
    path.write_text(json.dumps(hellaswag_records()[0]) + "\n" + line + "\n")
    with pytest.raises(HellaSwagDataError, match=message):
        load_examples(path)


def test_missing_or_empty_file_errors(tmp_path):
    with pytest.raises(HellaSwagDataError, match="not found"):
        load_examples(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(HellaSwagDataError, match="holds no examples"):
        load_examples(tmp_path / "empty.jsonl")
    with pytest.raises(HellaSwagDataError, match="no HellaSwag examples"):
        evaluate_hellaswag(tiny_gpt2(), [])


def test_offline_without_a_path_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(hellaswag, "DEFAULT_CACHE", tmp_path / "cache")
    with pytest.raises(HellaSwagDataError, match="HF_HUB_OFFLINE is set") as err:
        load_examples()
    assert str(tmp_path / "cache" / "hellaswag_val.jsonl") in str(err.value)
    assert hellaswag.HELLASWAG_VAL_URL in str(err.value)
