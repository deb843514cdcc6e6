"""FSDP on CPU processes (gloo): a run of the tiny `cpu-nano` model sharded over 2 processes, resumed on
1, then on 2 again, against the uninterrupted one-process run without FSDP, step for step and bit for
bit; and its gathered export.

Accelerate 1.15 turns FSDP on only for accelerator devices, so the trainer refuses the FSDP launcher
config on a machine without GPUs (test_train_elastic.py). These launches go through
tests/fsdp_on_cpu.py, which makes Accelerate pick its own FSDP path (fully_shard, sharded
`torch.distributed.checkpoint` save and load, gathered `get_state_dict`) for the CPU launch and then
runs the trainer unchanged; run_info.json and the checkpoint files show that the model was sharded.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from trainer_runs import launch_fsdp, metric, nano_args, train_in_process
from transformers import GPT2LMHeadModel

from gpt2_scratch.training.verify import CheckpointError, sharding_problem
from modeling_gpt2_scratch import GPT2ScratchForCausalLM

pytestmark = pytest.mark.usefixtures("one_thread")

# Without clipping (grad_clip 0) FSDP on 2 ranks gives the one-process run's losses and weights bit for
# bit, as DDP does: the reduce-scatter averages (g1 + g2) / 2 exactly. With clipping they differ in the
# last digits, because the norm it scales by is not exact: torch's float32 norm on CPU sums into one
# float32 accumulator (pytorch/pytorch#169237) and is a few 1e-4 low on this model's 1.6M gradients
# (measured against float64: 6e-4 from the whole, 3e-4 from the two halves FSDP's ranks hold); with
# grad_clip 1.0, 8 steps agreed within 1 ulp (9.5e-7 at 10.6) and the weights within 6e-6.
COMMON = dict(max_steps=8, save_interval=4, eval_interval=2, num_samples=0, keep_checkpoints=0, grad_clip=0)
SHARDS = "pytorch_model_fsdp_0"  # Accelerate's sharded model (and optimizer_0): a .distcp file per saving rank


def shard_files(checkpoint: Path) -> list[str]:
    return sorted(path.relative_to(checkpoint).as_posix() for path in checkpoint.rglob("*.distcp"))


def stored_names(export: Path) -> list[str]:
    with safe_open(export / "model.safetensors", framework="pt") as weights:
        return sorted(weights.keys())


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """`one`: 8 steps on one process without FSDP. `fsdp`: steps 1-4 on 2 FSDP processes, 5-6 on 1, 7-8
    on 2, each launch `--resume auto` in the same folder, all with the same val_batches (counted over all
    processes)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    one, fsdp = tmp / "one", tmp / "fsdp"
    train_in_process(nano_args(data_dir, one, **COMMON))
    launch_fsdp(nano_args(data_dir, fsdp, **COMMON, stop_at_step=4), processes=2)
    shards_of = {4: shard_files(fsdp / "checkpoints" / "step_000004")}
    launch_fsdp(nano_args(data_dir, fsdp, **COMMON, stop_at_step=6, resume="auto"), processes=1)
    shards_of[6] = shard_files(fsdp / "checkpoints" / "step_000006")
    launch_fsdp(nano_args(data_dir, fsdp, **COMMON, resume="auto"), processes=2)
    return one, fsdp, shards_of


def test_fsdp_resumed_on_one_process_then_two_logs_the_losses_of_the_uninterrupted_run(runs):
    one, fsdp, shards_of = runs
    info = json.loads((fsdp / "run_info.json").read_text())
    assert info["distributed_type"] == "DistributedType.FSDP" and info["processes"] == 2
    assert info["resumed_from"].endswith("step_000006")
    saved_by = {
        ranks: [f"{part}/__{r}_0.distcp" for part in ("optimizer_0", SHARDS) for r in range(ranks)] for ranks in (1, 2)
    }
    assert shards_of == {4: saved_by[2], 6: saved_by[1]}  # model and optimizer in 2 shards, re-sharded to 1
    assert not list((fsdp / "checkpoints").glob("*/model.safetensors"))  # never an unsharded checkpoint
    for name in ("train/loss", "val/loss"):
        ours, reference = metric(fsdp, name), metric(one, name)
        assert sorted(ours) == sorted(reference) and len(ours) == (8 if name == "train/loss" else 5)
        assert ours == reference, name


def test_the_fsdp_export_holds_the_gathered_weights_and_loads(runs):
    """hf/ (our class) and hf-gpt2/ (transformers' own GPT-2) written from the weights gathered off two
    FSDP ranks: the very tensors of the one-process run's export, and the same logits from both folders."""
    one, fsdp, _ = runs
    assert json.loads((fsdp / "hf" / "export.json").read_text())["step"] == 8
    assert stored_names(fsdp / "hf") == stored_names(one / "hf")  # the tied lm_head is not stored twice
    ours = GPT2ScratchForCausalLM.from_pretrained(fsdp / "hf").eval()
    reference = GPT2ScratchForCausalLM.from_pretrained(one / "hf").eval()
    official = GPT2LMHeadModel.from_pretrained(fsdp / "hf-gpt2").eval()
    weights, expected = ours.state_dict(), reference.state_dict()
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[name], tensor) for name, tensor in expected.items())
    tokens, vocab = torch.tensor([[15496, 11, 314, 1101, 257, 3303, 2746, 11, 50256, 464]]), official.config.vocab_size
    with torch.no_grad():
        logits = ours(tokens).logits[..., :vocab]  # our class keeps the padded vocabulary's rows
        torch.testing.assert_close(official(tokens).logits, logits, atol=1e-5, rtol=1e-5)


def test_an_fsdp_checkpoint_resumed_without_fsdp_is_one_line(runs, data_dir, tmp_path):
    """A launch without FSDP reads model.safetensors, which an FSDP checkpoint does not hold: refused by
    name before Accelerate fails inside its loader."""
    _, fsdp, _ = runs
    out = tmp_path / "plain"
    shutil.copytree(fsdp, out)
    with pytest.raises(CheckpointError, match=f"holds an FSDP model \\({SHARDS}\\), which only an FSDP launch"):
        train_in_process(nano_args(data_dir, out, **COMMON, resume="auto"))


def test_each_kind_of_launch_reads_only_its_own_checkpoints(tmp_path):
    sharded, unsharded = tmp_path / "sharded", tmp_path / "unsharded"
    (sharded / SHARDS).mkdir(parents=True)
    unsharded.mkdir()
    (unsharded / "model.safetensors").write_bytes(b"")
    assert sharding_problem(sharded, fsdp=True) is None and sharding_problem(unsharded, fsdp=False) is None
    assert "which only an FSDP launch reads" in sharding_problem(sharded, fsdp=False)
    problem = sharding_problem(unsharded, fsdp=True)
    assert "which an FSDP launch does not read" in problem and f"--init_from {unsharded}" in problem
