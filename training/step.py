"""One optimizer step of the hand-written loop: accumulate gradients over micro-batches, clip, step
(unless the loss or the gradient norm is not finite: such an update never reaches the weights)."""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator


def train_step(model, optimizer, loader, accelerator: Accelerator, grad_clip: float) -> tuple[float, float]:
    """One optimizer step over `gradient_accumulation_steps` micro-batches.

    `accelerator.backward` divides each micro-batch loss by the number of micro-steps and DDP averages
    over ranks, so the gradient is that of the mean loss over the whole `total_batch_size`; gradients
    are all-reduced only on the last micro-step. Returns that mean loss and the pre-clip grad norm.

    The update is skipped when either is NaN or infinite (the caller's `Guard.judge` sees the same two
    numbers). Both are reduced over all ranks first (the loss averaged, the norm taken of all-reduced
    gradients), so every rank sees the same two numbers and skips the same steps. They reach the host
    in one copy, before the update is queued: one device sync per step, as nanoGPT's `loss.item()`,
    and the next step's forward is queued while the update still runs on the device.
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
    if math.isfinite(loss) and math.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm
