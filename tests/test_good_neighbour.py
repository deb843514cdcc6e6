"""What a run leaves for the user and their other tools: files that whoever may read the user's files can
read, and an output that holds no warning the project did not decide to print."""

import importlib.util
import os
import re
import shutil
import stat
import subprocess
import sys
import zipfile

import pytest
from trainer_runs import ROOT, run_cli

# The main job's own lines: our log lines (time-stamped), tqdm's bar, and the text samples.
OURS = re.compile(r"\d\d:\d\d:\d\d |train: +\d+%\|| {2}> ")
# `accelerate launch` without a config file prints this block before starting the script; a project
# cannot avoid it without changing the card's command (README, "Train: the main job", says so).
LAUNCHER = re.compile(
    r"The following values were not passed to `accelerate launch`|\t`--\w+` was set to a value of"
    r"|To avoid this warning pass in values for each of the problematic parameters"
)


def output_lines(text: str) -> list[str]:
    """The lines a terminal would show: tqdm redraws its bar with carriage returns."""
    return [line for line in re.split(r"[\r\n]", text) if line.strip()]


def test_main_job_prints_nothing_unasked_and_writes_files_the_umask_shares(data_dir, tmp_path):
    """The smallest form of `accelerate launch train_accelerate.py` (the default trackers, HellaSwag
    'auto' offline, samples, a checkpoint at every step and both exports), under umask 027: every
    line it prints is one of ours or the launcher's block, and every file and folder it wrote has the
    mode that umask gives (0640 and 0750), the weights included (safetensors writes them 0600)."""
    out_dir = tmp_path / "run"
    argv = ["--model", "cpu-nano", "--max_steps", "2", "--warmup_steps", "1", "--seq_len", "32"]
    argv += ["--eval_interval", "2", "--save_interval", "1", "--num_samples", "1", "--sample_tokens", "4"]
    argv += ["--data_dir", str(data_dir), "--out_dir", str(out_dir)]
    before = os.umask(0o027)  # inherited by the launch
    try:
        done = run_cli(argv, launcher=[sys.executable, "-m", "accelerate.commands.launch"])
    finally:
        os.umask(before)
    assert done.returncode == 0, done.stderr[-3000:]
    unasked = [
        line for line in output_lines(done.stdout + done.stderr) if not (OURS.match(line) or LAUNCHER.match(line))
    ]
    assert unasked == []
    written = [out_dir, *out_dir.rglob("*")]
    assert any(p.name == "model.safetensors" for p in written) and (out_dir / "checkpoints").is_dir()
    modes = {str(p.relative_to(out_dir)): stat.S_IMODE(p.lstat().st_mode) for p in written}
    expected = {name: 0o750 if (out_dir / name).is_dir() else 0o640 for name in modes}
    assert modes == expected


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_share_as_umask_follows_the_umask_and_never_a_link(tmp_path, mask):
    from gpt2_scratch.training.files import share_as_umask

    folder = tmp_path / "export"
    (folder / "sub").mkdir(parents=True)
    weights = folder / "sub" / "model.safetensors"
    weights.write_bytes(b"x")
    weights.chmod(0o600)
    outside = tmp_path / "outside.txt"
    outside.write_text("not ours")
    outside.chmod(0o600)
    (folder / "link").symlink_to(outside)
    before = os.umask(mask)
    try:
        share_as_umask(folder)
    finally:
        os.umask(before)
    assert stat.S_IMODE(weights.stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((folder / "sub").stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600  # a link in the folder is not followed


def test_a_tracker_asked_for_and_not_installed_is_one_line_before_training(data_dir, tmp_path):
    """Accelerate only warns about `log_with=['wandb']` without the package and trains to the end with
    nothing logged where the user looks; the trainer refuses at once, naming the package."""
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here: the refusal needs an environment without it")
    out_dir = tmp_path / "run"
    done = run_cli(["--report_to", "tensorboard,wandb", "--data_dir", str(data_dir), "--out_dir", str(out_dir)])
    assert done.returncode == 2
    assert output_lines(done.stderr) == [
        "error: invalid training config: report_to: the wandb tracker needs its package, which is not installed: "
        "pip install wandb"
    ]
    assert not out_dir.exists()


@pytest.mark.parametrize("report_to", ["none", "all", "tensorboard"])
def test_trackers_that_need_no_missing_package_keep_working(report_to):
    from gpt2_scratch.training.config import parse_config

    assert parse_config(["--report_to", report_to]).report_to == report_to


# What an install of this project puts at the top of site-packages: the names the design fixes, and
# everything else under one package named for the project.
OUR_TOP_LEVEL = {"modeling_gpt2_scratch", "train_accelerate", "data_prep", "eval", "gpt2_scratch"}
# Names we once installed at the top, which other projects use (llama.cpp's converter imports `conversion`).
GENERIC = ("conversion", "training", "user_errors", "export_gpt2", "convert_nanogpt")


def test_the_wheel_installs_only_names_that_are_ours(tmp_path):
    """The built wheel's RECORD lists every file an install writes: its top-level names are ours alone."""
    source = tmp_path / "source"
    skip = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info", "build", "runs", "data", ".*cache")
    shutil.copytree(ROOT, source, ignore=skip)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    done = subprocess.run([*build, "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("gpt2_scratch-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        (record,) = [name for name in archive.namelist() if name.endswith(".dist-info/RECORD")]
        rows = archive.read(record).decode().splitlines()
    top = {row.split(",")[0].split("/")[0] for row in rows if row}
    installed = {name.removesuffix(".py") for name in top if not name.endswith(".dist-info")}
    assert installed == OUR_TOP_LEVEL


def test_no_generic_name_of_ours_is_importable_in_the_environment(tmp_path):
    """With the project installed (editable, as the README does), a script elsewhere that imports a
    module named `conversion` or `training` finds none of ours."""
    probe = f"import importlib.util as u; print([n for n in {GENERIC!r} if u.find_spec(n)])"
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
    assert importlib.util.find_spec("gpt2_scratch.conversion") is not None  # the project is installed here
