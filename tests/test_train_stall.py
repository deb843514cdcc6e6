"""A stalled rank and a run stuck in a collective: real processes, real signals. A rank stopped with
SIGSTOP ends the run within `--collective_timeout` with one line naming it, and `--resume auto` gives
the uninterrupted run's losses; a second stop signal ends a process blocked in a collective."""

import signal
import subprocess
import sys

import pytest
from trainer_runs import ONE_THREAD, ROOT, end_all, launch_ranks, metric, nano_args, reserved_port, wait_for_step

from gpt2_scratch.training.checkpoints import latest_checkpoint
from gpt2_scratch.training.config import ConfigError, TrainConfig
from gpt2_scratch.training.watchdog import STALL_STATUS, stall_limit

pytestmark = pytest.mark.usefixtures("one_thread")

TIMEOUT = 16  # --collective_timeout of these runs, seconds: the watchdog speaks after 4 to 8 of them


def test_the_stall_limit_is_far_beyond_the_recent_steps_and_within_the_collective_timeout():
    assert stall_limit(300, []) == 75  # before any step time: a quarter of the timeout
    assert stall_limit(300, [0.1, 0.1, 30.0]) == 75  # one slow step (an evaluation) moves no median
    assert stall_limit(300, [6.0, 5.0, 7.0]) == 120  # 20 times the median step
    assert stall_limit(300, [60.0]) == 150  # never past half the timeout: before the process group fails
    with pytest.raises(ConfigError, match="collective_timeout must be a number of seconds > 0, got 0"):
        TrainConfig(collective_timeout=0)


def run_ranks(argv: list[str]) -> list[subprocess.Popen]:
    """Two ranks, srun-style, to their end; both must succeed."""
    with reserved_port() as port:
        tasks = launch_ranks(argv, port)
        try:
            codes = [task.wait(timeout=300) for task in tasks]
        finally:
            end_all(tasks)
    assert codes == [0, 0], tasks[0].stderr.read()[-3000:] + tasks[1].stderr.read()[-3000:]
    return tasks


def test_a_stopped_rank_ends_the_run_with_one_line_naming_it_and_the_resume_loses_nothing(data_dir, tmp_path):
    common = dict(max_steps=8, save_interval=3, eval_interval=4, num_samples=0, val_batches=1)
    common.update(collective_timeout=TIMEOUT)
    run_ranks(nano_args(data_dir, tmp_path / "reference", **common))
    out = tmp_path / "stalled"
    with reserved_port() as port:
        tasks = launch_ranks(nano_args(data_dir, out, **common), port)
        try:
            wait_for_step(out, tasks[0], 4)
            tasks[1].send_signal(signal.SIGSTOP)  # as `kill -STOP`: alive, silent, holding its socket
            assert tasks[0].wait(timeout=TIMEOUT) == STALL_STATUS, tasks[0].stderr.read()[-3000:]
        finally:
            end_all(tasks)
    lines = tasks[0].stderr.read().splitlines()
    stalls = [line for line in lines if "stalled:" in line]
    assert len(stalls) == 1 and stalls[0].startswith("error: stalled: rank 1 "), lines[-20:]
    assert "has not answered" in stalls[0] and "--collective_timeout 16 s" in stalls[0]
    assert max(metric(out, "train/loss")) < 8
    newest = latest_checkpoint(out / "checkpoints")  # what the requeued run resumes: complete
    assert newest is not None and int(newest.name.removeprefix("step_")) % 3 == 0
    run_ranks(nano_args(data_dir, out, **common, resume="auto"))
    assert metric(out, "train/loss") == metric(tmp_path / "reference", "train/loss")
    assert metric(out, "val/loss") == metric(tmp_path / "reference", "val/loss")


STUCK = """
import datetime, os, signal, sys, threading, time
import torch, torch.distributed as dist
from gpt2_scratch.training import stop_signals
from gpt2_scratch.training.processes import StopRequest

def report_blocked(main):
    # once the main thread's innermost frame has not moved for 0.5 s, it is inside a call into C++
    last, since = None, time.monotonic()
    while True:
        frame = sys._current_frames()[main]
        where = (frame.f_code, frame.f_lasti)
        if where != last:
            last, since = where, time.monotonic()
        elif time.monotonic() - since > 0.5 and frame.f_code.co_filename.endswith("distributed_c10d.py"):
            print("blocked", flush=True)
            return
        time.sleep(0.01)

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
if dist.get_rank() == 1:
    os.kill(os.getpid(), signal.SIGSTOP)
with stop_signals.SecondSignal(), StopRequest():
    threading.Thread(target=report_blocked, args=(threading.get_ident(),), daemon=True).start()
    dist.all_reduce(torch.zeros(1))  # waits for rank 1, which never comes: blocked in gloo's C++
print("left the collective", flush=True)
"""


def script_ranks(script: str, port: int, *args: str) -> list[subprocess.Popen]:
    """`python -c script args` as ranks 0 and 1 of a launch on `port`, as srun starts them, one thread each."""
    tasks = []
    for rank in (0, 1):
        env = {**ONE_THREAD, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
        env["MASTER_PORT"] = str(port)
        pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        tasks.append(subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT, env=env, **pipes))
    return tasks


def test_a_second_signal_ends_a_run_stuck_in_a_collective():
    """Rank 0 blocks in an all-reduce that the stopped rank 1 never joins. The first SIGTERM asks for a
    checkpoint (its handler cannot run while the main thread is blocked); the second ends the process
    long before the collective's timeout of 10 minutes."""
    with reserved_port() as port:
        tasks = script_ranks(STUCK, port)
        try:
            assert tasks[0].stdout.readline() == "blocked\n", tasks[0].stderr.read()[-3000:]
            tasks[0].send_signal(signal.SIGTERM)
            with pytest.raises(subprocess.TimeoutExpired):
                tasks[0].wait(timeout=1)  # the first one asks for a checkpoint: it does not end the process
            tasks[0].send_signal(signal.SIGTERM)
            code = tasks[0].wait(timeout=60)
        finally:
            end_all(tasks)
    err = tasks[0].stderr.read()
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert "SIGTERM again, while the run is blocked: ending the process now" in err
    assert tasks[0].stdout.read() == ""  # never left the collective


HELD_UP = """
import datetime, sys, time
import torch, torch.distributed as dist
from gpt2_scratch.training.watchdog import StallWatchdog

timeout = float(sys.argv[1])
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
rank = dist.get_rank()
with StallWatchdog(timeout, rank, 2, interval=0.2) as watchdog:
    for step in (1, 2):
        dist.all_reduce(torch.zeros(1))
        watchdog.progress(step)
    if rank == 1:
        time.sleep(600)  # its main thread stuck within step 3, while its watchdog's heartbeat goes on
    dist.all_reduce(torch.zeros(1))
print("left the collective", flush=True)
"""


def test_a_rank_stuck_within_a_step_ends_the_run_at_the_collective_timeout_with_one_line_and_76():
    """Every heartbeat goes on at the same step, so the watchdog cannot tell the stuck rank: the process
    group's timeout ends rank 0's all-reduce, and the watchdog turns gloo's error into one line and the
    status a requeue script requeues on, not a traceback and status 1."""
    with reserved_port() as port:
        tasks = script_ranks(HELD_UP, port, "4")
        try:
            code = tasks[0].wait(timeout=120)
            assert tasks[1].poll() is None  # still stuck: srun's --wait ends it on a cluster
        finally:
            end_all(tasks)
    err = tasks[0].stderr.read()
    assert code == STALL_STATUS, err[-3000:]
    assert "Traceback" not in err and tasks[0].stdout.read() == ""
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert line.startswith("error: stalled: a collective on rank 0 (")
    assert "--collective_timeout 4 s after step 2" in line
    assert line.endswith(f"ending with status {STALL_STATUS}: --resume auto continues from the newest checkpoint")
