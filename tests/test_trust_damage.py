"""Damage that must fall back, never crash or hang: checkpoints whose files are damaged in their content while
their manifest was rewritten to match (garbled or huge safetensors headers, tensors past the end, an
optimizer state of the wrong structure, a pickle that reaches `exec`), special files where a regular file
belongs (a FIFO is refused within seconds, never waited on), folder names with non-ASCII digits, and remote
markers that name impossible files. Each is judged where the decision is made (`checkpoint_problems`,
`find_resume_checkpoint`, `parse_step`), on a real checkpoint of one stopped trainer run."""

import io
import json
import logging
import os
import pickle
import shutil
import struct
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from trainer_runs import nano_args, train_in_process

from gpt2_scratch.training import remote
from gpt2_scratch.training.checkpoints import find_resume_checkpoint, write_manifest
from gpt2_scratch.training.config import TrainConfig
from gpt2_scratch.training.export import exported_step
from gpt2_scratch.training.paths import parse_step, step_name
from gpt2_scratch.training.verify import checkpoint_problems, read_train_state, unsafe_pickle_problems

pytestmark = pytest.mark.usefixtures("one_thread")

STEP8 = "step_000008"


@pytest.fixture(scope="module")
def stopped(data_dir, tmp_path_factory) -> Path:
    """One real run stopped after step 8: checkpoints step_000004 and step_000008."""
    out = tmp_path_factory.mktemp("damage") / "stopped"
    train_in_process(nano_args(data_dir, out, max_steps=12, stop_at_step=8, save_interval=4, eval_interval=4))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000004", STEP8]
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / run.name, ignore=shutil.ignore_patterns(".lock")))


def within(seconds: float, fn):
    """`fn()`'s result, failing the test if it takes longer than `seconds` (a reader blocked on a FIFO)."""
    result: dict = {}

    def call() -> None:
        try:
            result["value"] = fn()
        except BaseException as err:  # re-raised in the test's thread
            result["error"] = err

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds}s"
    if "error" in result:
        raise result["error"]
    return result["value"]


def resume_auto(run: Path, caplog) -> Path:
    """What `--resume auto` picks in `run`, with the settings its checkpoints were saved with."""
    settings = read_train_state(run / "checkpoints" / "step_000004")["settings"]
    with caplog.at_level(logging.WARNING, logger="train"):
        return within(
            30,
            lambda: find_resume_checkpoint(TrainConfig(resume="auto"), run / "checkpoints", run, settings),
        )


def safetensors_parts(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def with_header(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def garbled_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:16] = b"{garbage"
    path.write_bytes(bytes(data))


def terabyte_header(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 10**12) + data[8:])


def offsets_past_the_end(path: Path) -> None:
    header, body = safetensors_parts(path)
    name = next(n for n in header if n != "__metadata__")
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start, end + 10**6]
    path.write_bytes(with_header(header, body))


def optimizer_of_another_structure(path: Path) -> None:
    torch.save({"state": [torch.zeros(3)], "param_groups": "none"}, path)


def optimizer_that_is_a_list(path: Path) -> None:
    torch.save([torch.zeros(3), torch.ones(2)], path)


DAMAGE = {
    "model.safetensors": {
        "garbled header": garbled_header,
        "header claiming 1 TB": terabyte_header,
        "tensor offsets past the end": offsets_past_the_end,
    },
    "optimizer.bin": {
        "state of another structure": optimizer_of_another_structure,
        "a list, not a state": optimizer_that_is_a_list,
    },
}
CASES = [(file, how) for file, ways in DAMAGE.items() for how in ways]


@pytest.mark.parametrize(("file", "how"), CASES, ids=[f"{f}: {h}" for f, h in CASES])
def test_content_damage_under_a_matching_manifest_falls_back(stopped, tmp_path, caplog, file, how):
    run = copy_run(stopped, tmp_path)
    newest = run / "checkpoints" / STEP8
    DAMAGE[file][how](newest / file)
    write_manifest(newest, 8)  # sizes and sha256 match: only the content is wrong

    assert any(file in problem for problem in checkpoint_problems(newest))
    assert resume_auto(run, caplog) == run / "checkpoints" / "step_000004"
    assert f"{STEP8} is damaged" in caplog.text
    assert not newest.exists()  # set aside for inspection, never resumed


def exec_pickle(marker: Path) -> bytes:
    """A pickle that runs code (creating `marker`) through `numpy.dtypes.__builtins__.get('exec')`: the one
    global it names starts with `numpy.dtypes.`, which a prefix allowlist would admit."""

    def text(value: str) -> bytes:  # BINUNICODE
        return b"X" + struct.pack("<I", len(value.encode())) + value.encode()

    code = f"open({str(marker)!r}, 'w').close()"
    get = b"cnumpy.dtypes\n__builtins__.get\n"  # GLOBAL, dotted (protocol 4): the builtins dict's bound `get`
    return b"\x80\x04" + get + text("exec") + b"\x85R" + text(code) + b"\x85R."  # get('exec')(code)


def as_torch_file(path: Path, payload: bytes) -> None:
    """`payload` as the data.pkl of a torch zip file (otherwise what `torch.save` writes)."""
    buffer = io.BytesIO()
    torch.save({"x": 1}, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as source, zipfile.ZipFile(path, "w") as target:
        for item in source.infolist():
            data = payload if item.filename.endswith("/data.pkl") else source.read(item)
            target.writestr(item, data)


def test_a_pickle_reaching_exec_through_numpy_dtypes_is_refused_and_falls_back(stopped, tmp_path, caplog):
    proof = tmp_path / "the payload ran"
    pickle.loads(exec_pickle(proof))  # unpickled plainly, it does run code
    assert proof.exists()
    proof.unlink()

    run = copy_run(stopped, tmp_path)
    newest = run / "checkpoints" / STEP8
    as_torch_file(newest / "optimizer.bin", exec_pickle(proof))
    write_manifest(newest, 8)
    problems = unsafe_pickle_problems(newest / "optimizer.bin", "optimizer.bin")
    assert problems and "numpy.dtypes.__builtins__.get" in problems[0]

    assert resume_auto(run, caplog).name == "step_000004"
    assert "could run code; refused" in caplog.text
    assert not proof.exists()


def fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


SPECIAL = [
    ("checkpoint.json", directory),
    ("checkpoint.json", fifo),
    ("train_state.json", fifo),
    ("random_states_0.pkl", fifo),
]


@pytest.mark.parametrize(("file", "make"), SPECIAL, ids=[f"{f} a {m.__name__}" for f, m in SPECIAL])
def test_a_special_file_where_a_file_belongs_falls_back_within_seconds(stopped, tmp_path, caplog, file, make):
    run = copy_run(stopped, tmp_path)
    newest = run / "checkpoints" / STEP8
    make(newest / file)
    assert within(10, lambda: checkpoint_problems(newest))
    assert resume_auto(run, caplog).name == "step_000004"


def test_an_export_record_that_is_a_fifo_is_no_export_within_seconds(stopped, tmp_path):
    run = copy_run(stopped, tmp_path)
    assert exported_step(run) == 8
    fifo(run / "hf" / "export.json")
    assert within(10, lambda: exported_step(run)) is None  # the next save rebuilds the export


@pytest.mark.parametrize("name", ["step_00001²", "step_٠٠٠٠٠٩", "step_0000１2", "step_000004\n"])
def test_only_ascii_digits_make_a_step_folder(stopped, tmp_path, caplog, name):
    assert parse_step(name) is None
    run = copy_run(stopped, tmp_path)
    shutil.copytree(run / "checkpoints" / STEP8, run / "checkpoints" / name)  # intact content, a foreign name
    assert resume_auto(run, caplog).name == STEP8
    assert (run / "checkpoints" / name).is_dir()  # not ours: neither resumed nor set aside


# ----------------------------------------------------------------------------------------------
# Remote markers


@pytest.fixture()
def store(stopped, tmp_path) -> remote.RemoteStore:
    """A file:// store holding the stopped run's two checkpoints, as its uploads left them."""
    store = remote.open_store(f"file://{tmp_path}/store")
    for step in (4, 8):
        folder = stopped / "checkpoints" / step_name(step)
        remote.upload_checkpoint(store, step, folder, stopped / "hf", [stopped / "log.jsonl"])
    return store


def add_to_marker(store: remote.RemoteStore, step: int, name: str) -> None:
    marker = Path(store.checkpoint(step)) / remote.MARKER
    content = json.loads(marker.read_text())
    content["files"][name] = {"bytes": 3, "sha256": "0" * 64}
    marker.write_text(json.dumps(content))


def marker_fifo(store: remote.RemoteStore, step: int) -> None:
    fifo(Path(store.checkpoint(step)) / remote.MARKER)


MARKERS = {
    "a 300-character file name": lambda store, step: add_to_marker(store, step, "x" * 300 + "/model.safetensors"),
    "a file name with a NUL byte": lambda store, step: add_to_marker(store, step, "sub\0dir/model.safetensors"),
    "a FIFO as the marker": marker_fifo,
}


@pytest.mark.parametrize("how", MARKERS)
def test_a_remote_marker_naming_an_impossible_file_or_a_fifo_falls_back(stopped, store, tmp_path, caplog, how):
    MARKERS[how](store, 8)
    out = tmp_path / "fresh"
    settings = read_train_state(stopped / "checkpoints" / "step_000004")["settings"]
    config = TrainConfig(resume="auto")
    with caplog.at_level(logging.WARNING, logger="train"):
        found = within(30, lambda: find_resume_checkpoint(config, out / "checkpoints", out, settings, store))
    assert found == out / "checkpoints" / "step_000004"
    assert "step_000008 is damaged" in caplog.text and "trying the next older one" in caplog.text
    named = TrainConfig(resume=f"file://{store.checkpoint(8)}")
    with pytest.raises(remote.RemoteError):
        within(30, lambda: find_resume_checkpoint(named, tmp_path / "x" / "checkpoints", tmp_path / "x", settings))


def test_a_link_planted_where_a_download_goes_is_never_followed(stopped, store, tmp_path):
    out, outside = tmp_path / "fresh", tmp_path / "outside"
    (out / "checkpoints").mkdir(parents=True)
    outside.mkdir()
    (out / "checkpoints" / ".tmp_step_000008").symlink_to(outside)
    settings = read_train_state(stopped / "checkpoints" / "step_000004")["settings"]
    found = find_resume_checkpoint(TrainConfig(resume="auto"), out / "checkpoints", out, settings, store)
    assert found == out / "checkpoints" / STEP8
    assert list(outside.iterdir()) == []
