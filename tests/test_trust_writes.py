"""Nothing outside what the user gave is written or deleted, one store per run, and results never change
without a word: a link planted in our folders, manifest names that point outside, a user's files beside
ours, another tool's lock, two runs on one remote store, a store inside the run folder, log rewrites that
a refusal or a kill would cut, export_gpt2 beside a training run or a stale export, the loss plot copied
into an export, fp16 on a CPU, and a changed validation set on resume. Real trainer runs and commands on
real files; a trainer process where the point is about processes."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from trainer_runs import ONE_THREAD, ROOT, launch, nano_args, train_in_process, wait_for_step

from data_prep import prepare
from data_prep.shards import read_manifest, write_manifest, write_shard
from gpt2_scratch import export_gpt2
from gpt2_scratch.training import remote
from gpt2_scratch.training.checkpoints import find_resume_checkpoint
from gpt2_scratch.training.config import ConfigError, TrainConfig, parse_config
from gpt2_scratch.training.export import read_record
from gpt2_scratch.training.metrics import keep_records_through
from gpt2_scratch.training.model_card import write_model_cards
from gpt2_scratch.training.paths import step_name
from gpt2_scratch.training.verify import CheckpointError, read_train_state
from gpt2_scratch.user_errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = dict(max_steps=12, save_interval=4, eval_interval=4)


@pytest.fixture(scope="module")
def stopped(data_dir, tmp_path_factory) -> Path:
    """One real run stopped after step 8: checkpoints step_000004 and step_000008, hf/ at step 8."""
    out = tmp_path_factory.mktemp("writes") / "stopped"
    train_in_process(nano_args(data_dir, out, stop_at_step=8, **COMMON))
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / run.name, ignore=shutil.ignore_patterns(".lock")))


def listing(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: to show that nothing in it changed."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# Links, manifests and the user's files


def test_a_link_planted_as_a_temporary_checkpoint_is_never_followed(data_dir, stopped, tmp_path):
    run = copy_run(stopped, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "mine.txt").write_text("the user's")
    (run / "checkpoints" / ".tmp_step_000012").symlink_to(outside)
    train_in_process(nano_args(data_dir, run, resume="auto", **COMMON))
    assert listing(outside) == {"mine.txt": b"the user's"}
    assert not (run / "checkpoints" / ".tmp_step_000012").is_symlink()
    assert (run / "checkpoints" / "step_000012" / "model.safetensors").is_file()


@pytest.fixture()
def corpus(tmp_path) -> Path:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i} " + "words " * 40}) + "\n" for i in range(12)))
    return path


def test_a_manifest_name_never_chooses_what_is_deleted(corpus, tmp_path):
    out, victim, absolute = tmp_path / "data", tmp_path / "victim", tmp_path / "absolute-victim"
    victim.write_text("keep")
    absolute.write_text("keep")
    prepare(out, files=[str(corpus)], shard_tokens=200, num_proc=1)
    manifest = read_manifest(out)
    bogus = {"split": "train", "tokens": 5, "sha256": "0" * 64, "first_doc": 0, "first_doc_offset": 0}
    manifest["shards"] += [{**bogus, "file": "../victim"}, {**bogus, "file": str(absolute)}]
    manifest["complete"] = False
    write_manifest(out, manifest)

    prepare(out, files=[str(corpus)], shard_tokens=200, num_proc=1)  # a plain re-run drops the bad entries
    assert victim.read_text() == "keep" and absolute.read_text() == "keep"
    assert all(not e["file"].startswith(("/", ".")) for e in read_manifest(out)["shards"])

    manifest = read_manifest(out)
    manifest["shards"] += [{**bogus, "file": "../victim"}, {**bogus, "file": str(absolute)}]
    write_manifest(out, manifest)
    command = [sys.executable, "-m", "data_prep", "--files", str(corpus), "--out_dir", str(out)]
    command += ["--shard_tokens", "100", "--num_proc", "1", "--no_progress", "--overwrite"]  # another layout
    subprocess.run(command, cwd=ROOT, env=ONE_THREAD, check=True, capture_output=True)
    assert victim.read_text() == "keep" and absolute.read_text() == "keep"
    assert read_manifest(out)["complete"]


def test_data_prep_into_a_users_folder_leaves_the_users_tmp_files(corpus, tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "notes.tmp").write_text("the user's notes")
    (out / "train_000001.bin.tmp").write_bytes(b"left by a killed run")  # a name data_prep gives its own
    prepare(out, files=[str(corpus)], shard_tokens=200, num_proc=1)
    assert (out / "notes.tmp").read_text() == "the user's notes"
    assert not (out / "train_000001.bin.tmp").exists()


def test_export_out_never_deletes_the_users_dot_folders(stopped, tmp_path):
    work = tmp_path / "W"
    for name in (".old_mymodel", ".tmp_mymodel"):
        (work / name).mkdir(parents=True)
        (work / name / "mine.txt").write_text(name)
    checkpoint = stopped / "checkpoints" / "step_000008"
    export_gpt2.export(checkpoint, work / "mymodel")
    export_gpt2.export(checkpoint, work / "mymodel")  # again: the first export is swapped out
    assert {n: (work / n / "mine.txt").read_text() for n in (".old_mymodel", ".tmp_mymodel")} == {
        ".old_mymodel": ".old_mymodel",
        ".tmp_mymodel": ".tmp_mymodel",
    }
    assert sorted(p.name for p in work.iterdir()) == [".old_mymodel", ".tmp_mymodel", "mymodel"]
    assert read_record(work / "mymodel", "gpt2")["step"] == 8


@pytest.mark.parametrize("others", [{}, {"notes.txt": "the user's"}])
def test_another_tools_lock_is_refused_and_never_overwritten(data_dir, tmp_path, others):
    out = tmp_path / "tool-folder"
    out.mkdir()
    files = {".lock": "locked by rsync, pid 77\nsession 5\n", **others}
    for name, text in files.items():
        (out / name).write_text(text)
    with pytest.raises(ConfigError, match="another tool|not a run folder"):
        train_in_process(nano_args(data_dir, out, **COMMON))
    assert {n: (out / n).read_text() for n in files} == files and len(list(out.iterdir())) == len(files)


# ----------------------------------------------------------------------------------------------
# One store, one run


def test_a_store_belongs_to_one_run(data_dir, tmp_path):
    url = f"file://{tmp_path}/store"
    first = tmp_path / "first"
    train_in_process(nano_args(data_dir, first, checkpoint_remote=url, max_steps=4, save_interval=4))
    store = remote.open_store(url)
    owner = (first / "run_id").read_text().strip()
    assert remote.store_owner(store) == owner
    before = listing(tmp_path / "store")

    proc = launch(nano_args(data_dir, tmp_path / "second", checkpoint_remote=url, max_steps=4, save_interval=4))
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 2, err[-2000:]
    assert f"belongs to another run ({owner}" in err.splitlines()[-1]
    assert listing(tmp_path / "store") == before  # neither checkpoints nor hf/ of the second run

    # a store taken over while a run uploads: that run uploads nothing more
    with pytest.raises(remote.RemoteError, match=rf"belongs to another run \({owner}\), not to this run \(another\)"):
        remote.upload_checkpoint(store, 8, first / "checkpoints" / "step_000004", first / "hf", run_id="another")
    assert listing(tmp_path / "store") == before


def test_a_store_deleted_while_its_run_uploads_is_reported_as_deleted_never_as_run_none(tmp_path):
    store = remote.open_store(f"file://{tmp_path}/store")
    remote.claim_store(store, "run-a")
    shutil.rmtree(tmp_path / "store")  # deleted (or its bucket emptied) by someone else, mid-run
    checkpoint, export = tmp_path / "checkpoints" / "step_000004", tmp_path / "hf"
    with pytest.raises(remote.RemoteError) as refused:
        remote.upload_checkpoint(store, 4, checkpoint, export, run_id="run-a")
    assert "deleted or emptied" in str(refused.value) and "None" not in str(refused.value)
    assert not (tmp_path / "store").exists()  # nothing uploaded into a store that is no longer the run's


@pytest.mark.parametrize("where", [".", "sub"])
def test_a_store_inside_the_run_folder_is_refused_up_front(data_dir, tmp_path, where):
    out = tmp_path / "run"
    url = f"file://{(out / where).resolve()}"
    with pytest.raises(remote.RemoteError, match="overlaps it"):
        train_in_process(nano_args(data_dir, out, checkpoint_remote=url, **COMMON))
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# The run's logs


def test_a_refused_resume_leaves_log_jsonl_as_it_was(stopped, tmp_path):
    run = copy_run(stopped, tmp_path)
    store = remote.open_store(f"file://{tmp_path}/store")
    remote_log = tmp_path / "remote-log" / "log.jsonl"
    remote_log.parent.mkdir()
    remote_log.write_text(json.dumps({"step": 1, "train/loss": 99.0}) + "\n")
    for step in (4, 8):
        name = step_name(step)
        damaged = Path(shutil.copytree(run / "checkpoints" / name, tmp_path / "damaged" / name))
        (damaged / "optimizer.bin").write_bytes((damaged / "optimizer.bin").read_bytes()[:-10])  # marker matches
        remote.upload_checkpoint(store, step, damaged, run / "hf", [remote_log])
        shutil.rmtree(run / "checkpoints" / name)
    log = (run / "log.jsonl").read_bytes()
    settings = read_train_state(stopped / "checkpoints" / "step_000004")["settings"]
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        find_resume_checkpoint(TrainConfig(resume="auto"), run / "checkpoints", run, settings, store)
    assert (run / "log.jsonl").read_bytes() == log


def test_log_jsonl_is_rewritten_by_a_rename_never_in_place(stopped, tmp_path):
    log = copy_run(stopped, tmp_path) / "log.jsonl"
    before = log.read_bytes()
    with log.open("rb") as old:  # the file as it was: a kill mid-rewrite leaves exactly this
        keep_records_through(log, 4)
        assert old.read() == before
    kept = [json.loads(line) for line in log.read_text().splitlines()]
    assert kept and max(r["step"] for r in kept) == 4 and log.read_bytes() != before


def test_log_jsonl_a_folder_refuses_the_resume_in_one_line(data_dir, stopped, tmp_path):
    run = copy_run(stopped, tmp_path)
    (run / "log.jsonl").unlink()
    (run / "log.jsonl").mkdir()
    before = listing(run)
    with pytest.raises(ConfigError, match=r"log.jsonl is not a regular file"):
        train_in_process(nano_args(data_dir, run, resume="auto", **COMMON))
    assert listing(run) == before


# ----------------------------------------------------------------------------------------------
# Exports


def test_export_gpt2_of_a_training_run_is_refused_and_the_trainer_goes_on(data_dir, tmp_path):
    run = tmp_path / "training"
    proc = launch(nano_args(data_dir, run, max_steps=10_000, save_interval=2, eval_interval=1000))
    try:
        wait_for_step(run, proc, 3)  # a save at step 2 wrote hf/
        with pytest.raises(UserError, match=rf"a trainer is training it \(host .*, pid {proc.pid}\)"):
            export_gpt2.export(run)
        done = subprocess.run(
            [sys.executable, "-m", "gpt2_scratch.export_gpt2", str(run)],
            cwd=ROOT,
            env=ONE_THREAD,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 2 and done.stderr.startswith("error: cannot export the run"), done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and f"pid {proc.pid}" in done.stderr
        step = max(json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()[:-1])
        wait_for_step(run, proc, step + 4)  # two more saves
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_export_gpt2_exports_the_newest_intact_checkpoint_and_says_its_step(stopped, tmp_path, capsys):
    run = copy_run(stopped, tmp_path)
    config = parse_config(["--config", str(run / "config.yaml")])
    older = export_gpt2.load_checkpoint_weights(run / "checkpoints" / "step_000004", config)
    export_gpt2.write_exports(older, run, 4)  # hf/ now holds step 4; step 8 is newer
    export_gpt2.main([str(run)])
    assert "(step 8)" in capsys.readouterr().out
    assert read_record(run / "hf", "scratch")["step"] == 8 == read_record(run / "hf-gpt2", "gpt2")["step"]
    saved = load_file(run / "checkpoints" / "step_000008" / "model.safetensors")
    exported = load_file(run / "hf" / "model.safetensors")
    torch.testing.assert_close(exported["transformer.wte.weight"], saved["transformer.wte.weight"], rtol=0, atol=0)


def test_the_loss_plot_is_replaced_in_the_export_never_rewritten_in_place(stopped, tmp_path):
    run = copy_run(stopped, tmp_path)
    config = parse_config(["--config", str(run / "config.yaml")])
    model = export_gpt2.load_export(run / "hf")
    plot = run / "hf" / "loss.png"
    before = plot.read_bytes()
    (run / "plots" / "loss.png").write_bytes(before + b"a newer plot")
    with plot.open("rb") as old:  # what a kill mid-copy would leave: the whole old plot, never a cut one
        write_model_cards(run, config, model, {"source": {"name": "builtin"}})
        assert old.read() == before
    assert plot.read_bytes() == before + b"a newer plot"


# ----------------------------------------------------------------------------------------------
# Results that must not change without a word


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 autocast is real on CUDA")
def test_fp16_on_a_cpu_is_refused_before_anything_is_written(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        train_in_process(nano_args(data_dir, tmp_path / "run", mixed_precision="fp16", **COMMON))
    assert not (tmp_path / "run" / "run_info.json").exists()


def test_a_changed_validation_set_refuses_the_resume_by_name(data_dir, stopped, tmp_path):
    run = copy_run(stopped, tmp_path)
    with pytest.raises(CheckpointError, match=r"val_batches: 2 -> 3"):
        train_in_process(nano_args(data_dir, run, resume="auto", val_batches=3, **COMMON))

    data = Path(shutil.copytree(data_dir, tmp_path / "data"))
    manifest = read_manifest(data)
    val = manifest["shards"][0]
    tokens = np.fromfile(data / val["file"], dtype=np.uint16, offset=1024)  # after the 1 KiB header
    val["sha256"] = write_shard(data / val["file"], tokens[::-1].copy())  # the same size, other tokens
    write_manifest(data, manifest)
    with pytest.raises(CheckpointError, match=r"val_data: other validation shards"):
        train_in_process(nano_args(data, run, resume="auto", **COMMON))
