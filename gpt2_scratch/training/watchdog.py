"""A stalled rank ends the run in seconds to minutes, with one line naming it, instead of leaving the
others waiting in a collective for the process group's timeout (gloo's default was 30 minutes).

Every rank runs a `StallWatchdog` thread during the training loop. Each second it publishes a heartbeat
(a counter that only this thread advances) and the rank's last finished step to the launch's own
key-value store (the TCPStore of the process group's rendezvous, through a connection of its own), and
reads the others'. When this rank has finished no step for `stall_limit` seconds (far longer than its
recent steps, and well within `collective_timeout`), it looks for the rank that holds it up: one whose
heartbeat stopped (a stopped, dead or frozen process), else one still at an earlier step (its main
thread stuck while its process lives). It prints one `error:` line naming that rank and ends this
process at once with `STALL_STATUS`; nothing is written, so the newest complete checkpoint stays the
run's state and `--resume auto` continues from it. When every rank answers at the same step (a long
evaluation on all of them, or a rank whose main thread is stuck within a step while its heartbeat
goes on: the two look alike from here), it waits; the process group's timeout is the last resort. When
that timeout ends a collective (gloo raises "Timed out waiting ..."), the watchdog's `with` block ends
the process the same way, with one line and `STALL_STATUS`, not a traceback and status 1 (which a
requeue script takes for a crash).
"""

from __future__ import annotations

import collections
import datetime
import os
import socket
import statistics
import threading
import time

import torch.distributed as dist

# The exit status of a rank that gave up on a stalled one: unfinished, resumable from the newest
# checkpoint (what 75 means too), but worth a look at the named rank's node first. EX_PROTOCOL of sysexits.h.
STALL_STATUS = 76
STEP_FACTOR = 20  # a stall is this many times the median of the recent step times, at least
PREFIX = "gpt2_scratch/watchdog/"


def stall_limit(collective_timeout: float, step_times: list[float]) -> float:
    """Seconds without a finished step after which a rank that holds the others up is called stalled:
    STEP_FACTOR times the median recent step, at least a quarter of the collective timeout (a slow
    step is no stall) and at most half of it (to speak before the process group's own timeout)."""
    typical = STEP_FACTOR * statistics.median(step_times) if step_times else 0.0
    return min(collective_timeout / 2, max(collective_timeout / 4, typical))


class StallWatchdog:
    """The heartbeat thread of one rank (see the module doc); with one process it does nothing. Call
    `progress(step)` after every step; the judging starts with the first."""

    def __init__(self, collective_timeout: float, rank: int, world_size: int, interval: float = 1.0) -> None:
        self.timeout, self.rank, self.world_size = collective_timeout, rank, world_size
        self.interval = min(interval, collective_timeout / 16)
        self.step = -1  # not yet published: no step finished
        self.last_progress: float | None = None
        self.step_times: collections.deque[float] = collections.deque(maxlen=50)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> StallWatchdog:
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            store = dist.distributed_c10d._get_default_store().clone()  # a connection of its own
            store.set_timeout(datetime.timedelta(seconds=max(1.0, 2 * self.interval)))
            self._thread = threading.Thread(target=self._watch, args=(store,), name="stall-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None and exc is not None and is_collective_timeout(exc):
            self._timed_out()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def progress(self, step: int) -> None:
        now = time.monotonic()
        if self.last_progress is not None:
            self.step_times.append(now - self.last_progress)
        self.step, self.last_progress = step, now

    def _watch(self, store: dist.Store) -> None:
        host, beat = socket.gethostname(), 0
        peers = [r for r in range(self.world_size) if r != self.rank]
        heard = dict.fromkeys(peers, time.monotonic())  # when each peer's heartbeat last changed
        seen: dict[int, tuple[str, int, str]] = {}  # each peer's last (heartbeat, step, host)
        while not self._stop.wait(self.interval):
            beat += 1
            try:  # three requests a second per rank, once every rank has written: set, check, read all
                store.set(f"{PREFIX}{self.rank}", f"{beat} {self.step} {host}")
                keys = [f"{PREFIX}{r}" for r in peers]
                if store.check(keys):
                    values = dict(zip(peers, store.multi_get(keys), strict=True))
                else:  # some have not written yet (or never will): those that have
                    values = {r: store.get(key) for r, key in zip(peers, keys, strict=True) if store.check([key])}
                for r, value in values.items():
                    count, step, where = value.decode().split(" ", 2)
                    if seen.get(r, ("",))[0] != count:
                        heard[r] = time.monotonic()
                    seen[r] = (count, int(step), where)
            except dist.DistError:  # the store's host (rank 0 under srun) does not answer: its peers fall silent
                pass
            if self.last_progress is None:
                continue
            waited = time.monotonic() - self.last_progress
            limit = stall_limit(self.timeout, list(self.step_times))
            if waited < limit:
                continue
            now = time.monotonic()
            silent = [r for r in peers if now - heard[r] >= limit / 2]
            behind = [r for r in peers if r in seen and seen[r][1] < self.step]
            if silent or behind:
                self._give_up(silent or behind, bool(silent), waited, seen)

    def _timed_out(self) -> None:
        self._end(
            f"a collective on rank {self.rank} ({socket.gethostname()}) waited --collective_timeout {self.timeout:g} s "
            f"after step {self.step}, while every rank's heartbeat went on at that step: one is stuck within the "
            "next step (its process alive), or a step outlasts the timeout"
        )

    def _give_up(self, ranks: list[int], silent: bool, waited: float, seen: dict) -> None:
        names = ", ".join(f"rank {r}" + (f" on {seen[r][2]}" if r in seen else "") for r in ranks)
        why = "has not answered (stopped, dead or frozen)" if silent else "is still at an earlier step (stuck)"
        recent = statistics.median(self.step_times) if self.step_times else 0.0
        self._end(
            f"{names} {why}: rank {self.rank} finished no step for {waited:.0f} s after step {self.step} "
            f"(recent steps {recent:.2f} s, --collective_timeout {self.timeout:g} s)"
        )

    @staticmethod
    def _end(what: str) -> None:
        """Say `what` stalled in one line and end the process now: nothing is written, and no collective is
        waited for."""
        line = f"\nerror: stalled: {what}; ending with status {STALL_STATUS}: --resume auto continues from the "
        line += "newest checkpoint\n"
        os.write(2, line.encode())  # its own line after a progress bar; not through logging (its lock may be held)
        os._exit(STALL_STATUS)


def is_collective_timeout(err: BaseException) -> bool:
    """A collective that the process group's timeout ended: gloo raises a RuntimeError "Timed out waiting
    Nms for recv operation to complete"; torch's DistBackendError names a timeout (NCCL mostly aborts the
    process from its own watchdog instead, which a requeue script sees as 128 + SIGABRT)."""
    text = str(err)
    if isinstance(err, dist.DistBackendError):
        return "timeout" in text.lower() or "timed out" in text.lower()
    return isinstance(err, RuntimeError) and "Timed out waiting" in text
