"""The GPT-3 recipe (Brown et al. 2020, section 2.3 and appendix B) as build-nanogpt runs it: batch
arithmetic, the LR schedule as a pure function of the step, AdamW parameter groups, precision.
"""

from __future__ import annotations

import math

import torch

from training.config import ConfigError, TrainConfig, batch_problem


def grad_accum_steps(config: TrainConfig, world_size: int) -> int:
    """Micro-steps per optimizer step so that one step sees exactly `total_batch_size` tokens."""
    problem = batch_problem(config, world_size)
    if problem:
        raise ConfigError(problem)
    return config.total_batch_size // (config.micro_batch_size * config.seq_len * world_size)


def lr_at(step: int, config: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warmup, then cosine to the minimum.

    The GPT-3 schedule as build-nanogpt writes it: step s < warmup gets max_lr * (s + 1) / warmup; from
    the end of warmup to max_steps a half cosine from max_lr down to min_lr_ratio * max_lr.
    """
    max_lr, min_lr = config.max_lr, config.max_lr * config.min_lr_ratio
    if step < config.warmup_steps:
        return max_lr * (step + 1) / config.warmup_steps
    if step >= config.max_steps:
        return min_lr
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embeddings (2+ dimensions), none on biases and LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the GPT-3 betas and epsilon; the fused kernel on CUDA and on CPU (both in torch >= 2.4),
    which the benchmark measured as the faster CPU step too."""
    return torch.optim.AdamW(
        param_groups(model, config.weight_decay),
        lr=lr_at(0, config),
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_eps,
        fused=device.type in ("cuda", "cpu"),
    )


def resolve_mixed_precision(setting: str) -> str:
    """'auto' becomes bf16 on CUDA that runs it natively, else 'no': on CPUs without AVX-512 BF16 or AMX
    bf16 matmuls are emulated (~100x slower), and where they are native (measured 1.5x faster than fp32
    on a Zen 4 in docs/benchmarks.md) `--mixed_precision bf16` is an explicit choice."""
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
