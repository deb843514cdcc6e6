"""The run's data: token shards in `data_dir`, checked before training, and the training loader."""

from __future__ import annotations

import logging
from pathlib import Path

from accelerate import Accelerator

from data_prep.loader import data_fingerprint
from data_prep.shards import MANIFEST_NAME, check_shard
from training.config import FIELDS, ConfigError, TrainConfig

logger = logging.getLogger("train")


def prepare_data(config: TrainConfig) -> dict:
    """The manifest of `data_dir`, its validation shards checked (sha256, token ids within the model's
    vocabulary); main process only.

    A folder without a manifest gets the built-in corpus only when it is the default data_dir, or when
    `prepare_builtin` asks for it and the folder is absent or empty: a mistyped path is an error, and a
    folder we did not make is never written into.
    """
    from data_prep import prepare_builtin, read_manifest

    data_dir = Path(config.data_dir)
    if not (data_dir / MANIFEST_NAME).is_file():
        default = config.data_dir == FIELDS["data_dir"].default
        wanted = config.prepare_builtin if config.prepare_builtin is not None else default
        if not wanted:
            raise ConfigError(
                f"data_dir {data_dir} holds no {MANIFEST_NAME}; make shards there with `python -m data_prep "
                f"--out_dir {data_dir}`, or pass --prepare_builtin true to tokenize the built-in corpus into it"
            )
        if data_dir.exists() and (not data_dir.is_dir() or any(data_dir.iterdir())):
            raise ConfigError(
                f"data_dir {data_dir} is not empty and holds no {MANIFEST_NAME}; the built-in corpus is only "
                "written into an absent or empty folder"
            )
        logger.info("no prepared data in %s: tokenizing the built-in corpus", data_dir)
        prepare_builtin(data_dir)
    manifest = read_manifest(data_dir)
    vocab_size = config.model_config().vocab_size
    for entry in manifest["shards"]:
        if entry["split"] == "val":
            check_shard(data_dir, entry, verify_hash=True, vocab_size=vocab_size)
    return manifest


def train_fingerprint(manifest: dict) -> str:
    """The fingerprint of the training shards, the one the loader's state carries."""
    return data_fingerprint([entry for entry in manifest["shards"] if entry["split"] == "train"])


def val_fingerprint(manifest: dict) -> str:
    """The fingerprint of the validation shards: val/loss is comparable across a resume only on the same ones."""
    return data_fingerprint([entry for entry in manifest["shards"] if entry["split"] == "val"])


def build_loader(config: TrainConfig, accelerator: Accelerator):
    """The training loader; each shard's sha256 and token ids are checked the first time it is read."""
    from data_prep import ShardLoader

    return ShardLoader(
        config.data_dir,
        split="train",
        batch_size=config.micro_batch_size,
        seq_len=config.seq_len,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        seed=config.seed,
        vocab_size=config.model_config().vocab_size,
        sequences_per_step=config.total_batch_size // config.seq_len,  # epochs end on a whole step, for any W
    )
