"""One optimizer step of the hand-written loop: accumulate gradients over micro-batches, clip, step.

Without loss scaling an update whose loss or gradient norm is not finite never reaches the weights: the
step is skipped here. Under fp16 the loss scaler decides instead: Accelerate's `AcceleratedOptimizer.step`
runs `scaler.step` (which skips the update when the unscaled gradients hold an inf or NaN) and then
`scaler.update` (which halves the scale after such a step). Skipping `optimizer.step()` here would skip
`scaler.update` too: the scale would never drop, every later step would overflow again, and the weights
would never change (issue 26). So under a scaler the step is always taken, and its outcome is reported.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from accelerate import Accelerator


class StepResult(NamedTuple):
    """What one optimizer step did, as the guard (`gpt2_scratch.training.guard.Guard.judge`) and the log read it."""

    loss: float  # the mean loss over the whole batch, all ranks
    grad_norm: float  # before clipping, of the unscaled gradients; inf or NaN when they overflowed
    overflow: bool = False  # the loss scaler found inf/NaN gradients and skipped the update
    loss_scale: float | None = None  # the scale after the step (after `scaler.update`); None without a scaler


def train_step(model, optimizer, loader, accelerator: Accelerator, grad_clip: float) -> StepResult:
    """One optimizer step over `gradient_accumulation_steps` micro-batches.

    `accelerator.backward` divides each micro-batch loss by the number of micro-steps and DDP averages
    over ranks, so the gradient is that of the mean loss over the whole `total_batch_size`; gradients
    are all-reduced only on the last micro-step. Returns that mean loss and the pre-clip grad norm (of the
    unscaled gradients: `clip_grad_norm_` unscales first under fp16), and, under a loss scaler, whether it
    skipped the update and the scale it leaves.

    Without a scaler the update is skipped when the loss or the norm is NaN or infinite (the caller's
    `Guard.judge` sees the same numbers). Both are reduced over all ranks first (the loss averaged, the
    norm taken of all-reduced gradients), so every rank sees the same two numbers and skips the same
    steps. They reach the host in one copy, before the update is queued: one device sync per step, as
    nanoGPT's `loss.item()`, and the next step's forward is queued while the update still runs on the
    device. Under a scaler `scaler.step` syncs once more to learn whether it found an overflow, and reading
    the new scale waits for the update: two syncs more, under fp16 only.
    """
    loss_sum = torch.zeros((), device=accelerator.device)
    for _ in range(accelerator.gradient_accumulation_steps):
        x, y = loader.next_batch()
        x, y = x.to(accelerator.device, non_blocking=True), y.to(accelerator.device, non_blocking=True)
        with accelerator.accumulate(model):
            loss = model(input_ids=x, shift_labels=y, loss_only=True).loss
            accelerator.backward(loss)
        loss_sum += loss.detach()
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2 may return the norm as a (replicated) DTensor
        grad_norm = grad_norm.full_tensor()
    loss = accelerator.reduce(loss_sum / accelerator.gradient_accumulation_steps, reduction="mean")
    loss, grad_norm = torch.stack([loss.float(), torch.as_tensor(grad_norm, device=loss.device).float()]).tolist()
    scaler = accelerator.scaler
    if scaler is not None:
        # clip_grad_norm_ has unscaled: only scaler.update() lets the next step unscale again, so step always.
        # The scale drops exactly when the scaler found an overflow (`backoff_factor` < 1). Accelerate's own
        # `step_was_skipped` misses it with fused AdamW, which takes the overflow flag into its kernel.
        before = scaler.get_scale()
        optimizer.step()
        after = scaler.get_scale()
        result = StepResult(loss, grad_norm, after < before, after)
    else:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            optimizer.step()
        result = StepResult(loss, grad_norm)
    optimizer.zero_grad(set_to_none=True)
    return result
