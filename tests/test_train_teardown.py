"""How a run ends: the prepared model and optimizer are freed before `end_training` takes the process
group down, whether the run completes or stops with an error. Freed after it, DDP's Reducer is the
group's last holder and joins gloo's worker threads while holding the GIL; a worker still freeing a
finished collective's Python tensor then waits for the GIL forever, and that rank never exits (a
2-process test hung so under load). On an error the group goes down before the error leaves the
trainer, not in the interpreter's teardown."""

import gc
import weakref

import pytest
from accelerate import Accelerator
from trainer_runs import nano_args, train_in_process

import train_accelerate
from gpt2_scratch.user_errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("ending", ["complete", "error at step 2", "chained error at step 2"])
def test_the_model_is_freed_before_the_process_group_goes_down(ending, data_dir, tmp_path, monkeypatch):
    prepared: list[weakref.ref] = []
    alive_at_end: list[list[str]] = []
    prepare, end_training, train_step = Accelerator.prepare, Accelerator.end_training, train_accelerate.train_step

    def recording_prepare(self, *objects, **kwargs):
        result = prepare(self, *objects, **kwargs)
        prepared.extend(weakref.ref(obj) for obj in (result if isinstance(result, tuple) else (result,)))
        return result

    def checking_end_training(self):
        gc.collect()  # what is alive now is held, not merely uncollected
        alive_at_end.append([type(ref()).__name__ for ref in prepared if ref() is not None])
        return end_training(self)

    def inner_failure(model, optimizer):  # a deeper frame, in the cause's traceback only
        raise RuntimeError(f"{type(model).__name__} does not fit")

    def failing_step(model, optimizer, *args, **kwargs):
        if len(steps) == 1:
            if ending == "chained error at step 2":  # as a checkpoint that does not fit is reported
                try:
                    inner_failure(model, optimizer)
                except RuntimeError as err:
                    raise UserError("a user error in the middle of training") from err
            raise UserError("a user error in the middle of training")
        steps.append(1)
        return train_step(model, optimizer, *args, **kwargs)

    steps: list[int] = []
    monkeypatch.setattr(Accelerator, "prepare", recording_prepare)
    monkeypatch.setattr(Accelerator, "end_training", checking_end_training)
    if ending != "complete":
        monkeypatch.setattr(train_accelerate, "train_step", failing_step)
    argv = nano_args(data_dir, tmp_path / "run", max_steps=2, warmup_steps=1, num_samples=0, save_interval=100)

    if ending == "complete":
        summary = train_in_process(argv)
        assert summary["complete"] and summary["step"] == 2
    else:
        with pytest.raises(UserError, match="in the middle of training"):
            train_in_process(argv)
        assert steps == [1], "the first step ran, the second raised"
    assert len(prepared) == 2, "the model and the optimizer were prepared"
    assert alive_at_end and alive_at_end[0] == [], f"still held when the process group went down: {alive_at_end}"
