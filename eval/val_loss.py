"""Validation loss on the val split of `data_prep` token shards: the number the trainer logs as `val/loss`.

python -m eval.val_loss --model runs/gpt2-124m/hf --data_dir data/fineweb_edu_10B --max_batches 20
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
from torch import nn

from eval.common import (
    autocast,
    check_out_file,
    inference,
    launched_accelerator,
    load_model,
    max_positions,
    resolve_device,
    write_out_file,
)
from gpt2_scratch.user_errors import UserError, run_command


def evaluate_val_loss(
    model: nn.Module,
    data_dir: str | os.PathLike,
    *,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    accelerator=None,
    device: str | torch.device | None = None,
) -> float:
    """Mean next-token cross-entropy over the val split of `data_dir`, averaged over all tokens.

    Batches come from `data_prep.iter_val_batches` (deterministic, disjoint across ranks, as many on
    each); with an `accelerator` the sums are reduced across processes, so every rank returns the same
    number. `max_batches` caps the batches of `batch_size` in the whole evaluation, split over the
    processes: the same sequences, and so the same loss, on any number of them. A missing or empty val split raises
    `data_prep.DataPrepError`. `device` defaults to the accelerator's, else the model's. Uses only the
    model's logits, so it works on ours and on transformers' GPT-2 alike.
    """
    import data_prep
    from data_prep.loader import IGNORE_INDEX

    limit = max_positions(model)
    if limit is not None and seq_len > limit:
        raise UserError(f"seq_len {seq_len} is longer than the model's {limit} positions")
    device = resolve_device(accelerator, device, model)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    batches = data_prep.iter_val_batches(
        data_dir, batch_size, seq_len, rank=rank, world_size=world, max_batches=max_batches
    )
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, number of tokens
    with inference(model):
        for x, y in batches:
            x, y = torch.as_tensor(x, device=device), torch.as_tensor(y, device=device)
            with autocast(device):
                logits = model(x).logits  # (B, T, vocab)
            # padding rows (a rank's share ran out) have IGNORE_INDEX targets, cross_entropy's default
            totals[0] += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").double()
            totals[1] += (y != IGNORE_INDEX).sum()
    if accelerator is not None and world > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    return (totals[0] / totals[1]).item()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eval.val_loss",
        description="Mean validation loss (per token) of a GPT-2 checkpoint on data_prep token shards.",
    )
    parser.add_argument(
        "--model", required=True, help="a model folder written by save_pretrained (ours or official GPT-2), or a Hub id"
    )
    parser.add_argument(
        "--data_dir", required=True, help="folder with manifest.json and the shards (python -m data_prep)"
    )
    parser.add_argument("--batch_size", type=int, default=8, help="sequences per forward pass")
    parser.add_argument(
        "--seq_len", type=int, default=1024, help="tokens per sequence (at most the model's n_positions)"
    )
    parser.add_argument(
        "--max_batches",
        type=int,
        default=None,
        help="batches in the whole evaluation, split over the processes (default: the whole split)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda, else mps, else cpu)")
    parser.add_argument("--out", default=None, help="also write the result as JSON to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_out_file(args.out)
    accelerator = launched_accelerator()
    device = accelerator.device if accelerator else resolve_device(device=args.device)
    model = load_model(args.model, device=device)
    loss = evaluate_val_loss(
        model,
        args.data_dir,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        max_batches=args.max_batches,
        accelerator=accelerator,
        device=device,
    )
    if accelerator is not None and not accelerator.is_main_process:
        return
    report = {"model": args.model, "val/loss": loss, "data_dir": str(args.data_dir), "seq_len": args.seq_len}
    if args.out:
        write_out_file(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    run_command(main)
