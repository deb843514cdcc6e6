"""Conversions between this model and other GPT-2 layouts: transformers' `GPT2LMHeadModel` (the
official checkpoints), raw state dicts of our own model (compiled or DDP-wrapped), and nanoGPT /
build-nanogpt checkpoints.

Dependencies point one way: this module imports the model, never the reverse. `modeling_gpt2_scratch.py`
keeps only what loading and running the model needs (it is shipped alone as remote code, and transformers
refuses a remote file that imports anything its machine lacks), so the conversions are functions here:

    from gpt2_scratch.conversion import from_gpt2, from_nanogpt, from_state_dict, to_gpt2

    model = from_gpt2("openai-community/gpt2")   # a Hub id or a GPT2LMHeadModel folder
    official = to_gpt2(model)                    # back to a transformers.GPT2LMHeadModel
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gpt2_scratch.user_errors import UserError
from modeling_gpt2_scratch import (
    GELU_APPROXIMATION,
    GPT2_VOCAB_SIZE,
    GPT2ScratchConfig,
    GPT2ScratchForCausalLM,
    padded_rows,
)

# The config fields that mean the same in GPT-2's config and ours, in both directions. Dropout is the
# one field with different names: ours is one probability, GPT-2 has three (see `gpt2_config`).
SHARED_CONFIG_FIELDS = (
    "vocab_size",
    "n_positions",
    "n_embd",
    "n_layer",
    "n_head",
    "layer_norm_epsilon",
    "initializer_range",
    "activation_function",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
# nanoGPT's default vocabulary: GPT-2's padded to a multiple of 64, as ours is.
NANOGPT_PADDED_VOCAB_SIZE = 50304

# The weights GPT-2 keeps in Conv1D layout (in, out).
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Causal-mask buffers that old GPT-2 and nanoGPT checkpoints save; not weights.
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
# What torch.compile (`OptimizedModule`) and DDP / DataParallel put before every state-dict key.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` with the key prefixes of torch.compile and DDP removed, in any order and number
    (`module._orig_mod.transformer...` -> `transformer...`). Every loader of raw state dicts uses this."""
    stripped = {}
    for key, tensor in state_dict.items():
        name = key
        while name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        if name in stripped:
            raise ValueError(f"state dict has both {key!r} and another key that is also {name!r} without prefixes")
        stripped[name] = tensor
    return stripped


def from_state_dict(config: GPT2ScratchConfig, state: dict[str, torch.Tensor]) -> GPT2ScratchForCausalLM:
    """A model with exactly the weights of `state`, a state dict in this model's layout (nn.Linear
    weights) whose token embedding and head may lack the vocabulary padding rows; with a tied config
    `lm_head.weight` is taken from `transformer.wte.weight`, an untied one needs its own. Keys may carry
    torch.compile / DDP prefixes (saved from a wrapped model). The model takes the embedding's dtype."""
    state = strip_wrapper_prefixes(state)
    tied = config.tie_word_embeddings
    needed = ["transformer.wte.weight"] + ([] if tied else ["lm_head.weight"])
    if any(key not in state for key in needed):
        raise ValueError(f"state dict lacks one of {needed}; found keys {sorted(state)[:8]}")
    wte = state["transformer.wte.weight"] = padded_rows(state["transformer.wte.weight"], config.padded_vocab_size)
    state["lm_head.weight"] = wte if tied else padded_rows(state["lm_head.weight"], config.padded_vocab_size)
    model = GPT2ScratchForCausalLM(config).to(wte.dtype)
    model.load_state_dict(state, strict=True)
    model.tie_weights()
    return model


def from_gpt2(name_or_path: str | Path, **kwargs) -> GPT2ScratchForCausalLM:
    """Load an official-format GPT-2 checkpoint into our class: a Hub id (`openai-community/gpt2`,
    `gpt2-xl`) or a folder written by `transformers.GPT2LMHeadModel.save_pretrained`; `kwargs` go to
    its `from_pretrained`."""
    from transformers import GPT2LMHeadModel

    return from_gpt2_model(GPT2LMHeadModel.from_pretrained(name_or_path, **kwargs))


def from_gpt2_model(official: nn.Module) -> GPT2ScratchForCausalLM:
    """Copy the weights of a `transformers.GPT2LMHeadModel` into a new model of our class."""
    state = {}
    for key, tensor in official.state_dict().items():
        if key.endswith(MASK_BUFFERS):
            continue
        # GPT-2's Conv1D stores weights as (in, out); nn.Linear wants (out, in).
        state[key] = tensor.t() if key.endswith(CONV1D_WEIGHTS) else tensor
    return from_state_dict(scratch_config_from_gpt2(official.config), state)


def gpt2_config(config: GPT2ScratchConfig):
    """The `transformers.GPT2Config` of the same architecture. Every config ours accepts has one: the
    same blocks, either GELU (transformers' `gelu_new` and `gelu` are ours), tied or untied embeddings.
    It carries `n_ctx` (= `n_positions`) as the official GPT-2 configs do: transformers ignores it, but
    tools that read config.json (llama.cpp's `convert_hf_to_gguf.py`) require it."""
    from transformers import GPT2Config

    shared = {name: getattr(config, name) for name in SHARED_CONFIG_FIELDS}
    dropout = {name: config.dropout for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    return GPT2Config(**shared, **dropout, n_ctx=config.n_positions, tie_word_embeddings=config.tie_word_embeddings)


def gpt2_layout(state: dict[str, torch.Tensor], config: GPT2ScratchConfig) -> dict[str, torch.Tensor]:
    """A state dict of our model (wrapper prefixes allowed, `lm_head.weight` optional when tied) in
    GPT-2's layout: Conv1D weights transposed, the vocabulary padding rows dropped, `lm_head.weight`
    the same tensor as `transformer.wte.weight` when the config ties them. Fresh contiguous tensors."""
    vocab_size = config.vocab_size
    out = {}
    for key, tensor in strip_wrapper_prefixes(state).items():
        tensor = tensor.detach()
        out[key] = tensor.t().contiguous() if key.endswith(CONV1D_WEIGHTS) else tensor.clone()
    if "transformer.wte.weight" not in out or ("lm_head.weight" not in out and not config.tie_word_embeddings):
        raise ValueError(
            f"state dict lacks transformer.wte.weight or an untied lm_head.weight; found {sorted(out)[:8]}"
        )
    out["transformer.wte.weight"] = out["transformer.wte.weight"][:vocab_size].clone()
    tied = config.tie_word_embeddings
    out["lm_head.weight"] = out["transformer.wte.weight"] if tied else out["lm_head.weight"][:vocab_size].clone()
    return out


def gpt2_state_dict(model: GPT2ScratchForCausalLM) -> dict[str, torch.Tensor]:
    """Our model's weights in GPT-2's layout (see `gpt2_layout`)."""
    return gpt2_layout(model.state_dict(), model.config)


def gpt2_model(config: GPT2ScratchConfig, state: dict[str, torch.Tensor]) -> nn.Module:
    """A `transformers.GPT2LMHeadModel` that holds the tensors of `state` (GPT-2's layout, from
    `gpt2_layout`) themselves: built on the meta device and assigned, so no second copy of the
    weights is made; device and dtype are the tensors'."""
    from transformers import GPT2LMHeadModel

    with torch.device("meta"):
        official = GPT2LMHeadModel(gpt2_config(config))
    official.load_state_dict(state, strict=True, assign=True)
    official.tie_weights()
    return official


def to_gpt2(model: GPT2ScratchForCausalLM) -> nn.Module:
    """An equivalent `transformers.GPT2LMHeadModel` (the padding rows of the vocabulary dropped), in the
    same train / eval mode as `model`."""
    return gpt2_model(model.config, gpt2_state_dict(model)).train(model.training)


def scratch_config_from_gpt2(official) -> GPT2ScratchConfig:
    """Our config for a `transformers.GPT2Config`, refusing GPT-2 variants this model does not implement."""
    unsupported = {
        "activation_function": (official.activation_function, tuple(GELU_APPROXIMATION)),
        "scale_attn_weights": (official.scale_attn_weights, True),
        "scale_attn_by_inverse_layer_idx": (official.scale_attn_by_inverse_layer_idx, False),
        "reorder_and_upcast_attn": (official.reorder_and_upcast_attn, False),
        "add_cross_attention": (official.add_cross_attention, False),
        "n_inner": (official.n_inner, None),
    }
    for key, (found, expected) in unsupported.items():
        supported = found in expected if isinstance(expected, tuple) else found == expected
        if not supported and not (key == "n_inner" and found == 4 * official.n_embd):
            raise ValueError(f"GPT-2 config has {key}={found!r}; GPT2ScratchForCausalLM supports only {expected!r}")
    shared = {name: getattr(official, name) for name in SHARED_CONFIG_FIELDS}
    return GPT2ScratchConfig(**shared, tie_word_embeddings=official.tie_word_embeddings)


class NanoGPTCheckpointError(UserError):
    """A file is not a nanoGPT / build-nanogpt checkpoint that this model can load."""


NANOGPT_EXPECTED = (
    "expected a nanoGPT ckpt.pt or build-nanogpt model_XXXXX.pt: a torch.save file holding a dict with the "
    "state dict under 'model' and the config under 'model_args' (a dict) or 'config' (a GPTConfig)"
)
NANOGPT_CONFIG_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")


class PickledGPTConfig:
    """Stands in for the `GPTConfig` dataclass that build-nanogpt pickles by reference (as
    `__main__.GPTConfig`): the unpickler makes an instance of this inert class and sets its fields, so
    no code from the script that wrote the checkpoint is imported or run."""


def load_nanogpt_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict in `path`, read with `torch.load(weights_only=True)` onto the CPU.

    Only tensors, plain Python values and a class named `GPTConfig` (read into `PickledGPTConfig`) are
    allowed; any other pickled global is refused before anything is unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise NanoGPTCheckpointError(f"no checkpoint file at {path}; {NANOGPT_EXPECTED}")
    try:
        foreign = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        foreign = []  # not a zip checkpoint (legacy format or not one at all): torch.load below decides
    refused = sorted(name for name in foreign if name.rsplit(".", 1)[-1] != "GPTConfig")
    if refused:
        raise NanoGPTCheckpointError(
            f"{path} pickles {', '.join(refused)}, which could run code when loaded, so it is not read; "
            f"{NANOGPT_EXPECTED}"
        )
    try:
        with torch.serialization.safe_globals([(PickledGPTConfig, name) for name in foreign]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise NanoGPTCheckpointError(
            f"{path} is not a readable torch checkpoint ({reason}); {NANOGPT_EXPECTED}"
        ) from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        found = (
            f"a dict with keys {sorted(map(str, checkpoint))}"
            if isinstance(checkpoint, dict)
            else type(checkpoint).__name__
        )
        raise NanoGPTCheckpointError(f"{path} holds {found}; {NANOGPT_EXPECTED}")
    return checkpoint


def nanogpt_model_args(checkpoint: dict, path: str | Path) -> dict:
    """The model's config fields: nanoGPT's `model_args`, else build-nanogpt's `config` (a GPTConfig)."""
    args = checkpoint.get("model_args", checkpoint.get("config"))
    args = vars(args) if isinstance(args, PickledGPTConfig) else args
    if not isinstance(args, dict) or not all(key in args for key in NANOGPT_CONFIG_FIELDS):
        found = f"fields {sorted(args)}" if isinstance(args, dict) else f"a {type(args).__name__}"
        raise NanoGPTCheckpointError(
            f"{path} has no model config with {', '.join(NANOGPT_CONFIG_FIELDS)} (found {found}); {NANOGPT_EXPECTED}"
        )
    wrong = {key: args[key] for key in NANOGPT_CONFIG_FIELDS if type(args[key]) is not int or args[key] < 1}
    dropout = args.get("dropout", 0.0)
    if type(dropout) not in (int, float) or not 0 <= dropout < 1:
        wrong["dropout"] = dropout
    if type(args.get("bias", True)) is not bool:
        wrong["bias"] = args["bias"]
    if wrong:
        raise NanoGPTCheckpointError(
            f"{path}: model config {wrong} out of range; the sizes must be integers >= 1, dropout a number in "
            "[0, 1) and bias true or false"
        )
    if args["n_embd"] % args["n_head"]:
        raise NanoGPTCheckpointError(f"{path}: n_embd ({args['n_embd']}) is not divisible by n_head ({args['n_head']})")
    return args


def nanogpt_state_dict(
    raw: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    config: GPT2ScratchConfig,
    biases: bool,
    path: str | Path,
) -> dict[str, torch.Tensor]:
    """A nanoGPT state dict in our layout, checked key by key and shape by shape against `expected`.

    nanoGPT already uses our names and `nn.Linear` layout, so this only strips wrapper prefixes, drops
    mask buffers, refuses an untied `lm_head`, and fills the biases of a `bias=False` model with zeros
    (nanoGPT's LayerNorm and Linear without bias compute exactly what ours do with a zero bias).
    """
    state = {k: v for k, v in strip_wrapper_prefixes(raw).items() if not k.endswith(MASK_BUFFERS)}
    wte, lm_head = state.get("transformer.wte.weight"), state.pop("lm_head.weight", None)
    if wte is not None and lm_head is not None and not torch.equal(wte, lm_head):
        raise NanoGPTCheckpointError(
            f"{path}: lm_head.weight differs from transformer.wte.weight; this model ties them (as nanoGPT does)"
        )
    if not biases:
        dtype = wte.dtype if wte is not None else torch.float32
        zeros = {name: torch.zeros(t.shape, dtype=dtype) for name, t in expected.items() if name.endswith(".bias")}
        state = {**zeros, **state}
    missing = sorted(set(expected) - set(state) - {"lm_head.weight"})
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise NanoGPTCheckpointError(
            f"{path}: the state dict under 'model' does not match its config ({config.n_layer} layers, bias={biases}):"
            f" missing {missing[:4]}{' ...' if len(missing) > 4 else ''},"
            f" unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}"
        )
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise NanoGPTCheckpointError(f"{path}: {name} is a {type(tensor).__name__}, not a tensor")
        want = tuple(expected[name].shape)
        if name == "transformer.wte.weight":
            # The rows may be the padded or the real vocabulary; from_state_dict pads them.
            fits = config.vocab_size <= tensor.shape[0] <= want[0] and tensor.shape[1] == want[1]
            want = f"({config.vocab_size} to {want[0]}, {want[1]})"
        else:
            fits = tuple(tensor.shape) == want
        if not fits:
            raise NanoGPTCheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)}; its config implies {want}")
    return state


def from_nanogpt(
    path: str | Path, vocab_size: int | None = None, activation_function: str | None = None
) -> GPT2ScratchForCausalLM:
    """Load a nanoGPT `ckpt.pt` or build-nanogpt `model_XXXXX.pt` checkpoint, in eval mode.

    The file is read with `torch.load(weights_only=True)`: no code in it runs (see
    `load_nanogpt_checkpoint`). `_orig_mod.` / `module.` key prefixes are stripped, old `attn.bias`
    mask buffers dropped, and the biases of a `bias=False` model loaded as zeros, which gives the
    same logits. A vocabulary of 50,304 is GPT-2's 50,257 padded (nanoGPT's default), so the model
    returns the first 50,257 logits; pass `vocab_size` to say otherwise. nanoGPT's MLP uses the
    exact GELU and build-nanogpt's the tanh one; the checkpoint's config tells them apart (only
    nanoGPT's has `bias`), and `activation_function` ("gelu" or "gelu_new") overrides that.
    """
    checkpoint = load_nanogpt_checkpoint(path)
    args = nanogpt_model_args(checkpoint, path)
    padded = args["vocab_size"] == NANOGPT_PADDED_VOCAB_SIZE
    config = GPT2ScratchConfig(
        vocab_size=vocab_size or (GPT2_VOCAB_SIZE if padded else args["vocab_size"]),
        n_positions=args["block_size"],
        n_embd=args["n_embd"],
        n_layer=args["n_layer"],
        n_head=args["n_head"],
        dropout=args.get("dropout", 0.0),
        activation_function=activation_function or ("gelu" if "bias" in args else "gelu_new"),
    )
    with torch.device("meta"):
        expected = GPT2ScratchForCausalLM(config).state_dict()  # names and shapes only, no memory
    state = nanogpt_state_dict(checkpoint["model"], expected, config, biases=args.get("bias", True), path=path)
    return from_state_dict(config, state).eval()
