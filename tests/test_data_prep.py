"""`python -m data_prep`: the shards are exactly the document stream, and every failure is clear.

The reference stream is built independently: documents read with `json`/`pyarrow`/`open`, each
tokenized with tiktoken's `encode_ordinary` and preceded by 50256.
"""

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep import DataPrepError, ShardError, load_tokens, prepare, prepare_builtin, read_manifest, verify_shards
from data_prep.sources import first_invalid_utf8, shared_corpus
from data_prep.tokenizer import EOT_ID, get_encoding

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = shared_corpus("tinyshakespeare.txt")

DOCS = [
    "Hello world. This is the first document.",
    "",  # an empty document still contributes its end-of-text token
    "Ünïcödé, emoji 🙂 and CJK 漢字 survive byte-level BPE.\n\nA second paragraph.",
    " leading space and trailing newline\n",
    *[f"Document {i}: " + "the quick brown fox jumps over the lazy dog " * (i % 7 + 1) for i in range(40)],
]


def reference_stream(texts: list[str]) -> np.ndarray:
    enc = get_encoding()
    return np.array([t for text in texts for t in [EOT_ID, *enc.encode_ordinary(text)]], dtype=np.uint16)


def write_jsonl(path: Path, texts: list[str], column: str = "text") -> Path:
    path.write_text("".join(json.dumps({column: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def concatenated(out_dir: Path) -> np.ndarray:
    manifest = read_manifest(out_dir)
    return np.concatenate([load_tokens(out_dir / e["file"]) for e in manifest["shards"]])


def file_bytes(out_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir())}


@pytest.fixture
def jsonl(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "docs.jsonl", DOCS)


def test_shards_are_the_exact_document_stream(jsonl: Path, tmp_path: Path) -> None:
    out = prepare(tmp_path / "out", files=[str(jsonl)], shard_tokens=50, val_tokens=30, num_proc=1, batch_docs=3)
    expected = reference_stream(DOCS)
    np.testing.assert_array_equal(concatenated(out), expected)

    manifest = read_manifest(out)
    shards = manifest["shards"]
    assert manifest["complete"] and manifest["tokens"] == len(expected) and manifest["documents"] == len(DOCS)
    assert [e["split"] for e in shards] == ["val"] + ["train"] * (len(shards) - 1)
    assert [e["tokens"] for e in shards[:-1]] == [30] + [50] * (len(shards) - 2)
    assert 0 < shards[-1]["tokens"] <= 50
    # Each entry records the document and offset of its first token, and the file's sha256.
    doc_starts = np.cumsum([0] + [len(reference_stream([d])) for d in DOCS])
    stream_pos = 0
    for entry in shards:
        path = out / entry["file"]
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert path.stat().st_size == 1024 + 2 * entry["tokens"]
        assert doc_starts[entry["first_doc"]] + entry["first_doc_offset"] == stream_pos
        stream_pos += entry["tokens"]
    assert not list(out.glob("*.tmp"))


def test_worker_processes_give_identical_files(jsonl: Path, tmp_path: Path) -> None:
    one = prepare(tmp_path / "one", files=[str(jsonl)], shard_tokens=64, num_proc=1)
    two = prepare(tmp_path / "two", files=[str(jsonl)], shard_tokens=64, num_proc=2, batch_docs=2)
    assert file_bytes(one) == file_bytes(two)


# `python -m data_prep` with its workers started by `spawn`, as on macOS and Windows: the start method is
# forced (and recorded, to be sure it was used) and the command run as a user runs it.
SPAWNED_CLI = """
import importlib, multiprocessing, runpy, sys
prepare_module = importlib.import_module("data_prep.prepare")  # the package's `prepare` is the function
used = []
get_context = multiprocessing.get_context
multiprocessing.get_context = lambda method=None: used.append(method) or get_context(method)
prepare_module.start_method = lambda: "spawn"
sys.argv = ["data_prep", *sys.argv[1:]]
try:
    runpy.run_module("data_prep", run_name="__main__", alter_sys=True)
finally:
    assert used == ["spawn"], used
"""


def test_spawned_workers_give_the_same_shards_as_on_linux(jsonl: Path, tmp_path: Path, monkeypatch) -> None:
    from data_prep.prepare import start_method

    for platform, method in (("linux", "fork"), ("darwin", "spawn"), ("win32", "spawn")):
        monkeypatch.setattr(sys, "platform", platform)
        assert start_method() == method
    monkeypatch.undo()
    one = prepare(tmp_path / "one", files=[str(jsonl)], shard_tokens=64, num_proc=1)
    args = ["--files", str(jsonl), "--out_dir", str(tmp_path / "spawn"), "--shard_tokens", "64", "--no_progress"]
    args += ["--num_proc", "2", "--batch_docs", "2"]
    done = subprocess.run([sys.executable, "-c", SPAWNED_CLI, *args], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert file_bytes(tmp_path / "spawn") == file_bytes(one)


def test_windows_style_globs_reach_glob_as_given(jsonl: Path, tmp_path: Path) -> None:
    """On Windows `glob` takes both separators; here `\\` is part of a name: a pattern written the Windows way
    is quoted as given (not with doubled backslashes) and the error says how to write it here."""
    from data_prep.sources import resolve_files, separator_hint

    windows_style = str(tmp_path / "*.jsonl").replace("/", "\\")
    with pytest.raises(DataPrepError) as err:
        resolve_files([windows_style])
    forward = windows_style.replace("\\", "/")
    assert f"no file matches '{windows_style}'" in str(err.value) and f"write '{forward}'" in str(err.value)
    assert resolve_files([forward]) == [jsonl]
    assert separator_hint(windows_style, sep="\\") == "" and separator_hint(forward) == ""


def test_text_and_parquet_sources(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text(DOCS[2])
    (tmp_path / "a.txt").write_text(DOCS[0])
    out = prepare(tmp_path / "txt", files=[str(tmp_path / "*.txt")], shard_tokens=8, num_proc=1)
    np.testing.assert_array_equal(concatenated(out), reference_stream([DOCS[0], DOCS[2]]))  # sorted glob

    pq.write_table(pa.table({"body": DOCS, "n": list(range(len(DOCS)))}), tmp_path / "d.parquet")
    out = prepare(tmp_path / "pq", files=[str(tmp_path / "d.parquet")], text_column="body", shard_tokens=100)
    np.testing.assert_array_equal(concatenated(out), reference_stream(DOCS))


def test_rerun_skips_complete_output_and_repairs_damage(jsonl: Path, tmp_path: Path) -> None:
    out = prepare(tmp_path / "out", files=[str(jsonl)], shard_tokens=40, num_proc=1)
    original = file_bytes(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    prepare(out, files=[str(jsonl)], shard_tokens=40, num_proc=1)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes

    shards = read_manifest(out)["shards"]
    (out / shards[2]["file"]).unlink()
    damaged = out / shards[4]["file"]
    damaged.write_bytes(damaged.read_bytes()[:-2] + b"\x00\x01")
    prepare(out, files=[str(jsonl)], shard_tokens=40, num_proc=1)
    assert file_bytes(out) == original


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {root!r})
    import data_prep.shards as shards
    from data_prep import prepare

    real_fsync, calls = os.fsync, [0]

    def fsync_then_die(fd):
        calls[0] += 1
        if calls[0] == 3:  # the third shard's bytes are written to its temporary file
            os.kill(os.getpid(), signal.SIGKILL)
        real_fsync(fd)

    shards.os.fsync = fsync_then_die
    prepare({out!r}, files=[{src!r}], shard_tokens=40, num_proc=1)
    """
)


def test_killed_write_leaves_no_complete_looking_shard(jsonl: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = KILLER.format(root=str(ROOT), out=str(out), src=str(jsonl))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert result.returncode == -9, result.stderr.decode()

    manifest = read_manifest(out)
    assert not manifest["complete"]
    assert [e["file"] for e in manifest["shards"]] == ["val_000000.bin", "train_000001.bin"]
    assert not (out / "train_000002.bin").exists()
    assert (out / "train_000002.bin.tmp").exists()
    with pytest.raises(DataPrepError, match="incomplete"):
        from data_prep import ShardLoader

        ShardLoader(out, batch_size=1, seq_len=4)

    prepare(out, files=[str(jsonl)], shard_tokens=40, num_proc=1)
    clean = prepare(tmp_path / "clean", files=[str(jsonl)], shard_tokens=40, num_proc=1)
    assert file_bytes(out) == file_bytes(clean)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataPrepError, match="nope-\\*.jsonl"):
        prepare(tmp_path / "out", files=[str(tmp_path / "nope-*.jsonl")])


def test_missing_text_column(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS, column="content")
    with pytest.raises(
        DataPrepError, match=r"text column 'text' not found in .*docs.jsonl; columns: \['content', 'id'\]"
    ):
        prepare(tmp_path / "out", files=[str(src)], num_proc=1)


def test_empty_source(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataPrepError, match="empty.jsonl is empty"):
        prepare(tmp_path / "out", files=[str(tmp_path / "empty.jsonl")], num_proc=1)
    write_jsonl(tmp_path / "docs.jsonl", DOCS[:1])
    with pytest.raises(DataPrepError, match="all in the val shard"):
        prepare(tmp_path / "out2", files=[str(tmp_path / "docs.jsonl")], shard_tokens=1000, num_proc=1)


# Documents with bytes that are not UTF-8: Latin-1 é, a lone 0xff 0xfe, a cut 3-byte character (€ without its end).
RAW_DOCS = [b"caf\xe9 au lait, " * 3, b"plain text " * 5, b"\xff\xfe odd start " * 3, b"price 5 \xe2\x82 only"]


def write_raw(tmp_path: Path, kind: str) -> list[str]:
    """RAW_DOCS as one .txt file per document (sorted names), or as one .jsonl file; the --files to pass."""
    if kind == "txt":
        for i, raw in enumerate(RAW_DOCS):
            (tmp_path / f"doc{i}.txt").write_bytes(raw)
        return [str(tmp_path / "doc*.txt")]
    (tmp_path / "docs.jsonl").write_bytes(b"".join(b'{"text": "' + raw + b'"}\n' for raw in RAW_DOCS))
    return [str(tmp_path / "docs.jsonl")]


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_bytes_that_are_not_utf8_are_one_line_naming_the_file_and_offset(kind: str, tmp_path: Path) -> None:
    files = write_raw(tmp_path, kind)
    path = tmp_path / ("doc0.txt" if kind == "txt" else "docs.jsonl")
    offset = path.read_bytes().index(b"\xe9")
    message = rf"{re.escape(str(path))} is not UTF-8 text: invalid continuation byte at byte {offset}; "
    with pytest.raises(DataPrepError, match=message + ".*--encoding_errors replace"):
        prepare(tmp_path / "out", files=files, shard_tokens=8, num_proc=1)
    done = subprocess.run(
        [sys.executable, "-m", "data_prep", "--files", *files, "--out_dir", str(tmp_path / "cli"), "--no_progress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and done.stderr.startswith("error: ") and re.search(message, done.stderr)
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_the_offset_of_the_first_bad_byte_is_the_files_whatever_the_block(tmp_path: Path) -> None:
    content = "ok é € 🙂 ".encode() * 3 + b"\xe2\x82 cut" + "🙂".encode()
    (tmp_path / "f.txt").write_bytes(content)
    with pytest.raises(UnicodeDecodeError) as whole:
        content.decode("utf-8")  # the reference: Python's decoder over the whole file at once
    for block in range(1, 12):  # blocks that cut characters anywhere
        assert first_invalid_utf8(tmp_path / "f.txt", block=block) == (whole.value.start, whole.value.reason)
    (tmp_path / "g.txt").write_bytes(content[: whole.value.start])
    assert first_invalid_utf8(tmp_path / "g.txt", block=5) is None


@pytest.mark.parametrize("errors", ["replace", "ignore"])
@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_encoding_errors_replace_and_ignore_give_the_tokens_of_the_text_decoded_so(
    kind: str, errors: str, tmp_path: Path
) -> None:
    files = write_raw(tmp_path, kind)
    out = prepare(tmp_path / "out", files=files, encoding_errors=errors, shard_tokens=8, num_proc=1)
    expected = reference_stream([raw.decode("utf-8", errors=errors) for raw in RAW_DOCS])
    np.testing.assert_array_equal(concatenated(out), expected)
    assert read_manifest(out)["source"]["encoding_errors"] == errors  # other text: a re-run must say so


def test_all_tokens_in_the_val_shard_removes_what_it_wrote_so_the_advised_rerun_works(tmp_path: Path) -> None:
    docs = write_jsonl(tmp_path / "docs.jsonl", DOCS[:3])
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    with pytest.raises(DataPrepError, match="lower --val_tokens"):
        prepare(out, files=[str(docs)], shard_tokens=1000, num_proc=1)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]  # no manifest.json, no val shard; the user's file kept
    prepare(out, files=[str(docs)], shard_tokens=1000, val_tokens=16, num_proc=1)  # the re-run the message advises
    np.testing.assert_array_equal(concatenated(out), reference_stream(DOCS[:3]))
    with pytest.raises(DataPrepError, match="lower --val_tokens"):
        prepare(tmp_path / "new", files=[str(docs)], shard_tokens=1000, num_proc=1)
    assert not (tmp_path / "new").exists()  # a folder it made, left empty: removed too


def test_truncated_and_bad_header_and_hash_mismatch(jsonl: Path, tmp_path: Path) -> None:
    out = prepare(tmp_path / "out", files=[str(jsonl)], shard_tokens=100, num_proc=1)
    shards = read_manifest(out)["shards"]
    assert verify_shards(out) == {"val": 100, "train": sum(e["tokens"] for e in shards[1:])}

    truncated = out / shards[1]["file"]
    truncated.write_bytes(truncated.read_bytes()[:-3])
    with pytest.raises(ShardError, match=f"{truncated.name}: truncated, header says 100 tokens"):
        load_tokens(truncated)
    with pytest.raises(ShardError, match="truncated header"):
        truncated.write_bytes(b"\x00" * 10)
        load_tokens(truncated)

    bad = out / shards[2]["file"]
    data = bytearray(bad.read_bytes())
    data[0:4] = np.int32(12345).tobytes()
    bad.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"{bad.name}: bad header, magic number 12345, expected 20240520"):
        load_tokens(bad)

    changed = out / shards[0]["file"]
    data = bytearray(changed.read_bytes())
    data[-1] ^= 0xFF
    changed.write_bytes(bytes(data))
    np.testing.assert_array_equal(load_tokens(changed)[:-1], reference_stream(DOCS)[:99])  # header still fine
    with pytest.raises(ShardError, match=f"{changed.name}: sha256 [0-9a-f]+ does not match manifest.json"):
        verify_shards(out)


def test_other_source_is_refused_unless_overwrite(jsonl: Path, tmp_path: Path) -> None:
    out = prepare(tmp_path / "out", files=[str(jsonl)], shard_tokens=100, num_proc=1)
    with pytest.raises(DataPrepError, match="different source or layout \\(shard_tokens: 100 -> 60\\)"):
        prepare(out, files=[str(jsonl)], shard_tokens=60, num_proc=1)
    prepare(out, files=[str(jsonl)], shard_tokens=60, num_proc=1, overwrite=True)
    assert {e["tokens"] for e in read_manifest(out)["shards"][:-1]} == {60}
    np.testing.assert_array_equal(concatenated(out), reference_stream(DOCS))


def test_hub_fails_fast_when_offline(tmp_path: Path) -> None:
    with pytest.raises(DataPrepError, match="cannot stream HuggingFaceFW/fineweb-edu.*--builtin"):
        prepare(tmp_path / "out")


def test_hub_restart_streams_the_pinned_revision(jsonl: Path, tmp_path: Path, monkeypatch) -> None:
    """A restarted Hub job keeps the revision of its first run, even after the dataset repo moved on."""
    from data_prep.sources import local_source

    prepare_module = sys.modules["data_prep.prepare"]  # the package re-exports a function of the same name

    asked = []

    def fake_hub_source(dataset, config, split, text_column="text", revision=None):
        asked.append(revision)
        source = local_source([str(jsonl)], text_column=text_column)
        head = revision or ("sha-1" if len(asked) == 1 else "sha-2")  # upstream moves after the first run
        source.description = {"kind": "hub", "dataset": dataset, "config": config, "split": split, "revision": head}
        return source

    monkeypatch.setattr(prepare_module, "hub_source", fake_hub_source)
    out = prepare(tmp_path / "out", shard_tokens=100, num_proc=1)
    (out / read_manifest(out)["shards"][-1]["file"]).unlink()  # an interrupted run: the last shard is missing
    prepare(out, shard_tokens=100, num_proc=1)
    assert asked == [None, "sha-1"]
    assert read_manifest(out)["source"]["revision"] == "sha-1"
    np.testing.assert_array_equal(concatenated(out), reference_stream(DOCS))


def test_builtin_corpus(tmp_path: Path) -> None:
    out = prepare_builtin(tmp_path / "builtin")
    manifest = read_manifest(out)
    tokens = {split: sum(e["tokens"] for e in manifest["shards"] if e["split"] == split) for split in ("val", "train")}
    assert manifest["shards"][0]["split"] == "val" and tokens["val"] > 0
    assert tokens["val"] + tokens["train"] >= 300_000
    stream = concatenated(out)
    assert stream[0] == EOT_ID and (stream == EOT_ID).sum() == manifest["documents"]
    before = file_bytes(out)
    assert prepare_builtin(out) == out and file_bytes(out) == before


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="tinyshakespeare.txt is not on this machine")
def test_real_text_file(tmp_path: Path) -> None:
    out = prepare(tmp_path / "tiny", files=[str(SHAKESPEARE)], shard_tokens=100_000, num_proc=2)
    np.testing.assert_array_equal(concatenated(out), reference_stream([SHAKESPEARE.read_text()]))


def test_cli_help_documents_every_flag() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "data_prep", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    for flag in (
        "--dataset",
        "--config",
        "--split",
        "--files",
        "--text_column",
        "--out_dir",
        "--shard_tokens",
        "--val_tokens",
        "--num_proc",
        "--builtin",
        "--max_docs",
        "--verify",
        "--overwrite",
    ):
        assert flag in result.stdout


def test_a_one_line_document_of_many_pieces_gives_the_tokens_of_the_whole(tmp_path: Path, monkeypatch) -> None:
    """A .txt document (read once, not through datasets' three copies) tokenized in pieces of about 64
    characters, hundreds of them: the shards hold what datasets' own text reader and tiktoken's encoding of
    the whole document give, CR LF read as LF alike, in one process and in worker processes (forked: they
    inherit the small pieces)."""
    import datasets

    from data_prep import tokenizer

    monkeypatch.setattr(tokenizer, "PIECE_CHARS", 64)
    text = "It's 2024:   naïve café\r\n東京 42 apples\t... we'll see!  \n\n " * 300
    path = tmp_path / "one.txt"
    path.write_bytes(text.encode())
    theirs = datasets.load_dataset("text", data_files=[str(path)], sample_by="document", split="train", streaming=True)
    (document,) = [row["text"] for row in theirs]
    assert document == text.replace("\r\n", "\n")
    assert len(tokenizer.encode_pieces(document)) > 200
    for num_proc in (1, 2):
        out = prepare(tmp_path / f"out{num_proc}", files=[str(path)], shard_tokens=5000, num_proc=num_proc)
        np.testing.assert_array_equal(concatenated(out), reference_stream([document]))


def test_jsonl_rows_read_line_by_line_are_the_rows_datasets_reads(tmp_path: Path) -> None:
    """A .jsonl file is read by data_prep line by line (a huge line held once): the same texts as datasets'
    JSON reader gives, with escapes, U+2028 inside a string, CR LF line ends, a blank line, rows with other
    columns or without one; a line that is not a JSON object is one line naming the file and the line."""
    import datasets

    rows = [{"text": t, "id": i} for i, t in enumerate(DOCS[:6])]
    rows[1] = {"text": 'tab\there, quote " and \\u2028: \u2028 end', "meta": {"a": [1, 2]}}
    rows[2] = {"text": "no id column"}
    lines = [json.dumps(row, ensure_ascii=i % 2 == 0) for i, row in enumerate(rows)]
    path = tmp_path / "docs.jsonl"
    path.write_bytes(("\r\n".join(lines[:3]) + "\r\n\r\n" + "\n".join(lines[3:]) + "\n").encode())
    theirs = datasets.load_dataset("json", data_files=[str(path)], split="train", streaming=True)
    texts = [row["text"] for row in theirs]
    assert texts == [row["text"] for row in rows]
    out = prepare(tmp_path / "out", files=[str(path)], shard_tokens=8, num_proc=1)
    np.testing.assert_array_equal(concatenated(out), reference_stream(texts))

    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + "\n" + lines[1] + "\n" + '{"text": "cut short\n')
    with pytest.raises(DataPrepError, match=rf"{re.escape(str(bad))} line 3 is not JSON: "):
        prepare(tmp_path / "bad_out", files=[str(bad)], shard_tokens=8, num_proc=1)
    bad.write_text(lines[0] + "\n" + '["a list"]\n')
    with pytest.raises(DataPrepError, match=r"bad.jsonl line 2 is not a JSON object but list"):
        prepare(tmp_path / "bad_out2", files=[str(bad)], shard_tokens=8, num_proc=1)
