"""Our GPT-2 against transformers' GPT2LMHeadModel (SDPA): training speed, peak memory, MFU, generation.

Both models get the same configuration, batch, sequence length, dtype and optimizer. Training runs in
one worker process per model (so each has its own peak memory), and the workers take turns, one step
each (A B A B ...), so that a slow spell of the machine hits both alike. Generation runs in this
process, the two models interleaved the same way, with the same weights (ours copied into
transformers' class), and checks that both produce the same tokens. Prints a table, writes JSON.

    python benchmarks/bench_train.py                     # cpu-mini, T=256, B=8, fp32: about 3 minutes here
    python benchmarks/bench_train.py --preset gpt2 --seq-len 1024 --batch-size 16   # on a GPU: bf16, compiled
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt2_scratch.conversion import to_gpt2  # noqa: E402
from gpt2_scratch.training.config import TrainConfig  # noqa: E402
from gpt2_scratch.training.metrics import device_peak_flops  # noqa: E402  (the trainer's own)
from gpt2_scratch.training.recipe import build_optimizer  # noqa: E402
from gpt2_scratch.user_errors import UserError, check_at_least, run_command  # noqa: E402
from modeling_gpt2_scratch import PRESETS, GPT2ScratchConfig, GPT2ScratchForCausalLM  # noqa: E402

MODELS = ("ours", "transformers")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-mini", help="model size from PRESETS in modeling_gpt2_scratch.py")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence, T")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step, B")
    p.add_argument("--steps", type=int, default=8, help="timed training steps per model (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps per model before the timed ones")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    p.add_argument("--dtype", default="auto", help="fp32 or bf16 (autocast); auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", default="auto", help="yes, no, or auto (yes on CUDA): torch.compile both models")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU, overriding the default")
    p.add_argument("--gen-batch", type=int, default=1, help="generation: sequences per call")
    p.add_argument("--gen-prompt", type=int, default=32, help="generation: prompt tokens")
    p.add_argument("--gen-tokens", type=int, default=64, help="generation: new tokens per sequence (greedy)")
    p.add_argument("--gen-repeats", type=int, default=3, help="generation: timed calls per model")
    p.add_argument("--loader-batches", type=int, default=200, help="loader: batches to time (0 skips it)")
    p.add_argument("--out", default="runs/bench/bench_train.json", help="where to write the JSON results")
    p.add_argument("--seed", type=int, default=0, help="seed for the weights and the random tokens")
    return p.parse_args(argv)


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in the `auto` settings for the device at hand."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    if args.dtype == "auto":
        args.dtype = "bf16" if cuda else "fp32"
    if args.compile == "auto":
        args.compile = "yes" if cuda else "no"
    if args.dtype not in ("fp32", "bf16") or args.compile not in ("yes", "no"):
        raise UserError(f"--dtype must be fp32 or bf16 and --compile yes or no; got {args.dtype}, {args.compile}")
    check_shape(args.preset, args.seq_len)
    flags = {f"--{name.replace('_', '-')}": value for name, value in vars(args).items()}
    ones = ("--seq-len", "--batch-size", "--steps", "--gen-batch", "--gen-prompt", "--gen-tokens", "--gen-repeats")
    check_at_least(flags, {**dict.fromkeys(ones, 1), "--warmup": 0, "--loader-batches": 0})
    return args


def check_shape(preset: str, seq_len: int) -> None:
    """The preset exists and holds `seq_len` positions (shared with bench_ladder.py)."""
    if preset not in PRESETS:
        raise UserError(f"--preset {preset!r} is not one of {', '.join(PRESETS)}")
    positions = GPT2ScratchConfig.from_preset(preset).n_positions
    if seq_len > positions:
        raise UserError(f"--seq-len {seq_len} is longer than the {positions} positions of preset {preset!r}")


def model_config(args: argparse.Namespace) -> GPT2ScratchConfig:
    return GPT2ScratchConfig.from_preset(args.preset)


def build_model(name: str, config: GPT2ScratchConfig) -> torch.nn.Module:
    """Our model, or `GPT2LMHeadModel` with SDPA attention holding the same initial weights (so the
    two training runs should end at nearly the same loss: a check that they do the same work)."""
    ours = GPT2ScratchForCausalLM(config)
    if name == "ours":
        return ours
    official = to_gpt2(ours)
    official.set_attn_implementation("sdpa")
    assert official.config._attn_implementation == "sdpa"
    return official


def make_optimizer(model: torch.nn.Module, device: str) -> torch.optim.Optimizer:
    """The trainer's optimizer (GPT-3 AdamW, weight-decay groups, fused kernel), so the benchmarked step
    is the step `train_accelerate.py` runs."""
    config = TrainConfig(max_lr=6e-4, weight_decay=0.1)
    return build_optimizer(model, config, torch.device(device))


def loss_of(name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The same loss for both: y holds the next tokens (the trainer's call for ours)."""
    if name == "ours":
        return model(input_ids=x, shift_labels=y, loss_only=True).loss
    return model(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss


def peak_memory_bytes(device: str) -> int:
    """CUDA: the allocator's peak; CPU: this process's peak resident set (VmHWM, else ru_maxrss)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_worker(conn, name: str, args: argparse.Namespace) -> None:
    """One model's training steps, run on request from the parent: 'step' returns its duration in
    seconds; 'done' returns the peak memory and the loss."""
    torch.manual_seed(args.seed)
    device = args.device
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    baseline = peak_memory_bytes(device)
    config = model_config(args)
    model = build_model(name, config).to(device).train()
    optimizer = make_optimizer(model, device)
    step_model = torch.compile(model) if args.compile == "yes" else model
    g = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1), generator=g).to(device)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # as the loader gives them
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    conn.send({"ready": True, "fused_adamw": bool(optimizer.defaults.get("fused"))})
    loss = None
    while (command := conn.recv()) == "step":
        synchronize(device)
        start = time.perf_counter()
        with autocast:
            loss = loss_of(name, step_model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        conn.send(time.perf_counter() - start)
    assert command == "done", command
    conn.send({"peak_memory_bytes": peak_memory_bytes(device), "import_memory_bytes": baseline, "loss": loss.item()})


def receive(conn, process) -> Any:
    """The worker's next message; an error naming the worker if it died instead of answering."""
    while not conn.poll(1.0):
        if not process.is_alive():
            raise RuntimeError(
                f"benchmark worker {process.name} exited with code {process.exitcode}; see its traceback"
            )
    return conn.recv()


def run_training(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Start one worker per model, then alternate their steps: warm-up first, then the timed ones."""
    ctx = mp.get_context("spawn")
    conns, procs, results = {}, {}, {name: {} for name in MODELS}
    for name in MODELS:
        parent, child = ctx.Pipe()
        procs[name] = ctx.Process(target=train_worker, args=(child, name, args), daemon=True)
        procs[name].start()
        conns[name] = parent
    for name in MODELS:
        results[name].update(receive(conns[name], procs[name]))
    times = {name: [] for name in MODELS}
    for i in range(args.warmup + args.steps):
        for name in MODELS:
            conns[name].send("step")
            seconds = receive(conns[name], procs[name])
            if i >= args.warmup:
                times[name].append(seconds)
            print(f"  step {i + 1}/{args.warmup + args.steps} {name:>12}: {seconds:6.2f} s", file=sys.stderr)
    tokens = args.batch_size * args.seq_len
    for name in MODELS:
        conns[name].send("done")
        results[name].update(receive(conns[name], procs[name]))
        procs[name].join()
        results[name]["step_seconds"] = times[name]
        results[name]["tokens_per_s"] = tokens / statistics.median(times[name])
        results[name]["best_tokens_per_s"] = tokens / min(times[name])  # the least disturbed step
    return results


def device_peak(args: argparse.Namespace) -> tuple[float, str]:
    """The FLOP/s that MFU divides by, and where the number comes from (the trainer's function)."""
    if args.peak_tflops:
        return args.peak_tflops * 1e12, "--peak-tflops"
    return device_peak_flops(torch.device(args.device), args.dtype)


def run_generation(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Greedy `generate()` with the KV cache, same weights in both classes, calls interleaved."""
    models = {}
    for name in MODELS:
        torch.manual_seed(args.seed)
        models[name] = build_model(name, model_config(args)).to(args.device).eval()
    ours = models["ours"]
    g = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(0, ours.config.vocab_size, (args.gen_batch, args.gen_prompt), generator=g).to(args.device)
    kwargs = dict(
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=args.gen_tokens,
        min_new_tokens=args.gen_tokens,
        do_sample=False,
        pad_token_id=ours.config.eos_token_id,
    )
    autocast = torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    times, outputs = {name: [] for name in MODELS}, {}
    with torch.inference_mode(), autocast:
        for i in range(args.gen_repeats + 1):  # the first call of each is warm-up
            for name, model in models.items():
                synchronize(args.device)
                start = time.perf_counter()
                outputs[name] = model.generate(prompt, **kwargs)
                synchronize(args.device)
                if i:
                    times[name].append(time.perf_counter() - start)
    same = torch.equal(outputs["ours"], outputs["transformers"])
    new_tokens = args.gen_batch * args.gen_tokens
    return {
        name: {"seconds": times[name], "tokens_per_s": new_tokens / statistics.median(times[name]), "same_tokens": same}
        for name in MODELS
    }


def run_loader(args: argparse.Namespace) -> dict[str, Any]:
    """Batches/s of the trainer's shard loader over the built-in corpus, if `data_prep` provides it."""
    import data_prep

    if not all(hasattr(data_prep, f) for f in ("ShardLoader", "prepare_builtin")):
        return {"skipped": "data_prep.ShardLoader / data_prep.prepare_builtin not available in this checkout"}
    with tempfile.TemporaryDirectory() as folder:
        data_dir = data_prep.prepare_builtin(folder)
        loader = data_prep.ShardLoader(data_dir, split="train", batch_size=args.batch_size, seq_len=args.seq_len)
        batches = iter(loader)
        next(batches)  # opens the first shard
        start = time.perf_counter()
        for _ in range(args.loader_batches):
            next(batches)
        seconds = time.perf_counter() - start
    return {"batches": args.loader_batches, "batches_per_s": args.loader_batches / seconds}


def machine(args: argparse.Namespace) -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
        cpu = Path("/proc/cpuinfo").read_text()
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in cpu.splitlines() if "model name" in line)
    except (OSError, StopIteration):
        pass
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(args.device)
    try:
        info["git_revision"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def table(report: dict[str, Any]) -> str:
    train, gen = report["training"], report["generation"]
    rows = [
        ("training tokens/s", "tokens_per_s", train, "{:,.0f}"),
        ("  best step", "best_tokens_per_s", train, "{:,.0f}"),
        ("MFU", "mfu", train, "{:.1%}"),
        ("  best step", "best_mfu", train, "{:.1%}"),
        ("peak memory (GB)", "peak_memory_gb", train, "{:.2f}"),
        ("generation tokens/s", "tokens_per_s", gen, "{:,.1f}"),
    ]
    lines = [
        f"| {'':<22}| {'ours':>12} | {'transformers':>12} | {'ours / theirs':>13} |",
        f"|{'-' * 23}|" + "-" * 14 + "|" + "-" * 14 + "|" + "-" * 15 + "|",
    ]
    for label, key, section, fmt in rows:
        a, b = section["ours"].get(key), section["transformers"].get(key)
        if a is None or b is None:
            continue
        lines.append(f"| {label:<22}| {fmt.format(a):>12} | {fmt.format(b):>12} | {a / b:>12.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = resolve(parse_args(argv))
    config = model_config(args)
    flops_per_token = config.flops_per_token(args.seq_len)
    started = datetime.datetime.now(datetime.timezone.utc)
    print(f"{args.preset} T={args.seq_len} B={args.batch_size} {args.dtype} on {args.device}", file=sys.stderr)

    peak_before, peak_source = device_peak(args)
    training = run_training(args)
    peak_after, _ = device_peak(args) if peak_source.startswith("measured") else (peak_before, None)
    peak = max(peak_before, peak_after) if peak_before is not None else None
    for result in training.values():
        result["peak_memory_gb"] = result["peak_memory_bytes"] / 1e9
        result["mfu"] = result["tokens_per_s"] * flops_per_token / peak if peak else None
        result["best_mfu"] = result["best_tokens_per_s"] * flops_per_token / peak if peak else None
    generation = run_generation(args)
    loader = run_loader(args) if args.loader_batches else {"skipped": "--loader-batches 0"}

    ours, theirs = training["ours"], training["transformers"]
    report = {
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "date": started.isoformat(timespec="seconds"),
        "seconds": (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
        "machine": machine(args),
        "load_average": os.getloadavg(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "flops_per_token": flops_per_token,
        "device_peak_flops": peak,
        "device_peak_source": peak_source,
        "training": training,
        "generation": generation,
        "loader": loader,
        "ratios": {
            "training_tokens_per_s": ours["tokens_per_s"] / theirs["tokens_per_s"],
            "training_best_tokens_per_s": ours["best_tokens_per_s"] / theirs["best_tokens_per_s"],
            "peak_memory": ours["peak_memory_bytes"] / theirs["peak_memory_bytes"],
            "generation_tokens_per_s": generation["ours"]["tokens_per_s"] / generation["transformers"]["tokens_per_s"],
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(table(report))
    if peak:
        print(f"MFU against {peak / 1e9:,.0f} GFLOP/s ({peak_source}); {flops_per_token / 1e6:.1f} MFLOP per token")
    print(f"loader: {loader}")
    print(f"generation gave the same tokens in both: {generation['ours']['same_tokens']}")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    run_command(main)
