"""The fsdp check: FSDP2 on the device, killed and resumed from its shards, against the same run without
FSDP; the export gathered from the shards."""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Any

from .common import Context, Skip, max_abs_diff
from .evaluation import export_logits
from .launch import data_dir, finish_launch, kill_at_step, kill_group, metric, resumed_step, start_launch, train_command

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
    from gpt2_scratch.training.recipe import resolve_mixed_precision

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
