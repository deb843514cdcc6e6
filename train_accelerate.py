"""Pretrain GPT-2 from scratch with Accelerate: the GPT-3 recipe, exact resume, a Hugging Face export.

    accelerate launch [--config_file accelerate_configs/NAME.yaml] train_accelerate.py \
        [--config configs/PRESET.yaml] [--field value ...]

With no arguments it trains the small `cpu-micro` model on the built-in corpus (tokenized on the
first run) in a few minutes on a laptop CPU. `configs/gpt2-124m-fineweb-edu.yaml` is the GPT-2 124M
reproduction of build-nanogpt (10B FineWeb-Edu tokens, 524,288 tokens per step). Every field of
`TrainConfig` below can be set in a YAML preset and overridden on the command line; `--help` lists them.

The run directory (`out_dir`) describes itself: `config.yaml` (the resolved config, loadable with
`--config`), `run_info.json` (world size, precision, package versions, git revision), `log.jsonl`,
`samples.jsonl`, `plots/loss.png`, `tensorboard/`, `checkpoints/step_NNNNNN/` and the export `hf/`.
With `--checkpoint_remote URL` every checkpoint is also mirrored to a remote store (`checkpoint_remote.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, LoggerType, ProjectConfiguration, set_seed
from huggingface_hub.errors import StrictDataclassError
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import checkpoint_remote
from modeling_gpt2_scratch import PRESETS, GPT2ScratchConfig, GPT2ScratchForCausalLM

logger = logging.getLogger("train")
ROOT = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A training config value is unknown, of the wrong type, or inconsistent with the others."""


def arg(default: Any, help: str) -> Any:
    """A config field with its one-line doc (shown by `--help`)."""
    return field(default=default, metadata={"help": help})


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    """Everything a training run depends on. The defaults are the embedded CPU run."""

    # data and output
    data_dir: str = arg("data/builtin", "folder of token shards and manifest.json written by data_prep")
    prepare_builtin: bool = arg(True, "tokenize the built-in corpus into data_dir when it holds no manifest.json")
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
    # schedule (linear warmup, then cosine decay to min_lr_ratio * max_lr at max_steps)
    max_steps: int = arg(80, "optimizer steps of the LR schedule (the run's length)")
    stop_at_step: int = arg(0, "end this launch after this step, schedule unchanged (0: at max_steps)")
    warmup_steps: int = arg(8, "steps of linear LR warmup from max_lr / warmup_steps to max_lr")
    max_lr: float = arg(3e-3, "peak learning rate")
    min_lr_ratio: float = arg(0.1, "final LR as a fraction of max_lr (GPT-3: 10%)")
    # optimizer (GPT-3 paper, section 2.3 and appendix B)
    weight_decay: float = arg(0.1, "AdamW decoupled weight decay, on parameters with 2+ dimensions only")
    adam_beta1: float = arg(0.9, "AdamW beta1")
    adam_beta2: float = arg(0.95, "AdamW beta2")
    adam_eps: float = arg(1e-8, "AdamW epsilon")
    grad_clip: float = arg(1.0, "clip the global gradient norm to this value (0: no clipping)")
    # evaluation
    eval_interval: int = arg(20, "steps between evaluations (val loss, HellaSwag, samples); also at the end")
    val_batches: int = arg(4, "validation batches of micro_batch_size per process per evaluation")
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
    mixed_precision: str = arg("auto", "'auto' (bf16 on CUDA that supports it, else fp32), 'no', 'bf16', 'fp16'")
    peak_flops: float | None = arg(None, "peak FLOP/s per device for MFU (None: datasheet bf16 / measured fp32)")
    # Hugging Face Hub
    push_to_hub: bool = arg(False, "push the HF export with a model card to the Hub at the end")
    hub_model_id: str | None = arg(None, "Hub repository, 'user/name', for push_to_hub")
    hub_private: bool = arg(False, "create the Hub repository as private")

    def __post_init__(self) -> None:
        problems = list(config_problems(self))
        if problems:
            raise ConfigError("invalid training config:\n  " + "\n  ".join(problems))

    def model_config(self) -> GPT2ScratchConfig:
        """The model's config: the preset with this config's size overrides and dropout."""
        sizes = {k: getattr(self, k) for k in ("n_layer", "n_head", "n_embd") if getattr(self, k) is not None}
        return GPT2ScratchConfig.from_preset(self.model, dropout=self.dropout, **sizes)


PRECISIONS = ("auto", "no", "bf16", "fp16")
AT_LEAST_ONE = ("micro_batch_size", "seq_len", "total_batch_size", "max_steps", "log_interval", "eval_interval")
AT_LEAST_ONE += ("save_interval", "val_batches", "sample_tokens")
AT_LEAST_ZERO = ("warmup_steps", "stop_at_step", "keep_checkpoints", "num_samples", "weight_decay", "grad_clip")
AT_LEAST_ZERO += ("remote_keep_last",)


def config_problems(c: TrainConfig) -> Iterator[str]:
    """Each inconsistent or out-of-range value of `c`, as a message naming the field."""
    yield from (f"{name} must be >= 1, got {getattr(c, name)}" for name in AT_LEAST_ONE if getattr(c, name) < 1)
    yield from (f"{name} must be >= 0, got {getattr(c, name)}" for name in AT_LEAST_ZERO if getattr(c, name) < 0)
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
    if c.mixed_precision not in PRECISIONS:
        yield f"mixed_precision must be one of {PRECISIONS}, got {c.mixed_precision!r}"
    trackers = {t.value for t in LoggerType} | {"none"}
    for name in tracker_names(c.report_to):
        if name not in trackers:
            yield f"report_to: unknown tracker {name!r}; choose from {sorted(trackers)}"
    per_micro = c.micro_batch_size * c.seq_len
    if per_micro > 0 and c.total_batch_size % per_micro:
        yield (
            f"total_batch_size ({c.total_batch_size}) must be a multiple of micro_batch_size * seq_len "
            f"({c.micro_batch_size} * {c.seq_len} = {per_micro})"
        )
    if c.checkpoint_remote is not None and "://" not in c.checkpoint_remote:
        yield f"checkpoint_remote must be a URL such as file:///abs/path or hf://user/name, got {c.checkpoint_remote!r}"
    if c.push_to_hub and not c.hub_model_id:
        yield "push_to_hub needs hub_model_id ('user/name' or 'org/name')"
    if c.model not in PRESETS:
        yield f"model: unknown preset {c.model!r}; choose one of {', '.join(PRESETS)}"
        return
    try:
        n_positions = c.model_config().n_positions
    except (ValueError, StrictDataclassError) as err:  # the model config's own checks
        yield f"model size: {err}"
        return
    if c.seq_len > n_positions:
        yield f"seq_len ({c.seq_len}) exceeds the model's n_positions ({n_positions}, preset {c.model!r})"


def tracker_names(report_to: str) -> list[str]:
    return [name.strip() for name in report_to.split(",") if name.strip()]


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
        presets = ", ".join(sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
        raise ConfigError(f"config file not found: {path} (presets in {ROOT / 'configs'}: {presets})")
    values = yaml.safe_load(path.read_text()) or {}
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
        bool_field = FIELD_TYPES[f.name] is bool
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
    values.update({name: parse_value(name, value, "command line") for name, value in overrides.items()})
    return TrainConfig(**values)


def config_to_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)


# ----------------------------------------------------------------------------------------------
# The recipe: batch arithmetic, LR schedule, optimizer


def grad_accum_steps(config: TrainConfig, world_size: int) -> int:
    """Micro-steps per optimizer step so that one step sees exactly `total_batch_size` tokens."""
    per_micro_step = config.micro_batch_size * config.seq_len * world_size
    if config.total_batch_size % per_micro_step:
        raise ConfigError(
            f"total_batch_size ({config.total_batch_size}) is not a multiple of micro_batch_size * seq_len * "
            f"processes ({config.micro_batch_size} * {config.seq_len} * {world_size} = {per_micro_step}); "
            "change one of them"
        )
    return config.total_batch_size // per_micro_step


def lr_at(step: int, config: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warmup, then cosine to the minimum.

    The GPT-3 schedule as build-nanogpt writes it: step s < warmup gets max_lr * (s + 1) / warmup; from
    the end of warmup to max_steps a half cosine from max_lr down to min_lr_ratio * max_lr.
    """
    max_lr, min_lr = config.max_lr, config.max_lr * config.min_lr_ratio
    if step < config.warmup_steps:
        return max_lr * (step + 1) / config.warmup_steps
    if step >= config.max_steps:
        return min_lr
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embeddings (2+ dimensions), none on biases and LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the GPT-3 betas and epsilon; the fused kernel on CUDA and on CPU (both in torch >= 2.4),
    which the benchmark measured as the faster CPU step too."""
    return torch.optim.AdamW(
        param_groups(model, config.weight_decay),
        lr=lr_at(0, config),
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_eps,
        fused=device.type in ("cuda", "cpu"),
    )


def resolve_mixed_precision(setting: str) -> str:
    """'auto' becomes bf16 on CUDA that runs it natively, else 'no' (CPU bf16 is emulated, ~100x slower)."""
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


# ----------------------------------------------------------------------------------------------
# Setup steps


@dataclass
class RunPaths:
    """Where a run keeps each of its records."""

    out_dir: Path

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.config = self.out_dir / "config.yaml"
        self.run_info = self.out_dir / "run_info.json"
        self.log = self.out_dir / "log.jsonl"
        self.samples = self.out_dir / "samples.jsonl"
        self.plots = self.out_dir / "plots"
        self.checkpoints = self.out_dir / "checkpoints"
        self.hf = self.out_dir / "hf"
        self.upload_staging = self.out_dir / ".upload_staging"  # what the background upload reads


def build_accelerator(config: TrainConfig) -> Accelerator:
    """The Accelerator: devices, DDP/FSDP, mixed precision, gradient accumulation, trackers, compile."""
    cpu = not torch.cuda.is_available()
    world_size = PartialState(cpu=cpu).num_processes  # needed before the accumulation steps are known
    trackers = [t for t in tracker_names(config.report_to) if t != "none"]
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=resolve_mixed_precision(config.mixed_precision),
        gradient_accumulation_steps=grad_accum_steps(config, world_size),
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=config.out_dir, logging_dir=f"{config.out_dir}/tensorboard"),
        dynamo_backend="inductor" if config.compile else None,
    )
    if accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls for whatever autocast leaves in fp32
        torch.backends.cudnn.allow_tf32 = True
    elif accelerator.mixed_precision != "no":
        logger.warning(
            "mixed_precision=%s on CPU: bf16/fp16 matmuls are emulated here and slow", config.mixed_precision
        )
    return accelerator


def prepare_data(config: TrainConfig, accelerator: Accelerator) -> dict:
    """Check the shards in `data_dir` (tokenizing the built-in corpus on the main process first if
    allowed and missing); return the manifest."""
    from data_prep import prepare_builtin, read_manifest

    with accelerator.main_process_first():
        try:
            return read_manifest(config.data_dir)
        except FileNotFoundError:
            if not config.prepare_builtin:
                raise
        logger.info("no prepared data in %s: tokenizing the built-in corpus", config.data_dir)
        prepare_builtin(config.data_dir)
        return read_manifest(config.data_dir)


def build_model(config: TrainConfig) -> GPT2ScratchForCausalLM:
    return GPT2ScratchForCausalLM(config.model_config())


class TrainState:
    """What `save_state` does not hold by itself: the step, the tokens seen and the data position.

    Registered with `accelerator.register_for_checkpointing`, which writes it from the main process;
    that is enough because `ShardLoader`'s state is the same on every rank.
    """

    def __init__(self, loader):
        self.loader = loader
        self.step = 0
        self.tokens = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens = state["step"], state["tokens"]
        self.loader.load_state_dict(state["loader"])


def build_loader(config: TrainConfig, accelerator: Accelerator):
    from data_prep import ShardLoader

    return ShardLoader(
        config.data_dir,
        split="train",
        batch_size=config.micro_batch_size,
        seq_len=config.seq_len,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        seed=config.seed,
    )


def describe_run(config: TrainConfig, accelerator: Accelerator, paths: RunPaths, info: dict) -> None:
    """Write the resolved config and the run's environment into the run directory (main process)."""
    if not accelerator.is_main_process:
        return
    paths.out_dir.mkdir(parents=True, exist_ok=True)
    paths.config.write_text(config_to_yaml(config))
    info = {
        **info,
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "git": git_revision(),
    }
    paths.run_info.write_text(json.dumps(info, indent=2) + "\n")


def package_versions() -> dict[str, str | None]:
    names = ("torch", "transformers", "accelerate", "huggingface_hub", "tiktoken", "numpy", "safetensors")
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_revision() -> dict[str, Any] | None:
    """The commit of this code and whether the working tree had uncommitted changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


# ----------------------------------------------------------------------------------------------
# Throughput and MFU

# Dense (no sparsity) tensor-core peaks per GPU from NVIDIA's datasheets, FLOP/s, matched on the
# device name (more specific names first). fp32 means TF32 tensor cores, which we enable on CUDA.
# The benchmark (benchmarks/bench_train.py) divides by the same numbers.
DATASHEET_PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp32": 494.5e12},
    "H100 PCIe": {"bf16": 756e12, "fp32": 378e12},
    "H100": {"bf16": 989e12, "fp32": 494.5e12},  # SXM
    "A100": {"bf16": 312e12, "fp32": 156e12},
    "L40S": {"bf16": 362e12, "fp32": 183e12},
    "L4": {"bf16": 121e12, "fp32": 60e12},
    "A10G": {"bf16": 70e12, "fp32": 35e12},
    "RTX 4090": {"bf16": 165e12, "fp32": 83e12},
}


def peak_flops(config: TrainConfig, device: torch.device) -> float:
    """Peak FLOP/s of one device for MFU: the config value, else `device_peak_flops` for the run's precision."""
    if config.peak_flops:
        return config.peak_flops
    precision = "bf16" if resolve_mixed_precision(config.mixed_precision) in ("bf16", "fp16") else "fp32"
    return device_peak_flops(device, precision)[0]


def device_peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """The FLOP/s that MFU divides by ("bf16" or "fp32" matmuls), and where the number comes from:
    a GPU's datasheet peak, else the best matmul throughput measured here and now."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in DATASHEET_PEAK_FLOPS.items():
            if key in name:
                return peaks[precision], f"datasheet dense {precision} peak of {key}"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return measure_matmul_flops(device, dtype), f"measured: best {precision} 1024x1024 matmul on this device"


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 1024, seconds: float = 0.5) -> float:
    """The best FLOP/s of n x n matmuls repeated for about `seconds`: the best, not the mean, so that
    moments when other processes hold the cores count less. Uses a private generator, so the global
    RNG (and hence the initial weights) is the same whether the peak is measured or given."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    best, start, repeats = math.inf, time.perf_counter(), 0
    while repeats < 3 or time.perf_counter() - start < seconds:
        tick = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best, repeats = min(best, time.perf_counter() - tick), repeats + 1
    return 2 * n**3 / best


class Meter:
    """Wall time and tokens between log lines; evaluation and checkpoint time is left out."""

    def __init__(self, flops_per_token: int, peak: float, world_size: int):
        self.flops_per_token, self.peak, self.world_size = flops_per_token, peak, world_size
        self.restart()

    def restart(self) -> None:
        self.start, self.steps, self.tokens = time.perf_counter(), 0, 0

    def add(self, tokens: int) -> None:
        self.steps += 1
        self.tokens += tokens

    def read(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start
        tokens_per_s = self.tokens / elapsed
        mfu = self.flops_per_token * tokens_per_s / (self.peak * self.world_size)
        stats = {"tokens_per_s": tokens_per_s, "mfu": mfu, "step_time": elapsed / max(1, self.steps)}
        self.restart()
        return stats


# ----------------------------------------------------------------------------------------------
# The training step


def train_step(
    model, optimizer, loader, accelerator: Accelerator, grad_clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over `gradient_accumulation_steps` micro-batches.

    `accelerator.backward` divides each micro-batch loss by the number of micro-steps and DDP averages
    over ranks, so the gradient is that of the mean loss over the whole `total_batch_size`; gradients
    are all-reduced only on the last micro-step. Returns that mean loss and the pre-clip grad norm.
    """
    loss_sum = torch.zeros((), device=accelerator.device)
    for _ in range(accelerator.gradient_accumulation_steps):
        x, y = loader.next_batch()
        x, y = x.to(accelerator.device, non_blocking=True), y.to(accelerator.device, non_blocking=True)
        with accelerator.accumulate(model):
            loss = model(input_ids=x, shift_labels=y).loss
            accelerator.backward(loss)
        loss_sum += loss.detach()
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss = accelerator.reduce(loss_sum / accelerator.gradient_accumulation_steps, reduction="mean")
    return loss, grad_norm


# ----------------------------------------------------------------------------------------------
# The run: its pieces, logs, evaluation, checkpoints, export


@dataclass
class Run:
    """The pieces of one training run that the steps below share."""

    config: TrainConfig
    accelerator: Accelerator
    paths: RunPaths
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    state: TrainState
    meter: Meter
    data_source: str = ""
    hellaswag: list[dict] | None = None
    last_eval: dict[str, float] = field(default_factory=dict)
    first_loss: float | None = None
    last_loss: float | None = None
    mirror: checkpoint_remote.CheckpointMirror | None = None  # uploads to checkpoint_remote (main process only)

    @property
    def unwrapped(self) -> GPT2ScratchForCausalLM:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)


def append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def keep_records_through(path: Path, step: int) -> None:
    """Drop the records of steps after `step` (those of a run killed after its last checkpoint), and a
    last line that the kill cut short."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except json.JSONDecodeError:
            continue
    path.write_text("".join(kept))


def start_logs(run: Run, resumed: bool) -> None:
    """Trackers (TensorBoard by default) and the JSON-lines logs, continued on resume, fresh otherwise."""
    c, paths = run.config, run.paths
    if run.accelerator.is_main_process:
        for path in (paths.log, paths.samples):
            if resumed:
                keep_records_through(path, run.state.step)
            else:
                path.unlink(missing_ok=True)
    hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in dataclasses.asdict(c).items()}
    run.accelerator.init_trackers(paths.out_dir.name, config=hparams)


def log_metrics(run: Run, metrics: dict[str, float]) -> None:
    """One record, with the step and tokens seen, to log.jsonl and the trackers."""
    record = {"step": run.state.step, "tokens": run.state.tokens, **metrics}
    if run.accelerator.is_main_process:
        append_jsonl(run.paths.log, record)
    run.accelerator.log(metrics, step=run.state.step)
    logger.info("step %d | %s", run.state.step, " | ".join(f"{k} {format_value(k, v)}" for k, v in metrics.items()))


def format_value(name: str, value: float) -> str:
    if name == "mfu":
        return f"{100 * value:.2f}%"
    if name in ("lr",):
        return f"{value:.3e}"
    if name == "tokens_per_s":
        return f"{value:,.0f}"
    if name == "step_time":
        return f"{1000 * value:.0f}ms"
    return f"{value:.4f}"


def log_train(run: Run, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> None:
    loss_value = loss.item()
    run.first_loss = loss_value if run.first_loss is None else run.first_loss
    run.last_loss = loss_value
    log_metrics(run, {"train/loss": loss_value, "lr": lr, "grad_norm": float(grad_norm), **run.meter.read()})


def load_hellaswag(config: TrainConfig, accelerator: Accelerator) -> list[dict] | None:
    """The HellaSwag examples to score at each evaluation, or None (with one log line) when unavailable.

    'auto' reads eval's cached copy (fetched when online, the main process first); a missing explicit
    path is an error, found here before training starts.
    """
    if config.hellaswag_path == "none":
        logger.info("HellaSwag: off (hellaswag_path=none)")
        return None
    from eval.hellaswag import HellaSwagDataError, load_examples

    path = None if config.hellaswag_path == "auto" else config.hellaswag_path
    examples, error = None, None
    with accelerator.main_process_first():
        try:
            examples = load_examples(path, limit=config.hellaswag_limit)
        except HellaSwagDataError as err:
            error = err
    if error is not None and path is not None:
        raise error
    if error is not None:
        logger.info("HellaSwag: skipped, no data (%s)", error)
    return examples


def generate_samples(run: Run) -> list[str]:
    """`num_samples` top-k 50 continuations of `sample_prompt`, drawn under a fixed seed in a forked RNG so
    that the training RNG (dropout) is the same whether or not samples were drawn. All ranks generate, so
    sharded (FSDP) models work; the texts are the same everywhere."""
    from data_prep.tokenizer import EOT_ID, get_encoding
    from eval.common import inference

    c, device, encoding = run.config, run.accelerator.device, get_encoding()
    prompt = torch.tensor([encoding.encode(c.sample_prompt)] * c.num_samples, device=device)
    devices = [device] if device.type == "cuda" else []
    model = run.unwrapped
    with torch.random.fork_rng(devices=devices), inference(model):
        torch.manual_seed(c.seed)
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=True,
            top_k=50,
            max_new_tokens=c.sample_tokens,
            pad_token_id=EOT_ID,
        )
    texts = []
    for row in out.tolist():
        new = row[prompt.shape[1] :]
        end = new.index(EOT_ID) if EOT_ID in new else len(new)  # a document ended: drop the padding after it
        texts.append(encoding.decode(row[: prompt.shape[1]] + new[:end]))
    return texts


def evaluate(run: Run) -> None:
    """Validation loss, HellaSwag when its data is there, and text samples; logged at the current step."""
    from eval.val_loss import evaluate_val_loss

    c = run.config
    metrics = {
        "val/loss": evaluate_val_loss(
            run.model,
            c.data_dir,
            batch_size=c.micro_batch_size,
            seq_len=c.seq_len,
            max_batches=c.val_batches,
            accelerator=run.accelerator,
        )
    }
    if run.hellaswag:
        from eval.hellaswag import evaluate_hellaswag

        result = evaluate_hellaswag(
            run.model, run.hellaswag, batch_size=max(1, c.micro_batch_size // 4), accelerator=run.accelerator
        )
        metrics.update({"hellaswag/acc": result["acc"], "hellaswag/acc_norm": result["acc_norm"]})
    run.model.train()
    run.last_eval = metrics
    log_metrics(run, metrics)
    if c.num_samples:
        samples = generate_samples(run)
        if run.accelerator.is_main_process:
            append_jsonl(run.paths.samples, {"step": run.state.step, "prompt": c.sample_prompt, "samples": samples})
            logger.info("samples at step %d:\n%s", run.state.step, "\n".join(f"  > {s!r}" for s in samples))
    run.meter.restart()


def complete_checkpoints(checkpoints: Path) -> dict[int, Path]:
    """The complete local checkpoints by step: only renamed step_NNNNNN folders count, never the
    temporary ones being written."""
    if not checkpoints.is_dir():
        return {}
    steps = {p: checkpoint_remote.parse_step(p.name) for p in checkpoints.iterdir() if p.is_dir()}
    return {step: p for p, step in steps.items() if step is not None}


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint."""
    found = complete_checkpoints(checkpoints)
    return found[max(found)] if found else None


def find_resume_checkpoint(
    config: TrainConfig, paths: RunPaths, store: checkpoint_remote.RemoteStore | None = None
) -> Path | None:
    """The checkpoint to continue from per `config.resume`, downloaded first when it is remote (the newest
    complete one of out_dir and `store`, or a URL); refuse to start afresh over an existing run."""
    latest = latest_checkpoint(paths.checkpoints)
    remote = checkpoint_remote.newest_complete(store) if store is not None else None
    if config.resume == "":
        if latest is not None:
            raise ConfigError(
                f"{paths.out_dir} already holds a run (newest checkpoint {latest.name}); pass --resume auto to "
                "continue it, or choose another --out_dir"
            )
        if remote is not None:
            raise ConfigError(
                f"checkpoint_remote {store.url} already holds a run (newest complete checkpoint "
                f"{checkpoint_remote.step_name(remote)}); pass --resume auto to continue it, or choose another "
                "--checkpoint_remote"
            )
        return None
    if config.resume == "auto":
        if remote is not None and (latest is None or remote > checkpoint_remote.parse_step(latest.name)):
            logger.info("downloading step_%06d from %s", remote, store.url)
            return checkpoint_remote.download_checkpoint(
                store.fs, store.checkpoint(remote), paths.checkpoints, paths.out_dir
            )
        return latest
    if "://" in config.resume:
        logger.info("downloading %s", config.resume)
        return checkpoint_remote.download_url(config.resume, paths.checkpoints, paths.out_dir)
    path = Path(config.resume)
    if not (path.is_dir() and checkpoint_remote.parse_step(path.name) is not None):
        raise ConfigError(f"resume: {path} is not a checkpoint folder (checkpoints/step_NNNNNN), nor 'auto' or ''")
    return path


def resume(run: Run, checkpoint: Path) -> None:
    """Model, optimizer, every rank's RNG states, data position, step and tokens seen."""
    run.accelerator.load_state(str(checkpoint))
    logger.info("resumed from %s: step %d, %d tokens seen", checkpoint, run.state.step, run.state.tokens)


def save_checkpoint(run: Run, mirror: bool = True) -> Path:
    """The full training state in checkpoints/step_NNNNNN, then the HF export of the same weights, then
    (with `mirror` and checkpoint_remote) their upload in the background.

    Written under a temporary name and renamed once complete, so a crash mid-save never leaves a folder
    that `--resume auto` would take for a checkpoint. A step already saved is not written again.
    """
    acc, paths = run.accelerator, run.paths
    final = paths.checkpoints / checkpoint_remote.step_name(run.state.step)
    if final.is_dir():
        return final
    tmp = paths.checkpoints / f".tmp_{final.name}"
    if acc.is_main_process:
        for stale in paths.checkpoints.glob(".tmp_step_*"):  # left by a run killed while saving
            shutil.rmtree(stale)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        os.replace(tmp, final)
        prune_checkpoints(paths.checkpoints, run.config.keep_checkpoints)
    export_hf(run)
    logger.info("saved %s and the HF export %s", final, paths.hf)
    if mirror:
        mirror_checkpoint(run, final)
    run.meter.restart()
    return final


def mirror_checkpoint(run: Run, checkpoint: Path) -> None:
    """Hand a complete checkpoint, the export and the logs to the background upload (main process)."""
    if run.mirror is not None:
        run.mirror.submit(run.state.step, checkpoint, run.paths.hf, [run.paths.log, run.paths.samples])


def prune_checkpoints(checkpoints: Path, keep: int) -> None:
    if keep <= 0:
        return
    complete = complete_checkpoints(checkpoints)
    for step in sorted(complete)[:-keep]:  # by step number: step_1000000 sorts before step_999999 by name
        shutil.rmtree(complete[step])


def export_hf(run: Run) -> None:
    """`save_pretrained` of the model (with its remote-code file) and the tokenizer into out_dir/hf."""
    from data_prep.tokenizer import save_hf_tokenizer

    acc = run.accelerator
    # Under FSDP the full weights must be gathered (a collective); elsewhere the model's own state is used.
    state_dict = acc.get_state_dict(run.model) if acc.distributed_type == DistributedType.FSDP else None
    if acc.is_main_process:
        tmp = run.paths.hf.with_name(".tmp_hf")
        shutil.rmtree(tmp, ignore_errors=True)
        run.unwrapped.save_pretrained(tmp, state_dict=state_dict)
        save_hf_tokenizer(tmp)
        shutil.rmtree(run.paths.hf, ignore_errors=True)
        os.replace(tmp, run.paths.hf)
    acc.wait_for_everyone()


# ----------------------------------------------------------------------------------------------
# Stopping on a signal


class StopRequest:
    """SIGTERM / SIGINT (preemption, Ctrl-C) ask the loop to checkpoint and stop after the current step.

    A second signal gets the previous handler, so a stuck run can still be interrupted.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum: int, frame) -> None:
        self.signum = signum
        logger.warning("%s received: saving a checkpoint after this step", signal.Signals(signum).name)
        self.__exit__()

    def requested(self, accelerator: Accelerator) -> bool:
        """Whether any rank got a signal; agreed on by all ranks so that they save together."""
        if accelerator.num_processes == 1:
            return self.signum is not None
        flag = torch.tensor(float(self.signum is not None), device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum") > 0)


# ----------------------------------------------------------------------------------------------
# The Hugging Face Hub


class HubError(RuntimeError):
    """The Hub cannot be reached, the user is not logged in, or the token cannot write the repository."""


def check_hub_access(repo_id: str, private: bool = False, api=None, purpose: str = "push_to_hub") -> str:
    """Fail fast, before training: the Hub is reachable, a token is set, and it can write `repo_id`
    (created if missing). Returns the user name. `purpose` (the field that needs the Hub) starts messages."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    if constants.is_offline_mode():
        raise HubError(
            f"{purpose} needs the Hub, but offline mode is on (HF_HUB_OFFLINE); unset it or drop --{purpose}"
        )
    api = api or HfApi()
    try:
        user = api.whoami()["name"]
    except LocalTokenNotFoundError as err:
        raise HubError(f"{purpose}: not logged in; run `hf auth login` or set HF_TOKEN to a write token") from err
    except HfHubHTTPError as err:
        raise HubError(f"{purpose}: the Hub rejected the token ({err}); set HF_TOKEN to a valid write token") from err
    except Exception as err:  # network errors differ by HTTP backend; all mean the same here
        raise HubError(f"{purpose}: cannot reach the Hub ({type(err).__name__}: {err}); check the network") from err
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.auth_check(repo_id, write=True)
    except HfHubHTTPError as err:
        raise HubError(
            f"{purpose}: user {user!r} cannot write to {repo_id!r} ({err}); check the repository name and that the "
            "token has write access"
        ) from err
    return user


def on_main_process(accelerator: Accelerator, fn: typing.Callable[[], Any]) -> Any:
    """`fn()` on the main process while the other ranks wait; its result, or its error, reaches every
    rank, so that all of them go on or stop together (an unexpected error as a RuntimeError naming it)."""
    from accelerate.utils import broadcast_object_list

    result, error, shared = None, None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except Exception as err:
            error = err
            ours = isinstance(err, (ConfigError, HubError, checkpoint_remote.RemoteError))
            shared = err if ours else RuntimeError(f"on the main process: {type(err).__name__}: {err}")
    result, shared = broadcast_object_list([result, shared])
    if error is not None:
        raise error
    if shared is not None:
        raise shared
    return result


def preflight_hub(config: TrainConfig, accelerator: Accelerator) -> None:
    """`check_hub_access` for push_to_hub, before any training."""
    if config.push_to_hub:
        user = on_main_process(accelerator, lambda: check_hub_access(config.hub_model_id, config.hub_private))
        logger.info("push_to_hub: logged in as %s", user)


def preflight_remote(config: TrainConfig, accelerator: Accelerator) -> checkpoint_remote.RemoteStore | None:
    """The checkpoint_remote store, checked before any training: for hf://, login and write access to the
    repository (`check_hub_access`); for every store, a probe file written and deleted."""
    if config.checkpoint_remote is None:
        return None
    store = checkpoint_remote.open_store(config.checkpoint_remote)  # a bad URL fails on every rank alike

    def check() -> None:
        if store.hub_repo is not None:
            check_hub_access(store.hub_repo, config.hub_private, purpose="checkpoint_remote")
        checkpoint_remote.check_writable(store)

    on_main_process(accelerator, check)
    logger.info("checkpoint_remote: %s is writable; checkpoints go to %s", store.url, store.checkpoints)
    return store


def push_export(folder: Path, repo_id: str, message: str, api=None) -> str:
    """Upload the export folder (weights, code, tokenizer, model card, plot) as one commit; returns its URL."""
    from huggingface_hub import HfApi

    api = api or HfApi()
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message)
    return getattr(commit, "commit_url", str(commit))


def write_model_card(run: Run) -> Path:
    """README.md of the export: metadata, results, the training config and the loss plot."""
    c, s = run.config, run.state
    model_config = run.unwrapped.config
    n_params = sum(p.numel() for p in run.unwrapped.parameters())
    repo = c.hub_model_id or run.paths.out_dir.name
    results = [("optimizer steps", f"{s.step:,} of {c.max_steps:,}"), ("tokens seen", f"{s.tokens:,}")]
    if run.last_loss is not None:
        results.append(("final train loss", f"{run.last_loss:.4f}"))
    results += [(name, f"{value:.4f}") for name, value in run.last_eval.items()]
    fields = dataclasses.asdict(c)
    card = "\n".join(
        [
            "---",
            "library_name: transformers",
            "pipeline_tag: text-generation",
            "tags: [gpt2, text-generation, pretraining, from-scratch]",
            "---",
            "",
            f"# {repo}",
            "",
            f"GPT-2 (`{c.model}` preset: {model_config.n_layer} layers, {model_config.n_head} heads, width "
            f"{model_config.n_embd}, {n_params / 1e6:.1f}M parameters) trained from scratch with "
            f"`train_accelerate.py` of gpt2-scratch on `{run.data_source}`.",
            "",
            "## Results",
            "",
            "| metric | value |",
            "| --- | --- |",
            *(f"| {name} | {value} |" for name, value in results),
            "",
            "![training and validation loss](loss.png)",
            "",
            *(["![HellaSwag acc_norm](hellaswag.png)", ""] if "hellaswag/acc_norm" in run.last_eval else []),
            "## Usage",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True)',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
            'inputs = tokenizer("Hello, I\'m a language model,", return_tensors="pt")',
            "print(tokenizer.decode(model.generate(**inputs, do_sample=True, top_k=50, max_new_tokens=40)[0]))",
            "```",
            "",
            "## Training config",
            "",
            "| field | value |",
            "| --- | --- |",
            *(f"| `{name}` | `{value}` |" for name, value in fields.items()),
            "",
        ]
    )
    path = run.paths.hf / "README.md"
    path.write_text(card)
    return path


# ----------------------------------------------------------------------------------------------
# The loop and the end of a run


def optimizer_step(run: Run) -> None:
    """Set the step's LR, take one optimizer step, count it, and log it when due."""
    lr = lr_at(run.state.step, run.config)
    set_lr(run.optimizer, lr)
    loss, grad_norm = train_step(run.model, run.optimizer, run.state.loader, run.accelerator, run.config.grad_clip)
    run.state.step += 1
    run.state.tokens += run.config.total_batch_size
    run.meter.add(run.config.total_batch_size)
    if run.state.step % run.config.log_interval == 0:
        log_train(run, loss, grad_norm, lr)


def train(run: Run) -> bool:
    """Train until max_steps (or stop_at_step, or a signal); True when the schedule is complete."""
    c, state = run.config, run.state
    end = c.stop_at_step or c.max_steps
    bar = tqdm(total=end, initial=state.step, desc="train", unit="step", disable=not run.accelerator.is_main_process)
    with StopRequest() as stop, bar, logging_redirect_tqdm([logger]):
        if state.step == 0:
            evaluate(run)  # the loss of the untrained model starts the curve
        while state.step < end:
            optimizer_step(run)
            bar.update()
            if state.step % c.eval_interval == 0 or state.step == c.max_steps:
                evaluate(run)
            if state.step % c.save_interval == 0 and state.step < end:  # finish() saves the last step
                save_checkpoint(run)
            if stop.requested(run.accelerator):
                break
    return state.step >= c.max_steps


def finish(run: Run, complete: bool) -> dict[str, Any]:
    """Checkpoint and export the last step, plot the losses, write the model card, push when asked, and
    wait for the uploads to checkpoint_remote (an upload that failed fails the run, here at the end)."""
    checkpoint = save_checkpoint(run, mirror=False)  # mirrored below, once the export has its card
    acc, paths = run.accelerator, run.paths
    if acc.is_main_process:
        from eval.plot import plot_training

        for plot in plot_training(paths.out_dir, paths.plots):  # loss.png, and hellaswag.png when scored
            shutil.copy(plot, paths.hf / plot.name)
        write_model_card(run)
        if run.config.push_to_hub and complete:
            url = push_export(paths.hf, run.config.hub_model_id, f"step {run.state.step}: {run.state.tokens:,} tokens")
            logger.info("pushed %s to %s", paths.hf, url)
        mirror_checkpoint(run, checkpoint)
    acc.wait_for_everyone()
    acc.end_training()
    summary = {
        "out_dir": str(paths.out_dir),
        "step": run.state.step,
        "tokens": run.state.tokens,
        "complete": complete,
        "first_train_loss": run.first_loss,
        "last_train_loss": run.last_loss,
        **run.last_eval,
    }
    logger.info("done: %s", json.dumps(summary))
    if run.mirror is not None:
        run.mirror.close()
        logger.info("checkpoint_remote: step_%06d is complete at %s", run.state.step, run.mirror.store.url)
    return summary


def setup_logging(accelerator: Accelerator) -> None:
    """Our log lines on the main process; Accelerate's per-save chatter and transformers' save bars off."""
    from transformers.utils import logging as transformers_logging

    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    transformers_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    config = parse_config(argv)
    accelerator = build_accelerator(config)
    setup_logging(accelerator)
    paths = RunPaths(config.out_dir)
    store = preflight_remote(config, accelerator)
    checkpoint = on_main_process(accelerator, lambda: find_resume_checkpoint(config, paths, store))
    preflight_hub(config, accelerator)
    manifest = prepare_data(config, accelerator)

    set_seed(config.seed)  # the same initial weights on every rank
    model = build_model(config)
    optimizer = build_optimizer(model, config, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    set_seed(config.seed, device_specific=True)  # then different dropout masks per rank
    state = TrainState(build_loader(config, accelerator))
    accelerator.register_for_checkpointing(state)
    flops_per_token = config.model_config().flops_per_token(config.seq_len)
    meter = Meter(flops_per_token, peak_flops(config, accelerator.device), accelerator.num_processes)
    run = Run(config, accelerator, paths, model, optimizer, state, meter, data_source=describe_source(manifest))
    if store is not None and accelerator.is_main_process:
        run.mirror = checkpoint_remote.CheckpointMirror(store, paths.upload_staging, config.remote_keep_last)
    if checkpoint is not None:
        resume(run, checkpoint)
    run.hellaswag = load_hellaswag(config, accelerator)
    describe_run(config, accelerator, paths, run_facts(run, flops_per_token, checkpoint))
    start_logs(run, resumed=checkpoint is not None)

    complete = train(run)
    return finish(run, complete)


def describe_source(manifest: dict) -> str:
    source = manifest.get("source", {})
    return str(source.get("name") or source.get("kind") or source) if isinstance(source, dict) else str(source)


def run_facts(run: Run, flops_per_token: int, checkpoint: Path | None) -> dict[str, Any]:
    """What the config alone does not say: the launch's processes, precision, device and model size."""
    acc = run.accelerator
    return {
        "processes": acc.num_processes,
        "distributed_type": str(acc.distributed_type),
        "device": torch.cuda.get_device_name() if acc.device.type == "cuda" else platform.processor() or "cpu",
        "mixed_precision": acc.mixed_precision,
        "gradient_accumulation_steps": acc.gradient_accumulation_steps,
        "parameters": sum(p.numel() for p in run.unwrapped.parameters()),
        "flops_per_token": flops_per_token,
        "peak_flops_per_device": run.meter.peak,
        "resumed_from": str(checkpoint) if checkpoint else None,
    }


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, HubError, checkpoint_remote.RemoteError) as err:
        sys.exit(f"error: {err}")
