"""The official GPT-2 layout (`hf-gpt2/`) of an existing run, export or checkpoint: what the trainer
writes at the end of every run, for runs made before it did, and for any checkpoint.

    python -m gpt2_scratch.export_gpt2 runs/cpu-micro                          # -> runs/cpu-micro/hf-gpt2
    python -m gpt2_scratch.export_gpt2 runs/cpu-micro/checkpoints/step_000040  # -> runs/cpu-micro/hf-gpt2-step_000040
    python -m gpt2_scratch.export_gpt2 my-gpt2                                 # -> my-gpt2-gpt2 (save_pretrained)

The result loads with stock transformers, `AutoModelForCausalLM.from_pretrained(folder)` without
`trust_remote_code`, as a `GPT2LMHeadModel` with the same logits. Weights are read from safetensors
only; no code from the source folder runs.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from gpt2_scratch.training.export import (
    GPT2_EXPORT,
    SCRATCH_EXPORT,
    read_record,
    write_exports,
    write_gpt2_export,
    write_text,
)
from gpt2_scratch.training.files import check_writable
from gpt2_scratch.user_errors import UserError, run_command

CHECKPOINT_WEIGHTS = "model.safetensors"  # what accelerator.save_state writes for the model


@dataclass
class Source:
    """A model to export and where it came from: its step when known, and its run folder when it has one."""

    model: object
    step: int | None
    run: Path | None


def load_export(folder: Path):
    """Our model from a `save_pretrained` folder (safetensors; its remote code is never run). Its
    config.json and the shapes in its weight files are judged first, so that bad input is one line."""
    from huggingface_hub.errors import StrictDataclassError

    from modeling_gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM

    try:
        fields = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{folder / 'config.json'} is not a readable model config ({err})") from err
    model_type = fields.get("model_type") if isinstance(fields, dict) else None
    if model_type == "gpt2":
        raise UserError(f"{folder} is already in the official GPT-2 layout (config.json model_type 'gpt2')")
    if model_type != "gpt2_scratch":
        raise UserError(f"{folder / 'config.json'} has model_type {model_type!r}; expected 'gpt2_scratch'")
    try:
        config = GPT2ScratchConfig.from_dict(fields)
    except (TypeError, ValueError, StrictDataclassError) as err:  # the config's own checks of each field
        raise UserError(f"{folder / 'config.json'}: {' '.join(str(err).split())}") from err
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise UserError(f"{index} is not a readable safetensors index ({err})") from err
    else:
        files = [folder / CHECKPOINT_WEIGHTS]
    check_weights(weight_shapes(files), config, folder)
    return GPT2ScratchForCausalLM.from_pretrained(folder, config=config, use_safetensors=True).eval()


def weight_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, from the safetensors headers (nothing else is read); a missing, truncated or
    foreign file is the user's input at fault."""
    from safetensors import SafetensorError, safe_open

    shapes = {}
    for path in files:
        try:
            with safe_open(path, "pt") as weights:
                shapes.update({key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()})
        except (OSError, SafetensorError) as err:
            raise UserError(f"{path}: not a readable safetensors file ({' '.join(str(err).split())})") from err
    return shapes


def check_weights(shapes: dict[str, tuple[int, ...]], config, where: Path) -> None:
    """The weights fit a model of `config`: each parameter present with its shape (the tied `lm_head` may be
    left out, the embedding may lack the vocabulary's padding rows), and no other tensor."""
    import torch

    from gpt2_scratch.conversion import strip_wrapper_prefixes
    from modeling_gpt2_scratch import GPT2ScratchForCausalLM

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT2ScratchForCausalLM(config).state_dict().items()}
    try:
        shapes = strip_wrapper_prefixes(shapes)
    except ValueError as err:
        raise UserError(f"{where}: {err}") from err
    problems = [f"no {key}" for key in expected if key not in shapes and key != "lm_head.weight"]
    problems += [f"an unexpected tensor {key}" for key in shapes if key not in expected]
    for key in [key for key in expected if key in shapes]:
        found, want = shapes[key], expected[key]
        embedding = key == "transformer.wte.weight" and found[1:] == want[1:] and config.vocab_size <= found[0]
        if found != want and not (embedding and found[0] <= want[0]):
            problems.append(f"{key} has shape {list(found)}, the config's model needs {list(want)}")
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise UserError(f"{where}: the weights do not fit its config: {'; '.join(problems[:3])}{more}")


def load_checkpoint_weights(checkpoint: Path, config):
    """Our model from the weights of a training checkpoint (`checkpoints/step_NNNNNN`) and its run's config."""
    from safetensors.torch import load_file

    from gpt2_scratch.conversion import from_state_dict

    weights = checkpoint / CHECKPOINT_WEIGHTS
    if not weights.is_file():
        raise UserError(
            f"{checkpoint} has no {CHECKPOINT_WEIGHTS}; only unsharded checkpoints can be read (an FSDP checkpoint "
            "holds sharded weights: use the run's hf/ export instead)"
        )
    from gpt2_scratch.training.verify import checkpoint_problems

    if (checkpoint / "checkpoint.json").is_file() and (problems := checkpoint_problems(checkpoint)):
        raise UserError(f"checkpoint {checkpoint} is damaged: {'; '.join(problems)}")
    model_config = config.model_config()
    check_weights(weight_shapes([weights]), model_config, checkpoint)
    return from_state_dict(model_config, load_file(weights)).eval()


def run_config(run: Path):
    from gpt2_scratch.training.config import parse_config

    path = run / "config.yaml"
    if not path.is_file():
        raise UserError(f"{path} not found: a run folder holds the config.yaml the trainer wrote")
    return parse_config(["--config", str(path)])


def run_manifest(config, run: Path | None = None) -> dict:
    """The run's data manifest, or one that names its data folder when the data is not on this machine. A
    stream's (`data_stream`, a `stream:` source of `data_mix`) is the one its first launch wrote in the
    run's data cache (`run`: the run folder, else `config.out_dir`), describing its files or Hub commit."""
    from gpt2_scratch.training.data import recorded_stream, source_config
    from gpt2_scratch.training.paths import RunPaths

    data_cache = RunPaths(run if run is not None else config.out_dir).data_cache

    def manifest_of(source_config) -> dict:
        if not source_config.data_stream:
            return source_manifest(source_config.data_dir)
        found = recorded_stream(source_config, data_cache)
        return found if found else {"source": {"name": source_config.data_stream}}

    if config.data_mix:  # each source's manifest with its weight, as the trainer's card has them
        from data_prep.mixture import parse_mix

        parts = parse_mix(config.data_mix)
        return {
            "mixture": [{"source": s, "weight": w, "manifest": manifest_of(source_config(config, s))} for s, w in parts]
        }
    return manifest_of(config)


def source_manifest(data_dir: str) -> dict:
    """A data folder's manifest, or one that names the folder when it is not on this machine."""
    from data_prep import read_manifest
    from data_prep.shards import DataPrepError

    try:
        return read_manifest(data_dir)
    except DataPrepError:
        return {"source": {"name": Path(data_dir).name}}


def step_of(checkpoint: Path) -> int | None:
    from gpt2_scratch.training.paths import parse_step

    return parse_step(checkpoint.name)


def export_run(run: Path) -> list[Path]:
    """Both exports of a run folder, with cards, of its newest step: the newest intact checkpoint when
    `hf/` holds an older step (or none), else `hf/`. Done under the run's lock, so never while a
    trainer writes the same folders."""
    from gpt2_scratch.training.checkpoints import latest_checkpoint
    from gpt2_scratch.training.run_dir import RunFolderInUse, RunFolderNotWritable, RunLock

    config = run_config(run)
    lock = RunLock(run / ".lock")
    try:
        lock.acquire()
    except (RunFolderInUse, RunFolderNotWritable) as err:
        # what can be exported without the lock: a checkpoint (or hf/) into a folder of the user's choice
        newest = latest_checkpoint(run / "checkpoints")
        other = f"python -m gpt2_scratch.export_gpt2 {newest or run / SCRATCH_EXPORT} --out FOLDER"
        if isinstance(err, RunFolderInUse):
            raise UserError(
                f"cannot export the run {run}: a trainer is training it ({err.holder}); export it once the trainer "
                f"has ended, or export its newest saved weights now: {other}"
            ) from None
        raise UserError(
            f"cannot export the run {run}: the folder is not writable ({err.reason}) and a run's exports go into "
            f"it ({SCRATCH_EXPORT}/, {GPT2_EXPORT}/); make it writable, or export elsewhere: {other}"
        ) from None
    try:
        lock.name_holder()
        return export_run_locked(run, config)
    finally:
        lock.release()


def export_run_locked(run: Path, config) -> list[Path]:
    from gpt2_scratch.training.checkpoints import latest_checkpoint
    from gpt2_scratch.training.model_card import write_model_cards

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
        raise UserError(f"{run} has neither an {SCRATCH_EXPORT}/ export nor an intact checkpoint to export")
    written = write_exports(model, run, step)
    write_model_cards(run, config, model, run_manifest(config, run))
    return written


def newest_intact_checkpoint(checkpoints: Path) -> Path | None:
    """The newest checkpoint folder with no problem (a damaged newer one is passed over)."""
    from gpt2_scratch.training.checkpoints import complete_checkpoints
    from gpt2_scratch.training.verify import checkpoint_problems

    found = complete_checkpoints(checkpoints)
    return next((found[step] for step in sorted(found, reverse=True) if not checkpoint_problems(found[step])), None)


def export_one(source: Source, out: Path) -> Path:
    """The official layout of one model into `out`, with a model card (the run's results up to its step)."""
    from gpt2_scratch.training.model_card import ModelCard, run_results

    write_gpt2_export(source.model.config, source.model.state_dict(), out, source.step)
    if source.run is not None:
        config = run_config(source.run)
        results = run_results(source.run / "log.jsonl", through_step=source.step)
        card = ModelCard(config, source.model, run_manifest(config, source.run), results, source.run)
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
        raise UserError(f"no folder at {path}: pass a run folder, an export folder or a checkpoint folder")
    is_run = (path / "config.yaml").is_file() and not (path / "config.json").is_file()
    if path.name == SCRATCH_EXPORT and (path.parent / "config.yaml").is_file() and out is None:  # a run's hf/
        path, is_run = path.parent, True
    if is_run:
        if out is not None:
            raise UserError(
                f"--out is for an export or a checkpoint; a run folder's export goes to {path / GPT2_EXPORT}"
            )
        return export_run(path)
    is_export = (path / "config.json").is_file()
    if is_export:
        default = path.with_name(f"{path.name}-gpt2")
    elif (path / CHECKPOINT_WEIGHTS).is_file():
        default = path.parent.parent / f"{GPT2_EXPORT}-{path.name}"
    else:
        raise UserError(
            f"{path} is not a run folder (config.yaml), an export (config.json) or a checkpoint ({CHECKPOINT_WEIGHTS})"
        )
    out = Path(out) if out is not None else default
    if out.resolve() == path.resolve():
        raise UserError(f"--out {out} is the source folder itself; choose another folder")
    # Only a folder that is absent, empty, or an official-layout export of ours is replaced: never a
    # user's folder, a run folder, or one that holds the source.
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and read_record(out, "gpt2") is None:
        raise UserError(f"--out {out} exists and is not an hf-gpt2 export; choose a new or empty folder")
    check_writable(out.parent, f"the export {out.name}/ (--out FOLDER writes it elsewhere)")  # before any loading
    if is_export:
        record = read_record(path, "scratch")
        source = Source(load_export(path), record["step"] if record else None, None)
    else:
        run = path.parent.parent
        source = Source(load_checkpoint_weights(path, run_config(run)), step_of(path), run)
    return [export_one(source, out)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gpt2_scratch.export_gpt2",
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
    run_command(main)
