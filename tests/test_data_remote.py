"""Training on token shards in a store (`--data_dir URL`), against servers the tests start on 127.0.0.1:
moto's S3 server for s3://, olah (a Hub mirror) for hf://datasets/... (tests/stores.py).

The reference is the same run on the local folder: the loader's order depends on the manifest alone, so
the losses are equal bit for bit, through a SIGKILL and `--resume auto` too. The shards are small (1,024
tokens, 31 sequences of 33) so that a few steps cross several of them, and the cache limit (10 kB) holds
the validation shard and two training shards: shards are evicted and fetched again as the run goes on.
"""

import json
import re
import subprocess
import sys

import fsspec
import numpy as np
import pytest
import torch
from stores import free_port, hub_mirror, put_folder, running_s3_server, s3_server  # noqa: F401  (fixtures)
from trainer_runs import ONE_THREAD, ROOT, metric, nano_args, run_cli, train_in_process, wait_for_step

from data_prep import ShardLoader, prepare
from data_prep.cache import ShardCache
from data_prep.shards import MANIFEST_NAME, file_sha256, write_shard
from data_prep.store import Retrying, StoreError, open_data_store, read_store_manifest
from gpt2_scratch.training.checkpoints import checkpoint_problems
from gpt2_scratch.training.config import TrainConfig
from gpt2_scratch.training.data import open_remote, prepare_remote_data
from gpt2_scratch.user_errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = dict(max_steps=12, save_interval=4, eval_interval=4, num_samples=0, keep_checkpoints=0)
LIMIT_GB = 1e-5  # 10,000 bytes: the val shard (3,072) and two training shards (3,072 each), not three


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """76 shards of 1,024 tokens of the built-in corpus (the first 60 documents)."""
    return prepare(tmp_path_factory.mktemp("small"), builtin=True, shard_tokens=1024, max_docs=60, num_proc=1)


@pytest.fixture(scope="module")
def local_run(small_data, tmp_path_factory):
    """The reference: 12 steps on the local folder."""
    out = tmp_path_factory.mktemp("local") / "run"
    train_in_process(nano_args(small_data, out, **RUN))
    return out


@pytest.fixture(scope="module")
def on_s3(s3_server, small_data):  # noqa: F811
    put_folder(s3_server.fs, small_data, "data/small")
    return "s3://data/small"


def launch(argv: list[str], env: dict) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "train_accelerate.py"), *argv]
    return subprocess.Popen(
        cmd, cwd=ROOT, env={**ONE_THREAD, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def test_the_loader_reads_the_same_batches_from_s3_and_keeps_the_cache_within_its_limit(small_data, on_s3, tmp_path):
    config = TrainConfig(data_dir=on_s3, out_dir=str(tmp_path), data_cache_gb=LIMIT_GB)
    manifest = prepare_remote_data(config)
    _, cache = open_remote(config, resolve=False, manifest=manifest)
    remote = ShardLoader(cache.folder, batch_size=4, seq_len=32, cache=cache)
    local = ShardLoader(small_data, batch_size=4, seq_len=32)
    shards_read = set()
    for _ in range(120):  # about 16 shards
        x, y = remote.next_batch()
        x_local, y_local = local.next_batch()
        assert torch.equal(x, x_local) and torch.equal(y, y_local)
        assert cache.size() <= LIMIT_GB * 1e9
        shards_read |= {cache.entries[name]["file"] for name in cache.pinned}
    assert cache.peak <= LIMIT_GB * 1e9
    kept = {p.name for p in cache.files()}
    assert len(shards_read) > 10 and len(kept) <= 3 and "val_000000.bin" in kept  # evicted as it went
    cache.join(cache.upcoming)
    assert (cache.folder / cache.upcoming).is_file()  # the next shard was fetched ahead
    # A position saved by one resumes in the other
    remote.load_state_dict(local.state_dict())
    assert torch.equal(remote.next_batch()[0], local.next_batch()[0])


def test_a_cache_bound_below_two_training_shards_is_refused_at_the_start(on_s3, tmp_path):
    config = TrainConfig(data_dir=on_s3, out_dir=str(tmp_path), data_cache_gb=8e-6)  # val + 1.6 shards
    with pytest.raises(StoreError, match=r"cannot hold the validation shards .* and two of the largest training"):
        prepare_remote_data(config)


def test_a_run_on_s3_logs_the_losses_of_the_local_run_through_a_kill_and_resume(
    local_run,
    on_s3,
    s3_server,  # noqa: F811
    tmp_path,
):
    out = tmp_path / "s3"
    argv = nano_args(on_s3, out, **RUN, data_cache_gb=LIMIT_GB)
    proc = launch(argv, s3_server.env)
    wait_for_step(out, proc, 6)
    proc.kill()
    proc.wait()
    done = run_cli([*argv, "--resume", "auto"], env=s3_server.env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(metric(out, "train/loss")) == list(range(1, 13))
    assert metric(out, "train/loss") == metric(local_run, "train/loss")
    assert metric(out, "val/loss") == metric(local_run, "val/loss")
    info = json.loads((out / "run_info.json").read_text())
    assert info["resumed_from"].endswith("step_000004") and info["data"]["url"] == on_s3
    assert 1 in metric(out, "data_wait_s")  # step 1 waited for its first shard, and the log says how long
    cache = out / "data_cache"
    assert sum(p.stat().st_size for p in cache.rglob("*.bin")) <= LIMIT_GB * 1e9


def test_two_processes_sharing_one_cache_log_the_losses_of_the_local_run(local_run, on_s3, s3_server, tmp_path):  # noqa: F811
    """Two ranks (gloo) read through one cache folder, evaluating the same val batches split over them."""
    out = tmp_path / "two"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    launcher += [str(ROOT / "accelerate_configs" / "cpu_2proc.yaml")]
    argv = nano_args(on_s3, out, **RUN, data_cache_gb=LIMIT_GB)
    done = run_cli(argv, timeout=400, launcher=launcher, env=s3_server.env)
    assert done.returncode == 0, "\n".join(line for line in done.stderr.splitlines() if "error" in line.lower())
    assert metric(out, "train/loss") == metric(local_run, "train/loss")
    assert metric(out, "val/loss") == metric(local_run, "val/loss")
    assert json.loads((out / "run_info.json").read_text())["processes"] == 2


def test_a_hub_dataset_is_read_at_one_commit_that_a_resume_checks(local_run, small_data, hub_mirror, tmp_path):  # noqa: F811
    commit = hub_mirror.publish("small", small_data)
    out = tmp_path / "hf"
    argv = nano_args("hf://datasets/me/small", out, **RUN)
    done = run_cli([*argv, "--stop_at_step", "4"], env=hub_mirror.env)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((out / "run_info.json").read_text())
    assert info["data"]["revision"] == commit
    assert info["data"]["pinned_url"] == f"hf://datasets/me/small@{commit}"
    expected = metric(local_run, "train/loss")
    assert metric(out, "train/loss") == {step: expected[step] for step in range(1, 5)}

    (tmp_path / "card").mkdir()
    (tmp_path / "card" / "README.md").write_text("a new commit on main\n")
    newer = hub_mirror.publish("small", tmp_path / "card")
    refused = run_cli([*argv, "--resume", "auto", "--stop_at_step", "8"], env=hub_mirror.env)
    assert refused.returncode == 2
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and f"{commit} -> {newer}" in last and "data_revision" in last

    pinned = nano_args(f"hf://datasets/me/small@{commit}", out, **RUN)
    done = run_cli([*pinned, "--resume", "auto", "--stop_at_step", "8"], env=hub_mirror.env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert metric(out, "train/loss") == {step: expected[step] for step in range(1, 9)}


# ----------------------------------------------------------------------------------------------
# Bad input: one error before the model is built, nothing written outside out_dir and the cache


def damaged_copies(small_data, fs, root: str) -> dict[str, str]:
    """Stores that are wrong in one way each, in `fs` under `root`."""
    put_folder(fs, small_data, f"{root}/no_manifest")
    fs.rm(f"{root}/no_manifest/{MANIFEST_NAME}")
    put_folder(fs, small_data, f"{root}/missing")
    fs.rm(f"{root}/missing/train_000005.bin")
    put_folder(fs, small_data, f"{root}/short")
    fs.pipe_file(f"{root}/short/train_000005.bin", (small_data / "train_000005.bin").read_bytes()[:-2])
    put_folder(fs, small_data, f"{root}/changed")
    body = bytearray((small_data / "val_000000.bin").read_bytes())
    body[-1] ^= 1
    fs.pipe_file(f"{root}/changed/val_000000.bin", bytes(body))
    fs.invalidate_cache()
    return {
        "no_manifest": "no manifest.json at",
        "missing": "shard train_000005.bin is listed in manifest.json but not in the store",
        "short": "shard train_000005.bin is 3,070 bytes",
        "changed": "shard val_000000.bin does not match its manifest.json entry",
    }


@pytest.fixture(scope="module")
def damaged(small_data, on_s3, s3_server):  # noqa: F811
    return damaged_copies(small_data, s3_server.fs, "data/bad")


@pytest.mark.parametrize("case", ["no_manifest", "missing", "short", "changed"])
def test_a_store_that_does_not_hold_what_its_manifest_lists_is_refused_before_the_model(damaged, case, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=damaged[case]):
        train_in_process(nano_args(f"s3://data/bad/{case}", out, **RUN, data_retries=0))
    assert not out.exists() or {p.name for p in out.iterdir()} == {"data_cache"}  # no stray .lock, no record
    if case == "changed":  # once the store is repaired, the same command starts: the cache is no run record
        fixed = nano_args("s3://data/small", out, **{**RUN, "max_steps": 1, "eval_interval": 1}, warmup_steps=0)
        assert train_in_process(fixed)["step"] == 1


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("foo://bucket/data", "unknown protocol 'foo'"),
        ("hf://datasets/me/small", "offline mode is on"),  # the tests run with HF_HUB_OFFLINE=1
        ("hf://me/model", "a model repository; token shards live in a dataset"),
        ("file://relative/data", "needs an absolute path"),
        ("s3://data/small", "failed after 1 tries"),  # nothing listens on the endpoint
    ],
)
def test_a_url_that_cannot_be_read_is_refused_before_the_model(url, expected, tmp_path, monkeypatch):
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": f"http://127.0.0.1:{free_port()}"})
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    fsspec.AbstractFileSystem.clear_instance_cache()
    out = tmp_path / "out"
    with pytest.raises(UserError, match=re.escape(expected)):
        train_in_process(nano_args(url, out, **RUN, data_retries=0))
    assert not (out / "run_info.json").exists() and not (out / "checkpoints").exists()
    fsspec.AbstractFileSystem.clear_instance_cache()


def test_a_bad_url_on_the_command_line_is_one_error_line_and_exit_status_2(tmp_path):
    done = run_cli(nano_args("foo://bucket/data", tmp_path / "out", **RUN), timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith("error: invalid training config: data_dir: foo://bucket/data: unknown protocol")
    assert not (tmp_path / "out").exists()


def test_a_revision_that_does_not_exist_is_refused(small_data, hub_mirror, tmp_path):  # noqa: F811
    hub_mirror.publish("small", small_data)
    done = run_cli(nano_args("hf://datasets/me/small@nope", tmp_path / "out", **RUN), env=hub_mirror.env)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "revision 'nope'" in last


# ----------------------------------------------------------------------------------------------
# A slow or failing store


class Flaky:
    """A request that fails `failures` times with `error`, then answers."""

    def __init__(self, failures: int, error: Exception):
        self.failures, self.error, self.calls = failures, error, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "bytes"


class Throttled(Exception):
    status = 429


def test_retries_back_off_and_a_throttling_store_gets_fewer_requests():
    slept: list[float] = []
    retrying = Retrying(retries=3, base=0.01, log=lambda message: None)
    retrying.sleep = slept.append  # the waits themselves, not their wall time
    assert retrying("shard", Flaky(2, ConnectionError("reset"))) == "bytes"
    assert slept == [0.01, 0.02]  # exponential backoff
    slept.clear()
    assert retrying("shard", Flaky(1, Throttled("429 Too Many Requests"))) == "bytes"
    assert slept == [0.04, 0.03]  # four times as long after a 429, and the retry spaced out as well
    slept.clear()
    assert retrying("next shard", Flaky(0, ConnectionError())) == "bytes"
    assert slept == [0.01]  # and the next request waits before it is sent: fewer requests
    with pytest.raises(StoreError, match=r"shard: failed after 4 tries \(ConnectionError"):
        retrying("shard", Flaky(9, ConnectionError("refused")))
    missing = Flaky(9, FileNotFoundError("gone"))
    with pytest.raises(FileNotFoundError):
        retrying("shard", missing)
    assert missing.calls == 1  # a missing file is not retried


def test_a_store_that_fails_mid_run_stops_it_with_one_error_and_its_checkpoints_intact(small_data, tmp_path):
    with running_s3_server() as server:
        put_folder(server.fs, small_data, "data/small")
        out = tmp_path / "run"
        argv = nano_args("s3://data/small", out, **{**RUN, "max_steps": 30}, data_cache_gb=LIMIT_GB, data_retries=1)
        proc = launch(argv, {**server.env, "AWS_MAX_ATTEMPTS": "1"})  # our retries only, not botocore's too
        wait_for_step(out, proc, 5)
        server.stop()
        _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 2, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "failed after 2 tries" in last and "s3://data/small" in last
    newest = max((out / "checkpoints").glob("step_*"))
    assert checkpoint_problems(newest) == []
    assert max(metric(out, "train/loss")) < 30


def test_a_shard_whose_fetch_ahead_failed_is_fetched_when_the_loader_needs_it(small_data, tmp_path, monkeypatch):
    """A blip: the store is down while the next shard is fetched ahead in the background (its retries
    run out), and back when the loader needs the shard, which is then fetched, not failed on the
    background's old error."""
    from moto.server import ThreadedMotoServer

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # our retries only, not botocore's too
    with running_s3_server() as server:
        put_folder(server.fs, small_data, "data/small")
        config = TrainConfig(data_dir="s3://data/small", out_dir=str(tmp_path), data_retries=0)
        _, cache = open_remote(config, resolve=False, manifest=prepare_remote_data(config))
        shard = sorted(name for name, entry in cache.entries.items() if entry["split"] == "train")[1]
        server.stop()
        cache.use([], shard)
        cache.fetch_ahead()
        cache.join(shard)
        assert shard in cache.errors and not (cache.folder / shard).exists()
        host, port = server.endpoint.removeprefix("http://").split(":")
        back = ThreadedMotoServer(ip_address=host, port=int(port), verbose=False)  # the same store, back
        back.start()
        try:
            path = cache.local(shard)
        finally:
            back.stop()
    assert file_sha256(path) == cache.entries[shard]["sha256"] and shard not in cache.errors


def file_store_cache(tmp_path, shards: list[tuple[str, int]]) -> ShardCache:
    """A cache (no size limit) of shards of the given (split, tokens), served from a file:// store."""
    source = tmp_path / "source"
    source.mkdir()
    entries = []
    for i, (split, tokens) in enumerate(shards):
        name = f"{split}_{i:06d}.bin"
        sha256 = write_shard(source / name, (np.arange(tokens) % 50000).astype(np.uint16))
        entries.append({"file": name, "split": split, "tokens": tokens, "sha256": sha256})
    manifest = {"format_version": 1, "tokenizer": "gpt2", "source": {"kind": "test"}, "shards": entries}
    cache = ShardCache(open_data_store(f"file://{source}"), manifest, tmp_path / "cache", None, Retrying(retries=0))
    cache.prepare()
    return cache


def test_the_fetch_ahead_never_fetches_a_shard_the_epoch_leaves_unread(tmp_path):
    """An epoch reads whole global batches: the chunks left over at its end are never read, so the shard
    fetched ahead of the epoch's last batch is the next epoch's first, not a left-over one."""
    cache = file_store_cache(tmp_path, [("val", 1000), ("train", 1025), ("train", 1025), ("train", 257)])
    loader = ShardLoader(cache.folder, batch_size=4, seq_len=64, cache=cache, shuffle=False, sequences_per_step=16)
    assert list(loader.chunks_per_shard) == [16, 16, 4] and loader.batches_per_epoch == 8  # 4 chunks left over
    ahead = []
    for _ in range(2 * loader.batches_per_epoch):
        loader.next_batch()
        ahead.append(cache.upcoming)
    assert "train_000003.bin" not in ahead and not (cache.folder / "train_000003.bin").exists()
    assert ahead[loader.batches_per_epoch - 1] == "train_000001.bin"  # the next epoch's first, no shuffle


def test_a_manifest_may_not_name_a_shard_after_itself_or_twice(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for names, message in [(["manifest.json"], "not a plain shard file name"), (["a.bin", "a.bin"], "twice")]:
        manifest = {"format_version": 1, "tokenizer": "gpt2", "source": {"kind": "test"}, "shards": []}
        for name in names:
            manifest["shards"].append({"file": name, "split": "train", "tokens": 1, "sha256": "0" * 64})
        (source / MANIFEST_NAME).write_text(json.dumps(manifest))
        with pytest.raises(StoreError, match=message):
            read_store_manifest(open_data_store(f"file://{source}"), Retrying(retries=0))


def test_a_download_cut_short_by_a_kill_is_removed_without_a_size_limit_too(tmp_path):
    cache = file_store_cache(tmp_path, [("val", 1000), ("train", 1025), ("train", 1025)])
    cut = cache.folder / ".train_000001.bin.12345.tmp"  # a killed run's partial download
    cut.write_bytes(b"\0" * 100)
    other = cache.folder / ".manifest.json.12345.tmp"  # not a shard download: another process's, left alone
    other.write_text("{}")
    cache.local("train_000002.bin")
    assert not cut.exists() and other.exists() and (cache.folder / "train_000002.bin").is_file()
