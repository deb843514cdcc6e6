"""Local checkpoints: write one completely or not at all, find the one to resume from, prune old ones."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from accelerate import Accelerator

from training import remote
from training.config import ConfigError, TrainConfig
from training.run_dir import RunPaths

logger = logging.getLogger("train")


class TrainState:
    """What `save_state` does not hold by itself: the step, the tokens seen and the data position.

    Registered with `accelerator.register_for_checkpointing`, which writes it from the main process;
    that is enough because `ShardLoader`'s state is the same on every rank.
    """

    def __init__(self, loader):
        self.loader = loader
        self.step = 0
        self.tokens = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens = state["step"], state["tokens"]
        self.loader.load_state_dict(state["loader"])


def complete_checkpoints(checkpoints: Path) -> dict[int, Path]:
    """The complete local checkpoints by step: only renamed step_NNNNNN folders count, never the
    temporary ones being written."""
    if not checkpoints.is_dir():
        return {}
    steps = {p: remote.parse_step(p.name) for p in checkpoints.iterdir() if p.is_dir()}
    return {step: p for p, step in steps.items() if step is not None}


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint."""
    found = complete_checkpoints(checkpoints)
    return found[max(found)] if found else None


def find_resume_checkpoint(
    config: TrainConfig, paths: RunPaths, store: remote.RemoteStore | None = None
) -> Path | None:
    """The checkpoint to continue from per `config.resume`, downloaded first when it is remote (the newest
    complete one of out_dir and `store`, or a URL); refuse to start afresh over an existing run."""
    latest = latest_checkpoint(paths.checkpoints)
    newest_remote = remote.newest_complete(store) if store is not None else None
    if config.resume == "":
        if latest is not None:
            raise ConfigError(
                f"{paths.out_dir} already holds a run (newest checkpoint {latest.name}); pass --resume auto to "
                "continue it, or choose another --out_dir"
            )
        if newest_remote is not None:
            raise ConfigError(
                f"checkpoint_remote {store.url} already holds a run (newest complete checkpoint "
                f"{remote.step_name(newest_remote)}); pass --resume auto to continue it, or choose another "
                "--checkpoint_remote"
            )
        return None
    if config.resume == "auto":
        if newest_remote is not None and (latest is None or newest_remote > remote.parse_step(latest.name)):
            logger.info("downloading step_%06d from %s", newest_remote, store.url)
            return remote.download_checkpoint(
                store.fs, store.checkpoint(newest_remote), paths.checkpoints, paths.out_dir
            )
        return latest
    if "://" in config.resume:
        logger.info("downloading %s", config.resume)
        return remote.download_url(config.resume, paths.checkpoints, paths.out_dir)
    path = Path(config.resume)
    if not (path.is_dir() and remote.parse_step(path.name) is not None):
        raise ConfigError(f"resume: {path} is not a checkpoint folder (checkpoints/step_NNNNNN), nor 'auto' or ''")
    return path


def load_checkpoint(accelerator: Accelerator, checkpoint: Path) -> None:
    """Model, optimizer, every rank's RNG states and the registered `TrainState`: data position, step and
    tokens seen."""
    accelerator.load_state(str(checkpoint))


def save_checkpoint(accelerator: Accelerator, checkpoints: Path, step: int, keep: int) -> Path:
    """The full training state in checkpoints/step_NNNNNN; then only the newest `keep` are kept.

    Written under a temporary name and renamed once complete, so a crash mid-save never leaves a folder
    that `--resume auto` would take for a checkpoint. A step already saved is not written again.
    """
    acc = accelerator
    final = checkpoints / remote.step_name(step)
    if final.is_dir():
        return final
    tmp = checkpoints / f".tmp_{final.name}"
    if acc.is_main_process:
        for stale in checkpoints.glob(".tmp_step_*"):  # left by a run killed while saving
            shutil.rmtree(stale)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        os.replace(tmp, final)
        prune_checkpoints(checkpoints, keep)
    return final


def prune_checkpoints(checkpoints: Path, keep: int) -> None:
    if keep <= 0:
        return
    complete = complete_checkpoints(checkpoints)
    for step in sorted(complete)[:-keep]:  # by step number: step_1000000 sorts before step_999999 by name
        shutil.rmtree(complete[step])
