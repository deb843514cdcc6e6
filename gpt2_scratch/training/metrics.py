"""Throughput and model FLOPs utilisation (MFU), and the JSON-lines records of a run.

MFU divides by one device's peak: a GPU's datasheet number, else the best matmul measured here. The
benchmarks divide by the same numbers.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from gpt2_scratch.training.config import TrainConfig
from gpt2_scratch.training.devices import synchronize
from gpt2_scratch.training.files import replace_text, writing
from gpt2_scratch.training.recipe import resolve_mixed_precision

# Dense (no sparsity) tensor-core peaks per GPU from NVIDIA's datasheets, FLOP/s, matched on the
# device name (more specific names first). fp32 means TF32 tensor cores, which we enable on CUDA; fp16's dense
# peak is bf16's wherever both exist. T4 and V100 have no bf16 (nor TF32) units: their 16-bit peak is fp16's.
DATASHEET_PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp32": 494.5e12},
    "H100 PCIe": {"bf16": 756e12, "fp32": 378e12},
    "H100": {"bf16": 989e12, "fp32": 494.5e12},  # SXM
    "A100": {"bf16": 312e12, "fp32": 156e12},
    "L40S": {"bf16": 362e12, "fp32": 183e12},
    "L4": {"bf16": 121e12, "fp32": 60e12},
    "A10G": {"bf16": 70e12, "fp32": 35e12},
    "RTX 4090": {"bf16": 165e12, "fp32": 83e12},
    "V100": {"fp16": 125e12, "fp32": 15.7e12},  # SXM2 (PCIe: 112e12, 14e12)
    "T4": {"fp16": 65e12, "fp32": 8.1e12},
}


def peak_flops(config: TrainConfig, device: torch.device) -> float:
    """Peak FLOP/s of one device for MFU: the config value, else `device_peak_flops` for the run's precision."""
    if config.peak_flops:
        return config.peak_flops
    precision = {"bf16": "bf16", "fp16": "fp16"}.get(resolve_mixed_precision(config.mixed_precision), "fp32")
    return device_peak_flops(device, precision)[0]


def device_peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """The FLOP/s that MFU divides by ("bf16", "fp16" or "fp32" matmuls), and where the number comes from:
    a GPU's datasheet peak, else the best matmul throughput measured here and now."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in DATASHEET_PEAK_FLOPS.items():
            peak = peaks.get(precision) or (peaks.get("bf16") if precision == "fp16" else None)
            if key in name and peak:
                return peak, f"datasheet dense {precision} peak of {key}"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return measure_matmul_flops(device, dtype), f"measured: best {precision} 1024x1024 matmul on this device"


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 1024, seconds: float = 0.5) -> float:
    """The best FLOP/s of n x n matmuls repeated for about `seconds`: the best, not the mean, so that
    moments when other processes hold the cores count less. Uses a private generator, so the global
    RNG (and hence the initial weights) is the same whether the peak is measured or given."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    best, start, repeats = math.inf, time.perf_counter(), 0
    while repeats < 3 or time.perf_counter() - start < seconds:
        tick = time.perf_counter()
        a @ b
        synchronize(device)
        best, repeats = min(best, time.perf_counter() - tick), repeats + 1
    return 2 * n**3 / best


class Meter:
    """Wall time and tokens between log lines; evaluation and checkpoint time is left out."""

    def __init__(self, flops_per_token: int, peak: float, world_size: int):
        self.flops_per_token, self.peak, self.world_size = flops_per_token, peak, world_size
        self.restart()

    def restart(self) -> None:
        self.start, self.steps, self.tokens, self.waited = time.perf_counter(), 0, 0, 0.0

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (waiting for data) out of the lap's time; the lap reports them as data_wait_s."""
        self.start += seconds
        self.waited += seconds

    def add(self, tokens: int) -> None:
        self.steps += 1
        self.tokens += tokens

    def lap(self) -> dict[str, float]:
        """Throughput since the last lap (or restart), and a new lap started: one call per log line."""
        elapsed = time.perf_counter() - self.start
        tokens_per_s = self.tokens / elapsed
        mfu = self.flops_per_token * tokens_per_s / (self.peak * self.world_size)
        stats = {"tokens_per_s": tokens_per_s, "mfu": mfu, "step_time": elapsed / max(1, self.steps)}
        if self.waited:
            stats["data_wait_s"] = self.waited
        self.restart()
        return stats


def append_jsonl(path: Path, record: dict) -> None:
    """`record` as one line at the end of `path`; a write the disk refuses is cut back off (no half line)."""
    line = (json.dumps(record) + "\n").encode()
    with writing(path.parent, path.name), path.open("ab", buffering=0) as f:
        end = f.tell()
        try:
            while line:  # an unbuffered write may take part of it; the next one reports the full disk
                line = line[f.write(line) :]
        except OSError:
            f.truncate(end)
            raise


def read_records(out_dir: Path) -> list[dict]:
    """A run's `log.jsonl` records, read while the run may still be writing: a line being written is
    left out, and an absent log is no records."""
    path = Path(out_dir) / "log.jsonl"
    found = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            found.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return found


def logged_metric(out_dir: Path, name: str) -> dict[int, float]:
    """`name`'s value at each step that logged it (the last record of a step wins)."""
    return {r["step"]: r[name] for r in read_records(out_dir) if name in r}


def keep_records_through(path: Path, step: int) -> None:
    """Drop the records of steps after `step` (those of a run killed after its last checkpoint), and a
    last line that the kill cut short."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    replace_text(path, "".join(kept))  # a kill mid-rewrite leaves the old log whole, never an empty one


def format_value(name: str, value: float | int | str) -> str:
    if isinstance(value, (str, int)):  # the guard's findings and counts
        return str(value)
    if name == "mfu":
        return f"{100 * value:.2f}%"
    if name in ("lr",):
        return f"{value:.3e}"
    if name == "tokens_per_s":
        return f"{value:,.0f}"
    if name == "step_time":
        return f"{1000 * value:.0f}ms"
    return f"{value:.4f}"
