"""AdamW (the GPT-3 recipe) against `--optimizer muon`: the same model, data, seed and token budget.

1. Curves: each run trains the same initial weights on the same batches for `--steps` optimizer steps
   with the trainer's own step (`gpt2_scratch.training.step.train_step`), schedule and optimizer, and measures the
   validation loss every `--eval-interval` steps on the same validation batches. First AdamW at each
   LR of `--adamw-lrs`; the best (lowest final validation loss) sets the target and the AdamW LR that
   the Muon runs keep for the embeddings, head, LayerNorms and biases; then Muon at each `--muon-lrs`.
   For every run: the steps it needs to reach the target (linear between evaluations). These do not
   depend on the machine's load.
2. Step time and memory: the best AdamW run and the best Muon run again, each in its own worker
   process (so each has its own peak memory), taking turns one step each (A B A B ...) so that a busy
   spell of a shared machine hits both alike. Their ratio is the figure to quote, with the load average.

Writes JSON and a PNG of the validation curves; prints a table.

    python benchmarks/bench_optimizers.py --data-dir data/builtin --out runs/bench/optimizers_builtin.json
    python benchmarks/bench_optimizers.py --data-dir data/builtin --steps 100 --warmup-steps 10   # docs/training.md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_train import machine, peak_memory_bytes, receive  # noqa: E402
from gpt2_scratch.training.config import TrainConfig  # noqa: E402
from gpt2_scratch.training.recipe import build_optimizer, lr_at, set_lr  # noqa: E402
from gpt2_scratch.training.step import train_step  # noqa: E402
from gpt2_scratch.user_errors import UserError, check_at_least, run_command  # noqa: E402
from modeling_gpt2_scratch import GPT2ScratchForCausalLM  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="token shards written by `python -m data_prep`")
    p.add_argument("--model", default="cpu-micro", help="model size preset (cpu-micro: 4 layers x 128)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence, T")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step (16 x 128 = 2,048 tokens)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per run (the token budget)")
    p.add_argument("--warmup-steps", type=int, default=20, help="steps of linear LR warmup")
    p.add_argument("--adamw-lrs", default="1.5e-3,3e-3,6e-3,1.2e-2", help="AdamW peak LRs to sweep, comma-separated")
    p.add_argument("--muon-lrs", default="0.02,0.05", help="Muon peak LRs to sweep, comma-separated")
    p.add_argument("--muon-momentum", type=float, default=TrainConfig.muon_momentum, help="Muon's momentum")
    p.add_argument("--muon-weight-decay", type=float, default=TrainConfig.muon_weight_decay, help="Muon's decay")
    p.add_argument("--muon-adjust-lr-fn", default=TrainConfig.muon_adjust_lr_fn, help="original or match_rms_adamw")
    p.add_argument("--eval-interval", type=int, default=10, help="steps between validation losses")
    p.add_argument("--val-batches", type=int, default=4, help="validation batches (of --batch-size) per evaluation")
    p.add_argument("--time-steps", type=int, default=15, help="timed steps per optimizer in part 2 (0: skip it)")
    p.add_argument("--seed", type=int, default=1337, help="initial weights and data order")
    p.add_argument("--out", default="runs/bench/bench_optimizers.json", help="JSON results; the PNG goes beside it")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="take the curve of a run already in --out with exactly this run's config (curves are deterministic)",
    )
    args = p.parse_args(argv)
    minimums = {"--seq-len": 1, "--batch-size": 1, "--steps": 1, "--warmup-steps": 0, "--eval-interval": 1}
    check_at_least({flag: getattr(args, flag[2:].replace("-", "_")) for flag in minimums}, minimums)
    try:
        args.adamw_lr_values = [float(lr) for lr in args.adamw_lrs.split(",")]
        args.muon_lr_values = [float(lr) for lr in args.muon_lrs.split(",")]
    except ValueError as err:
        raise UserError(f"--adamw-lrs and --muon-lrs take comma-separated numbers ({err})") from None
    return args


def run_config(args: argparse.Namespace, optimizer: str, max_lr: float, muon_lr: float | None = None) -> TrainConfig:
    """The trainer's config of one run: only the optimizer and its LRs differ between runs."""
    muon = {} if muon_lr is None else {"muon_lr": muon_lr}
    return TrainConfig(
        data_dir=args.data_dir,
        model=args.model,
        seq_len=args.seq_len,
        micro_batch_size=args.batch_size,
        total_batch_size=args.batch_size * args.seq_len,
        max_steps=args.steps,
        warmup_steps=args.warmup_steps,
        max_lr=max_lr,
        optimizer=optimizer,
        muon_momentum=args.muon_momentum,
        muon_weight_decay=args.muon_weight_decay,
        muon_adjust_lr_fn=args.muon_adjust_lr_fn,
        seed=args.seed,
        hellaswag_path="none",
        report_to="none",
        **muon,
    )


def relevant(config: dict[str, Any]) -> dict[str, Any]:
    """The fields a run's curve depends on: an AdamW run ignores Muon's."""
    adamw = config.get("optimizer") == "adamw"
    return {k: v for k, v in config.items() if not (adamw and k.startswith("muon_"))}


def build(config: TrainConfig):
    """The same initial weights and batch order for every run (seeded), with the trainer's optimizer."""
    from data_prep import ShardLoader

    torch.manual_seed(config.seed)
    model = GPT2ScratchForCausalLM(config.model_config()).train()
    optimizer = build_optimizer(model, config, torch.device("cpu"))
    loader = ShardLoader(
        config.data_dir,
        batch_size=config.micro_batch_size,
        seq_len=config.seq_len,
        seed=config.seed,
        vocab_size=config.model_config().vocab_size,
    )
    return model, optimizer, loader


def step(model, optimizer, loader, accelerator, config: TrainConfig, i: int) -> float:
    set_lr(optimizer, lr_at(i, config))
    loss = train_step(model, optimizer, loader, accelerator, config.grad_clip).loss
    return loss


def curve(args: argparse.Namespace, config: TrainConfig, accelerator) -> dict[str, Any]:
    """Train one run; the validation loss at step 0, every eval_interval steps and at the end."""
    from eval.val_loss import evaluate_val_loss

    model, optimizer, loader = build(config)

    def val_loss() -> float:
        loss = evaluate_val_loss(
            model,
            config.data_dir,
            batch_size=config.micro_batch_size,
            seq_len=config.seq_len,
            max_batches=args.val_batches,
        )
        model.train()
        return loss

    steps, losses, start = [0], [val_loss()], time.perf_counter()
    for i in range(config.max_steps):
        train_loss = step(model, optimizer, loader, accelerator, config, i)
        if (i + 1) % args.eval_interval == 0 or i + 1 == config.max_steps:
            steps.append(i + 1)
            losses.append(val_loss())
            print(f"    step {i + 1:4d}  train {train_loss:.4f}  val {losses[-1]:.4f}", file=sys.stderr)
    return {"steps": steps, "val_loss": losses, "final_val_loss": losses[-1], "wall_s": time.perf_counter() - start}


def steps_to(target: float, steps: list[int], losses: list[float]) -> float | None:
    """The first step at which the validation loss reaches `target`, linear between evaluations; None if never."""
    for k in range(1, len(steps)):
        if losses[k] <= target:
            before, after = losses[k - 1], losses[k]
            fraction = (before - target) / (before - after) if before > after else 1.0
            return steps[k - 1] + fraction * (steps[k] - steps[k - 1])
    return None


def timing_worker(conn, config: TrainConfig) -> None:
    """One optimizer's steps on request: 'step' returns its seconds, 'done' the memory figures."""
    from accelerate import Accelerator

    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    model, optimizer, loader = build(config)
    conn.send("ready")
    i = 0
    while conn.recv() == "step":
        start = time.perf_counter()
        step(model, optimizer, loader, accelerator, config, i)
        conn.send(time.perf_counter() - start)
        i += 1
    state = sum(
        t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)
    )
    conn.send({"peak_memory_bytes": peak_memory_bytes("cpu"), "optimizer_state_bytes": state})


def time_steps(configs: dict[str, TrainConfig], steps: int, warmup: int = 2) -> dict[str, dict[str, Any]]:
    ctx = mp.get_context("spawn")
    conns, procs = {}, {}
    for name, config in configs.items():
        conns[name], child = ctx.Pipe()
        procs[name] = ctx.Process(target=timing_worker, args=(child, config), daemon=True, name=name)
        procs[name].start()
    for name in configs:
        receive(conns[name], procs[name])
    times = {name: [] for name in configs}
    for i in range(warmup + steps):
        for name in configs:
            conns[name].send("step")
            seconds = receive(conns[name], procs[name])
            if i >= warmup:
                times[name].append(seconds)
    results = {}
    for name in configs:
        conns[name].send("done")
        results[name] = {**receive(conns[name], procs[name]), "step_seconds": times[name]}
        results[name]["median_step_s"] = statistics.median(times[name])
        procs[name].join()
    return results


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, run in report["runs"].items():
        ax.plot(run["steps"], run["val_loss"], label=name, linestyle="-" if name.startswith("muon") else "--")
    ax.axhline(report["target_val_loss"], color="grey", linewidth=0.8, label="best AdamW final")
    finals = [run["final_val_loss"] for run in report["runs"].values()]
    ax.set_ylim(min(finals) - 0.2, min(finals) + 2.5)
    ax.set_xlabel("optimizer step (2,048 tokens each)" if report["tokens_per_step"] == 2048 else "optimizer step")
    ax.set_ylabel("validation loss")
    ax.set_title(f"{report['settings']['model']} on {Path(report['settings']['data_dir']).name}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(report: dict[str, Any]) -> str:
    lines = ["| run | final val loss | steps to target | x AdamW's steps |", "|---|---|---|---|"]
    best_steps = report["runs"][report["best_adamw"]]["steps_to_target"]
    for name, run in report["runs"].items():
        reached = run["steps_to_target"]
        ratio = f"{reached / best_steps:.2f}" if reached is not None else "-"
        shown = f"{reached:.0f}" if reached is not None else f"not in {report['settings']['steps']}"
        lines.append(f"| {name} | {run['final_val_loss']:.4f} | {shown} | {ratio} |")
    return "\n".join(lines)


def summarize(args: argparse.Namespace, runs: dict[str, dict], timing: dict, started, loads: list) -> dict[str, Any]:
    """The report of the runs so far (written after each, so a run cut short leaves what it measured)."""
    adamws = [n for n in runs if n.startswith("adamw")]
    best_adamw = min(adamws, key=lambda n: runs[n]["final_val_loss"])
    target = runs[best_adamw]["final_val_loss"]
    for run in runs.values():
        run["steps_to_target"] = steps_to(target, run["steps"], run["val_loss"])
    muons = [n for n in runs if n.startswith("muon")]
    best_muon = min(muons, key=lambda n: runs[n]["final_val_loss"]) if muons else None
    muon_steps = runs[best_muon]["steps_to_target"] if best_muon else None
    timed = timing and best_muon in timing
    return {
        "command": " ".join(["python", *sys.argv]),
        "date": started.isoformat(timespec="seconds"),
        "seconds": (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
        "machine": {**machine(argparse.Namespace(device="cpu")), "load_average_during_timing": loads},
        "settings": vars(args),
        "tokens_per_step": args.batch_size * args.seq_len,
        "target_val_loss": target,
        "best_adamw": best_adamw,
        "best_muon": best_muon,
        "runs": {n: {**run, "config": dataclasses.asdict(run["config"])} for n, run in runs.items()},
        "timing": timing,
        "summary": {
            "muon_steps_ratio": muon_steps / runs[best_adamw]["steps_to_target"] if muon_steps else None,
            "muon_step_time_ratio": (
                timing[best_muon]["median_step_s"] / timing[best_adamw]["median_step_s"] if timed else None
            ),
            "muon_peak_memory_ratio": (
                timing[best_muon]["peak_memory_bytes"] / timing[best_adamw]["peak_memory_bytes"] if timed else None
            ),
        },
    }


def write(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out)
    plot(report, out.with_suffix(".png"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from accelerate import Accelerator

    args = parse_args(argv)
    torch.set_num_threads(1)  # steadier on a shared machine; the step-count results do not depend on it
    started, out = datetime.datetime.now(datetime.timezone.utc), Path(args.out)
    accelerator = Accelerator(cpu=True)
    runs: dict[str, dict[str, Any]] = {}

    done = json.loads(out.read_text())["runs"] if args.reuse and out.is_file() else {}

    def train_run(name: str, config: TrainConfig) -> None:
        if relevant(done.get(name, {}).get("config", {})) == relevant(dataclasses.asdict(config)):
            print(f"{name}: reused from {out}", file=sys.stderr)
            runs[name] = {**done[name], "config": config}
            return
        print(name, file=sys.stderr)
        runs[name] = {"config": config, **curve(args, config, accelerator), "load_average_after": os.getloadavg()}
        write(summarize(args, runs, {}, started, []), out)

    for lr in args.adamw_lr_values:
        train_run(f"adamw lr {lr:g}", run_config(args, "adamw", lr))
    report = summarize(args, runs, {}, started, [])
    adamw_lr = runs[report["best_adamw"]]["config"].max_lr  # the Muon runs keep it for the non-matrix params
    for lr in args.muon_lr_values:
        train_run(f"muon lr {lr:g}", run_config(args, "muon", adamw_lr, lr))
    report = summarize(args, runs, {}, started, [])
    best_adamw, best_muon = report["best_adamw"], report["best_muon"]
    if args.time_steps and best_muon:
        print(f"timing {best_adamw} against {best_muon}, alternating steps", file=sys.stderr)
        load_before = os.getloadavg()
        timing = time_steps({n: runs[n]["config"] for n in (best_adamw, best_muon)}, args.time_steps)
        report = summarize(args, runs, timing, started, [load_before, os.getloadavg()])
        write(report, out)
    print(table(report))
    print(json.dumps(report["summary"]))
    for name, result in report["timing"].items():
        print(
            f"{name}: median step {result['median_step_s']:.3f} s, "
            f"peak RSS {result['peak_memory_bytes'] / 2**20:.0f} MiB, "
            f"optimizer state {result['optimizer_state_bytes'] / 2**20:.1f} MiB"
        )
    if report["timing"]:
        print(f"load average before/after timing: {report['machine']['load_average_during_timing']}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return report


if __name__ == "__main__":
    run_command(main)
