"""The run directory: where each record goes, who may write it (one trainer at a time, never a folder
the trainer did not make), and how it describes itself (the resolved config, the launch's processes,
precision, package versions and git revision).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import re
import socket
import stat
import subprocess
import sys
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from gpt2_scratch.training import remote
from gpt2_scratch.training.accelerator import fsdp_precision
from gpt2_scratch.training.config import ROOT, ConfigError, TrainConfig, config_to_yaml
from gpt2_scratch.training.files import NotRegularFileError, check_regular_or_absent, read_regular, replace_text
from gpt2_scratch.training.paths import RunPaths


def describe_run(config: TrainConfig, paths: RunPaths, info: dict) -> None:
    """Write the resolved config and the run's environment into the run directory (main process)."""
    paths.out_dir.mkdir(parents=True, exist_ok=True)
    replace_text(paths.config, config_to_yaml(config))  # a full disk leaves the old one whole
    info = {
        **info,
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "git": git_revision(),
    }
    replace_text(paths.run_info, json.dumps(info, indent=2) + "\n")


def package_versions() -> dict[str, str | None]:
    names = ("torch", "transformers", "accelerate", "huggingface_hub", "tiktoken", "numpy", "safetensors")
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_revision() -> dict[str, Any] | None:
    """The commit of this code and whether the working tree had uncommitted changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def check_out_dir(paths: RunPaths, resume: str) -> None:
    """out_dir must be a folder this trainer can own: absent, empty, or (when resuming) a run folder of
    ours. A fresh run never writes into a folder holding anything, so a mistyped path loses nothing."""
    out = paths.out_dir
    if not out.is_dir() or holds_only_leftovers(paths):
        return
    ours = paths.config.is_file() or paths.checkpoints.is_dir()
    if resume == "" or not ours:
        what = "already holds a run" if ours else "is not empty and is not a run folder of this trainer"
        hint = "pass --resume auto to continue it, or choose" if ours else "choose"
        raise ConfigError(f"out_dir {out} {what}; {hint} another --out_dir")
    for record in paths.records():
        try:
            check_regular_or_absent(record)
        except NotRegularFileError as err:
            raise ConfigError(
                f"{record} is not a regular file (a folder, link, FIFO or device); move it away to resume this run"
            ) from err


def holds_only_leftovers(paths: RunPaths) -> bool:
    """Whether out_dir holds nothing of a run: at most a lock file and a data_cache of shards (what a launch
    refused before training leaves; the next launch reuses the shards)."""
    return not any(p not in (paths.lock, paths.data_cache) for p in paths.out_dir.iterdir())


def read_run_id(paths: RunPaths) -> str | None:
    """The run's identity, None before it has one."""
    try:
        run_id = read_regular(paths.run_id, 200).decode().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{paths.run_id} is not this trainer's run id file ({err}); move it away") from err
    return run_id or None


def own_store(paths: RunPaths, store: remote.RemoteStore, run_id: str | None, resumed: bool = True) -> str:
    """Give the run an identity (`run_id`, else a new one), record it in out_dir and claim `store` with it.
    A `run_id` taken from the store (out_dir has none) for a launch that found nothing to resume
    (`resumed` False) is not continued: the launch starts afresh as a new run (`remote.take_over_store`)."""
    if run_id is not None and not resumed and read_run_id(paths) is None:
        fresh = uuid.uuid4().hex
        remote.take_over_store(store, run_id, fresh)
        run_id = fresh
    run_id = run_id or uuid.uuid4().hex
    if read_run_id(paths) != run_id:
        replace_text(paths.run_id, run_id + "\n")
    remote.claim_store(store, run_id)
    return run_id


def wait_for_holder_name(fd: int, seconds: float = 5.0) -> str:
    """The name the lock's holder wrote into the lock file (`fd`). A trainer names itself just after it
    takes the lock and has seen the file is its own, so a second launch in that moment waits briefly
    for the name rather than reporting an unknown holder; "unknown" if none comes (another tool's lock)."""
    deadline = time.monotonic() + seconds
    while True:
        name = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if name or time.monotonic() > deadline:
            return name or "unknown"
        time.sleep(0.05)


class RunFolderInUse(ConfigError):
    """out_dir's lock is held by another live process (`holder`: the name it wrote)."""

    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message)
        self.holder = holder


class RunFolderNotWritable(ConfigError):
    """out_dir cannot be written by this process (a read-only mount, no write permission): `reason` says why."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


# What the OS says when a folder may be read but not written: a read-only mount, or no permission.
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


class RunLock:
    """An exclusive OS lock (`flock`) on out_dir/.lock for the whole run, so that two trainers never
    write one run folder. The kernel releases it when the holder dies, however it dies, so a lock
    left by a killed trainer never blocks; the file names the holder for the error message."""

    def __init__(self, path: Path) -> None:
        self.path, self.fd = path, None

    def acquire(self) -> None:
        """Take the lock, or raise a one-line `ConfigError`: `RunFolderInUse` naming its holder,
        `RunFolderNotWritable` for a folder this process may not write (told apart, so that no command
        blames a trainer for a read-only folder)."""
        out = self.path.parent
        if out.exists() and not out.is_dir():
            raise ConfigError(f"out_dir {out} is a file, not a folder; choose another --out_dir")
        try:
            out.mkdir(parents=True, exist_ok=True)
            if not os.access(out, os.W_OK | os.X_OK):  # a writable .lock in a folder that is not
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(out))
            # O_NOFOLLOW: a .lock planted as a link never makes us write another file
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as err:
            reason = f"{err.strerror}: {err.filename}"
            if err.errno in NOT_WRITABLE:
                raise RunFolderNotWritable(
                    f"out_dir {out} is not writable ({reason}); make it writable or choose another --out_dir", reason
                ) from err
            raise ConfigError(f"out_dir {out} cannot hold a run ({reason}); choose another --out_dir") from err
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ConfigError(f"{self.path} is not a regular file; remove it or choose another --out_dir")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = wait_for_holder_name(fd)
            os.close(fd)
            raise RunFolderInUse(
                f"out_dir {self.path.parent} is in use by another trainer ({holder}); wait for it to end or "
                "choose another --out_dir",
                holder,
            ) from None
        self.fd = fd

    def written_by_us(self) -> bool:
        """Whether the lock file is empty or names a holder as this trainer does (never another tool's)."""
        text = os.pread(self.fd, 201, 0).decode(errors="replace")
        return text == "" or re.fullmatch(r"host [^\n]*, pid [0-9]+\n", text) is not None

    def name_holder(self) -> None:
        """Write who holds the lock into the lock file: only once the file is known to be ours
        (`written_by_us`), so that a `.lock` of another tool in a mistyped out_dir is never overwritten."""
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"host {socket.gethostname()}, pid {os.getpid()}\n".encode())

    def release(self, remove: bool = False) -> None:
        """Let go of the lock; with `remove`, also delete the lock file (a launch refused at once)."""
        if remove and self.fd is not None:
            self.path.unlink(missing_ok=True)
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock; the file stays, harmlessly
            self.fd = None


def claim_out_dir(paths: RunPaths, resume: str, lock: RunLock) -> tuple[bool, bool]:
    """Lock out_dir (first, so that two launches cannot both pass the checks), then check it may hold
    this run; a refused launch removes what it made (the lock file, an out_dir it created). Returns
    what this launch made, (out_dir, the lock file), for `let_go_of_out_dir`."""
    made = not paths.out_dir.exists(), not paths.lock.exists()
    lock.acquire()
    try:
        if not lock.written_by_us():
            raise ConfigError(
                f"out_dir {paths.out_dir} holds a {paths.lock.name} that another tool wrote; choose another --out_dir"
            )
        lock.name_holder()  # at once: a second launch names us, not the pid an earlier run left there
        check_out_dir(paths, resume)
    except ConfigError:
        let_go_of_out_dir(paths, lock, made)
        raise
    return made


def let_go_of_out_dir(paths: RunPaths, lock: RunLock, made: tuple[bool, bool]) -> None:
    """Release the lock of a launch that ends without a record of the run (refused at its checks, or by
    unreadable data before training), removing the lock file and the out_dir it `made`, so that it
    leaves no folder holding only `.lock`. A data_cache it filled stays (the next launch reuses its
    shards), and so does its out_dir then."""
    made_dir, made_lock = made
    lock.release(remove=made_lock)
    if made_dir and paths.out_dir.is_dir() and not any(paths.out_dir.iterdir()):
        paths.out_dir.rmdir()


def launch_facts(
    acc: Accelerator, model: torch.nn.Module, flops_per_token: int, peak_flops: float, checkpoint: Path | None
) -> dict[str, Any]:
    """What the config alone does not say (run_info.json): the launch's processes, precision, device and
    model size."""
    return {
        "processes": acc.num_processes,
        "distributed_type": str(acc.distributed_type),
        "device": device_name(acc.device),
        "mixed_precision": acc.mixed_precision,
        "fsdp_mixed_precision": fsdp_precision(acc),
        "gradient_accumulation_steps": acc.gradient_accumulation_steps,
        "parameters": sum(p.numel() for p in model.parameters()),
        "flops_per_token": flops_per_token,
        "peak_flops_per_device": peak_flops,
        "resumed_from": str(checkpoint) if checkpoint else None,
    }


def device_name(device: torch.device) -> str:
    """The GPU's name, or for MPS and the CPU the processor's (Apple's chips name both)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    processor = platform.processor() or platform.machine() or "cpu"
    return f"mps ({processor})" if device.type == "mps" else processor
