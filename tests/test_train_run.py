"""Whole training runs of the tiny `cpu-nano` model on the built-in corpus: the run directory, the HF
export, the Hub push (without the network), exact resume after SIGKILL, SIGTERM, and 2 processes."""

import json
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
from trainer_runs import (
    kill_at_step,
    launch,
    metric,
    nano_args,
    records,
    train_in_process,
    train_two_processes,
    wait_for_step,
)

from data_prep.sources import BUILTIN_NAME
from gpt2_scratch.training.checkpoints import latest_checkpoint
from gpt2_scratch.training.config import TrainConfig, parse_config
from gpt2_scratch.user_errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeHub:
    """Stands in for `huggingface_hub.HfApi`: records the calls and what the upload would send."""

    calls: list = []

    def __init__(self, *args, **kwargs):
        pass

    def whoami(self):
        FakeHub.calls.append(("whoami", FakeHub.out_dir.joinpath("log.jsonl").exists()))
        return {"name": "tester"}

    def create_repo(self, repo_id, private=False, exist_ok=False):
        FakeHub.calls.append(("create_repo", repo_id, private, exist_ok))

    def auth_check(self, repo_id, write=False):
        FakeHub.calls.append(("auth_check", repo_id, write))

    def upload_folder(self, repo_id, folder_path, commit_message):
        folder = Path(folder_path)
        files = sorted(p.name for p in folder.iterdir())
        FakeHub.calls.append(("upload_folder", repo_id, folder, files, (folder / "README.md").read_text()))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")


@pytest.fixture(scope="module")
def pushed_run(data_dir, tmp_path_factory):
    """Six steps with tensorboard, samples and --push_to_hub against FakeHub."""
    import huggingface_hub
    from huggingface_hub import constants

    out_dir = tmp_path_factory.mktemp("run") / "nano"
    FakeHub.calls, FakeHub.out_dir = [], out_dir
    argv = nano_args(data_dir, out_dir, max_steps=6, eval_interval=3, save_interval=3, num_samples=2)
    argv += ["--report_to", "tensorboard", "--push_to_hub", "--hub_model_id", "me/tiny-gpt2"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub, "HfApi", FakeHub)
        mp.setattr(constants, "is_offline_mode", lambda: False)
        summary = train_in_process(argv)
    return SimpleNamespace(out_dir=out_dir, summary=summary, calls=list(FakeHub.calls))


def test_run_directory_describes_itself(pushed_run):
    out = pushed_run.out_dir
    config = parse_config(["--config", str(out / "config.yaml")])
    assert (config.model, config.max_steps, config.hub_model_id) == ("cpu-nano", 6, "me/tiny-gpt2")
    info = json.loads((out / "run_info.json").read_text())
    assert info["processes"] == 1 and info["gradient_accumulation_steps"] == 2 and info["mixed_precision"] == "no"
    assert info["packages"]["torch"] and info["packages"]["accelerate"] and "commit" in info["git"]
    assert (out / "plots" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000003", "step_000006"]

    train = [r for r in records(out) if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    for r in train:
        assert r["tokens"] == 256 * r["step"]
        assert {"lr", "grad_norm", "tokens_per_s", "mfu", "step_time"} <= set(r)
        assert r["mfu"] == pytest.approx(
            r["tokens_per_s"] * TrainConfig(model="cpu-nano", seq_len=32).model_config().flops_per_token(32) / 1e11
        )
    assert sorted(metric(out, "val/loss")) == [0, 3, 6]
    assert metric(out, "val/loss")[6] < metric(out, "val/loss")[0]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 3, 6]
    assert all(len(s["samples"]) == 2 and t.startswith(s["prompt"]) for s in samples for t in s["samples"])


def test_hf_export_loads_with_the_auto_classes(pushed_run, data_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.val_loss import evaluate_val_loss

    hf = pushed_run.out_dir / "hf"
    model = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]  # GPT-2's ids
    assert model.config.n_layer == 2 and model.config.n_embd == 32
    # The export holds the final weights: it scores the validation loss that the run logged last.
    loss = evaluate_val_loss(model, data_dir, batch_size=4, seq_len=32, max_batches=2)
    assert loss == pytest.approx(metric(pushed_run.out_dir, "val/loss")[6], rel=1e-5)
    out = model.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 4)


def test_push_checks_access_first_then_uploads_the_export_with_a_model_card(pushed_run):
    calls = pushed_run.calls
    assert calls[0] == ("whoami", False)  # before training wrote anything
    assert calls[1] == ("create_repo", "me/tiny-gpt2", False, True)
    assert calls[2] == ("auth_check", "me/tiny-gpt2", True)
    assert len(calls) == 4 and calls[3][0] == "upload_folder"
    _, repo_id, folder, files, card = calls[3]
    # the default hub_format pushes the official layout, which loads without remote code
    assert repo_id == "me/tiny-gpt2" and folder == pushed_run.out_dir / "hf-gpt2"
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "loss.png"} <= set(files)
    assert not any(name.endswith(".py") for name in files)
    val_loss = metric(pushed_run.out_dir, "val/loss")[6]
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "| tokens seen | 1,536 |" in card and "| optimizer steps | 6 of 6 |" in card
    assert f"| val/loss | {val_loss:.4f} |" in card
    assert "![training and validation loss](loss.png)" in card
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-gpt2")' in card and "trust_remote_code=True" not in card
    assert "| `max_lr` | `0.003` |" in card and BUILTIN_NAME in card


def test_push_without_network_fails_before_training(data_dir, tmp_path):
    argv = nano_args(data_dir, tmp_path / "out", push_to_hub=True, hub_model_id="me/tiny-gpt2")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        train_in_process(argv)
    assert not (tmp_path / "out" / "log.jsonl").exists() and not (tmp_path / "out" / "checkpoints").exists()


def test_sigkill_then_resume_auto_logs_the_same_losses(data_dir, tmp_path):
    # Dropout on, and samples drawn at each evaluation: both use the RNG that the checkpoint must restore.
    common = dict(dropout=0.1, max_steps=40, stop_at_step=16, save_interval=4, eval_interval=5)
    train_in_process(nano_args(data_dir, tmp_path / "reference", **common))

    out = tmp_path / "killed"
    kill_at_step(nano_args(data_dir, out, **common), out, 6)
    newest = latest_checkpoint(out / "checkpoints")
    assert newest is not None and int(newest.name[5:]) < 16, "the run was to be killed before its end"
    (out / "checkpoints" / ".tmp_step_000099").mkdir()  # a save cut short: never resumed from
    train_in_process(nano_args(data_dir, out, resume="auto", **common))

    reference = tmp_path / "reference"
    assert sorted(metric(out, "train/loss")) == list(range(1, 17))  # each step once, none lost or repeated
    assert metric(out, "train/loss") == metric(reference, "train/loss")
    assert metric(out, "val/loss") == metric(reference, "val/loss")
    assert metric(out, "tokens") == metric(reference, "tokens")
    info = json.loads((out / "run_info.json").read_text())
    assert info["resumed_from"] == str(newest)


def test_sigterm_saves_a_usable_checkpoint_and_exits_cleanly(data_dir, tmp_path):
    out = tmp_path / "preempted"
    proc = launch(nano_args(data_dir, out, max_steps=500, save_interval=1000, eval_interval=1000, num_samples=0))
    wait_for_step(out, proc, 3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
    assert "SIGTERM received" in proc.stderr.read()
    last = max(metric(out, "train/loss"))
    assert latest_checkpoint(out / "checkpoints").name == f"step_{last:06d}"  # not a save_interval step
    assert (out / "hf" / "model.safetensors").is_file()

    argv = nano_args(data_dir, out, max_steps=500, save_interval=1000, eval_interval=1000, num_samples=0)
    summary = train_in_process([*argv, "--resume", "auto", "--stop_at_step", str(last + 2)])
    assert summary["step"] == last + 2 and sorted(metric(out, "train/loss")) == list(range(1, last + 3))


def test_two_processes_match_one_process_with_twice_the_accumulation(data_dir, tmp_path):
    common = dict(max_steps=4, eval_interval=4, save_interval=4, num_samples=0)
    train_in_process(nano_args(data_dir, tmp_path / "one", **common))
    two = tmp_path / "two"
    # val_batches counts the batches of all processes: 2 ranks x 1 batch read the same val chunks as 1 x 2.
    done = train_two_processes(nano_args(data_dir, two, **common))
    assert done.returncode == 0, done.stderr[-3000:]
    info_one = json.loads((tmp_path / "one" / "run_info.json").read_text())
    info_two = json.loads((two / "run_info.json").read_text())
    assert (info_one["processes"], info_one["gradient_accumulation_steps"]) == (1, 2)
    assert (info_two["processes"], info_two["gradient_accumulation_steps"]) == (2, 1)
    one_losses, two_losses = metric(tmp_path / "one", "train/loss"), metric(two, "train/loss")
    assert sorted(two_losses) == [1, 2, 3, 4]
    assert two_losses == pytest.approx(one_losses, rel=1e-5)
    assert metric(two, "val/loss") == pytest.approx(metric(tmp_path / "one", "val/loss"), rel=1e-5)


def test_gradient_checkpointing_trains_the_same_model(data_dir, tmp_path):
    """--gradient_checkpointing recomputes activations in backward: the same losses, less memory."""
    common = dict(max_steps=3, eval_interval=3, save_interval=3, num_samples=0)
    train_in_process(nano_args(data_dir, tmp_path / "plain", **common))
    train_in_process(nano_args(data_dir, tmp_path / "recomputed", gradient_checkpointing=True, **common))
    plain, recomputed = metric(tmp_path / "plain", "train/loss"), metric(tmp_path / "recomputed", "train/loss")
    assert sorted(plain) == [1, 2, 3] and recomputed == pytest.approx(plain, rel=1e-6)
