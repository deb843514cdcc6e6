"""gpt2_scratch/training/devices.py: the one device choice of the trainer and every `eval.*` command, and
what each device runs, for machines this one is not (a CUDA GPU with and without bf16 units, Apple silicon), with the
availability injected; and the trainer and the eval commands asking it rather than choosing on their own."""

import logging

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

import gpt2_scratch.training.devices as devices
from eval.common import autocast, launched_accelerator, resolve_device
from gpt2_scratch.training import accelerator as accelerator_setup
from gpt2_scratch.training.config import ConfigError, TrainConfig
from gpt2_scratch.training.devices import Availability
from gpt2_scratch.user_errors import UserError

CPU = Availability(cuda=False)
AMPERE = Availability(cuda=True, cuda_bf16=True)  # A100, H100, RTX 30xx+
T4 = Availability(cuda=True, cuda_bf16=False)  # T4, V100: the free notebook GPUs
MAC = Availability(cuda=False, mps=True, mps_bf16=True)  # Apple silicon, macOS 14+
OLD_MAC = Availability(cuda=False, mps=True, mps_bf16=False)  # macOS 13


def test_cuda_first_then_mps_then_the_cpu():
    assert [devices.pick_device(found).type for found in (CPU, AMPERE, T4, MAC, OLD_MAC)] == [
        "cpu",
        "cuda",
        "cuda",
        "mps",
        "mps",
    ]
    assert devices.pick_device(Availability(cuda=True, mps=True)).type == "cuda"


def test_a_launch_told_to_use_the_cpu_runs_and_picks_its_precision_there(monkeypatch):
    """`accelerate launch --cpu` on a GPU machine: Accelerate runs on the CPU, so `auto` is fp32 there."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # what `accelerate launch --cpu` sets
    assert devices.pick_device(AMPERE).type == "cpu" and devices.resolve_precision("auto", AMPERE) == "no"
    monkeypatch.setenv("ACCELERATE_USE_CPU", "False")  # what every other launch sets
    assert devices.pick_device(AMPERE).type == "cuda"


def test_auto_is_the_fastest_precision_that_trains_correctly_on_each_device():
    expected = {CPU: "no", AMPERE: "bf16", T4: "fp16", MAC: "bf16", OLD_MAC: "no"}
    assert {found: devices.resolve_precision("auto", found) for found in expected} == expected
    assert all(devices.resolve_precision(p, T4) == p for p in ("no", "bf16", "fp16"))  # explicit stays
    # evaluation autocasts as `auto` trains, without a loss scale (no backward)
    dtypes = {found: devices.inference_dtype(devices.pick_device(found), found) for found in expected}
    assert dtypes == {CPU: None, AMPERE: torch.bfloat16, T4: torch.float16, MAC: torch.bfloat16, OLD_MAC: None}


def test_a_precision_the_device_cannot_run_is_refused_with_what_to_use():
    assert "fp16 needs a GPU" in devices.precision_problem("fp16", "cpu", CPU)
    assert "no bf16 units" in devices.precision_problem("bf16", "cuda", T4)
    assert "macOS 14" in devices.precision_problem("bf16", "mps", OLD_MAC)
    for setting, device, found in [("fp16", "cuda", T4), ("bf16", "cuda", AMPERE), ("bf16", "mps", MAC)]:
        assert devices.precision_problem(setting, device, found) is None
    assert devices.precision_problem("fp16", "mps", MAC) is None  # Accelerate's GradScaler("mps"), torch >= 2.8
    assert devices.precision_problem("bf16", "cpu", CPU) is None and devices.precision_problem("no", "cpu") is None


def test_fused_adamw_and_compile_where_pytorch_has_them():
    assert all(devices.fused_adamw_supported(torch.device(t)) for t in ("cuda", "cpu", "mps"))
    assert not devices.fused_adamw_supported(torch.device("meta"))
    assert devices.compile_supported("cuda") and devices.compile_supported("cpu")
    assert not devices.compile_supported("mps")


def test_compile_without_its_backend_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CXX", "")
    assert "needs a C++ compiler" in devices.compile_problem("cpu")
    compiler = tmp_path / "c++"
    compiler.write_text("#!/bin/sh\n")
    compiler.chmod(0o755)
    assert devices.compile_problem("cpu") is None
    import torch.utils._triton as triton

    monkeypatch.setattr(triton, "has_triton", lambda: False)
    assert "needs Triton" in devices.compile_problem("cuda")


def test_parse_device_accepts_only_what_the_machine_has():
    assert devices.parse_device("mps", MAC) == torch.device("mps")
    with pytest.raises(UserError, match="no MPS device"):
        devices.parse_device("mps", CPU)
    with pytest.raises(UserError, match="0 CUDA device"):
        devices.parse_device("cuda", MAC)
    with pytest.raises(UserError, match="only cpu, cuda and mps"):
        devices.parse_device("meta", CPU)


@pytest.fixture
def on_a_mac(monkeypatch):
    """This machine as Apple silicon to `gpt2_scratch.training.devices` (Accelerate still sees the CPU it is)."""
    monkeypatch.setattr(devices, "availability", lambda: MAC)


def test_eval_commands_pick_the_device_the_trainer_does(on_a_mac):
    assert resolve_device() == torch.device("mps")  # every eval.* command's default (--device unset)
    assert resolve_device(device="cpu") == torch.device("cpu")
    assert isinstance(autocast(torch.device("mps")), torch.autocast)  # bf16, as `auto` trains there
    assert launched_accelerator() is None  # not under a launcher: no Accelerator


class Lines(logging.Handler):
    """The messages of the records a logger emits."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_the_trainer_turns_compile_off_on_mps_with_one_log_line(on_a_mac, monkeypatch):
    from accelerate.utils import DynamoBackend

    picked = []
    monkeypatch.setattr(accelerator_setup, "pick_device", lambda: picked.append(1) or torch.device("mps"))
    config = TrainConfig(compile=True, mixed_precision="no", report_to="none")
    logged = Lines()
    accelerator_setup.logger.addHandler(logged)
    try:
        accelerator = accelerator_setup.build_accelerator(config)
        backend = accelerator.state.dynamo_plugin.backend
    finally:
        accelerator_setup.logger.removeHandler(logged)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert picked == [1]
    assert backend == DynamoBackend.NO
    assert [line for line in logged.lines if "compile" in line] == [
        "compile: off on mps (inductor's backend there is a prototype); training eager"
    ]


def test_the_trainer_refuses_a_precision_the_device_cannot_run(monkeypatch):
    monkeypatch.setattr(devices, "availability", lambda: T4)
    monkeypatch.setattr(accelerator_setup, "pick_device", lambda: torch.device("cuda"))
    with pytest.raises(ConfigError, match="no bf16 units"):
        accelerator_setup.build_accelerator(TrainConfig(mixed_precision="bf16"))


def test_free_memory_on_a_mac_is_unknown_not_a_crash(monkeypatch):
    """macOS has no /proc/meminfo and no SC_AVPHYS_PAGES (os.sysconf raises ValueError): the memory check
    before training gets None (and skips) instead of the traceback that stopped every run there."""
    import os

    import gpt2_scratch.training.memory as memory

    def no_proc(*args, **kwargs):
        raise FileNotFoundError("/proc/meminfo")

    def mac_sysconf(name):
        if name == "SC_AVPHYS_PAGES":
            raise ValueError("unrecognized configuration name")
        return 16384

    monkeypatch.setattr(memory, "open", no_proc, raising=False)
    monkeypatch.setattr(os, "sysconf", mac_sysconf)
    assert memory.available_bytes(torch.device("mps")) is None
    assert memory.available_bytes(torch.device("cpu")) is None
