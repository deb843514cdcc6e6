"""AdamW (the GPT-3 recipe) against `--optimizer muon`, each with the cosine and the wsd LR schedule: the same
model, data, seed and token budget.

1. Curves: each run trains the same initial weights on the same batches for `--steps` optimizer steps
   with the trainer's own step (`gpt2_scratch.training.step.train_step`), schedule and optimizer, and measures the
   validation loss every `--eval-interval` steps on the same validation batches. Four families, each with
   its peak LR swept: AdamW-cosine (`--adamw-lrs`), whose best (lowest final validation loss) sets the target
   and the AdamW LR that every Muon run keeps for the embeddings, head, LayerNorms and biases; AdamW-wsd
   (`--adamw-wsd-lrs`); Muon-cosine and Muon-wsd (`--muon-lrs`, `--muon-wsd-lrs`: muon_lr). A family whose
   best LR is at an edge of its sweep gets the next LR beyond it (x2 or /2), up to `--bracket` more, so that
   every best value lies inside its sweep. For every run: the steps it needs to reach the target (linear
   between evaluations). These do not depend on the machine's load.
2. Step time and memory: the best AdamW-cosine run and the best Muon-wsd run again, each in its own worker
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
from gpt2_scratch.training.recipe import build_optimizer, set_schedule  # noqa: E402
from gpt2_scratch.training.step import train_step  # noqa: E402
from gpt2_scratch.user_errors import UserError, check_at_least, run_command  # noqa: E402
from modeling_gpt2_scratch import GPT2ScratchForCausalLM  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="token shards written by `python -m data_prep` (or give --corpus)")
    p.add_argument(
        "--corpus",
        choices=sorted(CORPORA),
        help="tokenize a corpus into data/NAME first (once): the built-in one, or ../shared/data/tinyshakespeare.txt "
        "beside the repository (skipped with a message when absent)",
    )
    p.add_argument("--model", default="cpu-micro", help="model size preset (cpu-micro: 4 layers x 128)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence, T")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step (16 x 128 = 2,048 tokens)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per run (the token budget)")
    p.add_argument("--warmup-steps", type=int, default=20, help="steps of linear LR warmup")
    p.add_argument("--adamw-lrs", default="3e-3,6e-3,1.2e-2", help="AdamW-cosine peak LRs, comma-separated")
    p.add_argument("--adamw-wsd-lrs", default=None, help="AdamW-wsd peak LRs (default: --adamw-lrs)")
    p.add_argument("--muon-lrs", default="0.01,0.02,0.04", help="Muon-cosine peak muon_lr values, comma-separated")
    p.add_argument("--muon-wsd-lrs", default=None, help="Muon-wsd peak muon_lr values (default: --muon-lrs)")
    p.add_argument(
        "--families",
        default="adamw-cosine,adamw-wsd,muon-cosine,muon-wsd",
        help="which optimizer-schedule pairs to run (a subset: to spread the work over processes, then --reuse)",
    )
    p.add_argument(
        "--muon-adamw-lr",
        type=float,
        default=None,
        help="the AdamW LR of the Muon runs' other parameters (default: the best AdamW-cosine run's)",
    )
    p.add_argument("--bracket", type=int, default=2, help="more LRs per family while its best is at an edge")
    p.add_argument("--min-lr-ratio", type=float, default=TrainConfig.min_lr_ratio, help="final LR / peak LR")
    p.add_argument("--decay-fraction", type=float, default=TrainConfig.decay_fraction, help="wsd: decaying share")
    p.add_argument("--decay-shape", default=TrainConfig.decay_shape, help="wsd: linear or 1-sqrt")
    p.add_argument("--muon-momentum", type=float, default=TrainConfig.muon_momentum, help="Muon's momentum")
    p.add_argument(
        "--muon-momentum-start", type=float, default=TrainConfig.muon_momentum_start, help="Muon's momentum at step 0"
    )
    p.add_argument(
        "--muon-momentum-warmup", type=int, default=TrainConfig.muon_momentum_warmup, help="its warmup steps"
    )
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
    p.add_argument(
        "--reuse-from",
        nargs="+",
        default=[],
        metavar="JSON",
        help="also take runs from these reports (the --out of processes split with --families); implies --reuse",
    )
    args = p.parse_args(argv)
    args.reuse = args.reuse or bool(args.reuse_from)
    minimums = {"--seq-len": 1, "--batch-size": 1, "--steps": 1, "--warmup-steps": 0, "--eval-interval": 1}
    minimums |= {"--bracket": 0}
    if (args.data_dir is None) == (args.corpus is None):
        raise UserError("give one of --data-dir and --corpus")
    check_at_least({flag: getattr(args, flag[2:].replace("-", "_")) for flag in minimums}, minimums)
    args.family_list = [name.strip() for name in args.families.split(",") if name.strip()]
    known = [family(*pair) for pair in FAMILIES]
    if not args.family_list or not set(args.family_list) <= set(known):
        raise UserError(f"--families takes some of {', '.join(known)}, comma-separated; got {args.families!r}")
    if args.muon_adamw_lr is None and TARGET not in args.family_list and "muon" in args.families:
        raise UserError(f"Muon runs without {TARGET} need --muon-adamw-lr (the LR of their AdamW part)")
    try:
        args.lr_values = {
            ("adamw", "cosine"): lrs(args.adamw_lrs),
            ("adamw", "wsd"): lrs(args.adamw_wsd_lrs or args.adamw_lrs),
            ("muon", "cosine"): lrs(args.muon_lrs),
            ("muon", "wsd"): lrs(args.muon_wsd_lrs or args.muon_lrs),
        }
    except ValueError as err:
        raise UserError(f"--adamw-lrs, --muon-lrs and their -wsd- ones take comma-separated numbers ({err})") from None
    return args


# The corpora of --corpus: where the text is (None: the built-in one) and how data_prep cuts it.
CORPORA = {
    "builtin": None,
    "tinyshakespeare": (ROOT.parent / "shared" / "data" / "tinyshakespeare.txt", "paragraph", 32_768),
}


def corpus_dir(name: str) -> Path | None:
    """The token shards of corpus `name` in data/NAME, tokenized on first use; None when its text is absent."""
    from data_prep import prepare_builtin
    from data_prep.prepare import prepare

    out = ROOT / "data" / name
    if CORPORA[name] is None:
        return prepare_builtin(out)
    text, sample_by, val_tokens = CORPORA[name]
    if not text.is_file():
        return None
    return prepare(out, files=[str(text)], txt_sample_by=sample_by, val_tokens=val_tokens)


def lrs(text: str) -> list[float]:
    return [float(lr) for lr in text.split(",")]


def run_config(
    args: argparse.Namespace, optimizer: str, schedule: str, max_lr: float, muon_lr: float | None = None
) -> TrainConfig:
    """The trainer's config of one run: only the optimizer, the schedule and the LRs differ between runs."""
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
        min_lr_ratio=args.min_lr_ratio,
        lr_schedule=schedule,
        decay_fraction=args.decay_fraction,
        decay_shape=args.decay_shape,
        optimizer=optimizer,
        muon_momentum=args.muon_momentum,
        muon_momentum_start=args.muon_momentum_start,
        muon_momentum_warmup=args.muon_momentum_warmup,
        muon_weight_decay=args.muon_weight_decay,
        muon_adjust_lr_fn=args.muon_adjust_lr_fn,
        seed=args.seed,
        hellaswag_path="none",
        report_to="none",
        **muon,
    )


def relevant(config: dict[str, Any]) -> dict[str, Any]:
    """The fields a run's curve depends on: an AdamW run ignores Muon's, a cosine run the wsd decay's. A run
    recorded before a field existed had its old behaviour (cosine; Muon's momentum without warmup)."""
    config = {"lr_schedule": "cosine", "muon_momentum_warmup": 0, **config}
    adamw, cosine = config.get("optimizer") == "adamw", config.get("lr_schedule") == "cosine"
    ignored = {"decay_fraction", "decay_shape"} if cosine else set()
    ignored |= {"muon_momentum_start"} if not config.get("muon_momentum_warmup") else set()
    return {k: v for k, v in config.items() if not (adamw and k.startswith("muon_")) and k not in ignored}


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
    set_schedule(optimizer, i, config)
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


FAMILIES = (("adamw", "cosine"), ("adamw", "wsd"), ("muon", "cosine"), ("muon", "wsd"))
TARGET = "adamw-cosine"  # its best run's final validation loss is every run's target


def family(optimizer: str, schedule: str) -> str:
    return f"{optimizer}-{schedule}"


def run_name(optimizer: str, schedule: str, lr: float) -> str:
    return f"{family(optimizer, schedule)} lr {lr:g}"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colours = {"adamw-cosine": "tab:blue", "adamw-wsd": "tab:cyan", "muon-cosine": "tab:red", "muon-wsd": "tab:orange"}
    for name, run in report["runs"].items():
        kind = name.split(" ")[0]
        best = name in report["best"].values()
        ax.plot(
            run["steps"],
            run["val_loss"],
            label=name if best else None,
            color=colours.get(kind, "grey"),
            linestyle="-" if kind.endswith("wsd") else "--",
            linewidth=1.8 if best else 0.6,
            alpha=1.0 if best else 0.5,
        )
    if report["target_val_loss"] is not None:
        ax.axhline(report["target_val_loss"], color="grey", linewidth=0.8, label="best AdamW-cosine final")
    finals = [run["final_val_loss"] for run in report["runs"].values()]
    ax.set_ylim(min(finals) - 0.2, min(finals) + 2.5)
    ax.set_xlabel(f"optimizer step ({report['tokens_per_step']:,} tokens each)")
    ax.set_ylabel("validation loss")
    settings = report["settings"]
    ax.set_title(f"{settings['model']}, T={settings['seq_len']}, on {Path(settings['data_dir']).name} (thick: best LR)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(report: dict[str, Any]) -> str:
    lines = ["| run | final val loss | steps to target | x AdamW-cosine's steps |", "|---|---|---|---|"]
    best_steps = report["runs"][report["best"][TARGET]]["steps_to_target"] if TARGET in report["best"] else None
    for name, run in report["runs"].items():
        reached = run["steps_to_target"]
        ratio = f"{reached / best_steps:.2f}" if reached is not None and best_steps else "-"
        shown = f"{reached:.0f}" if reached is not None else f"not in {report['settings']['steps']}"
        best = " (best)" if name in report["best"].values() else ""
        lines.append(f"| {name}{best} | {run['final_val_loss']:.4f} | {shown} | {ratio} |")
    return "\n".join(lines)


def best_runs(runs: dict[str, dict]) -> dict[str, str]:
    """Each family's run with the lowest final validation loss."""
    best = {}
    for name, run in runs.items():
        kind = name.split(" ")[0]
        if kind not in best or run["final_val_loss"] < runs[best[kind]]["final_val_loss"]:
            best[kind] = name
    return best


def peak_lr(run: dict[str, Any]) -> float:
    config = run["config"]
    config = config if isinstance(config, dict) else dataclasses.asdict(config)
    return config["muon_lr"] if config["optimizer"] == "muon" else config["max_lr"]


def edge(runs: dict[str, dict], kind: str) -> float | None:
    """The LR beyond the edge that family `kind`'s best run sits at (x2 above the highest, /2 below the lowest
    LR swept), or None when the best lies inside its sweep."""
    members = {peak_lr(run): run["final_val_loss"] for name, run in runs.items() if name.split(" ")[0] == kind}
    if not members:
        return None
    best = min(members, key=members.get)
    if best == max(members):
        return best * 2
    if best == min(members):
        return best / 2
    return None


def summarize(args: argparse.Namespace, runs: dict[str, dict], timing: dict, started, loads: list) -> dict[str, Any]:
    """The report of the runs so far (written after each, so a run cut short leaves what it measured)."""
    best = best_runs(runs)
    target = runs[best[TARGET]]["final_val_loss"] if TARGET in best else None  # None: not run in this process
    for run in runs.values():
        run["steps_to_target"] = steps_to(target, run["steps"], run["val_loss"]) if target is not None else None
    base_steps = runs[best[TARGET]]["steps_to_target"] if target is not None else None
    families = {}
    for kind, name in best.items():
        swept = sorted(peak_lr(run) for n, run in runs.items() if n.split(" ")[0] == kind)
        reached = runs[name]["steps_to_target"]
        families[kind] = {
            "best": name,
            "best_lr": peak_lr(runs[name]),
            "lrs_swept": swept,
            "best_inside_sweep": edge(runs, kind) is None,
            "final_val_loss": runs[name]["final_val_loss"],
            "final_minus_target": runs[name]["final_val_loss"] - target if target is not None else None,
            "steps_to_target": reached,
            "steps_ratio": reached / base_steps if reached is not None and base_steps else None,
        }
        if name in timing:
            families[kind] |= {k: timing[name][k] for k in ("median_step_s", "peak_memory_bytes")}
    timed = [n for n in timing if n != best[TARGET]]
    ratios = {
        f"{n.split(' ')[0].replace('-', '_')}_{what}_ratio": timing[n][key] / timing[best[TARGET]][key]
        for n in timed
        for what, key in (("step_time", "median_step_s"), ("peak_memory", "peak_memory_bytes"))
    }
    return {
        "command": " ".join(["python", *sys.argv]),
        "date": started.isoformat(timespec="seconds"),
        "seconds": (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
        "machine": {**machine(argparse.Namespace(device="cpu")), "load_average_during_timing": loads},
        "settings": {k: v for k, v in vars(args).items() if k != "lr_values"},
        "tokens_per_step": args.batch_size * args.seq_len,
        "target_val_loss": target,
        "best": best,
        "families": families,
        "runs": {n: {**run, "config": as_dict(run["config"])} for n, run in runs.items()},
        "timing": timing,
        "summary": {
            "adamw_wsd_minus_cosine": families.get("adamw-wsd", {}).get("final_minus_target"),
            "muon_wsd_steps_ratio": families.get("muon-wsd", {}).get("steps_ratio"),
            "muon_cosine_steps_ratio": families.get("muon-cosine", {}).get("steps_ratio"),
            "every_best_inside_its_sweep": all(f["best_inside_sweep"] for f in families.values()),
            **ratios,
        },
    }


def as_dict(config) -> dict[str, Any]:
    return config if isinstance(config, dict) else dataclasses.asdict(config)


def reusable_runs(files: list[str | Path]) -> dict[str, tuple[Path, dict[str, Any]]]:
    """The runs recorded in earlier reports, by name, each with its file; a later file's run replaces an
    earlier one's."""
    runs: dict[str, tuple[Path, dict[str, Any]]] = {}
    for file in map(Path, files):
        try:
            runs |= {name: (file, run) for name, run in json.loads(file.read_text())["runs"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"{file}: not a report of this benchmark to reuse ({type(exc).__name__}: {exc})") from exc
    return runs


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
    done = reusable_runs([*args.reuse_from, *([out] if out.is_file() else [])]) if args.reuse else {}
    if args.corpus is not None:
        args.data_dir = corpus_dir(args.corpus)
        if args.data_dir is None:
            print(f"skipped: corpus {args.corpus}: {CORPORA[args.corpus][0]} is not there", file=sys.stderr)
            return {}
        args.data_dir = str(args.data_dir)
    if not Path(args.data_dir).is_dir():
        raise UserError(f"--data-dir {args.data_dir} is not a folder; write it with `python -m data_prep`")
    accelerator = Accelerator(cpu=True)
    runs: dict[str, dict[str, Any]] = {}

    def train_run(name: str, config: TrainConfig) -> None:
        source, earlier = done.get(name, (None, {}))
        if relevant(earlier.get("config", {})) == relevant(dataclasses.asdict(config)):
            print(f"{name}: reused from {source}", file=sys.stderr)
            runs[name] = {**earlier, "config": config}
            return
        print(name, file=sys.stderr)
        runs[name] = {"config": config, **curve(args, config, accelerator), "load_average_after": os.getloadavg()}
        write(summarize(args, runs, {}, started, []), out)

    def sweep(optimizer: str, schedule: str, adamw_lr: float | None = None) -> None:
        """A family's LRs, then one more beyond the edge while its best is there (at most --bracket more)."""
        lrs = list(args.lr_values[(optimizer, schedule)])
        for extra in range(args.bracket + 1):
            for lr in lrs:
                if optimizer == "adamw":
                    train_run(run_name(optimizer, schedule, lr), run_config(args, optimizer, schedule, lr))
                else:
                    train_run(run_name(optimizer, schedule, lr), run_config(args, optimizer, schedule, adamw_lr, lr))
            beyond = edge(runs, family(optimizer, schedule))
            if beyond is None or extra == args.bracket:
                break
            print(f"{family(optimizer, schedule)}: best at an edge of the sweep, adding {beyond:g}", file=sys.stderr)
            lrs = [beyond]

    if TARGET in args.family_list:
        sweep("adamw", "cosine")  # the target, and the AdamW LR of the Muon runs' other parameters
    adamw_lr = args.muon_adamw_lr or (runs[best_runs(runs)[TARGET]]["config"].max_lr if runs else None)
    for optimizer, schedule in FAMILIES[1:]:
        if family(optimizer, schedule) in args.family_list:
            sweep(optimizer, schedule, adamw_lr)
    report = summarize(args, runs, {}, started, [])
    write(report, out)
    best = report["best"]
    rival = best.get("muon-wsd") or best.get("muon-cosine")
    if args.time_steps and rival and TARGET in best:
        print(f"timing {best[TARGET]} against {rival}, alternating steps", file=sys.stderr)
        load_before = os.getloadavg()
        timing = time_steps({n: runs[n]["config"] for n in (best[TARGET], rival)}, args.time_steps)
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
