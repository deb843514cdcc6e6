"""Measure a data mixture (`--data_mix`): the realised fraction of each source, and the loader's cost per step.

Fractions: `MixtureLoader` over synthetic shard folders whose tokens tell their source, 200 steps of
`--sequences` sequences each: the realised fractions and their largest gap from the weights after 200
steps, next to the spread (one standard deviation, `sqrt(w (1 - w) / n)`) that drawing each sequence's
source independently at random would have there; and the largest gap in sequences, `|count - w n|`,
after any step.

Cost: a step of GPT-2 124M's shape on one process (`--batch_size` sequences of 1024 tokens per
micro-batch, 512 sequences per step, as `configs/gpt2-124m-fineweb-edu.yaml`) drawn by a `ShardLoader`
from one folder and by a two-source `MixtureLoader`, interleaved, best of `--repeats`; the mixture reads
every sequence of the step on each rank, so its cost per rank does not shrink with more processes.

    python benchmarks/bench_mix.py --out runs/bench_mix.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.loader import ShardLoader  # noqa: E402
from data_prep.mixture import MixtureLoader  # noqa: E402
from data_prep.shards import write_manifest, write_shard  # noqa: E402
from gpt2_scratch.user_errors import check_at_least, run_command  # noqa: E402

WEIGHTS = [(0.7, 0.3), (1 / 3, 1 / 3, 1 / 3), (0.9, 0.09, 0.01), (0.613, 0.387)]


def token_folder(folder: Path, first: int, tokens: int) -> Path:
    """A shard folder (one val, one train shard) whose token ids are `first + [0, 1000)`."""
    folder.mkdir(parents=True)
    entries = []
    for split, count in (("val", 1000), ("train", tokens)):
        name = f"{split}_000000.bin"
        data = (first + np.arange(count) % 1000).astype(np.uint16)
        entries.append({"file": name, "split": split, "tokens": count, "sha256": write_shard(folder / name, data)})
    source = {"kind": "synthetic", "name": folder.name}
    write_manifest(folder, {"format_version": 1, "tokenizer": "gpt2", "source": source, "shards": entries})
    return folder


def mixture(folders, weights, batch_size, seq_len, per_step, rank=0, world_size=1) -> MixtureLoader:
    loaders = [ShardLoader(f, batch_size=1, seq_len=seq_len) for f in folders]
    sources = [(f.name, w, loader) for f, w, loader in zip(folders, weights, loaders, strict=True)]
    return MixtureLoader(sources, batch_size, seq_len, rank, world_size, sequences_per_step=per_step)


def fractions(folders, weights, per_step: int, steps: int = 200) -> dict:
    loader = mixture(folders[: len(weights)], weights, batch_size=per_step, seq_len=8, per_step=per_step)
    counts, worst = np.zeros(len(weights)), 0.0
    for _ in range(steps):
        x, _ = loader.next_batch()
        counts += np.bincount(x[:, 0].numpy() // 1000 - 1, minlength=len(weights))
        worst = max(worst, float(np.abs(counts - np.array(weights) * counts.sum()).max()))
    n = steps * per_step
    final = (counts / n).round(5).tolist()
    iid = max(math.sqrt(w * (1 - w) / n) for w in weights)
    return {
        "weights": list(weights),
        "sequences_per_step": per_step,
        "realised_after_200_steps": final,
        "largest_gap_after_200": float(np.abs(counts / n - weights).max()),
        "iid_one_sigma_after_200": iid,
        "largest_gap_in_sequences_any_step": worst,
    }


def step_seconds(make, micro_steps: int, steps: int = 4) -> float:
    """Seconds per step of `micro_steps` batches, over `steps` steps after one to warm up."""
    loader = make()
    for _ in range(micro_steps):  # warm: shards mapped
        loader.next_batch()
    start = time.perf_counter()
    for _ in range(steps * micro_steps):
        loader.next_batch()
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, nargs="+", default=[16, 512], help="sequences per step to measure")
    parser.add_argument("--batch_size", type=int, default=8, help="micro-batch of the cost measurement")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the cost measurement")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    check_at_least({"--batch_size": args.batch_size, "--repeats": args.repeats}, {"--batch_size": 1, "--repeats": 1})
    import torch

    torch.set_num_threads(1)
    results: dict = {"cpu": platform.processor() or platform.machine(), "load_average": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        folders = [token_folder(Path(tmp) / f"s{i}", 1000 * (i + 1), 4_000_000) for i in range(3)]
        results["fractions"] = [fractions(folders, w, n) for w in WEIGHTS for n in args.sequences]
        for row in results["fractions"]:
            print(json.dumps(row))
        per_step, seq_len = 512, 1024
        micro = per_step // args.batch_size
        makers = {  # what one rank reads per step: all 512 sequences on one process, 64 of them on 8
            "shard_loader": (lambda: ShardLoader(folders[0], batch_size=args.batch_size, seq_len=seq_len), micro),
            "mixture_2_sources": (lambda: mixture(folders[:2], (0.7, 0.3), args.batch_size, seq_len, per_step), micro),
            "mixture_2_sources_rank_0_of_8": (
                lambda: mixture(folders[:2], (0.7, 0.3), args.batch_size, seq_len, per_step, rank=0, world_size=8),
                micro // 8,
            ),
        }
        times = {name: [] for name in makers}
        for _ in range(args.repeats):
            for name, (make, micro_steps) in makers.items():
                times[name].append(step_seconds(make, micro_steps))
        results["step_seconds_best"] = {name: min(t) for name, t in times.items()}
        print(json.dumps({"step_seconds_best": results["step_seconds_best"], "all": times}))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    run_command(main)
