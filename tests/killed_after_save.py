"""Run train_accelerate.py and SIGKILL its own process as soon as it has saved step $KILL_AFTER_SAVE
(test only): a kill at a known point, however fast or slow the machine, where a kill from outside once
a step is logged could land before the save or after the run's next one.

    KILL_AFTER_SAVE=4 python tests/killed_after_save.py [trainer flags]
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_accelerate as ta  # noqa: E402
from gpt2_scratch.user_errors import run_command  # noqa: E402

_save = ta.save


def _save_then_die(run, upload: bool = True) -> Path:
    checkpoint = _save(run, upload)
    if run.state.step == int(os.environ["KILL_AFTER_SAVE"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return checkpoint


ta.save = _save_then_die

if __name__ == "__main__":
    run_command(ta.command)
