"""A disk that is full or read-only, made for real: a small tmpfs that each test mounts (root may mount
here, as in CI containers; elsewhere the tests skip, saying why). Each fault is one `error:` line naming
the folder, leaves no partial file, and never costs the newest checkpoint; once there is room,
`--resume auto` gives the uninterrupted run's losses. The "What survives what" rows of docs/training.md."""

import errno
import json
import subprocess
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState, GradientState
from trainer_runs import ONE_THREAD, metric, nano_args, train_in_process

import train_accelerate as ta
from data_prep import prepare_builtin, read_manifest
from gpt2_scratch.export_gpt2 import export
from gpt2_scratch.training.export import exported_step
from gpt2_scratch.training.files import DiskError
from gpt2_scratch.training.verify import checkpoint_problems
from gpt2_scratch.user_errors import run_command

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def small_disk(tmp_path):
    """`mount(size)`: a tmpfs of `size` bytes (`mount`'s units: 70m) at a new folder, unmounted when the
    test ends (`remount` resizes one or makes it read-only). Skips the test, saying why, where this
    process may not mount (not root, a container without CAP_SYS_ADMIN, no `mount` program)."""
    mounted = []

    def mount(size: str) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        try:
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True
            )
        except FileNotFoundError:
            pytest.skip("no mount program here to make a small tmpfs")
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip() or done.returncode})")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], check=True)


def remount(point: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(point)], check=True)


def fill(disk: Path) -> Path:
    """A file that takes every free byte of `disk`."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
        except OSError as err:
            assert err.errno == errno.ENOSPC
    return filler


def leftovers(folder: Path) -> list[str]:
    """The temporary files and folders of any writer of ours under `folder`."""
    return [p.name for p in folder.rglob("*") if p.name.startswith((".tmp", ".old")) or p.name.endswith(".tmp")]


def test_a_save_that_does_not_fit_stops_in_one_line_and_resuming_once_there_is_room_loses_nothing(
    data_dir, small_disk, capsys
):
    # 70 MB hold the first save (a checkpoint of ~20 MB and the two exports, ~23 MB), not a second one
    # beside it, which the save of step 4 needs before it may prune the older checkpoint.
    disk = small_disk("70m")
    out = disk / "run"
    argv = nano_args(data_dir, out, stop_at_step=4, save_interval=2, eval_interval=2, num_samples=0)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:  # the command as a user runs it: its status and its stderr
        train_in_process_as_command(argv)
    assert exited.value.code == 2
    stderr = capsys.readouterr().err  # the run's log lines, then the error
    assert "Traceback" not in stderr and stderr.endswith("\n")
    line = stderr.splitlines()[-1]
    assert [line] == [text for text in stderr.splitlines() if "error" in text]
    assert line.startswith(f"error: no space left in {out} to write the checkpoint and exports of step 4"), line
    assert line.endswith("step_000002 is the newest checkpoint, kept: once there is room, continue with --resume auto")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002"]
    assert checkpoint_problems(out / "checkpoints" / "step_000002") == []
    assert json.loads((out / "hf" / "export.json").read_text())["step"] == 2
    assert leftovers(disk) == []
    uninterrupted = metric(out, "train/loss"), metric(out, "val/loss")
    assert max(uninterrupted[0]) == 4

    # A resume on the disk still full: one line before anything is written; the run's records untouched.
    filler = fill(disk)
    records = {name: (out / name).read_bytes() for name in ("log.jsonl", "config.yaml", "run_info.json")}
    with pytest.raises(DiskError, match=f"^no space left in {out} to write the checkpoints and exports this run"):
        train_in_process([*argv, "--resume", "auto"])
    assert {name: (out / name).read_bytes() for name in records} == records
    assert checkpoint_problems(out / "checkpoints" / "step_000002") == []
    assert leftovers(disk) == []

    filler.unlink()
    remount(disk, "size=120m")
    train_in_process([*argv, "--resume", "auto"])
    assert (metric(out, "train/loss"), metric(out, "val/loss")) == uninterrupted
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002", "step_000004"]


def train_in_process_as_command(argv: list[str]) -> None:
    """The trainer's command line (`run_command`: an error is one line and an exit status), in this process."""
    try:
        run_command(ta.command, argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


@pytest.mark.parametrize(
    "size, refused",
    [("10m", "/checkpoints to write the checkpoint step_000002"), ("25m", " to write hf/")],
    ids=["in the checkpoint", "in the export"],
)
def test_a_write_the_disk_refuses_removes_what_it_began_and_is_one_line(
    data_dir, small_disk, monkeypatch, size, refused
):
    """The check before a save passed, and yet the disk fills (another writer took the room): the write
    fails in torch.save ("unexpected pos" from its zip writer, no errno) or in safetensors ("os error
    28"), and is one line all the same, its partial folder gone, the checkpoint before it whole."""
    monkeypatch.setattr(ta, "check_room_to_save", lambda *args, **kwargs: None)
    disk = small_disk(size)
    out = disk / "run"
    argv = nano_args(data_dir, out, stop_at_step=2, save_interval=2, num_samples=0)
    with pytest.raises(DiskError, match="no space left in") as caught:
        train_in_process(argv)
    assert refused in str(caught.value) and "\n" not in str(caught.value)
    assert leftovers(disk) == []
    written = list((out / "checkpoints").iterdir())
    assert all(checkpoint_problems(folder) == [] for folder in written)
    logged = metric(out, "train/loss"), metric(out, "val/loss")  # logged before the save failed

    # Once there is room, the same command with --resume auto: from the checkpoint when it was written
    # (then only the export is made), afresh otherwise; the same losses either way, and a complete save.
    remount(disk, "size=120m")
    train_in_process([*argv, "--resume", "auto"])
    assert (metric(out, "train/loss"), metric(out, "val/loss")) == logged
    assert checkpoint_problems(out / "checkpoints" / "step_000002") == [] and exported_step(out) == 2


@pytest.fixture(scope="module")
def checkpoint(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("disk_faults") / "run"
    train_in_process(nano_args(data_dir, out, stop_at_step=2, num_samples=0))
    return out / "checkpoints" / "step_000002"


def test_export_gpt2_on_a_full_disk_or_into_a_read_only_run_is_one_line_and_leaves_nothing(
    checkpoint, small_disk, tmp_path
):
    disk = small_disk("4m")  # the export's weights alone are 6.5 MB
    with pytest.raises(DiskError, match=f"^no space left in {disk} to write mine/"):
        export(checkpoint, disk / "mine")
    assert list(disk.iterdir()) == []

    # A checkpoint of a run on a read-only mount: its default destination, the run folder, is refused
    # before the weights are read, and the message says how to export elsewhere.
    copy = small_disk("30m")
    run = copy / "run"
    (run / "checkpoints").mkdir(parents=True)
    subprocess.run(["cp", "-r", str(checkpoint), str(run / "checkpoints")], check=True)
    (run / "config.yaml").write_bytes((checkpoint.parents[1] / "config.yaml").read_bytes())
    remount(copy, "ro")
    with pytest.raises(DiskError, match=f"^{run} is not writable \\(Read-only file system\\).*--out FOLDER"):
        export(run / "checkpoints" / checkpoint.name)
    assert export(run / "checkpoints" / checkpoint.name, tmp_path / "mine") == [tmp_path / "mine"]


def test_val_loss_out_on_a_read_only_folder_is_refused_before_the_evaluation(checkpoint, data_dir, small_disk):
    from eval.val_loss import main

    disk = small_disk("1m")
    remount(disk, "ro")
    # --model names nothing: the refusal comes before the model is even looked for
    with pytest.raises(DiskError, match=f"^{disk} is not writable \\(Read-only file system\\), so --out v.json"):
        main(["--model", str(disk / "no-model"), "--data_dir", str(data_dir), "--out", str(disk / "v.json")])


def test_val_loss_out_without_write_permission_is_refused_before_the_evaluation(data_dir, tmp_path):
    """The same through file modes (made real for root too, tests/permissions.py), as a command."""
    import sys

    from permissions import obeying_file_modes

    folder = tmp_path / "results"
    folder.mkdir(mode=0o555)
    argv = ["-m", "eval.val_loss", "--model", str(tmp_path / "none"), "--data_dir", str(data_dir)]
    command = obeying_file_modes([sys.executable, *argv, "--out", str(folder / "v.json")])
    done = subprocess.run(command, capture_output=True, text=True, env=ONE_THREAD, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr == f"error: {folder} is not writable (Permission denied), so --out v.json cannot be " + (
        "written there; make it writable or choose another folder\n"
    )


def test_data_prep_on_a_full_disk_is_one_line_and_the_rerun_with_room_gives_the_same_shards(data_dir, small_disk):
    disk = small_disk("400k")  # the built-in corpus's shards take about 690 kB
    out = disk / "data"
    with pytest.raises(DiskError, match=f"^no space left in {out} to write (the shard|manifest.json)"):
        prepare_builtin(out)
    assert leftovers(disk) == []
    remount(disk, "size=2m")
    prepare_builtin(out)  # the shards written before the disk filled are kept, the rest written now
    assert read_manifest(out)["shards"] == read_manifest(data_dir)["shards"]


def test_a_log_record_the_disk_cuts_short_is_taken_back_and_the_trim_on_resume_leaves_the_log_whole(small_disk):
    """log.jsonl and samples.jsonl grow by appending: a record the full disk takes only part of (the
    page it starts in had room) is cut off again, never left as half a line; the rewrite that drops a
    killed run's records (`keep_records_through`) leaves the old log whole and no temporary file."""
    from gpt2_scratch.training.metrics import append_jsonl, keep_records_through

    disk = small_disk("1m")
    log = disk / "log.jsonl"
    head = json.dumps({"step": 1, "pad": "x" * 4000}) + "\n"
    log.write_text(head + " " * (4096 - len(head) - 2) + "\n")  # 4095 bytes: 1 left in its page of memory
    before = log.read_bytes()
    fill(disk)
    with pytest.raises(DiskError, match=f"^no space left in {disk} to write log.jsonl"):
        append_jsonl(log, {"step": 2, "train/loss": 1.0})
    assert log.read_bytes() == before
    with pytest.raises(DiskError, match=f"^no space left in {disk} to write log.jsonl"):
        keep_records_through(log, 1)  # the record of step 1, rewritten: a page that the disk no longer has
    assert log.read_bytes() == before
    assert leftovers(disk) == []


def test_the_first_saves_estimate_covers_what_the_first_save_writes(checkpoint, tmp_path):
    """Before any save, the room a save needs is estimated from the model's size (3x the float32 weights
    for the checkpoint, the weights and the tokenizer per export): at least what a real first save wrote
    (its checkpoint and both exports, measured), and not so much more that a disk it fits on is refused."""
    from gpt2_scratch.training.checkpoints import folder_bytes, save_size
    from gpt2_scratch.training.config import parse_config
    from gpt2_scratch.training.memory import parameter_count

    run = checkpoint.parents[1]
    config = parse_config(["--config", str(run / "config.yaml")])
    exports = [tmp_path / "hf", tmp_path / "hf-gpt2"]  # none yet
    estimate = save_size(tmp_path / "checkpoints", 2, exports, 4 * parameter_count(config.model_config()))
    written = folder_bytes(checkpoint) + folder_bytes(run / "hf") + folder_bytes(run / "hf-gpt2")
    assert written <= estimate <= 1.15 * written
