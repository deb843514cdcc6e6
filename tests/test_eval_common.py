"""Shared builders for the eval tests (tiny official-layout GPT-2, a HellaSwag file, token shards),
and the tests of `eval.common`: model loading and its errors, parameter counts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from eval.common import count_parameters, load_model
from gpt2_scratch.conversion import from_gpt2_model
from gpt2_scratch.user_errors import UserError

ROOT = Path(__file__).resolve().parents[1]

# Hand-made examples in the original hellaswag_val.jsonl format (github.com/rowanz/hellaswag).
HELLASWAG_EXAMPLES = [
    {
        "ctx_a": "A man is standing in a kitchen holding a frying pan.",
        "ctx_b": "he",
        "endings": [
            "cracks two eggs into the pan and stirs them with a fork.",
            "throws the pan out of the window.",
            "starts singing loudly to the dog sitting on the couch next to the fridge.",
            "puts on a helmet.",
        ],
        "label": 0,
    },
    {
        "ctx_a": "A girl walks onto a diving board at an indoor pool.",
        "ctx_b": "she",
        "endings": [
            "eats a sandwich.",
            "bounces twice and dives into the water, making a small splash.",
            "paints the board blue and walks away slowly.",
            "reads the newspaper.",
        ],
        "label": 1,
    },
    {
        "ctx_a": "Two people are rowing a canoe down a calm river.",
        "ctx_b": "they",
        "endings": [
            "fly into the sky.",
            "stop rowing and start playing chess on the water.",
            "keep paddling past the trees along the river bank.",
            "turn into fish.",
        ],
        "label": 2,
    },
    {
        "ctx_a": "A woman kneels in a garden with a small shovel.",
        "ctx_b": "she",
        "endings": [
            "drives a bus.",
            "sings.",
            "climbs onto the roof of the house and jumps off into the pool below.",
            "digs a hole and places a small plant inside it.",
        ],
        "label": 3,
    },
    {
        "ctx_a": "A boy holds a red kite on a windy beach.",
        "ctx_b": "the boy",
        "endings": [
            "lets out the string and the kite rises high above the sand.",
            "eats the kite.",
            "sleeps.",
            "builds a house out of the kite and lives in it for a year.",
        ],
        "label": 0,
    },
    {
        "ctx_a": "A chef slices vegetables on a wooden cutting board. The onions are already chopped.",
        "ctx_b": "the chef",
        "endings": [
            "scrapes the vegetables into a hot pot of soup.",
            "rides a horse.",
            "takes a nap under the table.",
            "calls the fire department about the onions.",
        ],
        "label": 0,
    },
    {
        "ctx_a": "A man in a gym lifts a heavy barbell over his head.",
        "ctx_b": "he",
        "endings": ["drops it.", "smiles.", "flies.", "holds it there for a few seconds, then lowers it to the floor."],
        "label": 3,
    },
]


def hellaswag_records() -> list[dict]:
    """The examples with every field of the original file, `ctx` built as rowanz/hellaswag builds it."""
    records = []
    for i, ex in enumerate(HELLASWAG_EXAMPLES):
        ctx = ex["ctx_a"] + " " + ex["ctx_b"][0].upper() + ex["ctx_b"][1:]
        records.append(
            {
                "ind": 100 + i,
                "activity_label": "Test activity",
                "ctx_a": ex["ctx_a"],
                "ctx_b": ex["ctx_b"],
                "ctx": ctx,
                "endings": ex["endings"],
                "source_id": f"test~{i}",
                "split": "val",
                "split_type": "indomain",
                "label": ex["label"],
            }
        )
    return records


def write_hellaswag(path: Path, records: list[dict] | None = None) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in (records or hellaswag_records())))
    return path


def tiny_gpt2(seed: int = 0, n_positions: int = 128) -> GPT2LMHeadModel:
    """A 2-layer, 32-wide GPT-2 in the official layout. The wide init spreads the logits, so that
    no two endings tie within floating-point noise."""
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=n_positions, initializer_range=0.3)
    return GPT2LMHeadModel(config).eval()


def tiny_gpt2_folder(folder: Path, seed: int = 0) -> Path:
    tiny_gpt2(seed).save_pretrained(folder)
    return folder


def write_shards(data_dir: Path, val_tokens: np.ndarray, train_tokens: np.ndarray | None = None) -> Path:
    """A data folder as `python -m data_prep` writes it: shards plus manifest.json."""
    from data_prep.shards import write_manifest, write_shard

    data_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    for split, tokens in (("val", val_tokens), ("train", train_tokens)):
        if tokens is not None:
            name = f"test_{split}_000000.bin"
            sha = write_shard(data_dir / name, tokens)
            shards.append({"file": name, "split": split, "tokens": int(len(tokens)), "sha256": sha})
    write_manifest(data_dir, {"format_version": 1, "tokenizer": "gpt2", "source": "test", "shards": shards})
    return data_dir


def random_tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50257, size=n, dtype=np.uint16)


def test_load_model_reads_official_and_our_folders(tmp_path):
    official = tiny_gpt2()
    official.save_pretrained(tmp_path / "official")
    from_gpt2_model(official).save_pretrained(tmp_path / "ours")
    x = torch.tensor([[464, 2068, 7586, 21831]])
    expected = official(x).logits
    for name in ("official", "ours"):
        model = load_model(str(tmp_path / name), device="cpu")
        assert not model.training
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-4, atol=1e-4)


def test_load_model_errors_are_clear(tmp_path):
    with pytest.raises(UserError, match="no model folder at"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        load_model(str(tmp_path / "empty"))
    # tests run with HF_HUB_OFFLINE=1: a Hub id that is not cached fails at once, saying what to do
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set"):
        load_model("openai-community/no-such-model-in-cache")


def test_count_parameters_ignores_vocab_padding():
    official = tiny_gpt2()
    ours = from_gpt2_model(official)
    assert ours.config.padded_vocab_size > ours.config.vocab_size
    # transformers counts tied weights once; so must we, and our padding rows are not parameters that matter
    assert count_parameters(official) == official.num_parameters() == count_parameters(ours)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval.val_loss", "--model", "/nonexistent/model", "--data_dir", "/nonexistent/data"], "no model folder"),
        (["eval.plot", "/nonexistent/run"], "log.jsonl not found"),
    ],
)
def test_cli_user_errors_are_one_line_not_a_traceback(argv, message):
    result = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.stderr
