"""benchmarks/gpu_checks/fsdp.py, gpu_check.py's fsdp check, whose launches need CUDA: its trainer commands,
when it skips, and the judgement of its three runs (uninterrupted FSDP, FSDP killed and resumed, the same run
without FSDP) on runs written here."""

import argparse
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_checks.common import GPU_SHAPE, Context, Skip  # noqa: E402
from gpu_checks.fsdp import FSDP_SECONDS, check_fsdp, compare_fsdp_runs, judge_fsdp  # noqa: E402
from gpu_checks.launch import kill_group, train_command  # noqa: E402

MAX_STEPS, VAL_STEPS = 8, (0, 4, 8)


def context(tmp_path: Path, device: str = "cuda", budget: float = math.inf) -> Context:
    args = argparse.Namespace(smoke=False, budget=budget, out=str(tmp_path / "r.json"), md=None)
    return Context(args, torch.device(device), GPU_SHAPE, tmp_path, {})


def test_the_fsdp_commands_are_one_fsdp_process_and_the_same_run_without(data_dir, tmp_path):
    from accelerate.commands.launch import launch_command_parser

    from data_prep import iter_val_batches
    from gpt2_scratch.training.config import parse_config
    from gpt2_scratch.training.recipe import grad_accum_steps

    ctx = context(tmp_path)
    sizes = ctx.shape.fsdp_train
    fsdp = train_command(ctx, tmp_path / "run", "--resume", "auto", sizes=sizes, fsdp=True)
    plain = train_command(ctx, tmp_path / "run", "--resume", "auto", sizes=sizes)
    script = str(ROOT / "train_accelerate.py")
    launcher = launch_command_parser().parse_args(fsdp[3 : fsdp.index(script) + 1])  # after `python -m accelerate...`
    assert Path(launcher.config_file).name == "fsdp_8gpu.yaml" and launcher.training_script == script
    assert (launcher.num_processes, launcher.main_process_port) == (1, 0)  # port 0: a free port, side by side
    assert Path(plain[plain.index("--config_file") + 1]).name == "gpu_1.yaml"
    assert fsdp[fsdp.index(script) :] == plain[plain.index(script) :]  # the same trainer flags

    config = parse_config(fsdp[fsdp.index(script) + 1 :])
    assert (config.model, config.compile, config.mixed_precision, config.resume) == ("cpu-mini", False, "auto", "auto")
    assert grad_accum_steps(config, world_size=1) == 2  # FSDP's accumulation too
    kill = ctx.shape.fsdp_kill_after
    assert config.save_interval < kill < config.max_steps - config.save_interval  # a checkpoint before, room after
    val = list(iter_val_batches(data_dir, config.micro_batch_size, config.seq_len, max_batches=config.val_batches))
    assert len(val) == config.val_batches


def test_it_skips_on_a_cpu_without_the_corpus_and_past_the_budget(tmp_path):
    with pytest.raises(Skip, match="only on accelerators.*tests/fsdp_on_cpu.py"):
        check_fsdp(context(tmp_path, device="cpu"))
    with pytest.raises(Skip, match="needs the data_prep check's corpus"):
        check_fsdp(context(tmp_path))
    (tmp_path / "data-builtin").mkdir()
    (tmp_path / "data-builtin" / "manifest.json").write_text("{}")
    with pytest.raises(Skip, match=f"time budget: 0 s of --budget 60 s spent.*{FSDP_SECONDS} s"):
        check_fsdp(context(tmp_path, budget=60))


def write_run(out: Path, train: dict, val: dict, distributed: str = "FSDP", resumed_from: int | None = None) -> None:
    out.mkdir(parents=True)
    info = {"distributed_type": f"DistributedType.{distributed}", "processes": 1, "mixed_precision": "bf16"}
    if resumed_from is not None:
        info["resumed_from"] = str(out / "checkpoints" / f"step_{resumed_from:06d}")
    (out / "run_info.json").write_text(json.dumps(info))
    records = [{"step": s, "train/loss": loss} for s, loss in train.items()]
    records += [{"step": s, "val/loss": loss} for s, loss in val.items()]
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def losses(first: float, **changed: float) -> dict[int, float]:
    """A falling loss per step; `changed` maps 's<step>' to a value put in its place."""
    values = {s: first - 0.1 * s for s in range(1, MAX_STEPS + 1)}
    return {**values, **{int(k[1:]): v for k, v in changed.items()}}


def judge(tmp_path: Path, killed=None, plain=None, val_killed=None, val_plain=None, resumed_from=4, killed_at=6, **kw):
    """compare_fsdp_runs and judge_fsdp on three runs that log `losses(10.0)`, the killed and plain runs'
    losses replaced: the figures and the detail."""
    val = {s: 10.0 - 0.1 * s for s in VAL_STEPS}
    runs = tmp_path / "runs"
    write_run(runs / "uninterrupted", losses(10.0), val)
    write_run(runs / "killed", killed or losses(10.0), val_killed or val, resumed_from=resumed_from)
    write_run(runs / "plain", plain or losses(10.0), val_plain or val, distributed=kw.pop("distributed", "NO"))
    result = compare_fsdp_runs(runs, killed_at, MAX_STEPS, "bf16")
    return result, judge_fsdp(result, resume_tolerance=1e-2)


def test_runs_that_agree_pass_with_their_differences_reported(tmp_path):
    close = {s: loss * (1 + 1e-3 * (-1) ** s) for s, loss in losses(10.0).items()}  # bf16-like, 1e-3 apart
    # before the resume (steps 1-4, the first launch) the killed run may differ as much as two launches do
    result, detail = judge(tmp_path, killed=losses(10.0, s2=9.805, s5=9.505), plain=close)
    assert (result["killed_at_step"], result["resumed_from_step"]) == (6, 4)
    assert result["max_loss_diff_before_resume"] == pytest.approx(0.005)
    assert result["max_loss_diff_after_resume"] == pytest.approx(0.005) and not result["bitwise_equal"]
    assert result["vs_plain_max_rel_diff"] == pytest.approx(1e-3, rel=0.01)
    assert result["vs_plain_first_step_rel_diff"] == pytest.approx(1e-3, rel=0.01)
    assert result["max_val_loss_diff_after_resume"] == result["vs_plain_val_max_rel_diff"] == 0.0
    assert "killed at step 6, resumed from the shards of 4" in detail and "rel. diff 1.0e-03" in detail
    assert judge(tmp_path / "same")[0]["bitwise_equal"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(killed=losses(10.0, s5=9.48)), "the resumed run is 2.00e-02 off"),  # after the resume: beyond 1e-2
        (dict(val_killed={0: 10.0, 4: 9.6, 8: 9.3}), "the resumed run is 1.00e-01 off"),
        (dict(killed=losses(10.0, s7=math.nan)), "the resumed run is inf off"),  # a NaN never passes
        (dict(plain=losses(10.0, s8=9.4)), "FSDP is 2.13e-02 off the run without"),
        (dict(val_plain={0: 10.0, 4: 9.6, 8: 9.0}), "FSDP is 2.22e-02 off the run without"),
        (dict(killed={s: v for s, v in losses(10.0).items() if s != 7}), "steps logged"),
        (dict(val_plain={0: 10.0, 4: 9.6}), "val/loss steps logged"),
        (dict(resumed_from=6), "did not resume from a checkpoint before step 6"),
        (dict(resumed_from=None), "did not resume from a checkpoint"),
        (dict(distributed="FSDP"), "ran FSDP too"),
    ],
)
def test_runs_that_disagree_fail_naming_what(tmp_path, change, message):
    with pytest.raises(AssertionError, match=message.replace("(", r"\(")):
        judge(tmp_path, **change)


def test_a_launch_is_killed_with_the_workers_that_left_its_process_group(tmp_path):
    """As torchrun does: the worker is started in a session of its own. The kill reaches it too, where a
    process-group kill left the trainer running to its end."""
    import subprocess

    import psutil

    launcher = (
        "import subprocess, sys, time\n"
        "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)\n"
        "print(worker.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True, start_new_session=True)
    worker = psutil.Process(int(proc.stdout.readline()))
    proc.stdout.close()
    assert worker.is_running() and os.getpgid(worker.pid) != os.getpgid(proc.pid)  # outside the launcher's group
    kill_group(proc)
    assert proc.returncode == -9
    worker.wait(timeout=10)  # gone (it is the launcher's child: reaped by init once the launcher died)
    assert not worker.is_running()
