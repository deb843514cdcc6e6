"""The divergence guard of long unattended runs.

- A step whose loss or gradient norm is NaN or infinite is skipped: `gpt2_scratch.training.step.train_step` does not
  apply its update, and the guard counts it (`skipped_steps` in log.jsonl).
- Under fp16 the loss scaler handles overflowing gradients itself: it skips the update and halves the
  scale, which is normal in the first steps of fp16 training. Such a step is logged as `overflow` with
  the new `loss_scale` and counted (`overflow_steps`), not judged bad; only a non-finite loss, or a scale
  that keeps collapsing (an overflow that leaves it below `MIN_LOSS_SCALE`: gradients that overflow even
  unscaled), counts as a bad step.
- A loss above `spike_factor` times the median of the last `spike_window` healthy losses is a spike:
  logged and counted; its update is applied (as in llm.c, a spike alone is no reason to stop).
- After `max_bad_steps` bad steps (skipped or spiking) in a row the run rolls back to the newest
  checkpoint whose weights are all finite, and goes on from the data that follows the bad steps: the
  batches between that checkpoint and the last bad step are skipped (PaLM, Chowdhery et al. 2022,
  section 5.1: restart about 100 steps before the spike and skip 200 to 500 batches). The loader's
  position makes this exact, so two identical runs roll back identically.
- After `max_rollbacks` rollbacks the next bad streak stops the run: one `error:` line, exit status 3.

Checkpoints wait while a bad streak lasts, so the rollback target is always older than the streak,
and `save` refuses weights that are not finite: no checkpoint, export or push ever holds them.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from pathlib import Path

import torch
from accelerate import Accelerator

from gpt2_scratch.training import UserError
from gpt2_scratch.training.checkpoints import TrainState, load_checkpoint, newest_finite_checkpoint
from gpt2_scratch.training.config import TrainConfig
from gpt2_scratch.training.processes import on_main_process

logger = logging.getLogger("train")

MIN_HISTORY = 5  # healthy losses needed before a spike can be judged
# Below this the scale no longer scales up small gradients (the point of it) but shrinks them: gradients
# that overflow even so have diverged (fp16 training starts at 65536 and settles in the thousands).
MIN_LOSS_SCALE = 1.0


class DivergedError(UserError):
    """The run diverged and rolling back did not help (or there is nothing to roll back to): exit 3."""

    exit_status = 3


class Guard:
    """Judges each step's (all-reduced, so on every rank the same) loss and gradient norm."""

    def __init__(self, config: TrainConfig) -> None:
        self.spike_factor = config.spike_factor
        self.max_bad_steps = config.max_bad_steps
        self.max_rollbacks = config.max_rollbacks
        self.recent: deque[float] = deque(maxlen=config.spike_window)
        self.streak = 0  # bad steps in a row
        self.skipped = 0  # updates skipped, over the whole run
        self.spikes = 0
        self.overflows = 0  # updates the fp16 loss scaler skipped, over the whole run

    def judge(
        self, loss: float, grad_norm: float, overflow: bool = False, loss_scale: float | None = None
    ) -> dict[str, float | str | bool] | None:
        """None for a healthy step; else what was wrong (or, for a loss-scale overflow, what the scaler
        did), as fields of its log record. `overflow` and `loss_scale`: `gpt2_scratch.training.step.StepResult`'s."""
        if overflow and math.isfinite(loss):
            self.overflows += 1
            if loss_scale is not None and loss_scale < MIN_LOSS_SCALE:
                self.streak += 1
                self.skipped += 1
                return {"skipped": f"loss scale collapsed to {loss_scale:.3g} (gradients overflow unscaled)"}
            return {"overflow": True}  # the scaler's own handling: neither bad nor a loss to judge spikes by
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.streak += 1
            self.skipped += 1
            return {"skipped": "non-finite loss" if not math.isfinite(loss) else "non-finite grad_norm"}
        if self.spike_factor > 0 and len(self.recent) >= min(MIN_HISTORY, self.recent.maxlen):
            median = statistics.median(self.recent)
            if loss > self.spike_factor * median:  # not added to `recent`: a run of spikes stays visible
                self.streak += 1
                self.spikes += 1
                return {"spike": loss / median, "median_loss": median}
        self.streak = 0
        self.recent.append(loss)
        return None

    def state_dict(self) -> dict:
        """What a checkpoint keeps (in train_state.json), so that a resumed run judges as this one would."""
        return {
            "recent": list(self.recent),
            "streak": self.streak,
            "skipped": self.skipped,
            "spikes": self.spikes,
            "overflows": self.overflows,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`; an empty one (a checkpoint from before the guard) changes nothing."""
        if not state:
            return
        recent = state.get("recent")
        counts = [state.get(key) for key in ("streak", "skipped", "spikes")] + [state.get("overflows", 0)]
        if not isinstance(recent, list) or not all(type(x) in (int, float) and math.isfinite(x) for x in recent):
            raise ValueError(f"guard: recent losses must be finite numbers, got {recent!r}")
        if not all(type(n) is int and n >= 0 for n in counts):
            raise ValueError(f"guard: counts must be non-negative integers, got {counts!r}")
        self.recent.clear()
        self.recent.extend(recent)
        self.streak, self.skipped, self.spikes, self.overflows = counts

    @property
    def must_roll_back(self) -> bool:
        return self.max_bad_steps > 0 and self.streak >= self.max_bad_steps


def weights_finite(model: torch.nn.Module, accelerator: Accelerator) -> bool:
    """Whether every weight is finite, on every rank (each checks its own shard under FSDP)."""
    shards = (p.to_local() if hasattr(p, "to_local") else p for p in model.parameters())  # FSDP2: DTensors
    bad = sum(int(not torch.isfinite(shard).all()) for shard in shards)
    if accelerator.num_processes == 1:
        return bad == 0
    flag = torch.tensor(float(bad), device=accelerator.device)
    return float(accelerator.reduce(flag, reduction="sum")) == 0


def roll_back(accelerator: Accelerator, checkpoints: Path, state: TrainState, guard: Guard, why: str) -> dict:
    """Load the newest finite checkpoint (model, optimizer, RNG, step) but keep the loader where it is,
    so the data of the bad steps is not seen again. Raises `DivergedError` when the rollbacks are used
    up or there is no finite checkpoint. Returns the rollback's log record fields."""
    bad_step, position, rollbacks = state.step, state.loader.state_dict(), state.rollbacks
    folder = on_main_process(accelerator, lambda: newest_finite_checkpoint(checkpoints))
    streak = f"{guard.streak} bad steps in a row up to step {bad_step} (last: {why})"
    if folder is None:
        raise DivergedError(
            f"training diverged: {streak}, and there is no checkpoint with finite weights to roll back to; lower "
            "--max_lr, or save earlier with a smaller --save_interval"
        )
    if rollbacks >= guard.max_rollbacks:
        raise DivergedError(
            f"training diverged: {streak} after {rollbacks} rollbacks (max_rollbacks); the newest finite "
            f"checkpoint is {folder}. Lower --max_lr and start a new run from it (--init_from), or raise "
            "--max_rollbacks"
        )
    load_checkpoint(accelerator, folder, state)
    state.loader.load_state_dict(position)
    state.rollbacks = rollbacks + 1
    guard.streak = 0
    logger.warning(
        "%s: rolled back to %s (rollback %d of %d), skipping the data of steps %d to %d",
        streak,
        folder.name,
        state.rollbacks,
        guard.max_rollbacks,
        state.step + 1,
        bad_step,
    )
    return {"rollback": state.rollbacks, "from_step": bad_step, "skipped_data_steps": bad_step - state.step}
