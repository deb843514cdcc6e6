"""The performance paths against the plain ones: same loss, same gradients, same optimizer steps."""

import pytest
import torch
import torch.nn.functional as F

from modeling_gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM, linear_cross_entropy

VOCAB, PADDED, WIDTH = 100, 128, 16


def close(found: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-7, msg=msg)


def plain_cross_entropy(hidden, weight, targets):
    """The reference: full logits, sliced to the real vocabulary, then PyTorch's cross-entropy."""
    logits = F.linear(hidden, weight)[:, :VOCAB]
    return F.cross_entropy(logits, targets, ignore_index=-100)


def loss_and_grads(fn, hidden, weight, targets):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(hidden, weight, targets)
    (3.0 * loss).backward()  # a non-unit upstream gradient, as under a loss scale
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("num_chunks", [1, 3, 8, 64])
def test_linear_cross_entropy_matches_plain_path(num_chunks):
    """Loss and both gradients, with ignored tokens, chunk counts that do not divide the rows, and
    more chunks than rows."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, WIDTH, generator=g)
    weight = torch.randn(PADDED, WIDTH, generator=g) * 0.5
    targets = torch.randint(0, VOCAB, (37,), generator=g)
    targets[::4] = -100

    def fused(h, w, t):
        return linear_cross_entropy(h, w, t, VOCAB, num_chunks)

    expected = loss_and_grads(plain_cross_entropy, hidden, weight, targets)
    found = loss_and_grads(fused, hidden, weight, targets)
    for name, a, b in zip(("loss", "grad hidden", "grad weight"), found, expected, strict=True):
        close(a, b, msg=name)
    assert torch.count_nonzero(found[2][VOCAB:]) == 0  # the padding rows never learn


def test_linear_cross_entropy_with_every_token_ignored_is_nan_like_pytorch():
    hidden, weight = torch.randn(4, WIDTH), torch.randn(PADDED, WIDTH)
    targets = torch.full((4,), -100)
    assert torch.isnan(plain_cross_entropy(hidden, weight, targets))
    assert torch.isnan(linear_cross_entropy(hidden, weight, targets, VOCAB))


def tiny_model() -> GPT2ScratchForCausalLM:
    torch.manual_seed(0)
    config = GPT2ScratchConfig.from_preset("cpu-nano", vocab_size=VOCAB, bos_token_id=None, eos_token_id=None)
    return GPT2ScratchForCausalLM(config)


def batch():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, VOCAB, (3, 20), generator=g), torch.randint(0, VOCAB, (3, 20), generator=g)
    y[0, :7] = -100
    return x, y


def model_loss_and_grads(model, x, y, loss_only):
    model.zero_grad()
    out = model(input_ids=x, shift_labels=y, loss_only=loss_only)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters()}


def test_training_forward_matches_plain_loss_and_gradients():
    """The trainer's call, `model(input_ids=x, shift_labels=y, loss_only=True)`, takes the chunked path;
    without `loss_only` the same call takes the plain one (dropout is 0, so both compute the same function)."""
    model, (x, y) = tiny_model().train(), batch()
    fast, fast_grads = model_loss_and_grads(model, x, y, loss_only=True)
    plain, plain_grads = model_loss_and_grads(model, x, y, loss_only=False)
    assert fast.logits is None and plain.logits.shape == (3, 20, VOCAB)
    close(fast.loss, plain.loss, msg="loss")
    for name, grad in plain_grads.items():
        close(fast_grads[name], grad, msg=name)


def test_logits_are_returned_whenever_asked_for():
    """Only `loss_only=True` skips the logits; it needs targets."""
    model, (x, y) = tiny_model().train(), batch()
    assert model(x, labels=x).logits.shape == (3, 20, VOCAB)
    assert model(x, shift_labels=y).logits.shape == (3, 20, VOCAB)
    with torch.no_grad():
        assert model(x, shift_labels=y).logits.shape == (3, 20, VOCAB)
    assert model(x).logits.shape == (3, 20, VOCAB)
    with pytest.raises(ValueError, match="loss_only=True needs labels"):
        model(x, loss_only=True)


def test_training_forward_under_bf16_autocast():
    """bf16 matmuls, fp32 loss and gradients; close to the plain path at bf16 precision."""
    model, (x, y) = tiny_model(), batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast, fast_grads = model_loss_and_grads(model.train(), x, y, loss_only=True)
        plain, plain_grads = model_loss_and_grads(model.train(), x, y, loss_only=False)
    assert fast.loss.dtype == torch.float32
    torch.testing.assert_close(fast.loss, plain.loss, rtol=2e-2, atol=0)
    for name in plain_grads:
        assert fast_grads[name].dtype == torch.float32 and torch.isfinite(fast_grads[name]).all(), name
    head = "transformer.wte.weight"
    cosine = F.cosine_similarity(fast_grads[head].flatten(), plain_grads[head].flatten(), dim=0)
    assert cosine > 0.99
