"""bf16 autocast, the path of every GPU run (`--mixed_precision auto` is bf16 on CUDA), run on CPU.

Accelerate 1.15 runs `mixed_precision="bf16"` on CPU as on a GPU: `native_amp` is on for CPU devices
(`Accelerator.__init__`) and `prepare` wraps the model's forward in `torch.autocast("cpu", bfloat16)`
(`get_mixed_precision_context_manager`), so the matmuls run in bf16 (natively on CPUs with AVX-512 BF16
or AMX) while the weights, their gradients and AdamW's moments stay float32. These whole `cpu-nano`
runs check what a GPU user relies on: the run says bf16 and tracks the fp32 run, the checkpoint and
both exports hold float32 weights that load in transformers, SIGKILL and `--resume auto` continue with
the very same losses, 2 DDP processes train as 1 process with twice the accumulation, FSDP2 under bf16
stays close to DDP and resumes from its shards, and a resume compares the precision trained in.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from trainer_runs import kill_at_step, launch_fsdp, metric, nano_args, train_in_process, train_two_processes
from transformers import GPT2LMHeadModel

from gpt2_scratch.training.checkpoints import latest_checkpoint, run_settings
from gpt2_scratch.training.config import TrainConfig
from gpt2_scratch.training.recipe import resolve_mixed_precision
from gpt2_scratch.training.verify import CheckpointError, settings_changes
from modeling_gpt2_scratch import GPT2ScratchForCausalLM

pytestmark = pytest.mark.usefixtures("one_thread")

# Dropout off: the DDP ranks draw other dropout masks than one process does, and one bf16 run of 16
# steps serves as the reference of every test below. The 40-step schedule is stopped at 16 (its LR
# still high), so that a launch is killed well before its end.
COMMON = dict(dropout=0.0, max_steps=40, stop_at_step=16, save_interval=4, eval_interval=5)
BF16 = dict(COMMON, mixed_precision="bf16")
FINAL = "step_000016"


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """`fp32` and `bf16`: the same 16 steps without and with bf16 autocast, in this process."""
    tmp = tmp_path_factory.mktemp("bf16")
    train_in_process(nano_args(data_dir, tmp / "fp32", **COMMON, mixed_precision="no"))
    train_in_process(nano_args(data_dir, tmp / "bf16", **BF16))
    return tmp


def test_the_bf16_run_says_so_and_tracks_the_fp32_run(runs):
    info = {name: json.loads((runs / name / "run_info.json").read_text()) for name in ("fp32", "bf16")}
    assert info["bf16"]["mixed_precision"] == "bf16" and info["fp32"]["mixed_precision"] == "no"
    bf16, fp32 = metric(runs / "bf16", "train/loss"), metric(runs / "fp32", "train/loss")
    assert sorted(bf16) == list(range(1, 17)) and bf16[16] < bf16[1] - 1.0  # 10.80 -> 9.48 measured
    assert bf16 != fp32  # autocast was on: bf16 matmuls round differently from step 1
    # Measured: at most 1.9e-5 relative on these 16 train losses, 2.5e-5 on the 4 val losses (of this
    # tiny model; the 124M model's bf16 error against fp32 is what benchmarks/gpu_check.py reports).
    assert bf16 == pytest.approx(fp32, rel=1e-4)
    val_bf16, val_fp32 = metric(runs / "bf16", "val/loss"), metric(runs / "fp32", "val/loss")
    assert sorted(val_bf16) == [0, 5, 10, 15] and val_bf16[15] < val_bf16[0] - 1.0
    assert val_bf16 == pytest.approx(val_fp32, rel=1e-4)


def test_checkpoint_and_exports_of_a_bf16_run_hold_float32_weights_that_load(runs):
    """Autocast computes in bf16 but keeps the master weights and AdamW's moments float32: the
    checkpoint and both exports hold them, finite, and the two exports give the same logits."""
    out = runs / "bf16"
    checkpoint = out / "checkpoints" / FINAL
    weights = load_file(checkpoint / "model.safetensors")
    exported = load_file(out / "hf" / "model.safetensors")
    official = load_file(out / "hf-gpt2" / "model.safetensors")
    for tensors in (weights, exported, official):
        assert {t.dtype for t in tensors.values()} == {torch.float32}
        assert all(torch.isfinite(t).all() for t in tensors.values())
    assert exported.keys() <= weights.keys() and all(torch.equal(weights[k], t) for k, t in exported.items())
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=True, map_location="cpu")
    moments = [t for state in optimizer["state"].values() for t in state.values() if t.dim() > 0]
    assert moments and {t.dtype for t in moments} == {torch.float32}
    for folder in ("hf", "hf-gpt2"):
        assert json.loads((out / folder / "config.json").read_text())["dtype"] == "float32"
        assert json.loads((out / folder / "export.json").read_text())["step"] == 16

    ours = GPT2ScratchForCausalLM.from_pretrained(out / "hf").eval()
    gpt2 = GPT2LMHeadModel.from_pretrained(out / "hf-gpt2").eval()
    assert ours.dtype == gpt2.dtype == torch.float32
    tokens, vocab = torch.tensor([[15496, 11, 314, 1101, 257, 3303, 2746, 11, 50256, 464]]), gpt2.config.vocab_size
    with torch.no_grad():
        logits = ours(tokens).logits[..., :vocab]  # our class keeps the padded vocabulary's rows
        torch.testing.assert_close(gpt2(tokens).logits, logits, atol=1e-5, rtol=1e-5)


def test_sigkill_then_resume_auto_under_bf16_logs_the_same_losses(runs, data_dir, tmp_path):
    """Bit for bit on CPU: the resumed launch runs the same bf16 kernels on the same shapes and thread
    count from the same float32 weights, optimizer state, RNG and data position."""
    out = tmp_path / "killed"
    kill_at_step(nano_args(data_dir, out, **BF16), out, 6)
    newest = latest_checkpoint(out / "checkpoints")
    assert newest is not None and newest.name < FINAL, "the run was to be killed before its end"
    train_in_process(nano_args(data_dir, out, resume="auto", **BF16))
    info = json.loads((out / "run_info.json").read_text())
    assert info["resumed_from"] == str(newest) and info["mixed_precision"] == "bf16"
    reference = runs / "bf16"
    assert sorted(metric(out, "train/loss")) == list(range(1, 17))
    assert metric(out, "train/loss") == metric(reference, "train/loss")
    assert metric(out, "val/loss") == metric(reference, "val/loss")


def test_two_processes_under_bf16_match_one_process_with_twice_the_accumulation(runs, data_dir, tmp_path):
    """Bit for bit: each micro-batch's gradient comes from the same bf16 kernels on the same shapes in
    both, and halving is exact in binary, so the all-reduce's (g1 + g2) / 2 equals the float32 sum
    g1 / 2 + g2 / 2 that one process accumulates."""
    two = tmp_path / "two"
    # val_batches counts the batches of all processes: 2 ranks x 1 batch read the same val chunks as 1 x 2.
    done = train_two_processes(nano_args(data_dir, two, **{**BF16, "stop_at_step": 8}))
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((two / "run_info.json").read_text())
    assert (info["processes"], info["gradient_accumulation_steps"], info["mixed_precision"]) == (2, 1, "bf16")
    one = runs / "bf16"
    assert metric(two, "train/loss") == {step: loss for step, loss in metric(one, "train/loss").items() if step <= 8}
    assert metric(two, "val/loss") == {step: loss for step, loss in metric(one, "val/loss").items() if step <= 8}


def test_fsdp_under_bf16_tracks_ddp_and_resumes_from_its_shards(runs, data_dir, tmp_path):
    """FSDP2 on 2 CPU processes (through tests/fsdp_on_cpu.py): steps 1-4, then `--resume auto` from the
    sharded checkpoint to step 8. Under bf16 the blocks compute with bf16 copies of all their weights
    (Accelerate's MixedPrecisionPolicy; autocast alone casts only the matmuls' inputs), so the
    losses are close to the DDP run's, not equal: measured at most 4e-5 relative (2.7e-5 for val/loss),
    and steps 5-8 after the resume equal an uninterrupted FSDP launch's (checked once). The trainer reduces
    the gradients in float32 and leaves the outputs uncast: run_info.json records the policy the launch
    ran with. (Accelerate 1.16's own policy, a bf16 reduce, measured 4.1e-5 here: docs/training.md.)"""
    out = tmp_path / "fsdp"
    launch_fsdp(nano_args(data_dir, out, **{**BF16, "stop_at_step": 4}), processes=2)
    launch_fsdp(nano_args(data_dir, out, **{**BF16, "stop_at_step": 8}, resume="auto"), processes=2)
    info = json.loads((out / "run_info.json").read_text())
    assert (info["distributed_type"], info["processes"], info["mixed_precision"]) == ("DistributedType.FSDP", 2, "bf16")
    # the policy the trainer sets (keep_fsdp_gradients_fp32), as the launch ran it
    policy = {"param_dtype": "bfloat16", "reduce_dtype": "float32", "output_dtype": None}
    assert info["fsdp_mixed_precision"] == policy
    assert info["resumed_from"].endswith("step_000004")
    sharded = out / "checkpoints" / "step_000004"
    shards = sorted(path.relative_to(sharded).as_posix() for path in sharded.rglob("*.distcp"))
    assert shards == [
        f"{part}/__{rank}_0.distcp" for part in ("optimizer_0", "pytorch_model_fsdp_0") for rank in (0, 1)
    ]
    one = runs / "bf16"
    for name in ("train/loss", "val/loss"):
        reference = {step: loss for step, loss in metric(one, name).items() if step <= 8}
        assert metric(out, name) == pytest.approx(reference, rel=2e-4), name
    assert {t.dtype for t in load_file(out / "hf" / "model.safetensors").values()} == {torch.float32}


def test_a_bf16_checkpoint_resumed_in_fp32_is_refused(runs, data_dir, tmp_path):
    out = tmp_path / "fp32"
    shutil.copytree(runs / "bf16", out)
    with pytest.raises(CheckpointError, match="mixed_precision: 'bf16' -> 'no'"):
        train_in_process(nano_args(data_dir, out, **{**COMMON, "stop_at_step": 20}, resume="auto"))


def test_resume_compares_the_precision_trained_in_not_its_spelling():
    """'auto' is recorded as what it resolved to: a run started with the default resumes with the
    precision it chose spelled out (on a GPU: auto -> bf16, resumed with --mixed_precision bf16), and a
    checkpoint of an 'auto' run on a GPU is refused on a CPU where 'auto' means fp32."""
    here = resolve_mixed_precision("auto")  # "no" on a CPU, "bf16" on a GPU that runs it
    other = "bf16" if here == "no" else "no"

    def settings(precision: str) -> dict:
        return run_settings(TrainConfig(mixed_precision=precision), "data", 1)

    assert settings_changes(settings("auto"), settings(here)) == []
    assert settings_changes(settings(here), settings("auto")) == []
    assert settings_changes(settings("auto"), settings(other)) == [f"mixed_precision: {here!r} -> {other!r}"]
    # checkpoints written before the resolved value was recorded hold 'auto': read as what it means here
    legacy = {**settings(here), "mixed_precision": "auto"}
    assert settings_changes(legacy, settings("auto")) == [] and settings_changes(legacy, settings(here)) == []
    assert settings_changes(legacy, settings(other)) == [f"mixed_precision: {here!r} -> {other!r}"]
