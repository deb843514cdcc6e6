"""The throughput ladder of the GPT-2 reproduction, on our model and our trainer's step, as one command.

Each rung adds one change to the rung before it (fp32 -> TF32 matmuls -> bf16 autocast ->
torch.compile -> flash attention (SDPA) -> vocabulary padded to 50,304 -> fused AdamW), then our own
rungs follow (the chunked linear + cross-entropy loss, thread pinning, huge pages). Every rung runs in
its own process (so each has its own peak memory and its own environment variables): warm-up steps
(which include compilation) are timed apart, then the median of the timed steps gives tokens/s and
MFU. A rung that does not apply to the device (TF32 and bf16 on a CPU without native bf16, say) is
written with `tokens_per_s: null` and the reason. Writes JSON (`--out`) and a Markdown table (`--md`).

    python benchmarks/bench_ladder.py     # CPU: cpu-mini, T=256, B=8: 3 to 6.5 minutes on 2 cores
    python benchmarks/bench_ladder.py     # CUDA: GPT-2 124M, T=1024, B=16, as in the reproduction
    python benchmarks/bench_ladder.py --rungs fp32,compile --steps 3   # a subset, fewer steps
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_train import check_shape  # noqa: E402  (this folder is on the path, as for any script)

from gpt2_scratch.training.config import TrainConfig  # noqa: E402
from gpt2_scratch.training.metrics import device_peak_flops  # noqa: E402
from gpt2_scratch.training.recipe import build_optimizer, lr_at, param_groups  # noqa: E402
from gpt2_scratch.user_errors import UserError, check_at_least, run_command  # noqa: E402
from modeling_gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM  # noqa: E402

CPU_SHAPE = dict(preset="cpu-mini", seq_len=256, batch_size=8)  # bench_train.py's CPU shape
GPU_SHAPE = dict(preset="gpt2", seq_len=1024, batch_size=16)  # the reproduction's single-GPU ladder


@dataclass(frozen=True)
class Settings:
    """Everything a rung may change; the first rung has them all off."""

    tf32: bool = False  # TF32 tensor-core matmuls for fp32 (CUDA)
    bf16: bool = False  # bf16 autocast
    compile: bool = False  # torch.compile (inductor) of the whole model
    sdpa: bool = False  # SDPA's fused kernels (flash / memory-efficient); off: its math backend
    pad_vocab: bool = False  # vocabulary padded to a multiple of 64 (50,304) instead of 50,257
    fused_adamw: bool = False  # the trainer's optimizer (fused AdamW); off: torch's default AdamW (foreach on CUDA)
    chunked_loss: bool = False  # the trainer's call, loss_only=True: never holds the (B, T, vocab) logits
    env: dict[str, str] = field(default_factory=dict)  # environment of the rung's process


@dataclass(frozen=True)
class Rung:
    name: str
    change: str
    settings: Settings
    cuda_only: str = ""  # why the rung is not measured on a CPU ("" : it is)
    cpu_only: str = ""  # why the rung is not measured on CUDA ("" : it is)
    needs_bf16: bool = False  # measured only where bf16 matmuls are native


def ladder() -> list[Rung]:
    """The rungs, each the one before plus one change."""
    s = Settings()
    rungs = []

    def add(name: str, change: str, cuda_only: str = "", cpu_only: str = "", **changes: Any) -> None:
        nonlocal s
        s = replace(s, **changes)
        rungs.append(Rung(name, change, s, cuda_only, cpu_only, needs_bf16=changes.get("bf16", False)))

    add("fp32", "eager fp32, SDPA math backend, vocabulary 50,257, default AdamW, logits + cross-entropy")
    add("tf32", "TF32 matmuls", tf32=True, cuda_only="TF32 is a mode of NVIDIA tensor cores")
    add("bf16", "bf16 autocast", bf16=True)
    add("compile", "torch.compile (inductor)", compile=True)
    add("flash", "SDPA fused attention kernels (flash on CUDA and on CPU)", sdpa=True)
    add("vocab_50304", "vocabulary padded to 50,304 (a multiple of 64)", pad_vocab=True)
    add("fused_adamw", "fused AdamW (the trainer's optimizer)", fused_adamw=True)
    add("chunked_loss", "ours: chunked linear + cross-entropy (loss_only=True, the trainer's call)", chunked_loss=True)
    host = "a host-side setting for CPU training; the CUDA step does not run on these threads"
    pinned = {"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}
    add("pinned_threads", "ours: OpenMP threads pinned to cores", env=pinned, cpu_only=host)
    add("huge_pages", "ours: huge pages for large tensors", env={**pinned, "THP_MEM_ALLOC_ENABLE": "1"}, cpu_only=host)
    return rungs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    p.add_argument("--preset", default=None, help="model size (PRESETS); default gpt2 on CUDA, cpu-mini on CPU")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence; default 1024 CUDA, 256 CPU")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step; default 16 CUDA, 8 CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps per rung (median); default 10 CUDA, 4 CPU")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (compile); default 3 CUDA, 1 CPU")
    p.add_argument("--rungs", default="all", help="comma-separated rung names to run (each keeps its full settings)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU, overriding the default")
    p.add_argument("--seed", type=int, default=0, help="seed for the weights and the random tokens")
    p.add_argument("--out", default="runs/bench/bench_ladder.json", help="where to write the JSON results")
    p.add_argument("--md", default=None, help="where to write the Markdown table (default: --out with .md)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one rung, print its JSON
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    for key, value in (GPU_SHAPE if cuda else CPU_SHAPE).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.steps = args.steps or (10 if cuda else 4)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    check_shape(args.preset, args.seq_len)
    flags = {"--seq-len": args.seq_len, "--batch-size": args.batch_size, "--steps": args.steps, "--warmup": args.warmup}
    check_at_least(flags, {"--seq-len": 1, "--batch-size": 1, "--steps": 1, "--warmup": 0})
    return args


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_rung(rung: Rung, args: argparse.Namespace) -> dict[str, Any]:
    """Train the rung's configuration for warm-up + timed steps in this process; its measurements."""
    s, device = effective_settings(rung.name, args.device), args.device
    cuda = device.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = s.tf32
    torch.manual_seed(args.seed)
    config = GPT2ScratchConfig.from_preset(args.preset, pad_vocab_multiple=64 if s.pad_vocab else 1)
    model = GPT2ScratchForCausalLM(config).to(device).train()
    recipe = TrainConfig(warmup_steps=0)  # the trainer's optimizer, at its peak learning rate
    if s.fused_adamw:
        optimizer = build_optimizer(model, recipe, torch.device(device))
    else:
        groups, betas = param_groups(model, recipe.weight_decay), (recipe.adam_beta1, recipe.adam_beta2)
        optimizer = torch.optim.AdamW(groups, lr=lr_at(0, recipe), betas=betas, eps=recipe.adam_eps)
    step_model = torch.compile(model) if s.compile else model
    g = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1), generator=g).to(device)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # as the loader gives them

    from torch.nn.attention import SDPBackend, sdpa_kernel

    last_loss = []

    def step() -> float:
        synchronize(device)
        start = time.perf_counter()
        attention = contextlib.nullcontext() if s.sdpa else sdpa_kernel(SDPBackend.MATH)
        with attention, torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=s.bf16):
            loss = step_model(input_ids=x, shift_labels=y, loss_only=s.chunked_loss).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        last_loss[:] = [loss.item()]
        return time.perf_counter() - start

    warmup = [step() for _ in range(args.warmup)]
    times = [step() for _ in range(args.steps)]
    tokens_per_step = args.batch_size * args.seq_len
    median = statistics.median(times)
    return {
        "warmup_seconds": warmup,
        "step_seconds": times,
        "tokens_per_s": tokens_per_step / median,
        "best_tokens_per_s": tokens_per_step / min(times),
        "compile_seconds": max(warmup[0] - median, 0.0) if s.compile and warmup else None,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes(),
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if cuda else "peak resident set (VmHWM)",
        "final_loss": last_loss[0],
        "torch_threads": torch.get_num_threads(),
    }


def native_bf16(device: str) -> bool:
    """Whether this device runs bf16 matmuls natively: CUDA that supports bf16, a CPU with AVX-512 BF16
    or AMX (oneDNN's check). Elsewhere bf16 is emulated, many times slower than fp32."""
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def skip_reason(rung: Rung, device: str) -> str | None:
    """Why the rung is not measured on this device, or None."""
    cuda = device.startswith("cuda")
    if rung.cuda_only and not cuda:
        return rung.cuda_only
    if rung.cpu_only and cuda:
        return rung.cpu_only
    if rung.needs_bf16 and not native_bf16(device):
        return "bf16 is emulated on this device (no AVX-512 BF16 / AMX), many times slower than fp32"
    return None


def effective_settings(name: str, device: str) -> Settings:
    """The rung's settings on this device: the changes of the rungs skipped here are left out, so a
    CPU never runs the TF32 rung's setting (or an emulated bf16) in the rungs above it."""
    settings, before = Settings(), Settings()
    for rung in ladder():
        if not skip_reason(rung, device):
            changed = {k: v for k, v in asdict(rung.settings).items() if v != getattr(before, k)}
            settings = replace(settings, **changed)
        before = rung.settings
        if rung.name == name:
            return settings
    raise KeyError(name)


def spawn(rung: Rung, args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Run one rung in a fresh process with its environment; its JSON, or the reason it failed."""
    env = {**os.environ, **rung.settings.env}
    if not args.device.startswith("cuda"):
        # Compile in-process: no pool of inductor compile workers stays beside the timed steps on a
        # machine with few cores.
        env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", rung.name]
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        reason = f"failed: the rung's process exited with {done.returncode} (see stderr)"
        return {"tokens_per_s": None, "reason": reason}
    return json.loads(lines[-1])


def device_peak(args: argparse.Namespace) -> tuple[float, str]:
    """One peak for every rung, so their MFUs compare: the bf16 peak where bf16 is native (CUDA's dense
    datasheet number, or the best bf16 matmul measured on this CPU), else the best fp32 matmul measured
    here; the trainer's function either way."""
    if args.peak_tflops:
        return args.peak_tflops * 1e12, "--peak-tflops"
    return device_peak_flops(torch.device(args.device), "bf16" if native_bf16(args.device) else "fp32")


def machine(args: argparse.Namespace) -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    with contextlib.suppress(OSError, StopIteration):
        cpu = Path("/proc/cpuinfo").read_text()
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in cpu.splitlines() if "model name" in line)
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(args.device)
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        info["git_revision"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    return info


def markdown(report: dict[str, Any]) -> str:
    """The ladder as a Markdown table: tokens/s, step time, gain over the rung below and over fp32."""
    head = "| rung | change | tokens/s | step (ms) | vs previous | vs fp32 | MFU | peak memory (GB) | compile (s) |"
    lines = [head, "|" + "---|" * 9]
    first = previous = None
    for r in report["rungs"]:
        if r["tokens_per_s"] is None:
            lines.append(f"| {r['name']} | {r['change']} | n/a: {r['reason']} | | | | | | |")
            continue
        first, tps = first or r["tokens_per_s"], r["tokens_per_s"]
        step_ms = 1e3 * statistics.median(r["step_seconds"])
        gain = f"{tps / previous:.2f}x" if previous else ""
        compiled = f"{r['compile_seconds']:.0f}" if r.get("compile_seconds") is not None else ""
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else ""
        lines.append(
            f"| {r['name']} | {r['change']} | {tps:,.0f} | {step_ms:,.0f} | {gain} | {tps / first:.2f}x | {mfu} "
            f"| {r['peak_memory_bytes'] / 1e9:.2f} | {compiled} |"
        )
        previous = tps
    return "\n".join(lines)


def worker_argv(args: argparse.Namespace) -> list[str]:
    """The shape flags, passed on explicitly, so a worker never re-resolves them differently."""
    shape = ["--device", args.device, "--preset", args.preset, "--seq-len", str(args.seq_len)]
    shape += ["--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    return shape + ["--seed", str(args.seed)]


def flops_per_token(args: argparse.Namespace) -> int:
    """The model's FLOPs per token at vocabulary 50,257, for every rung: the padded rung's extra columns
    are not useful work."""
    return GPT2ScratchConfig.from_preset(args.preset, pad_vocab_multiple=1).flops_per_token(args.seq_len)


def measure_rung(rung: Rung, args: argparse.Namespace, peak: float, flops: int) -> dict[str, Any]:
    """One rung's entry: measured in its own process, or `tokens_per_s: None` and why not."""
    entry = {"name": rung.name, "change": rung.change, "settings": asdict(effective_settings(rung.name, args.device))}
    reason = skip_reason(rung, args.device)
    if reason:
        entry.update(tokens_per_s=None, reason=reason)
    else:
        tick = time.perf_counter()
        entry.update(spawn(rung, args, worker_argv(args)))
        entry["wall_seconds"] = time.perf_counter() - tick
        if entry["tokens_per_s"] is not None:
            entry["mfu"] = entry["tokens_per_s"] * flops / peak
    shown = "n/a" if entry["tokens_per_s"] is None else f"{entry['tokens_per_s']:,.0f} tokens/s"
    print(f"  {rung.name:>15}: {shown}", file=sys.stderr)
    return entry


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    rungs = {rung.name: rung for rung in ladder()}
    if args.worker:
        print(json.dumps(run_rung(rungs[args.worker], args)))
        return None
    wanted = list(rungs) if args.rungs == "all" else args.rungs.split(",")
    unknown = [name for name in wanted if name not in rungs]
    if unknown:
        raise UserError(f"unknown rung(s) {unknown}; choose from {list(rungs)}")
    started = datetime.datetime.now(datetime.timezone.utc)
    print(f"{args.preset} T={args.seq_len} B={args.batch_size} on {args.device}", file=sys.stderr)
    peak, peak_source = device_peak(args)
    flops = flops_per_token(args)
    results = [measure_rung(rungs[name], args, peak, flops) for name in wanted]
    if peak_source.startswith("measured"):  # measured again after the rungs: the larger counts
        peak = max(peak, device_peak(args)[0])
        for entry in results:
            if entry.get("mfu") is not None:
                entry["mfu"] = entry["tokens_per_s"] * flops / peak
    report = {
        "command": " ".join(["python", "benchmarks/bench_ladder.py", *argv]),
        "date": started.isoformat(timespec="seconds"),
        "seconds": (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
        "machine": machine(args),
        "load_average": os.getloadavg(),
        "shape": {"preset": args.preset, "seq_len": args.seq_len, "batch_size": args.batch_size},
        "steps": {"warmup": args.warmup, "timed": args.steps},
        "flops_per_token": flops,
        "device_peak_flops": peak,
        "device_peak_source": peak_source,
        "rungs": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    table = markdown(report)
    md = Path(args.md) if args.md else out.with_suffix(".md")
    md.write_text(table + "\n")
    print(table)
    print(f"MFU against {peak / 1e9:,.0f} GFLOP/s ({peak_source}); {flops / 1e6:.1f} MFLOP per token")
    print(f"wrote {out} and {md}")
    return report


if __name__ == "__main__":
    run_command(main)
