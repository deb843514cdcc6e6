"""The checks of `benchmarks/gpu_check.py` (the runner: its docstring lists them and their order), a module
per group:

  common      Skip, the two shapes (the GPU's, --smoke's), the Context the checks share, numeric helpers
  environment the environment check; package versions and the device, for the report
  kernels     tf32, model_vs_gpt2, flash_attention, chunked_loss, fused_adamw, generate_cache, compile
  launch      child processes: the trainer's command, launching, killing and waiting, its logged metrics
  trainer     data_prep and trainer
  fsdp        fsdp
  evaluation  eval and exports_on_cpu (and the CPU worker the latter starts)
  ladder      ladder
  report      the Markdown table and the atomic writes of the report

Each check is a function of the Context that returns a one-line detail (and may add to ctx.report); Skip
says it does not apply.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The GPU machine runs from the repository with nothing installed: the project and benchmarks/ (bench_ladder)
# go first on the path, before any check imports them.
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GPU machine is offline: never wait on the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
