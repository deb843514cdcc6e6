"""The data_prep and trainer checks: the built-in corpus through its command, then the trainer on it,
uninterrupted and SIGKILLed and resumed."""

from __future__ import annotations

import datetime
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from . import ROOT
from .common import Context, Skip
from .launch import (
    data_dir,
    finish_launch,
    kill_at_step,
    kill_group,
    metric,
    records,
    resumed_step,
    run_logged,
    start_launch,
    subprocess_env,
    train_command,
)

# The goal the GPU run is measured against (docs/benchmarks.md).
GOAL_MFU = 0.5


def check_data_prep(ctx: Context) -> str:
    """The built-in corpus through the command users run, in a child process."""
    out = data_dir(ctx)
    command = [sys.executable, "-m", "data_prep", "--builtin", "--out_dir", str(out), "--no_progress"]
    run_logged(command, ctx.work / "data_prep.log", timeout=300, cwd=ROOT, env=subprocess_env())
    manifest = json.loads((out / "manifest.json").read_text())
    if not manifest.get("complete"):
        raise AssertionError(f"{out}/manifest.json is not complete")
    return f"{manifest['tokens']:,} tokens in {len(manifest['shards'])} shards, {manifest['documents']:,} documents"


def record_throughput(ctx: Context, run: Path, seconds: float | None) -> dict[str, Any]:
    """The uninterrupted run's tokens/s, MFU and step time as the trainer logged them (medians after
    warmup), into the report at once: a run stopped later still has them."""
    logged = [r for r in records(run) if "tokens_per_s" in r]
    steady = [r for r in logged if r["step"] > ctx.shape.train["warmup_steps"]] or logged
    run_info = json.loads((run / "run_info.json").read_text())
    trainer = ctx.report["trainer"] = {
        "out_dir": str(run),
        "uninterrupted_seconds": seconds and round(seconds, 1),  # CUDA only: there it runs alone
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "mfu": statistics.median(r["mfu"] for r in steady),
        "step_time": statistics.median(r["step_time"] for r in steady),
        "first_step_time": next((r["step_time"] for r in logged if r["step"] == 1), None),
        "peak_flops_per_device": run_info.get("peak_flops_per_device"),
        "mixed_precision": run_info.get("mixed_precision"),
    }
    first = trainer["first_step_time"]
    if first is not None and ctx.shape.train["compile"] == "true":
        ctx.report["compile_seconds"]["trainer_first_step"] = round(first - trainer["step_time"], 2)
    if ctx.cuda:
        ctx.report["goal"] = {"mfu": trainer["mfu"], "target": GOAL_MFU, "met": trainer["mfu"] >= GOAL_MFU}
    ctx.write()
    return trainer


def check_trainer(ctx: Context) -> str:
    """An uninterrupted run against one SIGKILLed after a checkpoint and relaunched with --resume auto."""
    if not (data_dir(ctx) / "manifest.json").is_file():
        raise Skip("needs the data_prep check's corpus (run it in the same --work)")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    runs = ctx.work / f"trainer-{stamp}"
    runs.mkdir(parents=True)
    reference, killed = runs / "uninterrupted", runs / "killed"
    timeout = 420 if ctx.cuda else 240
    tick = time.perf_counter()
    proc = start_launch(train_command(ctx, reference), runs / "uninterrupted.log")
    if ctx.cuda:  # alone on the device: its tokens/s are the measurement
        finish_launch(proc, runs / "uninterrupted.log", timeout)
        record_throughput(ctx, reference, time.perf_counter() - tick)
    victim = start_launch(train_command(ctx, killed), runs / "killed.log")  # on a CPU, alongside: less waiting
    try:
        killed_at = kill_at_step(victim, ctx.shape.kill_after, killed, runs / "killed.log", timeout)
    except BaseException:
        kill_group(proc)
        raise
    if not ctx.cuda:
        finish_launch(proc, runs / "uninterrupted.log", timeout)
        record_throughput(ctx, reference, None)
    ctx.run_dir = reference
    resumed = start_launch(train_command(ctx, killed, "--resume", "auto"), runs / "resumed.log")
    finish_launch(resumed, runs / "resumed.log", timeout)
    info = json.loads((killed / "run_info.json").read_text())

    a, b = metric(reference, "train/loss"), metric(killed, "train/loss")
    steps = list(range(1, ctx.shape.train["max_steps"] + 1))
    if sorted(b) != steps or sorted(a) != steps:
        raise AssertionError(f"steps logged: uninterrupted {sorted(a)}, killed + resumed {sorted(b)}")
    resumed_from = resumed_step(info)
    before = [abs(a[s] - b[s]) for s in steps if resumed_from and s <= resumed_from]
    after = [abs(a[s] - b[s]) for s in steps if resumed_from and s > resumed_from]
    val_a, val_b = metric(reference, "val/loss"), metric(killed, "val/loss")
    val_diff = max((abs(val_a[s] - val_b[s]) for s in val_a if s in val_b), default=math.nan)
    trainer = ctx.report["trainer"]
    trainer.update(
        killed_at_step=killed_at,
        resumed_from_step=resumed_from,
        max_loss_diff_before_resume=max(before, default=None),
        max_loss_diff_after_resume=max(after, default=None),
        bitwise_equal=a == b and val_a == val_b,
        final_train_loss=a[steps[-1]],
        final_val_loss=val_a.get(steps[-1]),
    )
    if resumed_from is None or resumed_from >= killed_at:
        raise AssertionError(f"the relaunch did not resume from a checkpoint before step {killed_at}: {info}")
    equal = "bitwise equal" if trainer["bitwise_equal"] else f"max |train loss diff| {max(after):.2e}"
    detail = (
        f"killed at step {killed_at}, resumed from {resumed_from}: losses {equal} "
        f"(before the kill {max(before):.1e}, val {val_diff:.1e}); {trainer['tokens_per_s']:,.0f} tokens/s, "
        f"MFU {trainer['mfu']:.1%} of {trainer['peak_flops_per_device'] / 1e12:.3g} TFLOP/s, "
        f"step {trainer['step_time'] * 1e3:.0f} ms ({trainer['mixed_precision']})"
    )
    # CPU kernels are deterministic: the resume must be exact. On CUDA the same kernels on the same shapes
    # should be too; a difference within bf16's noise (1e-2 on a loss near 10) is reported, above it fails.
    tolerance = 1e-2 if ctx.cuda else 0.0
    if not (max(after) <= tolerance and val_diff <= tolerance):
        raise AssertionError(detail)
    return detail
