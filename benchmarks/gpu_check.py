"""Prove the CUDA path and measure it, in one command, within the few minutes a GPU is lent for.

    PYTHONPATH=. python3 benchmarks/gpu_check.py --out runs/gpu_check/gpu_check.json   # one CUDA device
    python benchmarks/gpu_check.py --smoke                                              # the harness, tiny, on the CPU
    PYTHONPATH=. python3 benchmarks/gpu_check.py --only trainer,eval,exports_on_cpu --out rerun.json

Checks, in order (each an entry {name, ok, detail, seconds} of `checks`; `ok` is null for a check that
does not apply here, with its reason, never true):
  environment      project imports without `datasets`/`evaluate`; device; versions against the tested ones
  tf32             TF32 matmuls take effect and stay within TF32's error (CUDA only)
  model_vs_gpt2    our logits against transformers' GPT2LMHeadModel with the same weights, fp32 and bf16
  flash_attention  SDPA's flash kernel forced: forward and backward against the math backend
  chunked_loss     the chunked linear + cross-entropy and its gradients against plain cross-entropy
  fused_adamw      fused AdamW against the unfused loop, same gradients, several steps
  generate_cache   cached against uncached greedy `generate`
  compile          torch.compile of the trainer's call against eager; compile time, peak memory
  data_prep        `python -m data_prep --builtin` in a subprocess (no `datasets` needed)
  trainer          `accelerate launch train_accelerate.py`: an uninterrupted run against a run SIGKILLed
                   after a checkpoint and resumed with `--resume auto`; tokens/s and MFU as logged
  fp16             the trainer's step under fp16 with Accelerate's loss scaler, its first steps forced to
                   overflow, against the same training under bf16 (CUDA only)
  fsdp             FSDP2 on the device (fsdp_8gpu.yaml, one process, bf16), a smaller model: SIGKILLed after a
                   sharded checkpoint and resumed, against an uninterrupted FSDP run and the same run without
                   FSDP; the export gathered from the shards, on the CPU (CUDA only)
  eval             validation loss of the run's export against the trainer's, HellaSwag-format scoring
                   throughput, `generate` tokens/s
  exports_on_cpu   the run's hf/ and hf-gpt2/ loaded on the CPU: the same logits as on the device
  ladder           bench_ladder.py's rungs, each in its own process

The JSON (`--out`) is rewritten after every check and every rung, so a run stopped at its time limit
still reports what it measured; `running` names the check in progress. A Markdown table is written
beside it. The exit status is 1 when any check failed. `--budget` seconds (default 450 on CUDA):
checks and rungs that would start past it are skipped with that reason.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GPU machine is offline: never wait on the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from user_errors import UserError, run_command  # noqa: E402

# The versions the project is tested with (README's install); the GPU image has its own.
TESTED_VERSIONS = {"torch": "2.13", "transformers": "5.24", "accelerate": "1.15"}
PACKAGES = ("torch", "transformers", "accelerate", "tiktoken", "safetensors", "tokenizers", "numpy", "huggingface_hub")
ABSENT_ON_GPU_IMAGE = ("datasets", "evaluate")
# The goal the GPU run is measured against (docs/benchmarks.md).
GOAL_MFU = 0.5
CHECK_NAMES = (
    "environment",
    "tf32",
    "model_vs_gpt2",
    "flash_attention",
    "chunked_loss",
    "fused_adamw",
    "generate_cache",
    "compile",
    "data_prep",
    "trainer",
    "fp16",
    "fsdp",
    "eval",
    "exports_on_cpu",
    "ladder",
)


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


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def markdown_path(args: argparse.Namespace) -> Path:
    return Path(args.md) if args.md else Path(args.out).with_suffix(".md")


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of every child: the repository first on PYTHONPATH (no `pip install -e .` on the GPU
    image), offline."""
    path = os.environ.get("PYTHONPATH", "")
    pythonpath = str(ROOT) + (os.pathsep + path if path else "")
    return {**os.environ, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1", **extra}


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


def bf16_autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tiny_model(ctx: Context, seed: int = 0, **overrides: Any):
    from modeling_gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM

    torch.manual_seed(seed)
    config = GPT2ScratchConfig.from_preset(ctx.shape.preset, **overrides)
    return GPT2ScratchForCausalLM(config).to(ctx.device)


def random_tokens(ctx: Context, rows: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50257, (rows, length), generator=g).to(ctx.device)


# ----------------------------------------------------------------------------------------------------
# The checks. Each returns a one-line detail (and may add to ctx.report); Skip says it does not apply.


def check_environment(ctx: Context) -> str:
    """Every module the check and the trainer use imports here, whether or not `datasets`/`evaluate` exist."""
    for module in ("modeling_gpt2_scratch", "conversion", "data_prep", "data_prep.loader", "training.metrics"):
        importlib.import_module(module)
    for module in ("train_accelerate", "eval.val_loss", "eval.hellaswag", "training.export", "bench_ladder"):
        importlib.import_module(module)
    absent = [name for name in ABSENT_ON_GPU_IMAGE if importlib.util.find_spec(name) is None]
    differ = ctx.report["version_differences"]
    parts = [f"{d['package']} {d['found']} (tested {d['tested']})" for d in differ] or ["versions as tested"]
    parts.append(f"absent: {', '.join(absent) or 'none'} of {', '.join(ABSENT_ON_GPU_IMAGE)}")
    return "; ".join(parts)


def check_tf32(ctx: Context) -> str:
    if not ctx.cuda:
        raise Skip("TF32 is a mode of NVIDIA tensor cores; this device is " + ctx.device.type)
    n = 4096
    g = torch.Generator(device=ctx.device).manual_seed(0)
    a = torch.randn(n, n, device=ctx.device, generator=g)
    b = torch.randn(n, n, device=ctx.device, generator=g)
    reference = (a.double() @ b.double()).float()
    timings, errors = {}, {}
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        out = a @ b
        synchronize(ctx.device)
        tick = time.perf_counter()
        for _ in range(10):
            out = a @ b
        synchronize(ctx.device)
        timings[tf32] = 10 * 2 * n**3 / (time.perf_counter() - tick)
        errors[tf32] = rel_diff(out, reference)
    torch.backends.cuda.matmul.allow_tf32 = True
    # TF32 keeps 10 mantissa bits: its error is far above fp32's and below about 1e-2 of the scale.
    ok = errors[True] > 10 * errors[False] and errors[True] < 1e-2
    detail = (
        f"fp32 {timings[False] / 1e12:.1f} TFLOP/s, rel. error {errors[False]:.1e}; "
        f"TF32 {timings[True] / 1e12:.1f} TFLOP/s, rel. error {errors[True]:.1e}"
    )
    if not ok:
        raise AssertionError("TF32 did not take effect or is too inexact: " + detail)
    return detail


def check_model_vs_gpt2(ctx: Context) -> str:
    """fp32 logits within 1e-4 of transformers' GPT-2 with the same weights; under bf16 autocast, our error
    against the fp32 logits no more than twice transformers' own (the same kernels make the same rounding)."""
    from conversion import to_gpt2

    ours = tiny_model(ctx).eval()
    theirs = to_gpt2(ours).to(ctx.device).eval()
    x = random_tokens(ctx, ctx.shape.batch, ctx.shape.seq_len)
    with torch.no_grad(), exact_fp32():
        a, b = ours(x).logits, theirs(x).logits
        fp32 = rel_diff(a, b)
        with bf16_autocast(ctx.device):
            a16, b16 = ours(x).logits, theirs(x).logits
    ours_err, theirs_err = rel_diff(a16, b), rel_diff(b16, b)
    detail = (
        f"fp32 rel. diff {fp32:.1e}; bf16 autocast rel. error against fp32: ours {ours_err:.1e}, "
        f"GPT2LMHeadModel {theirs_err:.1e}; {ctx.shape.preset}, {tuple(x.shape)}"
    )
    if not (fp32 <= 1e-4 and ours_err <= 2 * theirs_err + 1e-3):
        raise AssertionError(detail)
    return detail


def check_flash_attention(ctx: Context) -> str:
    """SDPA's flash kernel forced (an error if it cannot run here), forward and backward in bf16, against
    the math backend under the same autocast."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = tiny_model(ctx).train()
    x = random_tokens(ctx, ctx.shape.batch, ctx.shape.seq_len)
    results = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        model.zero_grad(set_to_none=True)
        with sdpa_kernel(backend), bf16_autocast(ctx.device):
            loss = model(input_ids=x[:, :-1], shift_labels=x[:, 1:]).loss
        loss.backward()
        grad = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
        results[backend] = (loss.item(), grad)
    (flash_loss, flash_grad), (math_loss, math_grad) = results[SDPBackend.FLASH_ATTENTION], results[SDPBackend.MATH]
    grad_diff = (flash_grad - math_grad).norm().item() / max(math_grad.norm().item(), 1e-12)
    detail = f"loss flash {flash_loss:.5f} vs math {math_loss:.5f}; gradient rel. norm diff {grad_diff:.1e} (bf16)"
    if not (abs(flash_loss - math_loss) <= 1e-2 and grad_diff <= 5e-2):
        raise AssertionError(detail)
    return detail


def loss_and_grads(model, x: torch.Tensor, chunked: bool, autocast: bool) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    context = bf16_autocast(x.device) if autocast else contextlib.nullcontext()
    with context:
        loss = model(input_ids=x[:, :-1], shift_labels=x[:, 1:], loss_only=chunked).loss
    loss.backward()
    grad = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
    return loss.item(), grad


def check_chunked_loss(ctx: Context) -> str:
    """loss_only=True (the trainer's call) against logits + cross-entropy: fp32 within 1e-5; under bf16
    autocast, its error against fp32 no more than twice the plain path's."""
    model = tiny_model(ctx).train()
    x = random_tokens(ctx, ctx.shape.batch, ctx.shape.seq_len + 1)
    with exact_fp32():
        plain_loss, plain_grad = loss_and_grads(model, x, chunked=False, autocast=False)
        chunk_loss, chunk_grad = loss_and_grads(model, x, chunked=True, autocast=False)
    bf_plain_loss, bf_plain_grad = loss_and_grads(model, x, chunked=False, autocast=True)
    bf_chunk_loss, bf_chunk_grad = loss_and_grads(model, x, chunked=True, autocast=True)

    def grad_err(g: torch.Tensor) -> float:
        return (g - plain_grad).norm().item() / plain_grad.norm().item()

    fp32_loss, fp32_grad = abs(chunk_loss - plain_loss) / plain_loss, grad_err(chunk_grad)
    bf_err, bf_plain_err = grad_err(bf_chunk_grad), grad_err(bf_plain_grad)
    detail = (
        f"fp32: loss rel. diff {fp32_loss:.1e}, gradient {fp32_grad:.1e}; bf16 gradient error against fp32: "
        f"chunked {bf_err:.1e}, plain {bf_plain_err:.1e}; loss chunked {bf_chunk_loss:.5f}, plain {bf_plain_loss:.5f}"
    )
    if not (fp32_loss <= 1e-5 and fp32_grad <= 1e-5 and bf_err <= 2 * bf_plain_err + 1e-3):
        raise AssertionError(detail)
    return detail


def check_fused_adamw(ctx: Context) -> str:
    """torch's fused AdamW (the trainer's) against its single-tensor loop: the same gradients, 5 steps."""
    from training.config import TrainConfig
    from training.recipe import build_optimizer, param_groups

    recipe = TrainConfig(warmup_steps=0)
    fused_model, loop_model = tiny_model(ctx), tiny_model(ctx)
    fused = build_optimizer(fused_model, recipe, ctx.device)
    betas = (recipe.adam_beta1, recipe.adam_beta2)
    loop = torch.optim.AdamW(
        param_groups(loop_model, recipe.weight_decay),
        lr=fused.param_groups[0]["lr"],
        betas=betas,
        eps=recipe.adam_eps,
        foreach=False,
        fused=False,
    )
    if not fused.defaults.get("fused"):
        raise AssertionError(f"build_optimizer did not pick the fused kernel on {ctx.device.type}")
    g = torch.Generator(device=ctx.device).manual_seed(0)
    for _ in range(5):
        for p, q in zip(fused_model.parameters(), loop_model.parameters(), strict=True):
            p.grad = torch.randn(p.shape, device=ctx.device, generator=g) * 1e-2
            q.grad = p.grad.clone()
        fused.step()
        loop.step()
    diff = max(max_abs_diff(p, q) for p, q in zip(fused_model.parameters(), loop_model.parameters(), strict=True))
    detail = f"max parameter diff after 5 steps {diff:.1e} (lr {fused.param_groups[0]['lr']:.1e})"
    if not diff <= 1e-6:
        raise AssertionError(detail)
    return detail


def check_generate_cache(ctx: Context) -> str:
    """Greedy generation with the KV cache gives the tokens and scores of generation without it (fp32). Two
    paths that round differently may part at a near-tie of an untrained model's top two tokens: that passes
    when the scores agreed up to it and the two tokens' scores there are within that rounding."""
    model = tiny_model(ctx).eval()
    prompt = random_tokens(ctx, ctx.shape.batch, 8)
    kwargs = dict(do_sample=False, max_new_tokens=ctx.shape.new_tokens, min_new_tokens=ctx.shape.new_tokens)
    kwargs.update(attention_mask=torch.ones_like(prompt), pad_token_id=50256, output_scores=True)
    with torch.no_grad(), exact_fp32():
        cached = model.generate(prompt, use_cache=True, return_dict_in_generate=True, **kwargs)
        plain = model.generate(prompt, use_cache=False, return_dict_in_generate=True, **kwargs)
    new = prompt.shape[1]
    return compare_generations(
        cached.sequences[:, new:], plain.sequences[:, new:], torch.stack(cached.scores, 1), torch.stack(plain.scores, 1)
    )


def compare_generations(a: torch.Tensor, b: torch.Tensor, scores_a: torch.Tensor, scores_b: torch.Tensor) -> str:
    """Greedy tokens (B, new) and their scores (B, new, vocab) of two generations: the detail when they agree
    (tokens equal and scores within 1e-4, or parted at a near-tie); else AssertionError."""
    differ = (a != b).any(0).nonzero()
    upto = int(differ[0]) if len(differ) else a.shape[1]  # positions before the first difference
    score_diff = rel_diff(scores_a[:, : upto + 1], scores_b[:, : upto + 1])
    detail = f"{a.shape[1]} new tokens x {a.shape[0]}: scores rel. diff {score_diff:.1e}; "
    if not len(differ):
        detail += "tokens equal"
    else:
        row = int((a[:, upto] != b[:, upto]).nonzero()[0])
        pair = scores_a[row, upto, [int(a[row, upto]), int(b[row, upto])]]
        margin = (pair[0] - pair[1]).abs().item() / scale(scores_a[:, : upto + 1])
        detail += f"tokens part at position {upto} (row {row}), a near-tie: margin {margin:.1e}"
        if not margin <= 10 * score_diff:
            raise AssertionError(detail.replace("a near-tie", "not a near-tie"))
    if not score_diff <= 1e-4:
        raise AssertionError(detail)
    return detail


def check_compile(ctx: Context) -> str:
    """torch.compile of the trainer's call (bf16 autocast on CUDA, chunked loss) against eager: loss and
    gradients; the compile time and the peak memory of a training step at the trainer's micro-batch."""
    if ctx.cuda:
        backend, rows, autocast = "inductor", ctx.shape.train["micro_batch_size"], True
    else:  # inductor's C++ build takes 30 to 55 s per graph on 2 CPU cores: the smoke traces only
        backend, rows, autocast = "aot_eager", ctx.shape.batch, False
    model = tiny_model(ctx).train()
    x = random_tokens(ctx, rows, ctx.shape.seq_len + 1)
    eager_loss, eager_grad = loss_and_grads(model, x, chunked=True, autocast=autocast)
    compiled = torch.compile(model, backend=backend)
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    times = []
    for _ in range(3):
        synchronize(ctx.device)
        tick = time.perf_counter()
        loss, grad = loss_and_grads(compiled, x, chunked=True, autocast=autocast)
        synchronize(ctx.device)
        times.append(time.perf_counter() - tick)
    compile_seconds = times[0] - statistics.median(times[1:])
    grad_diff = (grad - eager_grad).norm().item() / eager_grad.norm().item()
    peak = torch.cuda.max_memory_allocated(ctx.device) if ctx.cuda else None
    ctx.report["compile_seconds"]["compile_check"] = round(compile_seconds, 2)
    ctx.report["peak_memory_bytes"]["compile_check"] = peak
    # bf16 autocast: inductor fuses and orders the bf16 work differently from eager, a rounding apart.
    loss_tolerance, grad_tolerance = (5e-3, 5e-2) if autocast else (1e-5, 1e-5)
    detail = (
        f"{backend}, {rows}x{ctx.shape.seq_len}: compile {compile_seconds:.1f} s, step {times[-1] * 1e3:.0f} ms; "
        f"loss {loss:.5f} vs eager {eager_loss:.5f}, gradient rel. diff {grad_diff:.1e}"
        + (f"; peak memory {peak / 1e9:.2f} GB" if peak else "")
    )
    if not (abs(loss - eager_loss) <= loss_tolerance * abs(eager_loss) and grad_diff <= grad_tolerance):
        raise AssertionError(detail)
    return detail


def run_logged(command: list[str], log: Path, timeout: float, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run a child with its output in `log`; a non-zero exit is an error quoting the log's end."""
    with log.open("w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, **kwargs)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(command[:4])} ... exited {done.returncode}: {tail(log)}")
    return done


def tail(path: Path, chars: int = 600) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return " | ".join(text[-chars:].splitlines())


def data_dir(ctx: Context) -> Path:
    return ctx.work / "data-builtin"


def check_data_prep(ctx: Context) -> str:
    """The built-in corpus through the command users run, in a child process."""
    out = data_dir(ctx)
    command = [sys.executable, "-m", "data_prep", "--builtin", "--out_dir", str(out), "--no_progress"]
    run_logged(command, ctx.work / "data_prep.log", timeout=300, cwd=ROOT, env=subprocess_env())
    manifest = json.loads((out / "manifest.json").read_text())
    if not manifest.get("complete"):
        raise AssertionError(f"{out}/manifest.json is not complete")
    return f"{manifest['tokens']:,} tokens in {len(manifest['shards'])} shards, {manifest['documents']:,} documents"


def train_command(
    ctx: Context, out_dir: Path, *extra: str, sizes: dict[str, Any] | None = None, fsdp: bool = False
) -> list[str]:
    """`accelerate launch train_accelerate.py` with the shape's trainer settings (or `sizes`): on one
    device without FSDP, or with FSDP2 on one process of the FSDP launcher config (`fsdp`)."""
    config = "fsdp_8gpu.yaml" if fsdp else "gpu_1.yaml" if ctx.cuda else "cpu.yaml"
    fields = dict(
        data_dir=data_dir(ctx),
        out_dir=out_dir,
        report_to="none",
        hellaswag_path="none",
        mixed_precision="auto",
        **(ctx.shape.train if sizes is None else sizes),
    )
    flags = [item for name, value in fields.items() for item in (f"--{name}", str(value))]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    launcher += [str(ROOT / "accelerate_configs" / config)]
    if fsdp:  # port 0: a free port of its own, for FSDP launches that run side by side (torchrun's store)
        launcher += ["--num_processes", "1", "--main_process_port", "0"]
    launcher.append(str(ROOT / "train_accelerate.py"))
    return [*launcher, "--config", str(ROOT / "configs" / "gpt2-124m-fineweb-edu.yaml"), *flags, *extra]


def records(out_dir: Path) -> list[dict]:
    from training.metrics import read_records

    return read_records(out_dir)


def metric(out_dir: Path, name: str) -> dict[int, float]:
    from training.metrics import logged_metric

    return logged_metric(out_dir, name)


def start_launch(command: list[str], log: Path) -> subprocess.Popen:
    """A launch in its own process group (the launcher and the trainer it starts), output to `log`."""
    with log.open("w") as out:
        return subprocess.Popen(
            command, cwd=ROOT, env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a launch: its process group and every process below it. torchrun (the launcher of FSDP and
    multi-GPU runs) starts each worker in a session of its own, outside the launcher's group: a group kill
    alone would leave the trainer running on, to its end."""
    import psutil  # a requirement of accelerate

    below = []
    if proc.poll() is None:  # still ours: its pid names no other process
        with contextlib.suppress(psutil.NoSuchProcess):
            below = psutil.Process(proc.pid).children(recursive=True)
    for child in below:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def finish_launch(proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Wait for a launch; an error quoting its log if it fails or outlasts `timeout`."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise AssertionError(f"the launch outlasted {timeout:.0f} s: {tail(log)}") from None
    if proc.returncode != 0:
        raise AssertionError(f"the launch exited {proc.returncode}: {tail(log)}")


def kill_at_step(proc: subprocess.Popen, step: int, out_dir: Path, log: Path, timeout: float) -> int:
    """SIGKILL the launch's whole process group once `step` is logged; the newest step logged at the kill."""
    deadline = time.monotonic() + timeout
    try:
        while max(metric(out_dir, "train/loss"), default=0) < step:
            if proc.poll() is not None:
                raise AssertionError(f"the launch to be killed exited early ({proc.returncode}): {tail(log)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no step {step} within {timeout:.0f} s: {tail(log)}")
            time.sleep(0.01)
    finally:
        kill_group(proc)
    return max(metric(out_dir, "train/loss"))


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


def resumed_step(run_info: dict[str, Any]) -> int | None:
    """The step of the checkpoint a run's last launch resumed from (its run_info.json), or None."""
    resumed_from = run_info.get("resumed_from")
    return int(Path(resumed_from).name.split("_")[1]) if resumed_from else None


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
    from modeling_gpt2_scratch import GPT2ScratchForCausalLM
    from training.config import TrainConfig
    from training.recipe import build_optimizer, lr_at, set_lr
    from training.step import train_step

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


# The fsdp check on the device: four launches, the first three side by side, about 15 s start-up each.
FSDP_SECONDS = 90
# FSDP's modules compute with bf16 copies of all their weights, the run without FSDP with float32 weights under
# autocast (which casts only the matmuls' inputs): bf16 rounds at 2**-9 (2e-3) relative, and two trajectories
# that far apart part slowly (measured on a CPU with bf16 units, cpu-nano: 4e-5 over 8 steps on 2 processes,
# 3.5e-5 over 16 on one). 1e-2 is five times that rounding, room for 24 steps of drift: what breaks outright
# (a NaN, a model that does not learn, wrong weights) lands far outside; a subtler error may not, so the
# measured figure is reported, and it is the one to read.
FSDP_VS_PLAIN = 1e-2
SHARDED_MODEL = "pytorch_model_fsdp_0"  # Accelerate's FSDP_MODEL_NAME: torch.distributed.checkpoint files


def check_fsdp(ctx: Context) -> str:
    """FSDP2 on the one device (the FSDP launcher config, one process, the trainer's bf16): an uninterrupted
    run, one SIGKILLed after a sharded checkpoint and resumed with --resume auto, the same run without FSDP,
    and the export gathered from the shards."""
    if not ctx.cuda:
        raise Skip(
            "Accelerate runs FSDP only on accelerators (on this device the FSDP launcher config would train with "
            "DDP, which the trainer refuses); the CPU test suite forces its FSDP path through tests/fsdp_on_cpu.py"
        )
    if not (data_dir(ctx) / "manifest.json").is_file():
        raise Skip("needs the data_prep check's corpus (run it in the same --work)")
    if ctx.elapsed() + FSDP_SECONDS > ctx.args.budget:
        raise Skip(
            f"time budget: {ctx.elapsed():.0f} s of --budget {ctx.args.budget:.0f} s spent, and it takes about "
            f"{FSDP_SECONDS} s"
        )
    from training.recipe import resolve_mixed_precision

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    runs = ctx.work / f"fsdp-{stamp}"
    runs.mkdir(parents=True)
    killed_at = fsdp_launches(ctx, runs, timeout=300)
    fsdp = ctx.report["fsdp"] = compare_fsdp_runs(
        runs, killed_at, ctx.shape.fsdp_train["max_steps"], resolve_mixed_precision("auto")
    )
    ctx.write()  # the figures, before anything is judged
    fsdp.update(fsdp_outputs(runs))
    ctx.write()
    # on CUDA a resume's difference within bf16's noise is reported, above it fails (as in the trainer check)
    return judge_fsdp(fsdp, resume_tolerance=1e-2)


def fsdp_launches(ctx: Context, runs: Path, timeout: float) -> int:
    """`uninterrupted` and `killed` with FSDP, `plain` without, side by side (their losses are compared, not
    their speed); `killed` SIGKILLed at the shape's step and relaunched with --resume auto. The step logged
    at the kill."""
    sizes, procs = ctx.shape.fsdp_train, {}
    try:
        for name in ("uninterrupted", "plain", "killed"):
            command = train_command(ctx, runs / name, sizes=sizes, fsdp=name != "plain")
            procs[name] = start_launch(command, runs / f"{name}.log")
        killed_at = kill_at_step(
            procs["killed"], ctx.shape.fsdp_kill_after, runs / "killed", runs / "killed.log", timeout
        )
        for name in ("uninterrupted", "plain"):
            finish_launch(procs[name], runs / f"{name}.log", timeout)
    except BaseException:
        for proc in procs.values():
            kill_group(proc)
        raise
    resumed = start_launch(
        train_command(ctx, runs / "killed", "--resume", "auto", sizes=sizes, fsdp=True), runs / "resumed.log"
    )
    finish_launch(resumed, runs / "resumed.log", timeout)
    return killed_at


def max_diff(a: dict[int, float], b: dict[int, float], steps: list[int], relative: bool = False) -> float:
    """max |a[s] - b[s]| over `steps` (relative: divided by |b[s]|); inf where a value is not finite (a NaN never
    passes), NaN when `steps` is empty."""
    diffs = [abs(a[s] - b[s]) / (abs(b[s]) if relative else 1.0) for s in steps]
    return math.inf if any(not math.isfinite(d) for d in diffs) else max(diffs, default=math.nan)


def compare_fsdp_runs(runs: Path, killed_at: int, max_steps: int, precision: str) -> dict[str, Any]:
    """The fsdp check's runs in `runs` (uninterrupted, killed + resumed, plain): how far the resumed run's
    losses are from the uninterrupted run's, and the FSDP run's from the run without FSDP. AssertionError
    unless every step was logged once, FSDP ran where asked, `precision` in all, and the relaunch resumed
    from a checkpoint before the kill."""
    reference, killed, plain = runs / "uninterrupted", runs / "killed", runs / "plain"
    info = {run.name: json.loads((run / "run_info.json").read_text()) for run in (reference, killed, plain)}
    kinds = {
        name: (i.get("distributed_type"), i.get("processes"), i.get("mixed_precision")) for name, i in info.items()
    }
    fsdp_kind = ("DistributedType.FSDP", 1, precision)
    if not (kinds["uninterrupted"] == kinds["killed"] == fsdp_kind and kinds["plain"][1:] == (1, precision)):
        raise AssertionError(f"the runs are not FSDP on one process in {precision} and one without: {kinds}")
    if kinds["plain"][0] == "DistributedType.FSDP":
        raise AssertionError(f"the run to compare against ran FSDP too: {kinds}")
    steps = list(range(1, max_steps + 1))
    train = {run.name: metric(run, "train/loss") for run in (reference, killed, plain)}
    val = {run.name: metric(run, "val/loss") for run in (reference, killed, plain)}
    if any(sorted(logged) != steps for logged in train.values()):
        raise AssertionError(f"steps logged: { {name: sorted(logged) for name, logged in train.items()} }")
    val_steps = sorted(val["uninterrupted"])
    if not val_steps or any(sorted(logged) != val_steps for logged in val.values()):
        raise AssertionError(f"val/loss steps logged: { {name: sorted(logged) for name, logged in val.items()} }")
    resumed_from = resumed_step(info["killed"])
    if resumed_from is None or resumed_from >= killed_at:
        raise AssertionError(f"the relaunch did not resume from a checkpoint before step {killed_at}: {info['killed']}")
    a, b = train["uninterrupted"], train["killed"]
    after = [s for s in val_steps if s > resumed_from]
    result = {
        "out_dir": str(runs),
        "mixed_precision": precision,
        "killed_at_step": killed_at,
        "resumed_from_step": resumed_from,
        # the two FSDP launches before the kill: the run-to-run noise of the same launch
        "max_loss_diff_before_resume": max_diff(a, b, steps[:resumed_from]),
        "max_loss_diff_after_resume": max_diff(a, b, steps[resumed_from:]),
        "max_val_loss_diff_after_resume": max_diff(val["uninterrupted"], val["killed"], after),
        "bitwise_equal": a == b and val["uninterrupted"] == val["killed"],
        "vs_plain_max_rel_diff": max_diff(a, train["plain"], steps, relative=True),
        "vs_plain_first_step_rel_diff": max_diff(a, train["plain"], steps[:1], relative=True),
        "vs_plain_val_max_rel_diff": max_diff(val["uninterrupted"], val["plain"], val_steps, relative=True),
        "final_train_loss": a[max_steps],
        "final_train_loss_plain": train["plain"][max_steps],
    }
    return result


def judge_fsdp(result: dict[str, Any], resume_tolerance: float) -> str:
    """The fsdp check's detail when (a) the resumed run's losses after its checkpoint are within
    `resume_tolerance` of the uninterrupted run's (absolute) and (b) the FSDP run's within FSDP_VS_PLAIN
    (relative) of the run without FSDP; else AssertionError."""
    val_after = result["max_val_loss_diff_after_resume"]  # NaN when no evaluation came after the checkpoint
    resumed = max(result["max_loss_diff_after_resume"], 0.0 if math.isnan(val_after) else val_after)
    if not resumed <= resume_tolerance:
        raise AssertionError(
            f"{fsdp_detail(result)}: the resumed run is {resumed:.2e} off (allowed {resume_tolerance})"
        )
    versus = max(result["vs_plain_max_rel_diff"], result["vs_plain_val_max_rel_diff"])
    if not versus <= FSDP_VS_PLAIN:
        raise AssertionError(
            f"{fsdp_detail(result)}: FSDP is {versus:.2e} off the run without (allowed {FSDP_VS_PLAIN})"
        )
    return fsdp_detail(result)


def fsdp_outputs(runs: Path) -> dict[str, Any]:
    """(c) The checkpoints of both FSDP runs are sharded (no unsharded model beside), and the uninterrupted
    run's hf-gpt2/ export, gathered from the shards, holds float32 weights that load in GPT2LMHeadModel on
    the CPU with the logits of hf/ in our class."""
    from safetensors.torch import load_file

    # the resumed launch read its checkpoint's shards (an FSDP launch refuses an unsharded one), then wrote its own
    checkpoints = {run: sorted((runs / run / "checkpoints").glob("step_*")) for run in ("uninterrupted", "killed")}
    if not all(checkpoints.values()):
        raise AssertionError(f"a run kept no checkpoint: {checkpoints}")
    for checkpoint in [*checkpoints["uninterrupted"], *checkpoints["killed"]]:
        shards = list((checkpoint / SHARDED_MODEL).glob("*.distcp"))
        if not shards or (checkpoint / "model.safetensors").exists():
            raise AssertionError(
                f"{checkpoint} is not an FSDP checkpoint: {sorted(p.name for p in checkpoint.iterdir())}"
            )
    export = runs / "uninterrupted" / "hf-gpt2"
    dtypes = sorted({str(t.dtype) for t in load_file(export / "model.safetensors").values()})
    if dtypes != ["torch.float32"]:
        raise AssertionError(f"{export} holds {dtypes} weights, not float32 (the master weights)")
    gpt2 = export_logits(export, "cpu", remote_code=False)
    ours = export_logits(runs / "uninterrupted" / "hf", "cpu", remote_code=True)
    diff = max_abs_diff(gpt2, ours)
    if not diff <= 1e-4:
        raise AssertionError(f"{export} in GPT2LMHeadModel: logits {diff:.1e} from hf/ in our class")
    return {"sharded_checkpoints": sum(map(len, checkpoints.values())), "export_logits_max_diff": diff}


def fsdp_detail(fsdp: dict[str, Any]) -> str:
    resume = (
        "bitwise equal" if fsdp["bitwise_equal"] else f"max |train loss diff| {fsdp['max_loss_diff_after_resume']:.2e}"
    )
    detail = (
        f"FSDP2, 1 process, {fsdp['mixed_precision']}: killed at step {fsdp['killed_at_step']}, resumed from the "
        f"shards of {fsdp['resumed_from_step']}: losses {resume} (before the kill "
        f"{fsdp['max_loss_diff_before_resume']:.1e}, val {fsdp['max_val_loss_diff_after_resume']:.1e}); "
        f"against the run without FSDP: train loss rel. diff {fsdp['vs_plain_max_rel_diff']:.1e} "
        f"(step 1 {fsdp['vs_plain_first_step_rel_diff']:.1e}), val "
        f"{fsdp['vs_plain_val_max_rel_diff']:.1e}"
    )
    if "export_logits_max_diff" in fsdp:
        detail += f"; hf-gpt2/ gathered, on the CPU: logits {fsdp['export_logits_max_diff']:.1e} from hf/"
    return detail


def synthetic_hellaswag(count: int) -> list[dict]:
    """HellaSwag-format examples (ctx, four endings, label) cut from the built-in corpus: the scoring's
    speed does not depend on the text, and the real file cannot be fetched offline."""
    from pydoc_data import topics  # the built-in corpus's first documents, without parsing the stdlib

    words = " ".join(topics.topics[key] for key in sorted(topics.topics)).split()
    examples = []
    for i in range(count):
        start = (i * 97) % (len(words) - 120)
        ctx = " ".join(words[start : start + 40])
        endings = [" ".join(words[start + 40 + 15 * k : start + 55 + 15 * k]) for k in range(4)]
        examples.append({"ind": i, "ctx": ctx, "endings": endings, "label": i % 4})
    return examples


def run_for_eval(ctx: Context) -> Path:
    if ctx.run_dir is None:
        found = sorted(ctx.work.glob("trainer-*/uninterrupted/hf-gpt2"))
        if not found:
            raise Skip("needs the trainer check's run (e.g. --only data_prep,trainer,eval,exports_on_cpu)")
        ctx.run_dir = found[-1].parent
    for name in ("hf", "hf-gpt2"):
        if not (ctx.run_dir / name / "config.json").is_file():
            raise AssertionError(f"{ctx.run_dir / name} holds no export")
    return ctx.run_dir


def check_eval(ctx: Context) -> str:
    """The export's validation loss (eval.val_loss, as the trainer computes it), HellaSwag-format scoring and
    generate, on this device."""
    from data_prep.tokenizer import get_encoding
    from eval.common import autocast, load_model
    from eval.hellaswag import evaluate_hellaswag
    from eval.val_loss import evaluate_val_loss

    run = run_for_eval(ctx)
    train, logged = ctx.shape.train, metric(run, "val/loss")
    model = load_model(str(run / "hf"), device=ctx.device)
    synchronize(ctx.device)
    tick = time.perf_counter()
    val = evaluate_val_loss(
        model,
        data_dir(ctx),
        batch_size=train["micro_batch_size"],
        seq_len=train["seq_len"],
        max_batches=train["val_batches"],
    )
    synchronize(ctx.device)
    val_seconds = time.perf_counter() - tick
    trainer_val = logged[max(logged)]

    examples = synthetic_hellaswag(ctx.shape.hellaswag_examples)
    evaluate_hellaswag(model, examples[:4], batch_size=4, device=ctx.device)  # warm-up
    synchronize(ctx.device)
    tick = time.perf_counter()
    evaluate_hellaswag(model, examples, batch_size=16, device=ctx.device)
    synchronize(ctx.device)
    hellaswag_rate = len(examples) / (time.perf_counter() - tick)

    prompt = torch.tensor([get_encoding().encode("Hello, I'm a language model,")] * 8, device=ctx.device)
    kwargs = dict(attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=50256)
    with torch.no_grad(), autocast(ctx.device):
        model.generate(prompt, max_new_tokens=4, **kwargs)  # warm-up
        synchronize(ctx.device)
        tick = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=ctx.shape.new_tokens, min_new_tokens=ctx.shape.new_tokens, **kwargs)
        synchronize(ctx.device)
    generated = (out.shape[1] - prompt.shape[1]) * prompt.shape[0]
    generate_rate = generated / (time.perf_counter() - tick)
    ctx.report["eval"] = {
        "val_loss": val,
        "trainer_val_loss": trainer_val,
        "val_tokens_per_s": train["micro_batch_size"] * train["seq_len"] * train["val_batches"] / val_seconds,
        "hellaswag_examples_per_s": hellaswag_rate,
        "generate_tokens_per_s": generate_rate,
        "generate_batch": prompt.shape[0],
    }
    # On CUDA the trainer evaluates the compiled model under Accelerate's autocast, this the eager export
    # under eval's: bf16 rounding differs a little. On the CPU both are the same fp32 computation.
    tolerance = 2e-2 if ctx.cuda else 1e-5
    detail = (
        f"val loss {val:.4f} vs trainer's {trainer_val:.4f}; HellaSwag-format {hellaswag_rate:,.1f} examples/s; "
        f"generate {generate_rate:,.0f} tokens/s (batch {prompt.shape[0]}, greedy, KV cache)"
    )
    if not abs(val - trainer_val) <= tolerance:
        raise AssertionError(detail)
    return detail


EXPORT_TOKENS = [[15496, 11, 314, 1101, 257, 3303, 2746, 11, 290, 314, 588, 284, 1100, 546, 257, 1110]]


def export_logits(folder: Path, device: str, remote_code: bool) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=remote_code)
    with torch.no_grad():
        return model.to(device).eval()(torch.tensor(EXPORT_TOKENS, device=device)).logits.float().cpu()


def check_exports_on_cpu(ctx: Context) -> str:
    """hf/ (our class, as remote code) and hf-gpt2/ (stock GPT2LMHeadModel) of the run, loaded in a CPU-only
    child process, give the logits the device gives (fp32)."""
    run = run_for_eval(ctx)
    with exact_fp32():
        device_logits = export_logits(run / "hf", str(ctx.device), remote_code=True)
    from safetensors.torch import load_file

    out = ctx.work / "cpu_logits.safetensors"
    command = [sys.executable, str(Path(__file__).resolve()), "--cpu-logits", str(run), str(out)]
    run_logged(command, ctx.work / "exports_on_cpu.log", 300, cwd=ROOT, env=subprocess_env(CUDA_VISIBLE_DEVICES=""))
    cpu = load_file(out)
    ours_vs_gpt2 = max_abs_diff(cpu["hf"], cpu["hf-gpt2"])
    vs_device = max(rel_diff(cpu[name], device_logits) for name in ("hf", "hf-gpt2"))
    detail = f"CPU: hf/ vs hf-gpt2/ max diff {ours_vs_gpt2:.1e}; CPU vs {ctx.device.type}: rel. diff {vs_device:.1e}"
    if not (ours_vs_gpt2 <= 1e-4 and vs_device <= 1e-3):
        raise AssertionError(detail)
    return detail


def cpu_logits_worker(run: str, out: str) -> None:
    from safetensors.torch import save_file

    if torch.cuda.is_available():
        raise SystemExit("the CPU worker sees a CUDA device")
    logits = {name: export_logits(Path(run) / name, "cpu", remote_code=name == "hf") for name in ("hf", "hf-gpt2")}
    save_file({k: v.contiguous() for k, v in logits.items()}, out)


def check_ladder(ctx: Context) -> str:
    """bench_ladder.py's rungs, each in its own process, each written to the report when measured."""
    import bench_ladder

    s = ctx.shape.ladder
    argv = ["--device", ctx.device.type, "--preset", s["preset"], "--seq-len", str(s["seq_len"])]
    argv += ["--batch-size", str(s["batch_size"]), "--steps", str(s["steps"]), "--warmup", str(s["warmup"])]
    args = bench_ladder.parse_args(argv)
    peak, source = bench_ladder.device_peak(args)
    flops = bench_ladder.flops_per_token(args)
    ctx.report["ladder"] = {"shape": s, "device_peak_flops": peak, "device_peak_source": source}
    rungs = ctx.report["rungs"] = []
    last_wall = 0.0
    for rung in bench_ladder.ladder():
        reason = bench_ladder.skip_reason(rung, args.device)
        if not reason and ctx.args.smoke and rung.name != "fp32":
            reason = "--smoke measures the first rung only, which proves the worker (compiled rungs: 30 to 55 s each)"
        # A rung takes about as long as the one before, and a compiled one a minute at least (cold cache).
        compiles = bench_ladder.effective_settings(rung.name, args.device).compile
        estimate = max(last_wall, 60.0 if compiles else 0.0)
        if not reason and ctx.elapsed() + estimate > ctx.args.budget:
            reason = f"time budget: {ctx.elapsed():.0f} s of --budget {ctx.args.budget:.0f} s spent"
        if reason:
            rungs.append({"name": rung.name, "change": rung.change, "tokens_per_s": None, "reason": reason})
        else:
            rungs.append(bench_ladder.measure_rung(rung, args, peak, flops))
            last_wall = rungs[-1].get("wall_seconds") or 0.0
        ctx.write()
    measured = [r for r in rungs if r["tokens_per_s"] is not None]
    failed = [r["name"] for r in rungs if r["tokens_per_s"] is None and r["reason"].startswith("failed")]
    best = max(measured, key=lambda r: r["tokens_per_s"], default=None)
    detail = f"{len(measured)} of {len(rungs)} rungs measured"
    if best:
        detail += f"; fastest {best['name']} {best['tokens_per_s']:,.0f} tokens/s, MFU {best.get('mfu', 0):.1%}"
    if failed:
        raise AssertionError(f"{detail}; failed: {', '.join(failed)}")
    return detail


CHECKS: dict[str, Callable[[Context], str]] = {
    "environment": check_environment,
    "tf32": check_tf32,
    "model_vs_gpt2": check_model_vs_gpt2,
    "flash_attention": check_flash_attention,
    "chunked_loss": check_chunked_loss,
    "fused_adamw": check_fused_adamw,
    "generate_cache": check_generate_cache,
    "compile": check_compile,
    "data_prep": check_data_prep,
    "trainer": check_trainer,
    "fp16": check_fp16,
    "fsdp": check_fsdp,
    "eval": check_eval,
    "exports_on_cpu": check_exports_on_cpu,
    "ladder": check_ladder,
}
assert tuple(CHECKS) == CHECK_NAMES


# ----------------------------------------------------------------------------------------------------
# The report.


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


def markdown(report: dict[str, Any]) -> str:
    import bench_ladder

    device = report["device"]
    head = f"**{device.get('name')}**"
    if device.get("memory_bytes"):
        head += f", {device['memory_bytes'] / 2**30:.0f} GiB, compute capability {device['compute_capability']}"
    found = report["versions"]
    head += "; " + ", ".join(f"{k} {found[k]}" for k in ("python", "torch", "transformers", "accelerate"))
    head += f"; {report['date']}" + (" (--smoke)" if report["smoke"] else "")
    lines = [head, ""]
    differ = report["version_differences"]
    if differ:
        lines += [
            "Versions other than tested: "
            + ", ".join(f"{d['package']} {d['found']} (tested {d['tested']})" for d in differ),
            "",
        ]
    if report.get("goal"):
        goal = report["goal"]
        verdict = "met" if goal["met"] else "not met"
        lines += [f"Trainer MFU {goal['mfu']:.1%} against the goal of {goal['target']:.0%}: {verdict}.", ""]
    lines += ["| check | result | detail | seconds |", "|---|---|---|---|"]
    for c in report["checks"]:
        result = "ok" if c["ok"] else ("skipped" if c["ok"] is None else "FAILED")
        detail = str(c["detail"]).replace("|", "/").replace("\n", " ")
        lines.append(f"| {c['name']} | {result} | {detail} | {c['seconds']:.1f} |")
    if report.get("running"):
        lines.append(f"| {report['running']} | stopped while running | | |")
    if report.get("rungs"):
        lines += ["", bench_ladder.markdown({"rungs": report["rungs"]})]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a tiny model on whatever device is there (the CPU here)")
    p.add_argument("--out", default="runs/gpu_check/gpu_check.json", help="the JSON report, rewritten after each check")
    p.add_argument("--md", default=None, help="the Markdown table (default: --out with .md)")
    p.add_argument("--only", default=None, help=f"comma-separated checks to run, of: {', '.join(CHECK_NAMES)}")
    p.add_argument("--work", default="runs/gpu_check/work", help="folder for the corpus, the trainer's runs, logs")
    p.add_argument("--budget", type=float, default=None, help="seconds after which no check or rung starts")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available)")
    p.add_argument("--cpu-logits", nargs=2, metavar=("RUN", "OUT"), help=argparse.SUPPRESS)  # internal worker
    args = p.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()] if args.only else list(CHECK_NAMES)
    unknown = [name for name in args.only if name not in CHECKS]
    if unknown:
        raise UserError(f"--only: unknown check(s) {', '.join(unknown)}; choose from {', '.join(CHECK_NAMES)}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to torch here")
    if not (args.smoke or args.cpu_logits or args.device.startswith("cuda")):
        raise UserError("the full check trains GPT-2 124M and needs a CUDA device; on a CPU run it with --smoke")
    if args.budget is None:
        args.budget = 450.0 if args.device.startswith("cuda") and not args.smoke else math.inf
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one bar per loaded model would bury the results
    if args.cpu_logits:
        cpu_logits_worker(*args.cpu_logits)
        return 0
    device = torch.device(args.device)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    found = versions()
    report: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/gpu_check.py", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "device": describe_device(device),
        "versions": found,
        "tested_versions": TESTED_VERSIONS,
        "version_differences": version_differences(found),
        "goal": None,
        "compile_seconds": {},  # the compile check's first step, the trainer's first step: each minus a steady one
        "peak_memory_bytes": {},  # the compile check's training step (the ladder's rungs have their own)
        "running": None,
        "finished": False,
        "checks": [],
        "rungs": [],
    }
    ctx = Context(args, device, SMOKE_SHAPE if args.smoke else GPU_SHAPE, work, report)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as the trainer
    print(f"gpu_check on {report['device']['name']}: {', '.join(args.only)}", file=sys.stderr)
    for name in args.only:
        report["running"] = name
        ctx.write()
        tick = time.perf_counter()
        entry: dict[str, Any] = {"name": name}
        if ctx.elapsed() > args.budget:
            entry.update(ok=None, detail=f"skipped: time budget ({args.budget:.0f} s) spent")
        else:
            try:
                entry.update(ok=True, detail=CHECKS[name](ctx))
            except Skip as why:
                entry.update(ok=None, detail=f"skipped: {why}")
            except Exception as err:  # a failed check is recorded and the others still run
                entry.update(ok=False, detail=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        entry["seconds"] = round(time.perf_counter() - tick, 2)
        if device.type == "cuda":  # give the check's cached blocks back: the trainer's processes need them
            gc.collect()
            torch.cuda.empty_cache()
        report["checks"].append(entry)
        report["running"] = None
        result = {True: "ok", False: "FAILED", None: "skipped"}[entry["ok"]]
        print(f"  {name:>15}: {result} ({entry['seconds']:.1f} s) {entry['detail']}", file=sys.stderr)
        ctx.write()
    report["finished"] = True
    ctx.write()
    print(markdown(report))
    print(f"wrote {args.out} and {markdown_path(args)}", file=sys.stderr)
    return 1 if any(c["ok"] is False for c in report["checks"]) else 0


if __name__ == "__main__":
    run_command(main)
