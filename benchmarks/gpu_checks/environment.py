"""The environment check, and what the report records of the environment: package versions against the
tested ones, the device."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import platform
from pathlib import Path
from typing import Any

import torch

from .common import Context

# The versions the project is tested with (README's install); the GPU image has its own.
TESTED_VERSIONS = {"torch": "2.13", "transformers": "5.24", "accelerate": "1.15"}
PACKAGES = ("torch", "transformers", "accelerate", "tiktoken", "safetensors", "tokenizers", "numpy", "huggingface_hub")
ABSENT_ON_GPU_IMAGE = ("datasets", "evaluate")


def check_environment(ctx: Context) -> str:
    """Every module the check and the trainer use imports here, whether or not `datasets`/`evaluate` exist."""
    for module in (
        "modeling_gpt2_scratch",
        "gpt2_scratch.conversion",
        "data_prep",
        "data_prep.loader",
        "gpt2_scratch.training.metrics",
    ):
        importlib.import_module(module)
    for module in (
        "train_accelerate",
        "eval.val_loss",
        "eval.hellaswag",
        "gpt2_scratch.training.export",
        "bench_ladder",
    ):
        importlib.import_module(module)
    absent = [name for name in ABSENT_ON_GPU_IMAGE if importlib.util.find_spec(name) is None]
    differ = ctx.report["version_differences"]
    parts = [f"{d['package']} {d['found']} (tested {d['tested']})" for d in differ] or ["versions as tested"]
    parts.append(f"absent: {', '.join(absent) or 'none'} of {', '.join(ABSENT_ON_GPU_IMAGE)}")
    return "; ".join(parts)


def versions() -> dict[str, str | None]:
    from importlib import metadata

    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in (*PACKAGES, *ABSENT_ON_GPU_IMAGE):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    found["cuda"] = torch.version.cuda
    return found


def version_differences(found: dict[str, str | None]) -> list[dict[str, str | None]]:
    """Each package whose major.minor differs from the version the project is tested with."""
    differ = []
    for name, tested in TESTED_VERSIONS.items():
        version = found.get(name)
        if version is None or ".".join(version.split("+")[0].split(".")[:2]) != tested:
            differ.append({"package": name, "found": version, "tested": tested})
    return differ


def describe_device(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": device.type, "platform": platform.platform(), "cpu_count": os.cpu_count()}
    with contextlib.suppress(OSError, StopIteration):
        cpu = Path("/proc/cpuinfo").read_text()
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in cpu.splitlines() if "model name" in line)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name,
            memory_bytes=props.total_memory,
            compute_capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    else:
        info["name"] = info.get("cpu_model", platform.processor() or "cpu")
        info["load_average"] = os.getloadavg()
    return info
