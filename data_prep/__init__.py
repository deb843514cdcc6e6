"""Turn text into GPT-2 token shards, and read them back for training and evaluation.

`python -m data_prep --help` makes shards; `ShardLoader` and `iter_val_batches` read them.
The shard format and the manifest are described in `docs/data.md` and `data_prep/shards.py`.
"""

from typing import Any

from data_prep.prepare import prepare, prepare_builtin
from data_prep.shards import DataPrepError, ShardError, load_tokens, read_manifest, verify_shards


def __getattr__(name: str) -> Any:
    # The loader needs torch (~2 s to import); `python -m data_prep` and its workers do not.
    if name in ("ShardLoader", "iter_val_batches"):
        from data_prep import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'data_prep' has no attribute {name!r}")


__all__ = [
    "DataPrepError",
    "ShardError",
    "ShardLoader",
    "iter_val_batches",
    "load_tokens",
    "prepare",
    "prepare_builtin",
    "read_manifest",
    "verify_shards",
]
