"""What every group of checks shares: Skip, the shapes of the two modes, the Context, numeric helpers."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .report import markdown, markdown_path, write_atomic


class Skip(Exception):  # noqa: N818  (a check that does not apply here; its message is the reason)
    """The check does not apply to this device or this run; the message says why."""


@dataclass
class Shape:
    """Sizes of one mode: the real GPU check, or the tiny --smoke one."""

    preset: str
    seq_len: int
    batch: int  # sequences per forward in the correctness checks
    new_tokens: int  # generate
    train: dict[str, Any]  # trainer overrides
    kill_after: int  # SIGKILL once this step is logged (a checkpoint lies before it)
    fsdp: dict[str, Any]  # the fsdp check's changes to `train`: a smaller model, no compile
    fsdp_kill_after: int
    hellaswag_examples: int
    ladder: dict[str, Any]
    fp16: dict[str, Any]  # the fp16 check's model, batch and steps

    @property
    def fsdp_train(self) -> dict[str, Any]:
        """The fsdp check's trainer overrides."""
        return {**self.train, **self.fsdp}


GPU_SHAPE = Shape(
    preset="gpt2",
    seq_len=1024,
    batch=4,
    new_tokens=128,
    train=dict(
        model="gpt2",
        seq_len=1024,
        micro_batch_size=32,  # the built-in val shard (65,536 tokens) holds 63 rows of 1,025: one batch of 32
        total_batch_size=65536,  # 2 micro-steps: the accumulation path too
        max_steps=30,
        warmup_steps=5,
        save_interval=12,  # 3 saves (12, 24, 30): each hashes and exports about 2 GB
        eval_interval=15,
        val_batches=1,
        log_interval=1,
        num_samples=1,
        sample_tokens=16,
        compile="true",
    ),
    kill_after=15,
    # 30M parameters, 6 blocks (6 FSDP units): seconds a launch on the device, saves of about 0.4 GB
    fsdp=dict(
        model="cpu-mini",
        seq_len=512,
        micro_batch_size=16,
        total_batch_size=16384,  # 2 micro-steps: FSDP's gradient accumulation too
        max_steps=24,
        warmup_steps=4,
        save_interval=8,
        eval_interval=8,
        val_batches=2,
        compile="false",  # the trainer check proves compile; here it would only add its compile time
    ),
    fsdp_kill_after=12,
    hellaswag_examples=256,
    ladder=dict(preset="gpt2", seq_len=1024, batch_size=16, steps=5, warmup=2),
    fp16=dict(model="gpt2", seq_len=1024, micro_batch_size=8, steps=60, warmup_steps=10, max_lr=6e-4),
)
SMOKE_SHAPE = Shape(
    preset="cpu-nano",
    seq_len=32,
    batch=2,
    new_tokens=8,
    train=dict(
        model="cpu-nano",
        seq_len=32,
        micro_batch_size=4,
        total_batch_size=256,
        max_steps=8,
        warmup_steps=2,
        save_interval=2,
        eval_interval=4,
        val_batches=2,
        log_interval=1,
        num_samples=1,
        sample_tokens=4,
        compile="false",
        peak_flops=1e11,
    ),
    kill_after=3,
    fsdp=dict(max_steps=16, save_interval=4),
    fsdp_kill_after=6,
    hellaswag_examples=8,
    ladder=dict(preset="cpu-nano", seq_len=32, batch_size=2, steps=1, warmup=0),
    fp16=dict(model="cpu-nano", seq_len=32, micro_batch_size=8, steps=40, warmup_steps=5, max_lr=3e-3),
)


@dataclass
class Context:
    """What the checks share: the options, the device, the shape, the report and where things go."""

    args: argparse.Namespace
    device: torch.device
    shape: Shape
    work: Path
    report: dict[str, Any]
    started: float = field(default_factory=time.perf_counter)
    run_dir: Path | None = None  # the trainer's uninterrupted run, for eval and exports_on_cpu

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def write(self) -> None:
        """The JSON and the Markdown table, each written to a temporary name and renamed."""
        self.report["seconds"] = round(self.elapsed(), 1)
        out = Path(self.args.out)
        write_atomic(out, json.dumps(self.report, indent=2, default=str) + "\n")
        write_atomic(markdown_path(self.args), markdown(self.report) + "\n")


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b|, where equal entries (-inf included: masked scores) count 0 and a NaN makes it inf, so
    that no comparison below passes on a NaN."""
    a, b = a.float(), b.float()
    diff = torch.where(a == b, torch.zeros_like(a), (a - b).abs())
    return math.inf if diff.isnan().any() else diff.max().item()


def scale(t: torch.Tensor) -> float:
    """The largest finite |entry| (masked scores are -inf), at least 1e-12."""
    finite = t.float()[t.float().isfinite()]
    return max(finite.abs().max().item() if finite.numel() else 0.0, 1e-12)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / scale(b): the error relative to the scale of the reference."""
    return max_abs_diff(a, b) / scale(b)


@contextlib.contextmanager
def exact_fp32():
    """fp32 matmuls without TF32 (CUDA's default for the trainer is TF32 on), restored afterwards."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
