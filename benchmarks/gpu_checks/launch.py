"""Child processes: a logged command, the trainer's `accelerate launch` command, a launch started, killed at
a step or waited for, and what it logged."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import ROOT
from .common import Context


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of every child: the repository first on PYTHONPATH (no `pip install -e .` on the GPU
    image), offline."""
    path = os.environ.get("PYTHONPATH", "")
    pythonpath = str(ROOT) + (os.pathsep + path if path else "")
    return {**os.environ, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1", **extra}


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
    from gpt2_scratch.training.metrics import read_records

    return read_records(out_dir)


def metric(out_dir: Path, name: str) -> dict[int, float]:
    from gpt2_scratch.training.metrics import logged_metric

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


def resumed_step(run_info: dict[str, Any]) -> int | None:
    """The step of the checkpoint a run's last launch resumed from (its run_info.json), or None."""
    resumed_from = run_info.get("resumed_from")
    return int(Path(resumed_from).name.split("_")[1]) if resumed_from else None
