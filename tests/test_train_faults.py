"""What survives what: damaged and tampered checkpoints, a kill during the final export, two trainers on
one run folder, a mistyped data folder, changed settings on resume, and user errors as one line. Real
trainer runs on real files; each fault is made the way it happens (a truncated, missing, flipped or
replaced file, a SIGKILL), never with mocks."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from trainer_runs import ONE_THREAD, ROOT, launch, metric, nano_args, records, train_in_process

from data_prep.shards import ShardError, file_sha256, read_manifest, write_manifest
from gpt2_scratch.training import run_dir
from gpt2_scratch.training.checkpoints import newest_intact
from gpt2_scratch.training.config import ConfigError
from gpt2_scratch.training.paths import RunPaths
from gpt2_scratch.training.run_dir import RunLock, claim_out_dir
from gpt2_scratch.training.verify import CheckpointError, check_resumable, checkpoint_problems, read_train_state

pytestmark = pytest.mark.usefixtures("one_thread")

# Dropout on and samples drawn: both use the RNG states a checkpoint must restore.
COMMON = dict(dropout=0.1, max_steps=12, save_interval=4, eval_interval=4, keep_checkpoints=2)
COMMON["sample_prompt"] = "<|endoftext|>"  # unconditional samples, from the document separator as GPT-2's


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> Path:
    """An uninterrupted run to step 12."""
    out = tmp_path_factory.mktemp("faults") / "reference"
    train_in_process(nano_args(data_dir, out, **COMMON))
    return out


@pytest.fixture(scope="module")
def stopped(data_dir, tmp_path_factory) -> Path:
    """The same run stopped after step 8: checkpoints step_000004 and step_000008."""
    out = tmp_path_factory.mktemp("faults") / "stopped"
    train_in_process(nano_args(data_dir, out, stop_at_step=8, **COMMON))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000004", "step_000008"]
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / run.name))


def same_losses(run: Path, reference: Path) -> None:
    assert sorted(metric(run, "train/loss")) == list(range(1, 13))  # each step once, none lost or repeated
    assert metric(run, "train/loss") == metric(reference, "train/loss")
    assert metric(run, "val/loss") == metric(reference, "val/loss")


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


class Touch:
    """Unpickling this creates a file: the proof that a pickle's code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


class NumpyRun:
    """Unpickling this runs code through a numpy function (numpy.testing's `runstring`)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        from numpy.testing._private.utils import runstring

        return (runstring, (f"open({str(self.path)!r}, 'w').close()", {}))


def plant_pickle(checkpoint: Path, name: str, proof: Path, numpy_callable: bool = False) -> None:
    """Replace (or add) `name` with a torch file whose unpickling would create `proof`, and rewrite the
    manifest's entry to match, as an attacker who can write the folder would."""
    torch.save({"state": NumpyRun(proof) if numpy_callable else Touch(proof)}, checkpoint / name)
    manifest = json.loads((checkpoint / "checkpoint.json").read_text())
    manifest["files"][name] = {"bytes": (checkpoint / name).stat().st_size, "sha256": file_sha256(checkpoint / name)}
    (checkpoint / "checkpoint.json").write_text(json.dumps(manifest))


def truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


DAMAGES = {
    "truncated weights": lambda c, _: truncate(c / "model.safetensors", 999),
    "missing optimizer": lambda c, _: (c / "optimizer.bin").unlink(),
    "truncated optimizer": lambda c, _: truncate(c / "optimizer.bin", 100),
    "missing RNG file": lambda c, _: (c / "random_states_0.pkl").unlink(),
    "flipped byte": lambda c, _: flip_byte(c / "model.safetensors"),
    "empty folder": lambda c, _: [p.unlink() for p in c.iterdir()],
    "planted pickle": lambda c, proof: plant_pickle(c, "optimizer.bin", proof),
    "planted custom state": lambda c, proof: plant_pickle(c, "custom_checkpoint_0.pkl", proof),
    "planted numpy callable": lambda c, proof: plant_pickle(c, "optimizer.bin", proof, numpy_callable=True),
    "train state of another step": lambda c, _: rewrite_state(c, step=5),
    "symlink to another file": lambda c, _: link_outside(c, "optimizer.bin"),
}


def rewrite_state(checkpoint: Path, **changes) -> None:
    """A consistent-looking train_state.json (its manifest entry rewritten) that lies about the state."""
    path = checkpoint / "train_state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    manifest = json.loads((checkpoint / "checkpoint.json").read_text())
    manifest["files"]["train_state.json"] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    (checkpoint / "checkpoint.json").write_text(json.dumps(manifest))


def link_outside(checkpoint: Path, name: str) -> None:
    """`name` replaced by a link to a copy outside the folder (same bytes, so the hashes still match)."""
    outside = checkpoint.parent.parent / f"outside_{name}"
    shutil.move(checkpoint / name, outside)
    (checkpoint / name).symlink_to(outside)


# What checkpoint_problems must say about each damage (the decision a resume rests on).
FOUND = {
    "truncated weights": "model.safetensors has 999 bytes",
    "missing optimizer": "optimizer.bin is missing",
    "truncated optimizer": "optimizer.bin has 100 bytes",
    "missing RNG file": "random_states_0.pkl is missing",
    "flipped byte": "model.safetensors does not match its sha256",
    "empty folder": "no checkpoint.json",
    "planted pickle": "optimizer.bin needs .* could run code",
    "planted custom state": "custom_checkpoint_0.pkl needs .* could run code",
    "planted numpy callable": "optimizer.bin needs numpy.testing.* could run code",
    "train state of another step": "train_state.json step 5 is not the folder's",
    "symlink to another file": "optimizer.bin is a symbolic link",
}


def damaged_copy(stopped: Path, tmp_path: Path, damage: str, proof: Path) -> dict[int, Path]:
    """Both checkpoints of the stopped run, copied, the newer one (step 8) damaged."""
    checkpoints = tmp_path / "run" / "checkpoints"
    for step in (4, 8):
        shutil.copytree(stopped / "checkpoints" / f"step_{step:06d}", checkpoints / f"step_{step:06d}")
    DAMAGES[damage](checkpoints / "step_000008", proof)
    return {4: checkpoints / "step_000004", 8: checkpoints / "step_000008"}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_each_damage_is_found_and_resume_auto_falls_back(damage, stopped, tmp_path):
    assert set(FOUND) == set(DAMAGES)
    proof = tmp_path / "code_ran"
    local = damaged_copy(stopped, tmp_path, damage, proof)
    assert checkpoint_problems(local[4]) == []
    problems = checkpoint_problems(local[8])
    assert any(re.search(FOUND[damage], problem) for problem in problems), problems
    settings = read_train_state(local[4])["settings"]
    with pytest.raises(CheckpointError, match="is damaged"):
        check_resumable(local[8], settings)
    checkpoints = local[4].parent
    assert newest_intact(local, [], None, checkpoints, checkpoints.parent, settings) == local[4]
    assert [p.name.startswith("damaged_step_000008_") for p in checkpoints.iterdir()].count(True) == 1
    assert not proof.exists()  # judging a planted pickle never unpickles it


@pytest.mark.parametrize("damage", ["truncated weights", "planted pickle"])
def test_resume_auto_falls_back_from_a_damaged_newest_checkpoint(damage, data_dir, stopped, reference, tmp_path):
    """End to end, for a damaged file and a planted one: the run resumes from step 4 and trains 5 to 12
    again exactly as the uninterrupted run did."""
    run, proof = copy_run(stopped, tmp_path), tmp_path / "code_ran"
    DAMAGES[damage](run / "checkpoints" / "step_000008", proof)
    train_in_process(nano_args(data_dir, run, resume="auto", **COMMON))
    same_losses(run, reference)
    assert json.loads((run / "run_info.json").read_text())["resumed_from"].endswith("step_000004")
    assert [p.name.startswith("damaged_step_000008_") for p in (run / "checkpoints").iterdir()].count(True) == 1
    assert not proof.exists()
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 4, 8, 12] and {s["prompt"] for s in samples} == {"<|endoftext|>"}


def one_line(error: type, argv: list[str]) -> str:
    """The message of the user error (of class `error`) that a launch with `argv` stops with: one line,
    which the command prints as `error: ...` with exit status 2 (checked once, below)."""
    with pytest.raises(error) as raised:
        train_in_process(argv)
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_resume_path_on_a_tampered_checkpoint_is_one_line_and_runs_no_code(data_dir, stopped, tmp_path):
    run, proof = copy_run(stopped, tmp_path), tmp_path / "code_ran"
    checkpoint = run / "checkpoints" / "step_000008"
    plant_pickle(checkpoint, "random_states_0.pkl", proof)
    message = one_line(CheckpointError, nano_args(data_dir, run, resume=checkpoint, **COMMON))
    assert "random_states_0.pkl needs" in message and "could run code" in message
    flip_byte(checkpoint / "model.safetensors")  # and a flipped bit (same size) names the file
    message = one_line(CheckpointError, nano_args(data_dir, run, resume=checkpoint, **COMMON))
    assert "model.safetensors does not match its sha256" in message
    assert not proof.exists()


def test_a_remote_checkpoint_with_a_planted_pickle_is_refused_and_runs_no_code(data_dir, stopped, tmp_path):
    from gpt2_scratch.training import remote

    proof, remote_dir = tmp_path / "code_ran", tmp_path / "remote"
    store = remote.open_store(f"file://{remote_dir}")
    checkpoint = stopped / "checkpoints" / "step_000008"
    remote.upload_checkpoint(store, 8, checkpoint, stopped / "hf", [stopped / "log.jsonl"])
    # The attacker replaces a file and rewrites both the checkpoint manifest and the COMPLETE marker.
    uploaded = remote_dir / "checkpoints" / "step_000008"
    plant_pickle(uploaded, "optimizer.bin", proof)
    marker = json.loads((uploaded / "COMPLETE").read_text())
    for name in ("optimizer.bin", "checkpoint.json"):
        marker["files"][name] = {"bytes": (uploaded / name).stat().st_size, "sha256": file_sha256(uploaded / name)}
    (uploaded / "COMPLETE").write_text(json.dumps(marker))
    with pytest.raises(CheckpointError, match="optimizer.bin needs .* could run code"):
        train_in_process(nano_args(data_dir, tmp_path / "fresh", resume=f"file://{uploaded}", **COMMON))
    assert not proof.exists()


def test_sigkill_during_the_final_export_then_relaunch_rebuilds_it(data_dir, stopped, reference, tmp_path):
    run = copy_run(stopped, tmp_path)
    proc = launch(nano_args(data_dir, run, resume="auto", **COMMON))
    final = run / "checkpoints" / "step_000012"
    deadline = time.monotonic() + 240
    while not final.is_dir():  # the final checkpoint is renamed into place; the export comes right after
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shutil.rmtree(run / "hf", ignore_errors=True)  # the worst moment: the old export gone, the new not there

    summary = train_in_process(nano_args(data_dir, run, resume="auto", **COMMON))
    assert summary["complete"] and summary["step"] == 12
    same_losses(run, reference)
    exported = {k: v.clone() for k, v in load_file(run / "hf" / "model.safetensors").items()}  # not an mmap
    checkpointed = load_file(final / "model.safetensors")
    assert all(torch.equal(exported[name], checkpointed[name]) for name in checkpointed)
    card = (run / "hf" / "README.md").read_text()
    assert f"{metric(reference, 'val/loss')[12]:.4f}" in card  # the card keeps the run's results

    # A stale export (an older step's weights) is replaced too.
    shutil.copytree(stopped / "hf", run / "hf", dirs_exist_ok=True)
    train_in_process(nano_args(data_dir, run, resume="auto", **COMMON))
    assert torch.equal(
        load_file(run / "hf" / "model.safetensors")["transformer.wte.weight"], exported["transformer.wte.weight"]
    )


def test_two_trainers_on_one_run_folder(data_dir, tmp_path):
    out = tmp_path / "shared"
    argv = nano_args(data_dir, out, max_steps=6, save_interval=3, eval_interval=6, num_samples=0)
    first, second = launch(argv), launch(argv)
    codes = sorted([first.wait(timeout=300), second.wait(timeout=300)])
    assert codes == [0, 2]
    loser = first if first.returncode == 2 else second
    stderr = loser.stderr.read()
    assert "is in use by another trainer (host" in stderr and "pid" in stderr and "Traceback" not in stderr
    assert [r["step"] for r in records(out) if "train/loss" in r] == [1, 2, 3, 4, 5, 6]  # each step once


def test_a_second_launch_in_the_moment_before_the_holder_names_itself_still_names_it(tmp_path):
    """The first trainer names itself in `.lock` only after it has checked out_dir (so another tool's
    `.lock` is never overwritten): a second launch in that moment waits for the name, and does not
    report an "unknown" holder (CI saw it in test_two_trainers_on_one_run_folder under load)."""
    first = RunLock(tmp_path / "run" / ".lock")
    first.acquire()
    naming = threading.Timer(0.3, first.name_holder)  # the first trainer, still checking out_dir
    naming.start()
    try:
        with pytest.raises(ConfigError, match=r"in use by another trainer \(host .*, pid [0-9]+\)"):
            RunLock(tmp_path / "run" / ".lock").acquire()
    finally:
        naming.join()
        first.release()


def test_a_second_launch_names_the_live_trainer_not_the_pid_an_earlier_run_left(tmp_path, monkeypatch):
    """A finished run leaves `.lock` naming its (dead) trainer; a resumed launch renames it as soon as it
    holds the lock, so a launch refused while the first still checks out_dir names the live trainer."""
    paths = RunPaths(tmp_path / "run")
    paths.out_dir.mkdir()
    paths.lock.write_text("host old-machine, pid 1\n")
    refused: list[str] = []
    check_out_dir = run_dir.check_out_dir

    def second_launch_meanwhile(*args, **kwargs):
        with pytest.raises(ConfigError) as second:
            RunLock(paths.lock).acquire()
        refused.append(str(second.value))
        return check_out_dir(*args, **kwargs)

    monkeypatch.setattr(run_dir, "check_out_dir", second_launch_meanwhile)
    live = RunLock(paths.lock)
    claim_out_dir(paths, "auto", live)
    live.release()
    assert len(refused) == 1 and f"pid {os.getpid()})" in refused[0] and "pid 1)" not in refused[0], refused


def test_a_lock_left_by_a_killed_trainer_does_not_block(data_dir, tmp_path):
    out = tmp_path / "killed"
    proc = launch(nano_args(data_dir, out, max_steps=200, save_interval=2, eval_interval=200, num_samples=0))
    while not (out / "checkpoints").is_dir():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert (out / ".lock").is_file()
    summary = train_in_process(
        nano_args(data_dir, out, max_steps=200, save_interval=2, eval_interval=200, num_samples=0, resume="auto")
        + ["--stop_at_step", "4"]
    )
    assert summary["step"] == 4


def test_a_mistyped_data_folder_is_refused_and_left_untouched(tmp_path):
    typo = tmp_path / "my_data"
    typo.mkdir()
    (typo / "notes.txt").write_text("the user's own file")
    before = sorted(p.name for p in typo.iterdir())
    message = one_line(ConfigError, ["--data_dir", str(typo), "--out_dir", str(tmp_path / "out")])
    assert "holds no manifest.json" in message and str(typo) in message
    assert (
        sorted(p.name for p in typo.iterdir()) == before and (typo / "notes.txt").read_text() == "the user's own file"
    )
    # asked explicitly, the built-in corpus still goes only into an absent or empty folder
    message = one_line(ConfigError, ["--data_dir", str(typo), "--prepare_builtin", "--out_dir", str(tmp_path / "o2")])
    assert "is not empty" in message and sorted(p.name for p in typo.iterdir()) == before
    missing = tmp_path / "missing_data"
    with pytest.raises(ConfigError, match="holds no manifest.json"):
        train_in_process(["--data_dir", str(missing), "--out_dir", str(tmp_path / "o3")])
    assert not missing.exists()


@pytest.mark.parametrize(
    ("field", "value", "old"),
    [
        ("total_batch_size", "512", "256"),
        ("seq_len", "16", "32"),
        ("micro_batch_size", "8", "4"),
        ("n_layer", "3", "None"),
        ("seed", "7", "1337"),
        ("max_lr", "0.001", "0.003"),
    ],
)
def test_a_changed_setting_is_refused_naming_old_and_new(field, value, old, data_dir, stopped, tmp_path):
    run = copy_run(stopped, tmp_path)
    with pytest.raises(CheckpointError) as error:
        train_in_process([*nano_args(data_dir, run, resume="auto", **COMMON), f"--{field}", value])
    message = str(error.value)
    assert f"{field}: {old}" in message.replace("'", "") and value in message and "--init_from" in message
    assert "\n" not in message


def test_other_training_data_is_refused_on_resume(stopped, tmp_path):
    from data_prep import prepare_builtin

    other = prepare_builtin(tmp_path / "other_data", shard_tokens=40_000)
    with pytest.raises(CheckpointError, match="data: other training shards"):
        train_in_process(nano_args(other, copy_run(stopped, tmp_path), resume="auto", **COMMON))


def test_init_from_starts_a_new_run_from_the_checkpoints_weights(data_dir, stopped, tmp_path):
    checkpoint = stopped / "checkpoints" / "step_000008"
    out = tmp_path / "longer"
    common = {**COMMON, "max_steps": 2, "warmup_steps": 1, "save_interval": 2, "eval_interval": 2}
    train_in_process(nano_args(data_dir, out, init_from=checkpoint, seq_len=32, max_lr=1e-3, **common))
    assert metric(out, "val/loss")[0] == pytest.approx(metric(stopped, "val/loss")[8], rel=1e-6)
    assert sorted(metric(out, "train/loss")) == [1, 2]


def damage_val_shard(data: Path, tmp_path: Path, token: int | None) -> Path:
    """A copy of the data whose val shard has one token changed: either its hash no longer matches
    (token None: a flipped bit), or it holds `token` and the manifest is updated to match."""
    copy = Path(shutil.copytree(data, tmp_path / "data"))
    manifest = read_manifest(copy)
    (entry,) = [e for e in manifest["shards"] if e["split"] == "val"]
    shard = copy / entry["file"]
    if token is None:
        flip_byte(shard)
        return copy
    tokens = np.fromfile(shard, dtype=np.uint16)
    tokens[-5] = token
    tokens.tofile(shard)
    entry["sha256"] = file_sha256(shard)
    write_manifest(copy, manifest)
    return copy


def test_the_val_shard_is_checked_before_training(data_dir, tmp_path):
    flipped = damage_val_shard(data_dir, tmp_path / "a", None)
    with pytest.raises(ShardError, match="val_000000.bin: sha256 .* does not match"):
        train_in_process(nano_args(flipped, tmp_path / "out_a"))
    too_large = damage_val_shard(data_dir, tmp_path / "b", 60_000)
    with pytest.raises(ShardError, match="token id 60000 is outside the model's vocabulary of 50257"):
        train_in_process(nano_args(too_large, tmp_path / "out_b"))
    assert not (tmp_path / "out_a" / "log.jsonl").exists()


def test_user_errors_are_one_line(data_dir, tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("max_steps: [1, 2\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    cases = {
        "is not valid YAML": ["--config", str(bad_yaml)],
        "is a file, not a folder": nano_args(data_dir, a_file),
        "sample_prompt is empty": [*nano_args(data_dir, tmp_path / "o1"), "--sample_prompt", ""],
        "sample_tokens (64) leaves no room": [*nano_args(data_dir, tmp_path / "o2"), "--sample_tokens", "64"],
        "needs an absolute path": nano_args(data_dir, tmp_path / "o3", checkpoint_remote="file://relative/remote"),
    }
    for expected, argv in cases.items():
        assert expected in one_line(ConfigError, argv), expected
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()
    # and the command prints it as one `error:` line with exit status 2 (every command: test_commands.py)
    done = subprocess.run(
        [sys.executable, str(ROOT / "train_accelerate.py"), *cases["sample_prompt is empty"]],
        cwd=ROOT,
        env=ONE_THREAD,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert "sample_prompt is empty" in line


def test_the_checkpoint_holds_no_pickle_of_our_own_state(stopped):
    checkpoint = stopped / "checkpoints" / "step_000008"
    names = sorted(p.name for p in checkpoint.iterdir())
    assert names == [
        "checkpoint.json",
        "model.safetensors",
        "optimizer.bin",
        "random_states_0.pkl",
        "train_state.json",
    ]
    state = json.loads((checkpoint / "train_state.json").read_text())
    assert (state["step"], state["tokens"], state["settings"]["seq_len"]) == (8, 8 * 256, 32)
    for name in ("optimizer.bin", "random_states_0.pkl"):
        assert set(torch.serialization.get_unsafe_globals_in_checkpoint(checkpoint / name)) <= {
            "numpy.core.multiarray._reconstruct",
            "numpy._core.multiarray._reconstruct",
            "numpy.ndarray",
            "numpy.dtype",
            "numpy.dtypes.UInt32DType",
            "_codecs.encode",
        }


def test_with_every_checkpoint_damaged_relaunches_keep_refusing(data_dir, stopped, tmp_path):
    """None intact is an error, and stays one on the next identical launch: never a silent restart."""
    run = copy_run(stopped, tmp_path)
    for step in ("step_000004", "step_000008"):
        flip_byte(run / "checkpoints" / step / "model.safetensors")
    log = (run / "log.jsonl").read_text()
    for _ in range(2):
        with pytest.raises(CheckpointError, match="no intact checkpoint to resume from"):
            train_in_process(nano_args(data_dir, run, resume="auto", **COMMON))
    assert (run / "log.jsonl").read_text() == log


def test_an_rng_file_that_is_not_an_rng_state_is_an_error(data_dir, stopped, tmp_path):
    """A harmless pickle in place of the RNG state, its hashes rewritten: Accelerate would go on with
    other random numbers; the trainer stops instead."""
    run = copy_run(stopped, tmp_path)
    checkpoint = run / "checkpoints" / "step_000008"
    torch.save({}, checkpoint / "random_states_0.pkl")
    plant = json.loads((checkpoint / "checkpoint.json").read_text())
    rng = checkpoint / "random_states_0.pkl"
    plant["files"]["random_states_0.pkl"] = {"bytes": rng.stat().st_size, "sha256": file_sha256(rng)}
    (checkpoint / "checkpoint.json").write_text(json.dumps(plant))
    with pytest.raises(CheckpointError, match="random_states_0.pkl holds no usable RNG state"):
        train_in_process(nano_args(data_dir, run, resume="auto", **COMMON))


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_untouched(data_dir, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("important")
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").symlink_to(victim)
    message = one_line(ConfigError, nano_args(data_dir, out))
    assert "cannot hold a run" in message and victim.read_text() == "important"
