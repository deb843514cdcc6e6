"""Turn a nanoGPT or build-nanogpt checkpoint into a Hugging Face model folder.

    python -m gpt2_scratch.convert_nanogpt out/ckpt.pt runs/nanogpt-hf
    python -m gpt2_scratch.convert_nanogpt log/model_19072.pt runs/build-nanogpt-hf

The folder holds `config.json`, `model.safetensors`, `modeling_gpt2_scratch.py` and, for GPT-2's
vocabulary, the GPT-2 tokenizer, so that `AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)` and `AutoTokenizer.from_pretrained(folder)` load it anywhere. The checkpoint
is read with `torch.load(weights_only=True)`: no code stored in it runs.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from gpt2_scratch.conversion import from_nanogpt
from gpt2_scratch.training.files import share_as_umask
from gpt2_scratch.user_errors import UserError, run_command
from modeling_gpt2_scratch import GELU_APPROXIMATION, GPT2_VOCAB_SIZE, GPT2ScratchForCausalLM


def convert(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    vocab_size: int | None = None,
    activation_function: str | None = None,
) -> GPT2ScratchForCausalLM:
    """Load `checkpoint` with `conversion.from_nanogpt`, save it (and the GPT-2 tokenizer
    when the vocabulary is GPT-2's) into `out_dir`, and return the model."""
    from data_prep.tokenizer import save_hf_tokenizer

    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise UserError(f"{out_dir} is a file; give a folder to write the Hugging Face model into")
    model = from_nanogpt(checkpoint, vocab_size, activation_function)
    model.save_pretrained(out_dir)
    if model.config.vocab_size == GPT2_VOCAB_SIZE:
        save_hf_tokenizer(out_dir, model_max_length=model.config.n_positions)
    for weights in Path(out_dir).glob("model*.safetensors"):  # written 0600 by safetensors
        share_as_umask(weights)
    return model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gpt2_scratch.convert_nanogpt",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("checkpoint", help="nanoGPT ckpt.pt or build-nanogpt model_XXXXX.pt")
    parser.add_argument("out_dir", help="folder to write the Hugging Face model (and tokenizer) into")
    parser.add_argument(
        "--vocab_size",
        type=int,
        default=None,
        help="real vocabulary size, when not the checkpoint's (default: the checkpoint's, with 50304 read as "
        "GPT-2's 50257 padded; the GPT-2 tokenizer is saved only for 50257)",
    )
    parser.add_argument(
        "--activation_function",
        choices=sorted(GELU_APPROXIMATION),
        default=None,
        help="MLP activation: gelu (exact, nanoGPT's nn.GELU()) or gelu_new (tanh, build-nanogpt's) "
        "(default: gelu when the checkpoint's config has nanoGPT's `bias` field, else gelu_new)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model = convert(args.checkpoint, args.out_dir, args.vocab_size, args.activation_function)
    c = model.config
    tokenizer = "with the GPT-2 tokenizer" if c.vocab_size == GPT2_VOCAB_SIZE else "without a tokenizer"
    print(
        f"wrote {Path(args.out_dir)} {tokenizer}: {c.n_layer} layers, {c.n_head} heads, width {c.n_embd}, "
        f"context {c.n_positions}, vocab {c.vocab_size}, {c.activation_function}, "
        f"{model.num_parameters():,} parameters"
    )


if __name__ == "__main__":
    run_command(main)
