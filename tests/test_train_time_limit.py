"""Schedulers' time limits: `--time_limit` and SIGUSR1 (what SLURM's `--signal` sends before a job's
end) checkpoint, export and exit with status 75, which a requeue script tests; `--resume auto` then
continues with the same losses. Real `cpu-nano` runs, launched as a user (or srun) launches them."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trainer_runs import (
    ONE_THREAD,
    ROOT,
    end_all,
    launch,
    launch_ranks,
    metric,
    nano_args,
    reserved_port,
    run_cli,
    train_in_process,
    wait_for_step,
)

from gpt2_scratch.training.checkpoints import latest_checkpoint
from gpt2_scratch.training.config import ConfigError, TrainConfig, parse_duration
from gpt2_scratch.training.processes import REQUEUE_STATUS

pytestmark = pytest.mark.usefixtures("one_thread")

# A schedule no machine finishes in a test: only the time limit or the signal can end these runs.
LONG = dict(max_steps=10**7, save_interval=10**7, eval_interval=10**7, num_samples=0)


def test_durations_read_as_a_scheduler_writes_them():
    assert parse_duration("23h50m") == 23 * 3600 + 50 * 60
    assert (parse_duration("1d2h"), parse_duration("90m"), parse_duration("45s")) == (93600, 5400, 45)
    assert parse_duration("3600") == 3600 and parse_duration("1h30m15s") == 5415
    assert [parse_duration(t) for t in ("", "h", "2h30", "0s", "5 minutes")] == [None] * 5
    with pytest.raises(ConfigError, match="time_limit must be a duration such as 23h50m.*got '2h30'"):
        TrainConfig(time_limit="2h30")


def test_the_time_limit_checkpoints_and_exits_with_the_requeue_status(data_dir, tmp_path):
    out = tmp_path / "limited"
    # The limit counts from the process start: 8 s leaves room for the imports on a busy machine
    done = run_cli(nano_args(data_dir, out, **LONG, time_limit="8s"))
    assert done.returncode == REQUEUE_STATUS == 75, done.stderr[-3000:]
    assert "time_limit reached" in done.stderr
    last = max(metric(out, "train/loss"))
    assert last >= 1 and latest_checkpoint(out / "checkpoints").name == f"step_{last:06d}"
    assert json.loads((out / "hf" / "export.json").read_text())["step"] == last
    summary = train_in_process([*nano_args(data_dir, out, **LONG), "--resume", "auto", "--stop_at_step", str(last + 2)])
    assert summary["step"] == last + 2 and not summary["requeue"]
    assert sorted(metric(out, "train/loss")) == list(range(1, last + 3))


def test_sigusr1_checkpoints_exits_75_and_the_resumed_run_logs_the_same_losses(data_dir, tmp_path):
    common = dict(max_steps=60, save_interval=1000, eval_interval=7, num_samples=0)  # far more than a signal takes
    train_in_process(nano_args(data_dir, tmp_path / "reference", **common))
    out = tmp_path / "signalled"
    proc = launch(nano_args(data_dir, out, **common))
    wait_for_step(out, proc, 3)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == REQUEUE_STATUS, proc.stderr.read()[-3000:]
    assert "SIGUSR1 received" in proc.stderr.read()
    last = max(metric(out, "train/loss"))
    assert last < 60 and latest_checkpoint(out / "checkpoints").name == f"step_{last:06d}"
    summary = train_in_process(nano_args(data_dir, out, **common, resume="auto"))
    assert summary["complete"] and not summary["requeue"]
    assert metric(out, "train/loss") == metric(tmp_path / "reference", "train/loss")
    assert metric(out, "val/loss") == metric(tmp_path / "reference", "val/loss")


def test_sigusr1_to_every_task_of_an_srun_style_launch_exits_75_on_each(data_dir, tmp_path):
    """As the SLURM script in docs/training.md runs it: one plain process per rank, told its place by
    the environment (what srun's task variables become), each signalled by the scheduler itself."""
    out, tasks = tmp_path / "srun", []
    with reserved_port() as port:
        try:
            tasks = launch_ranks(nano_args(data_dir, out, **LONG, val_batches=1), port)
            wait_for_step(out, tasks[0], 2)
            for task in tasks:
                task.send_signal(signal.SIGUSR1)
            assert [task.wait(timeout=120) for task in tasks] == [REQUEUE_STATUS] * 2
        finally:
            end_all(tasks)  # a run the signal did not stop would otherwise train on for good
    info = json.loads((out / "run_info.json").read_text())
    last = latest_checkpoint(out / "checkpoints")
    assert info["processes"] == 2 and sorted(p.name for p in last.glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]


def catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process `pid` has a handler for `sig` (its SigCgt mask in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads a process's signal handlers from /proc")
def test_sigusr1_before_the_first_step_exits_75_and_the_requeued_run_loses_nothing(data_dir, tmp_path):
    common = dict(max_steps=8, save_interval=1000, eval_interval=4, num_samples=0)
    train_in_process(nano_args(data_dir, tmp_path / "reference", **common))
    out = tmp_path / "early"
    proc = launch(nano_args(data_dir, out, **common))
    try:
        while not catches(proc.pid, signal.SIGUSR1):  # the trainer's first lines, while it imports torch
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.001)
        proc.send_signal(signal.SIGUSR1)  # what SLURM's --signal sends, here long before a step
        assert proc.wait(timeout=120) == REQUEUE_STATUS, proc.stderr.read()[-3000:]
    finally:
        proc.kill()
        proc.wait()
    assert "SIGUSR1 received while starting: stopping before the first step" in proc.stderr.read()
    summary = train_in_process(nano_args(data_dir, out, **common, resume="auto"))  # the requeue
    assert summary["complete"] and not summary["requeue"]
    assert metric(out, "train/loss") == metric(tmp_path / "reference", "train/loss")
    assert metric(out, "val/loss") == metric(tmp_path / "reference", "val/loss")


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="the process's start time comes from /proc")
def test_the_time_limit_counts_from_the_process_start(data_dir, tmp_path):
    """The process sleeps 4 s, then becomes the trainer (exec keeps the process and its start time), with
    a time limit of 3 s: spent before main() runs, so the run stops before its first step. Counted from
    main(), it would train for 3 s."""
    out = tmp_path / "late"
    trainer = [sys.executable, str(ROOT / "train_accelerate.py"), *nano_args(data_dir, out, **LONG, time_limit="3s")]
    become = "import os, sys, time; time.sleep(4); os.execv(sys.argv[1], sys.argv[1:])"
    done = subprocess.run(
        [sys.executable, "-c", become, *trainer], cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == REQUEUE_STATUS, done.stderr[-3000:]
    assert "stopped before the first step" in done.stderr and not metric(out, "train/loss")  # no step taken


SECOND_SIGNAL = """
import os, signal
from gpt2_scratch.training import stop_signals
stop_signals.catch_early()
os.kill(os.getpid(), signal.SIGUSR1)  # while starting: recorded
from gpt2_scratch.training.processes import StopRequest
with StopRequest() as stop:
    assert stop.signum == signal.SIGUSR1
    print("taken over", flush=True)
    os.kill(os.getpid(), signal.SIGUSR1)  # the second: the default action ends the process
    print("still running", flush=True)
"""


def test_a_second_signal_after_one_while_starting_ends_the_process():
    done = subprocess.run(
        [sys.executable, "-c", SECOND_SIGNAL], cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True
    )
    assert done.returncode == -signal.SIGUSR1, done.stderr[-3000:]
    assert done.stdout == "taken over\n"
