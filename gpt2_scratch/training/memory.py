"""Whether a model can train here at all, judged before its weights are allocated: a size typed one
digit too long should be one line naming the estimate and the memory there is, not an allocation
failure (or the kernel's OOM killer) minutes later."""

from __future__ import annotations

import os

import torch

from gpt2_scratch.training.config import ConfigError
from modeling_gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM

# fp32 weights, their gradients, and AdamW's two moments: 4 + 4 + 8 bytes per parameter. Activations
# come on top, so this is the least a training step needs.
TRAINING_BYTES_PER_PARAMETER = 16


def parameter_count(config: GPT2ScratchConfig) -> int:
    """Distinct parameters of a model of `config` (tied weights once, padding rows included), counted
    on the meta device: nothing is allocated."""
    with torch.device("meta"):
        model = GPT2ScratchForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def available_bytes(device: torch.device) -> int | None:
    """Memory free for tensors on `device`: the GPU's free memory, or the host's MemAvailable (MPS shares
    it: unified memory); None when unknown (macOS and Windows: then the check is skipped)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pass
    try:  # no /proc: other Unixes; macOS has no SC_AVPHYS_PAGES (ValueError) and Windows no sysconf
        pages = os.sysconf("SC_AVPHYS_PAGES")
        return pages * os.sysconf("SC_PAGE_SIZE") if pages > 0 else None
    except (AttributeError, OSError, ValueError):
        return None


def gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_fits(config: GPT2ScratchConfig, device: torch.device, processes_here: int = 1, shards: int = 1) -> None:
    """Refuse, as a `ConfigError`, a model whose weights, gradients and AdamW state alone exceed the memory
    free on `device`. `processes_here`: trainer processes sharing that memory (CPU ranks on one host);
    `shards`: how many ways FSDP splits the state."""
    available = available_bytes(device)
    if available is None:
        return
    parameters = parameter_count(config)
    needed = parameters * TRAINING_BYTES_PER_PARAMETER * processes_here // shards
    if needed > available:
        ranks = f" for {processes_here} processes" if processes_here > 1 else ""
        raise ConfigError(
            f"the model ({parameters:,} parameters: n_layer {config.n_layer}, n_embd {config.n_embd}) needs at least "
            f"{gib(needed)}{ranks} for its weights, gradients and AdamW state ({TRAINING_BYTES_PER_PARAMETER} bytes "
            f"per parameter, activations not counted), but {device.type} has {gib(available)} free; choose a "
            "smaller model, n_layer or n_embd"
        )


def check_training_fits(config: GPT2ScratchConfig, accelerator) -> None:
    """`check_fits` for this launch: CPU ranks on one host share its memory; FSDP shards the state."""
    from accelerate.utils import DistributedType

    here = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if accelerator.device.type == "cpu" else 1
    shards = accelerator.num_processes if accelerator.distributed_type == DistributedType.FSDP else 1
    check_fits(config, accelerator.device, here, shards)
