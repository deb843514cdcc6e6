"""gpt2_scratch/training/recipe.py: batch arithmetic, the LR schedule, AdamW's parameter groups, precision."""

import pytest
import torch

from gpt2_scratch.training.config import ConfigError, TrainConfig
from gpt2_scratch.training.recipe import (
    build_optimizer,
    grad_accum_steps,
    launcher_precision_note,
    lr_at,
    param_groups,
    resolve_mixed_precision,
)
from modeling_gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM


def test_batch_that_does_not_divide_over_processes_is_an_error():
    config = TrainConfig(micro_batch_size=16, seq_len=128, total_batch_size=4096)
    assert grad_accum_steps(config, 1) == 2 and grad_accum_steps(config, 2) == 1
    with pytest.raises(ConfigError, match=r"16 \* 128 \* 3 = 6144"):
        grad_accum_steps(config, 3)


def test_lr_schedule_warmup_then_cosine_to_ten_percent():
    c = TrainConfig(
        model="gpt2", seq_len=1024, total_batch_size=524_288, micro_batch_size=64, max_steps=19_073, warmup_steps=715
    )
    c.max_lr = 6e-4
    lr = [lr_at(s, c) for s in range(c.max_steps + 10)]
    assert lr[0] == pytest.approx(6e-4 / 715)  # build-nanogpt: max_lr * (it + 1) / warmup_steps
    assert lr[357] == pytest.approx(6e-4 * 358 / 715)
    assert lr[714] == pytest.approx(6e-4) and lr[715] == pytest.approx(6e-4)  # cos(0) = 1
    assert lr[(715 + 19_073) // 2] == pytest.approx(3.3e-4)  # cos(pi/2) = 0: halfway between 6e-4 and 6e-5
    assert lr[19_073] == pytest.approx(6e-5) and lr[-1] == pytest.approx(6e-5)  # the floor, 10%
    assert all(a < b for a, b in zip(lr[:714], lr[1:715], strict=True))
    assert all(a >= b - 1e-15 for a, b in zip(lr[715:], lr[716:], strict=False))


def test_lr_schedule_equals_torchs_warmup_then_cosine_schedulers():
    """The same schedule from PyTorch's own schedulers: LinearLR from max_lr / warmup to max_lr over the
    warmup, then CosineAnnealingLR down to min_lr at max_steps (an independent implementation)."""
    c = TrainConfig(warmup_steps=10, max_steps=100, max_lr=1e-3, min_lr_ratio=0.1)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=c.max_lr)
    warmup = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1 / c.warmup_steps, end_factor=1.0, total_iters=c.warmup_steps - 1
    )
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=c.max_steps - c.warmup_steps, eta_min=c.max_lr * c.min_lr_ratio
    )
    schedule = torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[c.warmup_steps])
    expected = []
    for _ in range(c.max_steps + 1):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert [lr_at(s, c) for s in range(c.max_steps + 1)] == pytest.approx(expected, rel=1e-9)
    assert lr_at(c.max_steps + 50, c) == pytest.approx(c.max_lr * c.min_lr_ratio)  # stays at the floor


def test_no_warmup_starts_at_max_lr():
    c = TrainConfig(warmup_steps=0, max_steps=10, max_lr=1e-3, min_lr_ratio=0.0)
    assert lr_at(0, c) == pytest.approx(1e-3)
    assert lr_at(5, c) == pytest.approx(0.5e-3)
    assert lr_at(10, c) == 0.0


def test_weight_decay_only_on_matrices_and_embeddings():
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("cpu-nano"))
    decay, no_decay = param_groups(model, 0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    by_id = {id(p): name for name, p in model.named_parameters()}
    decayed = {by_id[id(p)] for p in decay["params"]}
    plain = {by_id[id(p)] for p in no_decay["params"]}
    modules = dict(model.named_modules())
    for name in decayed | plain:
        module_name, kind = name.rsplit(".", 1)
        module = modules[module_name]
        expect_decay = kind == "weight" and isinstance(module, (torch.nn.Linear, torch.nn.Embedding))
        assert (name in decayed) == expect_decay, name
    assert "transformer.wte.weight" in decayed and "transformer.h.0.ln_1.weight" in plain
    assert "transformer.h.0.attn.c_attn.bias" in plain
    # every parameter once: the tied lm_head weight is the embedding, not a second copy
    assert len(decayed) + len(plain) == len({id(p) for p in model.parameters()})
    assert model.lm_head.weight is model.transformer.wte.weight


def test_optimizer_is_the_gpt3_adamw():
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("cpu-nano"))
    opt = build_optimizer(model, TrainConfig(), torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)
    for group in opt.param_groups:
        assert group["betas"] == (0.9, 0.95) and group["eps"] == 1e-8
        assert group["fused"]  # torch's fused kernel exists for CPU and CUDA, and is the faster CPU step


def test_auto_precision_follows_the_device_that_every_command_picks(monkeypatch):
    """`resolve_mixed_precision` (what run_settings records and the trainer passes to Accelerate) asks
    `gpt2_scratch.training.devices` about this machine; the choice per machine is tested in test_devices.py."""
    import gpt2_scratch.training.devices as devices

    machines = {
        devices.Availability(cuda=False): "no",
        devices.Availability(cuda=True, cuda_bf16=True): "bf16",
        devices.Availability(cuda=True, cuda_bf16=False): "fp16",  # T4, V100
        devices.Availability(cuda=False, mps=True, mps_bf16=True): "bf16",
    }
    for found, expected in machines.items():
        monkeypatch.setattr(devices, "availability", lambda found=found: found)
        assert resolve_mixed_precision("auto") == expected, found
        assert resolve_mixed_precision("no") == "no" and resolve_mixed_precision("fp16") == "fp16"


def test_the_trainers_fused_adamw_equals_the_plain_loop_adamw():
    """`build_optimizer` (fused AdamW on CPU and CUDA, GPT-3 betas and eps, decay on 2-D weights only)
    takes the same steps as PyTorch's plain for-loop AdamW given the same groups and settings.

    In float64: the key bias has a zero gradient up to rounding (softmax ignores a constant shift), and
    Adam would turn float32 rounding noise into visible, implementation-dependent steps."""
    config = TrainConfig(max_lr=1e-2, warmup_steps=0, weight_decay=0.1)
    ids = torch.randint(0, 50257, (3, 20), generator=torch.Generator().manual_seed(1))
    params = {}
    for fused in (True, False):
        torch.manual_seed(0)
        model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("cpu-nano")).double().train()
        if fused:
            optimizer = build_optimizer(model, config, torch.device("cpu"))
            assert optimizer.defaults["fused"]
        else:
            optimizer = torch.optim.AdamW(
                param_groups(model, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False, fused=False
            )
        for _ in range(3):
            model(input_ids=ids, labels=ids, loss_only=True).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
        params[fused] = {name: p.detach().clone() for name, p in model.named_parameters()}
    for name, p in params[False].items():
        torch.testing.assert_close(params[True][name], p, rtol=1e-9, atol=1e-12, msg=name)


def test_a_launcher_asking_for_another_precision_is_told_what_the_run_uses():
    """`accelerate launch --mixed_precision bf16` on a CPU trains in fp32 (the trainer's own field
    decides): said in one warning, naming both and the flag that changes it; silent when they agree."""
    note = launcher_precision_note("bf16", "no")
    assert "'bf16'" in note and "trains with 'no'" in note and "--mixed_precision to train_accelerate.py" in note
    assert launcher_precision_note("no", "no") is None and launcher_precision_note(None, "bf16") is None
    # `accelerate launch` without a config sets 'no' unasked: no warning on a GPU where auto is bf16
    assert launcher_precision_note("no", "bf16") is None and "'fp16'" in launcher_precision_note("fp16", "bf16")
