"""What all processes of a launch must agree on: a result computed once, a request to stop."""

from __future__ import annotations

import logging
import signal
import typing
from typing import Any

import torch
from accelerate import Accelerator

from training import UserError

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


class StopRequest:
    """SIGTERM / SIGINT (preemption, Ctrl-C) ask the loop to checkpoint and stop after the current step.

    A second signal gets the previous handler, so a stuck run can still be interrupted.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum: int, frame) -> None:
        self.signum = signum
        logger.warning("%s received: saving a checkpoint after this step", signal.Signals(signum).name)
        self.__exit__()

    def requested(self, accelerator: Accelerator) -> bool:
        """Whether any rank got a signal; agreed on by all ranks so that they save together."""
        if accelerator.num_processes == 1:
            return self.signum is not None
        flag = torch.tensor(float(self.signum is not None), device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum") > 0)
