"""The Hugging Face exports of a run, side by side in its out_dir:

- `hf/`: our class, `save_pretrained` with `modeling_gpt2_scratch.py` as remote code; loads with
  `trust_remote_code=True`, or anywhere this project is imported.
- `hf-gpt2/`: the official layout, a `GPT2LMHeadModel` (`model_type: gpt2`, no code, the vocabulary's
  padding rows dropped); loads with stock transformers and the tools that serve or convert GPT-2.

Each folder is written under a temporary name and renamed into place, and records the step it holds
in `export.json`, so a kill mid-export leaves the previous folder or none, never a partial one, and
`exported_step` tells a complete pair of the same step from a missing, partial or stale one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import DistributedType

from gpt2_scratch.conversion import gpt2_layout, gpt2_model
from gpt2_scratch.training.files import read_regular, replace_text, share_as_umask, writing
from gpt2_scratch.training.processes import on_main_process

SCRATCH_EXPORT = "hf"
GPT2_EXPORT = "hf-gpt2"
RECORD = "export.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
PLOTS = ("loss.png", "hellaswag.png")


def export_model(accelerator: Accelerator, model, out_dir: Path, step: int) -> None:
    """Write `out_dir/hf` and, when GPT-2 can express the model, `out_dir/hf-gpt2`, both holding
    `step`. Call on every rank: under FSDP gathering the full weights is a collective."""
    acc = accelerator
    state_dict = acc.get_state_dict(model) if acc.distributed_type == DistributedType.FSDP else None
    unwrapped = acc.unwrap_model(model, keep_torch_compile=False)
    # the main process writes; its error (a full disk) reaches every rank, so that none waits for it forever
    on_main_process(acc, lambda: write_exports(unwrapped, Path(out_dir), step, state_dict))


def write_exports(model, out_dir: Path, step: int, state_dict: dict | None = None) -> list[Path]:
    """The main-process part of `export_model`: both folders from `model` (or from `state_dict`, its
    gathered weights). Returns the folders written."""
    scratch, gpt2 = out_dir / SCRATCH_EXPORT, out_dir / GPT2_EXPORT
    for folder in (scratch, gpt2):  # out_dir is a run folder, locked by the trainer or export_gpt2
        remove_leftovers(folder)
    write_scratch_export(model, scratch, step, state_dict)
    write_gpt2_export(model.config, model.state_dict() if state_dict is None else state_dict, gpt2, step)
    return [scratch, gpt2]


def write_scratch_export(model, folder: Path, step: int | None, state_dict: dict | None = None) -> None:
    """`save_pretrained` of our model (with its remote-code file) and the tokenizer into `folder`."""
    from data_prep.tokenizer import save_hf_tokenizer

    if state_dict is not None:  # gathered FSDP weights: a copy (transformers 5's save_pretrained pops every
        # tensor it writes out of the dict it is given) without the tied lm_head, which the gathered dict
        # holds as a tensor of its own, so save_pretrained would write the embedding twice
        tied = set(model._tied_weights_keys) if model.config.tie_word_embeddings else set()
        state_dict = {name: tensor for name, tensor in state_dict.items() if name not in tied}

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, state_dict=state_dict)
        save_hf_tokenizer(tmp, model_max_length=model.config.n_positions)
        write_record(tmp, step, "scratch")

    write_folder(folder, write)


def write_gpt2_export(config, state_dict: dict, folder: Path, step: int | None) -> None:
    """The official layout of our weights (`state_dict`, our layout, of a model with `config`) into
    `folder`: `GPT2LMHeadModel.save_pretrained` (config with `model_type: gpt2` and `n_ctx`, safetensors
    without the vocabulary's padding rows) and the tokenizer, limited to the model's `n_positions`."""
    from data_prep.tokenizer import save_hf_tokenizer

    def write(tmp: Path) -> None:
        gpt2_model(config, gpt2_layout(state_dict, config)).save_pretrained(tmp)
        save_hf_tokenizer(tmp, model_max_length=config.n_positions)
        write_record(tmp, step, "gpt2")

    write_folder(folder, write)


def write_folder(folder: Path, write: Callable[[Path], None]) -> None:
    """Fill a new temporary folder `.tmp_<name>.XXXXXXXX` with `write`, then swap it in for `folder`: at
    any moment `folder` is the old complete one, absent, or the new complete one. The temporary names
    are unique and made here, so a folder of the user's (or another writer's) beside it is never
    touched; leftovers of a killed write are removed by `remove_leftovers` where the folder is ours."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = []
    with writing(folder.parent, f"{folder.name}/", partial):
        partial.append(Path(tempfile.mkdtemp(prefix=f".tmp_{folder.name}.", dir=folder.parent)))
        tmp = partial[0]
        write(tmp)
        share_as_umask(tmp)  # readable by whoever may read the user's other files, not by this uid alone
    if folder.exists():
        old = Path(tempfile.mkdtemp(prefix=f".old_{folder.name}.", dir=folder.parent))
        os.replace(folder, old / folder.name)
        os.replace(tmp, folder)
        shutil.rmtree(old)
    else:
        os.replace(tmp, folder)


def remove_leftovers(folder: Path) -> None:
    """Remove what a killed `write_folder` left beside `folder`: only names it makes (`.tmp_<name>.` or
    `.old_<name>.` and mkdtemp's 8 characters), and only in a run folder this process holds the lock of."""
    folder = Path(folder)
    pattern = re.compile(rf"\.(tmp|old)_{re.escape(folder.name)}\.[a-z0-9_]{{8}}")
    for path in folder.parent.glob(f".*_{folder.name}.*"):
        if pattern.fullmatch(path.name) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)


def write_text(path: Path, text: str) -> None:
    """`path` with `text`, through a temporary file, so a reader never sees half of it."""
    replace_text(path, text)


def write_record(folder: Path, step: int | None, layout: str, **extra) -> None:
    write_text(folder / RECORD, json.dumps({"step": step, "layout": layout, **extra}, indent=2) + "\n")


def read_record(folder: Path, layout: str) -> dict | None:
    """The export record of `folder` when it is a complete export of `layout` ("scratch" or "gpt2"),
    else None (missing, unreadable, another layout, or the config or weights are gone)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file() or not any((folder / name).is_file() for name in WEIGHT_FILES):
        return None
    try:
        record = json.loads(read_regular(folder / RECORD, 1_000_000))  # a FIFO there is refused, not waited on
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or record.get("layout") != layout or type(record.get("step")) is not int:
        return None
    return record


def exported_step(out_dir: Path) -> int | None:
    """The step that `hf/` and `hf-gpt2/` both hold; None when either is missing or incomplete, or when
    they hold different steps."""
    out_dir = Path(out_dir)
    scratch = read_record(out_dir / SCRATCH_EXPORT, "scratch")
    if scratch is None:
        return None
    gpt2 = read_record(out_dir / GPT2_EXPORT, "gpt2")
    return scratch["step"] if gpt2 is not None and gpt2["step"] == scratch["step"] else None
