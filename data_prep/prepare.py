"""Tokenize a document stream into fixed-size shards, restartably.

The concatenation of all shards, in manifest order, is exactly the document stream in dataset
order with 50256 (`<|endoftext|>`) before every document. Documents run across shard boundaries.
Shard 0 is the validation split (`val_tokens` tokens, or `shard_tokens` by default, as in
build-nanogpt); the rest are training shards of `shard_tokens` tokens, the last one shorter.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.shards import (
    MANIFEST_FORMAT_VERSION,
    MANIFEST_NAME,
    MAX_SHARD_TOKENS,
    TOKEN_DTYPE,
    TOKENIZER_NAME,
    DataPrepError,
    ShardError,
    check_shard,
    read_manifest,
    write_manifest,
    write_shard,
)
from data_prep.sources import (
    DEFAULT_CONFIG,
    DEFAULT_DATASET,
    Source,
    builtin_source,
    hub_source,
    local_source,
    undecodable,
    undecodable_file,
)
from data_prep.tokenizer import EOT_ID, encode_pieces, get_encoding

DEFAULT_SHARD_TOKENS = 100_000_000
# The built-in corpus is ~340k tokens: small shards give a val shard and several train shards.
BUILTIN_SHARD_TOKENS = 65_536
# Documents per task sent to a worker: large enough to amortize pickling, small enough to
# keep every worker busy and the in-flight text small.
DEFAULT_BATCH_DOCS = 256
# Tasks in flight per worker; bounds memory when the source is faster than tokenizing.
TASKS_PER_WORKER = 4


def encode_documents(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize documents: ([EOT, *doc0, EOT, *doc1, ...] as uint16, tokens per document incl. its EOT).

    A long document is encoded in pieces (`encode_pieces`: the same tokens as whole), each piece's tokens
    copied into the result and let go, so that besides its text it needs its tokens twice at 2 bytes
    each, never all of them as Python ints (~36 bytes a token, about 9 times English text)."""
    encoded = [encode_pieces(text) for text in texts]
    lengths = np.fromiter((sum(map(len, pieces)) + 1 for pieces in encoded), dtype=np.int64, count=len(encoded))
    tokens = np.empty(int(lengths.sum()), dtype=TOKEN_DTYPE)
    starts = np.cumsum(lengths) - lengths
    tokens[starts] = EOT_ID
    for start, pieces in zip(starts.tolist(), encoded, strict=True):
        at = start + 1
        while pieces:
            piece = pieces.pop(0)
            tokens[at : at + len(piece)] = piece
            at += len(piece)
    return tokens, lengths


def iter_text_batches(source: Source, start_doc: int, max_docs: int | None, batch_docs: int) -> Iterator[list[str]]:
    """Lists of document texts from `source`, from document `start_doc` up to `max_docs` in all."""
    dataset = source.dataset
    if start_doc:
        dataset = dataset.skip(start_doc)
    if max_docs is not None:
        dataset = dataset.take(max(0, max_docs - start_doc))
    doc = start_doc
    batches = dataset.iter(batch_size=batch_docs)
    while (texts := next_texts(source, batches, doc)) is not None:
        doc += len(texts)
        yield texts


def next_texts(source: Source, batches: Iterator[dict[str, list]], doc: int) -> list[str] | None:
    """The texts of the next batch of `batches` (read from `source`, its first document number `doc`), or
    None at the end; a file that is not UTF-8 text or not JSON, a missing text column or a text that is not a
    string is a one-line `DataPrepError`."""
    import pyarrow as pa

    try:
        batch = next(batches, None)
    except UnicodeDecodeError as err:
        raise undecodable(source.description, err) from err
    except pa.ArrowInvalid as err:  # pyarrow's JSON reader meets bytes (binary, or not UTF-8) it cannot parse
        raise unreadable(source.description, err) from err
    if batch is None:
        return None
    if source.text_column not in batch:
        raise DataPrepError(
            f"text column {source.text_column!r} not found in {describe(source.description)}; "
            f"columns: {sorted(batch)}. Pass --text_column"
        )
    texts = batch[source.text_column]
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataPrepError(
                f"document {doc + i} of {describe(source.description)}: column {source.text_column!r} holds "
                f"{type(text).__name__}, expected str"
            )
    return texts


def unreadable(description: dict[str, Any], err: Exception) -> DataPrepError:
    """The one-line error for files pyarrow cannot parse: the first one that is not UTF-8 (a binary file),
    else the parser's own message."""
    return undecodable_file(description) or DataPrepError(f"{describe(description)} cannot be parsed: {err}")


def iter_encoded(batches: Iterator[list[str]], num_proc: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`encode_documents` over `batches`, in order, on `num_proc` worker processes.

    A bounded window of `apply_async` tasks instead of `Pool.imap`, because imap's feeder thread
    drains the whole (streamed, possibly 50 GB) source into memory ahead of the workers.
    """
    if num_proc <= 1:
        yield from map(encode_documents, batches)
        return
    get_encoding()  # build once here; forked workers inherit it, spawned ones build their own
    with multiprocessing.get_context(start_method()).Pool(num_proc) as pool:
        pending: collections.deque = collections.deque()
        for texts in batches:
            pending.append(pool.apply_async(encode_documents, (texts,)))
            if len(pending) >= num_proc * TASKS_PER_WORKER:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def start_method() -> str:
    """How worker processes start: `fork` on Linux (cheap, and the encoding is inherited); `spawn` elsewhere,
    Python's default on macOS and Windows (macOS has fork, but forking a process that already runs threads,
    as pyarrow and tiktoken start, can crash or hang there). The workers need nothing from the parent but
    the importable `encode_documents`, so both give the same shards (tests/test_data_prep.py)."""
    return "fork" if sys.platform.startswith("linux") else "spawn"


def describe(description: dict[str, Any]) -> str:
    """A short human name for a source description."""
    if description["kind"] == "hub":
        return f"{description['dataset']} ({description['config']}, split {description['split']})"
    if description["kind"] == "files":
        names = [f["path"] for f in description["files"]]
        return names[0] if len(names) == 1 else f"{len(names)} files ({names[0]}, ...)"
    return f"the built-in corpus {description['name']}"


class ShardWriter:
    """Cuts the token stream into shards and keeps the manifest current after each one.

    It tracks the stream position as (document index, tokens of that document already written)
    so that a restarted run can skip straight to the first unwritten token.
    """

    def __init__(self, out_dir: Path, manifest: dict[str, Any], shard_tokens: int, val_tokens: int) -> None:
        self.out_dir = out_dir
        self.manifest = manifest
        self.shard_tokens = shard_tokens
        self.val_tokens = val_tokens
        resume = manifest["resume"]
        self.doc, self.offset = resume["doc"], resume["offset"]  # position of the next token
        self.buffer = np.empty(self.capacity(), dtype=TOKEN_DTYPE)
        self.filled = 0
        self.shard_start = (self.doc, self.offset)

    def capacity(self) -> int:
        return self.val_tokens if len(self.manifest["shards"]) == 0 else self.shard_tokens

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append one encoded batch; `tokens` starts at document `self.doc` token `self.offset`."""
        # Batch coordinates: the batch's token 0 is token `self.offset` of its first document.
        tokens = tokens[self.offset :]
        doc_ends = np.cumsum(lengths) - self.offset
        first_doc, pos = self.doc, 0
        while pos < len(tokens):
            take = min(len(self.buffer) - self.filled, len(tokens) - pos)
            self.buffer[self.filled : self.filled + take] = tokens[pos : pos + take]
            self.filled += take
            pos += take
            k = int(np.searchsorted(doc_ends, pos, side="right"))  # document holding token `pos`
            if k < len(lengths):
                self.doc, self.offset = first_doc + k, pos - int(doc_ends[k] - lengths[k])
            else:
                self.doc, self.offset = first_doc + len(lengths), 0
            if self.filled == len(self.buffer):
                self.flush()

    def flush(self) -> None:
        """Write the buffered tokens as the next shard and record it in the manifest."""
        index = len(self.manifest["shards"])
        split = "val" if index == 0 else "train"
        name = shard_name(index)
        sha256 = write_shard(self.out_dir / name, self.buffer[: self.filled])
        self.manifest["shards"].append(
            {
                "file": name,
                "split": split,
                "tokens": self.filled,
                "sha256": sha256,
                "first_doc": self.shard_start[0],
                "first_doc_offset": self.shard_start[1],
            }
        )
        self.manifest["resume"] = {"doc": self.doc, "offset": self.offset}
        write_manifest(self.out_dir, self.manifest)
        self.shard_start = (self.doc, self.offset)
        self.filled = 0
        if len(self.buffer) != self.capacity():
            self.buffer = np.empty(self.capacity(), dtype=TOKEN_DTYPE)


def shard_name(index: int) -> str:
    """The file name of shard `index`: shard 0 is the validation split."""
    return f"{'val' if index == 0 else 'train'}_{index:06d}.bin"


# The temporary names `write_shard` and `write_manifest` give (NAME.tmp): a killed run leaves them.
OUR_TEMPORARY = re.compile(r"(val|train)_[0-9]{6}\.bin\.tmp|" + re.escape(MANIFEST_NAME) + r"\.tmp")


def remove_shards(out_dir: Path, entries: list[dict[str, Any]], first_index: int) -> None:
    """Delete the shards of manifest `entries` (shard `first_index` onwards): each only under the name
    this code gives that shard, so a name read from a manifest (`../x`, an absolute path, a user's
    file) never chooses what is deleted."""
    for index, entry in enumerate(entries, start=first_index):
        if entry.get("file") == shard_name(index):
            (out_dir / shard_name(index)).unlink(missing_ok=True)


def first_difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The first key whose value differs between two source descriptions, as 'key: old -> new'."""
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
    return None


def pinned_revision(out_dir: Path, dataset: str, config: str | None, split: str) -> str | None:
    """The Hub revision an earlier run into `out_dir` streamed from this dataset, config and split, if any."""
    if not (out_dir / MANIFEST_NAME).exists():
        return None
    source = read_manifest(out_dir)["source"]
    same = source.get("kind") == "hub" and (source.get("dataset"), source.get("config"), source.get("split")) == (
        dataset,
        config,
        split,
    )
    return source.get("revision") if same else None


def start_manifest(out_dir: Path, description: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """The manifest to continue from: the existing one cut to its valid shards, or a new one.

    A manifest made from a different source or layout is refused (or, with `overwrite`, deleted
    with its shards) rather than mixed with new shards.
    """
    fresh = {
        "format_version": MANIFEST_FORMAT_VERSION,
        "tokenizer": TOKENIZER_NAME,
        "source": description,
        "complete": False,
        "shards": [],
        "resume": {"doc": 0, "offset": 0},
    }
    path = out_dir / MANIFEST_NAME
    for tmp in out_dir.glob("*.tmp"):  # left by a killed run: only our own names, never a user's notes.tmp
        if OUR_TEMPORARY.fullmatch(tmp.name) and (tmp.is_symlink() or not tmp.is_dir()):
            tmp.unlink()
    if not path.exists():
        return fresh
    old = read_manifest(out_dir)
    diff = first_difference(old["source"], description)
    if diff is not None:
        if not overwrite:
            raise DataPrepError(
                f"{path} was made from a different source or layout ({diff}); use another --out_dir or --overwrite"
            )
        remove_shards(out_dir, old["shards"], 0)
        path.unlink()
        return fresh
    valid = []
    for index, entry in enumerate(old["shards"]):
        if entry["file"] != shard_name(index):  # not a name we give: never read, nor deleted
            break
        try:
            check_shard(out_dir, entry, verify_hash=True)
        except (FileNotFoundError, ShardError):
            break
        valid.append(entry)
    if len(valid) == len(old["shards"]) and old.get("complete"):
        return old
    remove_shards(out_dir, old["shards"][len(valid) :], len(valid))
    if len(valid) < len(old["shards"]):
        # Restart at the first token of the first bad shard, recorded in its entry.
        bad = old["shards"][len(valid)]
        resume = {"doc": bad["first_doc"], "offset": bad["first_doc_offset"]}
    else:
        resume = old["resume"]
    return {**old, "complete": False, "shards": valid, "resume": resume}


def prepare(
    out_dir: str | os.PathLike,
    *,
    dataset: str = DEFAULT_DATASET,
    config: str | None = DEFAULT_CONFIG,
    split: str = "train",
    files: list[str] | None = None,
    builtin: bool = False,
    text_column: str = "text",
    txt_sample_by: str = "document",
    encoding_errors: str = "strict",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    val_tokens: int | None = None,
    max_docs: int | None = None,
    num_proc: int | None = None,
    batch_docs: int = DEFAULT_BATCH_DOCS,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Tokenize a source into shards in `out_dir` and write `out_dir/manifest.json`; return `out_dir`.

    The source is `files` (local globs) if given, else the built-in corpus if `builtin`, else the
    Hub `dataset`/`config`/`split`, streamed. `encoding_errors` (`strict`, `replace`, `ignore`) says
    what a byte that is not UTF-8 in a `.txt` or `.jsonl` file does (`sources.local_source`).
    Re-running with the same arguments keeps the shards that match the manifest, rewrites from the
    first missing or damaged one, and gives identical files; a complete output is left untouched.
    """
    if not 1 <= shard_tokens <= MAX_SHARD_TOKENS:
        raise DataPrepError(f"shard_tokens must be 1 to {MAX_SHARD_TOKENS}, got {shard_tokens}")
    if val_tokens is not None and not 1 <= val_tokens <= MAX_SHARD_TOKENS:
        raise DataPrepError(f"val_tokens must be 1 to {MAX_SHARD_TOKENS}, got {val_tokens}")
    if max_docs is not None and max_docs < 1:
        raise DataPrepError(f"max_docs must be at least 1, got {max_docs}")
    if batch_docs < 1:
        raise DataPrepError(f"batch_docs must be at least 1, got {batch_docs}")
    out_dir = Path(out_dir)
    if files:
        source = local_source(
            files, text_column=text_column, txt_sample_by=txt_sample_by, encoding_errors=encoding_errors
        )
    elif builtin:
        source = builtin_source()
    else:
        # A restart streams the revision the first run pinned, so that a new commit upstream (even a
        # README edit) neither mixes two revisions in one output nor refuses the restart.
        revision = None if overwrite else pinned_revision(out_dir, dataset, config, split)
        source = hub_source(dataset, config, split, text_column=text_column, revision=revision)
    val_tokens = shard_tokens if val_tokens is None else val_tokens
    description = {**source.description, "shard_tokens": shard_tokens, "val_tokens": val_tokens, "max_docs": max_docs}
    made_dir = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = start_manifest(out_dir, description, overwrite)
    if manifest["complete"]:
        return out_dir

    writer = ShardWriter(out_dir, manifest, shard_tokens, val_tokens)
    start_doc = writer.doc
    total_docs = source.num_docs if max_docs is None else min(max_docs, source.num_docs or max_docs)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_docs, initial=start_doc, unit="doc", dynamic_ncols=True, desc="tokenizing")
    batches = iter_text_batches(source, start_doc, max_docs, batch_docs)
    written_before = sum(entry["tokens"] for entry in manifest["shards"])
    new_tokens, docs, t0 = 0, start_doc, time.perf_counter()
    for tokens, lengths in iter_encoded(batches, num_proc or os.cpu_count() or 1):
        new_tokens += len(tokens) - writer.offset
        docs += len(lengths)
        writer.add(tokens, lengths)
        if bar is not None:
            bar.update(len(lengths))
            rate = new_tokens / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(tokens=f"{written_before + new_tokens:,}", tok_s=f"{rate:,.0f}", refresh=False)
    if bar is not None:
        bar.close()
    if docs == 0:
        raise DataPrepError(f"{describe(source.description)} has no documents")
    if writer.filled:
        writer.flush()
    shards = manifest["shards"]
    if not any(entry["split"] == "train" for entry in shards):
        # No re-run of these arguments can succeed: remove what they wrote (the shards, by the names this
        # code gives, and the manifest), so that the re-run with other values that the message advises starts.
        remove_shards(out_dir, shards, 0)
        (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
        if made_dir and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise DataPrepError(
            f"{describe(source.description)} gave {sum(e['tokens'] for e in shards)} tokens, all in the val "
            f"shard of up to {val_tokens}: lower --val_tokens (or --shard_tokens) to leave training tokens"
        )
    manifest.pop("resume", None)
    manifest.update(complete=True, documents=docs, tokens=sum(e["tokens"] for e in shards))
    write_manifest(out_dir, manifest)
    return out_dir


def prepare_builtin(out_dir: str | os.PathLike, shard_tokens: int | None = None, num_proc: int = 1) -> Path:
    """Build the offline built-in corpus (Python's own documentation) into shards in `out_dir`.

    Same code path as `python -m data_prep --builtin`; idempotent; returns `out_dir`. One
    process by default because the corpus is small (about a second to tokenize).
    """
    return prepare(out_dir, builtin=True, shard_tokens=shard_tokens or BUILTIN_SHARD_TOKENS, num_proc=num_proc)
