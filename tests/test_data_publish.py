"""Publishing a folder of shards (`python -m data_prep --upload URL`, `--push_to_hub`): shards first, the
manifest last, an interrupted upload resumed; through file:// and moto's S3 server (tests/stores.py). Hub
uploads are not run against a server here: olah, the local Hub mirror, has no upload routes."""

import hashlib
import subprocess
import sys

import fsspec
import pytest
from stores import s3_server  # noqa: F401  (fixture)
from trainer_runs import ONE_THREAD, ROOT

from data_prep import prepare
from data_prep.shards import MANIFEST_NAME, load_tokens, read_manifest, write_manifest, write_shard
from data_prep.store import (
    CARD_NAME,
    UPLOAD_RECORD,
    Retrying,
    StoreError,
    fetch_shard,
    open_data_store,
    read_store_manifest,
    upload_folder,
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("shards"), builtin=True, shard_tokens=4096, max_docs=40, num_proc=1)


@pytest.fixture(params=["file", "s3"])
def url(request, tmp_path):
    if request.param == "file":
        return f"file://{tmp_path}/published"
    request.getfixturevalue("s3_server")
    return f"s3://data/published-{tmp_path.name}"


def upload_cut_after_three_shards(folder, url: str, monkeypatch) -> None:
    """`upload_folder(folder, url)` whose connection drops for good at the fourth shard."""
    fs = open_data_store(url).fs  # fsspec gives the upload this same instance
    put_file, sent = fs.put_file, []

    def cut_after_three(local, remote, **kwargs):
        if len(sent) == 3:
            raise PermissionError("connection closed")
        sent.append(remote)
        return put_file(local, remote, **kwargs)

    monkeypatch.setattr(fs, "put_file", cut_after_three)
    with pytest.raises(PermissionError):
        upload_folder(folder, url)
    monkeypatch.undo()


def test_an_upload_sends_the_manifest_last_and_resumes_where_it_was_cut(shards, url, monkeypatch):
    manifest = read_manifest(shards)
    names = [entry["file"] for entry in manifest["shards"]]
    upload_cut_after_three_shards(shards, url, monkeypatch)
    store = open_data_store(url)
    store.fs.invalidate_cache()
    there = {p.rsplit("/", 1)[-1] for p in store.fs.ls(store.root, detail=False)}
    assert there == {*names[:3], UPLOAD_RECORD}  # no manifest names shards that are not there
    with pytest.raises(StoreError, match="no manifest.json at"):
        read_store_manifest(store, Retrying(retries=0))

    again = upload_folder(shards, url)
    assert again == [*names[3:], CARD_NAME, MANIFEST_NAME]  # the first three were not sent twice
    store.fs.invalidate_cache()
    for name in [*names, MANIFEST_NAME]:
        assert store.fs.cat_file(store.path(name)) == (shards / name).read_bytes()
    card = store.fs.cat_file(store.path(CARD_NAME)).decode()
    train_tokens = sum(e["tokens"] for e in manifest["shards"] if e["split"] == "train")
    assert "python-stdlib-docs" in card and "`gpt2`" in card and f"| training tokens | {train_tokens:,} |" in card
    assert upload_folder(shards, url) == [CARD_NAME, MANIFEST_NAME]  # complete: nothing sent again


def test_a_store_holding_another_data_set_is_not_mixed_into(shards, tmp_path):
    other = prepare(tmp_path / "other", builtin=True, shard_tokens=8192, max_docs=40, num_proc=1)
    url = f"file://{tmp_path}/published"
    upload_folder(other, url)
    with pytest.raises(StoreError, match="already holds another data set"):
        upload_folder(shards, url)


def run_data_prep(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "data_prep", *argv]
    return subprocess.run(cmd, cwd=ROOT, env={**ONE_THREAD, **(env or {})}, capture_output=True, text=True, timeout=120)


def test_the_command_line_uploads_a_folder_and_refuses_a_hub_push_offline(shards, tmp_path):
    done = run_data_prep("--upload", f"file://{tmp_path}/up", "--out_dir", str(shards))
    assert done.returncode == 0, done.stderr
    assert f"train on it with --data_dir file://{tmp_path}/up" in done.stdout
    assert fsspec.filesystem("file").cat_file(f"{tmp_path}/up/{MANIFEST_NAME}") == (shards / MANIFEST_NAME).read_bytes()
    out = tmp_path / "made"
    args = ["--builtin", "--max_docs", "20", "--shard_tokens", "4096", "--num_proc", "1", "--no_progress"]
    done = run_data_prep(*args, "--out_dir", str(out), "--push_to_hub", "me/shards", env={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2 and (out / MANIFEST_NAME).is_file()  # the shards are made, then the push refused
    assert done.stderr.strip().splitlines()[-1].startswith("error: hf://datasets/me/shards: publishing needs the Hub")


def test_an_upload_cut_short_is_never_taken_for_another_data_sets_shards(shards, tmp_path, monkeypatch):
    """Data set A's upload is cut before its manifest; B is then uploaded to the same URL. B's shards have
    A's names and sizes (data_prep's shards are all one size), but not its bytes: every one is sent, and
    the store then serves exactly B, which a trainer's sha256 check accepts."""
    manifest, other = read_manifest(shards), tmp_path / "other"
    other.mkdir()
    a = []  # A: the same shard names and sizes, the tokens reversed
    for entry in manifest["shards"]:
        reversed_tokens = load_tokens(shards / entry["file"])[::-1].copy()
        a.append({**entry, "sha256": write_shard(other / entry["file"], reversed_tokens)})
    write_manifest(other, {**manifest, "shards": a})
    b = manifest["shards"]
    assert [(e["file"], e["tokens"]) for e in a] == [(e["file"], e["tokens"]) for e in b]
    assert [e["sha256"] for e in a] != [e["sha256"] for e in b]
    url = f"file://{tmp_path}/published"
    upload_cut_after_three_shards(other, url, monkeypatch)
    assert upload_folder(shards, url) == [*(e["file"] for e in b), CARD_NAME, MANIFEST_NAME]
    store, fetched = open_data_store(url), tmp_path / "fetched"
    fetched.mkdir()
    for entry in read_store_manifest(store, Retrying(retries=0))["shards"]:
        fetch_shard(store, entry, fetched / entry["file"], Retrying(retries=0))  # its sha256 checked


def test_a_hub_shard_counts_as_sent_only_when_it_holds_the_same_bytes(shards):
    """The Hub push's resume, judged on what `list_repo_tree` returns (huggingface_hub's own RepoFile, built
    from the API's JSON): the LFS sha256, or the git blob id of a file stored in git, never the size alone."""
    from huggingface_hub.hf_api import RepoFile

    from data_prep.store import hub_file_holds, shard_bytes

    entry = read_manifest(shards)["shards"][1]
    local = shards / entry["file"]
    size, data = shard_bytes(entry), local.read_bytes()
    blob = hashlib.sha1(b"blob %d\0" % size + data).hexdigest()

    def lfs_file(sha256: str) -> RepoFile:
        return RepoFile(
            path=entry["file"], size=size, oid="0" * 40, lfs={"size": size, "oid": sha256, "pointerSize": 134}
        )

    assert hub_file_holds(lfs_file(entry["sha256"]), entry, local)
    assert not hub_file_holds(lfs_file("f" * 64), entry, local)  # same name and size, other bytes
    assert hub_file_holds(RepoFile(path=entry["file"], size=size, oid=blob), entry, local)
    assert not hub_file_holds(RepoFile(path=entry["file"], size=size, oid="0" * 40), entry, local)
    assert not hub_file_holds(RepoFile(path=entry["file"], size=size - 2, oid=blob), entry, local)
