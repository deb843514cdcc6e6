"""Run train_accelerate.py under fp16 with a real loss scaler on the CPU (test only).

Accelerate 1.16 makes a `GradScaler` only for fp16 on a non-CPU device (`Accelerator.__init__` in
accelerate/accelerator.py: `native_amp` on and `self.scaler = get_grad_scaler(...)`), and the trainer
refuses `--mixed_precision fp16` on a CPU, where Accelerate would train fp32 and report fp16. This file
does what that branch does on a GPU, for a CPU launch that asks for fp16: `native_amp` on (so `prepare`
wraps the forward in `torch.autocast("cpu", float16)` and `clip_grad_norm_` unscales) and a real
`torch.amp.GradScaler("cpu")` where Accelerate keeps it, before `prepare` hands it to the optimizer.
Then it runs the trainer unchanged:

    FP16_INIT_SCALE=1048576 FP16_GROWTH_INTERVAL=3 python tests/fp16_on_cpu.py [trainer flags]

A caller's `GradScalerKwargs` are honoured, as Accelerate does; without them the environment sets the
scaler. A large initial scale forces the first steps' gradients to overflow, as the first steps of fp16 training
on a GPU do (65536 there, GradScaler's default); a short growth interval makes the scale grow and fall
again within a test's few steps. Everything else (the scaler, autocast, the checkpoint's scaler.pt) is
Accelerate's and torch's own code.
"""

import os
import runpy
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from gpt2_scratch.training import devices

_accelerator_init = Accelerator.__init__
_precision_problem = devices.precision_problem


def scaler_settings() -> dict:
    return {
        "init_scale": float(os.environ.get("FP16_INIT_SCALE", 2.0**16)),
        "growth_interval": int(os.environ.get("FP16_GROWTH_INTERVAL", 2000)),
    }


def init_with_cpu_scaler(self, *args, **kwargs) -> None:
    _accelerator_init(self, *args, **kwargs)
    if self.state.mixed_precision == "fp16" and self.device.type == "cpu":
        # what Accelerator.__init__ does for fp16 on a GPU (accelerate/accelerator.py, 1.16)
        self.native_amp = True
        kwargs = self.scaler_handler.to_kwargs() if self.scaler_handler is not None else scaler_settings()
        self.scaler = torch.amp.GradScaler("cpu", **kwargs)


def precision_problem_but_cpu_fp16(setting: str, device_type: str, found=None) -> str | None:
    if setting == "fp16" and device_type == "cpu":
        return None
    return _precision_problem(setting, device_type, found)


def install() -> None:
    """Patch Accelerate and the trainer's precision check as described above (this process only)."""
    Accelerator.__init__ = init_with_cpu_scaler
    devices.precision_problem = precision_problem_but_cpu_fp16


if __name__ == "__main__":
    install()
    trainer = Path(__file__).resolve().parents[1] / "train_accelerate.py"
    sys.path.insert(0, str(trainer.parent))
    sys.argv[0] = str(trainer)
    runpy.run_path(str(trainer), run_name="__main__")
