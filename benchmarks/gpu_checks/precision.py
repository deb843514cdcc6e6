"""The fp16 check: the trainer's step under fp16 with Accelerate's loss scaler, its first steps forced to
overflow, against the same training under bf16 (CUDA only; its parts run on the CPU in the tests)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .common import Context, Skip
from .launch import data_dir

# fp16's largest finite value: a scaled gradient above it is an overflow.
FP16_MAX = 65504.0
# fp16 (10 mantissa bits) against bf16 (7): two roundings of the same updates, which part slowly. Measured
# on the CPU (cpu-nano, 40 steps, tests/test_gpu_check.py): at most 5.1e-5 relative. 1e-2 leaves room for
# a larger model's drift; what breaks outright (a scale that never comes down, so no update ever lands; a
# NaN; a wrong loss) is far outside, and the measured figure is reported.
FP16_VS_BF16 = 1e-2
# The fp16 check on the device: 2 x 60 eager steps of 124M at 8 x 1024 tokens, and two model builds.
FP16_SECONDS = 45


def forcing_init_scale(tokens: int) -> float:
    """An initial loss scale that makes the first step overflow for sure: the gradient of the mean loss at the
    target token's logit is about -1/tokens at initialisation (its probability is near 1/50257), so scaled by
    4 * FP16_MAX * tokens it is about 4x fp16's largest value. Halved at each overflow, it comes into range
    after a few steps (GradScaler's default start, 65536, may never overflow in a short run)."""
    return 4 * FP16_MAX * tokens


def fp16_and_bf16_runs(ctx: Context, data: Path) -> dict[str, list[dict[str, Any]]]:
    """The same short training (the shape's `fp16` sizes, the trainer's optimizer, schedule and `train_step`,
    the data in `data`) under fp16 with Accelerate's GradScaler, whose initial scale forces overflows, then
    under bf16 with no update at the steps where fp16 overflowed (their batches drawn and left unused), so
    that both apply the same updates to the same batches at the same learning rates and differ only in
    precision. Each step's `StepResult` as a dict, per precision (a bf16 step left out: None)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import GradScalerKwargs

    from data_prep import ShardLoader
    from gpt2_scratch.training.config import TrainConfig
    from gpt2_scratch.training.recipe import build_optimizer, lr_at, set_lr
    from gpt2_scratch.training.step import train_step
    from modeling_gpt2_scratch import GPT2ScratchForCausalLM

    s = ctx.shape.fp16
    config = TrainConfig(
        model=s["model"], seq_len=s["seq_len"], micro_batch_size=s["micro_batch_size"], max_lr=s["max_lr"],
        total_batch_size=s["micro_batch_size"] * s["seq_len"], max_steps=s["steps"], warmup_steps=s["warmup_steps"],
        dropout=0.0,
    )  # fmt: skip
    scaler = GradScalerKwargs(init_scale=forcing_init_scale(config.total_batch_size))
    runs: dict[str, list] = {}
    for precision in ("fp16", "bf16"):
        skip = {i for i, r in enumerate(runs.get("fp16", [])) if r["overflow"]}
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        try:
            accelerator = Accelerator(cpu=not ctx.cuda, mixed_precision=precision, kwargs_handlers=[scaler])
            torch.manual_seed(0)  # the same initial weights under both precisions
            model = GPT2ScratchForCausalLM(config.model_config()).to(ctx.device)
            optimizer = build_optimizer(model, config, accelerator.device)
            model, optimizer = accelerator.prepare(model, optimizer)
            loader = ShardLoader(data, batch_size=config.micro_batch_size, seq_len=config.seq_len, seed=config.seed)
            steps = []
            for step in range(config.max_steps):
                if step in skip:
                    loader.next_batch()  # one micro-batch per step here
                    steps.append(None)
                    continue
                set_lr(optimizer, lr_at(step, config))
                steps.append(train_step(model, optimizer, loader, accelerator, config.grad_clip)._asdict())
            runs[precision] = steps
            del model, optimizer
            accelerator.free_memory()
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
    return runs


def judge_fp16(runs: dict[str, list[dict[str, Any] | None]], init_scale: float) -> str:
    """The fp16 check's verdict on `fp16_and_bf16_runs`: the first step overflowed, each overflow halved the
    scale, training went on (most steps clean, every loss finite, the loss down) and every clean step's loss
    is within `FP16_VS_BF16` of bf16's on the same updates. The detail when it passes, else AssertionError."""
    fp16, bf16 = runs["fp16"], runs["bf16"]
    scales = [init_scale] + [r["loss_scale"] for r in fp16]
    overflows = [i + 1 for i, r in enumerate(fp16) if r["overflow"]]
    halved = all(fp16[i - 1]["loss_scale"] == scales[i - 1] / 2 for i in overflows)
    pairs = [(a["loss"], b["loss"]) for a, b in zip(fp16, bf16, strict=True) if not a["overflow"] and b is not None]
    diffs = [abs(a - b) / abs(b) if math.isfinite(a) and math.isfinite(b) else math.inf for a, b in pairs]
    worst = max(diffs, default=math.inf)
    detail = (
        f"{len(fp16)} steps: fp16 overflowed at steps {overflows} (scale {init_scale:.3g} -> {scales[-1]:.3g}); "
        f"loss {fp16[0]['loss']:.4f} -> {fp16[-1]['loss']:.4f}; against bf16 on the same updates: max rel. diff "
        f"{worst:.1e} over {len(pairs)} steps"
    )
    ok = (
        overflows[:1] == [1]
        and halved
        and len(overflows) <= len(fp16) // 2
        and fp16[-1]["loss"] < fp16[0]["loss"] - 0.5
        and worst <= FP16_VS_BF16
    )
    if not ok:
        raise AssertionError(detail)
    return detail


def check_fp16(ctx: Context) -> str:
    """fp16 with loss scaling, `mixed_precision auto` on CUDA GPUs without bf16 (T4, V100): the trainer's
    step with Accelerate's GradScaler, its first steps forced to overflow, against bf16."""
    if not ctx.cuda:
        raise Skip(
            "Accelerate makes a loss scaler for fp16 only on a GPU; the CPU tests run the trainer's fp16 path "
            "with a CPU GradScaler (tests/test_train_fp16.py)"
        )
    if not (data_dir(ctx) / "manifest.json").is_file():
        raise Skip("needs the data_prep check's corpus (run it in the same --work)")
    if ctx.elapsed() + FP16_SECONDS > ctx.args.budget:
        raise Skip(
            f"time budget: {ctx.elapsed():.0f} s of --budget {ctx.args.budget:.0f} s spent, and it takes about "
            f"{FP16_SECONDS} s"
        )
    s = ctx.shape.fp16
    init_scale = forcing_init_scale(s["micro_batch_size"] * s["seq_len"])
    runs = fp16_and_bf16_runs(ctx, data_dir(ctx))
    ctx.report["fp16"] = {
        "shape": s,
        "init_scale": init_scale,
        "steps": {  # bf16's None: a step left out, as fp16 overflowed there
            p: [r and {k: r[k] for k in ("loss", "overflow", "loss_scale")} for r in rs] for p, rs in runs.items()
        },
    }
    ctx.write()
    return judge_fp16(runs, init_scale)
