"""The stop signals from the first moment of the trainer's process, before torch is even imported.

A scheduler may send its SIGUSR1 (SLURM's `--signal`) or SIGTERM at any time, also while the trainer
still imports its libraries or prepares data: with Python's default action that kills the job (srun's
"User defined signal 1", no requeue). `catch_early`, called first thing by `train_accelerate.py` when
run as a script, records such a signal instead; the training loop's `processes.StopRequest` takes it
over (`hand_over`) and stops before its first step with the requeue status. It also notes when the
process started, from which `--time_limit` counts. Standard library only: it runs before any import.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from typing import Any

# What the training loop answers (Windows has no SIGUSR1).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))
# What a scheduler sends (SLURM's --signal, a preemption). Not SIGINT: a Ctrl-C while the run starts
# loses nothing, and ends it at once, as a user expects.
EARLY_SIGNALS = tuple(sig for sig in STOP_SIGNALS if sig != signal.SIGINT)

_originals: dict[int, Any] = {}  # the handlers before catch_early, while it is in force
_pending: int | None = None  # the first stop signal that came while it was
_started: float | None = None  # time.monotonic() at the process's start, once catch_early ran


def process_start() -> float:
    """`time.monotonic()` at the moment this process started: on Linux from its start time in
    /proc/self/stat (clock ticks since boot, CLOCK_BOOTTIME), elsewhere now."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # after the command name, which may hold spaces
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, AttributeError):  # not Linux
        return time.monotonic()
    return time.monotonic() - max(0.0, age)


def catch_early() -> None:
    """Record the first of `EARLY_SIGNALS` from now until `hand_over`; a second one gets the handler
    from before (the default: the process ends), so that a stuck start can still be ended."""
    global _started
    _started = process_start()
    for sig in EARLY_SIGNALS:
        _originals[sig] = signal.signal(sig, _record)


def _record(signum: int, frame: Any) -> None:
    global _pending
    if _pending is None:
        _pending = signum  # reported by StopRequest: printing here could interrupt a print in progress
    for sig, handler in _originals.items():
        signal.signal(sig, handler)


def hand_over() -> tuple[dict[int, Any], int | None]:
    """End the early catch: the handlers from before it (none if it never ran) and the signal it
    recorded (None if none came). Call it once the loop's own handlers are installed, so that no
    signal falls between the two."""
    global _pending
    originals, pending = dict(_originals), _pending
    _originals.clear()
    _pending = None
    return originals, pending


def pending() -> int | None:
    """The stop signal recorded while starting and not yet handed over, if any."""
    return _pending


class SecondSignal:
    """A second stop signal ends the process at once, even while its main thread is blocked in C++ (a
    collective waiting for a stalled rank): Python runs signal handlers only in the main thread, between
    bytecodes, so the handler that would have given the second signal the default action never ran,
    and SIGINT twice then SIGTERM left a stuck run running. Python's own C handler still writes each
    signal's number to the wakeup fd (`signal.set_wakeup_fd`) from whatever thread the signal lands
    on; a thread reads it and, at the second of `STOP_SIGNALS` (the first recorded while starting
    counts), writes one line and exits with 128 + the signal's number, as a shell reports a killed
    process. Where the first one was handled, its handler restored the default action and the kernel
    ends the process before this thread hears the second. Main thread only; elsewhere it does nothing."""

    def __init__(self) -> None:
        self._reader: socket.socket | None = None
        self._writer: socket.socket | None = None
        self._previous = -1
        self._thread: threading.Thread | None = None

    def __enter__(self) -> SecondSignal:
        if threading.current_thread() is not threading.main_thread():
            return self
        self._reader, self._writer = socket.socketpair()
        self._writer.setblocking(False)
        self._previous = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        seen = 0 if _pending is None else 1
        self._thread = threading.Thread(target=self._watch, args=(seen,), name="second-signal", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            return
        signal.set_wakeup_fd(self._previous)
        self._writer.close()  # reader.recv returns b"": the thread ends
        self._thread.join()
        self._reader.close()

    def _watch(self, seen: int) -> None:
        while data := self._reader.recv(64):
            for signum in data:
                if signum not in STOP_SIGNALS:
                    continue
                seen += 1
                if seen >= 2:
                    name = signal.Signals(signum).name
                    os.write(2, f"{name} again, while the run is blocked: ending the process now\n".encode())
                    os._exit(128 + signum)


def process_started() -> float | None:
    """When the process started (`time.monotonic()`), if `catch_early` ran: the trainer as a script."""
    return _started
