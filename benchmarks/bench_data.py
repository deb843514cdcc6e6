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

Remote shards (`--remote`, instead of the above): the default training run (`python train_accelerate.py`,
the cpu-micro model on the built-in corpus) reading its shards from the local folder, and the same run
with `--data_dir s3://...` reading the same shards from moto's S3 server on 127.0.0.1 through the cache
(`--data_cache_gb`), the runs interleaved. Steps/s count each step's time including any wait for a
shard (log.jsonl's step_time plus data_wait_s); "cached" leaves out step 1, which waits for the first
training shard. The cache folder's size is sampled every 5 ms during each remote run; its peak is reported.

    python benchmarks/bench_data.py --remote --repeats 2 --out runs/bench_data_remote.json

Streams (`--stream`, instead of the above): `data_prep.stream.StreamLoader` on a .jsonl of the benchmark
documents, in tokens/s with one tokenizing worker process and with none (the reader's thread), and the
workers one rank needs to feed GPT-2 124M on one H100 at 50% MFU (about 575K tokens/s) and on 8; the time
a resume takes to reach a position `--resume_docs` documents into a .jsonl, and into a Parquet file of the
same documents read per row group (10,000 documents each) and per file; and the
default training run (`python train_accelerate.py`) on its shards and with `--data_stream builtin` (the
same documents, tokenized on the fly), the runs interleaved, in steps/s (log.jsonl's step_time).

    nice -n 19 env OMP_NUM_THREADS=1 python benchmarks/bench_data.py --stream --repeats 2
"""

from __future__ import annotations

import argparse
import json
import logging
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
from gpt2_scratch.user_errors import check_at_least, run_command  # noqa: E402

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
        name, docs = "built-in corpus", list(builtin_documents())
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


def run_steps(out_dir: Path) -> tuple[list[float], float]:
    """Each training step's seconds, waits for shards included, and the waits' sum, from a run's log."""
    records = [r for r in (json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines())]
    train = [r for r in records if "train/loss" in r]
    steps = [r["step_time"] + r.get("data_wait_s", 0.0) for r in train]  # log_interval 1: one step per record
    return steps, sum(r.get("data_wait_s", 0.0) for r in train)


def folder_size(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*.bin*") if folder.is_dir() else ():
        try:
            total += path.stat().st_size
        except FileNotFoundError:
            pass
    return total


def bench_remote(work: Path, repeats: int, cache_gb: float, max_steps: int) -> list[dict]:
    """The default run on local shards and on the same shards via an S3 server on loopback, interleaved."""
    import subprocess
    import threading

    import fsspec
    from moto.server import ThreadedMotoServer

    from data_prep import prepare_builtin

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's line per request
    data = prepare_builtin(work / "builtin")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FSSPEC_S3_ENDPOINT_URL": f"http://{host}:{port}",
    }
    fs = fsspec.filesystem("s3", endpoint_url=env["FSSPEC_S3_ENDPOINT_URL"], key="bench", secret="bench")
    fs.mkdir("bench")
    for path in sorted(data.iterdir()):
        fs.put_file(str(path), f"bench/builtin/{path.name}")
    root = Path(__file__).resolve().parents[1]
    common = ["--log_interval", "1", "--report_to", "none", "--max_steps", str(max_steps), "--hellaswag_path", "none"]
    rows = []
    try:
        for repeat in range(repeats):
            for where, data_dir in (("local", str(data)), ("s3", "s3://bench/builtin")):
                out = work / f"{where}_{repeat}"
                cache = work / f"cache_{repeat}"
                argv = [sys.executable, str(root / "train_accelerate.py"), "--data_dir", data_dir]
                argv += ["--out_dir", str(out), *common]
                argv += ["--data_cache_dir", str(cache), "--data_cache_gb", str(cache_gb)]
                peak, done = [0], threading.Event()

                def sample(cache=cache, peak=peak, done=done) -> None:
                    while not done.is_set():
                        peak[0] = max(peak[0], folder_size(cache))
                        time.sleep(0.005)

                sampler = threading.Thread(target=sample)
                sampler.start()
                t0 = time.perf_counter()
                result = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                done.set()
                sampler.join()
                if result.returncode != 0:
                    raise RuntimeError(f"{where} run failed:\n{result.stderr[-3000:]}")
                steps, waited = run_steps(out)
                rows.append(
                    {
                        "bench": f"train/{where}",
                        "repeat": repeat,
                        "steps": len(steps),
                        "steps_per_s": len(steps) / sum(steps),
                        "steps_per_s_cached": (len(steps) - 1) / sum(steps[1:]),  # step 1 waits for shard 1
                        "data_wait_s": waited,
                        "run_wall_s": wall,
                        "cache_peak_bytes": peak[0] if where == "s3" else None,
                        "cache_limit_bytes": int(cache_gb * 1e9) if where == "s3" else None,
                    }
                )
                print(json.dumps(rows[-1]))
    finally:
        server.stop()
    return rows


H100_TOKENS_PER_S = 575_000  # GPT-2 124M on one H100 at 50% MFU (docs/data.md)


def bench_stream(docs: list[str], work: Path, batches: int) -> list[dict]:
    """Tokens/s of a StreamLoader (seq_len 1024, batch 8) with one worker process and with none."""
    from data_prep.stream import StreamLoader, StreamSpec

    src = work / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    start = {"block_doc": 0, "source_state": None, "doc": 0, "offset": 0}
    rows = []
    for workers in (1, 0):
        loader = StreamLoader(StreamSpec(str(src)), start, batch_size=8, seq_len=1024, workers=workers)
        loader.next_batch()  # the workers started, the first block read
        t0 = time.perf_counter()
        for _ in range(batches):
            loader.next_batch()
        seconds = time.perf_counter() - t0
        loader.close()
        rows.append(
            {"bench": f"stream/workers={workers}", "procs": workers, "tokens": batches * 8 * 1024, "seconds": seconds}
        )
        print(f"stream, {workers} workers: {batches * 8 * 1024 / seconds:,.0f} tokens/s", flush=True)
    return rows


RESUME_ROW_GROUP = 10_000  # documents per Parquet row group in the resume benchmark


def bench_stream_resume(work: Path, docs: int, chars: int = 0) -> list[dict]:
    """Seconds from `load_state_dict` of a position `docs` documents into a file to the first batch: a
    .jsonl, and the same documents as Parquet, read per row group (how a stream opens it) and per file
    (how positions saved before row groups are read). `chars`: each document padded to about this many
    characters with varied words (0: short documents of about 75 characters)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_prep.stream import DEFAULT_BLOCK_DOCS

    words = [f"w{n:x}" for n in range(4096)]
    texts = [
        f"Document {i}: a short text about the number {i}, for the resume benchmark."
        + "".join(f" {words[(i * 7919 + k * 104729) % 4096]}" for k in range(chars // 5))
        for i in range(docs + 10 * DEFAULT_BLOCK_DOCS)
    ]
    jsonl, parquet = work / "many.jsonl", work / "many.parquet"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    pq.write_table(pa.table({"text": texts}), parquet, row_group_size=RESUME_ROW_GROUP)
    del texts
    cases = (("jsonl", jsonl, True), ("parquet/row-groups", parquet, True), ("parquet/per-file", parquet, False))
    return [resume_seconds(name, path, docs, row_groups) for name, path, row_groups in cases]


def resume_seconds(name: str, path: Path, docs: int, row_groups: bool) -> dict:
    from data_prep.stream import DEFAULT_BLOCK_DOCS, StreamLoader, StreamSpec

    block_doc = docs // DEFAULT_BLOCK_DOCS * DEFAULT_BLOCK_DOCS
    spec = StreamSpec(str(path))
    dataset = spec.open(row_groups=row_groups).dataset  # the stream's own reader, whose state a checkpoint holds
    batches = dataset.iter(batch_size=DEFAULT_BLOCK_DOCS)
    for _ in range(block_doc // DEFAULT_BLOCK_DOCS):
        next(batches)
    position = {"epoch": 0, "block_doc": block_doc, "source_state": dataset.state_dict(), "doc": docs, "offset": 3}
    position["row_groups"] = row_groups
    loader = StreamLoader(spec, {**position, "doc": 0, "offset": 0}, batch_size=1, seq_len=64, workers=1)
    state = {**loader.state_dict(), "ranks": [position]}
    t0 = time.perf_counter()
    loader.load_state_dict(state)
    loader.next_batch()
    seconds = time.perf_counter() - t0
    loader.close()
    print(f"resume at document {docs:,} of a {name}: {seconds:.2f} s", flush=True)
    return {"bench": f"stream/resume/{name}", "documents": docs, "bytes": path.stat().st_size, "seconds": seconds}


def bench_default_run(work: Path, repeats: int, max_steps: int) -> list[dict]:
    """`python train_accelerate.py` on the built-in corpus's shards and streamed, interleaved: steps/s."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    common = ["--log_interval", "1", "--report_to", "none", "--hellaswag_path", "none", "--max_steps", str(max_steps)]
    runs = (
        ("shards", ["--data_dir", str(work / "builtin"), "--prepare_builtin", "true"]),
        ("stream", ["--data_stream", "builtin"]),
    )
    rows = []
    for repeat in range(repeats):
        for name, data in runs:
            out = work / f"{name}_{repeat}"
            cmd = [sys.executable, str(root / "train_accelerate.py"), *common, *data, "--out_dir", str(out)]
            subprocess.run(cmd, cwd=root, check=True, capture_output=True)
            steps, _ = run_steps(out)
            rate, after_first = len(steps) / sum(steps), (len(steps) - 1) / sum(steps[1:])
            rows.append({"bench": f"train/{name}", "repeat": repeat, "steps_per_s": rate, "after_step_1": after_first})
            print(f"{name} run {repeat}: {rate:.3f} steps/s, {after_first:.3f} after step 1", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=3_000_000, help="about this many tokens per tokenization run")
    parser.add_argument("--num_proc", type=int, default=os.cpu_count(), help="worker processes for the pool methods")
    parser.add_argument("--batch_docs", type=int, default=256, help="documents per task for `ours`")
    parser.add_argument("--repeats", type=int, default=3, help="runs per tokenization method; the best is kept")
    parser.add_argument("--steps", type=int, default=1000, help="loader batches timed per shape")
    parser.add_argument("--out", default="runs/bench_data.json", help="JSON file for the results")
    parser.add_argument("--remote", action="store_true", help="only the local vs S3 (loopback) training comparison")
    parser.add_argument("--data_cache_gb", type=float, default=0.0004, help="--remote: the run's cache limit")
    parser.add_argument(
        "--max_steps",
        type=int,
        default=80,
        help="--remote, --stream: steps of each training run (80: the default run's)",
    )
    parser.add_argument("--stream", action="store_true", help="only the data_stream measurements")
    parser.add_argument("--resume_docs", type=int, default=1_000_000, help="--stream: documents before the resume")
    parser.add_argument(
        "--resume_doc_chars", type=int, default=0, help="--stream: characters per resume document (0: about 75)"
    )
    args = parser.parse_args(argv)
    flags = {f"--{name}": value for name, value in vars(args).items()}
    check_at_least(flags, dict.fromkeys(("--tokens", "--num_proc", "--batch_docs", "--repeats", "--steps"), 1))
    check_at_least(flags, {"--resume_doc_chars": 0})
    if args.remote:
        with tempfile.TemporaryDirectory() as tmp:
            rows = bench_remote(Path(tmp), args.repeats, args.data_cache_gb, args.max_steps)
        for where in ("local", "s3"):
            mine = [r for r in rows if r["bench"] == f"train/{where}"]
            print(
                f"{where:>6}: steps/s {max(r['steps_per_s'] for r in mine):.2f} (best of {len(mine)}), cached "
                f"{max(r['steps_per_s_cached'] for r in mine):.2f}, waited {min(r['data_wait_s'] for r in mine):.3f}s"
            )
        peaks = [r["cache_peak_bytes"] for r in rows if r["cache_peak_bytes"] is not None]
        print(f"cache peak {max(peaks):,} bytes, limit {int(args.data_cache_gb * 1e9):,}")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {"cpu_count": os.cpu_count(), "python": platform.python_version(), "args": vars(args), "results": rows}
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {out}")
        return 0

    if args.stream:
        return report_stream(args)
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


def report_stream(args: argparse.Namespace) -> int:
    import math

    corpus, docs = load_documents(args.tokens)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = bench_stream(docs, work, max(1, args.tokens // 8192))
        rows += bench_stream_resume(work, args.resume_docs, args.resume_doc_chars)
        rows += bench_default_run(work, args.repeats, args.max_steps)
    print(f"corpus: {corpus}, {len(docs):,} documents; {os.cpu_count()} cores; load avg {os.getloadavg()[0]:.2f}")
    for row in rows:
        if "tokens" in row:
            row["tokens_per_s"] = row["tokens"] / row["seconds"]
            print(f"{row['bench']:<20} {row['tokens_per_s']:>12,.0f} tokens/s")
    per_worker = next(r["tokens_per_s"] for r in rows if r["bench"] == "stream/workers=1")
    for gpus in (1, 8):
        need = math.ceil(gpus * H100_TOKENS_PER_S / per_worker)
        print(
            f"workers for {gpus} H100 ({gpus * H100_TOKENS_PER_S:,} tokens/s): {need}, "
            f"{math.ceil(need / gpus)} per rank"
        )
    for resume in (r for r in rows if r["bench"].startswith("stream/resume/")):
        name, size = resume["bench"].removeprefix("stream/resume/"), resume["bytes"]
        print(f"resume at document {resume['documents']:,} of a {name} ({size:,} bytes): {resume['seconds']:.2f} s")
    train = {name: [r["steps_per_s"] for r in rows if r["bench"] == f"train/{name}"] for name in ("shards", "stream")}
    later = {name: [r["after_step_1"] for r in rows if r["bench"] == f"train/{name}"] for name in ("shards", "stream")}
    print(f"after step 1: ratio of the means {np.mean(later['stream']) / np.mean(later['shards']):.3f}")
    print(
        f"default run steps/s: shards {train['shards']}, stream {train['stream']}; ratio of the means "
        f"{np.mean(train['stream']) / np.mean(train['shards']):.3f}"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"corpus": corpus, "args": vars(args), "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_command(main)
