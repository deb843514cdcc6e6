"""The run's data: token shards in `data_dir` (a folder, or a store's URL whose shards are fetched into a
local cache), several such sources mixed by weight (`data_mix`), or a text source tokenized on the fly
(`data_stream`); checked before training; and the training loader."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from accelerate import Accelerator

from data_prep.loader import data_fingerprint
from data_prep.shards import MANIFEST_NAME, check_shard, reading
from data_prep.store import is_url
from gpt2_scratch.training.config import FIELDS, ConfigError, TrainConfig
from gpt2_scratch.training.paths import RunPaths

logger = logging.getLogger("train")


def prepare_data(config: TrainConfig) -> dict:
    """The manifest of `data_dir`, its validation shards checked (sha256, token ids within the model's
    vocabulary); main process only.

    A folder without a manifest gets the built-in corpus only when it is the default data_dir, or when
    `prepare_builtin` asks for it and the folder is absent or empty: a mistyped path is an error, and a
    folder we did not make is never written into.
    """
    from data_prep import prepare_builtin

    if config.data_mix is not None:
        return prepare_mixture(config)
    if config.data_stream:
        return prepare_stream(config)
    if is_url(config.data_dir):
        return prepare_remote_data(config)
    data_dir = Path(config.data_dir)
    with reading(data_dir / MANIFEST_NAME):  # a folder without search permission: one line naming it
        found = (data_dir / MANIFEST_NAME).is_file()
    if not found:
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
    return checked_manifest(data_dir, config.model_config().vocab_size)


def checked_manifest(data_dir: Path, vocab_size: int) -> dict:
    """The manifest of a local shard folder, its validation shards checked (sha256, token ids below `vocab_size`)."""
    from data_prep import read_manifest

    manifest = read_manifest(data_dir)
    for entry in manifest["shards"]:
        if entry["split"] == "val":
            check_shard(data_dir, entry, verify_hash=True, vocab_size=vocab_size)
    return manifest


MIX = "mixture"  # the key of a data_mix run's manifest: each source's name, weight and manifest


def prepare_mixture(config: TrainConfig) -> dict:
    """Each data_mix source's manifest, checked as `prepare_data` checks a data_dir (a folder must hold one:
    the built-in corpus is never made for a mixture), or for a `stream:` source made as `prepare_stream`
    makes a data_stream's (its validation tokens in out_dir's data cache); main process only."""
    from data_prep.mixture import parse_mix, stream_of

    parts = []
    for source, weight in parse_mix(config.data_mix):
        if stream_of(source) is not None:
            manifest = prepare_stream(source_config(config, source))
        elif is_url(source):
            manifest = prepare_remote_data(source_config(config, source))
        else:
            with reading(Path(source) / MANIFEST_NAME):
                found = (Path(source) / MANIFEST_NAME).is_file()
            if not found:
                raise ConfigError(
                    f"data_mix source {source} holds no {MANIFEST_NAME}; make shards there with `python -m data_prep "
                    f"--out_dir {source}`"
                )
            manifest = checked_manifest(Path(source), config.model_config().vocab_size)
        parts.append({"source": source, "weight": weight, "manifest": manifest})
    return {MIX: parts}


def source_config(config: TrainConfig, source: str) -> TrainConfig:
    """The config of one data_mix source read alone: as its data_dir, or for `stream:SOURCE` as its
    data_stream (with the run's data_stream_* settings; data_stream_val_split only for a Hub dataset, the
    others have no splits and validate on their first val_tokens)."""
    from data_prep.mixture import stream_of
    from data_prep.stream import BUILTIN, StreamSpec

    stream = stream_of(source)
    if stream is not None:
        hub = stream != BUILTIN and not StreamSpec(stream).is_local
        return dataclasses.replace(
            config,
            data_dir=FIELDS["data_dir"].default,
            data_mix=None,
            data_stream=stream,
            data_stream_val_split=config.data_stream_val_split if hub else None,
        )
    return dataclasses.replace(config, data_dir=source, data_mix=None, data_stream=None)


STREAM = "stream"  # the manifest's key, added here, that says where a remote run's shards come from


def prepare_remote_data(config: TrainConfig) -> dict:
    """A data_dir URL: the store opened (a Hub revision resolved to its commit), its manifest read and
    checked, every listed shard found in it with the right size, and the validation shards fetched into the
    cache and verified; main process only. The manifest returned says where the cache is (`STREAM`)."""
    store, cache = open_remote(config, resolve=True)
    logger.info("data: %s (%s), shards cached in %s", config.data_dir, store.revision or "no revision", cache.folder)
    from data_prep.store import check_listing

    check_listing(store, cache.manifest, cache.retrying)
    cache.prepare()
    vocab_size = config.model_config().vocab_size
    for entry in cache.manifest["shards"]:
        if entry["split"] == "val":
            check_shard(cache.folder, entry, verify_hash=False, vocab_size=vocab_size)  # sha256: by the cache
    stream = {"url": config.data_dir, "pinned_url": store.pinned_url, "revision": store.revision}
    return {**cache.manifest, STREAM: {**stream, "cache": str(cache.folder)}}


def open_remote(config: TrainConfig, resolve: bool, manifest: dict | None = None):
    """The store of a data_dir URL and the cache of its shards. With `manifest` (what the main process
    read, `STREAM` included), the same store and commit are opened without a request."""
    import hashlib

    from data_prep.cache import ShardCache
    from data_prep.store import Retrying, open_data_store, read_store_manifest

    retrying = Retrying(retries=config.data_retries, log=logger.warning)
    url = manifest[STREAM]["pinned_url"] if manifest else config.data_dir
    store = open_data_store(url, retrying, resolve=resolve)
    if manifest is None:
        manifest = read_store_manifest(store, retrying)
    else:
        manifest = {key: value for key, value in manifest.items() if key != STREAM}
    # One folder per set of shards, named by their hashes: another data set never shares it
    key = hashlib.sha256(json.dumps([(e["file"], e["sha256"]) for e in manifest["shards"]]).encode()).hexdigest()
    root = Path(config.data_cache_dir) if config.data_cache_dir else RunPaths(config.out_dir).data_cache
    limit = int(config.data_cache_gb * 1e9) if config.data_cache_gb else None
    return store, ShardCache(store, manifest, root / f"shards-{key[:16]}", limit, retrying, log=logger)


def local_data_dir(config: TrainConfig, manifest: dict) -> str:
    """The folder the validation shards are read from: data_dir, or for a URL the cache, or for a data_stream
    the folder its validation tokens were written to."""
    if DATA_STREAM in manifest:
        return manifest[DATA_STREAM]["folder"]
    return manifest[STREAM]["cache"] if STREAM in manifest else config.data_dir


def val_sources(config: TrainConfig, manifest: dict) -> list[tuple[str, float, str]]:
    """(label, weight, local folder) of each source whose validation shards are measured: data_dir alone
    (label '', weight 1), or each data_mix source with its weight as a proportion."""
    if MIX not in manifest:
        return [("", 1.0, local_data_dir(config, manifest))]
    from data_prep.mixture import source_labels

    parts = manifest[MIX]
    total = sum(part["weight"] for part in parts)
    labels = source_labels([part["source"] for part in parts])
    return [
        (label, part["weight"] / total, local_data_dir(source_config(config, part["source"]), part["manifest"]))
        for label, part in zip(labels, parts, strict=True)
    ]


def data_facts(config: TrainConfig, manifest: dict) -> dict:
    """Where the run's data came from, for run_info.json: a URL's commit and cache, a data_stream's source,
    commit and validation folder, each data_mix source as a data_dir's or a data_stream's, or the data_dir."""
    if MIX in manifest:
        parts = manifest[MIX]
        sources = [data_facts(source_config(config, part["source"]), part["manifest"]) for part in parts]
        return {"mix": config.data_mix, "sources": sources}
    if DATA_STREAM in manifest:
        stream = manifest[DATA_STREAM]
        return {"data_stream": config.data_stream, "revision": stream["revision"], "val_folder": stream["folder"]}
    return manifest.get(STREAM, {"url": config.data_dir})


def data_settings(manifest: dict) -> dict:
    """What a resume must find unchanged beyond the shards' hashes: the Hub commit a hf:// data_dir read, or
    a mixture's sources, weights and shards (`data_mix`, compared by weights and shards, so a moved folder
    still resumes)."""
    if MIX in manifest:
        parts = manifest[MIX]
        return {
            "data_mix": [
                {"source": p["source"], "weight": p["weight"], "data": train_fingerprint(p["manifest"])} for p in parts
            ]
        }
    revision = manifest.get(STREAM, {}).get("revision")
    return {"data_revision": revision} if revision else {}


def train_fingerprint(manifest: dict) -> str:
    """The fingerprint of the training shards, the one the loader's state carries (for a mixture: of its
    weights and its sources' shards; of a data_stream: its source, where its training tokens start and the
    reader's block size)."""
    if MIX in manifest:
        from data_prep.mixture import mix_fingerprint

        return mix_fingerprint([(p["weight"], train_fingerprint(p["manifest"])) for p in manifest[MIX]])
    if DATA_STREAM in manifest:
        return manifest[DATA_STREAM]["fingerprint"]
    return data_fingerprint([entry for entry in manifest["shards"] if entry["split"] == "train"])


def val_fingerprint(manifest: dict) -> str:
    """The fingerprint of the validation shards: val/loss is comparable across a resume only on the same ones."""
    if MIX in manifest:
        from data_prep.mixture import mix_fingerprint

        return mix_fingerprint([(p["weight"], val_fingerprint(p["manifest"])) for p in manifest[MIX]])
    return data_fingerprint([entry for entry in manifest["shards"] if entry["split"] == "val"])


def build_loader(config: TrainConfig, accelerator: Accelerator, manifest: dict | None = None):
    """The training loader; each shard's sha256 and token ids are checked the first time it is read. For a
    data_dir URL (`manifest` from `prepare_data`), each rank reads through the shared cache."""
    from data_prep import ShardLoader

    if manifest and MIX in manifest:
        return build_mixture(config, accelerator, manifest)
    if DATA_STREAM in (manifest or {}):
        return build_stream_loader(config, accelerator, manifest[DATA_STREAM])
    cache = None
    if manifest and STREAM in manifest:
        cache = open_remote(config, resolve=False, manifest=manifest)[1]
        cache.prepare()  # on every rank: another machine's ranks need the validation shards on their disk too
    return ShardLoader(
        cache.folder if cache else config.data_dir,
        cache=cache,
        split="train",
        batch_size=config.micro_batch_size,
        seq_len=config.seq_len,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        seed=config.seed,
        vocab_size=config.model_config().vocab_size,
        sequences_per_step=config.total_batch_size // config.seq_len,  # epochs end on a whole step, for any W
    )


def build_mixture(config: TrainConfig, accelerator: Accelerator, manifest: dict):
    """The data_mix loader: each step allocated among the sources by weight, the same on every rank, each rank
    reading its own part of it (`data_prep.mixture`)."""
    from data_prep.mixture import MixtureLoader

    parts = manifest[MIX]
    return MixtureLoader(
        [(p["source"], p["weight"], source_loader(config, p["source"], p["manifest"])) for p in parts],
        batch_size=config.micro_batch_size,
        seq_len=config.seq_len,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        seed=config.seed,
        sequences_per_step=config.total_batch_size // config.seq_len,
        fingerprints=[train_fingerprint(p["manifest"]) for p in parts],
    )


def source_loader(config: TrainConfig, source: str, manifest: dict):
    """One source of a mixture: a loader with `ShardLoader`'s interface that gives the source's sequences one
    at a time in its own order (batch_size 1, as rank 0 of 1: the mixture cuts the steps among the ranks).
    A `stream:` source is a `StreamLoader` that every rank runs whole (a stream cannot skip without
    tokenizing), the mixture dropping the other ranks' sequences."""
    from data_prep import ShardLoader

    if DATA_STREAM in manifest:  # no log of its own: the mixture says when the source runs out, at its step
        return stream_loader(source_config(config, source), manifest[DATA_STREAM], batch_size=1, log=None)
    cache = None
    if STREAM in manifest:
        cache = open_remote(source_config(config, source), resolve=False, manifest=manifest)[1]
        cache.prepare()  # on every rank, as build_loader does: the validation shards on each machine's disk
    return ShardLoader(
        cache.folder if cache else source,
        cache=cache,
        split="train",
        batch_size=1,
        seq_len=config.seq_len,
        seed=config.seed,
        vocab_size=config.model_config().vocab_size,
    )


DATA_STREAM = "data_stream"  # the manifest's key, added here, for a run that tokenizes its data on the fly


def stream_spec(config: TrainConfig, revision: str | None = None):
    """What `data_stream` names, as `data_prep.stream` reads it."""
    from data_prep.stream import StreamSpec

    return StreamSpec(
        config.data_stream,
        config.data_stream_config,
        config.data_stream_split,
        config.data_stream_text_column,
        revision,
    )


def prepare_stream(config: TrainConfig) -> dict:
    """A data_stream's validation tokens (the first `val_tokens` of the stream, or of `data_stream_val_split`)
    as a val shard in out_dir's data cache, and where training starts; main process only. Tokenized by the
    first launch, read back (sha256 checked) by the next ones: the same tokens in every run and on resume.
    A source that yields no text, or nothing after the validation tokens, is a one-line error here, before
    training."""
    import dataclasses

    from data_prep.stream import DEFAULT_BLOCK_DOCS, check_local_files, describe, fingerprint

    spec = stream_spec(config, pinned_stream_revision(config))
    train = spec.open(row_groups=False)  # its description
    check_local_files(train)
    if config.data_stream_val_split and train.description["kind"] != "hub":  # it would validate on training data
        raise ConfigError(
            f"data_stream_val_split {config.data_stream_val_split!r} names a split of a Hub dataset, and "
            f"data_stream {config.data_stream} has none: leave it out to hold out the first val_tokens"
        )
    spec = dataclasses.replace(spec, revision=train.description.get("revision"))  # one commit for both splits
    val_split = config.data_stream_val_split
    key = {"source": train.description, "val_tokens": config.val_tokens, "block_docs": DEFAULT_BLOCK_DOCS}
    if val_split:
        key["val_source"] = spec.open(val_split, row_groups=False).description
    stream_id = fingerprint(key)
    folder = RunPaths(config.out_dir).data_cache / f"stream-{stream_id}"
    manifest = read_stream_val(folder, stream_id, config) or write_stream_val(folder, stream_id, spec, config, train)
    tokens = manifest["shards"][0]["tokens"]
    logger.info("data_stream: %s, %d validation tokens in %s", describe(train.description), tokens, folder)
    revision = train.description.get("revision")
    stream = {"folder": str(folder), "fingerprint": stream_id, "train_start": manifest["train_start"]}
    return {**manifest, DATA_STREAM: {**stream, "revision": revision}}


def read_stream_val(folder: Path, stream_id: str, config: TrainConfig) -> dict | None:
    """The manifest of the validation tokens an earlier launch wrote for this stream, its shard checked;
    None when there is none, or it is not intact (then it is written again)."""
    from data_prep.shards import DataPrepError, read_manifest

    try:
        manifest = read_manifest(folder)
        if manifest.get("stream_id") != stream_id or len(manifest["shards"]) != 1:
            return None
        check_shard(folder, manifest["shards"][0], verify_hash=True, vocab_size=config.model_config().vocab_size)
    except (FileNotFoundError, DataPrepError):
        return None
    return manifest


def write_stream_val(folder: Path, stream_id: str, spec, config: TrainConfig, train) -> dict:
    """Tokenize the validation tokens of a stream into `folder` (val_000000.bin and manifest.json, each
    written under a temporary name first), with the position where training starts; the manifest names the
    training source (`train`), as a model card reads it."""
    from data_prep.shards import MANIFEST_FORMAT_VERSION, TOKENIZER_NAME, write_manifest, write_shard
    from data_prep.stream import describe, head_tokens

    val_split = config.data_stream_val_split
    tokens, end, description = head_tokens(spec, config.val_tokens, split=val_split)
    if val_split:  # training starts at the training split's first document
        end = {"block_doc": 0, "source_state": None, "doc": 0, "offset": 0, "row_groups": True}
    elif end is None:
        raise ConfigError(
            f"data_stream {describe(description)} gave {len(tokens)} tokens, all within val_tokens "
            f"({config.val_tokens}): lower --val_tokens to leave training tokens"
        )
    if len(tokens) < config.seq_len + 1:
        raise ConfigError(f"data_stream: {len(tokens)} validation tokens, fewer than one window of seq_len + 1")
    folder.mkdir(parents=True, exist_ok=True)
    sha256 = write_shard(folder / "val_000000.bin", tokens)
    entry = {"file": "val_000000.bin", "split": "val", "tokens": len(tokens), "sha256": sha256}
    manifest = {"format_version": MANIFEST_FORMAT_VERSION, "tokenizer": TOKENIZER_NAME, "source": train.description}
    manifest |= {"complete": True, "shards": [{**entry, "first_doc": 0, "first_doc_offset": 0}]}
    manifest |= {"stream_id": stream_id, "train_start": end}
    write_manifest(folder, manifest)
    return manifest


def pinned_stream_revision(config: TrainConfig) -> str | None:
    """The Hub commit an earlier launch of this run streamed (recorded in its data cache), so that a resume
    reads the same commit even after the dataset changed upstream; None for a new run or local files."""
    if not config.resume:
        return None
    manifest = recorded_stream(config, RunPaths(config.out_dir).data_cache)
    source = manifest["source"] if manifest else {}
    return source.get("revision") if source.get("kind") == "hub" else None


def recorded_stream(config: TrainConfig, data_cache: Path) -> dict | None:
    """The manifest of the validation tokens a launch of this run wrote for `config.data_stream` in
    `data_cache` (its `source` describes the stream: files, Hub commit), or None."""
    for path in sorted(data_cache.glob("stream-*/manifest.json")):
        try:
            manifest = json.loads(path.read_text())
            if stream_described(manifest["source"], config):
                return manifest
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return None


def stream_described(source: dict, config: TrainConfig) -> bool:
    """Whether `source` (a stream's description) is what `config.data_stream` names: the Hub dataset with
    its config and split, the built-in corpus, or local files whose names its patterns match."""
    from fnmatch import fnmatch
    from pathlib import PureWindowsPath

    from data_prep.stream import BUILTIN

    kind = source.get("kind")
    if kind == "hub":
        wanted = (config.data_stream, config.data_stream_config, config.data_stream_split)
        return (source.get("dataset"), source.get("config"), source.get("split")) == wanted
    if kind == "builtin":
        return config.data_stream == BUILTIN
    patterns = [PureWindowsPath(p.strip()).name for p in config.data_stream.split(",") if p.strip()]
    names = [PureWindowsPath(str(f["path"])).name for f in source.get("files") or []] if kind == "files" else []
    return bool(names) and all(any(fnmatch(name, pattern) for pattern in patterns) for name in names)


def build_stream_loader(config: TrainConfig, accelerator: Accelerator, stream: dict):
    """This rank's `StreamLoader`, reading the commit the main process pinned; for a new run already reading
    (a resume starts it at the saved position instead)."""
    return stream_loader(
        config,
        stream,
        config.micro_batch_size,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
    )


def stream_loader(
    config: TrainConfig, stream: dict, batch_size: int, rank: int = 0, world_size: int = 1, log=logger.info
):
    """A `StreamLoader` of `config.data_stream` from `stream` (the manifest's `DATA_STREAM`), started for a
    new run."""
    from data_prep.stream import StreamLoader

    loader = StreamLoader(
        stream_spec(config, stream.get("revision")),
        stream["train_start"],
        batch_size=batch_size,
        seq_len=config.seq_len,
        rank=rank,
        world_size=world_size,
        workers=config.data_workers,
        log=log,
    )
    if not config.resume:  # a new run: tokenize while the model is built and evaluated at step 0
        loader.start()
    return loader
