"""The checks of the kernels the trainer runs, each against a reference on this device: tf32, model_vs_gpt2,
flash_attention, chunked_loss, fused_adamw, generate_cache, compile."""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any

import torch

from .common import Context, Skip, exact_fp32, max_abs_diff, rel_diff, scale, synchronize


def bf16_autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def tiny_model(ctx: Context, seed: int = 0, **overrides: Any):
    from modeling_gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM

    torch.manual_seed(seed)
    config = GPT2ScratchConfig.from_preset(ctx.shape.preset, **overrides)
    return GPT2ScratchForCausalLM(config).to(ctx.device)


def random_tokens(ctx: Context, rows: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50257, (rows, length), generator=g).to(ctx.device)


def check_tf32(ctx: Context) -> str:
    if not ctx.cuda:
        raise Skip("TF32 is a mode of NVIDIA tensor cores; this device is " + ctx.device.type)
    n = 4096
    g = torch.Generator(device=ctx.device).manual_seed(0)
    a = torch.randn(n, n, device=ctx.device, generator=g)
    b = torch.randn(n, n, device=ctx.device, generator=g)
    reference = (a.double() @ b.double()).float()
    timings, errors = {}, {}
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        out = a @ b
        synchronize(ctx.device)
        tick = time.perf_counter()
        for _ in range(10):
            out = a @ b
        synchronize(ctx.device)
        timings[tf32] = 10 * 2 * n**3 / (time.perf_counter() - tick)
        errors[tf32] = rel_diff(out, reference)
    torch.backends.cuda.matmul.allow_tf32 = True
    # TF32 keeps 10 mantissa bits: its error is far above fp32's and below about 1e-2 of the scale.
    ok = errors[True] > 10 * errors[False] and errors[True] < 1e-2
    detail = (
        f"fp32 {timings[False] / 1e12:.1f} TFLOP/s, rel. error {errors[False]:.1e}; "
        f"TF32 {timings[True] / 1e12:.1f} TFLOP/s, rel. error {errors[True]:.1e}"
    )
    if not ok:
        raise AssertionError("TF32 did not take effect or is too inexact: " + detail)
    return detail


def check_model_vs_gpt2(ctx: Context) -> str:
    """fp32 logits within 1e-4 of transformers' GPT-2 with the same weights; under bf16 autocast, our error
    against the fp32 logits no more than twice transformers' own (the same kernels make the same rounding)."""
    from gpt2_scratch.conversion import to_gpt2

    ours = tiny_model(ctx).eval()
    theirs = to_gpt2(ours).to(ctx.device).eval()
    x = random_tokens(ctx, ctx.shape.batch, ctx.shape.seq_len)
    with torch.no_grad(), exact_fp32():
        a, b = ours(x).logits, theirs(x).logits
        fp32 = rel_diff(a, b)
        with bf16_autocast(ctx.device):
            a16, b16 = ours(x).logits, theirs(x).logits
    ours_err, theirs_err = rel_diff(a16, b), rel_diff(b16, b)
    detail = (
        f"fp32 rel. diff {fp32:.1e}; bf16 autocast rel. error against fp32: ours {ours_err:.1e}, "
        f"GPT2LMHeadModel {theirs_err:.1e}; {ctx.shape.preset}, {tuple(x.shape)}"
    )
    if not (fp32 <= 1e-4 and ours_err <= 2 * theirs_err + 1e-3):
        raise AssertionError(detail)
    return detail


def check_flash_attention(ctx: Context) -> str:
    """SDPA's flash kernel forced (an error if it cannot run here), forward and backward in bf16, against
    the math backend under the same autocast."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = tiny_model(ctx).train()
    x = random_tokens(ctx, ctx.shape.batch, ctx.shape.seq_len)
    results = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        model.zero_grad(set_to_none=True)
        with sdpa_kernel(backend), bf16_autocast(ctx.device):
            loss = model(input_ids=x[:, :-1], shift_labels=x[:, 1:]).loss
        loss.backward()
        grad = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
        results[backend] = (loss.item(), grad)
    (flash_loss, flash_grad), (math_loss, math_grad) = results[SDPBackend.FLASH_ATTENTION], results[SDPBackend.MATH]
    grad_diff = (flash_grad - math_grad).norm().item() / max(math_grad.norm().item(), 1e-12)
    detail = f"loss flash {flash_loss:.5f} vs math {math_loss:.5f}; gradient rel. norm diff {grad_diff:.1e} (bf16)"
    if not (abs(flash_loss - math_loss) <= 1e-2 and grad_diff <= 5e-2):
        raise AssertionError(detail)
    return detail


def loss_and_grads(model, x: torch.Tensor, chunked: bool, autocast: bool) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    context = bf16_autocast(x.device) if autocast else contextlib.nullcontext()
    with context:
        loss = model(input_ids=x[:, :-1], shift_labels=x[:, 1:], loss_only=chunked).loss
    loss.backward()
    grad = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
    return loss.item(), grad


def check_chunked_loss(ctx: Context) -> str:
    """loss_only=True (the trainer's call) against logits + cross-entropy: fp32 within 1e-5; under bf16
    autocast, its error against fp32 no more than twice the plain path's."""
    model = tiny_model(ctx).train()
    x = random_tokens(ctx, ctx.shape.batch, ctx.shape.seq_len + 1)
    with exact_fp32():
        plain_loss, plain_grad = loss_and_grads(model, x, chunked=False, autocast=False)
        chunk_loss, chunk_grad = loss_and_grads(model, x, chunked=True, autocast=False)
    bf_plain_loss, bf_plain_grad = loss_and_grads(model, x, chunked=False, autocast=True)
    bf_chunk_loss, bf_chunk_grad = loss_and_grads(model, x, chunked=True, autocast=True)

    def grad_err(g: torch.Tensor) -> float:
        return (g - plain_grad).norm().item() / plain_grad.norm().item()

    fp32_loss, fp32_grad = abs(chunk_loss - plain_loss) / plain_loss, grad_err(chunk_grad)
    bf_err, bf_plain_err = grad_err(bf_chunk_grad), grad_err(bf_plain_grad)
    detail = (
        f"fp32: loss rel. diff {fp32_loss:.1e}, gradient {fp32_grad:.1e}; bf16 gradient error against fp32: "
        f"chunked {bf_err:.1e}, plain {bf_plain_err:.1e}; loss chunked {bf_chunk_loss:.5f}, plain {bf_plain_loss:.5f}"
    )
    if not (fp32_loss <= 1e-5 and fp32_grad <= 1e-5 and bf_err <= 2 * bf_plain_err + 1e-3):
        raise AssertionError(detail)
    return detail


def check_fused_adamw(ctx: Context) -> str:
    """torch's fused AdamW (the trainer's) against its single-tensor loop: the same gradients, 5 steps."""
    from gpt2_scratch.training.config import TrainConfig
    from gpt2_scratch.training.recipe import build_optimizer, param_groups

    recipe = TrainConfig(warmup_steps=0)
    fused_model, loop_model = tiny_model(ctx), tiny_model(ctx)
    fused = build_optimizer(fused_model, recipe, ctx.device)
    betas = (recipe.adam_beta1, recipe.adam_beta2)
    loop = torch.optim.AdamW(
        param_groups(loop_model, recipe.weight_decay),
        lr=fused.param_groups[0]["lr"],
        betas=betas,
        eps=recipe.adam_eps,
        foreach=False,
        fused=False,
    )
    if not fused.defaults.get("fused"):
        raise AssertionError(f"build_optimizer did not pick the fused kernel on {ctx.device.type}")
    g = torch.Generator(device=ctx.device).manual_seed(0)
    for _ in range(5):
        for p, q in zip(fused_model.parameters(), loop_model.parameters(), strict=True):
            p.grad = torch.randn(p.shape, device=ctx.device, generator=g) * 1e-2
            q.grad = p.grad.clone()
        fused.step()
        loop.step()
    diff = max(max_abs_diff(p, q) for p, q in zip(fused_model.parameters(), loop_model.parameters(), strict=True))
    detail = f"max parameter diff after 5 steps {diff:.1e} (lr {fused.param_groups[0]['lr']:.1e})"
    if not diff <= 1e-6:
        raise AssertionError(detail)
    return detail


def check_generate_cache(ctx: Context) -> str:
    """Greedy generation with the KV cache gives the tokens and scores of generation without it (fp32). Two
    paths that round differently may part at a near-tie of an untrained model's top two tokens: that passes
    when the scores agreed up to it and the two tokens' scores there are within that rounding."""
    model = tiny_model(ctx).eval()
    prompt = random_tokens(ctx, ctx.shape.batch, 8)
    kwargs = dict(do_sample=False, max_new_tokens=ctx.shape.new_tokens, min_new_tokens=ctx.shape.new_tokens)
    kwargs.update(attention_mask=torch.ones_like(prompt), pad_token_id=50256, output_scores=True)
    with torch.no_grad(), exact_fp32():
        cached = model.generate(prompt, use_cache=True, return_dict_in_generate=True, **kwargs)
        plain = model.generate(prompt, use_cache=False, return_dict_in_generate=True, **kwargs)
    new = prompt.shape[1]
    return compare_generations(
        cached.sequences[:, new:], plain.sequences[:, new:], torch.stack(cached.scores, 1), torch.stack(plain.scores, 1)
    )


def compare_generations(a: torch.Tensor, b: torch.Tensor, scores_a: torch.Tensor, scores_b: torch.Tensor) -> str:
    """Greedy tokens (B, new) and their scores (B, new, vocab) of two generations: the detail when they agree
    (tokens equal and scores within 1e-4, or parted at a near-tie); else AssertionError."""
    differ = (a != b).any(0).nonzero()
    upto = int(differ[0]) if len(differ) else a.shape[1]  # positions before the first difference
    score_diff = rel_diff(scores_a[:, : upto + 1], scores_b[:, : upto + 1])
    detail = f"{a.shape[1]} new tokens x {a.shape[0]}: scores rel. diff {score_diff:.1e}; "
    if not len(differ):
        detail += "tokens equal"
    else:
        row = int((a[:, upto] != b[:, upto]).nonzero()[0])
        pair = scores_a[row, upto, [int(a[row, upto]), int(b[row, upto])]]
        margin = (pair[0] - pair[1]).abs().item() / scale(scores_a[:, : upto + 1])
        detail += f"tokens part at position {upto} (row {row}), a near-tie: margin {margin:.1e}"
        if not margin <= 10 * score_diff:
            raise AssertionError(detail.replace("a near-tie", "not a near-tie"))
    if not score_diff <= 1e-4:
        raise AssertionError(detail)
    return detail


def check_compile(ctx: Context) -> str:
    """torch.compile of the trainer's call (bf16 autocast on CUDA, chunked loss) against eager: loss and
    gradients; the compile time and the peak memory of a training step at the trainer's micro-batch."""
    if ctx.cuda:
        backend, rows, autocast = "inductor", ctx.shape.train["micro_batch_size"], True
    else:  # inductor's C++ build takes 30 to 55 s per graph on 2 CPU cores: the smoke traces only
        backend, rows, autocast = "aot_eager", ctx.shape.batch, False
    model = tiny_model(ctx).train()
    x = random_tokens(ctx, rows, ctx.shape.seq_len + 1)
    eager_loss, eager_grad = loss_and_grads(model, x, chunked=True, autocast=autocast)
    compiled = torch.compile(model, backend=backend)
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    times = []
    for _ in range(3):
        synchronize(ctx.device)
        tick = time.perf_counter()
        loss, grad = loss_and_grads(compiled, x, chunked=True, autocast=autocast)
        synchronize(ctx.device)
        times.append(time.perf_counter() - tick)
    compile_seconds = times[0] - statistics.median(times[1:])
    grad_diff = (grad - eager_grad).norm().item() / eager_grad.norm().item()
    peak = torch.cuda.max_memory_allocated(ctx.device) if ctx.cuda else None
    ctx.report["compile_seconds"]["compile_check"] = round(compile_seconds, 2)
    ctx.report["peak_memory_bytes"]["compile_check"] = peak
    # bf16 autocast: inductor fuses and orders the bf16 work differently from eager, a rounding apart.
    loss_tolerance, grad_tolerance = (5e-3, 5e-2) if autocast else (1e-5, 1e-5)
    detail = (
        f"{backend}, {rows}x{ctx.shape.seq_len}: compile {compile_seconds:.1f} s, step {times[-1] * 1e3:.0f} ms; "
        f"loss {loss:.5f} vs eager {eager_loss:.5f}, gradient rel. diff {grad_diff:.1e}"
        + (f"; peak memory {peak / 1e9:.2f} GB" if peak else "")
    )
    if not (abs(loss - eager_loss) <= loss_tolerance * abs(eager_loss) and grad_diff <= grad_tolerance):
        raise AssertionError(detail)
    return detail
