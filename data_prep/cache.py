"""A local cache of a remote store's shards, bounded in size, with the next shard fetched in the background.

The cache folder holds a copy of the store's `manifest.json` and the shards fetched so far, under their
own names, so that it reads like a local data folder (the validation shards stay in it for the whole
run). A shard enters the cache only once its size and sha256 match the manifest (`fetch_shard`), and a
shard already there from an earlier run is hashed again the first time this process uses it: nothing is
trained on unverified bytes.

With a size limit, the least recently used shards are removed to make room, never a validation shard,
one the loader is reading or the one being fetched for it. Downloads hold a lock on the folder, so the
processes of one machine share one cache and never fetch two shards at once: the folder never holds
more than the limit.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.shards import MANIFEST_NAME, ShardError, check_shard, file_sha256, load_tokens
from data_prep.store import DataStore, Retrying, StoreError, fetch_shard, shard_bytes

logger = logging.getLogger("data_prep.cache")

LOCK_NAME = ".lock"


class NoRoom(StoreError):
    """The cache cannot take one more shard without removing one in use."""


class ShardCache:
    """The shards of `store` in `folder`, at most `limit_bytes` of them (None: no limit)."""

    def __init__(
        self,
        store: DataStore,
        manifest: dict[str, Any],
        folder: str | os.PathLike,
        limit_bytes: int | None = None,
        retrying: Retrying | None = None,
        log: logging.Logger = logger,
    ) -> None:
        self.log = log  # the trainer's logger: its log says when a shard is late
        self.store, self.folder, self.limit = store, Path(folder), limit_bytes
        self.manifest = manifest
        self.entries = {entry["file"]: entry for entry in manifest["shards"]}
        self.kept = {name for name, entry in self.entries.items() if entry["split"] == "val"}
        self.retrying = retrying or Retrying()
        self.pinned: set[str] = set()  # shards the loader reads now
        self.verified: set[str] = set()  # hashed by this process since they entered the folder
        self.errors: dict[str, BaseException] = {}  # a failed background fetch: tried again when the shard is needed
        self.thread: tuple[str, threading.Thread] | None = None
        self.upcoming: str | None = None
        self.waited = 0.0  # seconds the loader waited for shards, since the last `take_waited`
        self.peak = 0  # the largest the folder was seen, in bytes

    # ------------------------------------------------------------------------------------------
    # Set up

    def prepare(self) -> None:
        """The folder with the manifest copy, and the validation shards fetched and verified. The limit
        must hold the validation shards and two training shards: a batch can span two."""
        self.folder.mkdir(parents=True, exist_ok=True)
        copy = self.folder / MANIFEST_NAME
        body = json.dumps(self.manifest, indent=2) + "\n"
        if not copy.is_file() or copy.read_text() != body:
            tmp = copy.with_name(f".{MANIFEST_NAME}.{os.getpid()}.tmp")
            tmp.write_text(body)
            os.replace(tmp, copy)
        if self.limit is not None:
            kept = sum(shard_bytes(self.entries[name]) for name in self.kept)
            largest = max((shard_bytes(e) for e in self.entries.values() if e["split"] == "train"), default=0)
            if kept + 2 * largest > self.limit:
                raise StoreError(
                    f"--data_cache_gb {self.limit / 1e9:g} cannot hold the validation shards ({kept / 1e9:.3g} GB) "
                    f"and two of the largest training shards ({largest / 1e9:.3g} GB each; a batch can span two): "
                    f"give at least {(kept + 2 * largest) / 1e9:.3g}"
                )
        self.pinned = set()
        for name in sorted(self.kept):
            self.local(name)
        self.take_waited()

    # ------------------------------------------------------------------------------------------
    # What the loader calls

    def local(self, name: str) -> Path:
        """The verified local copy of shard `name`, fetched now if the background fetch has not done it."""
        path = self.folder / name
        ready = name in self.verified and path.is_file()
        started = time.perf_counter()
        if not ready:
            self.log.info("waiting for shard %s from %s", name, self.store.url)
        self.join(name)
        if (failed := self.errors.pop(name, None)) is not None:  # the store may be back: fetch now, with retries
            self.log.warning("fetching %s ahead failed (%s); fetching it now", name, failed)
        path = self.ensure(name)
        if not ready:
            waited = time.perf_counter() - started
            self.waited += waited
            self.log.info("shard %s ready after %.2fs", name, waited)
        return path

    def open(self, entry: dict[str, Any], vocab_size: int | None = None) -> np.ndarray:
        """Shard `entry`'s tokens, memory-mapped from its verified copy in the cache (its header and, with
        `vocab_size`, its token ids checked). Once mapped, the tokens stay readable even if another
        process removes the file; removed in the moment before, it is fetched again."""
        name = entry["file"]
        for _ in range(3):
            path = self.local(name)
            try:
                check_shard(self.folder, entry, verify_hash=False, vocab_size=vocab_size)
                return load_tokens(path, mmap=True)
            except (ShardError, FileNotFoundError):
                if path.is_file():
                    raise
                self.verified.discard(name)  # another process made room meanwhile
        raise ShardError(f"{self.folder / name}: removed from the cache each time it was fetched; raise data_cache_gb")

    def use(self, names: Iterable[str], upcoming: str | None) -> None:
        """The loader reads `names` now and `upcoming` next: this process evicts none of them to fetch ahead,
        and only `upcoming` to fetch a shard it needs now."""
        self.pinned = set(names)
        self.upcoming = upcoming

    def fetch_ahead(self) -> None:
        """Fetch the upcoming shard (see `use`) in the background, when the cache has room for it."""
        upcoming = self.upcoming
        if upcoming is None or upcoming in self.errors:
            return
        if upcoming in self.verified and (self.folder / upcoming).is_file():
            return
        if self.thread is not None:
            if self.thread[1].is_alive():
                return  # one fetch at a time
            self.thread = None
        thread = threading.Thread(target=self.prefetch, args=(upcoming,), name=f"prefetch-{upcoming}", daemon=True)
        self.thread = (upcoming, thread)
        thread.start()

    def take_waited(self) -> float:
        """Seconds the loader waited for shards since the last call."""
        waited, self.waited = self.waited, 0.0
        return waited

    # ------------------------------------------------------------------------------------------
    # Fetching

    def prefetch(self, name: str) -> None:
        try:
            self.ensure(name, wait_for_room=False)
        except NoRoom:
            pass  # fetched when needed, once the shard in use has been released
        except Exception as err:  # raised by `local` when the loader needs this shard
            self.errors[name] = err

    def join(self, name: str) -> None:
        if self.thread is not None and self.thread[0] == name:
            self.thread[1].join()
            self.thread = None

    def ensure(self, name: str, wait_for_room: bool = True) -> Path:
        """The shard in the folder and verified by this process: fetched if absent, re-fetched if the
        copy there no longer matches the manifest (or was removed by another process meanwhile)."""
        entry, path = self.entries[name], self.folder / name
        for _ in range(3):
            if not path.is_file():
                self.download(entry, wait_for_room)
            try:
                if name not in self.verified:
                    if path.stat().st_size != shard_bytes(entry) or file_sha256(path) != entry["sha256"]:
                        self.log.warning("cached %s does not match the manifest: fetching it again", path)
                        path.unlink(missing_ok=True)
                        continue
                    self.verified.add(name)
                os.utime(path)  # most recently used
                return path
            except FileNotFoundError:  # removed by another process's eviction: fetch it again
                self.verified.discard(name)
        raise ShardError(f"{path}: the cached copy keeps disappearing or changing; is another program using the cache?")

    def download(self, entry: dict[str, Any], wait_for_room: bool) -> None:
        with self.locked():
            path = self.folder / entry["file"]
            if path.is_file():  # another process fetched it meanwhile
                return
            self.make_room(shard_bytes(entry), wait_for_room)
            fetch_shard(self.store, entry, path, self.retrying)
            self.verified.add(entry["file"])
            self.peak = max(self.peak, self.size())

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Held while a shard is fetched: by one thread of one process of this machine at a time."""
        with open(self.folder / LOCK_NAME, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def files(self) -> list[Path]:
        """The shard files (and partial downloads) in the folder."""
        return [p for p in self.folder.iterdir() if p.name != LOCK_NAME and p.name != MANIFEST_NAME and p.is_file()]

    def size(self) -> int:
        total = 0
        for path in self.files():
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                pass
        return total

    def make_room(self, incoming: int, wait_for_room: bool) -> None:
        """Remove least recently used shards until `incoming` more bytes fit under the limit; never a
        kept (validation) or pinned one, nor for a fetch ahead (`wait_for_room` False) the upcoming one.
        NoRoom when that is not enough."""
        for stale in self.folder.glob(".*.tmp"):  # `.NAME.PID.tmp`: a shard download cut short by a kill
            if stale.name[1:].rsplit(".", 2)[0] in self.entries:  # (downloads hold the lock: none is under way)
                stale.unlink(missing_ok=True)
        if self.limit is None:
            return
        used = self.size()
        protected = self.kept | self.pinned | (set() if wait_for_room else {self.upcoming})
        evictable = [p for p in self.files() if p.name in self.entries and p.name not in protected]
        evictable.sort(key=lambda p: p.stat().st_mtime)
        while used + incoming > self.limit and evictable:
            victim = evictable.pop(0)
            used -= victim.stat().st_size
            victim.unlink()
            self.verified.discard(victim.name)
            self.log.info("data cache: removed %s (least recently used), limit %.3g GB", victim.name, self.limit / 1e9)
        if used + incoming > self.limit:
            message = (
                f"the data cache {self.folder} cannot take {incoming:,} more bytes within --data_cache_gb "
                f"{self.limit / 1e9:g}: the shards in use hold {used:,}"
            )
            raise NoRoom(message) if not wait_for_room else StoreError(message + "; raise --data_cache_gb")
