"""One optimizer step of the trainer: gradient accumulation over k micro-batches is one batch k times larger."""

import copy

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from gpt2_scratch.training.config import TrainConfig
from gpt2_scratch.training.recipe import build_optimizer
from gpt2_scratch.training.step import train_step
from modeling_gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM


class ListLoader:
    """Hands out fixed (x, y) batches in order, like `ShardLoader.next_batch`."""

    def __init__(self, batches):
        self.batches = list(batches)

    def next_batch(self):
        return self.batches.pop(0)


def fresh_accelerator(accumulation_steps: int) -> Accelerator:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return Accelerator(cpu=True, gradient_accumulation_steps=accumulation_steps)


def one_step(base, inputs, targets, micro_batch: int, accumulation_steps: int):
    """Loss, grad norm, new parameters and the per-micro-step sync flags of one `train_step`."""
    accelerator = fresh_accelerator(accumulation_steps)
    model = copy.deepcopy(base)
    optimizer = build_optimizer(model, TrainConfig(max_lr=1e-3, warmup_steps=0), torch.device("cpu"))
    model, optimizer = accelerator.prepare(model, optimizer)
    synced = []
    model.register_forward_pre_hook(lambda module, args: synced.append(accelerator.sync_gradients))
    rows = range(0, len(inputs), micro_batch)
    loader = ListLoader((inputs[i : i + micro_batch], targets[i : i + micro_batch]) for i in rows)
    loss, grad_norm, _, _ = train_step(model, optimizer, loader, accelerator, grad_clip=1.0)
    assert not loader.batches, "train_step must consume exactly gradient_accumulation_steps micro-batches"
    return loss, grad_norm, [p.detach().clone() for p in model.parameters()], synced


@pytest.mark.parametrize("k", [2, 4])
def test_accumulation_equals_one_big_batch(k):
    torch.manual_seed(0)
    base = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("cpu-nano"))
    tokens = torch.randint(0, 50257, (8, 33))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    loss_k, norm_k, params_k, synced_k = one_step(base, inputs, targets, micro_batch=8 // k, accumulation_steps=k)
    loss_1, norm_1, params_1, synced_1 = one_step(base, inputs, targets, micro_batch=8, accumulation_steps=1)

    # The reference: plain PyTorch on the whole batch, no Accelerate.
    reference = copy.deepcopy(base)
    expected_loss = reference(input_ids=inputs, shift_labels=targets).loss
    expected_loss.backward()
    expected_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters()]))

    assert loss_k == pytest.approx(expected_loss.item(), rel=1e-6) and loss_1 == pytest.approx(loss_k, rel=1e-6)
    # The gradient norm is sensitive to the 1/k loss scaling (AdamW's update almost is not).
    assert norm_k == pytest.approx(expected_norm.item(), rel=1e-5) and norm_1 == pytest.approx(norm_k, rel=1e-5)
    # Adam's first step moves each weight by about lr * sign(grad) = 1e-3; agree to 0.1% of that.
    for a, b, before in zip(params_k, params_1, base.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.equal(a, before)
    # Gradients are synchronised (DDP all-reduce) only on the last micro-step.
    assert synced_k == [False] * (k - 1) + [True] and synced_1 == [True]
