"""The divergence guard (gpt2_scratch/training/guard.py) in real runs of the tiny `cpu-nano` model: an absurd learning
rate (`--max_lr 50`) whose updates overflow, and a window of training data crafted to make the loss
spike. Each is checked against what a user relies on: no NaN or infinity ever reaches a checkpoint or
an export, the rollback lands on the newest finite checkpoint and continues from the data after the
bad steps (re-computed here independently), identical runs roll back identically, and a run that
keeps diverging stops with one `error:` line and exit status 3."""

import json
import math
import re
import shutil
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from trainer_runs import ROOT, nano_args, records, run_cli, train_in_process

from data_prep.shards import load_tokens, read_manifest, write_shard
from data_prep.shards import write_manifest as write_data_manifest
from gpt2_scratch.training.checkpoints import load_weights, newest_finite_checkpoint, prune_checkpoints, write_manifest
from gpt2_scratch.training.config import ConfigError, TrainConfig
from gpt2_scratch.training.guard import Guard, weights_finite
from gpt2_scratch.training.verify import STATE_FILE, checkpoint_problems
from modeling_gpt2_scratch import GPT2ScratchForCausalLM

pytestmark = pytest.mark.usefixtures("one_thread")

TIMING = ("tokens_per_s", "mfu", "step_time")  # the only fields two identical runs may differ in
SEQ_LEN, MICRO_BATCH, ACCUMULATION = 32, 4, 2  # nano_args: 256 tokens per step in one process


def without_timing(out_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records(out_dir)]


def all_finite(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(path).values())


def step_batches(data_dir: Path, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The micro-batches of optimizer step `step` (1-based) of a one-process nano run: the loader's
    global order, read the way a user's own script would."""
    from data_prep import ShardLoader

    loader = ShardLoader(data_dir, batch_size=MICRO_BATCH, seq_len=SEQ_LEN, seed=1337)
    for _ in range((step - 1) * ACCUMULATION):
        loader.next_batch()
    return [loader.next_batch() for _ in range(ACCUMULATION)]


def poison(data_dir: Path, out: Path, steps: range) -> Path:
    """A copy of `data_dir` whose training chunks of `steps` are random tokens that appear nowhere else
    in it (a model that never saw them gives each a tiny probability); the manifest updated."""
    shutil.copytree(data_dir, out)
    rows = [torch.cat([x, y[:, -1:]], dim=1) for s in steps for x, y in step_batches(data_dir, s)]
    wanted = {tuple(row.tolist()) for row in torch.cat(rows)}
    manifest = read_manifest(out)
    train = [e for e in manifest["shards"] if e["split"] == "train"]
    seen = np.zeros(2**16, dtype=bool)
    for entry in train:
        seen[load_tokens(out / entry["file"])] = True
    unseen = np.flatnonzero(~seen[:50257])
    rng = np.random.default_rng(0)
    found = 0
    for entry in train:
        tokens = np.array(load_tokens(out / entry["file"]))
        starts = range(0, len(tokens) - SEQ_LEN, SEQ_LEN)  # chunks of seq_len + 1 tokens at stride seq_len
        hits = [s for s in starts if tuple(tokens[s : s + SEQ_LEN + 1].tolist()) in wanted]
        for s in hits:
            tokens[s : s + SEQ_LEN + 1] = rng.choice(unseen, SEQ_LEN + 1)
        found += len(hits)
        entry["sha256"] = write_shard(out / entry["file"], tokens)
    assert found == len(wanted), "every chunk of the window was found and replaced"
    write_data_manifest(out, manifest)
    return out


def nan_checkpoint(source: Path, folder: Path, step: int) -> Path:
    """A copy of checkpoint `source` as step `step` whose weights are all NaN, its manifest rewritten."""
    shutil.copytree(source, folder)
    weights = load_file(folder / "model.safetensors")
    save_file({name: torch.full_like(t, math.nan) for name, t in weights.items()}, folder / "model.safetensors")
    state = json.loads((folder / STATE_FILE).read_text())
    state.update(step=step, tokens=step * state["settings"]["total_batch_size"])
    (folder / STATE_FILE).write_text(json.dumps(state))
    write_manifest(folder, step)
    return folder


def test_the_guard_judges_non_finite_steps_and_spikes():
    guard = Guard(TrainConfig(spike_factor=2.0, spike_window=4, max_bad_steps=2))
    assert [guard.judge(loss, 1.0) for loss in (5.0, 4.0, 9.0, 4.5)] == [None] * 4  # too few to judge
    assert guard.judge(4.0, 1.0) is None
    assert guard.judge(9.5, 1.0) == {"spike": pytest.approx(9.5 / 4.25), "median_loss": 4.25}
    assert not guard.must_roll_back and guard.streak == 1
    assert list(guard.recent) == [4.0, 9.0, 4.5, 4.0]  # the spike is not one of the healthy losses
    assert guard.judge(4.0, math.inf) == {"skipped": "non-finite grad_norm"}
    assert guard.must_roll_back and (guard.skipped, guard.spikes) == (1, 1)
    assert guard.judge(math.nan, 1.0) == {"skipped": "non-finite loss"} and guard.streak == 3
    assert guard.judge(4.2, 1.0) is None and guard.streak == 0

    restored = Guard(TrainConfig(spike_factor=2.0, spike_window=4, max_bad_steps=2))
    restored.load_state_dict(json.loads(json.dumps(guard.state_dict())))  # as train_state.json keeps it
    assert restored.state_dict() == guard.state_dict() and restored.judge(9.5, 1.0) == guard.judge(9.5, 1.0)
    for bad in ({**guard.state_dict(), "recent": [1.0, "x"]}, {**guard.state_dict(), "skipped": -1}):
        with pytest.raises(ValueError, match="guard: "):
            restored.load_state_dict(bad)


ABSURD_LR = dict(max_lr=50, spike_factor=0, max_bad_steps=3, max_rollbacks=2, num_samples=0)


@pytest.fixture(scope="module")
def absurd_lr(data_dir, tmp_path_factory):
    """`--max_lr 50`, one process. Without the guard this run logged NaN from step 13 on, saved and
    exported NaN weights, pruned the last finite checkpoint and exited 0. Spike detection is off: here
    the overflow is what is checked."""
    out = tmp_path_factory.mktemp("lr50") / "run"
    return out, run_cli(nano_args(data_dir, out, **ABSURD_LR))


def test_two_processes_skip_and_roll_back_together_as_one_does(absurd_lr, data_dir, tmp_path):
    """Every rank takes the same decisions (the loss and norm are reduced first): two DDP processes log
    the very records of one process, skips and rollbacks included, and the launch reports status 3.
    A rank that disagreed would hang in the next collective instead. Only the first rank to exit is
    sure to print: torchrun ends the other as soon as one exits, so one or two `error:` lines appear,
    and every one of them is the same diverged line."""
    out, one = tmp_path / "two", absurd_lr[0]
    config = ROOT / "accelerate_configs" / "cpu_2proc.yaml"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    done = run_cli(nano_args(data_dir, out, **ABSURD_LR), launcher=launcher)  # val_batches: the whole evaluation
    assert done.returncode != 0
    errors = {line for line in done.stderr.splitlines() if line.startswith("error:")}
    assert len(errors) == 1 and errors.pop().startswith("error: training diverged: 3 bad steps in a row")
    assert re.search(r"exitcode\s*:\s*3\b", done.stderr)  # as torchrun reports it
    assert without_timing(out) == without_timing(one)


def test_an_absurd_learning_rate_never_reaches_the_weights_and_stops_with_status_3(absurd_lr, data_dir):
    out, done = absurd_lr
    assert done.returncode == 3, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: training diverged: 3 bad steps in a row up to step 10")
    assert "after 2 rollbacks" in lines[-1] and "Traceback" not in done.stderr
    assert sum(line.startswith("error:") for line in lines) == 1

    logged = records(out)
    skipped = [r for r in logged if "skipped" in r]
    rollbacks = [r for r in logged if "rollback" in r]
    assert [r["step"] for r in skipped] == [8, 9, 10] * 3  # each bad streak, then the rollback to step 4
    assert all(r["skipped"] == "non-finite grad_norm" and "grad_norm" not in r for r in skipped)
    assert [r["skipped_steps"] for r in skipped] == list(range(1, 10))
    assert rollbacks == [
        {"step": 4, "tokens": 1024, "rollback": k, "from_step": 10, "skipped_data_steps": 6} for k in (1, 2)
    ]
    text = (out / "log.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text  # JSON has no such numbers

    # The save at step 8 waited out the bad streak: the newest (and only) checkpoint is the finite one
    # rolled back to, and it and both exports hold finite weights.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000004"]
    for path in (out / "checkpoints" / "step_000004", out / "hf", out / "hf-gpt2"):
        assert all_finite(path / "model.safetensors")
    assert json.loads((out / "hf" / "export.json").read_text())["step"] == 4

    # A checkpoint with NaN weights (as an older trainer wrote them), intact by its manifest: the
    # rollback target stays the finite one, and pruning down to one checkpoint keeps both.
    checkpoints = out / "checkpoints"
    poisoned = nan_checkpoint(checkpoints / "step_000004", checkpoints / "step_000012", 12)
    assert checkpoint_problems(poisoned) == [] and not all_finite(poisoned / "model.safetensors")
    assert newest_finite_checkpoint(checkpoints) == checkpoints / "step_000004"
    prune_checkpoints(checkpoints, keep=1)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_000004", "step_000012"]

    # After each rollback the run goes on from the data after step 10: its step 5 is the step-4
    # weights on the batches of step 11, re-computed here without the trainer.
    model = GPT2ScratchForCausalLM(TrainConfig(model="cpu-nano", seq_len=SEQ_LEN).model_config())
    load_weights(model, out / "checkpoints" / "step_000004")
    with torch.no_grad():
        losses = [model(input_ids=x, shift_labels=y, loss_only=True).loss for x, y in step_batches(data_dir, 11)]
    first_after = logged[logged.index(rollbacks[0]) + 1]
    assert first_after["step"] == 5 and first_after["train/loss"] == pytest.approx(float(sum(losses) / 2), rel=1e-5)


SPIKED = dict(max_lr=0.03, max_steps=24, spike_factor=1.3, spike_window=8, max_bad_steps=3, keep_checkpoints=0)


@pytest.fixture(scope="module")
def spiked_runs(data_dir, tmp_path_factory):
    """Two identical runs over data whose steps 17 to 19 are tokens never seen before."""
    tmp = tmp_path_factory.mktemp("spike")
    poisoned = poison(data_dir, tmp / "data", range(17, 20))
    summaries = [train_in_process(nano_args(poisoned, tmp / name, **SPIKED)) for name in ("first", "second")]
    return tmp, poisoned, summaries


def test_a_crafted_data_window_spikes_and_is_rolled_back_past(spiked_runs):
    tmp, poisoned, summaries = spiked_runs
    out = tmp / "first"
    assert summaries[0]["complete"] and summaries[0]["step"] == 24
    logged = records(out)
    rollback = next(r for r in logged if "rollback" in r)
    before, after = logged[: logged.index(rollback)], logged[logged.index(rollback) + 1 :]
    spikes = [r for r in before if "spike" in r]
    assert [r["step"] for r in spikes] == [17, 18, 19]
    # Every spike is judged against the median of the 8 (spike_window) healthy losses logged before it,
    # recomputed here from the log: the spikes themselves never join that window.
    healthy = [r["train/loss"] for r in before if "train/loss" in r and "spike" not in r and 9 <= r["step"] <= 16]
    median = statistics.median(healthy)
    assert len(healthy) == 8 and all(r["median_loss"] == pytest.approx(median, rel=1e-12) for r in spikes)
    assert all(r["train/loss"] > 1.3 * median for r in spikes)
    assert rollback == {"step": 16, "tokens": 4096, "rollback": 1, "from_step": 19, "skipped_data_steps": 3}
    # The crafted window is skipped: no spike afterwards, and step 17 is the step-16 weights on the
    # batches of step 20.
    assert not [r for r in after if "spike" in r]
    assert sorted(r["step"] for r in after if "train/loss" in r) == list(range(17, 25))
    model = GPT2ScratchForCausalLM(TrainConfig(model="cpu-nano", seq_len=SEQ_LEN).model_config())
    load_weights(model, out / "checkpoints" / "step_000016")
    with torch.no_grad():
        losses = [model(input_ids=x, shift_labels=y, loss_only=True).loss for x, y in step_batches(poisoned, 20)]
    assert after[0]["step"] == 17 and after[0]["train/loss"] == pytest.approx(float(sum(losses) / 2), rel=1e-5)
    assert json.loads((out / "checkpoints" / "step_000024" / "train_state.json").read_text())["rollbacks"] == 1


def test_two_identical_runs_roll_back_identically(spiked_runs):
    tmp, _, summaries = spiked_runs
    assert without_timing(tmp / "first") == without_timing(tmp / "second")
    for name in ("first", "second"):
        assert all_finite(tmp / name / "hf" / "model.safetensors")
    first, second = (load_file(tmp / name / "hf" / "model.safetensors") for name in ("first", "second"))
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_a_run_of_spikes_stays_visible():
    """Spikes never enter the window of healthy losses: otherwise the median would creep up with them
    and a long run of high losses would stop counting as spikes."""
    guard = Guard(TrainConfig(spike_factor=1.5, spike_window=5, max_bad_steps=0))
    healthy = [4.0, 4.2, 3.9, 4.1, 4.0]
    assert [guard.judge(loss, 1.0) for loss in healthy] == [None] * 5
    judged = [guard.judge(7.0, 1.0) for _ in range(10)]
    assert judged == [{"spike": pytest.approx(7.0 / 4.0), "median_loss": 4.0}] * 10
    assert list(guard.recent) == healthy and guard.spikes == 10 and guard.streak == 10


def test_a_spike_factor_of_one_or_less_is_refused():
    with pytest.raises(ConfigError, match="spike_factor must be 0 .off. or above 1"):
        TrainConfig(spike_factor=0.5)


def test_a_single_nan_weight_makes_the_model_not_finite():
    """What `save` asks before it writes a checkpoint or an export."""
    model = GPT2ScratchForCausalLM(TrainConfig(model="cpu-nano", seq_len=SEQ_LEN).model_config())
    one_process = SimpleNamespace(num_processes=1)
    assert weights_finite(model, one_process)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.bias[3] = math.inf
    assert not weights_finite(model, one_process)


def test_a_run_stopped_before_the_spikes_and_resumed_rolls_back_the_same(spiked_runs):
    """The guard's recent losses and counts are in the checkpoint: resumed at step 16, the run judges
    steps 17 to 19 as spikes from the same median and rolls back as the uninterrupted run did."""
    tmp, poisoned, _ = spiked_runs
    out = tmp / "resumed"
    train_in_process(nano_args(poisoned, out, **SPIKED, stop_at_step=16))
    train_in_process(nano_args(poisoned, out, **SPIKED, resume="auto"))
    assert without_timing(out) == without_timing(tmp / "first")
