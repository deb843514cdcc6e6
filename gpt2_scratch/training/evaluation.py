"""What the trainer's evaluation needs besides the validation loss: the HellaSwag examples, read once
before training, and the text samples drawn at every evaluation."""

from __future__ import annotations

import logging

import torch
from accelerate import Accelerator

from gpt2_scratch.training.config import TrainConfig

logger = logging.getLogger("train")


def load_hellaswag(config: TrainConfig, accelerator: Accelerator) -> list[dict] | None:
    """The HellaSwag examples to score at each evaluation, or None (with one log line) when unavailable.

    'auto' reads eval's cached copy (fetched when online, the main process first); a missing explicit
    path is an error, found here before training starts.
    """
    if config.hellaswag_path == "none":
        logger.info("HellaSwag: off (hellaswag_path=none)")
        return None
    from eval.hellaswag import HellaSwagDataError, load_examples

    path = None if config.hellaswag_path == "auto" else config.hellaswag_path
    examples, error = None, None
    with accelerator.main_process_first():
        try:
            examples = load_examples(path, limit=config.hellaswag_limit)
        except HellaSwagDataError as err:
            error = err
    if error is not None and path is not None:
        raise error
    if error is not None:
        logger.info("HellaSwag: skipped, no data (%s)", error)
    return examples


def generate_samples(model, config: TrainConfig, device: torch.device) -> list[str]:
    """`num_samples` top-k 50 continuations of `sample_prompt`, drawn under a fixed seed in a forked RNG so
    that the training RNG (dropout) is the same whether or not samples were drawn. All ranks generate, so
    sharded (FSDP) models work; the texts are the same everywhere."""
    from data_prep.tokenizer import EOT_ID, get_encoding
    from eval.common import inference

    c, encoding = config, get_encoding()
    ids = encoding.encode(c.sample_prompt, allowed_special={"<|endoftext|>"})  # the separator may start a prompt
    prompt = torch.tensor([ids] * c.num_samples, device=device)
    devices = [device] if device.type in ("cuda", "mps") else []
    with torch.random.fork_rng(devices=devices, device_type=device.type), inference(model):
        torch.manual_seed(c.seed)
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=True,
            top_k=50,
            max_new_tokens=c.sample_tokens,
            pad_token_id=EOT_ID,
        )
    texts = []
    for row in out.tolist():
        new = row[prompt.shape[1] :]
        end = new.index(EOT_ID) if EOT_ID in new else len(new)  # a document ended: drop the padding after it
        texts.append(encoding.decode(row[: prompt.shape[1]] + new[:end]))
    return texts
