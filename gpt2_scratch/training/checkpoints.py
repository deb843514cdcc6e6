"""Local checkpoints that can be trusted: written completely or not at all, hashed, checked before use
(the checks are in `gpt2_scratch.training.verify`).

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
from accelerate.utils import DistributedType, gather_object, id_tensor_storage

from data_prep.shards import file_sha256
from gpt2_scratch.training import remote
from gpt2_scratch.training.config import ConfigError, TrainConfig
from gpt2_scratch.training.files import DiskError, remove_ours, share_as_umask, writing
from gpt2_scratch.training.paths import parse_step, step_name
from gpt2_scratch.training.processes import on_main_process
from gpt2_scratch.training.recipe import resolve_mixed_precision
from gpt2_scratch.training.verify import (
    MANIFEST,
    MANIFEST_FORMAT,
    STABLE,
    STATE_FILE,
    CheckpointError,
    check_resumable,
    check_rng_restored,
    checkpoint_files,
    checkpoint_problems,
    past_stable_phase,
    read_train_state,
    saved_weights_finite,
    sharding_problem,
)

logger = logging.getLogger("train")

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
    "lr_schedule",
)
# Compared only when the run uses Muon, so that an AdamW run does not care about them.
MUON_RESUME_FIELDS = ("muon_lr", "muon_momentum", "muon_weight_decay", "muon_adjust_lr_fn", "muon_momentum_warmup")


class TrainState:
    """What `save_state` does not hold: the step, the tokens seen and the data position, saved by us
    as JSON (never a pickle). `ShardLoader`'s state is the same on every rank; `StreamLoader`'s holds every
    rank's position."""

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
    resume. `val_batches` counts the batches of all processes together, so a resume on other processes
    measures the same val/loss (test_train_elastic tests check it). Checkpoints saved while it counted per
    process recorded `val_batches x processes`, the same count: they resume with that `--val_batches`.
    Muon's settings count only for a Muon run."""
    names = RESUME_FIELDS + (MUON_RESUME_FIELDS if config.optimizer == "muon" else ())
    names += ("muon_momentum_start",) if config.optimizer == "muon" and config.muon_momentum_warmup else ()
    names += ("decay_fraction", "decay_shape") if config.lr_schedule == "wsd" else ()
    fields = {name: getattr(config, name) for name in names}
    # the precision trained in, not its spelling: 'auto' is bf16 on a GPU and fp32 on a CPU
    fields["mixed_precision"] = resolve_mixed_precision(config.mixed_precision)
    validation = {"val_batches": config.val_batches, "val_data": val_fingerprint} if val_fingerprint else {}
    return {**fields, "data": data_fingerprint, "processes": processes, **validation}


# ----------------------------------------------------------------------------------------------
# Writing


def save_checkpoint(
    accelerator: Accelerator,
    checkpoints: Path,
    state: TrainState,
    settings: dict[str, Any],
    keep: int,
    stable: bool = False,
) -> Path:
    """The full training state in checkpoints/step_NNNNNN; then only the newest `keep` are kept. A `stable`
    one (a wsd run's last step before its decay) says so in its train_state.json and outlives pruning.

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
    what = f"the checkpoint {final.name}"
    hook = acc.register_save_state_pre_hook(drop_tied_copies)
    refused = None
    try:
        with writing(checkpoints, what):
            acc.save_state(str(tmp))
    except DiskError as err:  # on any rank (each writes its RNG state): raised on every rank below
        refused = err
    finally:
        hook.remove()
    refusals = [err for err in gather_object([refused]) if err is not None]  # also waits for every rank
    if refusals:
        if acc.is_main_process:
            remove_ours(tmp)  # what save_state began, on whichever rank the disk refused it
        raise refusals[0]
    train_state = state.state_dict()  # on every rank: a data_stream loader gathers each rank's position

    def complete() -> None:
        with writing(checkpoints, what, partial=[tmp]):
            share_as_umask(tmp)
            record = {**train_state, "processes": acc.num_processes, "settings": settings}
            record |= {STABLE: True} if stable else {}
            (tmp / STATE_FILE).write_text(json.dumps(record, indent=1) + "\n")
            write_manifest(tmp, state.step)
        os.replace(tmp, final)
        prune_checkpoints(checkpoints, keep)

    on_main_process(acc, complete)
    return final


# Per export folder, beside its weights: the tokenizer (tokenizer.json, vocab.json, merges.txt), the model's
# code and card: about 5.1 MB, rounded up.
EXPORT_EXTRAS = 6 << 20
# log.jsonl and samples.jsonl records, a plot, the card: what a save writes besides the checkpoint and exports
SAVE_MARGIN = 1 << 20


def folder_bytes(folder: Path) -> int:
    """The bytes of the files in `folder` (0 when it is absent); links are not followed."""
    if not folder.is_dir():
        return 0
    return sum(p.lstat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def save_size(checkpoints: Path, step: int, exports: list[Path], weight_bytes: int) -> int:
    """About how many bytes a save of `step` adds before anything older is removed (old checkpoints are
    pruned and old exports replaced only once the new ones are complete): a checkpoint, unless `step` is
    saved already, of the newest one's size (before the first: the float32 weights, `weight_bytes`, and
    twice that for the optimizer, AdamW's two moments, more than Muon's one), and a copy of each folder
    in `exports` that the save rewrites (before the first: the weights and the tokenizer files)."""
    newest = latest_checkpoint(checkpoints)
    if (checkpoints / step_name(step)).is_dir():
        checkpoint = 0
    else:
        checkpoint = folder_bytes(newest) if newest is not None else 3 * weight_bytes
    export = sum(folder_bytes(folder) or weight_bytes + EXPORT_EXTRAS for folder in exports)
    return checkpoint + export + SAVE_MARGIN


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


def prune_checkpoints(checkpoints: Path, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints, and never the newest one with finite weights (one
    written by an older trainer may hold NaN; the guard rolls back to the newest finite one) nor the newest
    `stable` one (the one a wsd run is extended from)."""
    if keep <= 0:
        return
    complete = complete_checkpoints(checkpoints)
    steps = sorted(complete)  # by step number: step_1000000 sorts before step_999999 by name
    newest_finite = next((step for step in reversed(steps) if saved_weights_finite(complete[step])), None)
    newest_stable = next((step for step in reversed(steps) if is_stable(complete[step])), None)
    for step in steps[:-keep]:
        if step not in (newest_finite, newest_stable):
            shutil.rmtree(complete[step])


def is_stable(folder: Path) -> bool:
    """Whether the checkpoint in `folder` is marked `stable` in its train_state.json (False when unreadable)."""
    try:
        return read_train_state(folder).get(STABLE) is True
    except (OSError, ValueError, AttributeError):
        return False


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


def set_aside(folder: Path, why: str = "damaged") -> Path:
    """Rename a damaged checkpoint (or one of the decay a longer wsd run replaces, `why` 'decayed') out of
    the way: kept for inspection, never resumed or pruned, so that its step can be saved again."""
    target = folder.with_name(f"{why}_{folder.name}_{time.strftime('%Y%m%dT%H%M%S')}")
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
    rejected, decayed = [], []
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
        if past_stable_phase(folder, settings):  # a wsd run made longer continues from before this decay
            decayed.append(folder)
            continue
        check_resumable(folder, settings)
        if decayed:
            extend_from(folder, decayed, store)
        return folder
    if decayed:
        raise CheckpointError(
            f"--max_steps {settings['max_steps']} extends the wsd run in {out_dir}, but none of its checkpoints is "
            f"from before its decay ({', '.join(f.name for f in decayed)} are all decayed); start a new run"
        )
    set_aside_before = sorted(p.name for p in checkpoints.glob("damaged_step_*")) if checkpoints.is_dir() else []
    if rejected or set_aside_before:
        found = " | ".join(rejected) or f"only damaged checkpoints remain: {', '.join(set_aside_before)}"
        raise CheckpointError(
            f"no intact checkpoint to resume from ({found}); resume one explicitly with --resume PATH, or start "
            "a new run in another --out_dir"
        )
    return None


def extend_from(stable: Path, decayed: list[Path], store: remote.RemoteStore | None) -> None:
    """A wsd run made longer resumes from `stable`: the checkpoints of its old decay (`decayed`, all local by
    now) are set aside as decayed_step_NNNNNN_TIME (the shorter run's result, kept; never resumed or pruned),
    and removed from checkpoint_remote, so that the longer run's checkpoints of the same steps take their
    place."""
    for folder in decayed:
        logger.warning(
            "extending the wsd run from %s: %s is of the shorter run's decay, set aside as %s",
            stable.name,
            folder.name,
            set_aside(folder, "decayed").name,
        )
    steps = [parse_step(folder.name) for folder in decayed]
    if store is not None and (gone := [s for s in remote.complete_steps(store) if s in steps]):
        remote.write(store, {store.checkpoint(s): None for s in gone}, "extending the wsd run: remove its old decay")


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
# Finite weights (the divergence guard, gpt2_scratch/training/guard.py)


def newest_finite_checkpoint(checkpoints: Path) -> Path | None:
    """The newest intact checkpoint whose weights are all finite: what the guard rolls back to."""
    for _, folder in sorted(complete_checkpoints(checkpoints).items(), reverse=True):
        if not checkpoint_problems(folder) and saved_weights_finite(folder):
            return folder
    return None
