"""`python -m data_prep`: tokenize FineWeb-Edu, local files or the built-in corpus into shards."""

from __future__ import annotations

import argparse

from data_prep.prepare import BUILTIN_SHARD_TOKENS, DEFAULT_BATCH_DOCS, DEFAULT_SHARD_TOKENS, prepare
from data_prep.shards import read_manifest, verify_shards
from data_prep.sources import DEFAULT_CONFIG, DEFAULT_DATASET, ENCODING_ERRORS, TXT_SAMPLE_BY
from gpt2_scratch.user_errors import run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep",
        description=(
            "Tokenize documents with GPT-2 BPE into shards of uint16 tokens plus a manifest.json. Every document "
            "is preceded by <|endoftext|> (50256); the shards, in manifest order, are exactly that stream. Shard 0 "
            "is the validation split. Re-running with the same arguments resumes or, when complete, does nothing."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = parser.add_argument_group("source (one of: Hub dataset (default), --files, --builtin)")
    source.add_argument("--dataset", default=DEFAULT_DATASET, help="Hub dataset id, streamed (needs network)")
    source.add_argument("--config", "--name", dest="config", default=DEFAULT_CONFIG, help="Hub dataset config name")
    source.add_argument("--split", default="train", help="Hub dataset split to read")
    source.add_argument(
        "--files",
        nargs="+",
        metavar="GLOB",
        help="local files instead of the Hub, all .txt, all .jsonl/.json or all .parquet; globs allowed (quote them)",
    )
    source.add_argument("--text_column", default="text", help="column holding the document text (.jsonl/.parquet/Hub)")
    source.add_argument(
        "--txt_sample_by",
        choices=TXT_SAMPLE_BY,
        default="document",
        help=".txt files: one document per file, per blank-line-separated paragraph, or per line",
    )
    source.add_argument(
        "--encoding_errors",
        choices=ENCODING_ERRORS,
        default="strict",
        help=".txt/.jsonl files: a byte that is not UTF-8 stops with its file and offset (strict), becomes U+FFFD "
        "(replace) or is dropped (ignore)",
    )
    source.add_argument(
        "--builtin",
        action="store_true",
        help="the offline built-in corpus (Python's own documentation, ~340k tokens)",
    )
    source.add_argument("--max_docs", type=int, help="stop after this many documents (a quick sample)")
    out = parser.add_argument_group("output")
    out.add_argument("--out_dir", default=None, help="output folder [default: data/fineweb-edu-10BT, data/builtin]")
    out.add_argument(
        "--shard_tokens",
        type=int,
        default=None,
        help=f"tokens per shard [default: {DEFAULT_SHARD_TOKENS:,}; {BUILTIN_SHARD_TOKENS:,} with --builtin]",
    )
    out.add_argument("--val_tokens", type=int, help="tokens in the val shard (shard 0) [default: --shard_tokens]")
    out.add_argument("--overwrite", action="store_true", help="replace an out_dir made from another source/layout")
    out.add_argument("--verify", action="store_true", help="only check an existing out_dir's shards (sha256) and exit")
    publish = parser.add_argument_group("publish (shards first, manifest.json last; an interrupted upload resumes)")
    publish.add_argument(
        "--upload",
        metavar="URL",
        help="only upload an existing out_dir to URL (hf://datasets/user/name[@branch][/dir], s3://, gs://, file://) "
        "and exit; train on it with --data_dir URL",
    )
    publish.add_argument(
        "--push_to_hub",
        metavar="USER/NAME",
        help="after making the shards, upload them to the Hub dataset repository USER/NAME (private unless --public)",
    )
    publish.add_argument("--public", action="store_true", help="create the Hub dataset repository as public")
    run = parser.add_argument_group("speed")
    run.add_argument("--num_proc", type=int, default=None, help="tokenizer processes [default: all cores]")
    run.add_argument("--batch_docs", type=int, default=DEFAULT_BATCH_DOCS, help="documents per tokenizer task")
    run.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out_dir = args.out_dir or ("data/builtin" if args.builtin and not args.files else "data/fineweb-edu-10BT")
    if args.verify:
        totals = verify_shards(out_dir)
        print(f"{out_dir}: all shards match manifest.json; tokens {totals}")
        return 0
    if args.upload:
        return upload(out_dir, args.upload, private=not args.public)
    default_shard = BUILTIN_SHARD_TOKENS if args.builtin and not args.files else DEFAULT_SHARD_TOKENS
    prepare(
        out_dir,
        dataset=args.dataset,
        config=args.config,
        split=args.split,
        files=args.files,
        builtin=args.builtin,
        text_column=args.text_column,
        txt_sample_by=args.txt_sample_by,
        encoding_errors=args.encoding_errors,
        shard_tokens=args.shard_tokens or default_shard,
        val_tokens=args.val_tokens,
        max_docs=args.max_docs,
        num_proc=args.num_proc,
        batch_docs=args.batch_docs,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    manifest = read_manifest(out_dir)
    splits = {"val": 0, "train": 0}
    for entry in manifest["shards"]:
        splits[entry["split"]] += entry["tokens"]
    print(
        f"{out_dir}: {len(manifest['shards'])} shards, {manifest['documents']:,} documents, "
        f"{splits['val']:,} val + {splits['train']:,} train tokens"
    )
    if args.push_to_hub:
        return upload(out_dir, f"hf://datasets/{args.push_to_hub}", private=not args.public)
    return 0


def upload(out_dir: str, url: str, private: bool) -> int:
    from data_prep.store import upload_folder

    sent = upload_folder(out_dir, url, private=private)
    print(f"{out_dir} -> {url}: sent {len(sent)} files (the others were there); train on it with --data_dir {url}")
    return 0


if __name__ == "__main__":
    run_command(main)
