"""The GPT-3 recipe (Brown et al. 2020, section 2.3 and appendix B) as build-nanogpt runs it: batch
arithmetic, the LR schedule as a pure function of the step, AdamW parameter groups, precision; and,
with `--optimizer muon`, Muon (Jordan et al. 2024, `torch.optim.Muon`) for the blocks' weight matrices.
"""

from __future__ import annotations

import logging
import math

import torch
from accelerate.utils import DistributedType

from gpt2_scratch.training.config import ConfigError, TrainConfig, batch_problem
from gpt2_scratch.training.devices import fused_adamw_supported, resolve_precision

logger = logging.getLogger("train")


def grad_accum_steps(config: TrainConfig, world_size: int) -> int:
    """Micro-steps per optimizer step so that one step sees exactly `total_batch_size` tokens."""
    problem = batch_problem(config, world_size)
    if problem:
        raise ConfigError(problem)
    return config.total_batch_size // (config.micro_batch_size * config.seq_len * world_size)


def lr_at(step: int, config: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warmup, then `config.lr_schedule`.

    Warmup as build-nanogpt writes it: step s < warmup gets max_lr * (s + 1) / warmup. Then 'cosine', the
    GPT-3 schedule: from the end of warmup to max_steps a half cosine from max_lr down to
    min_lr = min_lr_ratio * max_lr. Or 'wsd' (warmup-stable-decay, Hagele et al. 2024, arXiv 2405.18392,
    section 3): max_lr until `decay_start`, then over the last `decay_steps` a decay to min_lr, at progress
    p = (s - decay_start) / decay_steps: 'linear' 1 - p, or '1-sqrt' 1 - sqrt(p), scaled between max_lr and
    min_lr, as the authors' `wsd_schedule` does with its final_lr_factor (epfml/schedules-and-scaling; the
    paper decays to 0: min_lr_ratio 0). Before its decay a wsd step's LR does not depend on max_steps,
    which is what lets a run be extended (`stable_step`).
    """
    max_lr, min_lr = config.max_lr, config.max_lr * config.min_lr_ratio
    if step < config.warmup_steps:
        return max_lr * (step + 1) / config.warmup_steps
    if step >= config.max_steps:
        return min_lr
    if config.lr_schedule == "wsd":
        start = decay_start(config)
        if step < start:
            return max_lr
        progress = (step - start) / (config.max_steps - start)
        remaining = 1.0 - (math.sqrt(progress) if config.decay_shape == "1-sqrt" else progress)
        return min_lr + remaining * (max_lr - min_lr)
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def decay_start(config: TrainConfig) -> int:
    """The first step of a wsd run's decay: max_steps - ceil(decay_fraction * max_steps) (floor((1 - fraction)
    * max_steps), never before the end of warmup). It never falls as max_steps grows, so the stable phase
    of a run is the start of the stable phase of any longer one."""
    return wsd_decay_start(config.max_steps, config.decay_fraction, config.warmup_steps)


def wsd_decay_start(max_steps: int, decay_fraction: float, warmup_steps: int) -> int:
    """`decay_start` of these settings (also those a checkpoint recorded)."""
    decay_steps = math.ceil(round(decay_fraction * max_steps, 9))  # 0.1 * 30 is 3.0000000000000004
    return max(warmup_steps, max_steps - decay_steps)


def stable_step(config: TrainConfig) -> int | None:
    """The step of a wsd run's `stable` checkpoint: the last one before its decay, whose weights every longer
    run with the same settings also reaches (None for cosine, whose every step depends on max_steps)."""
    return decay_start(config) if config.lr_schedule == "wsd" else None


def muon_momentum_at(step: int, config: TrainConfig) -> float:
    """Muon's momentum at optimizer step `step` (0-based): from muon_momentum_start linearly up to
    muon_momentum over the first muon_momentum_warmup steps, as modded-nanogpt's train_gpt.py does
    (frac = min(step / 300, 1); momentum = (1 - frac) * 0.85 + frac * 0.95)."""
    if config.muon_momentum_warmup <= 0:
        return config.muon_momentum
    frac = min(step / config.muon_momentum_warmup, 1.0)
    return (1 - frac) * config.muon_momentum_start + frac * config.muon_momentum


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the schedule's LR `lr` (that of peak max_lr); a group with an `lr_scale` (Muon's: muon_lr / max_lr)
    gets `lr * lr_scale`, so that it follows the same warmup and cosine from its own peak."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def set_schedule(optimizer: torch.optim.Optimizer, step: int, config: TrainConfig) -> float:
    """Everything that is a function of the step, set for optimizer step `step`: the LR, and Muon's momentum
    (in its groups, those with an `lr_scale`). Returns the LR. A resumed run sets the same values."""
    lr = lr_at(step, config)
    set_lr(optimizer, lr)
    for group in optimizer.param_groups:
        if "lr_scale" in group:
            group["momentum"] = muon_momentum_at(step, config)
    return lr


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embeddings (2+ dimensions), none on biases and LayerNorm gains."""
    return decay_groups([p for p in model.parameters() if p.requires_grad], weight_decay)  # tied weights once


def decay_groups(params: list[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def muon_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weight matrices of every block's attention and MLP (c_attn, c_proj, c_fc, c_proj): the hidden
    matrices Muon is for. nn.Linear stores them as (out, in), the orientation Muon's LR scale
    sqrt(max(1, out / in)) assumes. The embeddings, the tied head, LayerNorms and biases are not here."""
    return [
        module.weight
        for block in model.transformer.h
        for module in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)
    ]


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """`config.optimizer`: AdamW with the GPT-3 betas and epsilon over every parameter, or (muon) Muon over the
    blocks' weight matrices and that AdamW over the rest, stepped as one optimizer."""
    if config.optimizer == "adamw":
        return adamw(param_groups(model, config.weight_decay), config, device)
    matrices = muon_params(model)
    chosen = {id(p) for p in matrices}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
    muon = torch.optim.Muon(
        [{"params": matrices, "lr_scale": config.muon_lr / config.max_lr}],
        lr=config.muon_lr * lr_at(0, config) / config.max_lr,
        weight_decay=config.muon_weight_decay,
        momentum=muon_momentum_at(0, config),
        adjust_lr_fn=config.muon_adjust_lr_fn,
    )
    return MuonWithAdamW(muon, adamw(decay_groups(rest, config.weight_decay), config, device))


def adamw(groups: list[dict], config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the GPT-3 betas and epsilon; the fused kernel wherever PyTorch has it for the device (CUDA,
    CPU and MPS in torch 2.13; the benchmark measured it as the faster CPU step too), else the foreach one."""
    fused = fused_adamw_supported(device)
    if not fused:
        logger.info("AdamW: this PyTorch has no fused kernel for %s; using its foreach kernel", device.type)
    return torch.optim.AdamW(
        groups,
        lr=lr_at(0, config),
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_eps,
        fused=fused,
    )


def check_optimizer_supported(config: TrainConfig, distributed_type: DistributedType) -> None:
    """Refuse Muon under FSDP: its Newton-Schulz step orthogonalises each whole matrix on one device, and FSDP
    hands every rank only a shard of it."""
    if config.optimizer == "muon" and distributed_type == DistributedType.FSDP:
        raise ConfigError(
            "optimizer muon does not work with FSDP (Muon needs each whole weight matrix, FSDP shards them); "
            "launch with DDP (e.g. accelerate_configs/gpu_8.yaml) or use --optimizer adamw"
        )


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon and AdamW as one optimizer, so that Accelerate prepares, steps, saves and loads them together
    (one optimizer.bin holding both state dicts: tensors and plain values, loadable with weights_only).

    Like Accelerate's own `AcceleratedOptimizer`, it wraps optimizers and holds no state of its own, so it
    does not call `Optimizer.__init__`; `param_groups` and `state` are the two optimizers' together.
    """

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw
        self.defaults = {}

    @property
    def param_groups(self) -> list[dict]:
        return self.adamw.param_groups + self.muon.param_groups

    @property
    def state(self) -> dict:
        return {**self.adamw.state, **self.muon.state}

    def step(self, closure=None):
        loss = self.adamw.step(closure)
        self.muon.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.adamw.load_state_dict(state_dict["adamw"])
        self.muon.load_state_dict(state_dict["muon"])


def launcher_precision_note(launcher: str | None, resolved: str) -> str | None:
    """What to tell a user whose launcher asked for another precision than the trainer uses: the
    trainer's `mixed_precision` (resolved: `resolved`) overrides `accelerate launch --mixed_precision`
    or an `accelerate config` default (`launcher`, Accelerate's ACCELERATE_MIXED_PRECISION), silently
    otherwise: `--mixed_precision bf16` given to the launcher on a CPU would train in fp32."""
    if not launcher or launcher in ("no", resolved):  # 'no' is also what `accelerate launch` sets unasked
        return None
    return (
        f"the launcher asked for mixed_precision {launcher!r}, but this run trains with {resolved!r} (the trainer's "
        f"own --mixed_precision decides; 'auto' is bf16 on a CUDA GPU that has it, fp16 on one without, else "
        "'no'): to change it, pass --mixed_precision to train_accelerate.py"
    )


def resolve_mixed_precision(setting: str) -> str:
    """'auto' becomes what it trains with on the device this machine's commands use
    (`gpt2_scratch.training.devices.auto_precision`): bf16 on a CUDA GPU with bf16 units, fp16 (loss-scaled) on one
    without, bf16 on MPS under macOS 14+, else 'no'. On CPUs without AVX-512 BF16 or AMX bf16 matmuls are
    emulated (~100x slower), and where they are native (measured 1.5x faster than fp32 on a Zen 4 in
    docs/benchmarks.md) `--mixed_precision bf16` is an explicit choice."""
    return resolve_precision(setting)
