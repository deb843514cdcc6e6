"""Pretrain GPT-2 from scratch with Accelerate: the GPT-3 recipe, exact resume, a Hugging Face export.

    accelerate launch [--config_file accelerate_configs/NAME.yaml] train_accelerate.py \
        [--config configs/PRESET.yaml] [--field value ...]

With no arguments it trains the small `cpu-micro` model on the built-in corpus (tokenized on the
first run) in a few minutes on a laptop CPU. `configs/gpt2-124m-fineweb-edu.yaml` is the GPT-2 124M
reproduction of build-nanogpt (10B FineWeb-Edu tokens, 524,288 tokens per step). Every field of
`training.config.TrainConfig` can be set in a YAML preset and overridden on the command line; `--help`
lists them.

This file builds the pieces and runs the loop, top to bottom: `main` (the config, the accelerator, the
run folder's lock) -> `run_training` (the remote and Hub checks, the data, the checkpoint to resume, the
memory check, model, optimizer and loader) -> `train` (`train_step`, `evaluate`, `save`) -> `finish`
(the last checkpoint, the exports, plots, model cards, push). The pieces live in the `training/`
package: config, recipe (batch arithmetic, LR schedule, optimizer, precision), step, data, memory,
metrics, checkpoints, export and model_card, remote (checkpoint_remote), paths and run_dir, hub,
processes. A user error anywhere is one `error:` line and exit status 2 (`user_errors.run_command`).

The run directory (`out_dir`) describes itself: `config.yaml` (the resolved config, loadable with
`--config`), `run_info.json` (world size, precision, package versions, git revision), `log.jsonl`,
`samples.jsonl`, `plots/loss.png`, `tensorboard/`, `checkpoints/step_NNNNNN/` and the two Hugging Face
exports, `hf/` (our class) and `hf-gpt2/` (the official GPT-2 layout), each with its model card. With
`--checkpoint_remote URL` every checkpoint is also mirrored to a remote store (`training/remote.py`).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import os
import platform
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, ProjectConfiguration, parse_flag_from_env, set_seed
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from modeling_gpt2_scratch import GPT2ScratchForCausalLM
from training import remote
from training.checkpoints import (
    TrainState,
    find_resume_checkpoint,
    load_checkpoint,
    load_weights,
    run_settings,
    save_checkpoint,
)
from training.config import ConfigError, TrainConfig, parse_config, parse_duration, tracker_names
from training.data import build_loader, prepare_data, train_fingerprint, val_fingerprint
from training.devices import compile_problem, compile_supported, pick_device, precision_problem
from training.export import export_model, exported_step
from training.guard import DivergedError, Guard, roll_back, weights_finite
from training.hub import preflight_hub, push_export
from training.memory import check_training_fits
from training.metrics import Meter, append_jsonl, format_value, keep_records_through, peak_flops
from training.model_card import write_model_cards
from training.processes import REQUEUE_STATUS, StopRequest, on_main_process
from training.recipe import (
    build_optimizer,
    check_optimizer_supported,
    grad_accum_steps,
    launcher_precision_note,
    lr_at,
    resolve_mixed_precision,
    set_lr,
)
from training.run_dir import RunLock, RunPaths, claim_out_dir, describe_run, own_store, read_run_id
from training.step import StepResult, train_step
from training.verify import CheckpointError
from user_errors import run_command

logger = logging.getLogger("train")


def build_accelerator(config: TrainConfig) -> Accelerator:
    """The Accelerator: devices, DDP/FSDP, mixed precision, gradient accumulation, trackers, compile.

    The device is `training.devices.pick_device`'s (CUDA, else Apple silicon's MPS, else the CPU), as every
    command picks it; a precision or compile that the device cannot run is refused in one line."""
    device = pick_device()
    precision = resolve_mixed_precision(config.mixed_precision)
    if problem := precision_problem(precision, device.type):  # e.g. fp16 on a CPU: Accelerate would train fp32
        raise ConfigError(problem)
    compile = config.compile and compile_supported(device.type)
    if config.compile and not compile:
        logger.warning("compile: off on %s (inductor's backend there is a prototype); training eager", device.type)
    if compile and (problem := compile_problem(device.type)):
        raise ConfigError(problem)
    cpu = device.type == "cpu"
    world_size = PartialState(cpu=cpu).num_processes  # needed before the accumulation steps are known
    trackers = [t for t in tracker_names(config.report_to) if t != "none"]
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=precision,
        gradient_accumulation_steps=grad_accum_steps(config, world_size),
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=config.out_dir, logging_dir=f"{config.out_dir}/tensorboard"),
        dynamo_backend="inductor" if compile else None,
    )
    if parse_flag_from_env("ACCELERATE_USE_FSDP") and accelerator.distributed_type != DistributedType.FSDP:
        # Accelerate turns FSDP on only for accelerator devices; on CPU it would silently run DDP instead
        raise ConfigError(
            f"this launch asks for FSDP, but Accelerate runs FSDP only on GPUs (and other accelerators): here it "
            f"would train with {accelerator.distributed_type.value} and write unsharded checkpoints; on CPU launch "
            "with accelerate_configs/cpu_2proc.yaml (DDP), or run the FSDP config on GPUs"
        )
    check_optimizer_supported(config, accelerator.distributed_type)
    keep_fsdp_gradients_fp32(accelerator)
    if accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls for whatever autocast leaves in fp32
        torch.backends.cudnn.allow_tf32 = True
    elif accelerator.device.type == "cpu" and accelerator.mixed_precision != "no":
        logger.warning(  # native only with AVX-512 BF16 or AMX; elsewhere about 100x slower than fp32
            "mixed_precision=%s on CPU: fast only where the CPU has bf16 units", config.mixed_precision
        )
    return accelerator


def keep_fsdp_gradients_fp32(accelerator: Accelerator) -> None:
    """FSDP2 under bf16: the blocks compute with bf16 copies of the weights, as Accelerate sets it up,
    but the gradients are reduced in float32 (and, torch's FSDP2 does it when the reduce dtype is wider,
    accumulated over micro-steps in float32) and the model's outputs are left as it makes them, as
    torchtitan does. Accelerate's policy reduces in bf16 (and 1.15's also cast the float32 loss to bf16);
    the sums over many ranks lose less in float32 (docs/training.md, "Precision")."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin = accelerator.state.fsdp_plugin
    policy = plugin.mixed_precision_policy
    if plugin.fsdp_version == 2 and policy is not None and policy.param_dtype == torch.bfloat16:
        plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def fsdp_precision(accelerator: Accelerator) -> dict[str, str | None] | None:
    """The dtypes of FSDP2's mixed-precision policy as this launch runs it (run_info.json), or None."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    policy = accelerator.state.fsdp_plugin.mixed_precision_policy
    if policy is None:
        return None
    dtypes = {name: getattr(policy, name, None) for name in ("param_dtype", "reduce_dtype", "output_dtype")}
    return {name: None if dtype is None else str(dtype).removeprefix("torch.") for name, dtype in dtypes.items()}


def build_model(config: TrainConfig) -> GPT2ScratchForCausalLM:
    model = GPT2ScratchForCausalLM(config.model_config())
    if config.gradient_checkpointing:  # non-reentrant: works with DDP, compile and inputs without grads
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


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
    settings: dict[str, Any]  # what a checkpoint must be resumed with (training.checkpoints.run_settings)
    manifest: dict  # the data's manifest.json: the model card names the data by it
    guard: Guard  # skipped updates, spikes and rollbacks (training/guard.py)
    hellaswag: list[dict] | None = None
    last_eval: dict[str, float] = field(default_factory=dict)
    first_loss: float | None = None
    last_loss: float | None = None
    uploader: remote.CheckpointUploader | None = None  # uploads to checkpoint_remote (main process only)
    started: float = field(default_factory=time.monotonic)  # when the launch began, for time_limit
    requeue: bool = False  # stopped by time_limit or SIGUSR1: unfinished, to be resumed
    shut: bool = False  # shut_down has run: the model is freed and the process group is down

    @property
    def unwrapped(self) -> GPT2ScratchForCausalLM:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)


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


def log_train(run: Run, step: StepResult, lr: float, problem: dict | None = None) -> None:
    """A training record; a NaN or infinite loss or norm is left out (JSON has no such numbers) and the
    guard's finding (`skipped`, `spike`, `overflow`) and count of skipped updates are in; under fp16 also
    the loss scale after the step and the count of updates the scaler skipped."""
    loss, grad_norm = step.loss, step.grad_norm
    if math.isfinite(loss):
        run.first_loss = loss if run.first_loss is None else run.first_loss
        run.last_loss = loss
    values = {name: v for name, v in (("train/loss", loss), ("grad_norm", grad_norm)) if math.isfinite(v)}
    guard = {**(problem or {}), "skipped_steps": run.guard.skipped}
    if step.loss_scale is not None:
        guard.update(loss_scale=step.loss_scale, overflow_steps=run.guard.overflows)
    log_metrics(run, {**values, "lr": lr, **guard, **run.meter.lap()})


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
    ids = encoding.encode(c.sample_prompt, allowed_special={"<|endoftext|>"})  # the separator may start a prompt
    prompt = torch.tensor([ids] * c.num_samples, device=device)
    devices = [device] if device.type in ("cuda", "mps") else []
    model = run.unwrapped
    with torch.random.fork_rng(devices=devices, device_type=device.type), inference(model):
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


def save(run: Run, upload: bool = True) -> Path:
    """Checkpoint the current step, export the same weights to hf/ and hf-gpt2/ (unless they hold this
    step already: a relaunched finished run rebuilds only a missing or stale export), and (with
    `upload` and checkpoint_remote) queue both for the background upload."""
    acc, c, step = run.accelerator, run.config, run.state.step
    if not weights_finite(run.model, acc):  # never reached while train_step skips non-finite updates
        raise DivergedError(
            f"the weights at step {step} are not all finite: not saved, exported or pushed; the newest "
            f"checkpoint in {run.paths.checkpoints} is the last good state (resume it with a lower --max_lr)"
        )
    run.state.guard = run.guard.state_dict()
    checkpoint = save_checkpoint(acc, run.paths.checkpoints, run.state, run.settings, c.keep_checkpoints)
    if on_main_process(acc, lambda: exported_step(run.paths.out_dir) != step):
        export_model(acc, run.model, run.paths.out_dir, step)
    logger.info("saved %s and the HF exports in %s", checkpoint, run.paths.out_dir)
    if upload:
        queue_upload(run, checkpoint)
    return checkpoint


def queue_upload(run: Run, checkpoint: Path) -> None:
    """Hand a complete checkpoint, the export and the logs to the background upload (main process)."""
    if run.uploader is not None:
        run.uploader.submit(run.state.step, checkpoint, run.paths.hf, [run.paths.log, run.paths.samples])


def train(run: Run) -> bool:
    """Train until max_steps (or stop_at_step, or a signal); True when the schedule is complete."""
    c, state = run.config, run.state
    end = c.stop_at_step or c.max_steps
    bar = tqdm(total=end, initial=state.step, desc="train", unit="step", disable=not run.accelerator.is_main_process)
    limit = parse_duration(c.time_limit) if c.time_limit else None
    with StopRequest(limit, run.started) as stop, bar, logging_redirect_tqdm([logger]):
        if state.step == 0:
            evaluate(run)  # the loss of the untrained model starts the curve
        while state.step < end:
            lr = lr_at(state.step, c)
            set_lr(run.optimizer, lr)
            step = train_step(run.model, run.optimizer, state.loader, run.accelerator, c.grad_clip)
            state.step += 1
            state.tokens += c.total_batch_size
            run.meter.add(c.total_batch_size)
            problem = run.guard.judge(*step)
            if problem is not None or state.step % c.log_interval == 0:
                log_train(run, step, lr, problem)
            bar.update()
            if run.guard.must_roll_back:
                why = problem.get("skipped") or f"loss {step.loss:.4g}, {problem['spike']:.1f}x the recent median"
                log_metrics(run, roll_back(run.accelerator, run.paths.checkpoints, state, run.guard, why))
                bar.n = state.step
                run.meter.restart()
                continue
            if state.step % c.eval_interval == 0 or state.step == c.max_steps:
                evaluate(run)
                run.meter.restart()  # evaluation time is not training throughput
            if state.step % c.save_interval == 0 and state.step < end and not run.guard.streak:
                # finish() saves the last step; during a bad streak the save waits (see training/guard.py)
                save(run)
                run.meter.restart()
            if stop.requested(run.accelerator):
                run.requeue = stop.requeue and state.step < c.max_steps
                break
    return state.step >= c.max_steps


def finish(run: Run, complete: bool) -> dict[str, Any]:
    """Checkpoint and export the last step, plot the losses, write the model card, push when asked, and
    wait for the uploads to checkpoint_remote (an upload that failed fails the run, here at the end)."""
    checkpoint = save(run, upload=False)  # uploaded below, once the export has its card
    acc, paths, c = run.accelerator, run.paths, run.config
    if acc.is_main_process:
        from eval.plot import plot_training

        plot_training(paths.out_dir, paths.plots)  # loss.png, and hellaswag.png when scored
        write_model_cards(paths.out_dir, c, run.unwrapped, run.manifest)  # results from log.jsonl
        if c.push_to_hub and complete:
            message = f"step {run.state.step}: {run.state.tokens:,} tokens"
            url = push_export(paths.out_dir, c.hub_model_id, c.hub_format, message)
            logger.info("pushed the %s export of %s to %s", c.hub_format, paths.out_dir, url)
        queue_upload(run, checkpoint)
    acc.wait_for_everyone()
    shut_down(run)
    summary = {
        "out_dir": str(paths.out_dir),
        "step": run.state.step,
        "tokens": run.state.tokens,
        "complete": complete,
        "requeue": run.requeue,
        "first_train_loss": run.first_loss,
        "last_train_loss": run.last_loss,
        **run.last_eval,
    }
    logger.info("done: %s", json.dumps(summary))
    if run.uploader is not None:
        run.uploader.close()
        logger.info("checkpoint_remote: step_%06d is complete at %s", run.state.step, run.uploader.store.url)
    return summary


def shut_down(run: Run) -> None:
    """End the run's distributed part: free the prepared model and optimizer, then `end_training`
    (trackers, the process group). In that order: DDP's Reducer holds the group, and freed after
    `end_training` has taken the group down it is the group's last holder, whose destructor joins
    gloo's worker threads while holding the GIL, which a worker still freeing a finished collective's
    Python tensor waits for: a rank that never exits (seen in a 2-process test under load;
    pytorch/pytorch#56297). Freed first, the group's last holder is `destroy_process_group`'s, whose
    destructor releases the GIL. A second call does nothing."""
    if run.shut:
        return
    run.shut = True
    run.model = run.optimizer = None
    run.accelerator.free_memory()
    if run.config.compile:
        torch._dynamo.reset()  # its caches may hold the compiled DDP module
    gc.collect()  # DDP's modules sit in reference cycles
    try:
        run.accelerator.end_training()  # the trackers, then the process group
    finally:
        run.accelerator.state.destroy_process_group()  # also when a tracker failed to finish; once only


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
    started = time.monotonic()
    config = parse_config(argv)
    accelerator = build_accelerator(config)
    setup_logging(accelerator)
    note = launcher_precision_note(os.environ.get("ACCELERATE_MIXED_PRECISION"), accelerator.mixed_precision)
    if note and accelerator.is_main_process:
        logger.warning(note)
    paths = RunPaths(config.out_dir)
    if config.checkpoint_remote is not None:
        remote.check_apart(config.checkpoint_remote, paths.out_dir)
    lock = RunLock(paths.lock)  # held by the main process for the whole run
    on_main_process(accelerator, lambda: claim_out_dir(paths, config.resume, lock))
    try:
        return run_training(config, accelerator, paths, started)
    finally:
        lock.release()


def run_training(config: TrainConfig, accelerator: Accelerator, paths: RunPaths, started: float) -> dict[str, Any]:
    check_training_fits(config.model_config(), accelerator)  # a model too large: one line now, not an OOM later
    store = remote.preflight_remote(config, accelerator)
    preflight_hub(config, accelerator)
    manifest = on_main_process(accelerator, lambda: prepare_data(config))
    settings = run_settings(config, train_fingerprint(manifest), accelerator.num_processes, val_fingerprint(manifest))
    run_id = None
    if store is not None:  # a store belongs to one run: refused before anything is downloaded
        run_id = on_main_process(accelerator, lambda: remote.store_run(store, read_run_id(paths), config.resume))
    checkpoint = on_main_process(
        accelerator, lambda: find_resume_checkpoint(config, paths.checkpoints, paths.out_dir, settings, store)
    )
    if store is not None:
        run_id = on_main_process(accelerator, lambda: own_store(paths, store, run_id))

    set_seed(config.seed)  # the same initial weights on every rank
    model = build_model(config)
    if config.init_from:
        load_weights(model, Path(config.init_from))
    optimizer = build_optimizer(model, config, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    set_seed(config.seed, device_specific=True)  # then different dropout masks per rank
    state = TrainState(build_loader(config, accelerator))
    flops_per_token = config.model_config().flops_per_token(config.seq_len)
    meter = Meter(flops_per_token, peak_flops(config, accelerator.device), accelerator.num_processes)
    run = Run(
        config, accelerator, paths, model, optimizer, state, meter, settings, manifest, Guard(config), started=started
    )
    del model, optimizer  # the run holds them alone, so that `shut_down` can let go of them
    if store is not None and accelerator.is_main_process:
        run.uploader = remote.CheckpointUploader(store, paths.upload_staging, config.remote_keep_last, run_id)
    try:
        return resume_train_finish(run, checkpoint, flops_per_token)
    except BaseException as err:  # a diverged run, a damaged checkpoint: the group goes down now, not at exit
        clear_finished_frames(err)  # they still hold the model
        try:
            shut_down(run)
        except Exception:  # the error that stopped the run is the one to report
            logger.exception("shutting down after the error below failed")
        raise


def clear_finished_frames(err: BaseException) -> None:
    """Drop the locals of the finished frames of `err` and of the errors it was raised from or during
    (a checkpoint that does not fit keeps Accelerate's model list in its cause's frames)."""
    seen: set[int] = set()
    pending = [err]
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        pending += [error.__cause__, error.__context__]


def resume_train_finish(run: Run, checkpoint: Path | None, flops_per_token: int) -> dict[str, Any]:
    """Load `checkpoint` when resuming, train to the end (or a stop), then `finish`."""
    accelerator, state = run.accelerator, run.state
    if checkpoint is not None:
        load_checkpoint(accelerator, checkpoint, state)
        try:
            run.guard.load_state_dict(state.guard)
        except ValueError as err:
            raise CheckpointError(f"{checkpoint}/train_state.json: {err}") from err
        logger.info("resumed from %s: step %d, %d tokens seen", checkpoint, state.step, state.tokens)
    run.hellaswag = load_hellaswag(run.config, accelerator)
    if accelerator.is_main_process:
        describe_run(run.config, run.paths, run_facts(run, flops_per_token, checkpoint))
    start_logs(run, resumed=checkpoint is not None)

    complete = train(run)
    return finish(run, complete)


def run_facts(run: Run, flops_per_token: int, checkpoint: Path | None) -> dict[str, Any]:
    """What the config alone does not say: the launch's processes, precision, device and model size."""
    acc = run.accelerator
    return {
        "processes": acc.num_processes,
        "distributed_type": str(acc.distributed_type),
        "device": device_name(acc.device),
        "mixed_precision": acc.mixed_precision,
        "fsdp_mixed_precision": fsdp_precision(acc),
        "gradient_accumulation_steps": acc.gradient_accumulation_steps,
        "parameters": sum(p.numel() for p in run.unwrapped.parameters()),
        "flops_per_token": flops_per_token,
        "peak_flops_per_device": run.meter.peak,
        "resumed_from": str(checkpoint) if checkpoint else None,
    }


def device_name(device: torch.device) -> str:
    """The GPU's name, or for MPS and the CPU the processor's (Apple's chips name both)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    processor = platform.processor() or platform.machine() or "cpu"
    return f"mps ({processor})" if device.type == "mps" else processor


def command(argv: list[str] | None = None) -> int:
    """The command line's exit status: 0, or REQUEUE_STATUS when the run checkpointed before a time limit
    (the scheduler should run it again). Errors go through `run_command`: a DivergedError exits 3."""
    return REQUEUE_STATUS if main(argv)["requeue"] else 0


if __name__ == "__main__":
    run_command(command)
