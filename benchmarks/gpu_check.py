"""Prove the CUDA path and measure it, in one command, within the few minutes a GPU is lent for.

    PYTHONPATH=. python3 benchmarks/gpu_check.py --out runs/gpu_check/gpu_check.json   # one CUDA device
    python benchmarks/gpu_check.py --smoke                                              # the harness, tiny, on the CPU
    PYTHONPATH=. python3 benchmarks/gpu_check.py --only trainer,eval,exports_on_cpu --out rerun.json

Checks, in order (each an entry {name, ok, detail, seconds} of `checks`; `ok` is null for a check that
does not apply here, with its reason, never true):
  environment      project imports without `datasets`/`evaluate`; device; versions against the tested ones
  tf32             TF32 matmuls take effect and stay within TF32's error (CUDA only)
  model_vs_gpt2    our logits against transformers' GPT2LMHeadModel with the same weights, fp32 and bf16
  flash_attention  SDPA's flash kernel forced: forward and backward against the math backend
  chunked_loss     the chunked linear + cross-entropy and its gradients against plain cross-entropy
  fused_adamw      fused AdamW against the unfused loop, same gradients, several steps
  generate_cache   cached against uncached greedy `generate`
  compile          torch.compile of the trainer's call against eager; compile time, peak memory
  data_prep        `python -m data_prep --builtin` in a subprocess (no `datasets` needed)
  trainer          `accelerate launch train_accelerate.py`: an uninterrupted run against a run SIGKILLed
                   after a checkpoint and resumed with `--resume auto`; tokens/s and MFU as logged
  fp16             the trainer's step under fp16 with Accelerate's loss scaler, its first steps forced to
                   overflow, against the same training under bf16 (CUDA only)
  fsdp             FSDP2 on the device (fsdp_8gpu.yaml, one process, bf16), a smaller model: SIGKILLed after a
                   sharded checkpoint and resumed, against an uninterrupted FSDP run and the same run without
                   FSDP; the export gathered from the shards, on the CPU (CUDA only)
  eval             validation loss of the run's export against the trainer's, HellaSwag-format scoring
                   throughput, `generate` tokens/s
  exports_on_cpu   the run's hf/ and hf-gpt2/ loaded on the CPU: the same logits as on the device
  ladder           bench_ladder.py's rungs, each in its own process

The JSON (`--out`) is rewritten after every check and every rung, so a run stopped at its time limit
still reports what it measured; `running` names the check in progress. A Markdown table is written
beside it. The exit status is 1 when any check failed. `--budget` seconds (default 450 on CUDA):
checks and rungs that would start past it are skipped with that reason.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_checks/, however this file is reached

# First: the package puts the repository on the path (the GPU machine installs nothing) and the Hub offline.
import gpu_checks  # noqa: E402, F401
import torch  # noqa: E402
from gpu_checks.common import GPU_SHAPE, SMOKE_SHAPE, Context, Skip  # noqa: E402
from gpu_checks.environment import (  # noqa: E402
    TESTED_VERSIONS,
    check_environment,
    describe_device,
    version_differences,
    versions,
)
from gpu_checks.evaluation import check_eval, check_exports_on_cpu, cpu_logits_worker  # noqa: E402
from gpu_checks.fsdp import check_fsdp  # noqa: E402
from gpu_checks.kernels import (  # noqa: E402
    check_chunked_loss,
    check_compile,
    check_flash_attention,
    check_fused_adamw,
    check_generate_cache,
    check_model_vs_gpt2,
    check_tf32,
)
from gpu_checks.ladder import check_ladder  # noqa: E402
from gpu_checks.precision import check_fp16  # noqa: E402
from gpu_checks.report import markdown, markdown_path  # noqa: E402
from gpu_checks.trainer import check_data_prep, check_trainer  # noqa: E402

from gpt2_scratch.user_errors import UserError, run_command  # noqa: E402

CHECK_NAMES = (
    "environment",
    "tf32",
    "model_vs_gpt2",
    "flash_attention",
    "chunked_loss",
    "fused_adamw",
    "generate_cache",
    "compile",
    "data_prep",
    "trainer",
    "fp16",
    "fsdp",
    "eval",
    "exports_on_cpu",
    "ladder",
)


CHECKS: dict[str, Callable[[Context], str]] = {
    "environment": check_environment,
    "tf32": check_tf32,
    "model_vs_gpt2": check_model_vs_gpt2,
    "flash_attention": check_flash_attention,
    "chunked_loss": check_chunked_loss,
    "fused_adamw": check_fused_adamw,
    "generate_cache": check_generate_cache,
    "compile": check_compile,
    "data_prep": check_data_prep,
    "trainer": check_trainer,
    "fp16": check_fp16,
    "fsdp": check_fsdp,
    "eval": check_eval,
    "exports_on_cpu": check_exports_on_cpu,
    "ladder": check_ladder,
}
assert tuple(CHECKS) == CHECK_NAMES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a tiny model on whatever device is there (the CPU here)")
    p.add_argument("--out", default="runs/gpu_check/gpu_check.json", help="the JSON report, rewritten after each check")
    p.add_argument("--md", default=None, help="the Markdown table (default: --out with .md)")
    p.add_argument("--only", default=None, help=f"comma-separated checks to run, of: {', '.join(CHECK_NAMES)}")
    p.add_argument("--work", default="runs/gpu_check/work", help="folder for the corpus, the trainer's runs, logs")
    p.add_argument("--budget", type=float, default=None, help="seconds after which no check or rung starts")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available)")
    p.add_argument("--cpu-logits", nargs=2, metavar=("RUN", "OUT"), help=argparse.SUPPRESS)  # internal worker
    args = p.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()] if args.only else list(CHECK_NAMES)
    unknown = [name for name in args.only if name not in CHECKS]
    if unknown:
        raise UserError(f"--only: unknown check(s) {', '.join(unknown)}; choose from {', '.join(CHECK_NAMES)}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to torch here")
    if not (args.smoke or args.cpu_logits or args.device.startswith("cuda")):
        raise UserError("the full check trains GPT-2 124M and needs a CUDA device; on a CPU run it with --smoke")
    if args.budget is None:
        args.budget = 450.0 if args.device.startswith("cuda") and not args.smoke else math.inf
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one bar per loaded model would bury the results
    if args.cpu_logits:
        cpu_logits_worker(*args.cpu_logits)
        return 0
    device = torch.device(args.device)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    found = versions()
    report: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/gpu_check.py", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "device": describe_device(device),
        "versions": found,
        "tested_versions": TESTED_VERSIONS,
        "version_differences": version_differences(found),
        "goal": None,
        "compile_seconds": {},  # the compile check's first step, the trainer's first step: each minus a steady one
        "peak_memory_bytes": {},  # the compile check's training step (the ladder's rungs have their own)
        "running": None,
        "finished": False,
        "checks": [],
        "rungs": [],
    }
    ctx = Context(args, device, SMOKE_SHAPE if args.smoke else GPU_SHAPE, work, report)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as the trainer
    print(f"gpu_check on {report['device']['name']}: {', '.join(args.only)}", file=sys.stderr)
    for name in args.only:
        report["running"] = name
        ctx.write()
        tick = time.perf_counter()
        entry: dict[str, Any] = {"name": name}
        if ctx.elapsed() > args.budget:
            entry.update(ok=None, detail=f"skipped: time budget ({args.budget:.0f} s) spent")
        else:
            try:
                entry.update(ok=True, detail=CHECKS[name](ctx))
            except Skip as why:
                entry.update(ok=None, detail=f"skipped: {why}")
            except Exception as err:  # a failed check is recorded and the others still run
                entry.update(ok=False, detail=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        entry["seconds"] = round(time.perf_counter() - tick, 2)
        if device.type == "cuda":  # give the check's cached blocks back: the trainer's processes need them
            gc.collect()
            torch.cuda.empty_cache()
        report["checks"].append(entry)
        report["running"] = None
        result = {True: "ok", False: "FAILED", None: "skipped"}[entry["ok"]]
        print(f"  {name:>15}: {result} ({entry['seconds']:.1f} s) {entry['detail']}", file=sys.stderr)
        ctx.write()
    report["finished"] = True
    ctx.write()
    print(markdown(report))
    print(f"wrote {args.out} and {markdown_path(args)}", file=sys.stderr)
    return 1 if any(c["ok"] is False for c in report["checks"]) else 0


if __name__ == "__main__":
    run_command(main)
