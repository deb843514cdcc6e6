"""The trainer's configuration, LR schedule, optimizer groups and checkpoint bookkeeping (no training)."""

import time
from pathlib import Path

import pytest
import torch

from modeling_gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM
from training.checkpoints import find_resume_checkpoint, latest_checkpoint, prune_checkpoints
from training.config import FIELDS, ConfigError, TrainConfig, parse_config
from training.hub import HubError, check_hub_access
from training.metrics import Meter, measure_matmul_flops
from training.recipe import build_optimizer, grad_accum_steps, lr_at, param_groups, resolve_mixed_precision

ROOT = Path(__file__).resolve().parents[1]
PRESET_124M = ROOT / "configs" / "gpt2-124m-fineweb-edu.yaml"


def test_no_arguments_give_the_dataclass_defaults():
    assert parse_config([]) == TrainConfig()


def test_every_field_has_a_one_line_doc_shown_by_help(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    shown = capsys.readouterr().out
    for name, f in FIELDS.items():
        assert f.metadata["help"] and "\n" not in f.metadata["help"]
        assert f"--{name}" in shown


def test_preset_then_command_line_overrides(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("model: cpu-nano\nseq_len: 32\nmax_steps: 50\nwarmup_steps: 5\nmax_lr: 1e-3\n")
    config = parse_config(["--config", str(preset), "--max_steps", "7", "--compile", "--hub_model_id", "none"])
    assert (config.model, config.seq_len, config.max_steps, config.compile) == ("cpu-nano", 32, 7, True)
    assert config.max_lr == 1e-3 and isinstance(config.max_lr, float)  # YAML reads 1e-3 as a string
    assert config.hub_model_id is None
    assert parse_config(["--config", str(preset), "--compile", "false"]).compile is False


def test_gpt2_124m_preset_is_the_build_nanogpt_recipe():
    """The seeds' numbers (build-nanogpt train_gpt2.py), not the trainer's defaults."""
    c = parse_config(["--config", str(PRESET_124M)])
    assert c.model == "gpt2" and c.model_config().n_layer == 12 and c.model_config().n_embd == 768
    assert (c.total_batch_size, c.seq_len, c.max_steps, c.warmup_steps) == (524_288, 1024, 19_073, 715)
    assert (c.max_lr, c.max_lr * c.min_lr_ratio) == pytest.approx((6e-4, 6e-5))
    assert (c.weight_decay, c.grad_clip, c.adam_beta1, c.adam_beta2, c.adam_eps) == (0.1, 1.0, 0.9, 0.95, 1e-8)
    assert c.eval_interval == 250
    assert c.total_batch_size * c.max_steps == pytest.approx(10e9, rel=0.001)  # one pass over 10B tokens
    assert grad_accum_steps(c, world_size=8) == 1  # 8 x 64 x 1024 = 524,288
    assert grad_accum_steps(c, world_size=1) == 8


def test_every_shipped_preset_loads():
    presets = sorted((ROOT / "configs").glob("*.yaml"))
    assert PRESET_124M in presets
    for path in presets:
        parse_config(["--config", str(path)])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max_lr", "-1"], "max_lr must be > 0"),
        (["--seq_len", "abc"], "seq_len must be a int, got 'abc'"),
        (["--mixed_precision", "fp8"], "mixed_precision must be one of"),
        (["--model", "gpt5"], "unknown preset 'gpt5'"),
        (["--model", "cpu-nano", "--seq_len", "128"], "exceeds the model's n_positions (64"),
        (["--n_head", "5"], "divisible by n_head"),
        (["--total_batch_size", "1000"], "must be a multiple of micro_batch_size * seq_len"),
        (["--warmup_steps", "500", "--max_steps", "100"], "warmup_steps (500) must be <= max_steps (100)"),
        (["--min_lr_ratio", "2"], "min_lr_ratio must be in [0, 1]"),
        (["--push_to_hub"], "push_to_hub needs hub_model_id"),
        (["--compile", "maybe"], "compile must be a bool"),
        (["--report_to", "tensorbord"], "unknown tracker 'tensorbord'"),
        (["--max_step", "5"], "unknown config field 'max_step'; did you mean 'max_steps'?"),
        (["stray"], "unexpected argument 'stray'"),
        (["--n_head", "0"], "n_head must be >= 1, got 0"),
        (["--seed", "-1"], "seed must be in [0, 2**32), got -1"),
        (["--max_lr", "nan"], "max_lr must be a finite number, got nan"),
        (["--grad_clip", "inf"], "grad_clip must be a finite number, got inf"),
    ],
)
def test_bad_values_are_clear_errors(argv, message):
    with pytest.raises(ConfigError) as err:
        parse_config(argv)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_preset_names_the_file_and_key(tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text("learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config field 'learning_rate'"):
        parse_config(["--config", str(preset)])
    preset.write_text("max_steps: ten\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: max_steps must be a int, got 'ten'"):
        parse_config(["--config", str(preset)])
    with pytest.raises(ConfigError, match="config file not found"):
        parse_config(["--config", str(tmp_path / "missing.yaml")])


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


def test_precision_is_fp32_on_cpu_and_bf16_on_capable_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_mixed_precision("auto") == "no"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_mixed_precision("auto") == "bf16"
    assert resolve_mixed_precision("no") == "no"


def test_resume_takes_only_complete_checkpoints(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    assert latest_checkpoint(checkpoints) is None
    for name in ("step_000004", "step_000012", ".tmp_step_000016", "step_000020.partial"):
        (checkpoints / name).mkdir(parents=True)
    (checkpoints / "step_000024").write_text("a file, not a checkpoint folder")
    assert latest_checkpoint(checkpoints).name == "step_000012"
    with pytest.raises(ConfigError, match="already holds a run .*step_000012.*--resume auto"):
        find_resume_checkpoint(TrainConfig(), checkpoints, tmp_path, {})
    with pytest.raises(ConfigError, match="not a checkpoint folder"):
        find_resume_checkpoint(TrainConfig(resume=str(checkpoints / ".tmp_step_000016")), checkpoints, tmp_path, {})


def test_prune_keeps_the_newest(tmp_path):
    for step in (3, 6, 9, 12):
        (tmp_path / f"step_{step:06d}").mkdir()
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000009", "step_000012"]


def test_push_preflight_fails_fast_offline():
    start = time.perf_counter()
    with pytest.raises(HubError, match="offline mode is on"):
        check_hub_access("someone/tiny-gpt2")
    assert time.perf_counter() - start < 5


def test_push_preflight_without_login_says_how_to_log_in(monkeypatch):
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalTokenNotFoundError

    class NoToken:
        def whoami(self):
            raise LocalTokenNotFoundError("no token")

    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)
    with pytest.raises(HubError, match="hf auth login"):
        check_hub_access("someone/tiny-gpt2", api=NoToken())


def test_mfu_uses_the_models_flops_per_token():
    """MFU = tokens/s x FLOPs per token / (peak x devices), with FLOPs per token counted independently
    from the model's own parameters: 6 per matmul weight (all but the position embeddings, the tied
    head once at its padded size) plus PaLM's attention term 12 * n_layer * n_embd * T."""
    config = GPT2ScratchConfig.from_preset("gpt2")
    with torch.device("meta"):
        model = GPT2ScratchForCausalLM(config)
    n_matmul = sum(p.numel() for name, p in model.named_parameters() if "wpe" not in name)
    flops_per_token = 6 * n_matmul + 12 * config.n_layer * config.n_embd * 1024
    assert config.flops_per_token(1024) == flops_per_token
    meter = Meter(flops_per_token, peak=989e12, world_size=8)
    meter.start -= 1.0  # one second ago
    meter.add(1_000_000)
    stats = meter.read()
    assert stats["tokens_per_s"] == pytest.approx(1e6, rel=0.01)
    # 124M params: ~0.85 GFLOP per token; 1M tokens/s on 8 H100s (989 TFLOP/s bf16 each) is ~10.7% MFU
    assert stats["mfu"] == pytest.approx(0.107, abs=0.002)
    assert measure_matmul_flops(torch.device("cpu"), torch.float32, n=256, seconds=0.05) > 1e8


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
