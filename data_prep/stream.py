"""Training batches straight from a text source, tokenized on the fly: no prep step, no shards on the disk.

The token stream is the one `python -m data_prep` writes for the same source (`<|endoftext|>` before every
document; the readers and the tokenizer are `data_prep`'s own): its first `val_tokens` tokens are the
validation set, the rest is training data. Documents are read in blocks of `block_docs` and tokenized
by `workers` background processes, results taken in order, so the tokens do not depend on the number
of workers. Rank `r` of `W` owns the documents whose number `g` has `g % W == r` (disjoint documents) and
cuts its own tokens into windows of `seq_len + 1` at a stride of `seq_len`, as `ShardLoader` cuts a shard.

The position is, per rank, the document and token where the next window begins, with the source's own
position at the start of that document's block (`datasets.IterableDataset.state_dict`, or the document
number of the built-in corpus). A resume loads that position into the reader, reads (without tokenizing)
at most one block of documents to reach its document, and tokenizes from there: never the stream from
its start. When the source runs out, the next epoch starts at the first training token again.
"""

from __future__ import annotations

import collections
import hashlib
import json
import pickle
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.prepare import describe, encode_documents, next_texts
from data_prep.shards import TOKEN_DTYPE, DataPrepError
from data_prep.sources import BUILDERS, Source, builtin_source, hub_source, local_source
from data_prep.tokenizer import EOT_ID

STREAM_STATE_VERSION = 1
DEFAULT_BLOCK_DOCS = 256
BUILTIN = "builtin"  # --data_stream builtin: the built-in corpus, as `python -m data_prep --builtin` reads it
# Encoded blocks waiting for the trainer, per worker: enough to hide a slow block, little memory.
BLOCKS_AHEAD = 4
# Parquet sources of up to this many files are read per row group (StreamSpec.open): resharding reads every
# file's footer when the stream opens (each resume and epoch), a few requests for FineWeb-Edu sample-10BT's
# 14 files but minutes for a source of thousands (the whole FineWeb-Edu), whose resume then reads per file.
ROW_GROUP_MAX_FILES = 64
# Bytes of each local text file checked for UTF-8 before training (a binary file fails here, not mid-run).
SNIFF_BYTES = 1 << 16


@dataclass(frozen=True)
class StreamSpec:
    """What to stream: `source` is `builtin`, local files (globs, comma-separated), or a Hub dataset name."""

    source: str
    config: str | None = None
    split: str = "train"
    text_column: str = "text"
    revision: str | None = None  # a Hub dataset's commit (the trainer pins the one its first launch read)

    @property
    def is_local(self) -> bool:
        parts = self.patterns
        return any(any(c in p for c in "*?[") or Path(p).suffix.lower() in BUILDERS or Path(p).exists() for p in parts)

    @property
    def patterns(self) -> list[str]:
        return [p.strip() for p in self.source.split(",") if p.strip()]

    def open(self, split: str | None = None, row_groups: bool = True) -> Source:
        """The source as a fresh stream at its start (`split`: another split of a Hub dataset). With
        `row_groups`, Parquet (local or on the Hub, up to ROW_GROUP_MAX_FILES files) is read as one shard
        per row group (datasets' `reshard`), in the same order, so that a position's reader state names its
        row group and a resume reads from there, not from the start of its file (2 GB for a FineWeb-Edu
        file). A position says which way its state was taken (its `row_groups`; absent in those saved
        before: per file); the choice depends only on the source, so a resume makes the same one."""
        source = self._open(split)
        dataset = source.dataset
        if row_groups and hasattr(dataset, "reshard") and dataset.num_shards <= ROW_GROUP_MAX_FILES:
            source = replace(source, dataset=dataset.reshard())  # a datasets.IterableDataset
        return source

    def _open(self, split: str | None) -> Source:
        if self.source == BUILTIN:
            return builtin_source()
        if self.is_local:
            return local_source(self.patterns, text_column=self.text_column, flag="data_stream")
        hint = "Stream local files (--data_stream 'data/*.jsonl'), or the built-in corpus (--data_stream builtin)."
        return hub_source(self.source, self.config, split or self.split, self.text_column, self.revision, hint=hint)


def check_local_files(source: Source) -> None:
    """A local .txt/.jsonl/.json file whose first bytes are not UTF-8 (a binary file) is refused before
    training, naming it; one that goes wrong further in stops the run when the reader gets there."""
    for entry in source.description.get("files", []) if source.description["kind"] == "files" else []:
        path = Path(entry["path"])
        if path.suffix.lower() == ".parquet":
            continue
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
        found = first_invalid_utf8_bytes(head, complete=len(head) < SNIFF_BYTES)
        if found is None and b"\0" in head:
            found = (head.index(b"\0"), "a NUL byte (a binary file)")
        if found is not None:
            raise DataPrepError(f"{path} is not UTF-8 text: {found[1]} at byte {found[0]}; give text files")


def first_invalid_utf8_bytes(data: bytes, complete: bool) -> tuple[int, str] | None:
    """`first_invalid_utf8` of some first bytes of a file (a character cut at their end is not an error)."""
    import codecs

    try:
        codecs.getincrementaldecoder("utf-8")().decode(data, final=complete)
    except UnicodeDecodeError as err:
        return err.start, err.reason
    return None


def fingerprint(description: dict[str, Any]) -> str:
    """A short hash of a source's description (its files and sizes, or its Hub commit): equal only for the
    same stream."""
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Block:
    """Tokens of one rank's documents of one block: `doc_ids[k]` gives `lengths[k]` tokens, from its token
    `starts[k]` on (0, except where a position began inside a document)."""

    epoch: int
    block_doc: int  # the block's first document number (of all ranks')
    source_state: dict | None  # the reader's position at that document
    doc_ids: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    tokens: np.ndarray
    row_groups: bool = False  # the source was opened with `row_groups` (StreamSpec.open)

    def position(self, cursor: int) -> dict[str, Any]:
        """The position of token `cursor` of this block."""
        ends = np.cumsum(self.lengths)
        k = int(np.searchsorted(ends, cursor, side="right"))
        offset = int(self.starts[k]) + cursor - int(ends[k] - self.lengths[k])
        return {
            "epoch": self.epoch,
            "block_doc": self.block_doc,
            "source_state": self.source_state,
            "doc": int(self.doc_ids[k]),
            "offset": offset,
            "row_groups": self.row_groups,
        }


def read_blocks(
    source: Source, source_state: dict | None, block_doc: int, block_docs: int
) -> Iterator[tuple[int, dict | None, list[str]]]:
    """(first document number, the reader's state before it, texts) for each block of `block_docs`
    documents, from `source_state` (document `block_doc`; None: the start)."""
    dataset = source.dataset
    if source_state is not None:
        dataset.load_state_dict(source_state)
    batches = dataset.iter(batch_size=block_docs)
    state = source_state
    while (texts := next_texts(source, batches, block_doc)) is not None:
        yield block_doc, state, texts
        block_doc += len(texts)
        state = dataset.state_dict()


def encode_from(texts: list[str], doc_ids: list[int], first: dict[str, Any]) -> tuple[np.ndarray, ...]:
    """`encode_documents` of `texts`, less the first `first['offset']` tokens of document `first['doc']`:
    (starts, lengths, tokens)."""
    tokens, lengths = encode_documents(texts)
    starts = np.zeros(len(lengths), dtype=np.int64)
    if doc_ids and doc_ids[0] == first["doc"] and first["offset"]:
        cut = min(first["offset"], int(lengths[0]))
        tokens, lengths[0], starts[0] = tokens[cut:], lengths[0] - cut, cut
    return starts, lengths, tokens


class Workers:
    """Tokenizing processes, each a fresh `python -m data_prep.stream` (no torch) that reads `encode_from`'s
    arguments as pickles on its stdin and writes the results to its stdout. Fresh processes rather than
    forks of the trainer: a fork would inherit the run folder's lock and the trainer's threads, and would
    outlive a SIGKILLed trainer; these end when their stdin closes, that is when the trainer is gone."""

    def __init__(self, count: int) -> None:
        cmd = [sys.executable, "-m", "data_prep.stream"]
        self.procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(count)]

    def map_in_order(self, tasks: Iterator[tuple[Any, tuple]]) -> Iterator[tuple[Any, tuple]]:
        """(meta, encode_from(*args)) for each (meta, args) of `tasks`, in order; task k goes to worker k % N,
        one at a time each (so that neither side ever blocks writing to the other)."""
        busy: collections.deque = collections.deque()
        try:
            for k, (meta, args) in enumerate(tasks):
                worker = self.procs[k % len(self.procs)]
                if len(busy) == len(self.procs):
                    yield self._receive(*busy.popleft())
                pickle.dump(args, worker.stdin, protocol=pickle.HIGHEST_PROTOCOL)
                worker.stdin.flush()
                busy.append((meta, worker))
            while busy:
                yield self._receive(*busy.popleft())
        finally:  # a reader stopped early (to resume elsewhere) leaves no result unread: the next one is in step
            for _, worker in busy:
                try:
                    pickle.load(worker.stdout)
                except (EOFError, OSError, ValueError):  # a worker that `close` killed
                    pass

    @staticmethod
    def _receive(meta: Any, worker: subprocess.Popen) -> tuple[Any, tuple]:
        try:
            return meta, pickle.load(worker.stdout)  # our own worker's output, never a file's
        except EOFError as err:
            raise RuntimeError(f"a data_stream worker (pid {worker.pid}) ended with status {worker.wait()}") from err

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


def serve() -> None:
    """The worker's loop (`python -m data_prep.stream`): until its stdin closes."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            args = pickle.load(stdin)  # from the trainer that started this process
        except EOFError:
            return
        pickle.dump(encode_from(*args), stdout, protocol=pickle.HIGHEST_PROTOCOL)
        stdout.flush()


class StreamLoader:
    """Training batches tokenized on the fly from a source, for one rank, with an exact position.

    The same interface as `ShardLoader` as the trainer uses it: `next_batch()` gives `(x, y)`, int64
    tensors of shape `(batch_size, seq_len)`; `state_dict()` / `load_state_dict()` (the state holds every
    rank's position: `state_dict` gathers them, so every rank calls it); `take_waited()`. `start` is the
    position of the first training token (`train_start`), for each epoch.
    """

    def __init__(
        self,
        spec: StreamSpec,
        start: dict[str, Any],
        *,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 1,
        block_docs: int = DEFAULT_BLOCK_DOCS,
        log=None,
    ) -> None:
        if batch_size < 1 or seq_len < 1 or not 0 <= rank < world_size or workers < 0 or block_docs < world_size:
            raise ValueError(
                f"bad stream shape: batch_size {batch_size}, seq_len {seq_len}, rank {rank} of {world_size}, "
                f"workers {workers}, block_docs {block_docs}"
            )
        self.spec, self.batch_size, self.seq_len = spec, batch_size, seq_len
        self.rank, self.world_size, self.workers, self.block_docs = rank, world_size, workers, block_docs
        self.train_start = rank_start(start, rank, world_size)
        self.log = log
        self.source_fingerprint: str | None = None
        self.position = {**self.train_start, "epoch": 0}
        self._blocks: collections.deque[Block] = collections.deque()
        self._cursor = 0  # next window's first token in self._blocks[0]
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._workers: Workers | None = None
        self._thread: threading.Thread | None = None
        self._waited = 0.0

    # -- the background pipeline: read blocks, tokenize them on the workers, in order --------------

    def start(self) -> None:
        """Begin reading and tokenizing now, so that the first batch is ready when training begins (the
        trainer calls it for a new run; `next_batch` and `load_state_dict` start the reader otherwise)."""
        if self._queue is None:
            self._start()

    def _start(self) -> None:
        if self._workers is None and self.workers > 0:
            self._workers = Workers(self.workers)
        self._queue, self._stop = queue.Queue(maxsize=BLOCKS_AHEAD * max(1, self.workers)), threading.Event()
        self._thread = threading.Thread(
            target=self._produce, args=(dict(self.position), self._queue, self._stop), daemon=True, name="stream"
        )
        self._thread.start()

    def _halt(self) -> None:
        """Stop the reader thread and wait for it (it finishes the block in hand, and collects the results of
        the tasks it gave the workers)."""
        if self._stop is not None:
            self._stop.set()
            self._thread.join()
        self._queue = self._stop = self._thread = None

    def close(self) -> None:
        """Stop the reader and the worker processes."""
        self._halt()
        if self._workers is not None:
            self._workers.close()
            self._workers = None

    def _produce(self, position: dict[str, Any], out: queue.Queue, stop: threading.Event) -> None:
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            tasks = ((meta, (texts, meta[3], meta[4])) for meta, texts in self._owned_blocks(position, stop))
            workers = self._workers
            results = workers.map_in_order(tasks) if workers else ((m, encode_from(*a)) for m, a in tasks)
            try:
                for (epoch, block_doc, state, doc_ids, first), (starts, lengths, tokens) in results:
                    ids, row_groups = np.asarray(doc_ids), bool(first.get("row_groups"))
                    if not put(Block(epoch, block_doc, state, ids, starts, lengths, tokens, row_groups)):
                        return
            finally:
                results.close()
        except BaseException as err:  # handed to the trainer's thread, which raises it
            put(err)

    def _owned_blocks(self, position: dict[str, Any], stop: threading.Event) -> Iterator[tuple[tuple, list[str]]]:
        """(block metadata, this rank's texts) from `position` on, epoch after epoch."""
        epoch = position["epoch"]
        while not stop.is_set():
            source = self.spec.open(row_groups=bool(position.get("row_groups")))
            self._check_source(source)
            found = False
            for block_doc, state, texts in read_blocks(
                source, position["source_state"], position["block_doc"], self.block_docs
            ):
                if stop.is_set():
                    return
                first = max(position["doc"], block_doc)
                ids = [
                    g
                    for g in range(block_doc, block_doc + len(texts))
                    if g >= first and g % self.world_size == self.rank
                ]
                if ids:
                    found = True
                    yield (epoch, block_doc, state, ids, position), [texts[g - block_doc] for g in ids]
            if not found and position == {**self.train_start, "epoch": epoch}:
                raise DataPrepError(
                    f"{describe(source.description)} has no training documents for rank {self.rank} of "
                    f"{self.world_size} after the validation tokens; use a larger source or fewer processes"
                )
            epoch += 1
            position = {**self.train_start, "epoch": epoch}
            if self.log is not None:
                self.log(f"data_stream: rank {self.rank} reached the end of the stream; epoch {epoch} starts")

    def _check_source(self, source: Source) -> None:
        mine = fingerprint(source.description)
        if self.source_fingerprint is None:
            self.source_fingerprint = mine
        elif mine != self.source_fingerprint:
            raise DataPrepError(f"{describe(source.description)} changed while training (its files or commit)")

    def _next_block(self) -> Block:
        if self._queue is None:
            self._start()
        t0 = time.perf_counter()
        item = self._queue.get()
        self._waited += time.perf_counter() - t0
        if isinstance(item, BaseException):
            self._halt()
            raise item
        return item

    # -- the trainer's interface ---------------------------------------------------------------

    def _window(self) -> np.ndarray:
        """The next `seq_len + 1` tokens, moving the position `seq_len` on."""
        need, parts, i, cursor = self.seq_len + 1, [], 0, self._cursor
        while need:
            if i == len(self._blocks):
                self._blocks.append(self._next_block())
            block = self._blocks[i]
            part = block.tokens[cursor : cursor + need]
            parts.append(part)
            need -= len(part)
            i, cursor = i + 1, 0
        self._cursor += self.seq_len
        while self._blocks and self._cursor >= len(self._blocks[0].tokens):
            self._cursor -= len(self._blocks.popleft().tokens)
        if not self._blocks:
            self._blocks.append(self._next_block())
        self.position = self._blocks[0].position(self._cursor)
        return np.concatenate(parts)

    def next_batch(self):
        """The next `(x, y)` of this rank, int64 tensors of shape (batch_size, seq_len)."""
        import torch

        if not self._blocks:
            self._blocks.append(self._next_block())
        rows = np.stack([self._window() for _ in range(self.batch_size)]).astype(np.int64)
        return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())

    @property
    def epoch(self) -> int:
        """The epoch of the next window: 0 until the source has run out once (a mixture logs the change)."""
        return int(self.position["epoch"])

    def take_waited(self) -> float:
        """Seconds the trainer waited for tokens since the last call."""
        waited, self._waited = self._waited, 0.0
        return waited

    def state_dict(self) -> dict[str, Any]:
        """Every rank's position (gathered: every rank must call this) and what the stream depends on."""
        import torch

        mine = dict(self.position)
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks: list = [None] * self.world_size
            torch.distributed.all_gather_object(ranks, mine)
        else:
            ranks = [mine]
        return {
            "format_version": STREAM_STATE_VERSION,
            "kind": "stream",
            "source": self.fingerprint(),
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "block_docs": self.block_docs,
            "ranks": ranks,
        }

    def fingerprint(self) -> str:
        if self.source_fingerprint is None:
            self.source_fingerprint = fingerprint(self.spec.open(row_groups=False).description)
        return self.source_fingerprint

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly at `state`'s position for this rank; another source, seq_len, number of
        processes or block size is refused, naming it."""
        problem = stream_state_problem(state)
        if problem:
            raise ValueError(f"loader state: {problem}")
        for key, mine in (
            ("source", self.fingerprint()),
            ("seq_len", self.seq_len),
            ("world_size", self.world_size),
            ("block_docs", self.block_docs),
        ):
            if state[key] != mine:
                what = {"source": "data_stream source (its files or commit)", "world_size": "processes"}.get(key, key)
                raise ValueError(f"cannot resume: the saved stream has {what} {state[key]!r}, this run {mine!r}")
        self._halt()
        self._blocks.clear()
        self._cursor = 0
        self.position = dict(state["ranks"][self.rank])
        self._start()


def stream_state_problem(state: Any) -> str | None:
    """What is malformed in a stream loader state (`StreamLoader.state_dict`), or None."""
    if not isinstance(state, dict) or state.get("kind") != "stream":
        return "not a stream position"
    if state.get("format_version") != STREAM_STATE_VERSION:
        return f"format_version {state.get('format_version')!r}, expected {STREAM_STATE_VERSION}"
    if not isinstance(state.get("source"), str):
        return "no source fingerprint"
    for key in ("seq_len", "batch_size", "world_size", "block_docs"):
        if type(state.get(key)) is not int or state[key] < 1:
            return f"{key} {state.get(key)!r} is not a positive count"
    ranks = state.get("ranks")
    if not isinstance(ranks, list) or len(ranks) != state["world_size"]:
        return f"ranks is not a list of {state['world_size']} positions"
    for r, position in enumerate(ranks):
        if not isinstance(position, dict):
            return f"ranks[{r}] is not a position"
        for key in ("epoch", "block_doc", "doc", "offset"):
            if type(position.get(key)) is not int or position[key] < 0:
                return f"ranks[{r}].{key} {position.get(key)!r} is not a count"
        if position["doc"] < position["block_doc"]:
            return f"ranks[{r}].doc {position['doc']} is before its block's first document {position['block_doc']}"
        if position.get("source_state") is not None and not isinstance(position["source_state"], dict):
            return f"ranks[{r}].source_state is not an object"
        if not isinstance(position.get("row_groups", False), bool):
            return f"ranks[{r}].row_groups {position['row_groups']!r} is not true or false"
    return None


def rank_start(start: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """Rank `rank`'s first training position, from the stream's (`train_start`): the first token of its
    first document from there on, or the rest of the document the validation tokens ended in."""
    doc = start["doc"] + (rank - start["doc"]) % world_size
    return {**start, "doc": doc, "offset": start["offset"] if doc == start["doc"] else 0}


def head_tokens(
    spec: StreamSpec, tokens: int, split: str | None = None, block_docs: int = DEFAULT_BLOCK_DOCS
) -> tuple[np.ndarray, dict[str, Any] | None, dict[str, Any]]:
    """The first `tokens` tokens of the stream (of `split`: another split of a Hub dataset; fewer if it has
    fewer), the position just after them (`train_start`; None when the stream ended first) and the source's
    description. One process: the validation set is small.
    A source with no documents, or only empty ones, is a one-line error."""
    source = spec.open(split)
    check_local_files(source)
    out = np.empty(tokens, dtype=TOKEN_DTYPE)
    filled, docs, end = 0, 0, None
    for block_doc, state, texts in read_blocks(source, None, 0, block_docs):
        block_tokens, lengths = encode_documents(texts)
        docs += len(texts)
        take = min(tokens - filled, len(block_tokens))
        out[filled : filled + take] = block_tokens[:take]
        filled += take
        if filled < tokens:
            continue
        if take < len(block_tokens):  # inside this block: its document and token
            ids = np.arange(block_doc, block_doc + len(texts))
            block = Block(0, block_doc, state, ids, np.zeros_like(lengths), lengths, block_tokens, row_groups=True)
            end = block.position(take)
            end.pop("epoch")
        else:  # at the next block's first document
            after = block_doc + len(texts)
            end = {"block_doc": after, "source_state": source.dataset.state_dict(), "doc": after, "offset": 0}
            end["row_groups"] = True
        break
    if docs == 0:
        raise DataPrepError(f"{describe(source.description)} has no documents")
    if not (out[:filled] != EOT_ID).any():
        raise DataPrepError(f"{describe(source.description)} yields no text: its {docs} documents are all empty")
    return out[:filled], end, source.description


if __name__ == "__main__":
    serve()
