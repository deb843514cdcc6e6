"""Local checkpoints that can be trusted: written completely or not at all, hashed, checked before use.

A checkpoint is `checkpoints/step_NNNNNN/`: Accelerate's `save_state` files (model.safetensors,
optimizer.bin, one random_states_R.pkl per rank), our own `train_state.json` (step, tokens, loader
position, and the settings that must not change on resume) and, written last, `checkpoint.json`:
the sha256 and size of every file. Nothing we write is a pickle that needs code to load: the
`.bin` / `.pkl` files hold tensors, numbers and numpy arrays, which `torch.load(weights_only=True)`
reads, and each is scanned for anything more before it is loaded at all.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, id_tensor_storage
from accelerate.utils.constants import FSDP_MODEL_NAME

from data_prep.shards import file_sha256
from training import UserError, remote
from training.config import ConfigError, TrainConfig
from training.files import read_regular, remove_ours, share_as_umask
from training.paths import local_files, parse_step, step_name
from training.recipe import resolve_mixed_precision

logger = logging.getLogger("train")

MANIFEST = "checkpoint.json"
STATE_FILE = "train_state.json"
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
# Settings whose change makes a resumed run differ from an uninterrupted one. The data is compared by
# the fingerprint of its training shards, so a moved data folder still resumes.
RESUME_FIELDS = (
    "model",
    "n_layer",
    "n_head",
    "n_embd",
    "dropout",
    "seq_len",
    "micro_batch_size",
    "total_batch_size",
    "max_steps",
    "warmup_steps",
    "max_lr",
    "min_lr_ratio",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_eps",
    "grad_clip",
    "seed",
    "mixed_precision",
    "optimizer",
)
# Compared only when the run uses Muon, so that an AdamW run does not care about them.
MUON_RESUME_FIELDS = ("muon_lr", "muon_momentum", "muon_weight_decay", "muon_adjust_lr_fn")
# Settings that checkpoints written before them lack, with the value those runs had.
ADDED_SETTINGS = {"optimizer": "adamw"}

# Settings that checkpoints saved before they were recorded do not hold: not compared for those.
ADDED_LATER = ("val_batches", "val_data")


class CheckpointError(UserError):
    """A checkpoint is damaged, incomplete, tampered with, or from a run with other settings."""


class TrainState:
    """What `save_state` does not hold: the step, the tokens seen and the data position, saved by us
    as JSON (never a pickle). `ShardLoader`'s state is the same on every rank."""

    def __init__(self, loader):
        self.loader = loader
        self.step = 0
        self.tokens = 0
        self.rollbacks = 0  # by the divergence guard (training.guard), over the whole run
        self.guard: dict = {}  # the guard's recent losses and counts (`Guard.state_dict`)

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "loader": self.loader.state_dict(),
            "rollbacks": self.rollbacks,
            "guard": self.guard,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens = state["step"], state["tokens"]
        self.loader.load_state_dict(state["loader"])
        self.rollbacks = int(state.get("rollbacks", 0))
        self.guard = dict(state.get("guard", {}))


def run_settings(
    config: TrainConfig, data_fingerprint: str, processes: int, val_fingerprint: str | None = None
) -> dict[str, Any]:
    """The settings a checkpoint must be resumed with: `RESUME_FIELDS`, the training data and the number
    of processes (each rank's RNG state and share of the batch), and what val/loss is measured on (the
    validation shards and how many batches of them), so that the curve means the same before and after a
    resume. `val_batches` counts per process, so the batches of all processes together are compared: a
    resume on other processes with the same total measures the same val/loss (test_train_elastic
    tests check it). Muon's settings count only for a Muon run."""
    names = RESUME_FIELDS + (MUON_RESUME_FIELDS if config.optimizer == "muon" else ())
    fields = {name: getattr(config, name) for name in names}
    # the precision trained in, not its spelling: 'auto' is bf16 on a GPU and fp32 on a CPU
    fields["mixed_precision"] = resolve_mixed_precision(config.mixed_precision)
    every_batch = config.val_batches * processes
    validation = {"val_batches": every_batch, "val_data": val_fingerprint} if val_fingerprint else {}
    return {**fields, "data": data_fingerprint, "processes": processes, **validation}


# ----------------------------------------------------------------------------------------------
# Writing


def save_checkpoint(
    accelerator: Accelerator, checkpoints: Path, state: TrainState, settings: dict[str, Any], keep: int
) -> Path:
    """The full training state in checkpoints/step_NNNNNN; then only the newest `keep` are kept.

    Written under a temporary name with `checkpoint.json` last, and renamed once complete, so a crash
    mid-save never leaves a folder that `--resume auto` would take for a checkpoint. A step already
    saved is not written again.
    """
    acc = accelerator
    final = checkpoints / step_name(state.step)
    if final.is_dir():
        return final
    tmp = checkpoints / f".tmp_{final.name}"
    if acc.is_main_process:
        for stale in checkpoints.glob(".tmp_step_*"):  # left by a run killed while saving
            remove_ours(stale)  # a link planted there is removed, never followed or written through
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    hook = acc.register_save_state_pre_hook(drop_tied_copies)
    try:
        acc.save_state(str(tmp))
    finally:
        hook.remove()
    acc.wait_for_everyone()
    if acc.is_main_process:
        share_as_umask(tmp)
        record = {**state.state_dict(), "processes": acc.num_processes, "settings": settings}
        (tmp / STATE_FILE).write_text(json.dumps(record, indent=1) + "\n")
        write_manifest(tmp, state.step)
        os.replace(tmp, final)
        prune_checkpoints(checkpoints, keep)
    acc.wait_for_everyone()
    return final


def drop_tied_copies(models: list, weights: list[dict], output_dir: str) -> None:
    """Accelerate's `save_state` pre-hook: one name per tensor in the saved weights. The tied
    `lm_head.weight` is the embedding itself; safetensors cannot store one tensor under two names, so
    Accelerate drops the later name anyway, with a warning on every save. Dropped here first, the file
    is the same and the warning never comes; `load_state` restores the tie (safetensors' `load_model`)."""
    for state_dict in weights:
        seen = set()
        for name in list(state_dict):
            tensor = state_dict[name]
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = id_tensor_storage(tensor)
            if storage in seen:
                del state_dict[name]
            seen.add(storage)


def write_manifest(folder: Path, step: int) -> None:
    """`checkpoint.json`: the size and sha256 of every file in `folder`, written last."""
    files = {
        rel: {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        for rel, path in checkpoint_files(folder).items()
    }
    manifest = {"format": MANIFEST_FORMAT, "step": step, "files": files}
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, folder / MANIFEST)


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Every file under `folder` but the manifest, by its POSIX path relative to `folder`."""
    return {rel: path for rel, path in local_files(folder).items() if path.name != MANIFEST}


def prune_checkpoints(checkpoints: Path, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints, and never the newest one with finite weights (one
    written by an older trainer may hold NaN; the guard rolls back to the newest finite one)."""
    if keep <= 0:
        return
    complete = complete_checkpoints(checkpoints)
    steps = sorted(complete)  # by step number: step_1000000 sorts before step_999999 by name
    newest_finite = next((step for step in reversed(steps) if saved_weights_finite(complete[step])), None)
    for step in steps[:-keep]:
        if step != newest_finite:
            shutil.rmtree(complete[step])


# ----------------------------------------------------------------------------------------------
# Checking


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
    saves `{"adamw": ..., "muon": ...}`, see `training.recipe.MuonWithAdamW`)."""
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
    numbers = ("epoch", "chunks_done", "batch_size", "world_size", "seq_len", "seed")
    if not isinstance(loader, dict) or not all(type(loader.get(key)) is int and loader[key] >= 0 for key in numbers):
        return [f"{STATE_FILE} has no valid loader position"]
    return []


def read_train_state(folder: Path) -> dict[str, Any]:
    return json.loads(read_regular(folder / STATE_FILE, MAX_JSON_BYTES))


def settings_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Each setting that differs between a checkpoint and this launch, as 'name: old -> new'."""
    other = {"data": "data: other training shards", "val_data": "val_data: other validation shards"}
    saved = {**ADDED_SETTINGS, **saved}
    if saved.get("mixed_precision") == "auto":  # recorded unresolved before: what it means on this machine
        saved["mixed_precision"] = resolve_mixed_precision("auto")
    return [
        other.get(name, f"{name}: {saved.get(name)!r} -> {value!r}")
        for name, value in current.items()
        if saved.get(name) != value and (name in saved or name not in ADDED_LATER)
    ]


def check_resumable(folder: Path, settings: dict[str, Any]) -> None:
    """Raise a one-line `CheckpointError` unless `folder` is intact and was saved with `settings`."""
    problems = checkpoint_problems(folder)
    if problems:
        raise CheckpointError(f"checkpoint {folder} is damaged: {'; '.join(problems)}")
    saved = read_train_state(folder).get("settings", {})
    changes = settings_changes(saved, {name: value for name, value in settings.items() if name != "processes"})
    if not changes and (problem := process_count_problem(saved, settings)):
        changes = [problem]
    if changes:
        raise CheckpointError(
            f"cannot resume {folder} exactly, these settings changed: {'; '.join(changes)}. Resume with the old "
            f"values, or start a new run from its weights: --init_from {folder} --out_dir NEW_DIR"
        )


# ----------------------------------------------------------------------------------------------
# Finding the checkpoint to resume from


def complete_checkpoints(checkpoints: Path) -> dict[int, Path]:
    """The local checkpoint folders by step: only renamed step_NNNNNN folders count, never the
    temporary ones being written (whether each is intact is `checkpoint_problems`' question)."""
    if not checkpoints.is_dir():
        return {}
    steps = {p: parse_step(p.name) for p in checkpoints.iterdir() if p.is_dir() and not p.is_symlink()}
    return {step: p for p, step in steps.items() if step is not None}


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest checkpoint folder."""
    found = complete_checkpoints(checkpoints)
    return found[max(found)] if found else None


def set_aside(folder: Path) -> Path:
    """Rename a damaged checkpoint out of the way (kept for inspection, never resumed or pruned), so
    that its step can be saved again."""
    target = folder.with_name(f"damaged_{folder.name}_{time.strftime('%Y%m%dT%H%M%S')}")
    os.replace(folder, target)
    return target


def find_resume_checkpoint(
    config: TrainConfig,
    checkpoints: Path,
    out_dir: Path,
    settings: dict[str, Any],
    store: remote.RemoteStore | None = None,
) -> Path | None:
    """The checkpoint to continue from per `config.resume`, downloaded first when it is remote.

    '': none, and an error if out_dir or the remote already holds a run. 'auto': the newest intact
    one of out_dir and `store`; a damaged one is reported, set aside and the next older one tried
    (a run that has none starts afresh). A path or URL: that one, or a one-line error.
    """
    remove_ours(out_dir / remote.STAGED_LOGS)  # logs of an earlier launch's downloads: never adopted now
    local = complete_checkpoints(checkpoints)
    remote_steps = remote.complete_steps(store) if store is not None else []
    if config.resume == "":
        if local:
            raise ConfigError(
                f"{out_dir} already holds a run (newest checkpoint {local[max(local)].name}); pass --resume auto to "
                "continue it, or choose another --out_dir"
            )
        if remote_steps:
            raise ConfigError(
                f"checkpoint_remote {store.url} already holds a run (newest complete checkpoint "
                f"{step_name(remote_steps[-1])}); pass --resume auto to continue it, or choose another "
                "--checkpoint_remote"
            )
        return None
    if config.resume == "auto":
        folder = newest_intact(local, remote_steps, store, checkpoints, out_dir, settings)
    else:
        folder = named_checkpoint(config.resume, local, checkpoints, out_dir, settings)
    if folder is not None:  # the resume is certain: the logs that came with a download replace out_dir's
        remote.adopt_logs(out_dir, folder.name)
    return folder


def named_checkpoint(
    resume: str, local: dict[int, Path], checkpoints: Path, out_dir: Path, settings: dict[str, Any]
) -> Path:
    """`--resume PATH` or `URL`: that checkpoint (downloaded when remote) if it may continue this run."""
    own = "://" not in resume and Path(resume).resolve().parent == checkpoints.resolve()
    if local and not own:  # mixing another run's history into this one would lose track of both
        raise ConfigError(
            f"out_dir {out_dir} holds checkpoints of its own (newest {local[max(local)].name}); to continue it use "
            f"--resume auto, to resume {resume} choose a new --out_dir"
        )
    if "://" in resume:
        logger.info("downloading %s", resume)
        folder = remote.download_url(resume, checkpoints, out_dir)
    else:
        folder = Path(resume)
        if not (folder.is_dir() and parse_step(folder.name) is not None):
            raise ConfigError(
                f"resume: {folder} is not a checkpoint folder (checkpoints/step_NNNNNN), nor 'auto' or ''"
            )
        newer = [step for step in local if step > parse_step(folder.name)]
        if newer:
            raise ConfigError(
                f"resume: out_dir {out_dir} holds newer checkpoints ({step_name(max(newer))}); resuming from "
                f"{folder.name} would mix two histories: choose a new --out_dir"
            )
    check_resumable(folder, settings)
    return folder


def newest_intact(
    local: dict[int, Path],
    remote_steps: list[int],
    store: remote.RemoteStore | None,
    checkpoints: Path,
    out_dir: Path,
    settings: dict[str, Any],
) -> Path | None:
    """`--resume auto`: the newest checkpoint, local or remote, that `check_resumable` accepts. Damaged
    ones are skipped with a warning; a change of settings is an error (an older checkpoint has the
    same settings, so falling back would not help). None when there is no checkpoint at all; an error
    when there are some but none is intact, so a long run never silently restarts from step 0."""
    rejected = []
    for step in sorted(set(local) | set(remote_steps), reverse=True):
        try:
            if step in local:
                folder = local[step]
            else:
                logger.info("downloading %s from %s", step_name(step), store.url)
                folder = remote.download_checkpoint(store.fs, store.checkpoint(step), checkpoints, out_dir)
            problems = checkpoint_problems(folder)
        except remote.RemoteError as err:
            folder, problems = f"{store.url} {step_name(step)}", [str(err)]
        if problems:
            aside = f"; set aside as {set_aside(folder).name}" if isinstance(folder, Path) else ""
            logger.warning(
                "resume auto: %s is damaged (%s)%s; trying the next older one", folder, "; ".join(problems), aside
            )
            rejected.append(f"{folder}: {'; '.join(problems)}")
            continue
        check_resumable(folder, settings)
        return folder
    set_aside_before = sorted(p.name for p in checkpoints.glob("damaged_step_*")) if checkpoints.is_dir() else []
    if rejected or set_aside_before:
        found = " | ".join(rejected) or f"only damaged checkpoints remain: {', '.join(set_aside_before)}"
        raise CheckpointError(
            f"no intact checkpoint to resume from ({found}); resume one explicitly with --resume PATH, or start "
            "a new run in another --out_dir"
        )
    return None


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, state: TrainState) -> None:
    """Model, optimizer and every rank's RNG states (Accelerate's `load_state`, which reads them with
    `weights_only=True`; `check_resumable` has vetted each file), then our JSON `TrainState`.

    Accelerate only logs (at info level) an RNG file it cannot read and goes on with other random
    numbers, so this rank's file must be there first. A rank the saving launch did not have (resumed
    on more processes, which `process_count_problem` allows only without dropout) keeps its seeded RNG."""
    rng_file = checkpoint / f"random_states_{accelerator.process_index}.pkl"
    saved = read_train_state(checkpoint).get("processes")
    if not rng_file.is_file() and not (type(saved) is int and accelerator.process_index >= saved):
        raise CheckpointError(
            f"{checkpoint} has no {rng_file.name} (saved by {saved} processes, this launch has "
            f"{accelerator.num_processes}); resume with as many processes, or start a new run from its weights: "
            f"--init_from {checkpoint} --out_dir NEW_DIR"
        )
    if problem := sharding_problem(checkpoint, accelerator.distributed_type == DistributedType.FSDP):
        raise CheckpointError(problem)
    try:
        accelerator.load_state(str(checkpoint))
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as err:  # vetted, yet it does not fit
        raise CheckpointError(f"{checkpoint} does not load into this run ({type(err).__name__}: {err})") from err
    if rng_file.is_file():  # a rank the saving launch did not have keeps its seeded RNG
        check_rng_restored(rng_file)
    try:
        state.load_state_dict(read_train_state(checkpoint))
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{checkpoint}/{STATE_FILE}: {err}") from err
    # Accelerate's micro-step count (restored from the RNG file) decides which micro-step syncs the
    # gradients; on another number of processes the accumulation differs, so count it for this launch.
    accelerator.step = state.step * accelerator.gradient_accumulation_steps


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


def load_weights(model, folder: Path) -> None:
    """`--init_from`: the weights only (no optimizer, data position or step) of a checkpoint folder or
    an HF export, from its model.safetensors (safetensors: no code can run); a checkpoint is checked
    for damage first. `lm_head.weight` is tied to the embedding, so the file may leave it out."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if (folder / MANIFEST).is_file() and (problems := checkpoint_problems(folder)):
        raise CheckpointError(f"init_from: checkpoint {folder} is damaged: {'; '.join(problems)}")
    path = folder / "model.safetensors"
    try:
        weights = load_file(path)
    except (FileNotFoundError, SafetensorError, OSError) as err:
        raise CheckpointError(
            f"init_from: cannot read {path} ({err}); give a checkpoint folder or an hf/ export"
        ) from err
    expected = model.state_dict()
    for name, tensor in weights.items():
        if name not in expected or expected[name].shape != tensor.shape:
            found = tuple(expected[name].shape) if name in expected else "no such weight"
            raise CheckpointError(
                f"init_from: {path} has {name} of shape {tuple(tensor.shape)}, this model: {found}; use the same "
                "model size as the run that wrote it"
            )
    missing = sorted(set(expected) - set(weights) - {"lm_head.weight"})
    if missing:
        raise CheckpointError(f"init_from: {path} lacks {', '.join(missing[:4])}")
    model.load_state_dict(weights, strict=False)
    model.tie_weights()


# ----------------------------------------------------------------------------------------------
# Finite weights (the divergence guard, training/guard.py)


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


def newest_finite_checkpoint(checkpoints: Path) -> Path | None:
    """The newest intact checkpoint whose weights are all finite: what the guard rolls back to."""
    for _, folder in sorted(complete_checkpoints(checkpoints).items(), reverse=True):
        if not checkpoint_problems(folder) and saved_weights_finite(folder):
            return folder
    return None


# ----------------------------------------------------------------------------------------------
# Another number of processes (elastic resume)


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
