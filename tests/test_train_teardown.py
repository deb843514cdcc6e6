"""How a run ends: the prepared model and optimizer are freed before `end_training` takes the process
group down. Freed after it, DDP's Reducer is the group's last holder and joins gloo's worker threads
while holding the GIL; a worker still freeing a finished collective's Python tensor then waits for
the GIL forever, and that rank never exits (a 2-process test hung so under load)."""

import gc
import weakref

import pytest
from accelerate import Accelerator
from trainer_runs import nano_args, train_in_process

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_model_is_freed_before_the_process_group_goes_down(data_dir, tmp_path, monkeypatch):
    prepared: list[weakref.ref] = []
    alive_at_end: list[list[str]] = []
    prepare, end_training = Accelerator.prepare, Accelerator.end_training

    def recording_prepare(self, *objects, **kwargs):
        result = prepare(self, *objects, **kwargs)
        prepared.extend(weakref.ref(obj) for obj in (result if isinstance(result, tuple) else (result,)))
        return result

    def checking_end_training(self):
        gc.collect()  # what is alive now is held, not merely uncollected
        alive_at_end.append([type(ref()).__name__ for ref in prepared if ref() is not None])
        return end_training(self)

    monkeypatch.setattr(Accelerator, "prepare", recording_prepare)
    monkeypatch.setattr(Accelerator, "end_training", checking_end_training)
    short = dict(max_steps=2, warmup_steps=1, num_samples=0, save_interval=100)
    summary = train_in_process(nano_args(data_dir, tmp_path / "run", **short))

    assert summary["complete"] and summary["step"] == 2
    assert len(prepared) == 2, "the model and the optimizer were prepared"
    assert alive_at_end == [[]], f"still held when the process group went down: {alive_at_end}"
