"""The training config: a typed dataclass whose fields carry their one-line docs, YAML presets in
`configs/`, and `--field value` overrides on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate.utils import LoggerType
from huggingface_hub.errors import StrictDataclassError

from gpt2_scratch.training import UserError
from gpt2_scratch.training.hub import HUB_FORMATS
from modeling_gpt2_scratch import PRESETS, GPT2ScratchConfig

ROOT = Path(__file__).resolve().parents[2]
PRESETS_DIR = ROOT / "configs"


class ConfigError(UserError):
    """A training config value is unknown, of the wrong type, or inconsistent with the others."""


def arg(default: Any, help: str) -> Any:
    """A config field with its one-line doc (shown by `--help`)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything a training run depends on. The defaults are the embedded CPU run."""

    # data and output
    data_dir: str = arg(
        "data/builtin",
        "shards and manifest.json written by data_prep: a folder, or a URL (hf://datasets/user/name[@rev][/dir], "
        "s3://, gs://, file://) whose shards are fetched into data_cache_dir",
    )
    data_mix: str | None = arg(
        None,
        "instead of data_dir: shard folders or URLs with weights, 'data/a:0.7,data/b:0.3'; each step's sequences are "
        "split among them by weight (docs/data.md, Mixtures)",
    )
    data_cache_dir: str | None = arg(None, "where shards of a data_dir URL are kept (None: out_dir/data_cache)")
    data_cache_gb: float = arg(0.0, "most GB of shards in data_cache_dir, least recently used removed (0: no limit)")
    data_retries: int = arg(5, "retries of a failing data store request, with exponential backoff, then stop")
    prepare_builtin: bool | None = arg(
        None, "tokenize the built-in corpus into an absent or empty data_dir (None: only into the default data_dir)"
    )
    data_stream: str | None = arg(
        None,
        "instead of data_dir, tokenize on the fly: a Hub dataset (HuggingFaceFW/fineweb-edu), local .jsonl/.json/"
        ".parquet/.txt globs (comma-separated), or 'builtin' (docs/data.md, Training without a prep step)",
    )
    data_stream_config: str | None = arg(None, "the Hub dataset's config of data_stream (e.g. sample-10BT)")
    data_stream_split: str = arg("train", "the Hub dataset's split that data_stream trains on")
    data_stream_val_split: str | None = arg(
        None, "validate on the first val_tokens of this Hub split (None: the first val_tokens of data_stream)"
    )
    data_stream_text_column: str = arg("text", "the column of data_stream that holds each document's text")
    data_workers: int = arg(1, "processes that tokenize data_stream per rank (0: a thread of the trainer)")
    val_tokens: int = arg(65_536, "tokens at the start of data_stream held out for validation (data_prep's)")
    out_dir: str = arg("runs/cpu-micro", "run directory: config, logs, plots, checkpoints, HF export")
    # model
    model: str = arg("cpu-micro", f"model size preset: {', '.join(PRESETS)}")
    n_layer: int | None = arg(None, "override the preset's number of blocks")
    n_head: int | None = arg(None, "override the preset's number of attention heads")
    n_embd: int | None = arg(None, "override the preset's width")
    dropout: float = arg(0.0, "dropout probability (0 for pretraining, as GPT-2 124M reproductions use)")
    # batch: tokens per optimizer step = micro_batch_size * seq_len * processes * accumulation steps
    micro_batch_size: int = arg(16, "sequences per process per forward/backward pass")
    seq_len: int = arg(128, "tokens per sequence (T)")
    total_batch_size: int = arg(2048, "tokens per optimizer step, summed over processes and accumulation")
    # schedule (linear warmup, then cosine decay, or constant and a short decay, to min_lr_ratio * max_lr)
    max_steps: int = arg(80, "optimizer steps of the LR schedule (the run's length; a wsd run can be extended)")
    stop_at_step: int = arg(0, "end this launch after this step, schedule unchanged (0: at max_steps)")
    warmup_steps: int = arg(8, "steps of linear LR warmup from max_lr / warmup_steps to max_lr")
    max_lr: float = arg(3e-3, "peak learning rate")
    min_lr_ratio: float = arg(0.1, "final LR as a fraction of max_lr (GPT-3: 10%)")
    lr_schedule: str = arg(
        "cosine", "'cosine' after warmup (GPT-3), or 'wsd': warmup, constant max_lr, then decay over decay_fraction"
    )
    decay_fraction: float = arg(0.2, "wsd: the last fraction of max_steps that decays (Hagele et al. 2024: 0.1-0.2)")
    decay_shape: str = arg("1-sqrt", "wsd: the decay's shape, 'linear' or '1-sqrt' (Hagele et al. 2024's better one)")
    # optimizer (GPT-3 paper, section 2.3 and appendix B)
    weight_decay: float = arg(0.1, "AdamW decoupled weight decay, on parameters with 2+ dimensions only")
    adam_beta1: float = arg(0.9, "AdamW beta1")
    adam_beta2: float = arg(0.95, "AdamW beta2")
    adam_eps: float = arg(1e-8, "AdamW epsilon")
    optimizer: str = arg("adamw", "'adamw' (GPT-3), or 'muon': Muon for the blocks' weight matrices, AdamW the rest")
    muon_lr: float = arg(0.02, "Muon's peak LR; the same warmup and cosine as max_lr, which stays AdamW's")
    muon_momentum: float = arg(0.95, "Muon's (Nesterov) momentum, after its warmup")
    muon_momentum_start: float = arg(0.85, "Muon's momentum at step 0, rising linearly to muon_momentum")
    muon_momentum_warmup: int = arg(300, "steps of Muon's momentum warmup (modded-nanogpt: 300; 0: none)")
    muon_weight_decay: float = arg(0.0, "Muon's decoupled weight decay (each step multiplies by 1 - lr * this)")
    muon_adjust_lr_fn: str = arg(
        "original", "Muon's per-matrix LR scale: 'original' sqrt(max(1, out/in)), 'match_rms_adamw' 0.2 sqrt(max)"
    )
    grad_clip: float = arg(1.0, "clip the global gradient norm to this value (0: no clipping)")
    # evaluation
    eval_interval: int = arg(20, "steps between evaluations (val loss, HellaSwag, samples); also at the end")
    val_batches: int = arg(
        4, "validation batches of micro_batch_size per evaluation, split over the processes (same on any number)"
    )
    hellaswag_path: str = arg("auto", "HellaSwag val jsonl; 'auto': eval's cached file if available; 'none': skip")
    hellaswag_limit: int | None = arg(100, "score the first N HellaSwag examples (None: all 10,042)")
    sample_prompt: str = arg("Hello, I'm a language model,", "prompt of the text samples generated at each evaluation")
    num_samples: int = arg(3, "text samples per evaluation (top-k 50 sampling)")
    sample_tokens: int = arg(48, "new tokens per sample")
    # logging and checkpoints
    log_interval: int = arg(5, "steps between log lines (log.jsonl, trackers, console)")
    report_to: str = arg("tensorboard", "Accelerate trackers, comma-separated (tensorboard, wandb, ...) or 'none'")
    save_interval: int = arg(40, "steps between checkpoints; one is also written at the end")
    keep_checkpoints: int = arg(2, "keep only the newest N checkpoints (0: keep all)")
    init_from: str | None = arg(
        None, "start a new run from the weights of a checkpoint folder or an hf/ export (not its optimizer or data)"
    )
    resume: str = arg(
        "", "'' fresh run, 'auto' newest complete checkpoint in out_dir or checkpoint_remote, a checkpoint path or URL"
    )
    checkpoint_remote: str | None = arg(
        None, "fsspec URL that mirrors every checkpoint and the export: file://, hf://user/name[@branch][/dir], s3://"
    )
    remote_keep_last: int = arg(2, "keep only the newest N complete remote checkpoints (0: keep all)")
    seed: int = arg(1337, "seed for initialisation, data order and dropout")
    # performance
    compile: bool = arg(False, "torch.compile the model (inductor); worth it on GPU")
    gradient_checkpointing: bool = arg(
        False, "recompute each block's activations in backward: less memory, ~1/3 more block compute (large models)"
    )
    mixed_precision: str = arg(
        "auto",
        "'auto' (bf16 on GPUs with bf16 units, fp16 loss-scaled on CUDA GPUs without, fp32 on CPU), 'no', 'bf16', "
        "'fp16' (GPU only)",
    )
    peak_flops: float | None = arg(None, "peak FLOP/s per device for MFU (None: datasheet bf16 / measured fp32)")
    # Hugging Face Hub
    push_to_hub: bool = arg(False, "push the HF export with a model card to the Hub at the end")
    hub_model_id: str | None = arg(None, "Hub repository, 'user/name', for push_to_hub")
    hub_private: bool = arg(False, "create the Hub repository as private")
    hub_format: str = arg(
        "gpt2", "what push_to_hub uploads: 'gpt2' (official GPT2LMHeadModel layout), 'scratch' (ours), 'both'"
    )
    # divergence guard (gpt2_scratch/training/guard.py)
    spike_factor: float = arg(3.0, "a loss above this multiple of the median of the recent ones is a spike (0: off)")
    spike_window: int = arg(20, "how many recent healthy losses the spike median is taken over")
    max_bad_steps: int = arg(
        5, "roll back to the newest finite checkpoint after this many bad steps (skipped or spike) in a row (0: never)"
    )
    max_rollbacks: int = arg(3, "rollbacks allowed; the next bad streak stops the run with exit status 3")
    # schedulers
    time_limit: str | None = arg(
        None, "after this wall time (e.g. 23h50m, 90m, 45s) checkpoint and exit with status 75 to be requeued"
    )
    collective_timeout: float = arg(
        300.0,
        "seconds a collective may wait before the process group fails it; a rank that holds the others up for "
        "a quarter to half of it ends the run with status 76 (gpt2_scratch/training/watchdog.py)",
    )

    def __post_init__(self) -> None:
        problems = list(config_problems(self))
        if problems:
            raise ConfigError("invalid training config: " + "; ".join(problems))

    def model_config(self) -> GPT2ScratchConfig:
        """The model's config: the preset with this config's size overrides and dropout."""
        sizes = {k: getattr(self, k) for k in ("n_layer", "n_head", "n_embd") if getattr(self, k) is not None}
        return GPT2ScratchConfig.from_preset(self.model, dropout=self.dropout, **sizes)


PRECISIONS = ("auto", "no", "bf16", "fp16")
OPTIMIZERS = ("adamw", "muon")
LR_SCHEDULES = ("cosine", "wsd")
DECAY_SHAPES = ("linear", "1-sqrt")
MUON_ADJUST_LR_FNS = ("original", "match_rms_adamw")  # torch.optim.Muon's adjust_lr_fn

AT_LEAST_ONE = ("micro_batch_size", "seq_len", "total_batch_size", "max_steps", "log_interval", "eval_interval")

AT_LEAST_ONE += ("save_interval", "val_batches", "sample_tokens")

AT_LEAST_ZERO = ("warmup_steps", "stop_at_step", "keep_checkpoints", "num_samples", "weight_decay", "grad_clip")

AT_LEAST_ZERO += ("remote_keep_last",)

AT_LEAST_ZERO += ("data_cache_gb", "data_retries")

AT_LEAST_ZERO += ("data_workers",)

AT_LEAST_ONE += ("val_tokens",)

AT_LEAST_ONE += ("spike_window",)

AT_LEAST_ZERO += ("spike_factor", "max_bad_steps", "max_rollbacks")

ABOVE_ZERO = ("collective_timeout",)
AT_LEAST_ZERO += ("muon_momentum_warmup",)


def config_problems(c: TrainConfig) -> Iterator[str]:
    """Each inconsistent or out-of-range value of `c`, as a message naming the field."""
    floats = [f.name for f in dataclasses.fields(c) if isinstance(getattr(c, f.name), float)]
    yield from (
        f"{name} must be a finite number, got {getattr(c, name)}"
        for name in floats
        if not math.isfinite(getattr(c, name))
    )
    for name in ("n_layer", "n_head", "n_embd"):
        if getattr(c, name) is not None and getattr(c, name) < 1:
            yield f"{name} must be >= 1, got {getattr(c, name)}"
    if not 0 <= c.seed < 2**32:
        yield f"seed must be in [0, 2**32), got {c.seed}"
    yield from (f"{name} must be >= 1, got {getattr(c, name)}" for name in AT_LEAST_ONE if getattr(c, name) < 1)
    yield from (f"{name} must be >= 0, got {getattr(c, name)}" for name in AT_LEAST_ZERO if getattr(c, name) < 0)
    for name in ABOVE_ZERO:  # `not` also catches NaN
        if not 0 < getattr(c, name) < 10**9:
            yield f"{name} must be a number of seconds > 0, got {getattr(c, name)}"
    for name in ("warmup_steps", "stop_at_step"):
        if getattr(c, name) > c.max_steps:
            yield f"{name} ({getattr(c, name)}) must be <= max_steps ({c.max_steps})"
    if c.max_lr <= 0:
        yield f"max_lr must be > 0, got {c.max_lr}"
    if not 0 <= c.min_lr_ratio <= 1:
        yield f"min_lr_ratio must be in [0, 1], got {c.min_lr_ratio}"
    for name in ("dropout", "adam_beta1", "adam_beta2"):
        if not 0 <= getattr(c, name) < 1:
            yield f"{name} must be in [0, 1), got {getattr(c, name)}"
    if c.lr_schedule not in LR_SCHEDULES:
        yield f"lr_schedule must be one of {LR_SCHEDULES}, got {c.lr_schedule!r}"
    if not 0 < c.decay_fraction <= 1:
        yield f"decay_fraction must be in (0, 1], got {c.decay_fraction}"
    if c.decay_shape not in DECAY_SHAPES:
        yield f"decay_shape must be one of {DECAY_SHAPES}, got {c.decay_shape!r}"
    yield from optimizer_problems(c)
    if c.mixed_precision not in PRECISIONS:
        yield f"mixed_precision must be one of {PRECISIONS}, got {c.mixed_precision!r}"
    yield from tracker_problems(c.report_to)
    if c.micro_batch_size > 0 and c.seq_len > 0 and (problem := batch_problem(c, world_size=1)):
        yield problem
    if c.checkpoint_remote is not None and "://" not in c.checkpoint_remote:
        yield f"checkpoint_remote must be a URL such as file:///abs/path or hf://user/name, got {c.checkpoint_remote!r}"
    elif c.checkpoint_remote is not None:
        from gpt2_scratch.training import remote

        try:
            remote.open_store(c.checkpoint_remote)  # the URL's form and protocol; no network is touched
        except remote.RemoteError as err:
            yield str(err)
    if "://" in c.data_dir:
        from data_prep.store import StoreError, open_data_store

        try:
            open_data_store(c.data_dir, resolve=False)  # the URL's form and protocol; no network is touched
        except StoreError as err:
            yield f"data_dir: {err}"
    yield from mix_problems(c)
    if c.hub_format not in HUB_FORMATS:
        yield f"hub_format must be one of {HUB_FORMATS}, got {c.hub_format!r}"
    if c.num_samples and not c.sample_prompt:
        yield "sample_prompt is empty; give a prompt or set num_samples 0"
    if c.init_from and c.resume:
        yield "init_from starts a new run and resume continues one; give only one of them"
    if c.push_to_hub and not c.hub_model_id:
        yield "push_to_hub needs hub_model_id ('user/name' or 'org/name')"
    if c.time_limit is not None and parse_duration(c.time_limit) is None:
        yield f"time_limit must be a duration such as 23h50m, 90m or 45s (units d, h, m, s), got {c.time_limit!r}"
    if 0 < c.spike_factor <= 1:
        yield f"spike_factor must be 0 (off) or above 1 (a multiple of the recent median loss), got {c.spike_factor}"
    if c.model not in PRESETS:
        yield f"model: unknown preset {c.model!r}; choose one of {', '.join(PRESETS)}"
        return
    try:
        n_positions = c.model_config().n_positions
    except (ValueError, StrictDataclassError, ZeroDivisionError) as err:  # the model config's own checks
        yield f"model size: {' '.join(str(err).split())}"
        return
    if c.seq_len > n_positions:
        yield f"seq_len ({c.seq_len}) exceeds the model's n_positions ({n_positions}, preset {c.model!r})"
    if c.num_samples and c.sample_tokens >= n_positions:
        yield f"sample_tokens ({c.sample_tokens}) leaves no room for the prompt in the model's {n_positions} positions"


DATA_SOURCES = ("data_dir", "data_mix", "data_stream")  # where the training data comes from: one of them


def mix_problems(c: TrainConfig) -> Iterator[str]:
    """A data_mix that does not parse, or one given together with a data_dir."""
    if c.data_mix is None:
        return
    from data_prep.mixture import parse_mix

    if c.data_dir != FIELDS["data_dir"].default:
        yield f"give data_dir ({c.data_dir}) or data_mix, not both"
    try:
        mix = parse_mix(c.data_mix)
    except ValueError as err:
        yield f"data_mix: {err}"
        return
    for source, _ in mix:
        if "://" in source:
            from data_prep.store import StoreError, open_data_store

            try:
                open_data_store(source, resolve=False)  # the URL's form and protocol; no network is touched
            except StoreError as err:
                yield f"data_mix: {err}"


def optimizer_problems(c: TrainConfig) -> Iterator[str]:
    if c.optimizer not in OPTIMIZERS:
        yield f"optimizer must be one of {OPTIMIZERS}, got {c.optimizer!r}"
    if c.optimizer == "muon" and not hasattr(torch.optim, "Muon"):
        yield f"optimizer muon needs torch.optim.Muon (torch >= 2.9), this is torch {torch.__version__}"
    if c.muon_lr <= 0:
        yield f"muon_lr must be > 0, got {c.muon_lr}"
    for name in ("muon_momentum", "muon_momentum_start"):
        if not 0 <= getattr(c, name) < 1:
            yield f"{name} must be in [0, 1), got {getattr(c, name)}"
    if c.muon_weight_decay < 0:
        yield f"muon_weight_decay must be >= 0, got {c.muon_weight_decay}"
    if c.muon_adjust_lr_fn not in MUON_ADJUST_LR_FNS:
        yield f"muon_adjust_lr_fn must be one of {MUON_ADJUST_LR_FNS}, got {c.muon_adjust_lr_fn!r}"


def tracker_names(report_to: str) -> list[str]:
    return [name.strip() for name in report_to.split(",") if name.strip()]


def tracker_problems(report_to: str) -> Iterator[str]:
    """An unknown tracker, or one whose package is not installed: Accelerate would only warn and train
    to the end with nothing logged where the user looks. 'all' (whatever is installed) and 'none' need
    no package."""
    from accelerate.tracking import get_available_trackers

    known = {t.value for t in LoggerType} | {"none"}
    installed = {t.value for t in get_available_trackers()} | {"all", "none"}
    for name in tracker_names(report_to):
        if name not in known:
            yield f"report_to: unknown tracker {name!r}; choose from {sorted(known)}"
        elif name not in installed:  # each tracker's package has the tracker's name
            yield f"report_to: the {name} tracker needs its package, which is not installed: pip install {name}"


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

FIELD_TYPES = typing.get_type_hints(TrainConfig)


def parse_value(name: str, value: Any, where: str) -> Any:
    """`value` (a YAML scalar or a command-line string) converted to field `name`'s type."""
    hint = FIELD_TYPES[name]
    optional = isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)
    base = next(t for t in typing.get_args(hint) if t is not type(None)) if optional else hint
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{where}: {name} must be a {base.__name__}, got None")
    try:
        if isinstance(value, str) and base is not str:
            return parse_string(value, base)
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, base) and not (base is int and isinstance(value, bool)):
            return value
    except ValueError:
        pass
    raise ConfigError(f"{where}: {name} must be a {base.__name__}, got {value!r}")


def parse_string(text: str, base: type) -> Any:
    if base is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(text)
    if base is int:
        return int(text.replace("_", ""))
    return base(text)


def unknown_field_error(name: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(name, FIELDS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "; `--help` lists the fields"
    return ConfigError(f"{where}: unknown config field {name!r}{hint}")


def load_preset(path: str | os.PathLike) -> dict[str, Any]:
    """The fields set by a YAML preset, checked against `TrainConfig`."""
    path = Path(path)
    if not path.is_file():
        presets = ", ".join(sorted(p.name for p in PRESETS_DIR.glob("*.yaml")))
        raise ConfigError(f"config file not found: {path} (presets in {PRESETS_DIR}: {presets})")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not a text file ({err.reason} at byte {err.start})") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from err
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value, got {type(values).__name__}")
    for name in values:
        if name not in FIELDS:
            raise unknown_field_error(name, str(path))
    return {name: parse_value(name, value, str(path)) for name, value in values.items()}


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        usage="accelerate launch [--config_file ACCELERATE.yaml] train_accelerate.py [--config PRESET.yaml] "
        "[--field value ...]",
        description="Pretrain GPT-2 with Accelerate. Field values come from the dataclass defaults, then the "
        "--config YAML preset, then --field value overrides.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", help="YAML preset (e.g. configs/gpt2-124m-fineweb-edu.yaml)")
    for f in dataclasses.fields(TrainConfig):
        bool_field = bool in (FIELD_TYPES[f.name], *typing.get_args(FIELD_TYPES[f.name]))  # `--flag` means true
        parser.add_argument(
            f"--{f.name}",
            default=argparse.SUPPRESS,
            nargs="?" if bool_field else None,
            const="true" if bool_field else None,
            metavar=type_name(FIELD_TYPES[f.name]),
            help=f"{f.metadata['help']} (default: {f.default!r})".replace("%", "%%"),
        )
    return parser


def type_name(hint: Any) -> str:
    names = [t.__name__.upper() for t in typing.get_args(hint) or (hint,)]
    return "|".join(names).replace("NONETYPE", "NONE")


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """The config from the defaults, an optional `--config` YAML preset and `--field value` overrides."""
    args, unknown = build_arg_parser().parse_known_args(argv)
    if unknown:
        flag = next((a for a in unknown if a.startswith("--")), unknown[0])
        if flag.startswith("--"):
            raise unknown_field_error(flag[2:].split("=")[0], "command line")
        raise ConfigError(f"command line: unexpected argument {flag!r}; fields are given as --field value")
    overrides = vars(args)
    values = load_preset(overrides.pop("config")) if overrides.get("config") else {}
    overrides.pop("config", None)
    for where, layer in (("command line", overrides), ("config file", values)):
        given = [name for name in DATA_SOURCES if layer.get(name) not in (None, "None", "none")]
        if len(given) > 1:
            raise ConfigError(f"{where}: give {given[0]} ({layer[given[0]]}) or {given[1]}, not both")
        if where == "command line" and given:  # the command line's data replaces a preset's
            for name in DATA_SOURCES:
                if name != given[0]:
                    values.pop(name, None)
    values.update({name: parse_value(name, value, "command line") for name, value in overrides.items()})
    return TrainConfig(**values)


def config_to_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)


def batch_problem(c: TrainConfig, world_size: int) -> str | None:
    """Why `total_batch_size` cannot be split into whole micro-batches over `world_size` processes, or None."""
    per_micro_step = c.micro_batch_size * c.seq_len * world_size
    if c.total_batch_size % per_micro_step == 0:
        return None
    return (
        f"total_batch_size ({c.total_batch_size}) must be a multiple of micro_batch_size * seq_len * processes "
        f"({c.micro_batch_size} * {c.seq_len} * {world_size} = {per_micro_step}); change one of them"
    )


def parse_duration(text: str) -> float | None:
    """Seconds in a duration such as '23h50m', '1d2h', '90m', '45s' or '3600' (a number alone: seconds);
    None if it is none, or zero."""
    import re

    text = text.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        text += "s"
    match = re.fullmatch(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", text)
    if not match or not any(match.groups()):
        return None
    days, hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    return total if total > 0 else None
