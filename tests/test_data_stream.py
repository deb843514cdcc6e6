"""Training straight from a text source (`--data_stream`, data_prep/stream.py): the streamed tokens are the
ones `python -m data_prep` writes for the same files, on any number of tokenizing workers; ranks read
disjoint documents; a position resumes exactly without tokenizing the stream again; a SIGKILLed run
resumed with `--resume auto` logs the same losses; bad sources are one line before training."""

import json
import random
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from accelerate.state import AcceleratorState
from stores import free_port, hub_mirror  # noqa: F401  (fixtures)
from trainer_runs import ROOT, kill_at_step, metric, nano_args, run_cli, train_in_process

import data_prep.stream as stream
import train_accelerate as ta
from data_prep import prepare
from data_prep.shards import DataPrepError, load_tokens, read_manifest
from data_prep.stream import StreamLoader, StreamSpec, head_tokens, stream_state_problem
from data_prep.tokenizer import EOT_ID, get_encoding
from gpt2_scratch.training.checkpoints import latest_checkpoint
from gpt2_scratch.training.config import ConfigError, parse_config
from gpt2_scratch.training.data import prepare_data
from gpt2_scratch.training.verify import state_problems
from gpt2_scratch.user_errors import run_command

# The killed runs are processes on one thread (trainer_runs.ONE_THREAD): the in-process runs they are
# compared with must be too, or the sums of a step can differ in the last bit
pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "the quick brown fox jumps over a lazy dog école naïve 😀 , . ! ? \n 1999".split(" ")
SEQ_LEN = 16


def documents(n: int, seed: int = 0) -> list[str]:
    """Texts of 0 to 80 words (an empty one among them), with non-ASCII characters and newlines."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 80))) for _ in range(n)]


def write_jsonl(path, texts, column: str = "text"):
    path.write_text("".join(json.dumps({column: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def stream_tokens(loader: StreamLoader, batches: int) -> np.ndarray:
    """The tokens `batches` batches cover: the windows overlap by one token (stride seq_len)."""
    rows = []
    for _ in range(batches):
        x, y = loader.next_batch()
        rows += [row.numpy() for row in x]
    return np.concatenate([*rows, y[-1, -1:].numpy()])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two JSONL files, and what `python -m data_prep` makes of them: the val shard and the train tokens."""
    folder = tmp_path_factory.mktemp("corpus")
    texts = documents(500)
    write_jsonl(folder / "a.jsonl", texts[:300])
    write_jsonl(folder / "b.jsonl", texts[300:])
    out = prepare(folder / "shards", files=[str(folder / "*.jsonl")], shard_tokens=4000, val_tokens=1000, num_proc=1)
    manifest = read_manifest(out)
    val = load_tokens(out / manifest["shards"][0]["file"])
    train = np.concatenate([load_tokens(out / entry["file"]) for entry in manifest["shards"][1:]])
    return folder, texts, val, train


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_tokens_are_the_ones_data_prep_writes(corpus, workers):
    folder, _, val, train = corpus
    spec = StreamSpec(str(folder / "*.jsonl"))
    head, start, _ = head_tokens(spec, 1000, block_docs=16)
    assert np.array_equal(head, val)
    loader = StreamLoader(spec, start, batch_size=3, seq_len=SEQ_LEN, workers=workers, block_docs=16)
    try:
        got = stream_tokens(loader, (len(train) - 1) // SEQ_LEN // 3)
    finally:
        loader.close()
    assert len(got) > len(train) - 3 * SEQ_LEN - 1
    assert np.array_equal(got, train[: len(got)])


def test_parquet_streams_the_same_tokens_as_tiktoken(tmp_path):
    texts = documents(120, seed=1)
    pq.write_table(pa.table({"body": texts}), tmp_path / "d.parquet", row_group_size=25)
    spec = StreamSpec(str(tmp_path / "d.parquet"), text_column="body")
    enc = get_encoding()  # the reference: each document tokenized alone, <|endoftext|> before it
    reference = np.array([t for text in texts for t in [EOT_ID, *enc.encode_ordinary(text)]])
    head, start, _ = head_tokens(spec, 100, block_docs=8)
    loader = StreamLoader(spec, start, batch_size=2, seq_len=SEQ_LEN, workers=0, block_docs=8)
    got = stream_tokens(loader, 20)
    loader.close()
    assert np.array_equal(np.concatenate([head, got]), reference[: 100 + len(got)])


def test_a_parquet_position_resumes_at_its_row_group_without_reading_the_ones_before(tmp_path):
    """A Parquet stream is read one row group at a time, so that a resume starts at most one row group
    before its position: with the row groups before that destroyed (a reader from the start of the file
    fails), the resumed stream still gives exactly the tokens of the uninterrupted one."""
    texts = documents(240, seed=2)
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=20, compression="NONE", use_dictionary=False)
    spec = StreamSpec(str(path))
    start = {"block_doc": 0, "source_state": None, "doc": 0, "offset": 0, "row_groups": True}
    first = StreamLoader(spec, start, batch_size=8, seq_len=SEQ_LEN, workers=0, block_docs=8)
    stream_tokens(first, 40)
    state = json.loads(json.dumps(first.state_dict()))  # as train_state.json holds it
    expected = stream_tokens(first, 20)
    first.close()
    position = state["ranks"][0]
    assert position["row_groups"] is True and position["block_doc"] >= 80, position

    metadata = pq.ParquetFile(path).metadata
    # The data pages of the row groups before the position's, overwritten, but for the one just before it:
    # datasets resumes from the start of the row group its batch began in.
    with open(path, "r+b") as f:
        for group in range(position["block_doc"] // 20 - 1):
            chunk = metadata.row_group(group).column(0)
            f.seek(chunk.data_page_offset)
            f.write(b"\xff" * chunk.total_compressed_size)
    from_start = StreamLoader(spec, start, batch_size=8, seq_len=SEQ_LEN, workers=0, block_docs=8)
    with pytest.raises(Exception):  # noqa: B017 (pyarrow's error for a damaged page, whichever it is)
        stream_tokens(from_start, 1)
    from_start.close()
    resumed = StreamLoader(spec, start, batch_size=8, seq_len=SEQ_LEN, workers=0, block_docs=8)
    resumed.load_state_dict(state)
    assert np.array_equal(stream_tokens(resumed, 20), expected)
    resumed.close()


def test_a_parquet_source_of_many_files_is_read_per_file(tmp_path):
    """Resharding reads every file's footer at each open (each resume and epoch): up to
    ROW_GROUP_MAX_FILES files a stream is read per row group, beyond that per file, as before."""
    for i in range(stream.ROW_GROUP_MAX_FILES + 1):
        pq.write_table(
            pa.table({"text": [f"a {i}", f"b {i}", f"c {i}"]}), tmp_path / f"{i:03d}.parquet", row_group_size=1
        )
    few = StreamSpec(",".join(str(tmp_path / f"{i:03d}.parquet") for i in range(2)))
    assert few.open().dataset.num_shards == 6 and few.open(row_groups=False).dataset.num_shards == 2
    many = StreamSpec(str(tmp_path / "*.parquet"))
    assert many.open().dataset.num_shards == stream.ROW_GROUP_MAX_FILES + 1


def test_ranks_read_disjoint_documents(corpus):
    folder, texts, _, _ = corpus
    spec = StreamSpec(str(folder / "*.jsonl"))
    start = {"block_doc": 0, "source_state": None, "doc": 0, "offset": 0}
    enc = get_encoding()
    for rank in (0, 1):
        loader = StreamLoader(spec, start, batch_size=2, seq_len=SEQ_LEN, rank=rank, world_size=2, workers=0)
        got = stream_tokens(loader, 30)
        loader.close()
        mine = [t for text in texts[rank::2] for t in [EOT_ID, *enc.encode_ordinary(text)]]
        assert np.array_equal(got, mine[: len(got)])


def test_a_position_resumes_exactly_without_tokenizing_from_the_start(corpus, monkeypatch):
    folder, texts, _, _ = corpus
    spec = StreamSpec(str(folder / "*.jsonl"))
    _, start, _ = head_tokens(spec, 1000, block_docs=16)
    first = StreamLoader(spec, start, batch_size=3, seq_len=SEQ_LEN, workers=0, block_docs=16)
    stream_tokens(first, 320)  # into the second file
    state = json.loads(json.dumps(first.state_dict()))  # as train_state.json holds it
    expected = stream_tokens(first, 250)  # on past the end of the stream: the next epoch
    assert first.position["epoch"] == 1
    assert state["ranks"][0]["doc"] > 300 and state["ranks"][0]["source_state"] is not None
    first.close()  # its reader thread stops tokenizing ahead

    tokenized = []
    encode = stream.encode_documents
    monkeypatch.setattr(stream, "encode_documents", lambda texts: tokenized.append(texts) or encode(texts))
    resumed = StreamLoader(spec, start, batch_size=3, seq_len=SEQ_LEN, workers=0, block_docs=16)
    resumed.load_state_dict(state)
    assert np.array_equal(stream_tokens(resumed, 250), expected)
    resumed.close()
    doc = state["ranks"][0]["doc"]
    assert tokenized[0] == texts[doc : doc + len(tokenized[0])]  # from the position's document, not the start

    other = StreamLoader(spec, start, batch_size=3, seq_len=SEQ_LEN + 1, workers=0, block_docs=16)
    with pytest.raises(ValueError, match="seq_len 16, this run 17"):
        other.load_state_dict(state)
    other.close()
    two = StreamLoader(spec, start, batch_size=3, seq_len=SEQ_LEN, rank=0, world_size=2, workers=0, block_docs=16)
    with pytest.raises(ValueError, match="processes 1, this run 2"):
        two.load_state_dict(state)
    two.close()


def test_a_malformed_stream_position_is_named(corpus):
    folder, _, _, _ = corpus
    spec = StreamSpec(str(folder / "*.jsonl"))
    start = {"block_doc": 0, "source_state": None, "doc": 0, "offset": 0}
    loader = StreamLoader(spec, start, batch_size=1, seq_len=8, workers=0)
    good = loader.state_dict()
    loader.close()
    assert stream_state_problem(good) is None
    bad = json.loads(json.dumps(good))
    bad["ranks"][0]["offset"] = -1
    assert "ranks[0].offset -1" in stream_state_problem(bad)
    bad = {**good, "ranks": []}
    assert "ranks is not a list of 1" in stream_state_problem(bad)
    bad = {**good, "ranks": [{**good["ranks"][0], "source_state": "x"}]}
    assert "source_state is not an object" in stream_state_problem(bad)
    bad = {**good, "ranks": [{**good["ranks"][0], "row_groups": "yes"}]}
    assert "ranks[0].row_groups 'yes' is not true or false" in stream_state_problem(bad)
    older = {**good, "ranks": [{k: v for k, v in good["ranks"][0].items() if k != "row_groups"}]}
    assert stream_state_problem(older) is None  # saved before row groups: read per file, as then


def stream_args(source, out, **overrides):
    fields = dict(data_stream=source, val_tokens=2048, data_workers=1, **overrides)
    argv = nano_args("unused", out, **fields)
    at = argv.index("--data_dir")
    return argv[:at] + argv[at + 2 :]


def test_sigkill_then_resume_auto_logs_the_same_losses_from_a_stream(corpus, tmp_path):
    folder, _, _, _ = corpus
    source = str(folder / "*.jsonl")
    common = dict(max_steps=10, stop_at_step=8, save_interval=2, eval_interval=4, num_samples=0)
    train_in_process(stream_args(source, tmp_path / "reference", **common))

    out = tmp_path / "killed"
    kill_at_step(stream_args(source, out, **common), out, 3)
    newest = latest_checkpoint(out / "checkpoints")
    assert newest is not None and int(newest.name[5:]) < 8
    saved = json.loads((newest / "train_state.json").read_text())
    assert saved["loader"]["kind"] == "stream" and state_problems(newest) == []
    damaged = tmp_path / "damaged" / newest.name  # verify.py judges the position's form before a resume
    shutil.copytree(newest, damaged)
    saved["loader"]["ranks"][0]["doc"] = "7"
    (damaged / "train_state.json").write_text(json.dumps(saved))
    assert state_problems(damaged) == ["train_state.json has no valid stream position: ranks[0].doc '7' is not a count"]
    train_in_process(stream_args(source, out, resume="auto", **common))

    reference = tmp_path / "reference"
    assert sorted(metric(out, "train/loss")) == list(range(1, 9))
    assert metric(out, "train/loss") == metric(reference, "train/loss")
    assert metric(out, "val/loss") == metric(reference, "val/loss")

    with pytest.raises(Exception, match="seq_len: 32 -> 16"):  # refused by name, as for shards
        train_in_process(stream_args(source, out, resume="auto", **{**common, "seq_len": 16}))


# -- bad input: one line, exit 2, before training ------------------------------------------------


def stream_config(source, tmp_path, **fields):
    return parse_config(stream_args(source, tmp_path / "run", **fields))


BAD_SOURCES = {
    "no file matches": (None, "data_stream: no file matches"),
    "no documents": (b"", "is empty"),
    "only empty documents": (b'{"text": ""}\n{"text": ""}\n', "yields no text"),
    "no text column": (b'{"body": "hello"}\n', "text column 'text' not found"),
    "a binary file": (bytes(range(256)) * 4, "is not UTF-8 text"),
    "not UTF-8": (b'{"text": "caf\xe9"}\n', "is not UTF-8 text"),
}


@pytest.mark.parametrize("kind", list(BAD_SOURCES))
def test_a_bad_stream_is_one_line_before_training(kind, tmp_path):
    content, message = BAD_SOURCES[kind]
    path = tmp_path / "docs.jsonl"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataPrepError, match=message):
        prepare_data(stream_config(str(path), tmp_path))


def test_a_val_split_of_local_files_is_refused_it_would_validate_on_training_data(tmp_path):
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "a document of local text"}) + "\n")
    config = stream_config(str(tmp_path / "docs.jsonl"), tmp_path, data_stream_val_split="validation")
    with pytest.raises(ConfigError, match="data_stream_val_split 'validation' names a split of a Hub dataset"):
        prepare_data(config)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("val_*.bin"))


def test_a_bad_stream_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "docs.jsonl").write_bytes(bytes(range(256)) * 4)
    argv = stream_args(str(tmp_path / "docs.jsonl"), tmp_path / "run")
    with pytest.raises(SystemExit) as exited:
        try:
            run_command(ta.command, argv)  # the trainer's command line, in this process
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "docs.jsonl is not UTF-8 text" in lines[-1]
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_data_prep_names_a_binary_jsonl(tmp_path):
    """It ended in pyarrow's traceback ("JSON parse error: Invalid value. in row 0")."""
    (tmp_path / "docs.jsonl").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8)
    with pytest.raises(DataPrepError, match=r"docs.jsonl is not UTF-8 text: invalid start byte at byte 136"):
        prepare(tmp_path / "out", files=[str(tmp_path / "docs.jsonl")], num_proc=1)


def test_a_hub_dataset_streams_the_tokens_data_prep_writes(corpus, hub_mirror, tmp_path):  # noqa: F811
    """A real Hub stream: the dataset repository me/streamed on olah (a Hub mirror on 127.0.0.1), read by
    `datasets` through huggingface_hub as from huggingface.co."""
    folder, _, _, _ = corpus
    (tmp_path / "repo").mkdir()
    shutil.copy(folder / "a.jsonl", tmp_path / "repo" / "train.jsonl")
    commit = hub_mirror.publish("streamed", tmp_path / "repo")
    out = tmp_path / "run"
    argv = stream_args("me/streamed", out, max_steps=3, eval_interval=3, save_interval=3, num_samples=0)
    done = run_cli(argv, env={**hub_mirror.env, "HF_DATASETS_OFFLINE": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "run_info.json").read_text())["data"]["revision"] == commit

    reference = prepare(tmp_path / "shards", files=[str(folder / "a.jsonl")], val_tokens=2048, num_proc=1)
    (val,) = (out / "data_cache").glob("stream-*/val_000000.bin")
    assert np.array_equal(load_tokens(val), load_tokens(reference / "val_000000.bin"))


def test_a_hub_stream_offline_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = stream_config("HuggingFaceFW/fineweb-edu", tmp_path, data_stream_config="sample-10BT")
    with pytest.raises(DataPrepError, match="cannot stream HuggingFaceFW/fineweb-edu: HF_HUB_OFFLINE"):
        prepare_data(config)


def test_data_dir_and_data_stream_together_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="command line: give data_dir .* or data_stream, not both"):
        parse_config(["--data_dir", str(tmp_path), "--data_stream", "builtin"])
    preset = ROOT / "configs" / "gpt2-124m-fineweb-edu.yaml"  # its data_dir gives way to a stream
    assert parse_config(["--config", str(preset), "--data_stream", "builtin"]).data_stream == "builtin"
