"""What a launch runs on: the Accelerator (device, DDP or FSDP, precision, accumulation, trackers,
compile) and each process's log lines. The device and what it can run are `gpt2_scratch.training.devices`' choice."""

from __future__ import annotations

import datetime
import logging

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration, parse_flag_from_env

from gpt2_scratch.training.config import ConfigError, TrainConfig, tracker_names
from gpt2_scratch.training.devices import compile_problem, compile_supported, pick_device, precision_problem
from gpt2_scratch.training.recipe import check_optimizer_supported, grad_accum_steps, resolve_mixed_precision

logger = logging.getLogger("train")


def build_accelerator(config: TrainConfig) -> Accelerator:
    """The Accelerator: devices, DDP/FSDP, mixed precision, gradient accumulation, trackers, compile.

    The device is `gpt2_scratch.training.devices.pick_device`'s (CUDA, else Apple silicon's MPS, else the CPU), as every
    command picks it; a precision or compile that the device cannot run is refused in one line."""
    device = pick_device()
    precision = resolve_mixed_precision(config.mixed_precision)
    if problem := precision_problem(precision, device.type):  # e.g. fp16 on a CPU: Accelerate would train fp32
        raise ConfigError(problem)
    compile = config.compile and compile_supported(device.type)
    if config.compile and not compile:
        logger.warning("compile: off on %s (inductor's backend there is a prototype); training eager", device.type)
    if compile and (problem := compile_problem(device.type)):
        raise ConfigError(problem)
    cpu = device.type == "cpu"
    # The process group's timeout: a collective that waits longer fails (gloo's default is 30 minutes,
    # NCCL's 10). Given to the first PartialState, which starts the group; the Accelerator's is too late.
    timeout = datetime.timedelta(seconds=config.collective_timeout)
    world_size = PartialState(cpu=cpu, timeout=timeout).num_processes  # needed before the accumulation steps
    trackers = [t for t in tracker_names(config.report_to) if t != "none"]
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=precision,
        gradient_accumulation_steps=grad_accum_steps(config, world_size),
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=config.out_dir, logging_dir=f"{config.out_dir}/tensorboard"),
        dynamo_backend="inductor" if compile else None,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)],
    )
    if parse_flag_from_env("ACCELERATE_USE_FSDP") and accelerator.distributed_type != DistributedType.FSDP:
        # Accelerate turns FSDP on only for accelerator devices; on CPU it would silently run DDP instead
        raise ConfigError(
            f"this launch asks for FSDP, but Accelerate runs FSDP only on GPUs (and other accelerators): here it "
            f"would train with {accelerator.distributed_type.value} and write unsharded checkpoints; on CPU launch "
            "with accelerate_configs/cpu_2proc.yaml (DDP), or run the FSDP config on GPUs"
        )
    check_optimizer_supported(config, accelerator.distributed_type)
    keep_fsdp_gradients_fp32(accelerator)
    if accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls for whatever autocast leaves in fp32
        torch.backends.cudnn.allow_tf32 = True
    elif accelerator.device.type == "cpu" and accelerator.mixed_precision != "no":
        logger.warning(  # native only with AVX-512 BF16 or AMX; elsewhere about 100x slower than fp32
            "mixed_precision=%s on CPU: fast only where the CPU has bf16 units", config.mixed_precision
        )
    return accelerator


def keep_fsdp_gradients_fp32(accelerator: Accelerator) -> None:
    """FSDP2 under bf16: the blocks compute with bf16 copies of the weights, as Accelerate sets it up,
    but the gradients are reduced in float32 (and, torch's FSDP2 does it when the reduce dtype is wider,
    accumulated over micro-steps in float32) and the model's outputs are left as it makes them, as
    torchtitan does. Accelerate's policy reduces in bf16 (and 1.15's also cast the float32 loss to bf16);
    the sums over many ranks lose less in float32 (docs/training.md, "Precision")."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin = accelerator.state.fsdp_plugin
    policy = plugin.mixed_precision_policy
    if plugin.fsdp_version == 2 and policy is not None and policy.param_dtype == torch.bfloat16:
        plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def fsdp_precision(accelerator: Accelerator) -> dict[str, str | None] | None:
    """The dtypes of FSDP2's mixed-precision policy as this launch runs it (run_info.json), or None."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    policy = accelerator.state.fsdp_plugin.mixed_precision_policy
    if policy is None:
        return None
    dtypes = {name: getattr(policy, name, None) for name in ("param_dtype", "reduce_dtype", "output_dtype")}
    return {name: None if dtype is None else str(dtype).removeprefix("torch.") for name, dtype in dtypes.items()}


def setup_logging(accelerator: Accelerator) -> None:
    """Our log lines on the main process; Accelerate's per-save chatter and transformers' save bars off."""
    from transformers.utils import logging as transformers_logging

    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    transformers_logging.disable_progress_bar()
