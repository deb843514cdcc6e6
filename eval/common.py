"""What every evaluation shares: loading a checkpoint, picking the device, running in eval mode."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from gpt2_scratch.training.devices import inference_dtype, parse_device, pick_device
from gpt2_scratch.training.files import check_writable, replace_text
from gpt2_scratch.user_errors import UserError


def resolve_device(
    accelerator=None, device: str | torch.device | None = None, model: nn.Module | None = None
) -> torch.device:
    """The accelerator's device, else `device`, else where `model` lives, else the trainer's choice
    (`gpt2_scratch.training.devices.pick_device`: CUDA, else Apple silicon's MPS, else the CPU)."""
    if accelerator is not None:
        return accelerator.device
    if device is not None:
        return parse_device(device)
    if model is not None:
        return next(model.parameters()).device
    return pick_device()


def check_out_file(path: str | None) -> None:
    """`--out`, checked before any evaluation: a file path (its folder is made), never a folder."""
    if path is not None and Path(path).is_dir():
        raise UserError(f"--out {path} is a folder; give the path of the JSON file to write")
    if path is not None:  # a read-only or full folder: said now, not after the evaluation has run
        check_writable(Path(path).parent, f"--out {Path(path).name}")


def write_out_file(path: str | os.PathLike, report: dict) -> None:
    """`report` as JSON in `path` (its folder made), replaced whole: a full disk leaves no cut file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    replace_text(Path(path), json.dumps(report, indent=2) + "\n")


def launched_accelerator():
    """An `Accelerator` when run under `accelerate launch` / torchrun (several processes), else None."""
    if "WORLD_SIZE" not in os.environ:
        return None
    from accelerate import Accelerator

    return Accelerator(cpu=pick_device().type == "cpu")


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast as `mixed_precision auto` trains on `device`
    (`gpt2_scratch.training.devices.inference_dtype`): bf16 on a GPU with bf16 units, fp16 on a CUDA GPU
    without (no loss scaling needed without a backward), none on the CPU, where bf16 is emulated on most
    CPUs and ~100x slower than fp32."""
    dtype = inference_dtype(device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@contextlib.contextmanager
def inference(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the duration, restoring train mode if it was on."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP / compile wrapper (for reading its config), or the model itself."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model accepts, from its config (ours and transformers' GPT-2 alike)."""
    return config_positions(getattr(unwrap(model), "config", None))


def config_positions(config) -> int | None:
    """The longest sequence a model of `config` accepts, or None when the config does not say."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied weights once), leaving out our model's vocabulary padding rows
    so that the count is comparable with the official GPT-2's (124,439,808 for the 124M)."""
    model = unwrap(model)
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    config = getattr(model, "config", None)
    padded = getattr(config, "padded_vocab_size", None)
    if padded is not None:
        total -= (padded - config.vocab_size) * config.n_embd
    return total


def hub_offline() -> bool:
    """Whether the user asked for no network (`HF_HUB_OFFLINE=1`, as the tests do)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub endpoint opens within `timeout` seconds."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def locate_model(name_or_path: str) -> tuple[str, bool, bool]:
    """Where `from_pretrained` should look for `name_or_path`, whether it is a local folder, and whether
    only local files may be used; a path that is not a saved model folder raises `UserError`."""
    path = Path(name_or_path).expanduser()
    # A Hub id is `name` or `owner/name`; anything else that is not an existing folder is a wrong path.
    looks_like_path = path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_like_path and not path.is_dir():
        raise UserError(f"no model folder at {path}: pass a folder written by save_pretrained, or a Hub id")
    if looks_like_path and not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json: it is not a saved model folder (save_pretrained writes one)")
    if looks_like_path:
        return str(path), True, True
    # Without network the Hub client retries for ~30 s before using its cache; ask the cache at once instead.
    return name_or_path, False, hub_offline() or not hub_reachable()


def load_error(name_or_path: str, folder: bool, local_only: bool, err: Exception) -> UserError:
    """The one-line error for a model or config that `from_pretrained` could not load."""
    if folder:
        hint = "the folder is not a complete save_pretrained folder (weights missing?)"
    elif local_only:
        hint = (
            f"{'HF_HUB_OFFLINE is set' if hub_offline() else 'the Hub is unreachable'} and it is not in the Hub "
            f"cache: download it where there is network (`hf download {name_or_path}`) or pass a local folder"
        )
    else:
        hint = "check the Hub id, or pass a local folder"
    return UserError(f"could not load model {name_or_path!r}: {hint}. ({err})")


def load_model_config(name_or_path: str):
    """The config of a model folder or Hub id (ours or official GPT-2), without loading its weights."""
    from transformers import AutoConfig

    import modeling_gpt2_scratch  # noqa: F401  (registers our config with the Auto classes)

    target, folder, local_only = locate_model(name_or_path)
    try:
        return AutoConfig.from_pretrained(target, local_files_only=local_only)
    except (OSError, ValueError) as err:
        raise load_error(name_or_path, folder, local_only, err) from err


def load_model(name_or_path: str, device: str | torch.device | None = None) -> nn.Module:
    """Load a causal LM in fp32, in eval mode: a local folder (ours or official GPT-2 format) or a Hub id.

    Offline (`HF_HUB_OFFLINE=1`) a Hub id works only if it is already in the Hub cache; otherwise this
    raises `UserError` at once, saying what to do.
    """
    from transformers import AutoModelForCausalLM

    import modeling_gpt2_scratch  # noqa: F401  (registers our model with the Auto classes)

    target, folder, local_only = locate_model(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32, local_files_only=local_only)
    except OSError as err:
        raise load_error(name_or_path, folder, local_only, err) from err
    return model.to(resolve_device(device=device)).eval()
