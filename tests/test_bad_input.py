"""What a careless user typed, each refused as one line where it is judged (it used to be a traceback):
a damaged data manifest, a binary or mislabelled HellaSwag file, a nanoGPT config of the wrong types, an
output path that is a file or a folder, a device that does not exist, a model too large for the machine,
a Hub checkpoint while offline, a benchmark shape of zero."""

import json
import shutil
import subprocess
import sys
import time

import pytest
import torch
from permissions import obeying_file_modes
from trainer_runs import ONE_THREAD, ROOT, nano_args, train_in_process

from data_prep import DataPrepError, iter_val_batches, read_manifest, verify_shards
from eval.common import check_out_file, parse_device
from eval.hellaswag import HellaSwagDataError, load_examples, parse_example
from gpt2_scratch import convert_nanogpt, export_gpt2
from gpt2_scratch.conversion import NanoGPTCheckpointError, from_nanogpt
from gpt2_scratch.training import remote
from gpt2_scratch.training.config import ConfigError, parse_config
from gpt2_scratch.training.data import prepare_data
from gpt2_scratch.training.memory import TRAINING_BYTES_PER_PARAMETER, check_fits, parameter_count
from gpt2_scratch.user_errors import UserError
from modeling_gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM

MANIFESTS = {
    "not UTF-8": (b'{"shards": "\xff\xfe"}', "is not UTF-8 text"),
    "a bare number": (b"42", "holds a JSON int, not an object"),
    "shards a string": (None, "shards is a str, expected a list"),
    "a shard entry a number": (None, r"shards\[0\] is a int, expected an object"),
    "tokens a string": (None, r"shards\[0\].tokens is '7', expected a int"),
}


def damaged_manifest(data_dir, tmp_path, kind: str):
    """A copy of the data folder's manifest.json (the shards are not needed to judge it), damaged."""
    content, message = MANIFESTS[kind]
    if content is None:
        manifest = json.loads((data_dir / "manifest.json").read_text())
        if kind == "shards a string":
            manifest["shards"] = "train_000001.bin"
        elif kind == "a shard entry a number":
            manifest["shards"] = [3]
        else:
            manifest["shards"][0]["tokens"] = "7"
        content = json.dumps(manifest).encode()
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "manifest.json").write_bytes(content)
    return folder, message


@pytest.mark.parametrize("kind", list(MANIFESTS))
def test_a_damaged_manifest_is_one_line_for_every_reader(kind, data_dir, tmp_path):
    folder, message = damaged_manifest(data_dir, tmp_path, kind)
    with pytest.raises(DataPrepError, match=message):
        read_manifest(folder)  # where it is judged
    with pytest.raises(DataPrepError, match=message):
        verify_shards(folder)  # python -m data_prep --verify
    with pytest.raises(DataPrepError, match=message):
        next(iter_val_batches(folder, batch_size=1, seq_len=8))  # eval.val_loss
    config = parse_config(
        ["--data_dir", str(folder), "--out_dir", str(tmp_path / "out"), "--model", "cpu-nano", "--seq_len", "32"]
    )
    with pytest.raises(DataPrepError, match=message):
        prepare_data(config)  # the trainer


@pytest.fixture(scope="module")
def nano_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nano-model")
    torch.manual_seed(0)
    GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("cpu-nano")).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", ["manifest.json", "val_000000.bin", "train_000003.bin", "the folder"])
def test_an_unreadable_data_file_is_one_line_naming_it_for_every_reader(name, data_dir, nano_model, tmp_path):
    folder = shutil.copytree(data_dir, tmp_path / "data")
    if name == "the folder":  # readable, but no way through it: every file in it is unreadable
        folder.chmod(0o600)
        name = "manifest.json"  # the first file each reader opens
    else:
        (folder / name).chmod(0)  # no read permission; root too obeys it (tests/permissions.py)
    out = tmp_path / "run"
    commands = {
        "trainer": ["train_accelerate.py", *nano_args(folder, out, max_steps=4)],
        "data_prep --verify": ["-m", "data_prep", "--verify", "--out_dir", str(folder)],
    }
    if name != "train_000003.bin":  # the validation loss reads the manifest and the val shard only
        commands["eval.val_loss"] = ["-m", "eval.val_loss", "--model", str(nano_model), "--data_dir", str(folder)]
        commands["eval.val_loss"] += ["--seq_len", "32", "--batch_size", "2", "--max_batches", "1", "--device", "cpu"]
    try:
        for command, args in commands.items():
            done = subprocess.run(
                obeying_file_modes([sys.executable, *args]),
                cwd=ROOT,
                env=ONE_THREAD,
                capture_output=True,
                text=True,
                timeout=300,
            )
            lines = done.stderr.strip().splitlines()
            assert done.returncode == 2 and lines[-1].startswith("error: "), (command, done.stderr[-3000:])
            assert "Traceback" not in done.stderr and f"{folder / name} cannot be read" in lines[-1], command
    finally:
        folder.chmod(0o755)  # so that the test's folder can be cleared by any user
    assert not out.exists()  # the trainer refused before training: no out_dir holding only .lock


def test_a_binary_hellaswag_file_is_one_line(tmp_path):
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_bytes(b'{"ctx": "a"}\n' + bytes(range(128, 256)))
    with pytest.raises(HellaSwagDataError, match="is not UTF-8 text"):
        load_examples(path)


@pytest.mark.parametrize("label", ["²", True, 1.5, "1.0", "01", -1, 4])
def test_a_hellaswag_label_that_is_not_an_integer_0_to_3_is_one_line(label):
    line = json.dumps({"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": label})
    with pytest.raises(HellaSwagDataError, match="'label' must be an int in 0..3"):
        parse_example(line, "hellaswag_val.jsonl:1")
    assert parse_example(line.replace(json.dumps(label), '"2"'), "x")["label"] == 2  # the Hub copy's string label


GOOD_NANOGPT = dict(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=16)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_layer": "2"}, "'n_layer': '2'"),
        ({"n_head": 0}, "'n_head': 0"),
        ({"n_embd": 8.0}, "'n_embd': 8.0"),
        ({"dropout": "0.1"}, "'dropout': '0.1'"),
        ({"n_head": 3}, r"n_embd \(8\) is not divisible by n_head \(3\)"),
    ],
)
def test_a_nanogpt_config_of_the_wrong_types_is_one_line(change, message, tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {}, "model_args": {**GOOD_NANOGPT, **change}}, path)
    with pytest.raises(NanoGPTCheckpointError, match=message):
        from_nanogpt(path)


def test_convert_nanogpt_refuses_an_output_that_is_a_file(tmp_path):
    out = tmp_path / "out"
    out.write_text("the user's file")
    with pytest.raises(UserError, match="is a file; give a folder"):
        convert_nanogpt.convert(tmp_path / "ckpt.pt", out)
    assert out.read_text() == "the user's file"


def test_eval_out_that_is_a_folder_and_a_device_that_does_not_exist(tmp_path):
    with pytest.raises(UserError, match="is a folder; give the path of the JSON file"):
        check_out_file(str(tmp_path))
    check_out_file(str(tmp_path / "new" / "result.json"))  # a new file in a new folder is fine
    with pytest.raises(UserError, match="'bogus' is not a torch device"):
        parse_device("bogus")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="this machine has 0 CUDA device"):
            parse_device("cuda")
    assert parse_device("cpu") == torch.device("cpu")


def small_export(tmp_path, **config_changes):
    folder = tmp_path / "export"
    GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("cpu-nano")).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
    return folder


def test_export_gpt2_judges_the_config_and_the_weight_shapes(tmp_path):
    with pytest.raises(UserError, match="config.json: .*n_embd"):
        export_gpt2.export(small_export(tmp_path / "a", n_head=3))  # 32 is not divisible by 3
    wider = r"not fit its config: transformer.wte.weight has shape \[\d+, 32\], .* needs \[\d+, 96\]"
    with pytest.raises(UserError, match=wider):
        export_gpt2.export(small_export(tmp_path / "b", n_embd=96))
    with pytest.raises(UserError, match="no transformer.h.2"):
        export_gpt2.export(small_export(tmp_path / "c", n_layer=3))


def test_parameter_count_is_the_models_own_without_allocating_it():
    config = GPT2ScratchConfig.from_preset("cpu-nano")
    model = GPT2ScratchForCausalLM(config)
    assert parameter_count(config) == len(torch.nn.utils.parameters_to_vector(model.parameters()))


def test_a_model_too_large_for_the_machine_is_refused_before_it_is_allocated(data_dir, tmp_path):
    huge = GPT2ScratchConfig.from_preset("cpu-nano", n_embd=4_000_000)
    with pytest.raises(ConfigError, match=r"needs at least [\d,.]+ GiB .* but cpu has [\d,.]+ GiB free"):
        check_fits(huge, torch.device("cpu"))
    check_fits(GPT2ScratchConfig.from_preset("cpu-nano"), torch.device("cpu"))
    assert TRAINING_BYTES_PER_PARAMETER == 4 + 4 + 8  # fp32 weights, gradients, AdamW's two moments
    started = time.monotonic()
    with pytest.raises(ConfigError, match="needs at least"):  # the trainer asks before building the model
        train_in_process(nano_args(data_dir, tmp_path / "huge", n_embd=4_000_000))
    assert time.monotonic() - started < 60 and not (tmp_path / "huge" / "checkpoints").exists()


def test_resuming_from_the_hub_offline_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(remote.RemoteError, match="needs the Hub, but offline mode is on"):
        remote.download_url("hf://someone/run/checkpoints/step_000004", tmp_path / "checkpoints", tmp_path)
    assert time.monotonic() - started < 5 and not (tmp_path / "checkpoints").exists()


def test_a_benchmark_shape_of_zero_is_one_line(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_train

    with pytest.raises(UserError, match="--seq-len must be >= 1, got 0"):
        bench_train.resolve(bench_train.parse_args(["--seq-len", "0", "--device", "cpu"]))
    with pytest.raises(UserError, match="--seq-len 4096 is longer than the 1024 positions"):
        bench_train.resolve(bench_train.parse_args(["--seq-len", "4096", "--device", "cpu", "--preset", "cpu-mini"]))
    with pytest.raises(UserError, match="--preset 'gpt5' is not one of"):
        bench_train.resolve(bench_train.parse_args(["--preset", "gpt5", "--device", "cpu"]))
    assert "bench_train" in sys.modules
