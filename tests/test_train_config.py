"""gpt2_scratch/training/config.py: the typed config, YAML presets, command-line overrides and the errors in them."""

import pytest
from trainer_runs import ROOT

from gpt2_scratch.training.config import FIELDS, ConfigError, TrainConfig, parse_config
from gpt2_scratch.training.recipe import grad_accum_steps

PRESET_124M = ROOT / "configs" / "gpt2-124m-fineweb-edu.yaml"


def test_no_arguments_give_the_dataclass_defaults():
    assert parse_config([]) == TrainConfig()


def test_every_field_has_a_one_line_doc_shown_by_help(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    shown = capsys.readouterr().out
    for name, f in FIELDS.items():
        assert f.metadata["help"] and "\n" not in f.metadata["help"]
        assert f"--{name}" in shown


def test_preset_then_command_line_overrides(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("model: cpu-nano\nseq_len: 32\nmax_steps: 50\nwarmup_steps: 5\nmax_lr: 1e-3\n")
    config = parse_config(["--config", str(preset), "--max_steps", "7", "--compile", "--hub_model_id", "none"])
    assert (config.model, config.seq_len, config.max_steps, config.compile) == ("cpu-nano", 32, 7, True)
    assert config.max_lr == 1e-3 and isinstance(config.max_lr, float)  # YAML reads 1e-3 as a string
    assert config.hub_model_id is None
    assert parse_config(["--config", str(preset), "--compile", "false"]).compile is False


def test_gpt2_124m_preset_is_the_build_nanogpt_recipe():
    """The seeds' numbers (build-nanogpt train_gpt2.py), not the trainer's defaults."""
    c = parse_config(["--config", str(PRESET_124M)])
    assert c.model == "gpt2" and c.model_config().n_layer == 12 and c.model_config().n_embd == 768
    assert (c.total_batch_size, c.seq_len, c.max_steps, c.warmup_steps) == (524_288, 1024, 19_073, 715)
    assert (c.max_lr, c.max_lr * c.min_lr_ratio) == pytest.approx((6e-4, 6e-5))
    assert (c.weight_decay, c.grad_clip, c.adam_beta1, c.adam_beta2, c.adam_eps) == (0.1, 1.0, 0.9, 0.95, 1e-8)
    assert c.eval_interval == 250
    assert c.total_batch_size * c.max_steps == pytest.approx(10e9, rel=0.001)  # one pass over 10B tokens
    assert grad_accum_steps(c, world_size=8) == 1  # 8 x 64 x 1024 = 524,288
    assert grad_accum_steps(c, world_size=1) == 8


def test_every_shipped_preset_loads():
    presets = sorted((ROOT / "configs").glob("*.yaml"))
    assert PRESET_124M in presets
    for path in presets:
        parse_config(["--config", str(path)])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max_lr", "-1"], "max_lr must be > 0"),
        (["--seq_len", "abc"], "seq_len must be a int, got 'abc'"),
        (["--mixed_precision", "fp8"], "mixed_precision must be one of"),
        (["--model", "gpt5"], "unknown preset 'gpt5'"),
        (["--model", "cpu-nano", "--seq_len", "128"], "exceeds the model's n_positions (64"),
        (["--n_head", "5"], "divisible by n_head"),
        (["--total_batch_size", "1000"], "must be a multiple of micro_batch_size * seq_len"),
        (["--warmup_steps", "500", "--max_steps", "100"], "warmup_steps (500) must be <= max_steps (100)"),
        (["--min_lr_ratio", "2"], "min_lr_ratio must be in [0, 1]"),
        (["--push_to_hub"], "push_to_hub needs hub_model_id"),
        (["--compile", "maybe"], "compile must be a bool"),
        (["--report_to", "tensorbord"], "unknown tracker 'tensorbord'"),
        (["--max_step", "5"], "unknown config field 'max_step'; did you mean 'max_steps'?"),
        (["stray"], "unexpected argument 'stray'"),
        (["--n_head", "0"], "n_head must be >= 1, got 0"),
        (["--seed", "-1"], "seed must be in [0, 2**32), got -1"),
        (["--max_lr", "nan"], "max_lr must be a finite number, got nan"),
        (["--grad_clip", "inf"], "grad_clip must be a finite number, got inf"),
    ],
)
def test_bad_values_are_clear_errors(argv, message):
    with pytest.raises(ConfigError) as err:
        parse_config(argv)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_preset_names_the_file_and_key(tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text("learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config field 'learning_rate'"):
        parse_config(["--config", str(preset)])
    preset.write_text("max_steps: ten\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: max_steps must be a int, got 'ten'"):
        parse_config(["--config", str(preset)])
    with pytest.raises(ConfigError, match="config file not found"):
        parse_config(["--config", str(tmp_path / "missing.yaml")])
