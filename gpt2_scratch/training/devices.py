"""Where a command runs and what that device can do: one choice for the trainer and every `eval.*` command.

A CUDA GPU first, then Apple silicon's GPU (MPS), then the CPU, as Accelerate's own `PartialState` picks.
What each device can run is decided here too, each from what the installed PyTorch reports:

- precision: `auto` is bf16 on a CUDA GPU with bf16 units (Ampere and newer), fp16 with loss scaling on
  one without (T4, V100: no bf16 tensor cores, so bf16 is emulated at fp32's rate at best, which the
  datasheets put 8x below fp16's on a T4), bf16 on MPS where
  PyTorch runs it (macOS 14 or newer), and fp32 on a CPU (bf16 is native only on CPUs with AVX-512 BF16 or
  AMX, about 100x slower elsewhere; ask for it with `--mixed_precision bf16`);
- fused AdamW where PyTorch has the fused kernel for the device type;
- torch.compile where its inductor backend can build kernels: Triton on CUDA, a C++ compiler on the CPU;
  on MPS inductor's Metal backend is a prototype, so compile is turned off there with one log line.

The availability is injectable (`Availability`), so the choice is unit-tested for machines this one is not.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import torch
from accelerate.utils import parse_flag_from_env

from gpt2_scratch.user_errors import UserError


@dataclass(frozen=True)
class Availability:
    """What this machine's PyTorch offers: a CUDA GPU and whether it has bf16 units; MPS and whether its
    macOS runs bf16 (14 or newer)."""

    cuda: bool
    cuda_bf16: bool = False
    mps: bool = False
    mps_bf16: bool = False


def availability() -> Availability:
    """What the installed PyTorch reports for this machine."""
    cuda = torch.cuda.is_available()
    mps = torch.backends.mps.is_available()
    return Availability(
        cuda=cuda,
        # emulated bf16 (which is_bf16_supported counts by default) is slower than fp16 on pre-Ampere GPUs
        cuda_bf16=cuda and torch.cuda.is_bf16_supported(including_emulation=False),
        mps=mps,
        mps_bf16=mps and torch.backends.mps.is_macos_or_newer(14, 0),
    )


def pick_device(found: Availability | None = None) -> torch.device:
    """The device a command runs on when the user names none: CUDA, else MPS, else the CPU; the CPU too
    under `accelerate launch --cpu` (or `use_cpu: true` in its config), which Accelerate then runs on."""
    found = availability() if found is None else found
    if parse_flag_from_env("ACCELERATE_USE_CPU"):
        return torch.device("cpu")
    return torch.device("cuda" if found.cuda else "mps" if found.mps else "cpu")


def auto_precision(device_type: str, found: Availability | None = None) -> str:
    """What `mixed_precision auto` trains with on `device_type`: the fastest precision that trains correctly."""
    found = availability() if found is None else found
    if device_type == "cuda":
        return "bf16" if found.cuda_bf16 else "fp16"
    if device_type == "mps":
        return "bf16" if found.mps_bf16 else "no"
    return "no"


def resolve_precision(setting: str, found: Availability | None = None) -> str:
    """`setting` with 'auto' replaced by what it means on the device `pick_device` chooses."""
    found = availability() if found is None else found
    return auto_precision(pick_device(found).type, found) if setting == "auto" else setting


def precision_problem(setting: str, device_type: str, found: Availability | None = None) -> str | None:
    """Why `--mixed_precision setting` cannot train on `device_type`, or None. Accelerate would not say: on a
    CPU it trains fp32 and reports fp16, and a GPU without bf16 units emulates it at a fraction of fp16's speed."""
    found = availability() if found is None else found
    if setting == "fp16" and device_type == "cpu":
        return (
            "mixed_precision fp16 needs a GPU (CUDA, or MPS on Apple silicon): on a CPU Accelerate would train in "
            "fp32 and report fp16; use 'no' (fp32) or 'bf16'"
        )
    if setting == "fp16" and device_type == "mps" and not torch.amp.is_autocast_available("mps"):
        return "mixed_precision fp16: this PyTorch has no autocast for MPS; use 'no' (fp32) or upgrade torch"
    if setting == "bf16" and device_type == "cuda" and not found.cuda_bf16:
        return (
            "mixed_precision bf16: this CUDA GPU has no bf16 units (before Ampere, e.g. T4 or V100) and would "
            "emulate it slowly; use 'fp16' (loss-scaled) or 'auto', which picks it"
        )
    if setting == "bf16" and device_type == "mps" and not found.mps_bf16:
        return "mixed_precision bf16 on MPS needs macOS 14 or newer; use 'no' (fp32)"
    return None


def inference_dtype(device: torch.device, found: Availability | None = None) -> torch.dtype | None:
    """The autocast dtype of evaluation on `device` (no loss scaling is needed without a backward), or None
    for fp32: bf16 or fp16 on a GPU as `auto` trains there, fp32 on the CPU."""
    precision = auto_precision(device.type, found)
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (a GPU's kernels run asynchronously; the CPU's do not)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def fused_adamw_supported(device: torch.device) -> bool:
    """Whether PyTorch has the fused AdamW kernel for `device` (CUDA, CPU and MPS in torch 2.13)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return device.type in _get_fused_kernels_supported_devices()


def compile_problem(device_type: str) -> str | None:
    """Why torch.compile's inductor backend cannot build kernels for `device_type` here, or None: Triton on
    CUDA, a C++ compiler on the CPU (it compiles C++ with `$CXX` or the first of g++, c++, clang++ found)."""
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "compile: torch.compile's inductor needs Triton on CUDA, which is not installed; pip install triton"
    elif device_type == "cpu":
        compilers = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
        if not any(name and shutil.which(name) for name in compilers):
            return (
                "compile: torch.compile's inductor needs a C++ compiler on the CPU and none was found ($CXX, g++, "
                "c++, clang++); install one or drop --compile"
            )
    return None


def compile_supported(device_type: str) -> bool:
    """Whether the trainer compiles on `device_type` when asked: not on MPS, where inductor's Metal backend
    is a prototype in PyTorch (the trainer logs one line and trains eager)."""
    return device_type != "mps"


def parse_device(device: str | torch.device, found: Availability | None = None) -> torch.device:
    """`--device` as a torch device that this machine has; anything else is the user's input at fault."""
    found = availability() if found is None else found
    try:
        parsed = torch.device(device)
    except RuntimeError as err:  # torch's own judgement of the string
        raise UserError(f"--device {device!r} is not a torch device: use cpu, cuda, cuda:N or mps") from err
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if found.cuda else 0
        if not found.cuda or (parsed.index or 0) >= count:
            raise UserError(f"--device {device!r}: this machine has {count} CUDA device(s)")
    elif parsed.type == "mps" and not found.mps:
        raise UserError(f"--device {device!r}: this machine has no MPS device (Apple silicon with macOS 12.3+)")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {device!r}: only cpu, cuda and mps are supported")
    return parsed
