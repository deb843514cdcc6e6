"""What all processes of a launch must agree on: a result computed once, a request to stop."""

from __future__ import annotations

import logging
import signal
import time
import typing
from typing import Any

import torch
from accelerate import Accelerator

from gpt2_scratch.training import UserError, stop_signals

logger = logging.getLogger("train")


def on_main_process(accelerator: Accelerator, fn: typing.Callable[[], Any]) -> Any:
    """`fn()` on the main process while the other ranks wait; its result, or its error, reaches every
    rank, so that all of them go on or stop together (an unexpected error as a RuntimeError naming it)."""
    from accelerate.utils import broadcast_object_list

    result, error, shared = None, None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except Exception as err:
            error = err
            ours = isinstance(err, UserError)
            shared = err if ours else RuntimeError(f"on the main process: {type(err).__name__}: {err}")
    result, shared = broadcast_object_list([result, shared])
    if error is not None:
        raise error
    if shared is not None:
        raise shared
    return result


# The exit status of a run stopped by its time limit or SIGUSR1 (what SLURM's `--signal` sends before the
# job's end): unfinished, checkpointed, to be requeued. EX_TEMPFAIL of sysexits.h: "try again later".
REQUEUE_STATUS = 75


class StopRequest:
    """SIGTERM / SIGINT (preemption, Ctrl-C) ask the loop to checkpoint and stop after the current step;
    so do SIGUSR1 and the end of `time_limit` seconds after `started` (time.monotonic), and those two
    ask to be requeued (`requeue`).

    A second signal gets the previous handler, so a stuck run can still be interrupted. A signal that
    came before, while `stop_signals.catch_early` held them, counts as the first.
    """

    def __init__(self, time_limit: float | None = None, started: float | None = None) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}
        self.deadline = None if time_limit is None else (started or time.monotonic()) + time_limit
        self.requeue = False

    def __enter__(self) -> StopRequest:
        for sig in stop_signals.STOP_SIGNALS:
            self.previous[sig] = signal.signal(sig, self.handle)
        originals, pending = stop_signals.hand_over()
        self.previous.update(originals)  # not the early catch's: a second signal must reach Python's default
        if pending is not None:
            logger.warning("%s received while starting: stopping before the first step", signal.Signals(pending).name)
            self.signum = pending
            self.__exit__()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum: int, frame) -> None:
        self.signum = signum
        logger.warning("%s received: saving a checkpoint after this step", signal.Signals(signum).name)
        self.__exit__()

    def requested(self, accelerator: Accelerator) -> bool:
        """Whether any rank got a signal or reached the time limit; agreed on by all ranks so that they
        save together (and agree on `requeue`)."""
        timed_out = self.deadline is not None and time.monotonic() >= self.deadline
        flags = [self.signum is not None or timed_out, self.signum == signal.SIGUSR1 or timed_out]
        if accelerator.num_processes > 1:
            summed = accelerator.reduce(torch.tensor(flags, dtype=torch.float32, device=accelerator.device), "sum")
            flags = [bool(f > 0) for f in summed.tolist()]
        if timed_out and self.signum is None:
            logger.warning("time_limit reached: saving a checkpoint after this step")
        self.requeue = flags[1]
        return flags[0]
