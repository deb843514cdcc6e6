"""Helpers for tests that run the trainer: the tiny run's flags, running it in this process or as a
real launch, and reading what it logged. The `data_dir` and `one_thread` fixtures are in conftest.py."""

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState, GradientState

import train_accelerate as ta
from gpt2_scratch.training.metrics import logged_metric as metric
from gpt2_scratch.training.metrics import read_records as records  # noqa: F401  (the tests read logs through this module)

ROOT = Path(__file__).resolve().parents[1]

# Tiny models run fastest on one thread, and far more steadily when other work shares the cores.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def nano_args(data_dir: Path, out_dir: Path, **overrides) -> list[str]:
    fields = dict(
        data_dir=data_dir,
        out_dir=out_dir,
        model="cpu-nano",
        seq_len=32,
        micro_batch_size=4,
        total_batch_size=256,  # 2 accumulation steps in one process
        max_steps=30,
        warmup_steps=3,
        max_lr=3e-3,
        log_interval=1,
        eval_interval=5,
        val_batches=2,
        save_interval=4,
        num_samples=1,
        sample_tokens=4,
        report_to="none",
        hellaswag_path="none",
        peak_flops=1e11,
    )
    fields.update(overrides)  # an override of None leaves the flag out: the trainer's default
    return [item for name, value in fields.items() if value is not None for item in (f"--{name}", str(value))]


def train_in_process(argv: list[str]) -> dict:
    try:
        return ta.main(argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def launch(argv: list[str], script: Path = ROOT / "train_accelerate.py", env: dict | None = None) -> subprocess.Popen:
    """`python SCRIPT ARGV` (the trainer, or a test wrapper that runs it), `env` added to the environment."""
    return subprocess.Popen(
        [sys.executable, str(script), *argv],
        cwd=ROOT,
        env={**ONE_THREAD, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def launch_ranks(argv: list[str], port: int, processes: int = 2) -> list[subprocess.Popen]:
    """The trainer as srun starts it (the SLURM script in docs/training.md): one plain process per rank,
    told its place by the environment that srun's task variables become; rendezvous on 127.0.0.1:`port`."""
    tasks = []
    for rank in range(processes):
        env = {**ONE_THREAD, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(processes)}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="")
        argv_ = [sys.executable, str(ROOT / "train_accelerate.py"), *argv]
        pipes = dict(stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        tasks.append(subprocess.Popen(argv_, cwd=ROOT, env=env, **pipes))
    return tasks


def end_all(tasks: list[subprocess.Popen]) -> None:
    """SIGKILL what is left of `tasks` (a stopped process too) and reap them."""
    for task in tasks:
        task.kill()
        task.wait()


def train_two_processes(argv: list[str]) -> subprocess.CompletedProcess:
    """A whole run launched by `accelerate launch` with two CPU processes (gloo), to its end."""
    config = ROOT / "accelerate_configs" / "cpu_2proc.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    return subprocess.run(
        [*cmd, str(ROOT / "train_accelerate.py"), *argv],
        cwd=ROOT,
        env=ONE_THREAD,
        capture_output=True,
        text=True,
        timeout=400,
    )


def launch_fsdp(argv: list[str], processes: int) -> None:
    """The trainer on `processes` CPU processes with Accelerate's FSDP launcher config, to its end
    (tests/fsdp_on_cpu.py forces the FSDP path on CPU; the trainer's `--mixed_precision` decides)."""
    config = ROOT / "accelerate_configs" / "fsdp_8gpu.yaml"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    launcher += ["--num_processes", str(processes), "--mixed_precision", "no"]
    done = subprocess.run(
        [*launcher, str(ROOT / "tests" / "fsdp_on_cpu.py"), *argv],
        cwd=ROOT,
        env={**ONE_THREAD, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def wait_for_step(out_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while max(metric(out_dir, "train/loss"), default=0) < step:
        if proc.poll() is not None:
            pytest.fail(f"training exited early ({proc.returncode}):\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no step {step} within {timeout}s")
        time.sleep(0.02)


def run_cli(
    argv: list[str], timeout: float = 300, launcher: list[str] | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    """The trainer as a user runs it, to its end: `python train_accelerate.py ARGV`, or after `launcher`
    (e.g. `accelerate launch` and its flags) in its place; `env` adds to the environment."""
    return subprocess.run(
        [*(launcher or [sys.executable]), str(ROOT / "train_accelerate.py"), *argv],
        cwd=ROOT,
        env={**ONE_THREAD, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def kill_at_step(argv: list[str], out_dir: Path, step: int, **launch_args) -> None:
    """Launch the trainer (`launch_args`: see `launch`), SIGKILL it once it has logged `step`, and wait for it
    to be gone."""
    proc = launch(argv, **launch_args)
    wait_for_step(out_dir, proc, step)
    proc.kill()
    proc.wait()


@contextlib.contextmanager
def reserved_port() -> Iterator[int]:
    """A port on 127.0.0.1 for a launch's rendezvous, held for as long as the launch runs: bound but not
    listening, with SO_REUSEADDR, which torch's TCPStore also sets, so the store can listen on it while
    no other bind to it succeeds and no `bind(0)` (in another test, say) is given it. A port found free
    and released before the launch could be taken by someone else in between."""
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", 0))
        yield holder.getsockname()[1]
