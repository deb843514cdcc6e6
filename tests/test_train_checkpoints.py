"""gpt2_scratch/training/checkpoints.py bookkeeping without training: which folders count, what is pruned. (The
judgement of damaged checkpoints is in test_train_faults.py.)"""

import pytest

from gpt2_scratch.training.checkpoints import find_resume_checkpoint, latest_checkpoint, prune_checkpoints
from gpt2_scratch.training.config import ConfigError, TrainConfig


def test_resume_takes_only_complete_checkpoints(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    assert latest_checkpoint(checkpoints) is None
    for name in ("step_000004", "step_000012", ".tmp_step_000016", "step_000020.partial"):
        (checkpoints / name).mkdir(parents=True)
    (checkpoints / "step_000024").write_text("a file, not a checkpoint folder")
    assert latest_checkpoint(checkpoints).name == "step_000012"
    with pytest.raises(ConfigError, match="already holds a run .*step_000012.*--resume auto"):
        find_resume_checkpoint(TrainConfig(), checkpoints, tmp_path, {})
    with pytest.raises(ConfigError, match="not a checkpoint folder"):
        find_resume_checkpoint(TrainConfig(resume=str(checkpoints / ".tmp_step_000016")), checkpoints, tmp_path, {})


def test_prune_keeps_the_newest(tmp_path):
    for step in (3, 6, 9, 12):
        (tmp_path / f"step_{step:06d}").mkdir()
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000009", "step_000012"]
