"""The eval and exports_on_cpu checks on the trainer check's run, and the CPU worker the latter starts
(`gpu_check.py --cpu-logits`)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from . import ROOT
from .common import Context, Skip, exact_fp32, max_abs_diff, rel_diff, synchronize
from .launch import data_dir, metric, run_logged, subprocess_env

RUNNER = ROOT / "benchmarks" / "gpu_check.py"  # its --cpu-logits runs the CPU worker


def synthetic_hellaswag(count: int) -> list[dict]:
    """HellaSwag-format examples (ctx, four endings, label) cut from the built-in corpus: the scoring's
    speed does not depend on the text, and the real file cannot be fetched offline."""
    from pydoc_data import topics  # the built-in corpus's first documents, without parsing the stdlib

    words = " ".join(topics.topics[key] for key in sorted(topics.topics)).split()
    examples = []
    for i in range(count):
        start = (i * 97) % (len(words) - 120)
        ctx = " ".join(words[start : start + 40])
        endings = [" ".join(words[start + 40 + 15 * k : start + 55 + 15 * k]) for k in range(4)]
        examples.append({"ind": i, "ctx": ctx, "endings": endings, "label": i % 4})
    return examples


def run_for_eval(ctx: Context) -> Path:
    if ctx.run_dir is None:
        found = sorted(ctx.work.glob("trainer-*/uninterrupted/hf-gpt2"))
        if not found:
            raise Skip("needs the trainer check's run (e.g. --only data_prep,trainer,eval,exports_on_cpu)")
        ctx.run_dir = found[-1].parent
    for name in ("hf", "hf-gpt2"):
        if not (ctx.run_dir / name / "config.json").is_file():
            raise AssertionError(f"{ctx.run_dir / name} holds no export")
    return ctx.run_dir


def check_eval(ctx: Context) -> str:
    """The export's validation loss (eval.val_loss, as the trainer computes it), HellaSwag-format scoring and
    generate, on this device."""
    from data_prep.tokenizer import get_encoding
    from eval.common import autocast, load_model
    from eval.hellaswag import evaluate_hellaswag
    from eval.val_loss import evaluate_val_loss

    run = run_for_eval(ctx)
    train, logged = ctx.shape.train, metric(run, "val/loss")
    model = load_model(str(run / "hf"), device=ctx.device)
    synchronize(ctx.device)
    tick = time.perf_counter()
    val = evaluate_val_loss(
        model,
        data_dir(ctx),
        batch_size=train["micro_batch_size"],
        seq_len=train["seq_len"],
        max_batches=train["val_batches"],
    )
    synchronize(ctx.device)
    val_seconds = time.perf_counter() - tick
    trainer_val = logged[max(logged)]

    examples = synthetic_hellaswag(ctx.shape.hellaswag_examples)
    evaluate_hellaswag(model, examples[:4], batch_size=4, device=ctx.device)  # warm-up
    synchronize(ctx.device)
    tick = time.perf_counter()
    evaluate_hellaswag(model, examples, batch_size=16, device=ctx.device)
    synchronize(ctx.device)
    hellaswag_rate = len(examples) / (time.perf_counter() - tick)

    prompt = torch.tensor([get_encoding().encode("Hello, I'm a language model,")] * 8, device=ctx.device)
    kwargs = dict(attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=50256)
    with torch.no_grad(), autocast(ctx.device):
        model.generate(prompt, max_new_tokens=4, **kwargs)  # warm-up
        synchronize(ctx.device)
        tick = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=ctx.shape.new_tokens, min_new_tokens=ctx.shape.new_tokens, **kwargs)
        synchronize(ctx.device)
    generated = (out.shape[1] - prompt.shape[1]) * prompt.shape[0]
    generate_rate = generated / (time.perf_counter() - tick)
    ctx.report["eval"] = {
        "val_loss": val,
        "trainer_val_loss": trainer_val,
        "val_tokens_per_s": train["micro_batch_size"] * train["seq_len"] * train["val_batches"] / val_seconds,
        "hellaswag_examples_per_s": hellaswag_rate,
        "generate_tokens_per_s": generate_rate,
        "generate_batch": prompt.shape[0],
    }
    # On CUDA the trainer evaluates the compiled model under Accelerate's autocast, this the eager export
    # under eval's: bf16 rounding differs a little. On the CPU both are the same fp32 computation.
    tolerance = 2e-2 if ctx.cuda else 1e-5
    detail = (
        f"val loss {val:.4f} vs trainer's {trainer_val:.4f}; HellaSwag-format {hellaswag_rate:,.1f} examples/s; "
        f"generate {generate_rate:,.0f} tokens/s (batch {prompt.shape[0]}, greedy, KV cache)"
    )
    if not abs(val - trainer_val) <= tolerance:
        raise AssertionError(detail)
    return detail


EXPORT_TOKENS = [[15496, 11, 314, 1101, 257, 3303, 2746, 11, 290, 314, 588, 284, 1100, 546, 257, 1110]]


def export_logits(folder: Path, device: str, remote_code: bool) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=remote_code)
    with torch.no_grad():
        return model.to(device).eval()(torch.tensor(EXPORT_TOKENS, device=device)).logits.float().cpu()


def check_exports_on_cpu(ctx: Context) -> str:
    """hf/ (our class, as remote code) and hf-gpt2/ (stock GPT2LMHeadModel) of the run, loaded in a CPU-only
    child process, give the logits the device gives (fp32)."""
    run = run_for_eval(ctx)
    with exact_fp32():
        device_logits = export_logits(run / "hf", str(ctx.device), remote_code=True)
    from safetensors.torch import load_file

    out = ctx.work / "cpu_logits.safetensors"
    command = [sys.executable, str(RUNNER), "--cpu-logits", str(run), str(out)]
    run_logged(command, ctx.work / "exports_on_cpu.log", 300, cwd=ROOT, env=subprocess_env(CUDA_VISIBLE_DEVICES=""))
    cpu = load_file(out)
    ours_vs_gpt2 = max_abs_diff(cpu["hf"], cpu["hf-gpt2"])
    vs_device = max(rel_diff(cpu[name], device_logits) for name in ("hf", "hf-gpt2"))
    detail = f"CPU: hf/ vs hf-gpt2/ max diff {ours_vs_gpt2:.1e}; CPU vs {ctx.device.type}: rel. diff {vs_device:.1e}"
    if not (ours_vs_gpt2 <= 1e-4 and vs_device <= 1e-3):
        raise AssertionError(detail)
    return detail


def cpu_logits_worker(run: str, out: str) -> None:
    from safetensors.torch import save_file

    if torch.cuda.is_available():
        raise SystemExit("the CPU worker sees a CUDA device")
    logits = {name: export_logits(Path(run) / name, "cpu", remote_code=name == "hf") for name in ("hf", "hf-gpt2")}
    save_file({k: v.contiguous() for k, v in logits.items()}, out)
