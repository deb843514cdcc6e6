"""Measure tokenization and loader throughput on this machine; print a table, write JSON.

Tokenization, on the same documents (tinyshakespeare's paragraphs when present, else the
built-in corpus, repeated up to --tokens):
- `single`: one process, `encode_ordinary` per document (the floor);
- `nanogpt_pool`: build-nanogpt's `fineweb.py` approach, `Pool(n).imap(tokenize, docs, chunksize=16)`
  with one uint16 array per document;
- `ours`: `data_prep.prepare.iter_encoded`, the function `python -m data_prep` uses;
- `prepare_end_to_end`: `python -m data_prep`'s whole path on a .jsonl file (read, tokenize, write shards).

Loader: `ShardLoader.next_batch()` from memory-mapped shards with torch on one thread, and
`iter_val_batches`, in batches/s and tokens/s.

    python benchmarks/bench_data.py --out runs/bench_data.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.prepare import iter_encoded, prepare  # noqa: E402
from data_prep.sources import (
    builtin_documents,  # noqa: E402
    shared_corpus,  # noqa: E402
)
from data_prep.tokenizer import EOT_ID, get_encoding  # noqa: E402
from user_errors import check_at_least, run_command  # noqa: E402

SHAKESPEARE = shared_corpus("tinyshakespeare.txt")


def nanogpt_tokenize(doc: str) -> np.ndarray:
    """build-nanogpt's `tokenize`: EOT, then the document, as uint16."""
    tokens = [EOT_ID, *get_encoding().encode_ordinary(doc)]
    return np.array(tokens).astype(np.uint16)


def load_documents(target_tokens: int) -> tuple[str, list[str]]:
    """The benchmark documents, repeated until they hold about `target_tokens` tokens."""
    if SHAKESPEARE.is_file():
        name, docs = "tinyshakespeare paragraphs", [p for p in SHAKESPEARE.read_text().split("\n\n") if p]
    else:
        name, docs = "built-in corpus", builtin_documents()
    enc = get_encoding()
    tokens = sum(len(enc.encode_ordinary(d)) + 1 for d in docs)
    return name, docs * max(1, round(target_tokens / tokens))


def timed(fn, repeats: int) -> tuple[float, object]:
    """Best wall time over `repeats` runs (the least disturbed by other processes) and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def bench_tokenize(docs: list[str], num_proc: int, batch_docs: int, repeats: int) -> list[dict]:
    enc = get_encoding()

    def single() -> int:
        return sum(len(enc.encode_ordinary(d)) + 1 for d in docs)

    def nanogpt_pool() -> int:
        with multiprocessing.get_context("fork").Pool(num_proc) as pool:
            return sum(len(t) for t in pool.imap(nanogpt_tokenize, docs, chunksize=16))

    def ours() -> int:
        batches = (docs[i : i + batch_docs] for i in range(0, len(docs), batch_docs))
        return sum(len(tokens) for tokens, _ in iter_encoded(batches, num_proc))

    rows = []
    for name, fn, procs in (("single", single, 1), ("nanogpt_pool", nanogpt_pool, num_proc), ("ours", ours, num_proc)):
        seconds, tokens = timed(fn, repeats)
        rows.append({"bench": f"tokenize/{name}", "procs": procs, "tokens": tokens, "seconds": seconds})
    return rows


def bench_prepare(docs: list[str], work: Path, num_proc: int, batch_docs: int, repeats: int) -> dict:
    src = work / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))

    def run() -> int:
        out = work / f"prep_{time.perf_counter_ns()}"
        prepare(out, files=[str(src)], shard_tokens=1_000_000, num_proc=num_proc, batch_docs=batch_docs)
        return json.loads((out / "manifest.json").read_text())["tokens"]

    seconds, tokens = timed(run, repeats)
    return {"bench": "tokenize/prepare_end_to_end", "procs": num_proc, "tokens": tokens, "seconds": seconds}


def bench_loader(work: Path, shapes: list[tuple[int, int]], steps: int) -> list[dict]:
    import torch

    from data_prep import ShardLoader, iter_val_batches

    torch.set_num_threads(1)
    data_dir = sorted(work.glob("prep_*"))[0]
    rows = []
    for batch_size, seq_len in shapes:
        loader = ShardLoader(data_dir, batch_size=batch_size, seq_len=seq_len)
        loader.next_batch()  # first touch: sha256 check and page-in of the first shard
        t0 = time.perf_counter()
        for _ in range(steps):
            loader.next_batch()
        seconds = time.perf_counter() - t0
        rows.append(
            {"bench": f"loader/train B={batch_size} T={seq_len}", "procs": 1, "batches": steps, "seconds": seconds}
        )
        rows[-1]["tokens"] = steps * batch_size * seq_len
        val = iter_val_batches(data_dir, batch_size, seq_len)
        t0 = time.perf_counter()
        count = sum(1 for _ in val)
        seconds = time.perf_counter() - t0
        rows.append(
            {
                "bench": f"loader/val B={batch_size} T={seq_len}",
                "procs": 1,
                "batches": count,
                "tokens": count * batch_size * seq_len,
                "seconds": seconds,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=3_000_000, help="about this many tokens per tokenization run")
    parser.add_argument("--num_proc", type=int, default=os.cpu_count(), help="worker processes for the pool methods")
    parser.add_argument("--batch_docs", type=int, default=256, help="documents per task for `ours`")
    parser.add_argument("--repeats", type=int, default=3, help="runs per tokenization method; the best is kept")
    parser.add_argument("--steps", type=int, default=1000, help="loader batches timed per shape")
    parser.add_argument("--out", default="runs/bench_data.json", help="JSON file for the results")
    args = parser.parse_args(argv)
    flags = {f"--{name}": value for name, value in vars(args).items()}
    check_at_least(flags, dict.fromkeys(("--tokens", "--num_proc", "--batch_docs", "--repeats", "--steps"), 1))

    corpus, docs = load_documents(args.tokens)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = bench_tokenize(docs, args.num_proc, args.batch_docs, args.repeats)
        rows.append(bench_prepare(docs, work, args.num_proc, args.batch_docs, args.repeats))
        rows += bench_loader(work, [(8, 1024), (64, 1024)], args.steps)

    print(f"corpus: {corpus}, {len(docs):,} documents; {os.cpu_count()} cores; load avg {os.getloadavg()[0]:.2f}")
    print(f"{'benchmark':<32} {'procs':>5} {'tokens':>11} {'seconds':>8} {'tokens/s':>12} {'batches/s':>10}")
    for row in rows:
        row["tokens_per_s"] = row["tokens"] / row["seconds"]
        if "batches" in row:
            row["batches_per_s"] = row["batches"] / row["seconds"]
        batches = f"{row['batches_per_s']:>10,.0f}" if "batches" in row else f"{'':>10}"
        print(
            f"{row['bench']:<32} {row['procs']:>5} {row['tokens']:>11,} {row['seconds']:>8.2f} "
            f"{row['tokens_per_s']:>12,.0f} {batches}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "corpus": corpus,
        "documents": len(docs),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "args": vars(args),
        "results": rows,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_command(main)
