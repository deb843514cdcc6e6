"""Resuming on another number of processes (elastic resume) and two machines on the loopback address,
each against the uninterrupted one-process run of the tiny `cpu-nano` model, step for step.

DDP over gloo on CPU. A resumed run keeps total_batch_size and micro_batch_size; what changes is how
each step's sequences are split between ranks and accumulation micro-steps. `val_batches` counts the
batches of all processes together, split over them, so every launch here keeps the trainer's default
(no --val_batches) and reads the same validation sequences.
"""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from trainer_runs import ONE_THREAD, ROOT, launch, metric, nano_args, reserved_port, run_cli, train_in_process

from data_prep import ShardLoader
from gpt2_scratch.training.checkpoints import run_settings
from gpt2_scratch.training.config import TrainConfig
from gpt2_scratch.training.verify import process_count_problem, settings_changes

pytestmark = pytest.mark.usefixtures("one_thread")

# val_batches=None: the trainer's default, the setting a user resumes with
COMMON = dict(max_steps=8, save_interval=4, eval_interval=4, num_samples=0, keep_checkpoints=0, val_batches=None)
KILLED = ROOT / "tests" / "killed_after_save.py"
TWO_PROCESSES = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
TWO_PROCESSES += [str(ROOT / "accelerate_configs" / "cpu_2proc.yaml")]


def on_two_processes(argv: list[str]) -> None:
    done = run_cli(argv, timeout=400, launcher=TWO_PROCESSES)
    assert done.returncode == 0, done.stderr[-3000:]


def resumed_copy(run: Path, out: Path) -> Path:
    """A copy of `run` as if it had been stopped after step 4: its newest checkpoint removed."""
    shutil.copytree(run, out)
    shutil.rmtree(out / "checkpoints" / "step_000008")
    return out


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """8 steps on 1 and on 2 processes; one process SIGKILLed right after its step-4 save and resumed on
    2, and the 2-process run resumed from its step 4 on 1. The default val settings throughout."""
    tmp = tmp_path_factory.mktemp("elastic")
    one, two, one_to_two = tmp / "one", tmp / "two", tmp / "one_to_two"
    train_in_process(nano_args(data_dir, one, **COMMON))
    on_two_processes(nano_args(data_dir, two, **COMMON))
    killed = launch(nano_args(data_dir, one_to_two, **COMMON), script=KILLED, env={"KILL_AFTER_SAVE": "4"})
    _, stderr = killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL, stderr[-3000:]
    on_two_processes(nano_args(data_dir, one_to_two, **COMMON, resume="auto"))
    two_to_one = resumed_copy(two, tmp / "two_to_one")
    train_in_process(nano_args(data_dir, two_to_one, **COMMON, resume="auto"))
    return SimpleNamespace(one=one, two=two, one_to_two=one_to_two, two_to_one=two_to_one, tmp=tmp)


@pytest.mark.parametrize(("resumed", "processes"), [("one_to_two", 2), ("two_to_one", 1)])
def test_a_resume_on_another_number_of_processes_logs_the_same_losses(runs, resumed, processes):
    """Exactly the same numbers, not merely close: two ranks' gradients averaged, (g1 + g2) / 2, equal one
    rank's accumulation, g1 / 2 + g2 / 2, bit for bit (halving a float is exact), and so do the losses."""
    out = getattr(runs, resumed)
    assert sorted(metric(out, "train/loss")) == list(range(1, 9))
    assert metric(out, "train/loss") == metric(runs.one, "train/loss") == metric(runs.two, "train/loss")
    assert metric(out, "val/loss") == metric(runs.one, "val/loss") == metric(runs.two, "val/loss")
    info = json.loads((out / "run_info.json").read_text())
    assert info["processes"] == processes and info["resumed_from"].endswith("step_000004")


def test_dropout_makes_another_number_of_processes_inexact_and_is_refused():
    saved = {"processes": 2, "dropout": 0.1}
    problem = process_count_problem(saved, {"processes": 1, "dropout": 0.1})
    assert problem.startswith("processes: 2 -> 1 with dropout 0.1") and problem.endswith("resume on 2 processes")
    assert process_count_problem({"processes": 2, "dropout": 0.0}, {"processes": 1, "dropout": 0.0}) is None
    assert process_count_problem(saved, {"processes": 2, "dropout": 0.1}) is None


def test_the_loader_cuts_the_same_steps_for_any_number_of_processes_across_epochs(data_dir):
    """With sequences_per_step fixed, each step reads the same sequences on 1 rank x 2 micro-batches
    as on 2 ranks x 1, past an epoch end, and a position saved by one resumes on the other."""
    seq_len, per_step = 32, 8  # 35+ epochs' worth of steps below: the epoch ends are crossed
    single = ShardLoader(data_dir, batch_size=4, seq_len=seq_len, sequences_per_step=per_step)
    pair = [
        ShardLoader(data_dir, batch_size=4, seq_len=seq_len, rank=r, world_size=2, sequences_per_step=per_step)
        for r in range(2)
    ]
    steps = single.batches_per_epoch // 2 + 3
    for step in range(steps):
        mine = {tuple(row) for _ in range(2) for row in single.next_batch()[0].tolist()}
        theirs = {tuple(row) for loader in pair for row in loader.next_batch()[0].tolist()}
        assert mine == theirs, f"step {step}"
    assert single.epoch == 1 and pair[0].epoch == 1
    resumed = ShardLoader(data_dir, batch_size=4, seq_len=seq_len, sequences_per_step=per_step)
    resumed.load_state_dict(pair[0].state_dict())
    assert resumed.next_batch()[0].tolist() == single.next_batch()[0].tolist()


def test_two_machines_on_the_loopback_address_match_one_process(runs, data_dir):
    """The multinode launcher config, as two machines of one CPU process each (gloo over 127.0.0.1),
    started the way docs/training.md tells: the same command on each, with its --machine_rank. Not
    with `--cpu`: that flag makes `accelerate launch` start one plain process, not a torchrun agent;
    hiding the GPUs keeps the processes on the CPU where there are some."""
    out = runs.tmp / "two_machines"
    config = ROOT / "accelerate_configs" / "multinode_2x8.yaml"
    argv = nano_args(data_dir, out, **COMMON)
    with reserved_port() as port:
        flags = ["--num_machines", "2", "--num_processes", "2", "--main_process_ip", "127.0.0.1"]
        flags += ["--main_process_port", str(port), "--mixed_precision", "no"]
        machines = [
            subprocess.Popen(
                [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), *flags]
                + ["--machine_rank", str(rank), str(ROOT / "train_accelerate.py"), *argv],
                cwd=ROOT,
                env={**ONE_THREAD, "CUDA_VISIBLE_DEVICES": ""},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for rank in (0, 1)
        ]
        for machine in machines:
            _, stderr = machine.communicate(timeout=400)
            assert machine.returncode == 0, stderr[-3000:]
    info = json.loads((out / "run_info.json").read_text())
    assert info["processes"] == 2
    assert sorted(metric(out, "train/loss")) == list(range(1, 9))
    assert metric(out, "train/loss") == metric(runs.one, "train/loss")
    assert metric(out, "val/loss") == metric(runs.one, "val/loss")


def test_fsdp_on_cpu_is_refused_in_one_line(data_dir, tmp_path):
    """Accelerate applies FSDP only on accelerator devices: on CPU the FSDP launcher config would train
    with plain DDP and unsharded checkpoints (seen with Accelerate 1.15), so an FSDP 2 -> 1 resume cannot
    be exercised here; the trainer says so instead of pretending to shard."""
    out = tmp_path / "fsdp"
    config = ROOT / "accelerate_configs" / "fsdp_8gpu.yaml"
    flags = ["--config_file", str(config), "--num_processes", "2", "--mixed_precision", "no"]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", *flags]
    done = run_cli(nano_args(data_dir, out, **COMMON), launcher=launcher, env={"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors and errors[0].startswith("error: this launch asks for FSDP, but Accelerate runs FSDP only on GPUs")
    assert "would train with MULTI_CPU" in errors[0] and "accelerate_configs/cpu_2proc.yaml" in errors[0]
    assert not out.exists()


def test_a_checkpoint_saved_while_val_batches_counted_per_process_resumes_with_its_total():
    """Before, a checkpoint recorded val_batches x processes (4 per process on 2: 8), the count of batches
    all processes read together, which is what val_batches now means: `--val_batches 8` resumes it on any
    number of processes; the default 4 is refused, naming the count to pass."""
    old = {**run_settings(TrainConfig(val_batches=4), "data", 2, "val"), "val_batches": 4 * 2}
    for processes in (1, 2, 4):
        now = run_settings(TrainConfig(val_batches=8), "data", processes, "val")
        assert settings_changes(old, {k: v for k, v in now.items() if k != "processes"}) == []
    default = run_settings(TrainConfig(), "data", 1, "val")
    (change,) = settings_changes(old, {k: v for k, v in default.items() if k != "processes"})
    assert change.startswith("val_batches: 8 -> 4 (the batches of all processes together")
