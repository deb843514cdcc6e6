"""A stream as a `--data_mix` source (`stream:SOURCE`): its sequences are those `--data_stream SOURCE` reads,
in order, on any number of processes; the weights are realised; its epochs are logged; a SIGKILLed run
resumed with `--resume auto` logs the same losses; a bad stream source is one line before training."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from accelerate.state import AcceleratorState
from test_data_mix import token_folder
from test_data_stream import documents, write_jsonl
from trainer_runs import kill_at_step, metric, nano_args, records, train_in_process

import train_accelerate as ta
from data_prep.mixture import parse_mix
from data_prep.shards import DataPrepError
from gpt2_scratch.export_gpt2 import run_manifest
from gpt2_scratch.training.checkpoints import latest_checkpoint
from gpt2_scratch.training.config import ConfigError, parse_config
from gpt2_scratch.training.data import build_loader, prepare_data, source_config, val_sources
from gpt2_scratch.training.verify import loader_position_valid, state_problems
from gpt2_scratch.user_errors import run_command

# The killed runs are processes on one thread (trainer_runs.ONE_THREAD): the in-process runs they are
# compared with must be too, or the sums of a step can differ in the last bit
pytestmark = pytest.mark.usefixtures("one_thread")

SEQ = 32
FOLDER_FIRST = 50_000  # the folder source's tokens are all in [50000, 50100): none of the stream's text gives one
SHAPE = ["--model", "cpu-nano", "--seq_len", str(SEQ), "--micro_batch_size", "4", "--total_batch_size", "256"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A shard folder of synthetic tokens and a small JSONL file to stream (about 60 training sequences)."""
    root = tmp_path_factory.mktemp("mixstream")
    folder = token_folder(root / "shards", FOLDER_FIRST, 20_000)
    texts = root / "texts.jsonl"
    write_jsonl(texts, documents(60, seed=3))
    return folder, texts


def mix_config(mix: str, out, **fields):
    extra = [item for name, value in fields.items() for item in (f"--{name}", str(value))]
    return parse_config(["--data_mix", mix, *SHAPE, "--val_tokens", "512", "--out_dir", str(out), *extra])


def loader_of(config, manifest, rank: int = 0, processes: int = 1):
    return build_loader(config, SimpleNamespace(process_index=rank, num_processes=processes), manifest)


def rows_of(loader, batches: int) -> list[np.ndarray]:
    rows = []
    for _ in range(batches):
        x, y = loader.next_batch()
        rows += [np.concatenate([xi.numpy(), yi[-1:].numpy()]) for xi, yi in zip(x, y, strict=True)]
    return rows


def same_rows(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def two_process_rows(config, manifest, steps: int, state: dict | None = None) -> list[np.ndarray]:
    """`steps` steps of 8 sequences read by ranks 0 and 1 of 2 (one micro-batch of 4 each per step, from
    `state`), in the order one process reads them."""
    ranks = [loader_of(config, manifest, rank, 2) for rank in range(2)]
    try:
        for loader in ranks if state else []:
            loader.load_state_dict(state)
        rows = [rows_of(loader, steps) for loader in ranks]
    finally:
        for loader in ranks:
            loader.close()
    return [row for step in range(steps) for r in range(2) for row in rows[r][4 * step : 4 * step + 4]]


def from_folder(row: np.ndarray) -> bool:
    return bool(((row >= FOLDER_FIRST) & (row < FOLDER_FIRST + 100)).all())


def test_a_stream_source_gives_the_sequences_of_data_stream_alone_and_the_weights(sources, tmp_path):
    folder, texts = sources
    mix = f"{folder}:0.7,stream:{texts}:0.3"
    config = mix_config(mix, tmp_path / "run", data_workers=0)
    manifest = prepare_data(config)
    loader = loader_of(config, manifest)
    try:
        rows = rows_of(loader, 2 * 10)  # 10 steps of 8 sequences
        state = json.loads(json.dumps(loader.state_dict()))  # as a checkpoint keeps it
        after = rows_of(loader, 4)
    finally:
        loader.close()
    streamed = [row for row in rows if not from_folder(row)]
    assert len(streamed) == 24  # 0.3 of 80, to the sequence: the allocation keeps each source within one

    alone = parse_config(["--data_stream", str(texts), *SHAPE, "--val_tokens", "512", "--out_dir", str(tmp_path / "a")])
    plain = loader_of(alone, prepare_data(alone))
    try:
        expected = rows_of(plain, 6)  # batches of 4: the stream's first 24 training sequences, in order
    finally:
        plain.close()
    assert same_rows(streamed, expected)
    assert not any(from_folder(row) for row in expected)

    # validation: the stream's first val_tokens, measured as a source of its own (val/loss/stream:texts.jsonl)
    labels = [label for label, _, _ in val_sources(config, manifest)]
    assert labels == ["shards", "stream:texts.jsonl"]
    # export_gpt2's card reads what the stream is from the run's data cache: its files, not a folder's name
    for exported in (run_manifest(config)["mixture"][1]["manifest"], run_manifest(alone)):
        assert exported["source"]["kind"] == "files" and exported["source"]["files"][0]["path"] == str(texts)
    assert state["sources"][1]["state"]["kind"] == "stream" and state["sources"][1]["state"]["world_size"] == 1
    damaged = json.loads(json.dumps(state))  # verify.py judges the stream's position inside the mixture's
    damaged["sources"][1]["state"]["ranks"][0]["offset"] = -1
    assert loader_position_valid(state) and not loader_position_valid(damaged)

    resumed = loader_of(config, prepare_data(config))
    try:
        resumed.load_state_dict(state)
        assert same_rows(rows_of(resumed, 4), after)
    finally:
        resumed.close()
    # two processes: each rank reads the whole stream and keeps its own sequences; together, the same steps.
    # The stream's position is a single reader's, so a resume may change the number of processes too.
    assert same_rows(two_process_rows(config, manifest, 10), rows)
    assert same_rows(two_process_rows(config, manifest, 2, state), after)


def test_a_stream_source_that_runs_out_starts_its_next_epoch_and_says_so(sources, tmp_path):
    folder, texts = sources
    config = mix_config(f"{folder}:0.5,stream:{texts}:0.5", tmp_path / "run", data_workers=0)
    loader = loader_of(config, prepare_data(config))
    try:
        events, epochs = [], []
        for _ in range(40):  # 20 steps of 4 streamed sequences: more than the stream holds
            loader.next_batch()
            events += loader.take_events()
            epochs.append(loader.metrics()["data/epoch/stream:texts.jsonl"])
    finally:
        loader.close()
    assert len(events) == 1 and events[0].startswith(f"data source stream:{texts} ran out: epoch 1 starts at step ")
    step = int(events[0].rsplit(" ", 1)[1])
    assert epochs == [0] * (2 * step - 2) + [1] * (40 - 2 * step + 2)


def test_sigkill_then_resume_auto_logs_the_same_losses_with_a_stream_source(data_dir, tmp_path):
    texts = write_jsonl(tmp_path / "small.jsonl", documents(25, seed=3))  # about 18 training sequences
    mix = f"{data_dir}:0.6,stream:{texts}:0.4"
    run = dict(max_steps=12, stop_at_step=8, save_interval=2, eval_interval=4, num_samples=0, val_tokens=512)

    def argv(out, **more):
        args = nano_args(data_dir, out, **{**run, **more})
        return [a for a in args if a != "--data_dir" and a != str(data_dir)] + ["--data_mix", mix]

    reference, out = tmp_path / "reference", tmp_path / "killed"
    train_in_process(argv(reference))
    kill_at_step(argv(out), out, 3)
    newest = latest_checkpoint(out / "checkpoints")
    assert newest is not None and int(newest.name[5:]) < 8 and state_problems(newest) == []
    train_in_process(argv(out, resume="auto"))

    assert sorted(metric(out, "train/loss")) == list(range(1, 9))
    stream = "stream:small.jsonl"
    for name in ("train/loss", "val/loss", f"val/loss/{stream}", f"data/tokens/{stream}", f"data/epoch/{stream}"):
        assert metric(out, name) == metric(reference, name), name
    epochs = metric(out, f"data/epoch/{stream}")
    assert epochs[int(newest.name[5:])] == 0 and epochs[8] == 1  # it ran out after the resume
    last = records(out)[-2]  # the last training record (the last is the evaluation's)
    assert last[f"data/tokens/{stream}"] + last[f"data/tokens/{data_dir.name}"] == last["tokens"]
    info = json.loads((out / "run_info.json").read_text())
    assert info["data"]["sources"][1]["data_stream"] == str(texts)
    card = (out / "hf" / "README.md").read_text()
    assert "40.0% local files `small.jsonl`" in card and "stream:small.jsonl:0.4` |" in card


def test_a_stream_source_reads_the_runs_stream_settings_and_a_val_split_only_for_a_hub_dataset(sources):
    folder, texts = sources
    mix = f"{folder}:1,stream:{texts}:1,stream:me/corpus:1,stream:builtin:1"
    fields = ["--data_stream_config", "c", "--data_stream_split", "s", "--data_stream_val_split", "v"]
    config = parse_config(["--data_mix", mix, "--data_stream_text_column", "body", *fields])
    read = [source_config(config, source) for source, _ in parse_mix(mix)]
    assert [(c.data_dir, c.data_stream, c.data_stream_val_split) for c in read] == [
        (str(folder), None, "v"),  # a folder's config keeps it: it has no effect there
        ("data/builtin", str(texts), None),
        ("data/builtin", "me/corpus", "v"),
        ("data/builtin", "builtin", None),
    ]
    assert {(c.data_stream_config, c.data_stream_split, c.data_stream_text_column, c.data_mix) for c in read} == {
        ("c", "s", "body", None)
    }


@pytest.mark.parametrize(
    ("mix", "message"),
    [
        ("data/a:0.5,stream::0.5", "'stream::0.5' names no stream"),
        ("data/a:0.5,stream:", "'stream:' names no stream"),
        ("data/a:0.5,stream:x.jsonl", "'stream:x.jsonl' has no weight"),
        ("stream:x.jsonl:0.5,stream:./x.jsonl:0.5", "stream:./x.jsonl is named twice"),
        ("stream:builtin:0.5,data/builtin:0.5", None),  # a stream of a name and a folder of it: two sources
    ],
)
def test_a_bad_stream_source_is_one_line(mix, message):
    if message is None:
        assert [source for source, _ in parse_mix(mix)] == ["stream:builtin", "data/builtin"]
        return
    with pytest.raises(ConfigError, match="data_mix: " + message):
        parse_config(["--data_mix", mix])


def test_a_stream_source_that_yields_no_text_is_one_error_line_before_training(sources, tmp_path, capsys):
    folder, _ = sources
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n{"text": ""}\n')
    with pytest.raises(DataPrepError, match="yields no text"):
        prepare_data(mix_config(f"{folder}:0.5,stream:{empty}:0.5", tmp_path / "run"))
    argv = ["--data_mix", f"{folder}:0.5,stream:{empty}:0.5", *SHAPE, "--out_dir", str(tmp_path / "cli")]
    with pytest.raises(SystemExit) as exited:
        try:
            run_command(ta.command, argv)
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and lines[-1].startswith("error: ") and "empty.jsonl" in lines[-1]
    assert "yields no text" in lines[-1] and not (tmp_path / "cli" / "log.jsonl").exists()
