"""Judging a checkpoint before any of it is loaded: intact, safe to read, and resumable exactly.

A checkpoint (written by `gpt2_scratch.training.checkpoints`) lists the sha256 and size of every file in its
`checkpoint.json`, written last. Here every file is checked against it, no link, FIFO or device is
followed, every pickled file (Accelerate's `optimizer.bin` and `random_states_R.pkl`) is scanned for
anything beyond tensors, plain values and numpy arrays before `torch.load(weights_only=True)` ever
sees it, and the settings it was saved with are compared with this launch's. Nothing here writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from accelerate.utils.constants import FSDP_MODEL_NAME

from data_prep.shards import file_sha256
from gpt2_scratch.training import UserError
from gpt2_scratch.training.files import read_regular
from gpt2_scratch.training.paths import local_files, parse_step
from gpt2_scratch.training.recipe import resolve_mixed_precision, wsd_decay_start

MANIFEST = "checkpoint.json"
STATE_FILE = "train_state.json"
STABLE = "stable"  # train_state.json's mark of a wsd run's last checkpoint before its decay
MANIFEST_FORMAT = 1
# What a checkpoint's pickled files may contain besides tensors and plain values: numpy arrays and
# dtypes in the RNG states, exactly the globals Accelerate itself allows when it loads them.
# Names are matched exactly: a prefix such as "numpy.dtypes." would also admit
# `numpy.dtypes.__builtins__`, and through it `exec`.
SAFE_PICKLE_GLOBALS = {
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "_codecs.encode",
    # the dtype classes (UInt32DType, ...): plain data
    *(f"numpy.dtypes.{kind}{bits}DType" for kind in ("Int", "UInt", "Float") for bits in (8, 16, 32, 64)),
    "numpy.dtypes.BoolDType",
}
# JSON files we read (manifest, train state) are small; a bigger one is damaged, not read into memory.
MAX_JSON_BYTES = 64_000_000
# Settings that checkpoints written before them lack, with the value those runs had.
ADDED_SETTINGS = {"optimizer": "adamw", "lr_schedule": "cosine", "muon_momentum_warmup": 0}
# Settings that checkpoints saved before they were recorded do not hold: not compared for those. The wsd
# decay's and Muon's momentum warmup's own are recorded only when the schedule or the warmup is used.
ADDED_LATER = ("val_batches", "val_data", "data_revision", "decay_fraction", "decay_shape", "muon_momentum_start")


class CheckpointError(UserError):
    """A checkpoint is damaged, incomplete, tampered with, or from a run with other settings."""


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Every file under `folder` but the manifest, by its POSIX path relative to `folder`."""
    return {rel: path for rel, path in local_files(folder).items() if path.name != MANIFEST}


def checkpoint_problems(folder: Path) -> list[str]:
    """What is wrong with the checkpoint in `folder`, each as a short phrase; empty when it is intact:
    every file its manifest lists is there with its size and sha256, nothing else is, and no pickled
    file asks for anything but tensors, plain values and numpy arrays."""
    try:
        listed = json.loads(read_regular(folder / MANIFEST, MAX_JSON_BYTES)).get("files")
    except FileNotFoundError:
        return [f"no {MANIFEST} (its save did not finish, or it predates checksums)"]
    except OSError as err:  # a folder, a FIFO (never waited on), a link, or too large
        return [f"{MANIFEST} is not a readable file ({err.strerror})"]
    except (ValueError, AttributeError):
        listed = None
    if not isinstance(listed, dict) or not all(isinstance(v, dict) for v in listed.values()):
        return [f"{MANIFEST} is not a valid checkpoint manifest"]
    links = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_symlink())
    if links:
        return [f"{', '.join(links)} is a symbolic link, which a checkpoint never holds"]
    special = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not (p.is_file() or p.is_dir()))
    if special:
        return [f"{', '.join(special)} is not a regular file (a FIFO, device or socket)"]
    problems = []
    present = checkpoint_files(folder)
    for rel, expected in listed.items():
        path = present.get(rel)
        if path is None:
            problems.append(f"{rel} is missing")
        elif path.stat().st_size != expected.get("bytes"):
            problems.append(f"{rel} has {path.stat().st_size} bytes, {expected.get('bytes')} were written")
        elif file_sha256(path) != expected.get("sha256"):
            problems.append(f"{rel} does not match its sha256 (damaged or replaced)")
    problems += [f"{rel} is not one of the files the trainer wrote" for rel in sorted(set(present) - set(listed))]
    if STATE_FILE not in listed:
        problems.append(f"{STATE_FILE} is not listed")
    elif not problems:
        problems += state_problems(folder)
    for rel, path in present.items():
        if rel in listed and path.suffix in (".bin", ".pkl", ".pt") and not problems:
            problems += unsafe_pickle_problems(path, rel)
            if not problems and path.name.startswith("optimizer"):
                problems += optimizer_problems(path, rel)
        if rel in listed and path.suffix == ".safetensors" and not problems:
            problems += safetensors_problems(path, rel)
    return problems


def safetensors_problems(path: Path, rel: str) -> list[str]:
    """A problem when `path` is not a valid safetensors file (a garbled header, one that claims more
    bytes than the file has, tensors past its end): safetensors checks the header without reading
    the tensors."""
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            f.keys()
    except Exception as err:  # SafetensorError, or OSError from the mmap: all mean a damaged file here
        return [f"{rel} is not a valid safetensors file ({str(err).strip() or type(err).__name__})"]
    return []


def optimizer_problems(path: Path, rel: str) -> list[str]:
    """A problem when `path` (already scanned: tensors and plain values only) is not an optimizer state
    that `load_state_dict` can take: one optimizer's state, or a dict of named ones (`--optimizer muon`
    saves `{"adamw": ..., "muon": ...}`, see `gpt2_scratch.training.recipe.MuonWithAdamW`)."""
    import torch

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # whatever fails to load is a damaged file, never a traceback
        return [f"{rel} does not load ({type(err).__name__})"]
    if (
        isinstance(saved, dict)
        and saved
        and "param_groups" not in saved
        and all(isinstance(part, dict) and "param_groups" in part for part in saved.values())
    ):
        return [problem for name, part in saved.items() for problem in one_optimizer_problems(part, f"{rel}[{name}]")]
    return one_optimizer_problems(saved, rel)


def one_optimizer_problems(saved: Any, rel: str) -> list[str]:
    """`state` and `param_groups`, every parameter in one group once, each state a dict of tensors and
    numbers for a parameter of a group."""
    import torch

    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    state = saved.get("state") if isinstance(saved, dict) else None
    if not (isinstance(groups, list) and groups and isinstance(state, dict)):
        return [f"{rel} is not an optimizer state (no state and param_groups)"]
    if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        return [f"{rel}: a parameter group has no list of params"]
    params = [i for g in groups for i in g["params"]]
    values = (v for s in state.values() if isinstance(s, dict) for v in s.values())
    if (
        not all(type(i) in (int, str) for i in params)  # indices; names in an FSDP full optimizer state
        or len(set(params)) != len(params)
        or not set(state) <= set(params)
        or not all(isinstance(s, dict) for s in state.values())
        or not all(isinstance(v, (torch.Tensor, int, float)) for v in values)
    ):
        return [f"{rel} does not have the structure of an optimizer state"]
    return []


def unsafe_pickle_problems(path: Path, rel: str) -> list[str]:
    """A problem for each global a pickled file needs beyond tensors, plain values and numpy arrays:
    loading such a file could run code, so it is refused before anything in it is unpickled."""
    import torch

    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as err:
        return [f"{rel} is not a torch file ({type(err).__name__})"]
    unsafe = [name for name in needed if name not in SAFE_PICKLE_GLOBALS]
    return [f"{rel} needs {', '.join(unsafe)} to load, which could run code; refused"] if unsafe else []


def state_problems(folder: Path) -> list[str]:
    """What is inconsistent in `train_state.json`: its step must be the folder's and the manifest's, its
    tokens those of that many steps, and the loader's position plain numbers of the expected form."""
    try:
        state = read_train_state(folder)
        manifest_step = json.loads(read_regular(folder / MANIFEST, MAX_JSON_BYTES)).get("step")
    except (OSError, ValueError, AttributeError):
        return [f"{STATE_FILE} is not readable JSON"]
    if not isinstance(state, dict):
        return [f"{STATE_FILE} is not a JSON object"]
    step, tokens, settings = state.get("step"), state.get("tokens"), state.get("settings")
    loader, processes = state.get("loader"), state.get("processes")
    if type(step) is not int or step != parse_step(folder.name) or step != manifest_step:
        return [f"{STATE_FILE} step {step!r} is not the folder's ({folder.name}) and the manifest's ({manifest_step})"]
    if not isinstance(settings, dict) or type(settings.get("total_batch_size")) is not int:
        return [f"{STATE_FILE} has no settings"]
    if type(tokens) is not int or tokens != step * settings["total_batch_size"]:
        return [f"{STATE_FILE} tokens {tokens!r} is not {step} steps of {settings['total_batch_size']}"]
    if type(processes) is not int or processes < 1:
        return [f"{STATE_FILE} processes {processes!r} is not a count of processes"]
    if isinstance(loader, dict) and loader.get("kind") == "stream":  # a data_stream position
        from data_prep.stream import stream_state_problem

        problem = stream_state_problem(loader)
        return [f"{STATE_FILE} has no valid stream position: {problem}"] if problem else []
    if not loader_position_valid(loader):
        return [f"{STATE_FILE} has no valid loader position"]
    return []


def counts(value: Any, keys: tuple[str, ...]) -> bool:
    """Whether `value` is a dict whose `keys` are all non-negative ints."""
    return isinstance(value, dict) and all(type(value.get(key)) is int and value[key] >= 0 for key in keys)


def loader_position_valid(loader: Any) -> bool:
    """A `ShardLoader` position (plain counts), a data_stream's (`data_prep.stream`), or a data mixture's
    (`data_prep.mixture`): its counts, a positive weight, a name and a valid position for each source."""
    if isinstance(loader, dict) and loader.get("kind") == "stream":
        from data_prep.stream import stream_state_problem

        return stream_state_problem(loader) is None
    if not isinstance(loader, dict) or loader.get("kind") != "mixture":
        return counts(loader, ("epoch", "chunks_done", "batch_size", "world_size", "seq_len", "seed"))
    shape = ("steps", "sequences_done", "batch_size", "world_size", "seq_len", "seed", "sequences_per_step")
    sources, drawn = loader.get("sources"), loader.get("counts")
    return (
        counts(loader, shape)
        and isinstance(sources, list)
        and len(sources) > 0
        and isinstance(drawn, list)
        and len(drawn) == len(sources)
        and all(type(c) is int and c >= 0 for c in drawn)
        and all(
            isinstance(s, dict)
            and isinstance(s.get("name"), str)
            and isinstance(s.get("data"), str)
            and type(s.get("weight")) in (int, float)
            and s["weight"] > 0
            and loader_position_valid(s.get("state"))
            for s in sources
        )
    )


def read_train_state(folder: Path) -> dict[str, Any]:
    return json.loads(read_regular(folder / STATE_FILE, MAX_JSON_BYTES))


def settings_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Each setting that differs between a checkpoint and this launch, as 'name: old -> new'."""
    other = {
        "data": "data: other training shards (or another data_stream source)",
        "val_data": "val_data: other validation shards",
    }
    if "data_revision" in saved and "data_revision" in current:
        other["data_revision"] = (
            f"data_revision: the data repository changed, commit {saved['data_revision']} -> "
            f"{current['data_revision']} (pin the old one with --data_dir hf://datasets/NAME@{saved['data_revision']})"
        )
    if "val_batches" in saved and "val_batches" in current:
        other["val_batches"] = (
            f"val_batches: {saved['val_batches']!r} -> {current['val_batches']!r} (the batches of all processes "
            f"together; one saved when it counted per process recorded val_batches x processes)"
        )
    if "data_mix" in saved and "data_mix" in current:
        if mix_key(saved["data_mix"]) == mix_key(current["data_mix"]):  # the same shards, maybe moved
            current = {**current, "data_mix": saved["data_mix"]}
        else:  # named source by source; the combined fingerprints (training, validation) add nothing
            other["data_mix"] = mix_change(saved["data_mix"], current["data_mix"])
            other["data"] = other["val_data"] = None
    saved = {**ADDED_SETTINGS, **saved}
    if saved.get("mixed_precision") == "auto":  # recorded unresolved before: what it means on this machine
        saved["mixed_precision"] = resolve_mixed_precision("auto")
    if saved.get("lr_schedule") == "cosine" and current.get("max_steps", 0) > saved.get("max_steps", 0):
        other["max_steps"] = (
            f"max_steps: {saved.get('max_steps')!r} -> {current['max_steps']!r} (a cosine schedule is fixed to its "
            "length; a run trained with --lr_schedule wsd can be extended so, from its stable checkpoint)"
        )
    changes = [
        other.get(name, f"{name}: {saved.get(name)!r} -> {value!r}")
        for name, value in current.items()
        if saved.get(name) != value and (name in saved or name not in ADDED_LATER)
    ]
    return [change for change in changes if change is not None]


def mix_key(mix: Any) -> Any:
    """What must stay the same in a data mixture: each source's weight and shards, in order (not its path)."""
    return [(s.get("weight"), s.get("data")) for s in mix] if isinstance(mix, list) else mix


def mix_change(saved: list[dict], current: list[dict]) -> str:
    """How a data mixture changed, naming its sources: the weights and shards of each, or the list."""
    if len(saved) != len(current):
        names = [", ".join(f"{s['source']}:{s['weight']:g}" for s in mix) for mix in (saved, current)]
        return f"data_mix: {names[0]} -> {names[1]}"
    found = []
    for before, now in zip(saved, current, strict=True):
        if before["weight"] != now["weight"]:
            found.append(f"the weight of {now['source']} {before['weight']:g} -> {now['weight']:g}")
        if before["data"] != now["data"]:
            found.append(f"{before['source']} -> {now['source']}: other training shards")
    return "data_mix: " + ", ".join(found)


def stable_phase_end(saved: dict[str, Any], current: dict[str, Any]) -> int | None:
    """When `current` settings make the wsd run that saved `saved` settings longer: the last step of that run's
    stable phase (its decay start), up to which its checkpoints are the longer run's too, since no LR before
    it depended on max_steps. None otherwise: a cosine run's every LR depends on max_steps, and
    `--max_steps` is only ever raised."""
    saved = {**ADDED_SETTINGS, **saved}
    before, after = saved.get("max_steps"), current.get("max_steps")
    if not (saved.get("lr_schedule") == current.get("lr_schedule") == "wsd" and type(before) is int):
        return None
    if not (type(after) is int and after > before):
        return None
    return wsd_decay_start(before, saved.get("decay_fraction"), saved.get("warmup_steps"))


def past_stable_phase(folder: Path, settings: dict[str, Any]) -> bool:
    """Whether `folder` is a checkpoint of a wsd run's decay that `settings` make longer: never resumed by the
    longer run, which continues from the stable checkpoint before it."""
    state = read_train_state(folder)
    end = stable_phase_end(state.get("settings", {}), settings)
    return end is not None and state["step"] > end


def check_resumable(folder: Path, settings: dict[str, Any]) -> None:
    """Raise a one-line `CheckpointError` unless `folder` is intact and was saved with `settings`."""
    problems = checkpoint_problems(folder)
    if problems:
        raise CheckpointError(f"checkpoint {folder} is damaged: {'; '.join(problems)}")
    state = read_train_state(folder)
    saved = state.get("settings", {})
    current = {name: value for name, value in settings.items() if name != "processes"}
    end = stable_phase_end(saved, current)
    if end is not None and state["step"] <= end:  # a wsd run made longer, from its stable phase
        current["max_steps"] = saved["max_steps"]
    changes = settings_changes(saved, current)
    if not changes and (problem := process_count_problem(saved, settings)):
        changes = [problem]
    if changes:
        raise CheckpointError(
            f"cannot resume {folder} exactly, these settings changed: {'; '.join(changes)}. Resume with the old "
            f"values, or start a new run from its weights: --init_from {folder} --out_dir NEW_DIR"
        )


def sharding_problem(checkpoint: Path, fsdp: bool) -> str | None:
    """Why an FSDP launch (`fsdp`) or another one cannot load the model in `checkpoint`, or None. Accelerate
    writes an FSDP model as `pytorch_model_fsdp_0` (sharded: torch.distributed.checkpoint files that FSDP
    on any number of processes re-shards on load) and any other as `model.safetensors`; each kind of
    launch reads only its own, and fails deep inside Accelerate on the other."""
    sharded = any(checkpoint.glob(f"{FSDP_MODEL_NAME}*"))  # _0/ (SHARDED_STATE_DICT) or .bin (FULL_STATE_DICT)
    if sharded == fsdp:
        return None
    if sharded:
        return (
            f"{checkpoint} holds an FSDP model ({FSDP_MODEL_NAME}_0), which only an FSDP launch reads; resume it "
            "with the FSDP launcher config (accelerate_configs/fsdp_8gpu.yaml, any number of processes)"
        )
    return (
        f"{checkpoint} holds an unsharded model (model.safetensors), which an FSDP launch does not read; resume it "
        f"without FSDP, or start a new run from its weights: --init_from {checkpoint} --out_dir NEW_DIR"
    )


def check_rng_restored(rng_file: Path) -> None:
    """Raise unless the torch RNG now holds the state saved in `rng_file`: Accelerate swallows any
    error while restoring RNG states, and a run resumed with other random numbers is not exact."""
    import torch
    from accelerate.utils import load

    try:
        saved = load(rng_file)["torch_manual_seed"]  # weights_only, with Accelerate's numpy allowlist
        restored = torch.equal(saved, torch.get_rng_state())
    except Exception as err:  # any way the file fails to hold an RNG state means the same here
        raise CheckpointError(f"{rng_file} holds no usable RNG state ({type(err).__name__}: {err})") from err
    if not restored:
        raise CheckpointError(f"{rng_file}: the RNG state was not restored from it; the file is not an RNG state")


def saved_weights_finite(folder: Path) -> bool:
    """Whether every tensor of the checkpoint's safetensors weights is finite (a sharded FSDP checkpoint
    has none here; the trainer never writes non-finite weights, so those count as finite)."""
    import torch
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as weights:
            if not all(torch.isfinite(weights.get_tensor(name)).all() for name in weights.keys()):
                return False
    return True


def process_count_problem(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """Why a checkpoint saved by `saved['processes']` processes cannot be resumed exactly on
    `current['processes']`, or None. The data order and the batch do not depend on the number of
    processes (the loader cuts the same steps into other micro-batches, and the launch has already
    checked that total_batch_size divides into them), but each rank draws its own dropout masks."""
    before, now = saved.get("processes"), current.get("processes")
    if before == now or not saved.get("dropout"):
        return None
    return (
        f"processes: {before!r} -> {now!r} with dropout {saved['dropout']} (each rank draws its own dropout masks, "
        f"so the masks would differ); resume on {before} processes"
    )
