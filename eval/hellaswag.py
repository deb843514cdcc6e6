"""HellaSwag, completion style, as in build-nanogpt's `hellaswag.py` (and GPT-2/GPT-3 small-model evals).

For each example the model reads the context followed by each of the four endings (each encoded with
a leading space); the loss is summed over the ending's tokens only. `acc` picks the ending with the
lowest summed loss, `acc_norm` the one with the lowest mean loss per token (which does not favour short
endings). The data is the original `hellaswag_val.jsonl` of github.com/rowanz/hellaswag.

    python -m eval.hellaswag --model runs/gpt2-124m/hf --data hellaswag_val.jsonl --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from data_prep.tokenizer import EOT_ID
from eval.common import (
    autocast,
    check_out_file,
    hub_offline,
    inference,
    launched_accelerator,
    load_model,
    max_positions,
    resolve_device,
    write_out_file,
)
from gpt2_scratch.user_errors import UserError, run_command

HELLASWAG_VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
DEFAULT_CACHE = Path(os.environ.get("GPT2_SCRATCH_CACHE", Path.home() / ".cache" / "gpt2_scratch"))
N_ENDINGS = 4
PAD_ID = EOT_ID  # any id would do: padding sits after the last real token and is masked out of the loss
METRIC_DIR = Path(__file__).resolve().parent / "metrics" / "hellaswag_completion"


class HellaSwagDataError(UserError):
    """The HellaSwag file is missing, malformed or empty."""


def load_examples(path: str | os.PathLike | None = None, limit: int | None = None) -> list[dict]:
    """Read examples in the original `hellaswag_val.jsonl` format (one JSON object per line).

    With no `path`, use the cached validation file, fetching it from the rowanz/hellaswag repository
    when online; offline, raise `HellaSwagDataError` saying where to put the file. Each example keeps
    its fields; `label` is returned as an int. `limit` keeps the first N examples.
    """
    path = Path(path) if path is not None else cached_val_file()
    if not path.is_file():
        raise HellaSwagDataError(f"HellaSwag file not found: {path}")
    examples = []
    with path.open(encoding="utf-8") as f:
        try:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                if limit is not None and len(examples) >= limit:
                    break
                examples.append(parse_example(line, f"{path}:{line_no}"))
        except UnicodeDecodeError as err:
            raise HellaSwagDataError(f"{path} is not UTF-8 text (a JSON-lines file); {err.reason}") from err
    if not examples:
        raise HellaSwagDataError(f"{path} holds no examples (expected one JSON object per line)")
    return examples


def parse_example(line: str, where: str) -> dict:
    """One JSON line, checked: `ctx` a string, `endings` four strings, `label` in 0..3."""
    try:
        example = json.loads(line)
    except json.JSONDecodeError as err:
        raise HellaSwagDataError(f"{where}: not valid JSON ({err.msg})") from err
    if not isinstance(example, dict):
        raise HellaSwagDataError(f"{where}: expected a JSON object, found {type(example).__name__}")
    missing = [key for key in ("ctx", "endings", "label") if key not in example]
    if missing:
        raise HellaSwagDataError(f"{where}: missing key(s) {missing}; found {sorted(example)}")
    endings, label = example["endings"], example["label"]
    if not (isinstance(example["ctx"], str) and example["ctx"].strip()):
        raise HellaSwagDataError(f"{where}: 'ctx' must be a non-empty string, found {example['ctx']!r}")
    if not (isinstance(endings, list) and len(endings) == N_ENDINGS and all(isinstance(e, str) for e in endings)):
        raise HellaSwagDataError(f"{where}: 'endings' must be a list of {N_ENDINGS} strings, found {endings!r}")
    # The original file stores the label as an int; the Hub's datasets copy stores it as a string.
    if isinstance(label, str) and label in {str(i) for i in range(N_ENDINGS)}:
        label = int(label)
    if not (type(label) is int and 0 <= label < N_ENDINGS):
        raise HellaSwagDataError(f"{where}: 'label' must be an int in 0..{N_ENDINGS - 1}, found {label!r}")
    return {**example, "label": label}


def cached_val_file() -> Path:
    """The validation file in the cache folder, fetched first if missing; offline, a clear error."""
    target = DEFAULT_CACHE / "hellaswag_val.jsonl"
    if target.is_file():
        return target
    where = f"Download {HELLASWAG_VAL_URL} to {target} (or pass its path with --data)"
    if hub_offline():
        raise HellaSwagDataError(f"no HellaSwag file given and HF_HUB_OFFLINE is set. {where}.")
    try:
        with urllib.request.urlopen(HELLASWAG_VAL_URL, timeout=15) as response:
            data = response.read()
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        raise HellaSwagDataError(f"could not fetch HellaSwag ({err}); offline? {where}.") from err
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(target)  # atomic, so that a second process never reads half a file
    return target


def render_example(example: dict, encoding, max_len: int | None = None) -> tuple[list[list[int]], list[int]]:
    """Token rows `context + ending` for the four endings, and each row's context length.

    A row longer than `max_len` loses tokens from the start of its context (the ending is always
    scored whole), as lm-evaluation-harness does; HellaSwag rows are under 200 tokens, so this only
    matters for tiny test models.
    """
    ctx_tokens = encoding.encode_ordinary(example["ctx"])
    rows, ctx_lens = [], []
    for ending in example["endings"]:
        end_tokens = encoding.encode_ordinary(" " + ending)  # GPT-2 BPE folds the space into the first word
        keep = len(ctx_tokens) if max_len is None else min(len(ctx_tokens), max_len - len(end_tokens))
        if keep < 1:  # the first ending token needs at least one context token to be predicted from
            raise HellaSwagDataError(
                f"example {example.get('ind', '?')}: an ending of {len(end_tokens)} tokens does not fit "
                f"the model's {max_len} positions after a context token"
            )
        rows.append(ctx_tokens[len(ctx_tokens) - keep :] + end_tokens)
        ctx_lens.append(keep)
    return rows, ctx_lens


def ending_losses(model: nn.Module, rows: list[list[int]], ctx_lens: list[int], device: torch.device) -> torch.Tensor:
    """(N, 2): the summed loss over each row's ending tokens and that number of tokens.

    Rows are right-padded: with causal attention a position never sees later ones, so padding after
    a row's last token cannot change its logits, and it is masked out of the loss.
    """
    T = max(len(r) for r in rows)
    tokens = torch.full((len(rows), T), PAD_ID, dtype=torch.long)
    scored = torch.zeros((len(rows), T), dtype=torch.bool)  # True where the token is part of an ending
    for i, (row, ctx_len) in enumerate(zip(rows, ctx_lens, strict=True)):
        tokens[i, : len(row)] = torch.tensor(row)
        scored[i, ctx_len : len(row)] = True
    tokens, scored = tokens.to(device), scored.to(device)
    with autocast(device):
        logits = model(tokens).logits  # (N, T, vocab)
    # Position t predicts token t + 1.
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), tokens[:, 1:], reduction="none")  # (N, T-1)
    mask = scored[:, 1:]
    return torch.stack([(losses * mask).sum(1), mask.sum(1).float()], dim=1).double().cpu()


def choose_endings(sum_losses: torch.Tensor, n_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pred, pred_norm) from (E, 4) summed losses and token counts: lowest total, lowest mean per token."""
    return sum_losses.argmin(-1), (sum_losses / n_tokens).argmin(-1)


def evaluate_hellaswag(
    model: nn.Module,
    examples: list[dict],
    *,
    batch_size: int = 8,
    accelerator=None,
    device: str | torch.device | None = None,
    return_predictions: bool = False,
) -> dict:
    """Score `examples` (from `load_examples`) and return `{"acc", "acc_norm", "n"}`.

    `batch_size` counts examples per forward pass (4 rows each). With an `accelerator`, each process
    scores every `num_processes`-th example and the results are gathered, so every rank returns the
    same totals. With `return_predictions`, the result also holds `predictions`: for each example in
    order, its `ind`, `label`, `pred`, `pred_norm`, the four summed `losses` and the ending `lengths`.
    `device` defaults to the accelerator's, else the model's. Works on any causal LM whose output has
    `.logits` (ours, transformers' GPT-2).
    """
    if not examples:
        raise HellaSwagDataError("no HellaSwag examples to score")
    from data_prep.tokenizer import get_encoding

    device = resolve_device(accelerator, device, model)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    encoding, max_len = get_encoding(), max_positions(model)
    mine = list(range(rank, len(examples), world))
    # Every rank scores as many examples, so runs as many forward passes (a rank one short repeats an
    # example and drops the result): wrappers that communicate inside forward (FSDP) never wait in vain.
    per_rank = -(-len(examples) // world)  # ceil
    padded = mine + [mine[-1] if mine else 0] * (per_rank - len(mine))
    results = []
    with inference(model):
        for start in range(0, per_rank, batch_size):
            batch = padded[start : start + batch_size]
            rows, ctx_lens = [], []
            for i in batch:
                r, c = render_example(examples[i], encoding, max_len)
                rows += r
                ctx_lens += c
            scores = ending_losses(model, rows, ctx_lens, device).view(len(batch), N_ENDINGS, 2)
            for j, i in enumerate(batch):
                if start + j < len(mine):
                    results.append((i, scores[j, :, 0].tolist(), scores[j, :, 1].tolist()))
    if accelerator is not None and world > 1:
        from accelerate.utils import gather_object

        results = gather_object(results)
    results.sort(key=lambda r: r[0])
    sum_losses = torch.tensor([r[1] for r in results], dtype=torch.float64)
    n_tokens = torch.tensor([r[2] for r in results], dtype=torch.float64)
    labels = torch.tensor([examples[r[0]]["label"] for r in results])
    pred, pred_norm = choose_endings(sum_losses, n_tokens)
    out = {
        "acc": (pred == labels).double().mean().item(),
        "acc_norm": (pred_norm == labels).double().mean().item(),
        "n": len(results),
    }
    if return_predictions:
        out["predictions"] = [
            {
                "ind": examples[i].get("ind", i),
                "label": int(labels[k]),
                "pred": int(pred[k]),
                "pred_norm": int(pred_norm[k]),
                "losses": losses,
                "lengths": [int(n) for n in lengths],
            }
            for k, (i, losses, lengths) in enumerate(results)
        ]
    return out


def load_metric():
    """The project's `evaluate` metric for HellaSwag (completion style), loaded from this repository offline."""
    import evaluate

    return evaluate.load(str(METRIC_DIR))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eval.hellaswag",
        description="HellaSwag accuracy (completion style, as build-nanogpt) of a GPT-2 checkpoint.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="a model folder written by save_pretrained (ours or official GPT-2 format), or a Hub id "
        "such as openai-community/gpt2 (needs network or the Hub cache)",
    )
    parser.add_argument(
        "--data",
        default=None,
        help=f"path to hellaswag_val.jsonl (original rowanz/hellaswag format); default: {DEFAULT_CACHE}/"
        "hellaswag_val.jsonl, fetched from GitHub when missing and online",
    )
    parser.add_argument("--limit", type=int, default=None, help="score only the first N examples (default: all)")
    parser.add_argument("--batch_size", type=int, default=8, help="examples per forward pass, 4 rows each")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda, else mps, else cpu)")
    parser.add_argument("--out", default=None, help="write the results as JSON to this file")
    parser.add_argument(
        "--predictions", action="store_true", help="include per-example predictions and losses in --out"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_out_file(args.out)
    accelerator = launched_accelerator()
    device = accelerator.device if accelerator else resolve_device(device=args.device)
    examples = load_examples(args.data, limit=args.limit)
    model = load_model(args.model, device=device)
    result = evaluate_hellaswag(
        model, examples, batch_size=args.batch_size, accelerator=accelerator, device=device, return_predictions=True
    )
    if accelerator is not None and not accelerator.is_main_process:
        return
    # The headline numbers go through the shipped `evaluate` metric, as users' own pipelines would.
    metric = load_metric().compute(
        losses=[p["losses"] for p in result["predictions"]],
        lengths=[p["lengths"] for p in result["predictions"]],
        references=[p["label"] for p in result["predictions"]],
    )
    report = {"model": args.model, **metric, "n": result["n"]}
    if args.predictions:
        report["predictions"] = result["predictions"]
    if args.out:
        write_out_file(args.out, report)
    print(json.dumps({k: v for k, v in report.items() if k != "predictions"}, indent=2))


if __name__ == "__main__":
    run_command(main)
