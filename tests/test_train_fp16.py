"""fp16 with loss scaling (`--mixed_precision fp16`, what `auto` is on CUDA GPUs without bf16), run on the CPU.

A loss-scale overflow is normal in fp16 training: the scaler skips that update and halves the scale.
The trainer used to skip `optimizer.step()` itself whenever the gradient norm was not finite, and with it
Accelerate's `scaler.update()`: the scale never dropped and every later step overflowed (issue 26). Here a
real `torch.amp.GradScaler("cpu")` sits where Accelerate keeps its scaler (tests/fp16_on_cpu.py does what
Accelerate does on a GPU), forward passes run under `torch.autocast("cpu", float16)`, and a large initial
scale forces the first steps to overflow. Checked against what a user relies on: the scale halves at each
overflow and training goes on, every record equals a reference loop written with plain `GradScaler`, the
overflows are logged as such and never trip the divergence guard, the scaler's state is in the checkpoint,
and SIGKILL then `--resume auto` gives the very same losses and scales.
"""

import copy
import json
import math

import fp16_on_cpu
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from trainer_runs import ROOT, kill_at_step, metric, nano_args, records, run_cli, train_in_process

from gpt2_scratch.training import accelerator as accelerator_setup
from gpt2_scratch.training.checkpoints import latest_checkpoint
from gpt2_scratch.training.config import TrainConfig
from gpt2_scratch.training.guard import MIN_LOSS_SCALE, Guard
from gpt2_scratch.training.recipe import build_optimizer
from gpt2_scratch.training.step import train_step
from modeling_gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM

pytestmark = pytest.mark.usefixtures("one_thread")

# 2**20 with fp16 autocast: the first steps' scaled gradients overflow fp16 (65504), the scale halves down to
# where they fit; growth every 3 clean steps makes it grow and overflow again within a few steps.
SCALER = {"FP16_INIT_SCALE": str(2.0**20), "FP16_GROWTH_INTERVAL": "3"}


class Batches:
    """Random (x, y) micro-batches of the cpu-nano shape, the same sequence for every instance."""

    def __init__(self):
        self.generator = torch.Generator().manual_seed(0)

    def next_batch(self):
        tokens = torch.randint(0, 50257, (4, 33), generator=self.generator)
        return tokens[:, :-1], tokens[:, 1:]


def trainer_steps(base, steps: int, accumulation: int, init_scale: float) -> tuple[list[tuple], list]:
    """`train_step` under Accelerate's fp16 with a real CPU GradScaler put where Accelerate keeps it."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True, mixed_precision="fp16", gradient_accumulation_steps=accumulation)
    assert accelerator.scaler is None  # Accelerate makes none on a CPU: installed as it does on a GPU
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=3)
    model = copy.deepcopy(base)
    optimizer = build_optimizer(model, TrainConfig(max_lr=1e-3, warmup_steps=0), torch.device("cpu"))
    model, optimizer = accelerator.prepare(model, optimizer)
    assert optimizer.scaler is accelerator.scaler
    loader, results = Batches(), []
    for _ in range(steps):
        before = [p.detach().clone() for p in model.parameters()]
        result = train_step(model, optimizer, loader, accelerator, grad_clip=1.0)
        changed = any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
        results.append((*result, changed))
    GradientState._reset_state()
    return results, [p.detach().clone() for p in model.parameters()]


def reference_steps(base, steps: int, accumulation: int, init_scale: float) -> tuple[list[tuple], list]:
    """The same training written as PyTorch's AMP recipe, without Accelerate or the trainer."""
    model = copy.deepcopy(base)
    optimizer = build_optimizer(model, TrainConfig(max_lr=1e-3, warmup_steps=0), torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=3)
    loader, results = Batches(), []
    for _ in range(steps):
        before = [p.detach().clone() for p in model.parameters()]
        loss_sum = torch.zeros(())
        for _ in range(accumulation):
            x, y = loader.next_batch()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = model(input_ids=x, shift_labels=y, loss_only=True).loss.float()
            scaler.scale(loss / accumulation).backward()
            loss_sum += loss.detach()
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        changed = any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
        loss = (loss_sum / accumulation).item()
        results.append((loss, norm.item(), scaler.get_scale() < scale, scaler.get_scale(), changed))
    return results, [p.detach().clone() for p in model.parameters()]


def same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def test_overflows_lower_the_scale_and_training_goes_on_as_a_plain_gradscaler_loop():
    torch.manual_seed(0)
    base = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("cpu-nano"))
    ours, our_weights = trainer_steps(base, steps=10, accumulation=2, init_scale=2.0**24)
    theirs, their_weights = reference_steps(base, steps=10, accumulation=2, init_scale=2.0**24)

    overflowed = [r[2] for r in ours]
    assert overflowed[0] and not all(overflowed)  # forced at first, then training goes on
    scales = [2.0**24] + [r[3] for r in ours]
    for was, (_, norm, overflow, scale, changed) in zip(scales, ours, strict=False):
        # an overflow: the update is skipped, the scale halved; else the weights move (and, every 3rd clean
        # step, the scale doubles)
        if overflow:
            assert scale == was / 2 and not math.isfinite(norm) and not changed
        else:
            assert changed and scale >= was
    # the records and the weights equal the plain GradScaler loop's, bit for bit
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert a[2:] == b[2:] and same(a[0], b[0]) and same(a[1], b[1]), (a, b)
    for a, b in zip(our_weights, their_weights, strict=True):
        assert torch.equal(a, b)


def test_the_guard_counts_overflows_apart_and_judges_a_collapsing_scale_as_divergence():
    guard = Guard(TrainConfig(max_bad_steps=2))
    assert guard.judge(10.8, math.inf, overflow=True, loss_scale=32768.0) == {"overflow": True}
    assert guard.judge(10.8, math.nan, overflow=True, loss_scale=16384.0) == {"overflow": True}
    assert (guard.overflows, guard.skipped, guard.streak) == (2, 0, 0) and not guard.must_roll_back
    assert guard.judge(10.7, 1.0, overflow=False, loss_scale=16384.0) is None
    # a non-finite loss is bad whatever the scaler did with it
    assert guard.judge(math.nan, math.nan, overflow=True, loss_scale=8192.0) == {"skipped": "non-finite loss"}
    # gradients that overflow even at a scale below 1 have diverged
    problem = guard.judge(10.8, math.inf, overflow=True, loss_scale=MIN_LOSS_SCALE / 2)
    assert problem["skipped"].startswith("loss scale collapsed to 0.5") and guard.must_roll_back
    assert (guard.overflows, guard.skipped, guard.streak) == (3, 2, 2)

    restored = Guard(TrainConfig(max_bad_steps=2))
    restored.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert restored.state_dict() == guard.state_dict() and restored.overflows == 3
    older = {k: v for k, v in guard.state_dict().items() if k != "overflows"}  # a checkpoint from before fp16
    restored.load_state_dict(older)
    assert restored.overflows == 0 and restored.skipped == 2


# dropout off and a 40-step schedule stopped at 12 (its LR still high), as test_train_bf16_cpu.py does
FP16 = dict(dropout=0.0, max_steps=40, stop_at_step=12, save_interval=4, eval_interval=5, mixed_precision="fp16")


@pytest.fixture
def cpu_scaler(monkeypatch):
    """tests/fp16_on_cpu.py's patches, in this process, for the in-process runs."""
    for name, value in SCALER.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(Accelerator, "__init__", fp16_on_cpu.init_with_cpu_scaler)
    monkeypatch.setattr(accelerator_setup, "precision_problem", fp16_on_cpu.precision_problem_but_cpu_fp16)


def test_fp16_run_logs_overflows_resumes_exactly_after_sigkill(cpu_scaler, data_dir, tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "killed"
    train_in_process(nano_args(data_dir, reference, **FP16))
    info = json.loads((reference / "run_info.json").read_text())
    assert info["mixed_precision"] == "fp16"
    logged = [r for r in records(reference) if "train/loss" in r]
    assert [r["step"] for r in logged] == list(range(1, 13))
    overflows = [r for r in logged if r.get("overflow")]
    assert overflows and overflows[0]["step"] == 1 and len(overflows) < len(logged)  # forced, then goes on
    scales = [2.0**20] + [r["loss_scale"] for r in logged]
    assert all(r["loss_scale"] == was / 2 for was, r in zip(scales, logged, strict=False) if r.get("overflow"))
    counted = [sum(1 for o in overflows if o["step"] <= r["step"]) for r in logged]
    assert [r["overflow_steps"] for r in logged] == counted
    assert all(r["skipped_steps"] == 0 for r in logged)  # not divergence: nothing skipped by the guard
    assert not any("rollback" in r or "skipped" in r for r in records(reference))
    losses = metric(reference, "train/loss")
    assert losses[12] < losses[1] - 0.5  # it learns
    # the scaler's state is in every checkpoint, listed in its manifest
    for step in (8, 12):  # the newest two are kept
        folder = reference / "checkpoints" / f"step_{step:06d}"
        assert "scaler.pt" in json.loads((folder / "checkpoint.json").read_text())["files"]
        saved = torch.load(folder / "scaler.pt", weights_only=True)
        assert saved["scale"] == next(r["loss_scale"] for r in logged if r["step"] == step)

    # killed after step 6 (the checkpoint of step 4 holds a grown scale and a growth tracker mid-count)
    kill_at_step(nano_args(data_dir, out, **FP16), out, 6, script=ROOT / "tests" / "fp16_on_cpu.py", env=SCALER)
    newest = latest_checkpoint(out / "checkpoints")
    assert newest is not None and newest.name < "step_000012"
    train_in_process(nano_args(data_dir, out, resume="auto", **FP16))
    assert json.loads((out / "run_info.json").read_text())["resumed_from"] == str(newest)
    for name in ("train/loss", "val/loss", "loss_scale", "overflow_steps", "grad_norm"):
        assert metric(out, name) == metric(reference, name), name


def test_auto_on_a_gpu_without_bf16_trains_fp16_and_says_so(cpu_scaler, data_dir, tmp_path, monkeypatch):
    """`--mixed_precision auto` (the default) on a CUDA GPU without bf16 units (a T4 or V100, injected
    into `gpt2_scratch.training.devices`; Accelerate still runs on this CPU, with the CPU GradScaler): the run trains
    fp16 with loss scaling, and run_info.json, the checkpoint's settings and the model card say so."""
    import gpt2_scratch.training.devices as devices

    monkeypatch.setattr(devices, "availability", lambda: devices.Availability(cuda=True, cuda_bf16=False))
    monkeypatch.setattr(accelerator_setup, "pick_device", lambda: torch.device("cuda"))
    out = tmp_path / "auto"
    train_in_process(nano_args(data_dir, out, **{**FP16, "mixed_precision": "auto", "stop_at_step": 4}))
    assert json.loads((out / "run_info.json").read_text())["mixed_precision"] == "fp16"
    state = json.loads((out / "checkpoints" / "step_000004" / "train_state.json").read_text())
    assert state["settings"]["mixed_precision"] == "fp16"
    trained = [r for r in records(out) if "train/loss" in r]
    assert all("loss_scale" in r for r in trained) and trained[0]["overflow"]  # the scaler is on
    for export in ("hf", "hf-gpt2"):
        assert "| `mixed_precision` | `auto (fp16, loss-scaled)` |" in (out / export / "README.md").read_text()


def test_fp16_on_a_cpu_and_compile_without_a_backend_are_one_line_errors(data_dir, tmp_path):
    """As a user runs the trainer: one `error:` line, exit status 2, nothing written."""
    fp16 = run_cli(nano_args(data_dir, tmp_path / "fp16", mixed_precision="fp16"))
    assert fp16.returncode == 2 and fp16.stderr.strip().splitlines()[-1].startswith(
        "error: mixed_precision fp16 needs a GPU (CUDA, or MPS on Apple silicon)"
    )
    # no C++ compiler on PATH (the interpreter is run by its full path)
    compiled = run_cli(
        nano_args(data_dir, tmp_path / "compile", compile="true"), env={"PATH": str(tmp_path), "CXX": ""}
    )
    assert compiled.returncode == 2 and compiled.stderr.strip().splitlines()[-1].startswith(
        "error: compile: torch.compile's inductor needs a C++ compiler on the CPU"
    )
    for done in (fp16, compiled):
        assert sum(line.startswith("error:") for line in done.stderr.splitlines()) == 1
        assert "Traceback" not in done.stderr
    assert not (tmp_path / "fp16").exists() and not (tmp_path / "compile").exists()
