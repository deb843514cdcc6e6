"""`--lr_schedule wsd` (warmup-stable-decay) and runs made longer: the schedule against the paper's formulas,
Muon's momentum warmup against modded-nanogpt's, the settings a resume must keep, and the trainer extending
a finished run from its stable checkpoint to exactly the losses of a run started with the longer length."""

import math
import re
import shutil
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from trainer_runs import kill_at_step, nano_args, records, train_in_process

from gpt2_scratch.training.checkpoints import complete_checkpoints, is_stable, run_settings
from gpt2_scratch.training.config import ConfigError, TrainConfig, parse_config
from gpt2_scratch.training.recipe import build_optimizer, decay_start, lr_at, muon_momentum_at, set_schedule
from gpt2_scratch.training.verify import CheckpointError, settings_changes, stable_phase_end
from modeling_gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM

pytestmark = pytest.mark.usefixtures("one_thread")


def paper_wsd(n: int, total: int, decay_steps: int, warmup: int, max_lr: float, min_lr: float, shape: str) -> float:
    """Hagele et al. 2024 (arXiv 2405.18392), written out again: linear warmup (as build-nanogpt counts it),
    max_lr, then the cooldown over the last `decay_steps` steps, f = 1 - x (linear) or 1 - sqrt(x) with
    x = (n - (total - decay_steps)) / decay_steps, taking the LR from max_lr to min_lr."""
    if n < warmup:
        return max_lr * (n + 1) / warmup
    if n < total - decay_steps:
        return max_lr
    x = (n - (total - decay_steps)) / decay_steps
    f = 1 - math.sqrt(x) if shape == "1-sqrt" else 1 - x
    return min_lr + f * (max_lr - min_lr)


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
@pytest.mark.parametrize("min_lr_ratio", [0.0, 0.1])
def test_wsd_schedule_is_the_papers_warmup_constant_then_decay(shape, min_lr_ratio):
    c = TrainConfig(
        lr_schedule="wsd", decay_shape=shape, decay_fraction=0.2, max_steps=1000, warmup_steps=50, max_lr=1e-3
    )
    c.min_lr_ratio = min_lr_ratio
    expected = [paper_wsd(n, 1000, 200, 50, 1e-3, 1e-3 * min_lr_ratio, shape) for n in range(1000)]
    assert [lr_at(n, c) for n in range(1000)] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert lr_at(799, c) == 1e-3 and lr_at(800, c) == 1e-3 and lr_at(801, c) < 1e-3  # decay starts at 800
    assert lr_at(1000, c) == pytest.approx(1e-3 * min_lr_ratio) and lr_at(1500, c) == lr_at(1000, c)
    if shape == "1-sqrt" and min_lr_ratio == 0.0:  # a quarter of the way down the decay: 1 - sqrt(1/4) = 1/2
        assert lr_at(850, c) == pytest.approx(0.5e-3)


def test_decay_starts_at_the_floor_of_one_minus_the_fraction_and_never_falls_as_the_run_grows():
    for fraction in ("0.1", "0.2", "0.3", "0.45", "1"):
        starts = []
        for max_steps in range(1, 400):
            c = TrainConfig(lr_schedule="wsd", decay_fraction=float(fraction), max_steps=max_steps, warmup_steps=0)
            starts.append(decay_start(c))
            assert starts[-1] == math.floor((1 - Fraction(fraction)) * max_steps), (fraction, max_steps)
        assert all(a <= b for a, b in zip(starts, starts[1:], strict=False))
    c = TrainConfig(lr_schedule="wsd", decay_fraction=0.9, max_steps=100, warmup_steps=30)
    assert decay_start(c) == 30  # never inside the warmup


def test_a_longer_wsd_run_has_the_same_lr_up_to_the_shorter_ones_stable_step():
    short = TrainConfig(lr_schedule="wsd", max_steps=100, warmup_steps=10)
    long = TrainConfig(lr_schedule="wsd", max_steps=250, warmup_steps=10)
    assert [lr_at(s, short) for s in range(decay_start(short) + 1)] == [
        lr_at(s, long) for s in range(decay_start(short) + 1)
    ]
    cosine = [TrainConfig(max_steps=n, warmup_steps=10) for n in (100, 250)]
    assert lr_at(50, cosine[0]) != lr_at(50, cosine[1])  # why a cosine run cannot be extended


def test_muon_momentum_warms_up_as_modded_nanogpt():
    c = TrainConfig(optimizer="muon")  # the defaults: 0.85 to 0.95 over 300 steps
    for step in range(0, 400, 7):
        frac = min(step / 300, 1)  # modded-nanogpt's train_gpt.py
        assert muon_momentum_at(step, c) == pytest.approx((1 - frac) * 0.85 + frac * 0.95, abs=1e-15)
    assert muon_momentum_at(0, TrainConfig(optimizer="muon", muon_momentum_warmup=0)) == 0.95
    torch.manual_seed(0)
    optimizer = build_optimizer(
        GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("cpu-nano")), c, torch.device("cpu")
    )
    assert optimizer.muon.param_groups[0]["momentum"] == pytest.approx(0.85)
    lr = set_schedule(optimizer, 150, c)
    assert lr == lr_at(150, c) and optimizer.muon.param_groups[0]["momentum"] == pytest.approx(0.90)
    assert optimizer.muon.param_groups[0]["lr"] == pytest.approx(lr * c.muon_lr / c.max_lr)
    assert all("momentum" not in group for group in optimizer.adamw.param_groups)  # AdamW keeps its betas


def test_schedule_settings_are_checked_by_name():
    for argv, message in [
        (["--lr_schedule", "linear"], "lr_schedule must be one of ('cosine', 'wsd')"),
        (["--decay_fraction", "0"], "decay_fraction must be in (0, 1]"),
        (["--decay_fraction", "1.5"], "decay_fraction must be in (0, 1]"),
        (["--decay_shape", "sqrt"], "decay_shape must be one of ('linear', '1-sqrt')"),
        (["--muon_momentum_start", "1"], "muon_momentum_start must be in [0, 1)"),
        (["--muon_momentum_warmup", "-1"], "muon_momentum_warmup must be >= 0"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_config(argv)


def test_resume_settings_name_the_schedule_and_older_checkpoints_were_cosine_with_constant_momentum():
    wsd = run_settings(TrainConfig(lr_schedule="wsd"), "d", 1)
    assert settings_changes(wsd, run_settings(TrainConfig(), "d", 1)) == ["lr_schedule: 'wsd' -> 'cosine'"]
    linear = run_settings(TrainConfig(lr_schedule="wsd", decay_shape="linear"), "d", 1)
    assert settings_changes(wsd, linear) == ["decay_shape: '1-sqrt' -> 'linear'"]
    shorter = run_settings(TrainConfig(lr_schedule="wsd", decay_fraction=0.1), "d", 1)
    assert settings_changes(wsd, shorter) == ["decay_fraction: 0.2 -> 0.1"]
    old_fields = ("lr_schedule", "muon_momentum_warmup", "muon_momentum_start")
    for optimizer in ("adamw", "muon"):  # as written before the options existed
        legacy = {
            k: v for k, v in run_settings(TrainConfig(optimizer=optimizer), "d", 1).items() if k not in old_fields
        }
        same = TrainConfig(optimizer=optimizer, muon_momentum_warmup=0)
        assert settings_changes(legacy, run_settings(same, "d", 1)) == []
    now = run_settings(TrainConfig(optimizer="muon"), "d", 1)
    assert settings_changes(legacy, now) == ["muon_momentum_warmup: 0 -> 300"]


def test_only_a_longer_wsd_run_continues_from_the_stable_phase():
    def settings(**fields):
        return run_settings(TrainConfig(warmup_steps=5, **fields), "d", 1)

    assert stable_phase_end(settings(lr_schedule="wsd", max_steps=50), settings(lr_schedule="wsd", max_steps=80)) == 40
    assert (
        stable_phase_end(settings(lr_schedule="wsd", max_steps=80), settings(lr_schedule="wsd", max_steps=50)) is None
    )
    assert stable_phase_end(settings(max_steps=50), settings(max_steps=80)) is None
    (change,) = settings_changes(settings(max_steps=50), settings(max_steps=80))
    assert change.startswith("max_steps: 50 -> 80") and "--lr_schedule wsd can be extended" in change


# ---------------------------------------------------------------------------------------------------
# The trainer: a wsd run of 12 steps made 16 long equals a run of 16 from the start

# Dropout and a sample at each evaluation use the RNG a checkpoint restores; save_interval 5 does not hold
# the stable step (12 - ceil(0.2 * 12) = 9), nor does eval_interval 5.
WSD = dict(lr_schedule="wsd", dropout=0.1, save_interval=5, eval_interval=5, keep_checkpoints=2)


def train_losses(out_dir: Path) -> list[tuple[int, float]]:
    """(step, train/loss) of every training record of log.jsonl, in order: a step twice would show."""
    return [(r["step"], r["train/loss"]) for r in records(out_dir) if "train/loss" in r]


def val_losses(out_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["val/loss"]) for r in records(out_dir) if "val/loss" in r]


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory) -> dict[str, Path]:
    """A wsd run of 16 steps, and one of 12 (stable checkpoint at step 9)."""
    root = tmp_path_factory.mktemp("wsd")
    train_in_process(nano_args(data_dir, root / "long", max_steps=16, **WSD))
    train_in_process(nano_args(data_dir, root / "short", max_steps=12, **WSD))
    return {"long": root / "long", "short": root / "short"}


def test_the_stable_checkpoint_is_marked_and_outlives_pruning(runs):
    checkpoints = complete_checkpoints(runs["short"] / "checkpoints")
    assert sorted(checkpoints) == [9, 10, 12]  # keep 2, and the stable one
    assert [step for step, folder in checkpoints.items() if is_stable(folder)] == [9]


def test_extending_a_finished_wsd_run_logs_exactly_the_longer_runs_losses(data_dir, runs, tmp_path):
    out = tmp_path / "extended"
    shutil.copytree(runs["short"], out)
    short_log = train_losses(out)
    summary = train_in_process(nano_args(data_dir, out, resume="auto", max_steps=16, **WSD))
    assert summary["step"] == 16 and summary["complete"]
    assert train_losses(out)[:9] == short_log[:9]  # the short run's log up to its stable step
    assert train_losses(out) == train_losses(runs["long"])  # ... + the extension's = the long run's, bit for bit
    assert val_losses(out) == val_losses(runs["long"])
    aside = sorted(p.name.rsplit("_", 1)[0] for p in (out / "checkpoints").glob("decayed_*"))
    assert aside == ["decayed_step_000010", "decayed_step_000012"]  # the short run's decay, kept aside
    assert [s for s, f in complete_checkpoints(out / "checkpoints").items() if is_stable(f)] == [12]


def test_an_extension_killed_midway_resumes_to_the_same_losses(data_dir, runs, tmp_path):
    out = tmp_path / "killed"
    shutil.copytree(runs["short"], out)
    argv = nano_args(data_dir, out, resume="auto", max_steps=16, **WSD)
    kill_at_step(argv, out, 13)  # after its checkpoint of step 12, before 16
    assert max(complete_checkpoints(out / "checkpoints")) < 16
    train_in_process(argv)
    assert train_losses(out) == train_losses(runs["long"])
    assert val_losses(out) == val_losses(runs["long"])


def test_a_longer_cosine_run_is_refused_and_told_that_wsd_can_be_extended(data_dir, tmp_path):
    out = tmp_path / "cosine"
    common = dict(save_interval=4, eval_interval=4, num_samples=0)
    train_in_process(nano_args(data_dir, out, max_steps=4, **common))
    with pytest.raises(CheckpointError) as error:
        train_in_process(nano_args(data_dir, out, resume="auto", max_steps=8, **common))
    assert "max_steps: 4 -> 8" in str(error.value) and "--lr_schedule wsd" in str(error.value)
