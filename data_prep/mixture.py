"""Training batches drawn from several sources by weight (`--data_mix 'data/a:0.7,data/b:0.3'`).

Each optimizer step takes `S` sequences (total_batch_size / seq_len) over all processes and micro-steps.
Which source gives each of them is decided for the whole step, the same on every rank, by a
low-discrepancy allocation: the sequences are handed out one at a time, each to the source furthest
behind its share of all sequences drawn since the run began (largest `weight * (n + 1) - count`, ties
to the first source). Every source's count stays within one sequence of `weight * n`, so the realised
fractions after `n` sequences are within `1 / n` of the weights (over 200 steps of 16 sequences: within
0.03%), which independent random draws do not give (their spread is about 0.8% there). The step's
sources are then put in an order shuffled by a generator seeded with (seed, step), so a micro-batch is
not always from the same source.

A source is any loader with `ShardLoader`'s interface (`next_batch`, `take_waited`, `state_dict`,
`load_state_dict`) built with batch_size 1, rank 0 and world_size 1: it gives that source's sequences,
one at a time, in its own order (its epochs and their shuffles are its own). Every rank draws the whole
step's allocation and keeps its own micro-batches of it (global positions `m * B * W + r * B` onwards for
micro-step `m` and rank `r`, as `ShardLoader` cuts a step), so the steps are the same on any number of
processes, and the state is the same on every rank. A rank reads only its own sequences: the others'
are skipped with the source's `skip()` where it has one (`ShardLoader` does: a position moved, nothing
read), else read and dropped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from data_prep.loader import check_batch_shape, step_shape
from data_prep.store import is_url

MIX_FORMAT_VERSION = 1
KIND = "mixture"
_SHUFFLE_STREAM = 0x6D6978  # keeps the step-order generator apart from the loaders' (seed, epoch) streams


class Source(Protocol):
    """What a mixture needs of a source: `ShardLoader`'s interface, one sequence per `next_batch`."""

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...
    def take_waited(self) -> float: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


STREAM_PREFIX = "stream:"  # `stream:SOURCE`: a source tokenized on the fly, as `--data_stream SOURCE` reads it


def stream_of(source: str) -> str | None:
    """What `stream:SOURCE` streams (SOURCE), or None for a shard folder or a URL."""
    return source[len(STREAM_PREFIX) :] if source.startswith(STREAM_PREFIX) else None


def source_key(source: str) -> str:
    """What makes two sources the same: a URL without a trailing slash, a folder's normalised path, a
    stream's `stream:` and its local files' normalised path (or its Hub dataset id)."""
    stream = stream_of(source)
    if stream is not None:
        from data_prep.stream import BUILTIN, StreamSpec

        named = stream == BUILTIN or not StreamSpec(stream).is_local  # the built-in corpus, a Hub dataset id
        return STREAM_PREFIX + (stream if named else os.path.normpath(os.path.abspath(os.path.expanduser(stream))))
    return source.rstrip("/") if is_url(source) else os.path.normpath(os.path.abspath(os.path.expanduser(source)))


def parse_mix(text: str) -> list[tuple[str, float]]:
    """`'data/a:0.7,data/b:0.3'` as `[('data/a', 0.7), ('data/b', 0.3)]`. Raise `ValueError` naming the part
    that is wrong: a source without a weight, a weight that is not a finite number above 0, a source
    named twice. Weights need not sum to 1; they are used as proportions."""
    parts = [part.strip() for part in text.split(",")]
    if not text.strip() or not all(parts):
        raise ValueError(f"{text!r} has an empty entry; give SOURCE:WEIGHT pairs separated by commas")
    mix, seen = [], {}
    for part in parts:
        source, sep, weight_text = part.rpartition(":")
        # `s3://bucket/x` alone: its last colon is the URL's; `stream:x` alone: the prefix's
        if part.startswith(STREAM_PREFIX) and not source.startswith(STREAM_PREFIX):  # its one colon: the prefix's
            source, sep = (part, "") if part[len(STREAM_PREFIX) :].strip() else (STREAM_PREFIX, sep)
        if not sep or not source or "/" in weight_text:
            raise ValueError(f"{part!r} has no weight; write it as SOURCE:WEIGHT, e.g. {part}:0.5")
        if stream_of(source) is not None and not stream_of(source).strip():
            raise ValueError(f"{part!r} names no stream; write it as stream:SOURCE:WEIGHT, e.g. stream:builtin:0.5")
        try:
            weight = float(weight_text)
        except ValueError:
            raise ValueError(f"the weight of {source} is {weight_text!r}, not a number") from None
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"the weight of {source} is {weight_text}; weights must be finite and above 0")
        key = source_key(source)
        if key in seen:
            raise ValueError(f"{source} is named twice (also as {seen[key]}); give each source once, with one weight")
        seen[key] = source
        mix.append((source, weight))
    return mix


def source_labels(sources: Sequence[str]) -> list[str]:
    """Short names for the log (`data/tokens/NAME`): each source's last path part (a Hub revision dropped;
    a stream's after `stream:`), or the whole source where two share a last part."""

    def short_name(source: str) -> str:
        stream = stream_of(source)
        if stream is not None:
            return STREAM_PREFIX + short_name(stream)
        return source.rstrip("/").rsplit("/", 1)[-1].split("@")[0] or source

    short = [short_name(source) for source in sources]
    return [s if short.count(s) == 1 else source for s, source in zip(short, sources, strict=True)]


def mix_fingerprint(parts: Sequence[tuple[float, str]]) -> str:
    """A short hash of (weight, data fingerprint) pairs in order: equal only for the same mixture."""
    return hashlib.sha256(json.dumps([[float(w), fp] for w, fp in parts]).encode()).hexdigest()[:16]


def allocate(weights: Sequence[float], counts: Sequence[int], n: int) -> list[int]:
    """The sources (indices) of the next `n` sequences, continuing from `counts` drawn so far from each:
    each goes to the source furthest behind its share, `weight * (drawn + 1) - count` largest (ties to the
    first). `weights` are proportions summing to 1. A pure function of its arguments."""
    counts = list(counts)
    drawn = sum(counts)
    labels = []
    for _ in range(n):
        drawn += 1
        best = max(range(len(weights)), key=lambda i: weights[i] * drawn - counts[i])
        counts[best] += 1
        labels.append(best)
    return labels


class MixtureLoader:
    """Endless training batches drawn from weighted sources, the same steps on any number of processes,
    with an exactly resumable position (each source's own state, the sequences drawn from each, the
    steps drawn). `next_batch()` returns this rank's `(x, y)` of shape `(batch_size, seq_len)`.

    `counts[i] * seq_len` is the number of tokens read from source `i` so far (`metrics()`); a source that
    runs out starts its next epoch by itself, and `take_events()` says so once.
    """

    def __init__(
        self,
        sources: Sequence[tuple[str, float, Source]],
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 1337,
        sequences_per_step: int | None = None,
        fingerprints: Sequence[str] | None = None,
    ) -> None:
        """`sources` are (name, weight, loader); the weights are used as proportions. `fingerprints` (one
        per source, e.g. its shards' `data_fingerprint`) are saved with the state and compared on resume."""
        check_batch_shape(batch_size, seq_len, rank, world_size)
        if not sources:
            raise ValueError("a mixture needs at least one source")
        total = sum(weight for _, weight, _ in sources)
        self.names = [name for name, _, _ in sources]
        self.weights = [weight / total for _, weight, _ in sources]
        self.given_weights = [float(weight) for _, weight, _ in sources]
        self.loaders = [loader for _, _, loader in sources]
        self.labels = source_labels(self.names)
        self.fingerprints = list(fingerprints) if fingerprints is not None else [""] * len(sources)
        self.batch_size, self.seq_len, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.seed = seed
        self.global_batch, self.sequences_per_step = step_shape(batch_size, world_size, sequences_per_step)
        self.counts = [0] * len(sources)
        self.steps = 0  # steps drawn (the current one included while its micro-batches are being taken)
        self._micro: list[tuple[torch.Tensor, torch.Tensor]] = []  # this rank's micro-batches of the drawn step
        self._taken = 0  # of them
        self._before: dict[str, Any] | None = None  # the position before the drawn step, for a mid-step state
        self._events: list[str] = []
        self._epochs = [self._epoch(i) for i in range(len(sources))]

    def _epoch(self, index: int) -> int:
        """The epoch source `index` reads: its `epoch` (a `StreamLoader`'s: of its next sequence), else its
        state's (a `ShardLoader`'s)."""
        loader = self.loaders[index]
        epoch = getattr(loader, "epoch", None)
        return int(epoch if epoch is not None else loader.state_dict().get("epoch", 0))

    def _draw_step(self) -> None:
        self._before = self._position(self.steps, self.counts, 0)
        labels = allocate(self.weights, self.counts, self.sequences_per_step)
        order = np.random.default_rng([self.seed, self.steps, _SHUFFLE_STREAM]).permutation(labels).tolist()
        micro_steps = self.sequences_per_step // self.global_batch
        firsts = [m * self.global_batch + self.rank * self.batch_size for m in range(micro_steps)]
        mine = {p for first in firsts for p in range(first, first + self.batch_size)}
        # position p of the step is the next sequence of source order[p]: read if it is this rank's, else
        # skipped where the source can skip without reading (ShardLoader.skip), else read and dropped
        rows = {}
        for p, label in enumerate(order):
            skip = getattr(self.loaders[label], "skip", None)
            if p in mine or skip is None:
                rows[p] = self.loaders[label].next_batch()
            else:
                skip()
        for i in sorted(set(labels)):
            self.counts[i] += labels.count(i)
            epoch = self._epoch(i)
            if epoch != self._epochs[i]:
                where = f"epoch {epoch} starts at step {self.steps + 1}"
                self._events.append(f"data source {self.names[i]} ran out: {where}")
                self._epochs[i] = epoch
        self.steps += 1
        self._micro = []
        for m in range(micro_steps):
            first = m * self.global_batch + self.rank * self.batch_size
            batch = [rows[p] for p in range(first, first + self.batch_size)]
            self._micro.append((torch.cat([x for x, _ in batch]), torch.cat([y for _, y in batch])))
        self._taken = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next micro-batch, drawing the next step from the sources when the last one is used up."""
        if self._taken >= len(self._micro):
            self._draw_step()
        batch = self._micro[self._taken]
        self._taken += 1
        return batch

    def take_waited(self) -> float:
        """Seconds the sources spent waiting for remote data since the last call."""
        return sum(loader.take_waited() for loader in self.loaders)

    def close(self) -> None:
        """Release each source's readers (a stream's worker processes)."""
        for loader in self.loaders:
            loader.close()

    def metrics(self) -> dict[str, int]:
        """Tokens read from each source so far (inputs, as the run's `tokens` counts them) and its epoch."""
        counts = zip(self.labels, self.counts, strict=True)
        tokens = {f"data/tokens/{label}": count * self.seq_len for label, count in counts}
        return tokens | {f"data/epoch/{label}": epoch for label, epoch in zip(self.labels, self._epochs, strict=True)}

    def take_events(self) -> list[str]:
        """The sources that started a new epoch since the last call, as log lines."""
        events, self._events = self._events, []
        return events

    def _position(self, steps: int, counts: list[int], sequences_done: int) -> dict[str, Any]:
        return {
            "format_version": MIX_FORMAT_VERSION,
            "kind": KIND,
            "sources": [
                {"name": name, "weight": weight, "data": fp, "state": loader.state_dict()}
                for name, weight, fp, loader in zip(
                    self.names, self.given_weights, self.fingerprints, self.loaders, strict=True
                )
            ],
            "counts": list(counts),
            "steps": steps,
            "sequences_done": sequences_done,  # of the step `steps` (0: none of it drawn yet)
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "sequences_per_step": self.sequences_per_step,
        }

    def state_dict(self) -> dict[str, Any]:
        """The position: between steps, the sources' states now; within a step, the state before it was
        drawn and how many of its sequences were taken (it is drawn again on resume)."""
        if self._before is not None and self._taken < len(self._micro):
            return {**self._before, "sequences_done": self._taken * self.global_batch}
        return self._position(self.steps, self.counts, 0)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was taken. Another list of sources, other weights or other shards
        of a source are refused, naming them; so are another seed, seq_len or sequences_per_step. The
        number of processes may change (every rank draws the whole step)."""
        if state.get("format_version") != MIX_FORMAT_VERSION or state.get("kind") != KIND:
            raise ValueError(f"the saved loader state is not a data mixture's (format {state.get('format_version')!r})")
        saved = [(s["name"], s["weight"], s["data"]) for s in state["sources"]]
        mine = list(zip(self.names, self.given_weights, self.fingerprints, strict=True))
        if [(w, fp) for _, w, fp in saved] != [(w, fp) for _, w, fp in mine]:
            raise ValueError(
                f"cannot resume: the saved data mixture is {describe(saved)}, this run's {describe(mine)}; resume "
                "with the same sources and weights"
            )
        same = (("seed", self.seed), ("seq_len", self.seq_len), ("sequences_per_step", self.sequences_per_step))
        for key, value in same:
            if state[key] != value:
                raise ValueError(f"cannot resume: the saved data mixture has {key} {state[key]!r}, this run {value!r}")
        if state["sequences_done"] % self.global_batch:
            raise ValueError(
                f"cannot resume exactly: {state['sequences_done']} sequences of step {state['steps'] + 1} were taken, "
                f"not a whole number of micro-steps of batch_size {self.batch_size} x world_size {self.world_size}"
            )
        for name, loader, source in zip(self.names, self.loaders, state["sources"], strict=True):
            try:
                loader.load_state_dict(source["state"])
            except ValueError as err:
                raise ValueError(f"data source {name}: {err}") from err
        self.counts, self.steps = [int(c) for c in state["counts"]], int(state["steps"])
        self._epochs = [self._epoch(i) for i in range(len(self.loaders))]
        self._micro, self._taken, self._before, self._events = [], 0, None, []
        if state["sequences_done"]:
            self._draw_step()
            self._taken = state["sequences_done"] // self.global_batch


def describe(parts: Sequence[tuple[str, float, str]]) -> str:
    """(name, weight, fingerprint) triples as 'name:weight (shards FP), ...'."""
    return ", ".join(f"{name}:{weight:g} (shards {fp})" for name, weight, fp in parts)
