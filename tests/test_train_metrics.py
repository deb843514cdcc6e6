"""gpt2_scratch/training/metrics.py: FLOPs per token, MFU and the throughput meter."""

import pytest
import torch

from gpt2_scratch.training.metrics import Meter, measure_matmul_flops
from modeling_gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM


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
    stats = meter.lap()
    assert stats["tokens_per_s"] == pytest.approx(1e6, rel=0.01)
    # 124M params: ~0.85 GFLOP per token; 1M tokens/s on 8 H100s (989 TFLOP/s bf16 each) is ~10.7% MFU
    assert stats["mfu"] == pytest.approx(0.107, abs=0.002)
    assert (meter.tokens, meter.steps) == (0, 0)  # a lap ends where the next begins
    assert measure_matmul_flops(torch.device("cpu"), torch.float32, n=256, seconds=0.05) > 1e8
