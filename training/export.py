"""The Hugging Face export of a run's weights: `out_dir/hf`, loadable with `from_pretrained`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import DistributedType


def export_hf(accelerator: Accelerator, model, folder: Path) -> None:
    """`save_pretrained` of the model (with its remote-code file) and the tokenizer into `folder`."""
    from data_prep.tokenizer import save_hf_tokenizer

    acc = accelerator
    # Under FSDP the full weights must be gathered (a collective); elsewhere the model's own state is used.
    state_dict = acc.get_state_dict(model) if acc.distributed_type == DistributedType.FSDP else None
    if acc.is_main_process:
        tmp = folder.with_name(f".tmp_{folder.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        acc.unwrap_model(model, keep_torch_compile=False).save_pretrained(tmp, state_dict=state_dict)
        save_hf_tokenizer(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    acc.wait_for_everyone()
