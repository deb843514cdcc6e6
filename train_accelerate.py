"""Pretrain GPT-2 from scratch with Accelerate: the GPT-3 recipe, exact resume, a Hugging Face export.

    accelerate launch [--config_file accelerate_configs/NAME.yaml] train_accelerate.py \
        [--config configs/PRESET.yaml] [--field value ...]

With no arguments it trains the small `cpu-micro` model on the built-in corpus (tokenized on the
first run) in a few minutes on a laptop CPU. `configs/gpt2-124m-fineweb-edu.yaml` is the GPT-2 124M
reproduction of build-nanogpt (10B FineWeb-Edu tokens, 524,288 tokens per step). Every field of
`gpt2_scratch.training.config.TrainConfig` can be set in a YAML preset and overridden on the command line; `--help`
lists them.

This file builds the pieces and runs the loop, top to bottom: `main` (the config, the accelerator, the
run folder's lock) -> `run_training` (the remote and Hub checks, the data, the checkpoint to resume, the
memory check, model, optimizer and loader) -> `train` (`train_step`, `evaluate`, `save`) -> `finish`
(the last checkpoint, the exports, plots, model cards, push). The pieces live in the `gpt2_scratch/training/`
package: config, accelerator and devices (what the launch runs on), recipe (batch arithmetic, LR
schedule, optimizer, precision), step, guard, data, evaluation, memory, metrics, checkpoints and verify,
export and model_card, remote (checkpoint_remote), paths and run_dir (the run's record), hub, processes.
A user error anywhere is one `error:` line and exit status 2 (`gpt2_scratch.user_errors.run_command`).

The run directory (`out_dir`) describes itself: `config.yaml` (the resolved config, loadable with
`--config`), `run_info.json` (world size, precision, package versions, git revision), `log.jsonl`,
`samples.jsonl`, `plots/loss.png`, `tensorboard/`, `checkpoints/step_NNNNNN/` and the two Hugging Face
exports, `hf/` (our class) and `hf-gpt2/` (the official GPT-2 layout), each with its model card. With
`--checkpoint_remote URL` every checkpoint is also mirrored to a remote store (`gpt2_scratch/training/remote.py`).
"""

from __future__ import annotations

if __name__ == "__main__":  # first of all: a scheduler's SIGUSR1 may come while torch is still being imported
    from gpt2_scratch.training import stop_signals

    stop_signals.catch_early()

import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from gpt2_scratch.training import remote, stop_signals
from gpt2_scratch.training.accelerator import build_accelerator, setup_logging
from gpt2_scratch.training.checkpoints import (
    TrainState,
    find_resume_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    run_settings,
    save_checkpoint,
    save_size,
)
from gpt2_scratch.training.config import TrainConfig, parse_config, parse_duration
from gpt2_scratch.training.data import (
    build_loader,
    data_facts,
    data_settings,
    prepare_data,
    train_fingerprint,
    val_fingerprint,
    val_sources,
)
from gpt2_scratch.training.evaluation import generate_samples, load_hellaswag
from gpt2_scratch.training.export import GPT2_EXPORT, export_model, exported_step
from gpt2_scratch.training.files import DiskError, check_room
from gpt2_scratch.training.guard import DivergedError, Guard, roll_back, weights_finite
from gpt2_scratch.training.hub import preflight_hub, push_export
from gpt2_scratch.training.memory import check_training_fits, parameter_count
from gpt2_scratch.training.metrics import Meter, append_jsonl, format_value, keep_records_through, peak_flops
from gpt2_scratch.training.model_card import write_model_cards
from gpt2_scratch.training.processes import REQUEUE_STATUS, StopRequest, on_main_process
from gpt2_scratch.training.recipe import build_optimizer, launcher_precision_note, set_schedule, stable_step
from gpt2_scratch.training.run_dir import (
    RunLock,
    RunPaths,
    claim_out_dir,
    describe_run,
    holds_only_leftovers,
    launch_facts,
    let_go_of_out_dir,
    own_store,
    read_run_id,
)
from gpt2_scratch.training.step import StepResult, train_step
from gpt2_scratch.training.verify import CheckpointError
from gpt2_scratch.training.watchdog import StallWatchdog
from gpt2_scratch.user_errors import run_command
from modeling_gpt2_scratch import GPT2ScratchForCausalLM

logger = logging.getLogger("train")


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
    guard: Guard  # skipped updates, spikes and rollbacks (gpt2_scratch/training/guard.py)
    hellaswag: list[dict] | None = None
    last_eval: dict[str, float] = field(default_factory=dict)
    first_loss: float | None = None
    last_loss: float | None = None
    uploader: remote.CheckpointUploader | None = None  # uploads to checkpoint_remote (main process only)
    started: float = field(default_factory=time.monotonic)  # when the process began, for time_limit
    requeue: bool = False  # stopped by time_limit or SIGUSR1: unfinished, to be resumed
    idle: bool = False  # stopped before its first step: nothing new to save
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
    sources = run.state.loader.metrics() if hasattr(run.state.loader, "metrics") else {}  # a mixture's tokens, epochs
    log_metrics(run, {**values, "lr": lr, **guard, **run.meter.lap(), **sources})


def evaluate(run: Run) -> None:
    """Validation loss, HellaSwag when its data is there, and text samples; logged at the current step. A
    data mixture's val/loss is the mean of its sources' (each `val/loss/NAME`, logged too) weighted as
    they are trained on."""
    from eval.val_loss import evaluate_val_loss

    c = run.config
    shape = dict(batch_size=c.micro_batch_size, seq_len=c.seq_len, max_batches=c.val_batches)
    losses = {
        label: (weight, evaluate_val_loss(run.model, folder, **shape, accelerator=run.accelerator))
        for label, weight, folder in val_sources(c, run.manifest)
    }
    metrics = {"val/loss": sum(weight * loss for weight, loss in losses.values())}
    metrics |= {f"val/loss/{label}": loss for label, (_, loss) in losses.items() if label}
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
        samples = generate_samples(run.unwrapped, c, run.accelerator.device)
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
    stable = step == stable_step(c)
    with stopping_on_a_full_disk(run):
        check_room_to_save(run, step)
        checkpoint = save_checkpoint(acc, run.paths.checkpoints, run.state, run.settings, c.keep_checkpoints, stable)
        if on_main_process(acc, lambda: exported_step(run.paths.out_dir) != step):
            export_model(acc, run.model, run.paths.out_dir, step)
    logger.info("saved %s and the HF exports in %s", checkpoint, run.paths.out_dir)
    if stable:
        logger.info(
            "%s is the stable checkpoint (the last step before the decay, kept by pruning): --resume auto "
            "--max_steps N with N > %d extends this run from it",
            checkpoint.name,
            c.max_steps,
        )
    if upload:
        queue_upload(run, checkpoint)
    return checkpoint


def check_room_to_save(run: Run, step: int, what: str | None = None) -> None:
    """Refuse, on every rank and before anything is written, a save of `step` (`what`) that would not fit in
    the free space of out_dir's disk (`save_size`: the newest checkpoint's and exports' sizes)."""
    paths = run.paths

    def check() -> None:
        exports = [paths.hf, paths.out_dir / GPT2_EXPORT] if exported_step(paths.out_dir) != step else []
        needed = save_size(paths.checkpoints, step, exports, 4 * parameter_count(run.config.model_config()))
        check_room(paths.out_dir, needed, what or f"the checkpoint and exports of step {step}")

    on_main_process(run.accelerator, check)


@contextlib.contextmanager
def stopping_on_a_full_disk(run: Run) -> Iterator[None]:
    """A disk that is full or not writable ends the run (exit status 2, not the requeue status: a requeue
    would meet the same disk): its `DiskError` line also names the newest checkpoint, which stays."""
    try:
        yield
    except DiskError as err:
        newest = on_main_process(run.accelerator, lambda: latest_checkpoint(run.paths.checkpoints))
        kept = f"{newest.name} is the newest checkpoint, kept" if newest else "no checkpoint was written yet"
        raise DiskError(f"{err}; {kept}: once there is room, continue with --resume auto") from err


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
    acc = run.accelerator
    watchdog = StallWatchdog(c.collective_timeout, acc.process_index, acc.num_processes)
    with StopRequest(limit, run.started) as stop, watchdog, bar, logging_redirect_tqdm([logger]):
        if stop.requested(run.accelerator):  # a signal while starting (or the time limit spent): no step taken
            logger.warning("stopped before the first step: the newest checkpoint, if any, is the run's state")
            run.requeue, run.idle = stop.requeue, True
            return False
        if state.step == 0:
            evaluate(run)  # the loss of the untrained model starts the curve
        while state.step < end:
            lr = set_schedule(run.optimizer, state.step, c)  # the LR (and Muon's momentum) of this step
            step = train_step(run.model, run.optimizer, state.loader, run.accelerator, c.grad_clip)
            run.meter.exclude(state.loader.take_waited())  # a late remote shard is not training time
            for event in state.loader.take_events() if hasattr(state.loader, "take_events") else ():
                logger.info(event)  # a mixture's source that ran out and starts its next epoch
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
            due = state.step % c.save_interval == 0 or state.step == stable_step(c)  # wsd: the run's `stable` one
            if due and state.step < end and not run.guard.streak:
                # finish() saves the last step; during a bad streak the save waits (see gpt2_scratch/training/guard.py)
                save(run)
                run.meter.restart()
            if stop.requested(run.accelerator):
                run.requeue = stop.requeue and state.step < c.max_steps
                break
            watchdog.progress(state.step)
    return state.step >= c.max_steps


def finish(run: Run, complete: bool) -> dict[str, Any]:
    """Checkpoint and export the last step, plot the losses, write the model card, push when asked, and
    wait for the uploads to checkpoint_remote (an upload that failed fails the run, here at the end).
    A run stopped before its first step (`idle`) saves nothing: it has nothing new."""
    paths = run.paths
    if not run.idle:
        save_last(run, complete)
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
    if run.uploader is not None and not run.idle:
        logger.info("checkpoint_remote: step_%06d is complete at %s", run.state.step, run.uploader.store.url)
    return summary


def save_last(run: Run, complete: bool) -> None:
    """The last step's checkpoint and exports, the plots and model cards, the push when asked, and the
    checkpoint's upload."""
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
    run.state.loader.close()  # a data_stream's reader thread and tokenizing processes
    run.model = run.optimizer = None
    run.accelerator.free_memory()
    if run.config.compile:
        torch._dynamo.reset()  # its caches may hold the compiled DDP module
    gc.collect()  # DDP's modules sit in reference cycles
    try:
        run.accelerator.end_training()  # the trackers, then the process group
    finally:
        run.accelerator.state.destroy_process_group()  # also when a tracker failed to finish; once only


def main(argv: list[str] | None = None) -> dict[str, Any]:
    started = stop_signals.process_started() or time.monotonic()  # the script: its process's start
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
    made = on_main_process(accelerator, lambda: claim_out_dir(paths, config.resume, lock))
    try:
        with stop_signals.SecondSignal():  # a second signal ends the process, even while it is blocked in C++
            return run_training(config, accelerator, paths, started)
    except BaseException:
        if accelerator.is_main_process and holds_only_leftovers(paths):  # refused before training: no stray .lock
            let_go_of_out_dir(paths, lock, made)
        raise
    finally:
        lock.release()


def run_training(config: TrainConfig, accelerator: Accelerator, paths: RunPaths, started: float) -> dict[str, Any]:
    check_training_fits(config.model_config(), accelerator)  # a model too large: one line now, not an OOM later
    store = remote.preflight_remote(config.checkpoint_remote, config.hub_private, accelerator)
    preflight_hub(config.hub_model_id if config.push_to_hub else None, config.hub_private, accelerator)
    manifest = on_main_process(accelerator, lambda: prepare_data(config))
    settings = run_settings(config, train_fingerprint(manifest), accelerator.num_processes, val_fingerprint(manifest))
    settings |= data_settings(manifest)  # a hf:// data_dir's commit
    run_id = None
    if store is not None:  # a store belongs to one run: refused before anything is downloaded
        run_id = on_main_process(accelerator, lambda: remote.store_run(store, read_run_id(paths), config.resume))
    checkpoint = on_main_process(
        accelerator, lambda: find_resume_checkpoint(config, paths.checkpoints, paths.out_dir, settings, store)
    )
    if store is not None:
        run_id = on_main_process(accelerator, lambda: own_store(paths, store, run_id, checkpoint is not None))

    set_seed(config.seed)  # the same initial weights on every rank
    model = build_model(config)
    if config.init_from:
        load_weights(model, Path(config.init_from))
    optimizer = build_optimizer(model, config, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    set_seed(config.seed, device_specific=True)  # then different dropout masks per rank
    state = TrainState(build_loader(config, accelerator, manifest))
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
    if state.step < (run.config.stop_at_step or run.config.max_steps):  # a save to come: is there room for it?
        with stopping_on_a_full_disk(run):
            check_room_to_save(run, state.step + 1, "the checkpoints and exports this run saves")
    if accelerator.is_main_process:
        facts = launch_facts(accelerator, run.unwrapped, flops_per_token, run.meter.peak, checkpoint)
        facts["data"] = data_facts(run.config, run.manifest)  # a URL's commit and cache, the stream or the mix
        describe_run(run.config, run.paths, facts)
    start_logs(run, resumed=checkpoint is not None)

    complete = train(run)
    return finish(run, complete)


def command(argv: list[str] | None = None) -> int:
    """The command line's exit status: 0, or REQUEUE_STATUS when the run checkpointed before a time limit
    (the scheduler should run it again). Errors go through `run_command`: a DivergedError exits 3."""
    return REQUEUE_STATUS if main(argv)["requeue"] else 0


if __name__ == "__main__":
    run_command(command)
