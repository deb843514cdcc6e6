"""Checkpoints mirrored to a remote store (gpt2_scratch/training/remote.py), on real fsspec filesystems (`memory://`,
`file://`): the layout and marker, resume from remote on an empty out_dir (exactly, after SIGKILL), partial
uploads, pruning, the pre-flight, and the hf:// layout without the network."""

import hashlib
import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from stores import s3_server  # noqa: F401  (fixture)
from trainer_runs import kill_at_step, metric, nano_args, train_in_process

from gpt2_scratch.training import remote as cr
from gpt2_scratch.training.checkpoints import extend_from, find_resume_checkpoint, write_manifest
from gpt2_scratch.training.config import ConfigError, TrainConfig
from gpt2_scratch.training.paths import RunPaths, local_files
from gpt2_scratch.training.verify import CheckpointError
from gpt2_scratch.user_errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = {"seed": 1, "total_batch_size": 256, "data": "abc"}  # what the stand-in checkpoints were saved with
LOADER = {"epoch": 0, "chunks_done": 0, "batch_size": 4, "world_size": 1, "seq_len": 32, "seed": 1}


def make_checkpoint(folder: Path, step: int) -> Path:
    """A stand-in for a trainer's checkpoint: files of distinct contents in the right formats (a torch
    file in a subfolder), our train_state.json, and the checkpoint.json manifest written last."""
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.full((75,), float(step))}, folder / "model.safetensors")
    optimizer = {"state": {0: {"step": torch.full((100,), step)}}, "param_groups": [{"params": [0]}]}
    torch.save(optimizer, folder / "optimizer.bin")
    torch.save({"torch_manual_seed": torch.arange(10) + step}, folder / "sub" / "random_states_0.pkl")
    state = {"step": step, "tokens": step * 256, "processes": 1, "loader": LOADER, "settings": SETTINGS}
    (folder / "train_state.json").write_text(json.dumps(state))
    write_manifest(folder, step)
    return folder


def find(config: TrainConfig, out_dir: Path, store=None, settings=SETTINGS) -> Path | None:
    paths = RunPaths(out_dir)
    return find_resume_checkpoint(config, paths.checkpoints, paths.out_dir, settings, store)


def make_export(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "gpt2-scratch"}')
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


def mirror(store: cr.RemoteStore, tmp_path: Path, step: int, keep_last: int = 0) -> Path:
    local = make_checkpoint(tmp_path / "local" / f"step_{step:06d}", step)
    log = tmp_path / "local" / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in range(1, step + 1)))
    cr.upload_checkpoint(store, step, local, make_export(tmp_path / "local" / "hf"), [log], keep_last)
    return local


def remote_files(store: cr.RemoteStore, folder: str) -> dict[str, bytes]:
    return {path[len(folder) + 1 :]: store.fs.cat_file(path) for path in store.fs.find(folder)}


def test_mirror_writes_files_then_export_then_marker_and_resume_downloads_them(tmp_path):
    store = cr.open_store(f"memory://{tmp_path.name}/run")
    local = mirror(store, tmp_path, 4)

    remote = remote_files(store, store.checkpoint(4))
    marker = json.loads(remote.pop("COMPLETE"))
    log = remote.pop("logs/log.jsonl")
    assert remote == {name: path.read_bytes() for name, path in local_files(local).items()}
    listing = {
        n: {"bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()}
        for n, b in {**remote, "logs/log.jsonl": log}.items()
    }
    assert marker == {"step": 4, "files": listing}
    assert remote_files(store, store.export) == {
        "config.json": b'{"model_type": "gpt2-scratch"}',
        "model.safetensors": b"weights",
    }
    assert store.checkpoints == f"/{tmp_path.name}/run/checkpoints" and store.export == f"/{tmp_path.name}/run/hf"

    # A fresh machine: nothing in out_dir; --resume auto finds the remote checkpoint and downloads it.
    paths = RunPaths(tmp_path / "fresh")
    found = find(TrainConfig(resume="auto"), paths.out_dir, store)
    assert found == paths.checkpoints / "step_000004"
    assert {n: p.read_bytes() for n, p in local_files(found).items()} == remote
    assert paths.log.read_bytes() == log
    assert sorted(p.name for p in paths.checkpoints.iterdir()) == ["step_000004"]  # no temporary folder left

    # A fresh run (resume '') over a remote that holds a run is refused, as over a local one.
    with pytest.raises(ConfigError, match=r"already holds a run .*step_000004.*--resume auto"):
        find(TrainConfig(), tmp_path / "other", store)


def test_a_partial_upload_is_never_resumed_from(tmp_path):
    store = cr.open_store(f"file://{tmp_path}/remote")
    mirror(store, tmp_path, 4)
    # What a run killed during the next upload leaves: step 8's files, but not its marker.
    newer = make_checkpoint(tmp_path / "local" / "step_000008", 8)
    (_, files), _, _ = cr.upload_plan(store, 8, newer, make_export(tmp_path / "local" / "hf"))
    cr.write(store, files, "files only")
    assert cr.remote_checkpoints(store) == {4: True, 8: False}

    paths = RunPaths(tmp_path / "fresh")
    assert find(TrainConfig(resume="auto"), paths.out_dir, store).name == "step_000004"
    with pytest.raises(cr.RemoteError, match="no COMPLETE marker"):
        find(TrainConfig(resume=f"file://{store.checkpoint(8)}"), tmp_path / "named")
    assert not (tmp_path / "named" / "checkpoints" / "step_000008").exists()
    # into an out_dir holding checkpoints of its own, a named one is refused: two histories would mix
    with pytest.raises(ConfigError, match="holds checkpoints of its own"):
        find(TrainConfig(resume=f"file://{store.checkpoint(4)}"), paths.out_dir)

    # Named explicitly, a complete remote checkpoint is downloaded.
    explicit = find(TrainConfig(resume=f"file://{store.checkpoint(4)}"), tmp_path / "x")
    assert explicit == tmp_path / "x" / "checkpoints" / "step_000004"

    # Uploading step 8 again starts its folder afresh and completes it.
    (Path(store.checkpoint(8)) / "stale.bin").write_bytes(b"left by the killed upload")
    mirror(store, tmp_path, 8)
    assert cr.remote_checkpoints(store) == {4: True, 8: True}
    assert "stale.bin" not in remote_files(store, store.checkpoint(8))


def test_a_download_that_does_not_match_the_marker_is_refused_and_resume_auto_falls_back(tmp_path):
    store = cr.open_store(f"file://{tmp_path}/remote")
    mirror(store, tmp_path, 4)
    mirror(store, tmp_path, 8)
    optimizer = Path(store.checkpoint(8)) / "optimizer.bin"
    damaged = bytearray(optimizer.read_bytes())
    damaged[len(damaged) // 2] ^= 1  # one flipped bit: the same size
    optimizer.write_bytes(bytes(damaged))
    with pytest.raises(cr.RemoteError, match=r"optimizer.bin differ from the sizes or sha256 of its COMPLETE marker"):
        find(TrainConfig(resume=f"file://{store.checkpoint(8)}"), tmp_path / "named")
    assert list((tmp_path / "named" / "checkpoints").iterdir()) == []
    # --resume auto warns and takes the newest intact one
    assert find(TrainConfig(resume="auto"), tmp_path / "fresh", store).name == "step_000004"
    # with none intact it refuses, rather than silently starting afresh
    (Path(store.checkpoint(4)) / "optimizer.bin").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="no intact checkpoint to resume from"):
        find(TrainConfig(resume="auto"), tmp_path / "fresh2", store)


@pytest.mark.parametrize("name", ["../escaped", "/tmp/absolute", "logs/../../escaped", "a\\..\\b"])
def test_a_marker_naming_a_path_outside_the_checkpoint_is_refused(tmp_path, name):
    store = cr.open_store(f"file://{tmp_path}/remote")
    mirror(store, tmp_path, 4)
    marker = Path(store.checkpoint(4)) / "COMPLETE"
    content = json.loads(marker.read_text())
    content["files"][name] = {"bytes": 3, "sha256": hashlib.sha256(b"pwn").hexdigest()}
    marker.write_text(json.dumps(content))
    (tmp_path / "remote" / "escaped").write_bytes(b"pwn")
    with pytest.raises(cr.RemoteError, match="not a plain path inside the checkpoint"):
        find(TrainConfig(resume=f"file://{store.checkpoint(4)}"), tmp_path / "out" / "run")
    assert not (tmp_path / "out" / "escaped").exists() and not (tmp_path / "out" / "run" / "escaped").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local", "remote"]  # nothing written outside


def test_file_urls_must_be_absolute():
    with pytest.raises(cr.RemoteError, match="needs an absolute path"):
        cr.open_store("file://runs/remote")


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path):
    store = cr.open_store(f"file://{tmp_path}/remote")
    for step in (4, 8):
        mirror(store, tmp_path, step, keep_last=2)
    (_, files), _, _ = cr.upload_plan(store, 10, make_checkpoint(tmp_path / "p10", 10), make_export(tmp_path / "hf"))
    cr.write(store, files, "a partial upload")
    assert cr.remote_checkpoints(store) == {4: True, 8: True, 10: False}
    mirror(store, tmp_path, 12, keep_last=2)
    assert cr.remote_checkpoints(store) == {8: True, 12: True}  # step 4 and the partial step 10 are gone

    (_, files), _, _ = cr.upload_plan(store, 16, make_checkpoint(tmp_path / "p16", 16), make_export(tmp_path / "hf"))
    cr.write(store, files, "a partial upload newer than the newest complete one")
    assert cr.prune(store, keep_last=1) == [8]
    assert cr.remote_checkpoints(store) == {12: True, 16: False}  # the newest complete one stays
    assert cr.prune(store, keep_last=0) == [] and cr.complete_steps(store)[-1] == 12


def test_prune_keeps_the_newest_stable_checkpoint(tmp_path):
    """A wsd run's stable checkpoint (marked in its train_state.json) is uploaded as one and outlives pruning."""
    store = cr.open_store(f"file://{tmp_path}/remote")
    stable = make_checkpoint(tmp_path / "local" / "step_000004", 4)
    state = json.loads((stable / "train_state.json").read_text())
    (stable / "train_state.json").write_text(json.dumps({**state, "stable": True}))
    write_manifest(stable, 4)
    cr.upload_checkpoint(store, 4, stable, make_export(tmp_path / "local" / "hf"), [], keep_last=1)
    for step in (8, 12):
        mirror(store, tmp_path, step, keep_last=1)
    assert cr.complete_steps(store) == [4, 12]
    assert [cr.marked_stable(store, step) for step in (4, 12)] == [True, False]


def test_extending_a_wsd_run_sets_its_old_decay_aside_and_removes_it_from_the_remote(tmp_path):
    """The longer run's checkpoints of the same steps must not meet the shorter run's there."""
    store = cr.open_store(f"file://{tmp_path}/remote")
    for step in (4, 8, 12):
        mirror(store, tmp_path, step)
    local = tmp_path / "local"
    extend_from(local / "step_000004", [local / "step_000012", local / "step_000008"], store)
    assert cr.complete_steps(store) == [4]
    assert sorted(p.name.rsplit("_", 1)[0] for p in local.glob("decayed_*")) == [
        "decayed_step_000008",
        "decayed_step_000012",
    ]
    assert (local / "step_000004").is_dir()


def test_preflight_rejects_an_unwritable_remote(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    store = cr.open_store(f"file://{tmp_path}/a_file/run")
    with pytest.raises(cr.RemoteError, match=rf"cannot write to file://{tmp_path}/a_file/run \("):
        cr.check_writable(store)
    writable = cr.open_store(f"file://{tmp_path}/ok")
    cr.check_writable(writable)
    assert list(Path(writable.checkpoints).iterdir()) == []  # the probe is gone


def test_an_unwritable_remote_stops_the_trainer_before_training(data_dir, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    argv = nano_args(data_dir, tmp_path / "out", checkpoint_remote=f"file://{tmp_path}/a_file/run")
    with pytest.raises(cr.RemoteError, match="checkpoint_remote: cannot write to"):
        train_in_process(argv)
    assert not (tmp_path / "out" / "log.jsonl").exists()
    # hf:// checks login and write access first, with the push_to_hub check; offline it stops at once.
    with pytest.raises(UserError, match="checkpoint_remote needs the Hub, but offline mode is on"):
        train_in_process(nano_args(data_dir, tmp_path / "out", checkpoint_remote="hf://me/tiny-gpt2"))


def test_a_protocol_without_its_package_names_the_package():
    """gcsfs is in no extra the tests install (s3fs is: the S3 tests run against moto's server)."""
    if importlib.util.find_spec("gcsfs"):
        pytest.skip("gcsfs is installed")
    with pytest.raises(cr.RemoteError, match="needs the gcsfs package: pip install gcsfs"):
        cr.open_store("gs://bucket/run")


def test_bad_urls_are_config_errors():
    with pytest.raises(ConfigError, match="checkpoint_remote must be a URL"):
        TrainConfig(checkpoint_remote="/tmp/run")
    with pytest.raises(cr.RemoteError, match="unknown protocol 'nope'"):
        cr.open_store("nope://x")
    with pytest.raises(cr.RemoteError, match="model repository"):
        cr.open_store("hf://datasets/me/run")
    with pytest.raises(cr.RemoteError, match="namespace/name"):
        cr.open_store("hf://gpt2")


@pytest.mark.parametrize(
    ("url", "revision", "folder"),
    [
        ("hf://me/run", None, "checkpoints"),
        ("hf://me/run/ckpt/a", None, "ckpt/a"),
        ("hf://me/run@training", "training", "checkpoints"),
        ("hf://me/run@exp%2Fb/ckpt", "exp/b", "ckpt"),  # a branch name with a slash, quoted as the Hub does
    ],
)
def test_hub_layout_checkpoints_on_a_branch_or_folder_export_at_the_root(tmp_path, url, revision, folder):
    store = cr.open_store(url)
    assert (store.hub_repo, store.hub_revision) == ("me/run", revision)
    local = make_checkpoint(tmp_path / "step_000004", 4)
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n')
    plan = cr.upload_plan(store, 4, local, make_export(tmp_path / "hf"), [log])
    assert [what for what, _ in plan] == ["step_000004", "HF export", "COMPLETE"]
    commits = [cr.hub_operations(changes) for _, changes in plan]
    assert [list(c) for c in commits] == [[("me/run", revision)], [("me/run", None)], [("me/run", revision)]]
    files, export, marker = (ops for c in commits for ops in c.values())
    step = f"{folder}/step_000004"
    assert sorted(op.path_in_repo for op in files) == [
        f"{step}/checkpoint.json",
        f"{step}/logs/log.jsonl",
        f"{step}/model.safetensors",
        f"{step}/optimizer.bin",
        f"{step}/sub/random_states_0.pkl",
        f"{step}/train_state.json",
    ]
    assert sorted(op.path_in_repo for op in export) == ["config.json", "model.safetensors"]  # loads as a model
    assert [op.path_in_repo for op in marker] == [f"{step}/COMPLETE"]
    (delete,) = cr.hub_operations({store.checkpoint(4): None})[("me/run", revision)]
    assert delete.path_in_repo == f"{step}/" and delete.is_folder


def test_a_failed_upload_is_raised_at_the_end(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    uploads = cr.CheckpointUploader(cr.open_store(f"file://{tmp_path}/a_file/run"), tmp_path / "staging", keep_last=2)
    uploads.submit(4, make_checkpoint(tmp_path / "step_000004", 4), make_export(tmp_path / "hf"))
    with pytest.raises(cr.RemoteError, match=r"1 upload\(s\) to file://.*a_file/run failed: step_000004"):
        uploads.close()
    assert not (tmp_path / "staging").exists()


def test_sigkill_then_resume_auto_on_an_empty_out_dir_logs_the_same_losses(data_dir, tmp_path):
    # Dropout on and samples drawn: the RNG states must travel with the checkpoint too.
    common = dict(dropout=0.1, max_steps=40, stop_at_step=16, save_interval=4, eval_interval=5, remote_keep_last=2)
    reference = tmp_path / "reference"
    memory = f"memory://{tmp_path.name}/reference"
    train_in_process(nano_args(data_dir, reference, checkpoint_remote=memory, **common))
    store = cr.open_store(memory)
    assert cr.remote_checkpoints(store) == {12: True, 16: True}  # checkpoints at 4, 8, 12, 16; keep 2
    assert {"model.safetensors", "config.json", "README.md", "loss.png"} <= set(remote_files(store, store.export))

    remote = tmp_path / "remote"
    # Each save first waits for the previous upload: by step 9 (after the save at 8) step 4 is complete remotely.
    killed = tmp_path / "killed"
    kill_at_step(nano_args(data_dir, killed, checkpoint_remote=f"file://{remote}", **common), killed, 9)
    newest = max(cr.complete_steps(cr.open_store(f"file://{remote}")), default=None)
    assert newest is not None and newest < 16, "the run was to be killed before its end"

    fresh = tmp_path / "fresh"  # a new machine: the killed run's out_dir is gone
    train_in_process(nano_args(data_dir, fresh, resume="auto", checkpoint_remote=f"file://{remote}", **common))
    assert sorted(metric(fresh, "train/loss")) == list(range(1, 17))  # each step once, none lost or repeated
    assert metric(fresh, "train/loss") == metric(reference, "train/loss")
    assert metric(fresh, "val/loss") == metric(reference, "val/loss")
    info = json.loads((fresh / "run_info.json").read_text())
    assert info["resumed_from"] == str(fresh / "checkpoints" / f"step_{newest:06d}")
    assert cr.complete_steps(cr.open_store(f"file://{remote}"))[-1] == 16


def test_resume_auto_from_a_store_with_only_partial_uploads_says_so_and_starts_a_new_run(
    data_dir,
    tmp_path,
    s3_server,  # noqa: F811
):
    """A store whose run was killed during its first upload (on the S3 server on 127.0.0.1): `--resume auto`
    on a new machine has nothing to continue. It says so in one line naming the unfinished upload, starts at
    step 0 under a new run id (not the store's old one, as if continuing it), and its own upload replaces it."""
    url = f"s3://data/{tmp_path.name}/run"
    store = cr.open_store(url)
    cr.claim_store(store, "oldrun")
    killed = make_checkpoint(tmp_path / "local" / "step_000004", 4)
    (_, files), _, _ = cr.upload_plan(store, 4, killed, make_export(tmp_path / "local" / "hf"))
    cr.write(store, files, "the files of step 4, not its marker")
    assert cr.remote_checkpoints(store) == {4: False}

    out = tmp_path / "fresh"
    common = dict(max_steps=4, save_interval=4, eval_interval=4, num_samples=0)
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger(cr.logger.name).addHandler(handler)  # what the trainer's log shows, however it is set up
    try:
        train_in_process(nano_args(data_dir, out, resume="auto", checkpoint_remote=url, **common))
    finally:
        logging.getLogger(cr.logger.name).removeHandler(handler)
    said = [r.getMessage() for r in records if "nothing to resume" in r.getMessage()]
    new_run = (out / "run_id").read_text().strip()
    assert len(said) == 1 and new_run != "oldrun", [r.getMessage() for r in records]
    assert f"{url} holds only partial uploads of run oldrun (step_000004: no COMPLETE marker" in said[0]
    assert f"starting afresh at step 0 as a new run {new_run}" in said[0]
    assert sorted(metric(out, "train/loss")) == [1, 2, 3, 4]
    assert cr.store_owner(store) == new_run
    assert cr.remote_checkpoints(store) == {4: True}
    ours = out / "checkpoints" / "step_000004" / "train_state.json"
    assert store.fs.cat_file(f"{store.checkpoint(4)}/train_state.json") == ours.read_bytes()  # not the stand-in's
