"""Checkpoints that outlive the machine: mirror each complete checkpoint to an fsspec URL, resume from it.

The trainer's `--checkpoint_remote URL` takes any fsspec URL:

    file:///mnt/shared/run1    a shared drive (and the tests)       memory://run1   one process (tests)
    s3://bucket/run1           needs s3fs                            gs://bucket/run1  needs gcsfs
    hf://user/name[@branch][/folder]   a Hub model repository, through huggingface_hub's HfFileSystem

Layout. For a folder URL: `URL/checkpoints/step_NNNNNN/` and the HF export in `URL/hf/`. For `hf://`:
the checkpoints under `folder` (default `checkpoints`) on `branch` (default: the default branch), the
export at the root of the default branch, so that `from_pretrained("user/name")` loads the repository.

A remote checkpoint is `step_NNNNNN/` holding the `save_state` files, `logs/` (the run's log.jsonl and
samples.jsonl up to that step) and `COMPLETE`, uploaded last: JSON of the step and every file with its
size and sha256. Only a folder with `COMPLETE` counts: resume never uses one without it, and prune removes such
leftovers of an interrupted upload once a newer checkpoint is complete.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
import socket
import threading
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import fsspec

from data_prep.shards import file_sha256
from gpt2_scratch.training import UserError
from gpt2_scratch.training.files import remove_ours
from gpt2_scratch.training.hub import check_hub_access, offline_reason
from gpt2_scratch.training.paths import local_files, parse_step, step_name
from gpt2_scratch.training.processes import on_main_process

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger("train.remote")

MARKER = "COMPLETE"
LOGS = "logs"  # the run's records travel with each checkpoint, so a resumed run continues its log
LOG_FILES = ("log.jsonl", "samples.jsonl")
# A downloaded checkpoint's logs wait here until the resume from it is certain (out_dir/.remote_logs/step_N)
STAGED_LOGS = ".remote_logs"
OWNER = "run.json"  # in the store's checkpoints folder: the identity of the one run the store belongs to
MAX_MARKER_BYTES = 16_000_000  # a marker lists a few files; a bigger one is not ours and is not read
MAX_NAME_BYTES = 255  # the longest file name that local filesystems take


class RemoteError(UserError):
    """The remote store cannot be reached or written, or holds no usable checkpoint where one was named."""


# ----------------------------------------------------------------------------------------------
# Where things go


@dataclass
class RemoteStore:
    """An fsspec filesystem and the paths in it of the checkpoints folder and of the HF export."""

    url: str
    fs: fsspec.AbstractFileSystem
    checkpoints: str
    export: str
    hub_repo: str | None = None  # for hf://: the repository id
    hub_revision: str | None = None  # for hf://: the branch of the checkpoints (None: the default branch)

    def checkpoint(self, step: int) -> str:
        return f"{self.checkpoints}/{step_name(step)}"


def open_store(url: str) -> RemoteStore:
    """The store for a `checkpoint_remote` URL; no network is touched."""
    protocol = url.split("://", 1)[0] if "://" in url else ""
    if protocol == "hf":
        return open_hub_store(url)
    if protocol == "file" and not url.startswith("file:///"):
        raise RemoteError(
            f"{url}: a file:// URL needs an absolute path (file:///abs/path; {url!r} would be read relative to "
            "wherever the trainer starts)"
        )
    fs, root = filesystem(url)
    root = root.rstrip("/")
    return RemoteStore(url, fs, f"{root}/checkpoints", f"{root}/hf")


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec's filesystem and path for `url` (`data_prep.store.filesystem`, which the data URLs use too)."""
    from data_prep.store import StoreError
    from data_prep.store import filesystem as store_filesystem

    try:
        return store_filesystem(url)
    except StoreError as err:
        raise RemoteError(str(err)) from err


def open_hub_store(url: str) -> RemoteStore:
    """hf://user/name[@branch][/folder]: checkpoints in `folder` on `branch`, the export at the repo root."""
    from huggingface_hub import HfFileSystem
    from huggingface_hub.utils import parse_hf_uri

    try:
        uri = parse_hf_uri(url)
    except ValueError as err:
        raise RemoteError(f"{url}: {err}; expected hf://user/name[@branch][/folder]") from err
    if uri.type != "model":
        raise RemoteError(
            f"{url}: a {uri.type} URL; checkpoints go to a model repository (hf://user/name[@branch][/folder]) so "
            "that the repository also loads as a model"
        )
    revision = f"@{quote(uri.revision, safe='')}" if uri.revision else ""
    folder = uri.path_in_repo.strip("/") or "checkpoints"
    return RemoteStore(url, HfFileSystem(), f"{uri.id}{revision}/{folder}", uri.id, uri.id, uri.revision)


# ----------------------------------------------------------------------------------------------
# Writing: one commit per repository branch on the Hub, one file at a time elsewhere


def write(store: RemoteStore, changes: dict[str, Path | bytes | None], message: str) -> None:
    """Apply `changes` (remote path: a local file, bytes, or None to delete that folder) in order."""
    if store.hub_repo is not None:
        send_hub_commits(store, changes, message)
        return
    fs = store.fs
    for remote, content in changes.items():
        if content is None:
            if fs.exists(remote):
                fs.rm(remote, recursive=True)
            continue
        fs.makedirs(posixpath.dirname(remote), exist_ok=True)
        if isinstance(content, bytes):
            fs.pipe_file(remote, content)
        else:
            fs.put_file(str(content), remote)
    fs.invalidate_cache()


def hub_operations(changes: dict[str, Path | bytes | None]) -> dict[tuple[str, str | None], list]:
    """The Hub commit operations of `changes`, grouped by (repository, revision)."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    from huggingface_hub.utils import parse_hf_uri

    commits: dict[tuple[str, str | None], list] = defaultdict(list)
    for remote, content in changes.items():
        uri = parse_hf_uri(f"hf://{remote}")
        if content is None:
            operation = CommitOperationDelete(path_in_repo=f"{uri.path_in_repo}/")
        else:
            operation = CommitOperationAdd(uri.path_in_repo, content if isinstance(content, bytes) else str(content))
        commits[(uri.id, uri.revision)].append(operation)
    return commits


def send_hub_commits(store: RemoteStore, changes: dict[str, Path | bytes | None], message: str) -> None:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=store.fs.endpoint, token=store.fs.token)
    for (repo_id, revision), operations in hub_operations(changes).items():
        api.create_commit(repo_id, operations, commit_message=message, revision=revision)
    store.fs.invalidate_cache()


def check_writable(store: RemoteStore) -> None:
    """Write and delete a small probe file where the checkpoints go (on the Hub, the branch is created
    first); a RemoteError saying what failed otherwise."""
    probe = f"{store.checkpoints}/.write_probe_{socket.gethostname()}_{os.getpid()}"  # a folder: see `write`
    try:
        if store.hub_revision is not None:
            from huggingface_hub import HfApi

            api = HfApi(endpoint=store.fs.endpoint, token=store.fs.token)
            api.create_branch(store.hub_repo, branch=store.hub_revision, exist_ok=True)
        write(store, {f"{probe}/probe": b"gpt2-scratch write probe\n"}, "checkpoint_remote: write probe")
        write(store, {probe: None}, "checkpoint_remote: remove the write probe")
    except Exception as err:  # each filesystem raises its own errors; all mean the same here
        raise RemoteError(
            f"checkpoint_remote: cannot write to {store.url} ({type(err).__name__}: {err}); check that the location "
            "exists and is writable and that the credentials allow writing"
        ) from err


def preflight_remote(url: str | None, hub_private: bool, accelerator: Accelerator) -> RemoteStore | None:
    """The checkpoint_remote store, checked before any training: for hf://, login and write access to the
    repository (`check_hub_access`); for every store, a probe file written and deleted."""
    if url is None:
        return None
    store = open_store(url)  # a bad URL fails on every rank alike

    def check() -> None:
        if store.hub_repo is not None:
            check_hub_access(store.hub_repo, hub_private, purpose="checkpoint_remote")
        check_writable(store)

    on_main_process(accelerator, check)
    logger.info("checkpoint_remote: %s is writable; checkpoints go to %s", store.url, store.checkpoints)
    return store


# ----------------------------------------------------------------------------------------------
# What is there


def remote_checkpoints(store: RemoteStore) -> dict[int, bool]:
    """Each remote step_NNNNNN folder's step, and whether it is complete (holds the marker)."""
    fs = store.fs
    fs.invalidate_cache()
    if not fs.exists(store.checkpoints):
        return {}
    names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(store.checkpoints, detail=False)]
    steps = {step for step in map(parse_step, names) if step is not None}
    return {step: fs.exists(f"{store.checkpoint(step)}/{MARKER}") for step in sorted(steps)}


def complete_steps(store: RemoteStore) -> list[int]:
    """The steps of the complete remote checkpoints, oldest first."""
    return [step for step, complete in remote_checkpoints(store).items() if complete]


def read_marker(fs: fsspec.AbstractFileSystem, folder: str) -> dict[str, Any]:
    try:
        return json.loads(read_small_file(fs, f"{folder}/{MARKER}", MAX_MARKER_BYTES))
    except FileNotFoundError as err:
        raise RemoteError(
            f"{folder} holds no {MARKER} marker: its upload did not finish, so it is not used; name a complete "
            "checkpoint or use --resume auto"
        ) from err
    except (ValueError, UnicodeDecodeError) as err:
        raise RemoteError(f"{folder}/{MARKER} is not valid JSON ({err})") from err


def read_small_file(fs: fsspec.AbstractFileSystem, path: str, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes in the store. A FIFO (which would block the
    reader for ever), a device or a folder where the file belongs is a RemoteError, found from its
    listing without opening it; FileNotFoundError when absent."""
    info = fs.info(path)
    if info.get("type") != "file" or not 0 <= (info.get("size") or 0) <= limit:
        raise RemoteError(f"{path} is not a regular file of at most {limit:,} bytes (found: {info.get('type')})")
    return fs.cat_file(path)


# ----------------------------------------------------------------------------------------------
# One store, one run


def owner_path(store: RemoteStore) -> str:
    return f"{store.checkpoints}/{OWNER}"


def store_owner(store: RemoteStore) -> str | None:
    """The id of the run the store belongs to, None for a store no run has claimed."""
    store.fs.invalidate_cache()
    try:
        record = json.loads(read_small_file(store.fs, owner_path(store), 4096))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as err:
        raise RemoteError(f"{owner_path(store)} is not a run record of this trainer ({err})") from err
    run = record.get("run") if isinstance(record, dict) else None
    if not isinstance(run, str) or not run:
        raise RemoteError(f"{owner_path(store)} is not a run record of this trainer (no run id)")
    return run


def store_run(store: RemoteStore, local_run: str | None, resume: str) -> str | None:
    """The run id this launch continues in `store`: its own (`local_run`, read from out_dir), or, for a
    resume on a machine whose out_dir has none yet, the store's. Refused, before anything is read or
    written, when the store belongs to another run: two runs in one store would mix their checkpoints
    and exports. None when neither has one (`claim_store` then makes one)."""
    owner = store_owner(store)
    if owner is None or owner == local_run:
        return local_run
    if local_run is None and resume != "":
        return owner
    raise RemoteError(
        f"checkpoint_remote {store.url} belongs to another run ({owner}; this run is {local_run or 'new'}): a store "
        "holds one run's checkpoints. Choose another --checkpoint_remote, or continue that run with --resume auto "
        "and its own out_dir"
    )


def claim_store(store: RemoteStore, run_id: str) -> None:
    """Record `run_id` as the store's run, and read it back: of two runs claiming at once, one is refused."""
    owner = store_owner(store)
    if owner is None:
        write(store, {owner_path(store): json.dumps({"run": run_id}).encode()}, f"checkpoint_remote: run {run_id}")
        owner = store_owner(store)
    if owner != run_id:
        raise RemoteError(f"checkpoint_remote {store.url} {taken_from(store, owner, run_id)}; choose another")


def take_over_store(store: RemoteStore, old_run: str, new_run: str) -> None:
    """`--resume auto` on an out_dir with no run, through a store of run `old_run` that holds no complete
    checkpoint (that run was stopped before its first upload finished): there is nothing to continue, so
    the launch starts afresh as `new_run`. Says so, naming the unfinished uploads it found (they are never
    resumed from; this run's uploads replace or prune them), and records `new_run` as the store's run,
    read back: a run that took the store meanwhile is not overwritten."""
    partial = [step_name(step) for step, complete in remote_checkpoints(store).items() if not complete]
    found = (
        f"only partial uploads of run {old_run} ({', '.join(partial)}: no {MARKER} marker, their upload never finished)"
        if partial
        else f"no checkpoint of run {old_run}"
    )
    logger.warning(
        "resume auto: checkpoint_remote %s holds %s, nothing to resume: starting afresh at step 0 as a new run %s, "
        "which takes the store over",
        store.url,
        found,
        new_run,
    )
    if (owner := store_owner(store)) != old_run:
        raise RemoteError(f"checkpoint_remote {store.url} {taken_from(store, owner, old_run)}; choose another")
    write(store, {owner_path(store): json.dumps({"run": new_run}).encode()}, f"checkpoint_remote: run {new_run}")
    if (owner := store_owner(store)) != new_run:
        raise RemoteError(f"checkpoint_remote {store.url} {taken_from(store, owner, new_run)}; choose another")


def taken_from(store: RemoteStore, owner: str | None, run_id: str) -> str:
    """Why a store that this run claimed is not its own: another run took it, or its record is gone."""
    if owner is None:
        return (
            f"no longer holds its run record {owner_path(store)} (the store was deleted or emptied meanwhile), so "
            f"it is no longer this run's ({run_id})"
        )
    return f"belongs to another run ({owner}), not to this run ({run_id})"


def check_apart(url: str, out_dir: Path) -> None:
    """A local store (file://) must lie outside out_dir, and out_dir outside the store's folders: a store in
    the run folder would have each upload overwrite the very checkpoint it reads."""
    if not url.startswith("file://"):
        return
    store = open_store(url)
    out = Path(out_dir).resolve()
    root = Path(posixpath.dirname(store.checkpoints)).resolve()
    inside = [Path(store.checkpoints).resolve(), Path(store.export).resolve()]
    if root == out or out in root.parents or any(p == out or p in out.parents for p in inside):
        raise RemoteError(
            f"checkpoint_remote {url} is the run folder {out_dir} or overlaps it; the store must be another folder"
        )


# ----------------------------------------------------------------------------------------------
# Upload, prune, download


def upload_plan(store: RemoteStore, step: int, checkpoint: Path, export: Path, logs: Iterable[Path] = ()) -> list:
    """The writes that mirror one checkpoint, in order, as (what, {remote path: local file or bytes}):
    the checkpoint's files, the HF export, then the marker that makes the checkpoint count."""
    files = local_files(checkpoint)
    files |= {f"{LOGS}/{p.name}": p for p in logs if p.is_file()}
    folder = store.checkpoint(step)
    listing = {name: {"bytes": path.stat().st_size, "sha256": file_sha256(path)} for name, path in files.items()}
    marker = {"step": step, "files": listing}
    state = files.get("train_state.json")
    if state is not None and json.loads(state.read_text()).get("stable") is True:
        marker["stable"] = True  # a wsd run's last checkpoint before its decay: prune keeps it
    return [
        (step_name(step), {f"{folder}/{name}": path for name, path in files.items()}),
        ("HF export", {f"{store.export}/{name}": path for name, path in local_files(export).items()}),
        (MARKER, {f"{folder}/{MARKER}": json.dumps(marker, indent=1).encode()}),
    ]


def upload_checkpoint(
    store: RemoteStore,
    step: int,
    checkpoint: Path,
    export: Path,
    logs: Iterable[Path] = (),
    keep_last: int = 0,
    run_id: str | None = None,
) -> None:
    """Upload one local checkpoint and the export (the checkpoint's files only once: a step already
    complete remotely gets the export alone), then prune old remote checkpoints. With `run_id`, only
    while the store still belongs to that run (`claim_store`): another run never gets our files mixed in."""
    if run_id is not None and (owner := store_owner(store)) != run_id:
        raise RemoteError(f"{store.url} {taken_from(store, owner, run_id)}; nothing uploaded")
    plan = upload_plan(store, step, checkpoint, export, logs)
    found = remote_checkpoints(store)
    if found.get(step):
        plan = plan[1:2]
    elif step in found:  # an upload cut short: start the folder afresh
        write(store, {store.checkpoint(step): None}, f"remove the partial upload of {step_name(step)}")
    for what, changes in plan:
        write(store, changes, f"{step_name(step)}: {what}")
    prune(store, keep_last)


def prune(store: RemoteStore, keep_last: int) -> list[int]:
    """Delete complete checkpoints older than the newest `keep_last` ones (0: keep all) and folders
    without a marker older than the newest complete one. The newest complete one always stays, and so does
    the newest `stable` one (a wsd run's last before its decay, which a longer run continues from)."""
    found = remote_checkpoints(store)
    complete = [step for step, done in found.items() if done]
    if not complete:
        return []
    kept = set(complete[-keep_last:] if keep_last > 0 else complete)
    kept |= {next((step for step in reversed(complete) if marked_stable(store, step)), -1)}
    doomed = [step for step in found if step not in kept and step < complete[-1]]
    if doomed:
        write(store, {store.checkpoint(s): None for s in doomed}, f"prune {', '.join(map(step_name, doomed))}")
    return doomed


def marked_stable(store: RemoteStore, step: int) -> bool:
    """Whether the complete remote checkpoint of `step` is marked `stable` (False when its marker is unreadable)."""
    try:
        marker = read_marker(store.fs, store.checkpoint(step))
    except (RemoteError, OSError):
        return False
    return isinstance(marker, dict) and marker.get("stable") is True


def marker_files(marker: Any, folder: str) -> dict[str, dict[str, Any]]:
    """The marker's file listing, every name checked to stay inside the checkpoint folder: a name with
    `..`, an absolute path or a backslash is refused, so a marker can never choose where we write."""
    files = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(files, dict):
        raise RemoteError(f"{folder}/{MARKER} is not a checkpoint marker (no file listing)")
    for rel, expected in files.items():
        parts = rel.split("/")
        if not rel or rel.startswith("/") or "\\" in rel or any(part in ("", ".", "..") for part in parts):
            raise RemoteError(f"{folder}/{MARKER} names {rel!r}, which is not a plain path inside the checkpoint")
        if not plain_name(rel):
            raise RemoteError(
                f"{folder}/{MARKER} names {rel[:80]!r}, which is not a file name this trainer writes (a NUL or "
                f"control character, not UTF-8, or longer than {MAX_NAME_BYTES} bytes)"
            )
        if not isinstance(expected, dict) or not {"bytes", "sha256"} <= set(expected):
            raise RemoteError(f"{folder}/{MARKER} lists {rel!r} without its bytes and sha256")
    return files


def plain_name(rel: str) -> bool:
    """Whether every part of `rel` is a name any local filesystem takes: UTF-8, no NUL or control
    character, at most MAX_NAME_BYTES bytes."""
    try:
        parts = [part.encode() for part in rel.split("/")]
    except UnicodeEncodeError:  # a lone surrogate, which JSON allows
        return False
    return all(len(part) <= MAX_NAME_BYTES for part in parts) and not any(ord(c) < 32 for c in rel)


def download_checkpoint(fs: fsspec.AbstractFileSystem, folder: str, checkpoints: Path, out_dir: Path) -> Path:
    """A complete remote checkpoint into `checkpoints/step_NNNNNN` (under a temporary name, renamed once
    every file has the size and sha256 its marker lists); its logs into `out_dir`. Returns the folder."""
    name = posixpath.basename(folder.rstrip("/"))
    if parse_step(name) is None:
        raise RemoteError(f"{folder} is not a checkpoint folder (…/step_NNNNNN)")
    files = marker_files(read_marker(fs, folder), folder)
    final, tmp = checkpoints / name, checkpoints / f".tmp_{name}"
    remove_ours(tmp)  # a link planted there is removed, never written through
    targets = {rel: tmp / rel for rel in files}
    try:
        for path in targets.values():
            path.parent.mkdir(parents=True, exist_ok=True)
        fs.get([f"{folder}/{rel}" for rel in targets], [str(p) for p in targets.values()])
    except (OSError, ValueError) as err:  # a listed file missing, unreadable or not a regular file in the store
        remove_ours(tmp)
        raise RemoteError(
            f"{folder}: cannot download the files its {MARKER} lists ({type(err).__name__}: {err})"
        ) from err
    wrong = [
        rel
        for rel, expected in files.items()
        if targets[rel].stat().st_size != expected["bytes"] or file_sha256(targets[rel]) != expected["sha256"]
    ]
    if wrong:
        shutil.rmtree(tmp)
        raise RemoteError(f"{folder}: {', '.join(wrong)} differ from the sizes or sha256 of its {MARKER} marker")
    staged = out_dir / STAGED_LOGS / name  # taken into out_dir by `adopt_logs` once the resume is certain
    remove_ours(staged)
    if (tmp / LOGS).is_dir():
        staged.parent.mkdir(exist_ok=True)
        os.replace(tmp / LOGS, staged)
    if final.is_dir():  # the same step saved locally meanwhile: keep that one
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, final)
    return final


def adopt_logs(out_dir: Path, name: str) -> None:
    """The logs that came with downloaded checkpoint `name` replace out_dir's (each by a rename, so a kill
    leaves the old log or the new one), now that the run resumes from it; the staged logs are then
    removed. Only the run's own log names are taken: a marker cannot place other files in out_dir."""
    staged = out_dir / STAGED_LOGS
    for log in LOG_FILES:
        source = staged / name / log
        if source.is_file() and not source.is_symlink():
            os.replace(source, out_dir / log)
    remove_ours(staged)


def download_url(url: str, checkpoints: Path, out_dir: Path) -> Path:
    """`--resume URL`: the complete checkpoint at `url` (…/step_NNNNNN), downloaded."""
    if url.startswith("file://") and not url.startswith("file:///"):
        raise RemoteError(f"{url}: a file:// URL needs an absolute path (file:///abs/path)")
    if url.startswith("hf://"):
        from huggingface_hub import HfFileSystem

        if reason := offline_reason():  # the Hub client would retry for minutes, then fail deep inside
            raise RemoteError(f"--resume {url} needs the Hub, but {reason}; resume from a local checkpoint instead")
        fs, folder = HfFileSystem(), url[len("hf://") :]
    else:
        fs, folder = filesystem(url)
    return download_checkpoint(fs, folder.rstrip("/"), checkpoints, out_dir)


# ----------------------------------------------------------------------------------------------
# In the background


class CheckpointUploader:
    """Uploads checkpoints in a background thread, at most one at a time, so training does not wait.

    `submit` first snapshots what it uploads into `staging` (hard links where the filesystem allows, as
    the trainer never rewrites a checkpoint or export file in place; the logs are copied, as they grow),
    so that later saves and pruning cannot change an upload under way. A failed upload is logged at once
    and raised by `close` at the end of the run. The thread is not a daemon: an exiting interpreter
    waits for it.
    """

    def __init__(self, store: RemoteStore, staging: Path, keep_last: int, run_id: str | None = None):
        self.store, self.staging, self.keep_last, self.run_id = store, Path(staging), keep_last, run_id
        self.thread: threading.Thread | None = None
        self.errors: list[str] = []
        remove_ours(self.staging)  # left by a run killed mid-upload; a link there is removed, not followed

    def submit(self, step: int, checkpoint: Path, export: Path, logs: Iterable[Path] = ()) -> None:
        self.wait()
        snapshot = self.staging / step_name(step)
        shutil.rmtree(snapshot, ignore_errors=True)
        shutil.copytree(checkpoint, snapshot / "checkpoint", copy_function=link_or_copy)
        shutil.copytree(export, snapshot / "export", copy_function=link_or_copy)
        (snapshot / LOGS).mkdir()
        logs = [Path(shutil.copy(p, snapshot / LOGS)) for p in logs if p.is_file()]
        args = (step, snapshot, logs)
        self.thread = threading.Thread(target=self.upload, args=args, name=f"upload-{step_name(step)}")
        self.thread.start()

    def upload(self, step: int, snapshot: Path, logs: list[Path]) -> None:
        try:
            upload_checkpoint(
                self.store, step, snapshot / "checkpoint", snapshot / "export", logs, self.keep_last, self.run_id
            )
            logger.info("mirrored %s and the HF export to %s", step_name(step), self.store.url)
        except Exception as err:  # reported now and raised by close(): training goes on meanwhile
            self.errors.append(f"{step_name(step)}: {type(err).__name__}: {err}")
            logger.exception("UPLOAD FAILED: %s to %s; the run will end with an error", step_name(step), self.store.url)
        finally:
            shutil.rmtree(snapshot, ignore_errors=True)

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def close(self) -> None:
        """Wait for the upload under way; raise RemoteError if any upload of the run failed."""
        self.wait()
        remove_ours(self.staging)
        if self.errors:
            raise RemoteError(
                f"checkpoint_remote: {len(self.errors)} upload(s) to {self.store.url} failed: "
                + "; ".join(self.errors)
                + ". The local checkpoints are complete; fix the remote and relaunch with --resume auto to mirror "
                "the next one"
            )


def link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst
