"""The SLURM script of docs/training.md (slurm/train.sbatch) under a real one-node SLURM that the test
starts on 127.0.0.1 (its own slurm.conf, munge key and spool folders, all in the test's tmp folder):
two CPU ranks, a SIGUSR1 from `scancel --signal`, the script's requeue on status 75, and the requeued
job's `--resume auto` gives the uninterrupted run's losses. Needs Debian's `slurm-wlm` and `munge`,
run as root (slurmd starts the tasks as the submitting user); skipped elsewhere, with the reason."""

import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trainer_runs import ROOT, end_all, launch_ranks, metric, nano_args, reserved_port

pytestmark = [
    pytest.mark.skipif(shutil.which("slurmctld") is None, reason="needs SLURM (Debian: apt install slurm-wlm munge)"),
    pytest.mark.skipif(shutil.which("munged") is None, reason="needs munge (Debian: apt install munge)"),
    pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="starts slurmd, which runs as root"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(tmp: Path) -> str:
    """One node, `localhost`, with every path in `tmp`; the first job id at random, so that the script's
    per-job MASTER_PORT differs between runs of this test."""
    lines = {
        "ClusterName": "test",
        "SlurmctldHost": "localhost(127.0.0.1)",
        "SlurmctldPort": free_port(),
        "SlurmdPort": free_port(),
        "SlurmUser": "root",
        "AuthType": "auth/munge",
        "CredType": "cred/munge",
        "AuthInfo": f"socket={tmp}/munge/socket",
        "StateSaveLocation": tmp / "state",
        "SlurmdSpoolDir": tmp / "spool",
        "SlurmctldPidFile": tmp / "slurmctld.pid",
        "SlurmdPidFile": tmp / "slurmd.pid",
        "SlurmctldLogFile": tmp / "slurmctld.log",
        "SlurmdLogFile": tmp / "slurmd.log",
        "ProctrackType": "proctrack/linuxproc",  # no cgroups needed
        "TaskPlugin": "task/none",
        "JobAcctGatherType": "jobacct_gather/none",
        "AccountingStorageType": "accounting_storage/none",
        "SelectType": "select/cons_tres",
        "SelectTypeParameters": "CR_Core",
        "MpiDefault": "none",
        "ReturnToService": 2,
        "FirstJobId": random.randrange(1000, 30000),
        "NodeName": f"localhost NodeAddr=127.0.0.1 NodeHostname={socket.gethostname()} CPUs={os.cpu_count()}",
        "PartitionName": "test Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES",
    }
    return "".join(f"{key}={value}\n" for key, value in lines.items())


@pytest.fixture
def slurm(tmp_path_factory) -> dict:
    """A running one-node SLURM; the environment its commands need (SLURM_CONF)."""
    tmp = tmp_path_factory.mktemp("slurm")
    for name in ("munge", "state", "spool"):
        (tmp / name).mkdir(mode=0o700)
    key = tmp / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    munge = [f"--key-file={key}", f"--socket={tmp}/munge/socket", f"--pid-file={tmp}/munge/pid"]
    munge += [f"--log-file={tmp}/munge/log", f"--seed-file={tmp}/munge/seed"]
    subprocess.run(["munged", "--force", *munge], check=True, timeout=30)  # forks its daemon
    (tmp / "slurm.conf").write_text(slurm_conf(tmp))
    env = {**os.environ, "SLURM_CONF": str(tmp / "slurm.conf")}
    logs = open(tmp / "daemons.out", "w")  # noqa: SIM115 (closed below)
    daemons = [
        subprocess.Popen(command, env=env, stdout=logs, stderr=subprocess.STDOUT)
        for command in (["slurmctld", "-D", "-i"], ["slurmd", "-D", "-N", "localhost"])
    ]
    try:
        deadline = time.monotonic() + 60
        while run(["sinfo", "-h", "-o", "%t"], env).stdout.strip() != "idle":
            assert time.monotonic() < deadline, (tmp / "daemons.out").read_text()[-3000:]
            time.sleep(0.5)
        yield env
    finally:
        run(["scancel", "--full", "--user", "root"], env)
        for daemon in daemons:
            daemon.terminate()
            daemon.wait(timeout=60)
        logs.close()
        subprocess.run(["munged", f"--socket={tmp}/munge/socket", "--stop"], timeout=30)


def run(command: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def job_field(job: str, env: dict, name: str) -> str:
    found = re.search(rf"\b{name}=(\S+)", run(["scontrol", "show", "job", job], env).stdout)
    return found.group(1) if found else ""


def what_happened(job: str, env: dict, output: Path) -> str:
    """For a failure message: the job as SLURM sees it, the end of its output and of both daemons' logs
    (a job that fails before its script writes anything is explained only there)."""
    folder = Path(env["SLURM_CONF"]).parent
    parts = [run(["scontrol", "show", "job", job], env).stdout]
    for path in (output, folder / "slurmctld.log", folder / "slurmd.log"):
        parts.append(f"--- {path.name}\n" + (path.read_text(errors="replace")[-2500:] if path.exists() else "(none)"))
    return "\n".join(parts)


def wait_for_job(job: str, env: dict, done, output: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        state = job_field(job, env, "JobState")
        assert state not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), what_happened(job, env, output)
        assert time.monotonic() < deadline, f"{state} after {timeout} s\n{what_happened(job, env, output)}"
        time.sleep(0.5)


def submit(env: dict, output: Path, trainer_args: list[str]) -> str:
    """sbatch the script with the script's own lines, but for the size of the job and a --time whose
    USR1@600 lies far ahead; its job id."""
    sbatch = ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1"]
    sbatch += ["--time=60", f"--output={output}", f"--chdir={ROOT}", str(ROOT / "slurm" / "train.sbatch")]
    job = run([*sbatch, *trainer_args], env).stdout.strip()
    assert job.isdigit(), job
    return job


def release(job: str, env: dict, output: Path) -> None:
    """A requeued job waits two minutes (its BeginTime); an administrator's release, to keep tests short."""
    wait_for_job(job, env, lambda: job_field(job, env, "JobState") == "PENDING", output)
    run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env)


def test_the_documented_script_requeues_on_sigusr1_and_the_requeued_job_loses_nothing(slurm, data_dir, tmp_path):
    common = dict(max_steps=12, save_interval=1000, eval_interval=6, num_samples=0, val_batches=1)
    with reserved_port() as port:  # the uninterrupted run, started as srun starts it
        tasks = launch_ranks(nano_args(data_dir, tmp_path / "reference", **common), port)
        try:
            assert [task.wait(timeout=300) for task in tasks] == [0, 0], tasks[0].stderr.read()[-3000:]
        finally:
            end_all(tasks)
    out, output = tmp_path / "slurm-run", tmp_path / "job.out"
    env = {**slurm, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # the tasks' python is ours
    job = submit(env, output, nano_args(data_dir, out, **common))
    wait_for_job(job, env, lambda: max(metric(out, "train/loss"), default=0) >= 2, output)
    assert run(["scancel", "--signal=USR1", job], env).returncode == 0  # what --signal=USR1@600 sends
    wait_for_job(job, env, lambda: job_field(job, env, "Restarts") == "1", output)  # the script's requeue
    release(job, env, output)
    wait_for_job(job, env, lambda: job_field(job, env, "JobState") == "COMPLETED", output)
    log = output.read_text()
    assert "SIGUSR1 received" in log and "Exited with exit code 75" in log, log[-3000:]  # srun's line
    assert job_field(job, env, "ExitCode") == "0:0" and job_field(job, env, "Restarts") == "1"
    assert metric(out, "train/loss") == metric(tmp_path / "reference", "train/loss")
    assert metric(out, "val/loss") == metric(tmp_path / "reference", "val/loss")


def test_a_stall_soon_after_every_start_is_requeued_only_max_failed_starts_minus_one_times(slurm, tmp_path):
    """A bad node stalls every start: the script counts such starts in the job's Comment and gives up at
    MAX_FAILED_STARTS, with one line saying so. The tasks' `python` is a stand-in that exits 76 at once, as
    the stall watchdog does (its own tests: tests/test_train_stall.py); what is tested is the script."""
    stand_in = tmp_path / "bin" / "python"
    stand_in.parent.mkdir()
    stand_in.write_text("#!/bin/sh\nexit 76\n")
    stand_in.chmod(0o755)
    output = tmp_path / "job.out"
    env = {**slurm, "PATH": f"{stand_in.parent}:{os.environ['PATH']}", "MAX_FAILED_STARTS": "2"}
    job = submit(env, output, ["--out_dir", str(tmp_path / "run")])
    wait_for_job(job, env, lambda: job_field(job, env, "Restarts") == "1", output)
    assert job_field(job, env, "Comment") == "failed_starts=1", what_happened(job, env, output)
    release(job, env, output)
    deadline = time.monotonic() + 120
    while job_field(job, env, "JobState") not in ("FAILED", "COMPLETED"):
        assert time.monotonic() < deadline, what_happened(job, env, output)
        time.sleep(0.5)
    assert job_field(job, env, "JobState") == "FAILED" and job_field(job, env, "ExitCode") == "76:0"
    assert job_field(job, env, "Restarts") == "1", what_happened(job, env, output)
    (line,) = [line for line in output.read_text().splitlines() if line.startswith("error: ")]
    assert line.startswith("error: 2 starts in a row ended within 3600 s (this one with status 76): not requeued")
