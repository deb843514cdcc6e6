"""Token shards in a remote store: read them for training, and publish a folder that `data_prep` made.

A data URL names a folder that holds `manifest.json` and the shards it lists, exactly as `data_prep`
writes them locally:

    hf://datasets/user/name[@revision][/folder]   a Hub dataset repository (huggingface_hub's HfFileSystem)
    s3://bucket/path   needs s3fs          gs://bucket/path   needs gcsfs          file:///abs/path

A Hub revision (a branch, a tag or a commit; default `main`) is resolved once to its commit, and every
read goes to that commit: the data cannot change under a run, and the commit is what a resume checks.

Every request to the store goes through `Retrying`: a failing request is retried with exponential
backoff; a throttled one (HTTP 429, S3's SlowDown) waits four times as long and slows the requests after
it too, so a store that asks for fewer requests gets fewer. After the last retry one `StoreError`.

Publishing (`upload_folder`) writes the shards first and the manifest last, so a reader never sees a
manifest that names a shard not yet there; a shard already in the store with the right size is not sent
again, so an interrupted upload resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import fsspec

from data_prep.shards import (
    HEADER_BYTES,
    MANIFEST_NAME,
    SPLITS,
    TOKEN_DTYPE,
    DataPrepError,
    ShardError,
    file_sha256,
    parse_manifest,
    read_manifest,
)

logger = logging.getLogger("data_prep.store")

T = TypeVar("T")
CARD_NAME = "README.md"
UPLOAD_RECORD = ".data_prep_upload.json"  # what an upload has sent, for its resume (`upload_record`)
MAX_MANIFEST_BYTES = 64_000_000  # 100 shards of FineWeb-Edu list in 20 kB; a bigger file is not ours
COMMIT = re.compile(r"[0-9a-f]{40}")
PLAIN_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")  # what data_prep names a shard: never a path


class StoreError(DataPrepError):
    """A data store cannot be reached, or does not hold what its manifest lists."""


def is_url(data_dir: str | os.PathLike) -> bool:
    """Whether `data_dir` names a store by URL (`proto://...`) rather than a local folder."""
    return "://" in str(data_dir)


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec's filesystem and path for `url`, with an error that names the package a protocol needs."""
    from fsspec.registry import known_implementations

    protocol = url.split("://", 1)[0] if "://" in url else ""
    if not protocol:
        raise StoreError(f"{url!r} is not a URL: give the protocol, e.g. file:///abs/path, hf://user/name, s3://b/p")
    if protocol == "file" and not url.startswith("file:///"):
        raise StoreError(f"{url}: a file:// URL needs an absolute path (file:///abs/path)")
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as err:
        package = known_implementations.get(protocol, {}).get("class", protocol).split(".")[0]
        raise StoreError(f"{url}: {protocol}:// needs the {package} package: pip install {package}") from err
    except ValueError as err:
        raise StoreError(f"{url}: unknown protocol {protocol!r} ({err}); use file://, hf://, s3:// or gs://") from err


# ----------------------------------------------------------------------------------------------
# Retries


def http_status(err: BaseException) -> int | None:
    """The HTTP status behind a filesystem's error, where it says (httpx, aiohttp, botocore)."""
    for candidate in (err, err.__cause__, err.__context__):
        if candidate is None:
            continue
        response = getattr(candidate, "response", None)
        status = getattr(response, "status_code", None) or getattr(candidate, "status", None)
        if isinstance(status, int):
            return status
        if isinstance(response, dict):  # botocore's ClientError
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(status, int):
                return status
    return None


def throttled(err: BaseException) -> bool:
    """Whether the store asked us to slow down (HTTP 429, or S3's 503 SlowDown)."""
    text = f"{type(err).__name__} {err}"
    return http_status(err) == 429 or any(word in text for word in ("SlowDown", "Too Many Requests", "Throttl"))


def permanent(err: BaseException) -> bool:
    """Errors that another try cannot fix: a missing file, no permission, a client error other than 408/429."""
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, DataPrepError)):
        return True
    if type(err).__name__ == "OfflineModeIsEnabled":  # huggingface_hub's: no request was even sent
        return True
    status = http_status(err)
    return status is not None and 400 <= status < 500 and status not in (408, 429)


@dataclass
class Retrying:
    """Run store requests with retries: `retries` more tries after the first, waiting `base` seconds,
    doubling each time up to `cap`; a throttled request waits four times as long, and the slowdown
    stays for later requests (halving with each success). `waited` sums the seconds slept."""

    retries: int = 5
    base: float = 1.0
    cap: float = 60.0
    slowdown: float = 1.0
    waited: float = 0.0
    log: Callable[[str], None] = field(default=logger.warning)

    def __call__(self, what: str, request: Callable[[], T]) -> T:
        for attempt in range(self.retries + 1):
            if self.slowdown > 1:  # the store throttled us: space the requests out
                self.sleep(min(self.cap, self.base * (self.slowdown - 1)))
            try:
                result = request()
            except Exception as err:
                if permanent(err):
                    raise
                if attempt == self.retries:
                    raise StoreError(
                        f"{what}: failed after {attempt + 1} tries ({type(err).__name__}: {err}); the store is "
                        "unreachable or failing. Check the URL, the network and the credentials, then relaunch "
                        "(with --resume auto, a run goes on from its newest checkpoint)"
                    ) from err
                delay = self.base * 2**attempt
                if throttled(err):
                    self.slowdown = min(self.slowdown * 4, 64.0)
                    delay *= 4
                delay = min(self.cap, delay)
                self.log(f"{what}: {type(err).__name__}: {err}; retry {attempt + 1} of {self.retries} in {delay:.1f}s")
                self.sleep(delay)
            else:
                self.slowdown = max(1.0, self.slowdown / 2)
                return result
        raise AssertionError("unreachable")

    def sleep(self, seconds: float) -> None:
        self.waited += seconds
        time.sleep(seconds)


# ----------------------------------------------------------------------------------------------
# Opening a store


@dataclass
class DataStore:
    """An opened data URL: the filesystem, the folder in it, and for hf:// the repository and the commit
    every read goes to."""

    url: str
    fs: fsspec.AbstractFileSystem
    root: str
    repo_id: str | None = None
    revision: str | None = None  # hf://: the commit the requested revision resolved to

    def path(self, name: str) -> str:
        return f"{self.root}/{name}" if self.root else name

    @property
    def pinned_url(self) -> str:
        """The URL with a Hub revision replaced by its commit: the same bytes whenever it is read."""
        if self.repo_id is None:
            return self.url
        folder = self.root.split("/", 3)[3] if self.root.count("/") >= 3 else ""
        return f"hf://datasets/{self.repo_id}@{self.revision}" + (f"/{folder}" if folder else "")


def open_data_store(url: str, retrying: Retrying | None = None, resolve: bool = True) -> DataStore:
    """The store of a data URL. For hf://, with `resolve`, the revision is resolved to its commit (one
    request); a missing repository or revision, or offline mode, is a StoreError naming it."""
    protocol = url.split("://", 1)[0]
    if protocol != "hf":
        fs, root = filesystem(url)
        return DataStore(url, fs, root.rstrip("/"))
    from huggingface_hub import HfFileSystem
    from huggingface_hub.utils import parse_hf_uri

    try:
        uri = parse_hf_uri(url)
    except ValueError as err:
        raise StoreError(f"{url}: {err}; expected hf://datasets/user/name[@revision][/folder]") from err
    if uri.type != "dataset":
        raise StoreError(f"{url}: a {uri.type} repository; token shards live in a dataset: hf://datasets/user/name")
    folder = uri.path_in_repo.strip("/")
    commit = uri.revision if uri.revision and COMMIT.fullmatch(uri.revision) else None
    if commit is None and resolve:
        commit = resolve_revision(url, uri.id, uri.revision or "main", retrying or Retrying())
    root = f"datasets/{uri.id}@{quote(commit or uri.revision or 'main', safe='')}" + (f"/{folder}" if folder else "")
    return DataStore(url, HfFileSystem(), root, uri.id, commit)


def resolve_revision(url: str, repo_id: str, revision: str, retrying: Retrying) -> str:
    """The commit that a dataset repository's branch or tag names now."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if constants.is_offline_mode():
        raise StoreError(f"{url} is on the Hub, but offline mode is on (HF_HUB_OFFLINE); use a local --data_dir")
    api = HfApi()
    try:
        return retrying(f"{url}: resolving {revision}", lambda: api.dataset_info(repo_id, revision=revision).sha)
    except OfflineModeIsEnabled as err:
        raise StoreError(f"{url} is on the Hub, but offline mode is on; use a local --data_dir") from err
    except HfHubHTTPError as err:
        raise StoreError(
            f"{url}: no dataset repository {repo_id!r} with revision {revision!r} on {constants.ENDPOINT} "
            f"(HTTP {http_status(err)}); check the name, the revision and that you are logged in for a private one"
        ) from err


def read_store_manifest(store: DataStore, retrying: Retrying) -> dict[str, Any]:
    """The store's manifest, checked as a local one is, and its shard names checked to be plain file names."""
    where = f"{store.url.rstrip('/')}/{MANIFEST_NAME}"

    def read() -> bytes:
        info = store.fs.info(store.path(MANIFEST_NAME))
        if info.get("type") != "file" or not 0 <= (info.get("size") or 0) <= MAX_MANIFEST_BYTES:
            raise StoreError(f"{where} is not a file of at most {MAX_MANIFEST_BYTES:,} bytes")
        return store.fs.cat_file(store.path(MANIFEST_NAME))

    try:
        content = retrying(f"reading {where}", read)
    except FileNotFoundError as err:
        raise StoreError(
            f"no {MANIFEST_NAME} at {store.url}: not a folder that data_prep made (or its upload did not finish); "
            "publish one with `python -m data_prep --upload URL --out_dir FOLDER`"
        ) from err
    manifest = parse_manifest(content, where)
    if not manifest.get("complete", True):
        raise StoreError(f"{where} is of an unfinished data_prep run; finish it locally, then upload again")
    seen = set()
    for entry in manifest["shards"]:
        name = entry["file"]
        if not PLAIN_FILE.fullmatch(name) or name in (MANIFEST_NAME, CARD_NAME):
            raise StoreError(f"{where} names {name[:80]!r}, which is not a plain shard file name")
        if name in seen:
            raise StoreError(f"{where} names the shard {name!r} twice")
        seen.add(name)
    return manifest


def shard_bytes(entry: dict[str, Any]) -> int:
    """The size of a shard file from its manifest entry."""
    return HEADER_BYTES + entry["tokens"] * TOKEN_DTYPE.itemsize


def listing(store: DataStore, retrying: Retrying) -> dict[str, int | None]:
    """The size of each file in the store's folder, by name; empty where the folder is not there (yet)."""

    def ls() -> list[dict[str, Any]]:
        store.fs.invalidate_cache()
        try:
            return store.fs.ls(store.root, detail=True)
        except FileNotFoundError:  # an object store has no empty folders
            return []

    items = retrying(f"listing {store.url}", ls)
    return {posixpath.basename(item["name"].rstrip("/")): item.get("size") for item in items}


def check_listing(store: DataStore, manifest: dict[str, Any], retrying: Retrying) -> None:
    """Every shard the manifest lists is in the store with the size its token count gives (one listing)."""
    sizes = listing(store, retrying)
    for entry in manifest["shards"]:
        found, expected = sizes.get(entry["file"]), shard_bytes(entry)
        if found is None:
            raise StoreError(f"{store.url}: shard {entry['file']} is listed in {MANIFEST_NAME} but not in the store")
        if found != expected:
            raise StoreError(
                f"{store.url}: shard {entry['file']} is {found:,} bytes, its {MANIFEST_NAME} entry "
                f"({entry['tokens']:,} tokens) makes it {expected:,}"
            )


def fetch_shard(store: DataStore, entry: dict[str, Any], target: Path, retrying: Retrying) -> None:
    """Download one shard to `target` (through `target`.tmp, renamed once its size and sha256 match the
    manifest). A mismatch is fetched once more; a second one is a ShardError naming the shard."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    source = store.path(entry["file"])
    for attempt in (1, 2):
        tmp.unlink(missing_ok=True)
        try:
            retrying(f"fetching {entry['file']} from {store.url}", lambda: store.fs.get_file(source, str(tmp)))
        except FileNotFoundError as err:
            raise StoreError(f"{store.url}: shard {entry['file']} is not in the store") from err
        size = tmp.stat().st_size
        found = file_sha256(tmp) if size == shard_bytes(entry) else None
        if found == entry["sha256"]:
            os.replace(tmp, target)
            return
        what = f"sha256 {found}" if found else f"{size:,} bytes instead of {shard_bytes(entry):,}"
        logger.warning("%s from %s: %s (try %d of 2)", entry["file"], store.url, what, attempt)
    tmp.unlink(missing_ok=True)
    raise ShardError(
        f"{store.url}: shard {entry['file']} does not match its {MANIFEST_NAME} entry ({what}, expected sha256 "
        f"{entry['sha256']}) after fetching it twice; the store's copy is damaged or was changed: re-upload it"
    )


# ----------------------------------------------------------------------------------------------
# Publishing


def dataset_card(manifest: dict[str, Any], url: str) -> str:
    """A dataset card (README.md) for a folder of shards: source, tokenizer, token counts and how to stream it."""
    totals = dict.fromkeys(SPLITS, 0)
    for entry in manifest["shards"]:
        totals[entry["split"]] += entry["tokens"]
    source = manifest["source"]
    name = source.get("dataset") or source.get("name") or source.get("kind") if isinstance(source, dict) else source
    revision = source.get("revision") if isinstance(source, dict) else None
    return f"""---
tags:
- gpt2
- tokenized
---
# GPT-2 token shards

Made by gpt2-scratch's `python -m data_prep`: every document preceded by
`<|endoftext|>` (50256), tokenized with the `{manifest["tokenizer"]}` BPE, stored as uint16 in shards of
the llm.c format (a 1,024-byte header, then the tokens). `manifest.json` lists every shard with its split,
token count and sha256.

| | |
| --- | --- |
| source | `{name}` |
| source revision streamed | `{revision or "not a Hub dataset"}` |
| source, in full | `{json.dumps(source)}` |
| tokenizer | `{manifest["tokenizer"]}` |
| shards | {len(manifest["shards"])} |
| validation tokens | {totals["val"]:,} |
| training tokens | {totals["train"]:,} |
| documents | {manifest.get("documents", "not recorded")} |

## Training on it

    python train_accelerate.py --data_dir {url} [--data_cache_gb 40]

The trainer resolves the revision to a commit and records it in `run_info.json`: a resume reads the same
commit's bytes, and refuses a repository that changed. Pin a revision with `{url}@<commit>`.
"""


def upload_folder(
    out_dir: str | os.PathLike, url: str, retrying: Retrying | None = None, private: bool = True
) -> list[str]:
    """Publish a folder that data_prep made to `url`: each shard not yet there with the right size, then
    the dataset card, then `manifest.json` last. Returns the names of the files sent.

    The local shards are checked against the manifest (sha256) first: nothing damaged is published."""
    from data_prep.shards import verify_shards

    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if not manifest.get("complete", True):
        raise StoreError(f"{out_dir} is incomplete: finish it by re-running `python -m data_prep` first")
    verify_shards(out_dir)
    retrying = retrying or Retrying()
    if url.startswith("hf://"):
        return push_folder_to_hub(out_dir, manifest, url, retrying, private)
    store = open_data_store(url, retrying)
    fs = store.fs
    retrying(f"creating {url}", lambda: fs.makedirs(store.root, exist_ok=True))
    check_same_data(store, out_dir, retrying)
    there, record = listing(store, retrying), upload_record(store, retrying)
    sent = []
    for entry in manifest["shards"]:
        if there.get(entry["file"]) == shard_bytes(entry) and record.get(entry["file"]) == entry["sha256"]:
            continue  # these very bytes were sent by an earlier, interrupted upload
        local, remote = str(out_dir / entry["file"]), store.path(entry["file"])
        retrying(f"uploading {entry['file']}", lambda local=local, remote=remote: fs.put_file(local, remote))
        sent.append(entry["file"])
        record[entry["file"]] = entry["sha256"]
        body = json.dumps(record, indent=1).encode()
        retrying(f"uploading {UPLOAD_RECORD}", lambda body=body: fs.pipe_file(store.path(UPLOAD_RECORD), body))
    card = dataset_card(manifest, url).encode()
    retrying(f"uploading {CARD_NAME}", lambda: fs.pipe_file(store.path(CARD_NAME), card))
    body = (out_dir / MANIFEST_NAME).read_bytes()
    retrying(f"uploading {MANIFEST_NAME}", lambda: fs.pipe_file(store.path(MANIFEST_NAME), body))
    return [*sent, CARD_NAME, MANIFEST_NAME]


def upload_record(store: DataStore, retrying: Retrying) -> dict[str, str]:
    """The sha256 of each shard that an upload has sent to `store` (`UPLOAD_RECORD`, rewritten after each
    shard): a shard there of the right size is skipped on resume only when it holds the bytes this
    upload would send, never those of another data set's upload that was cut short there."""
    fs = store.fs
    try:
        record = json.loads(retrying(f"reading {UPLOAD_RECORD}", lambda: fs.cat_file(store.path(UPLOAD_RECORD))))
    except FileNotFoundError:
        return {}
    except ValueError:  # not ours, or cut: every shard is sent again
        return {}
    if not isinstance(record, dict):
        return {}
    return {name: sha for name, sha in record.items() if isinstance(name, str) and isinstance(sha, str)}


def hub_file_holds(item: Any, entry: dict[str, Any], local: Path) -> bool:
    """Whether the Hub file `item` (of `list_repo_tree`) holds shard `entry`'s bytes, by its LFS sha256 or,
    for a file stored in git itself, its git blob id, never by its size alone."""
    if getattr(item, "size", None) != shard_bytes(entry):
        return False
    lfs = getattr(item, "lfs", None)
    if lfs is not None:
        return getattr(lfs, "sha256", None) == entry["sha256"]
    blob = hashlib.sha1(b"blob %d\0" % shard_bytes(entry))
    blob.update(local.read_bytes())
    return getattr(item, "blob_id", None) == blob.hexdigest()


def check_same_data(store: DataStore, out_dir: Path, retrying: Retrying) -> None:
    """A store that already holds a manifest must hold this folder's: an upload never mixes two data sets."""
    try:
        there = read_store_manifest(store, retrying)
    except StoreError as err:
        if isinstance(err.__cause__, FileNotFoundError):
            return  # nothing published there yet, or an upload cut short before its manifest
        raise
    if there["shards"] != read_manifest(out_dir)["shards"]:
        raise StoreError(
            f"{store.url} already holds another data set (its {MANIFEST_NAME} lists other shards); upload to "
            "another URL, or delete that one first"
        )


def push_folder_to_hub(
    out_dir: Path, manifest: dict[str, Any], url: str, retrying: Retrying, private: bool = True
) -> list[str]:
    """hf://datasets/user/name[@branch][/folder]: the repository created if absent (private unless asked),
    each shard not yet there in a commit of its own (an interrupted push keeps what it sent), then one
    commit of the card and the manifest."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants
    from huggingface_hub.errors import EntryNotFoundError
    from huggingface_hub.utils import parse_hf_uri

    uri = parse_hf_uri(url)
    if uri.type != "dataset":
        raise StoreError(f"{url}: shards are published to a dataset repository: hf://datasets/user/name")
    if constants.is_offline_mode():
        raise StoreError(f"{url}: publishing needs the Hub, but offline mode is on (HF_HUB_OFFLINE)")
    api, folder = HfApi(), uri.path_in_repo.strip("/")
    retrying(f"creating {uri.id}", lambda: api.create_repo(uri.id, repo_type="dataset", private=private, exist_ok=True))
    if uri.revision:
        retrying(
            f"creating branch {uri.revision}",
            lambda: api.create_branch(uri.id, repo_type="dataset", branch=uri.revision, exist_ok=True),
        )
    prefix = f"{folder}/" if folder else ""

    def ls() -> list:
        try:
            return list(api.list_repo_tree(uri.id, folder or None, repo_type="dataset", revision=uri.revision))
        except EntryNotFoundError:  # the folder is not there yet
            return []

    tree = retrying(f"listing {uri.id}", ls)
    there = {item.path: item for item in tree}
    sent = []
    for entry in manifest["shards"]:  # one commit per shard: an interrupted push keeps the shards it sent
        name = f"{prefix}{entry['file']}"
        if name in there and hub_file_holds(there[name], entry, out_dir / entry["file"]):
            continue
        operation = CommitOperationAdd(name, str(out_dir / entry["file"]))
        message = f"data_prep: {entry['file']}"
        retrying(
            f"uploading {entry['file']}",
            lambda operation=operation, message=message: api.create_commit(
                uri.id, [operation], commit_message=message, repo_type="dataset", revision=uri.revision
            ),
        )
        sent.append(entry["file"])
    card = CommitOperationAdd(f"{prefix}{CARD_NAME}", dataset_card(manifest, url).encode())
    last = CommitOperationAdd(f"{prefix}{MANIFEST_NAME}", str(out_dir / MANIFEST_NAME))
    retrying(
        f"uploading {MANIFEST_NAME}",
        lambda: api.create_commit(
            uri.id, [card, last], commit_message="data_prep: manifest", repo_type="dataset", revision=uri.revision
        ),
    )
    return [*sent, CARD_NAME, MANIFEST_NAME]
