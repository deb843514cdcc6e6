"""`--optimizer muon`: the parameter split, the step against torch's own Muon and AdamW built by hand,
exact resume after SIGKILL, 2 processes = 1 process with twice the accumulation, and the settings a
resumed run must keep."""

import re
import shutil
from pathlib import Path

import pytest
import torch
from accelerate.utils import DistributedType
from trainer_runs import kill_at_step, metric, nano_args, train_in_process, train_two_processes

from gpt2_scratch.training.checkpoints import latest_checkpoint, run_settings
from gpt2_scratch.training.config import ConfigError, TrainConfig, parse_config
from gpt2_scratch.training.recipe import build_optimizer, check_optimizer_supported, lr_at, set_schedule
from gpt2_scratch.training.verify import CheckpointError, checkpoint_problems, optimizer_problems, settings_changes
from modeling_gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM

pytestmark = pytest.mark.usefixtures("one_thread")

# Dropout on and a sample drawn at each evaluation: both use the RNG that a checkpoint must restore.
COMMON = dict(
    optimizer="muon", muon_lr=0.02, dropout=0.1, max_steps=40, stop_at_step=12, save_interval=4, eval_interval=4
)
BLOCK_MATRIX = re.compile(r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")


def nano_model() -> GPT2ScratchForCausalLM:
    torch.manual_seed(0)
    return GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("cpu-nano"))


@pytest.fixture(scope="module")
def muon_run(data_dir, tmp_path_factory) -> Path:
    """An uninterrupted Muon run to step 12 of 40, checkpoints every 4."""
    out = tmp_path_factory.mktemp("muon") / "reference"
    train_in_process(nano_args(data_dir, out, **COMMON))
    return out


def test_block_matrices_go_to_muon_as_out_by_in_and_everything_else_to_adamw():
    model = nano_model()
    config = TrainConfig(optimizer="muon", max_lr=3e-3, muon_lr=0.02, weight_decay=0.1, muon_weight_decay=0.05)
    optimizer = build_optimizer(model, config, torch.device("cpu"))
    names = {id(p): name for name, p in model.named_parameters()}  # the tied head is wte itself
    muon = [names[id(p)] for group in optimizer.muon.param_groups for p in group["params"]]
    adamw = [names[id(p)] for group in optimizer.adamw.param_groups for p in group["params"]]
    assert sorted(muon + adamw) == sorted(names.values()), "every parameter in exactly one group"
    assert len(muon + adamw) == len(set(muon + adamw))
    assert sorted(muon) == sorted(n for n in names.values() if BLOCK_MATRIX.fullmatch(n))
    assert len(muon) == 4 * model.config.n_layer
    modules = dict(model.named_modules())
    for name in muon:  # Muon's LR scale sqrt(max(1, rows / cols)) must see (out, in)
        linear = modules[name.removesuffix(".weight")]
        assert tuple(model.get_parameter(name).shape) == (linear.out_features, linear.in_features)
    decay, no_decay = (set(names[id(p)] for p in g["params"]) for g in optimizer.adamw.param_groups)
    assert decay == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert all(model.get_parameter(n).dim() == 1 for n in no_decay)
    assert [g["weight_decay"] for g in optimizer.adamw.param_groups] == [0.1, 0.0]
    assert optimizer.muon.param_groups[0]["weight_decay"] == 0.05
    assert model.lm_head.weight is model.transformer.wte.weight


def test_a_step_is_torch_muon_on_the_matrices_and_gpt3_adamw_on_the_rest():
    """Against torch.optim.Muon and AdamW built here by hand from parameter names, each from its own
    peak LR along the one warmup + cosine schedule, Muon's momentum warming up from 0.85."""
    config = TrainConfig(
        optimizer="muon",
        max_lr=3e-3,
        muon_lr=0.02,
        muon_momentum=0.9,
        muon_weight_decay=0.01,
        warmup_steps=2,
        max_steps=10,
    )
    ours, theirs = nano_model(), nano_model()
    optimizer = build_optimizer(ours, config, torch.device("cpu"))
    named = dict(theirs.named_parameters())
    matrices = [p for n, p in named.items() if BLOCK_MATRIX.fullmatch(n)]
    rest = [p for n, p in named.items() if not BLOCK_MATRIX.fullmatch(n)]
    hand_muon = torch.optim.Muon(matrices, lr=0.0, momentum=0.9, weight_decay=0.01, adjust_lr_fn="original")
    hand_adamw = torch.optim.AdamW(
        [
            {"params": [p for p in rest if p.dim() >= 2]},
            {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0},
        ],
        lr=0.0,
        betas=(0.9, 0.95),
        eps=1e-8,
        weight_decay=0.1,
        fused=True,
    )
    tokens = torch.randint(0, 50257, (3, 4, 17), generator=torch.Generator().manual_seed(1))
    for step in range(3):
        set_schedule(optimizer, step, config)
        for group in hand_adamw.param_groups:
            group["lr"] = lr_at(step, config)
        hand_muon.param_groups[0]["lr"] = 0.02 * lr_at(step, config) / 3e-3
        hand_muon.param_groups[0]["momentum"] = 0.85 + (0.9 - 0.85) * step / 300  # the momentum warmup
        for model, opts in ((ours, [optimizer]), (theirs, [hand_adamw, hand_muon])):
            x = tokens[step]
            model(input_ids=x[:, :-1], shift_labels=x[:, 1:], loss_only=True).loss.backward()
            for opt in opts:
                opt.step()
                opt.zero_grad()
    assert optimizer.muon.param_groups[0]["lr"] == pytest.approx(0.02 * lr_at(2, config) / 3e-3)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(ours.transformer.h[0].mlp.c_fc.weight, nano_model().transformer.h[0].mlp.c_fc.weight)


def test_muon_settings_are_checked_by_name():
    for argv, message in [
        (["--optimizer", "sgd"], "optimizer must be one of"),
        (["--muon_momentum", "1.0"], "muon_momentum must be in [0, 1)"),
        (["--muon_lr", "0"], "muon_lr must be > 0"),
        (["--muon_weight_decay", "-0.1"], "muon_weight_decay must be >= 0"),
        (["--muon_adjust_lr_fn", "rms"], "muon_adjust_lr_fn must be one of"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_config(argv)


def test_muon_with_fsdp_is_refused_in_one_line_and_ddp_is_not():
    with pytest.raises(ConfigError, match="optimizer muon does not work with FSDP") as error:
        check_optimizer_supported(TrainConfig(optimizer="muon"), DistributedType.FSDP)
    assert "\n" not in str(error.value)
    check_optimizer_supported(TrainConfig(optimizer="adamw"), DistributedType.FSDP)
    check_optimizer_supported(TrainConfig(optimizer="muon"), DistributedType.MULTI_CPU)


def test_resume_settings_name_the_optimizer_and_muons_own_values():
    adamw, muon = TrainConfig(), TrainConfig(optimizer="muon", muon_lr=0.02)
    assert settings_changes(run_settings(muon, "d", 1), run_settings(adamw, "d", 1)) == ["optimizer: 'muon' -> 'adamw'"]
    changed = run_settings(TrainConfig(optimizer="muon", muon_lr=0.05), "d", 1)
    assert settings_changes(run_settings(muon, "d", 1), changed) == ["muon_lr: 0.02 -> 0.05"]
    # Muon's values do not bind an AdamW run; a checkpoint from before the option was an AdamW run.
    assert settings_changes(run_settings(adamw, "d", 1), run_settings(TrainConfig(muon_lr=0.07), "d", 1)) == []
    legacy = {k: v for k, v in run_settings(adamw, "d", 1).items() if k != "optimizer"}
    assert settings_changes(legacy, run_settings(adamw, "d", 1)) == []
    assert settings_changes(legacy, run_settings(muon, "d", 1))[0] == "optimizer: 'adamw' -> 'muon'"


def test_the_checkpoint_holds_muons_momentum_as_tensors_loadable_with_weights_only(muon_run):
    checkpoint = latest_checkpoint(muon_run / "checkpoints")
    assert checkpoint_problems(checkpoint) == []
    state = torch.load(checkpoint / "optimizer.bin", weights_only=True)
    buffers = [s["momentum_buffer"] for s in state["muon"]["state"].values()]
    config = GPT2ScratchConfig.from_preset("cpu-nano")
    d = config.n_embd
    assert sorted(tuple(b.shape) for b in buffers) == sorted([(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)] * 2)
    assert all(b.abs().sum() > 0 for b in buffers)
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(state["adamw"]["state"][0])


def test_a_muon_optimizer_state_with_a_damaged_part_is_damage(muon_run, tmp_path):
    """Both parts of the saved pair are judged: Muon's with a parameter listed twice is refused by name."""
    state = torch.load(latest_checkpoint(muon_run / "checkpoints") / "optimizer.bin", weights_only=True)
    assert optimizer_problems_of(state, tmp_path) == []
    groups = state["muon"]["param_groups"]
    groups[0]["params"] = groups[0]["params"] + groups[0]["params"][:1]
    (problem,) = optimizer_problems_of(state, tmp_path)
    assert problem.startswith("optimizer.bin[muon] does not have the structure of an optimizer state")


def optimizer_problems_of(state: dict, tmp_path) -> list[str]:
    path = tmp_path / "optimizer.bin"
    torch.save(state, path)
    return optimizer_problems(path, "optimizer.bin")


def test_sigkill_then_resume_auto_logs_the_same_losses(data_dir, muon_run, tmp_path):
    out = tmp_path / "killed"
    kill_at_step(nano_args(data_dir, out, **COMMON), out, 6)
    newest = latest_checkpoint(out / "checkpoints")
    assert newest is not None and int(newest.name[5:]) < 12, "the run was to be killed before its end"
    train_in_process(nano_args(data_dir, out, resume="auto", **COMMON))
    assert sorted(metric(out, "train/loss")) == list(range(1, 13))
    assert metric(out, "train/loss") == metric(muon_run, "train/loss")
    assert metric(out, "val/loss") == metric(muon_run, "val/loss")


@pytest.mark.parametrize(
    ("flag", "value", "change"),
    [("optimizer", "adamw", "optimizer: 'muon' -> 'adamw'"), ("muon_lr", "0.05", "muon_lr: 0.02 -> 0.05")],
)
def test_resuming_with_another_optimizer_is_refused_by_name(flag, value, change, data_dir, muon_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(muon_run, run)
    argv = [*nano_args(data_dir, run, resume="auto", **COMMON), f"--{flag}", value]
    with pytest.raises(CheckpointError) as error:
        train_in_process(argv)
    assert change in str(error.value) and "--init_from" in str(error.value)


def test_two_processes_match_one_process_with_twice_the_accumulation(data_dir, tmp_path):
    common = dict(optimizer="muon", max_steps=4, eval_interval=4, save_interval=4, num_samples=0)
    train_in_process(nano_args(data_dir, tmp_path / "one", **common))
    two = tmp_path / "two"
    done = train_two_processes(nano_args(data_dir, two, **common))
    assert done.returncode == 0, done.stderr[-3000:]
    one_losses, two_losses = metric(tmp_path / "one", "train/loss"), metric(two, "train/loss")
    assert sorted(two_losses) == [1, 2, 3, 4]
    assert two_losses == pytest.approx(one_losses, rel=1e-5)
    assert metric(two, "val/loss") == pytest.approx(metric(tmp_path / "one", "val/loss"), rel=1e-5)
