"""Batches for training and validation, read from memory-mapped shards.

A split's tokens are cut into chunks of `seq_len + 1` tokens at a stride of `seq_len` within each
shard (the extra token is the last target; chunks never cross shard ends, which drops fewer than
`seq_len` tokens per shard). Training draws chunks in an order that is a pure function of
(seed, epoch): the shard order is shuffled, then the chunk order within each shard. Global batch
`s` of an epoch is chunks `[s * B * W, (s + 1) * B * W)` of that order, and rank `r` takes the
`B` chunks starting at `s * B * W + r * B`: ranks are disjoint, and the position is one integer.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from data_prep.shards import DataPrepError, check_shard, load_tokens, read_manifest

if TYPE_CHECKING:
    from data_prep.cache import ShardCache

STATE_FORMAT_VERSION = 1
# The target of a padding row of a validation batch: F.cross_entropy's default ignore_index.
IGNORE_INDEX = -100


def split_entries(data_dir: str | os.PathLike, split: str) -> list[dict[str, Any]]:
    """The manifest entries of one split, in stream order; an error if there are none."""
    manifest = read_manifest(data_dir)
    if not manifest.get("complete", True):
        raise DataPrepError(f"{Path(data_dir)} is incomplete: finish it by re-running `python -m data_prep`")
    entries = [entry for entry in manifest["shards"] if entry["split"] == split]
    if not entries:
        raise DataPrepError(f"{Path(data_dir)}/manifest.json lists no {split!r} shards")
    return entries


def data_fingerprint(entries: list[dict[str, Any]]) -> str:
    """A short hash of a split's shard listing (names, token counts, sha256): equal only for the same data."""
    listing = json.dumps([(e["file"], e["tokens"], e["sha256"]) for e in entries])
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


def check_batch_shape(batch_size: int, seq_len: int, rank: int, world_size: int) -> None:
    """Raise `ValueError` unless the batch shape and the rank are usable."""
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be at least 1, got {batch_size} and {seq_len}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")


def step_shape(batch_size: int, world_size: int, sequences_per_step: int | None) -> tuple[int, int]:
    """(sequences per micro-step over all ranks, sequences per optimizer step: by default one micro-step);
    `ValueError` unless the second is a multiple of the first."""
    global_batch = batch_size * world_size
    sequences_per_step = sequences_per_step or global_batch
    if sequences_per_step % global_batch:
        raise ValueError(
            f"sequences_per_step ({sequences_per_step}) must be a multiple of batch_size x world_size ({global_batch})"
        )
    return global_batch, sequences_per_step


def num_chunks(tokens: int, seq_len: int) -> int:
    """Chunks of `seq_len + 1` tokens at stride `seq_len` in a shard of `tokens` tokens."""
    return max(0, (tokens - 1) // seq_len)


def gather(shards: list[np.ndarray], rows: list[tuple[int, int]], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) int64 tensors of shape (len(rows), seq_len) from (shard, first token) pairs."""
    buf = np.empty((len(rows), seq_len + 1), dtype=np.int64)
    for i, (shard, start) in enumerate(rows):
        buf[i] = shards[shard][start : start + seq_len + 1]
    # Two contiguous copies: callers may `.view(-1)` the targets.
    return torch.from_numpy(buf[:, :-1].copy()), torch.from_numpy(buf[:, 1:].copy())


class ShardLoader:
    """Endless, shuffled, rank-disjoint training batches with an exactly resumable position.

    `next_batch()` returns `(x, y)`, int64 CPU tensors of shape `(batch_size, seq_len)`, with `y`
    the tokens that follow `x`. Every epoch covers each full chunk of the split once across all
    ranks; the last `< batch_size * world_size` chunks of an epoch are skipped so that every rank
    takes the same number of steps. `state_dict()` holds plain ints and strings (for
    `accelerator.register_for_checkpointing` or a JSON file) and is the same on every rank, so
    the main process's copy restores all of them.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str = "train",
        batch_size: int = 8,
        seq_len: int = 1024,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 1337,
        shuffle: bool = True,
        verify: bool = True,
        vocab_size: int | None = None,
        sequences_per_step: int | None = None,
        cache: ShardCache | None = None,
    ) -> None:
        """`verify` checks each shard's sha256 against the manifest the first time it is used, and with
        `vocab_size` that its token ids are below it. `sequences_per_step` (a multiple of batch_size x
        world_size; default: one global batch) is what one optimizer step takes over all ranks and
        micro-steps: epochs end on a whole step, so the order of steps is the same on any number of
        processes and a position can be resumed with another world size. With `cache` (a remote store's
        shards, `data_prep.cache`), `data_dir` is the cache folder and each shard is fetched (and its sha256
        checked) when first needed, the next one in the background; the order is the same as from a local
        folder holding the same manifest: it depends on the manifest alone."""
        check_batch_shape(batch_size, seq_len, rank, world_size)
        self.data_dir = Path(data_dir)
        self.split, self.batch_size, self.seq_len = split, batch_size, seq_len
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.entries = split_entries(data_dir, split)
        self.verify, self.vocab_size, self.cache = verify, vocab_size, cache
        self._shards: list[np.ndarray | None] = [None] * len(self.entries)
        for entry in self.entries if cache is None else ():  # cheap header and size checks now, hashes when first read
            check_shard(self.data_dir, entry, verify_hash=False)
        self.chunks_per_shard = np.array([num_chunks(e["tokens"], seq_len) for e in self.entries], dtype=np.int64)
        self.global_batch, self.sequences_per_step = step_shape(batch_size, world_size, sequences_per_step)
        steps_per_epoch = int(self.chunks_per_shard.sum()) // self.sequences_per_step
        self.batches_per_epoch = steps_per_epoch * (self.sequences_per_step // self.global_batch)
        if self.batches_per_epoch == 0:
            raise DataPrepError(
                f"the {split!r} split of {self.data_dir} has {int(self.chunks_per_shard.sum())} chunks of "
                f"{seq_len + 1} tokens, fewer than one global batch of batch_size {batch_size} x world_size "
                f"{world_size}"
            )
        self.tokens_per_batch = batch_size * seq_len
        self.data_fingerprint = data_fingerprint(self.entries)  # ties a saved state to these exact shards
        self.epoch, self.batch_index = 0, 0  # micro-batches drawn in this epoch, not optimizer steps
        self._set_epoch(0)

    def _shard(self, index: int) -> np.ndarray:
        if self._shards[index] is None and self.cache is not None:  # fetched and its sha256 checked first
            self._shards[index] = self.cache.open(self.entries[index], vocab_size=self.vocab_size)
        elif self._shards[index] is None:
            path = check_shard(self.data_dir, self.entries[index], verify_hash=self.verify, vocab_size=self.vocab_size)
            self._shards[index] = load_tokens(path, mmap=True)
        return self._shards[index]

    def _use_cache(self, needed: set[int]) -> None:
        """Remote shards: map only the shards of this batch (the others may leave the cache), and fetch the
        one after this global batch's last in the background."""
        for index in range(len(self._shards)):
            if index not in needed:
                self._shards[index] = None
        last = (self.batch_index + 1) * self.global_batch - 1
        k = int(np.searchsorted(self._order_ends, last, side="right"))
        read = self.batches_per_epoch * self.global_batch  # chunks this epoch reads: a few may be left over
        if k + 1 < len(self._shard_order) and int(self._order_ends[k]) < read:
            upcoming = int(self._shard_order[k + 1])
        else:  # the next epoch's first shard
            upcoming = int(self._epoch_shard_order(self.epoch + 1)[0])
        self.cache.use([self.entries[i]["file"] for i in needed], self.entries[upcoming]["file"])

    def take_waited(self) -> float:
        """Seconds spent waiting for remote shards since the last call (0 for a local folder)."""
        return self.cache.take_waited() if self.cache is not None else 0.0

    def close(self) -> None:
        """Nothing to release (the shards are memory-mapped); `StreamLoader.close` stops its workers."""

    def _epoch_shard_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.entries)
        return rng.permutation(n) if self.shuffle else np.arange(n)

    def _set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._shard_order = self._epoch_shard_order(epoch)
        self._order_ends = np.cumsum(self.chunks_per_shard[self._shard_order])
        self._chunk_orders: dict[int, np.ndarray] = {}

    def _chunk_order(self, shard: int) -> np.ndarray:
        if shard not in self._chunk_orders:
            count = int(self.chunks_per_shard[shard])
            if self.shuffle:
                order = np.random.default_rng([self.seed, self.epoch, 1 + shard]).permutation(count)
            else:
                order = np.arange(count)
            # Only the shards of the current batch are needed; keep memory flat on big datasets.
            if len(self._chunk_orders) >= 2:
                self._chunk_orders.clear()
            self._chunk_orders[shard] = order
        return self._chunk_orders[shard]

    def _locate(self, position: int) -> tuple[int, int]:
        """(shard index, first token) of chunk number `position` in this epoch's order."""
        k = int(np.searchsorted(self._order_ends, position, side="right"))
        shard = int(self._shard_order[k])
        within = position - (int(self._order_ends[k - 1]) if k else 0)
        return shard, int(self._chunk_order(shard)[within]) * self.seq_len

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next `(x, y)` for this rank, moving to a new shuffled epoch when one ends."""
        if self.batch_index >= self.batches_per_epoch:
            self._set_epoch(self.epoch + 1)
            self.batch_index = 0
        first = self.batch_index * self.global_batch + self.rank * self.batch_size
        rows = [self._locate(first + i) for i in range(self.batch_size)]
        needed = {shard for shard, _ in rows}
        if self.cache is not None:
            self._use_cache(needed)
        for shard in needed:
            self._shard(shard)
        if self.cache is not None:
            self.cache.fetch_ahead()
        self.batch_index += 1
        return gather(self._shards, rows, self.seq_len)

    def skip(self, count: int = 1) -> None:
        """Move past the next `count` batches without reading them: the position `next_batch` would leave
        (a data mixture skips the sequences that other ranks read)."""
        for _ in range(count):
            if self.batch_index >= self.batches_per_epoch:
                self._set_epoch(self.epoch + 1)
                self.batch_index = 0
            self.batch_index += 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """The position (the next batch to be returned) and everything that defines the order."""
        return {
            "format_version": STATE_FORMAT_VERSION,
            "data": self.data_fingerprint,
            "split": self.split,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "sequences_per_step": self.sequences_per_step,
            "epoch": self.epoch,
            "chunks_done": self.batch_index * self.global_batch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was taken.

        Changing the world size is exact as long as batch_size x world_size stays the same (the
        global batches are unchanged, only split differently), or `sequences_per_step` stays the same
        and the position is on a whole global batch of this loader (then each step's sequences are
        the same, in other micro-batches); any other change of shape, seed, split or data is refused,
        naming the saved and current values.
        """
        if state.get("format_version") != STATE_FORMAT_VERSION:
            raise ValueError(f"loader state format_version {state.get('format_version')!r}, expected 1")
        for key, mine in (
            ("data", self.data_fingerprint),
            ("split", self.split),
            ("seed", self.seed),
            ("shuffle", self.shuffle),
            ("seq_len", self.seq_len),
        ):
            if state[key] != mine:
                what = "shards" if key == "data" else key
                raise ValueError(
                    f"cannot resume: the saved loader state has {what} {state[key]!r}, this loader {mine!r}"
                )
        saved_global = state["batch_size"] * state["world_size"]
        same_steps = state.get("sequences_per_step") == self.sequences_per_step
        regrouped = same_steps and state["chunks_done"] % self.global_batch == 0  # other micro-batches, same steps
        if saved_global != self.global_batch and not regrouped:
            raise ValueError(
                f"cannot resume exactly: saved batch_size {state['batch_size']} x world_size {state['world_size']} = "
                f"{saved_global} sequences per micro-step, now batch_size {self.batch_size} x world_size "
                f"{self.world_size} = {self.global_batch}; keep the product the same (e.g. adjust batch_size), or "
                "keep sequences_per_step"
            )
        self._set_epoch(int(state["epoch"]))
        self.batch_index = int(state["chunks_done"]) // self.global_batch


def iter_val_batches(
    data_dir: str | os.PathLike,
    batch_size: int,
    seq_len: int,
    rank: int = 0,
    world_size: int = 1,
    max_batches: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Validation `(x, y)` batches of one evaluation, split over the ranks, equally many on each.

    The evaluation is the first `max_batches * batch_size` val chunks in stream order (all of them when
    None or when the split holds fewer): the same sequences for any `world_size`, so that the loss does
    not depend on how many processes compute it. Global batch `i` is chunks `[i * B * W, (i + 1) * B * W)`
    of those; rank `r` takes its `B`. Every rank yields the same number of `(B, seq_len)` batches (a
    sharded model's forward is a collective, and a rank that stopped early would hang the others), so
    where the evaluation runs out the rows are padding: `y` is `IGNORE_INDEX` there (cross_entropy's
    default `ignore_index`), and the tokens that count are `y != IGNORE_INDEX`. Shard headers are
    checked before the first batch.
    """
    check_batch_shape(batch_size, seq_len, rank, world_size)
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be at least 1 or None, got {max_batches}")
    entries = split_entries(data_dir, "val")
    shards = [load_tokens(check_shard(data_dir, entry, verify_hash=False), mmap=True) for entry in entries]
    chunks = [(s, c * seq_len) for s, tokens in enumerate(shards) for c in range(num_chunks(len(tokens), seq_len))]
    if not chunks:
        raise DataPrepError(f"the val split of {Path(data_dir)} has no chunk of {seq_len + 1} tokens")
    if max_batches is not None:
        chunks = chunks[: max_batches * batch_size]
    global_batch = batch_size * world_size
    num_batches = -(-len(chunks) // global_batch)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(num_batches):
            first = i * global_batch + rank * batch_size
            mine = chunks[first : first + batch_size]
            pad = batch_size - len(mine)
            x, y = gather(shards, mine + [chunks[0]] * pad, seq_len)  # padding rows: any real tokens as input
            y[len(mine) :] = IGNORE_INDEX
            yield x, y

    return batches()
