"""The official GPT-2 layout (`hf-gpt2/`) of an existing run, export or checkpoint: what the trainer
writes at the end of every run, for runs made before it did, and for any checkpoint.

    python -m export_gpt2 runs/cpu-micro                            # -> runs/cpu-micro/hf-gpt2, hf/ refreshed
    python -m export_gpt2 runs/cpu-micro/checkpoints/step_000040    # -> runs/cpu-micro/hf-gpt2-step_000040
    python -m export_gpt2 my-gpt2                                   # -> my-gpt2-gpt2 (any save_pretrained folder)

The result loads with stock transformers, `AutoModelForCausalLM.from_pretrained(folder)` without
`trust_remote_code`, as a `GPT2LMHeadModel` with the same logits. Weights are read from safetensors
only; no code from the source folder runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

from training.export import GPT2_EXPORT, SCRATCH_EXPORT, read_record, write_exports, write_gpt2_export, write_text

CHECKPOINT_WEIGHTS = "model.safetensors"  # what accelerator.save_state writes for the model


@dataclass
class Source:
    """A model to export and where it came from: its step when known, and its run folder when it has one."""

    model: object
    step: int | None
    run: Path | None


def load_export(folder: Path):
    """Our model from a `save_pretrained` folder (safetensors; its remote code is never run)."""
    from modeling_gpt2_scratch import GPT2ScratchForCausalLM

    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"{folder / 'config.json'} is not a readable model config ({err})") from err
    if model_type == "gpt2":
        raise ValueError(f"{folder} is already in the official GPT-2 layout (config.json model_type 'gpt2')")
    if model_type != "gpt2_scratch":
        raise ValueError(f"{folder / 'config.json'} has model_type {model_type!r}; expected 'gpt2_scratch'")
    with unreadable_as_value_error(folder):
        return GPT2ScratchForCausalLM.from_pretrained(folder, use_safetensors=True).eval()


@contextlib.contextmanager
def unreadable_as_value_error(folder: Path):
    """A folder whose config or weights do not load (missing or truncated safetensors, wrong shapes or
    types in config.json) is the user's input at fault: one line naming it, not a traceback."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, RuntimeError, TypeError, KeyError, SafetensorError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{folder}: cannot load the model ({reason})") from err


def load_checkpoint_weights(checkpoint: Path, config):
    """Our model from the weights of a training checkpoint (`checkpoints/step_NNNNNN`) and its run's config."""
    from safetensors.torch import load_file

    from conversion import from_state_dict

    weights = checkpoint / CHECKPOINT_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(
            f"{checkpoint} has no {CHECKPOINT_WEIGHTS}; only unsharded checkpoints can be read (an FSDP checkpoint "
            "holds sharded weights: use the run's hf/ export instead)"
        )
    from training.checkpoints import checkpoint_problems

    if (checkpoint / "checkpoint.json").is_file() and (problems := checkpoint_problems(checkpoint)):
        raise ValueError(f"checkpoint {checkpoint} is damaged: {'; '.join(problems)}")
    with unreadable_as_value_error(checkpoint):
        return from_state_dict(config.model_config(), load_file(weights)).eval()


def run_config(run: Path):
    from training.config import parse_config

    path = run / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a run folder holds the config.yaml the trainer wrote")
    return parse_config(["--config", str(path)])


def run_manifest(config) -> dict:
    """The run's data manifest, or one that names its data folder when the data is not on this machine."""
    from data_prep import read_manifest
    from data_prep.shards import DataPrepError

    try:
        return read_manifest(config.data_dir)
    except (FileNotFoundError, DataPrepError):
        return {"source": {"name": Path(config.data_dir).name}}


def step_of(checkpoint: Path) -> int | None:
    from training.remote import parse_step

    return parse_step(checkpoint.name)


def export_run(run: Path) -> list[Path]:
    """Both exports of a run folder, with cards, of its newest step: the newest intact checkpoint when
    `hf/` holds an older step (or none), else `hf/`. Done under the run's lock, so never while a
    trainer writes the same folders."""
    from training.config import ConfigError
    from training.run_dir import RunLock

    config = run_config(run)
    lock = RunLock(run / ".lock")
    try:
        lock.acquire()
    except ConfigError as err:
        raise ValueError(
            f"cannot lock the run folder {run}: {err}. Export it once the trainer has ended, or export one of its "
            "checkpoints: python -m export_gpt2 RUN/checkpoints/step_N"
        ) from None
    try:
        lock.name_holder()
        return export_run_locked(run, config)
    finally:
        lock.release()


def export_run_locked(run: Path, config) -> list[Path]:
    from training.checkpoints import latest_checkpoint
    from training.export import write_model_cards

    hf = run / SCRATCH_EXPORT
    record = read_record(hf, "scratch")
    checkpoint = newest_intact_checkpoint(run / "checkpoints")
    if checkpoint is not None and (record is None or step_of(checkpoint) > record["step"]):
        model, step = load_checkpoint_weights(checkpoint, config), step_of(checkpoint)
    elif (hf / "config.json").is_file():
        # An export from before export.json was written is that of the newest checkpoint.
        newest = latest_checkpoint(run / "checkpoints")
        model, step = load_export(hf), record["step"] if record else step_of(newest) if newest else None
    else:
        raise FileNotFoundError(f"{run} has neither an {SCRATCH_EXPORT}/ export nor an intact checkpoint to export")
    written = write_exports(model, run, step)
    write_model_cards(run, config, model, run_manifest(config))
    return written


def newest_intact_checkpoint(checkpoints: Path) -> Path | None:
    """The newest checkpoint folder with no problem (a damaged newer one is passed over)."""
    from training.checkpoints import checkpoint_problems, complete_checkpoints

    found = complete_checkpoints(checkpoints)
    return next((found[step] for step in sorted(found, reverse=True) if not checkpoint_problems(found[step])), None)


def export_one(source: Source, out: Path) -> Path:
    """The official layout of one model into `out`, with a model card (the run's results up to its step)."""
    from training.hub import ModelCard, run_results

    write_gpt2_export(source.model.config, source.model.state_dict(), out, source.step)
    if source.run is not None:
        config = run_config(source.run)
        results = run_results(source.run / "log.jsonl", through_step=source.step)
        card = ModelCard(config, source.model, run_manifest(config), results, source.run)
    else:
        card = ModelCard(None, source.model, {}, {}, out)
    write_text(out / "README.md", card.render("gpt2", []))
    return out


def export(path: str | Path, out: str | Path | None = None) -> list[Path]:
    """Write the official layout of a run folder, an export folder or a checkpoint; returns the folders
    written. A run folder (or its `hf/`) gets `hf-gpt2/` and refreshed `hf/` and cards, as the trainer
    writes them; a checkpoint `run/checkpoints/step_N` gets `run/hf-gpt2-step_N`; any other export
    folder `X` gets `X-gpt2`. `out` overrides the destination of the last two."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no folder at {path}: pass a run folder, an export folder or a checkpoint folder")
    is_run = (path / "config.yaml").is_file() and not (path / "config.json").is_file()
    if path.name == SCRATCH_EXPORT and (path.parent / "config.yaml").is_file() and out is None:  # a run's hf/
        path, is_run = path.parent, True
    if is_run:
        if out is not None:
            raise ValueError(
                f"--out is for an export or a checkpoint; a run folder's export goes to {path / GPT2_EXPORT}"
            )
        return export_run(path)
    if (path / "config.json").is_file():
        source, default = Source(load_export(path), None, None), path.with_name(f"{path.name}-gpt2")
        record = read_record(path, "scratch")
        source.step = record["step"] if record else None
    elif (path / CHECKPOINT_WEIGHTS).is_file():
        run = path.parent.parent
        source = Source(load_checkpoint_weights(path, run_config(run)), step_of(path), run)
        default = run / f"{GPT2_EXPORT}-{path.name}"
    else:
        raise FileNotFoundError(
            f"{path} is not a run folder (config.yaml), an export (config.json) or a checkpoint ({CHECKPOINT_WEIGHTS})"
        )
    out = Path(out) if out is not None else default
    if out.resolve() == path.resolve():
        raise ValueError(f"--out {out} is the source folder itself; choose another folder")
    # Only a folder that is absent, empty, or an official-layout export of ours is replaced: never a
    # user's folder, a run folder, or one that holds the source.
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and read_record(out, "gpt2") is None:
        raise ValueError(f"--out {out} exists and is not an hf-gpt2 export; choose a new or empty folder")
    return [export_one(source, out)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m export_gpt2",
        description="Write the official GPT-2 layout (GPT2LMHeadModel, loadable without trust_remote_code) of a "
        "run folder, an export folder or a training checkpoint.",
    )
    parser.add_argument(
        "path",
        help="a run folder (writes its hf-gpt2/ and refreshes hf/ and the model cards), an export folder of this "
        "model (writes NAME-gpt2 beside it), or a checkpoint run/checkpoints/step_N (writes run/hf-gpt2-step_N)",
    )
    parser.add_argument(
        "--out", default=None, help="where to write, for an export or a checkpoint (default: beside it, as above)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for folder in export(args.path, args.out):
        record = read_record(folder, "gpt2") or read_record(folder, "scratch") or {}
        step = record.get("step")
        print(f"wrote {folder} ({f'step {step}' if step is not None else 'step unknown'})")


if __name__ == "__main__":
    from eval.common import run_cli

    run_cli(main)
