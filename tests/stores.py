"""Real stores for the tests, started on 127.0.0.1 by fixtures and stopped after: an S3 server (moto's
standalone server, which s3fs's own test suite uses) and a Hub mirror (olah) serving a local dataset
repository offline, for hf:// reads through huggingface_hub's own client.

`s3_server` gives the environment that points a subprocess's s3fs at the server (fsspec reads
FSSPEC_S3_ENDPOINT_URL as s3fs's `endpoint_url`) and sets it for this process too. `hub_mirror`
gives a function that publishes a folder as a dataset repository `me/NAME` (a git commit in olah's
mirrors folder) and returns its commit, and the environment (HF_ENDPOINT) for a subprocess."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import fsspec
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def running_s3_server():
    """moto's S3 server on a free loopback port, with a bucket `data`, and this process's s3fs pointed at it
    (dummy credentials); `env` does the same for a subprocess. Stopped, and the settings restored, after."""
    pytest.importorskip("s3fs", reason="s3fs is a test dependency (pip install -e '.[dev]')")
    server_module = pytest.importorskip("moto.server", reason="moto[server] is a test dependency")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {**S3_ENV, "FSSPEC_S3_ENDPOINT_URL": endpoint}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    saved_conf = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = {"endpoint_url": endpoint}
    fsspec.AbstractFileSystem.clear_instance_cache()
    fs = fsspec.filesystem("s3")
    if not fs.exists("data"):  # moto keeps its buckets in the process: a second server sees the first one's
        fs.mkdir("data")
    stopped = False

    def stop() -> None:
        nonlocal stopped
        if not stopped:
            stopped = True
            server.stop()

    try:
        yield SimpleNamespace(endpoint=endpoint, env=env, fs=fs, stop=stop)
    finally:
        stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if saved_conf is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = saved_conf
        fsspec.AbstractFileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def s3_server():
    with running_s3_server() as server:
        yield server


def put_folder(fs, local: Path, remote: str) -> None:
    """Copy a local folder's files to `remote` in a store, as someone who uploaded it by hand would."""
    for path in sorted(Path(local).iterdir()):
        if path.is_file():
            fs.put_file(str(path), f"{remote}/{path.name}")
    fs.invalidate_cache()


@pytest.fixture(scope="session")
def hub_mirror(tmp_path_factory):
    """olah on a free loopback port, offline, serving the git repositories under its mirrors folder."""
    olah = shutil.which("olah-cli", path=str(Path(sys.executable).parent)) or shutil.which("olah-cli")
    if olah is None:
        pytest.skip("olah (a Hub mirror) is a test dependency: pip install -e '.[dev]'")
    if shutil.which("git") is None:
        pytest.skip("olah serves git repositories: git is needed")
    root = tmp_path_factory.mktemp("olah")
    mirrors, repos = root / "mirrors", root / "repos"
    (mirrors / "datasets" / "me").mkdir(parents=True)
    repos.mkdir()
    port, unused = free_port(), free_port()
    (root / "config.toml").write_text(
        f"""[basic]
host = "127.0.0.1"
port = {port}
repos-path = "{repos}"
mirrors-path = ["{mirrors}"]
hf-scheme = "http"
hf-netloc = "127.0.0.1:{unused}"
hf-lfs-netloc = "127.0.0.1:{unused}"
[accessibility]
offline = true
"""
    )
    log = open(root / "olah.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([olah, "-c", str(root / "config.toml")], cwd=root, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/api/datasets/me/none/revision/main", timeout=2)
        except urllib.error.HTTPError:
            break  # it answers
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                log.close()
                pytest.fail(f"olah did not start:\n{(root / 'olah.log').read_text()[-2000:]}")
            time.sleep(0.3)

    def publish(name: str, folder: Path) -> str:
        """`folder`'s files as dataset repository me/NAME (a new commit on main); its commit sha."""
        repo = mirrors / "datasets" / "me" / name
        if not repo.exists():
            subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
        for path in Path(folder).iterdir():
            if path.is_file():
                shutil.copy(path, repo / path.name)
        git = ["git", "-C", str(repo), "-c", "user.email=t@example.com", "-c", "user.name=t"]
        subprocess.run([*git, "add", "-A"], check=True)
        subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "publish"], check=True)
        return subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()

    env = {"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    try:
        yield SimpleNamespace(endpoint=endpoint, env=env, publish=publish)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()
