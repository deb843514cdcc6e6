"""Token shard files and the manifest that lists them.

Shard format (the one llm.c's `fineweb.py` writes, so its data loader can read ours):

    bytes 0..1023   header: 256 little-endian int32; [0] = 20240520 (magic), [1] = 1 (version:
                    uint16 GPT-2 tokens), [2] = number of tokens N, the rest zero
    bytes 1024..    N little-endian uint16 tokens

`manifest.json` in the same folder lists the shards in stream order with their split, token
count and the sha256 of the whole file, plus the tokenizer and the source they were made from.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gpt2_scratch.training.files import writing
from gpt2_scratch.user_errors import UserError

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
# The header stores the count as int32, as llm.c does.
MAX_SHARD_TOKENS = 2**31 - 1
TOKEN_DTYPE = np.dtype("<u2")

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT_VERSION = 1
TOKENIZER_NAME = "gpt2"
SPLITS = ("val", "train")


class DataPrepError(UserError):
    """A data source, shard or manifest is not what `data_prep` expects."""


class ShardError(DataPrepError):
    """A shard file is truncated, has a bad header or does not match its manifest entry."""


@contextlib.contextmanager
def reading(path: str | os.PathLike) -> Iterator[None]:
    """An OS error while reading `path` (no read permission, an I/O error) as one line naming the file."""
    try:
        yield
    except OSError as err:
        raise DataPrepError(
            f"{path} cannot be read ({err.strerror or err}); check its permissions (and the disk), or re-run "
            "`python -m data_prep` to write the folder again"
        ) from err


def shard_header(num_tokens: int) -> np.ndarray:
    """The 256-int32 header for a shard of `num_tokens` tokens."""
    if not 0 <= num_tokens <= MAX_SHARD_TOKENS:
        raise ValueError(f"a shard holds 0 to {MAX_SHARD_TOKENS} tokens, got {num_tokens}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, num_tokens)
    return header


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> str:
    """Write `tokens` (uint16) as a shard at `path`; return the file's sha256.

    The bytes go to `<path>.tmp` first and are renamed only once complete and flushed, so a
    killed writer never leaves a file under the final name that looks like a whole shard.
    """
    path = Path(path)
    tokens = np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE)
    header = shard_header(len(tokens)).tobytes()
    payload = memoryview(tokens).cast("B")
    digest = hashlib.sha256(header)
    digest.update(payload)
    tmp = path.with_name(path.name + ".tmp")
    with writing(path.parent, f"the shard {path.name}", partial=[tmp], needed=len(header) + len(payload)):
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    return digest.hexdigest()


def read_header(path: str | os.PathLike) -> int:
    """Check a shard's header and size; return its token count.

    Raises `ShardError` for a missing file, a bad magic number or version, or a file size that
    disagrees with the header's token count.
    """
    path = Path(path)
    with reading(path):  # a folder on the way without search permission: PermissionError here already
        if not path.is_file():
            raise ShardError(f"shard not found: {path}")
        size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: truncated header ({size} bytes, a shard header is {HEADER_BYTES} bytes)")
    with reading(path), open(path, "rb") as f:
        header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
    magic, version, num_tokens = (int(v) for v in header[:3])
    if magic != MAGIC:
        raise ShardError(f"{path}: bad header, magic number {magic}, expected {MAGIC}; not a data_prep/llm.c shard")
    if version != VERSION:
        raise ShardError(f"{path}: unsupported shard version {version}, expected {VERSION} (uint16 GPT-2 tokens)")
    expected = HEADER_BYTES + num_tokens * TOKEN_DTYPE.itemsize
    if size < expected:
        raise ShardError(
            f"{path}: truncated, header says {num_tokens} tokens ({expected} bytes) but the file has {size} bytes; "
            "re-run `python -m data_prep` with the same arguments to rewrite it"
        )
    if size > expected:
        raise ShardError(f"{path}: {size - expected} bytes after the {num_tokens} tokens its header announces")
    return num_tokens


def load_tokens(path: str | os.PathLike, mmap: bool = False) -> np.ndarray:
    """Read one shard's tokens as a uint16 array, after checking its header and size.

    With `mmap=True` the array is a read-only `numpy.memmap`, so only the pages used are read.
    """
    num_tokens = read_header(path)
    if mmap:
        if num_tokens == 0:
            return np.zeros(0, dtype=TOKEN_DTYPE)
        with reading(path):
            return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(num_tokens,))
    with reading(path), open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        return np.fromfile(f, dtype=TOKEN_DTYPE, count=num_tokens)


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with reading(path), open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def check_shard(
    data_dir: str | os.PathLike, entry: dict[str, Any], verify_hash: bool = True, vocab_size: int | None = None
) -> Path:
    """Check one manifest entry's file (header, size, token count, optionally sha256 and that every token
    id is below `vocab_size`); return its path."""
    path = Path(data_dir) / entry["file"]
    num_tokens = read_header(path)
    if num_tokens != entry["tokens"]:
        raise ShardError(f"{path}: header says {num_tokens} tokens, manifest.json says {entry['tokens']}")
    if verify_hash:
        found = file_sha256(path)
        if found != entry["sha256"]:
            raise ShardError(
                f"{path}: sha256 {found} does not match manifest.json ({entry['sha256']}); the file changed after "
                "it was written. Re-run `python -m data_prep` with the same arguments to rewrite it"
            )
    if vocab_size is not None and num_tokens:
        largest = int(load_tokens(path, mmap=True).max())
        if largest >= vocab_size:
            raise ShardError(
                f"{path}: token id {largest} is outside the model's vocabulary of {vocab_size}; the shard was made "
                "with another tokenizer or is damaged"
            )
    return path


def write_manifest(data_dir: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """Write `manifest.json` atomically (temporary name, then rename)."""
    path = Path(data_dir) / MANIFEST_NAME
    tmp = path.with_name(path.name + ".tmp")
    with writing(path.parent, MANIFEST_NAME, partial=[tmp]):
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check `data_dir/manifest.json`: format version, tokenizer and the shard entries."""
    path = Path(data_dir) / MANIFEST_NAME
    with reading(path):
        found = path.is_file()
    if not found:
        raise DataPrepError(
            f"no {MANIFEST_NAME} in {Path(data_dir)}; make the shards with `python -m data_prep --out_dir {data_dir}`"
        )
    with reading(path):
        content = path.read_bytes()
    return parse_manifest(content, str(path))


def parse_manifest(content: bytes, path: str) -> dict[str, Any]:
    """The manifest in `content` (the bytes of `path`, a local file or a URL), checked as `read_manifest` says."""
    try:
        manifest = json.loads(content.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise DataPrepError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    except json.JSONDecodeError as err:
        raise DataPrepError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(manifest, dict):
        raise DataPrepError(f"{path} holds a JSON {type(manifest).__name__}, not an object with the shard list")
    for key in ("format_version", "tokenizer", "source", "shards"):
        if key not in manifest:
            raise DataPrepError(f"{path}: missing key {key!r}")
    if manifest["format_version"] != MANIFEST_FORMAT_VERSION:
        raise DataPrepError(
            f"{path}: format_version {manifest['format_version']!r}, this code reads {MANIFEST_FORMAT_VERSION}"
        )
    if manifest["tokenizer"] != TOKENIZER_NAME:
        raise DataPrepError(f"{path}: tokenizer {manifest['tokenizer']!r}, expected {TOKENIZER_NAME!r}")
    if not isinstance(manifest["shards"], list):
        raise DataPrepError(f"{path}: shards is a {type(manifest['shards']).__name__}, expected a list of entries")
    for i, entry in enumerate(manifest["shards"]):
        if not isinstance(entry, dict):
            raise DataPrepError(f"{path}: shards[{i}] is a {type(entry).__name__}, expected an object")
        for key, kind in (("file", str), ("split", str), ("tokens", int), ("sha256", str)):
            if key not in entry:
                raise DataPrepError(f"{path}: shards[{i}] has no key {key!r}")
            if not isinstance(entry[key], kind) or isinstance(entry[key], bool):
                raise DataPrepError(f"{path}: shards[{i}].{key} is {entry[key]!r}, expected a {kind.__name__}")
        if entry["split"] not in SPLITS:
            raise DataPrepError(f"{path}: shards[{i}] split {entry['split']!r}, expected one of {SPLITS}")
    return manifest


def verify_shards(data_dir: str | os.PathLike) -> dict[str, int]:
    """Check every shard in the manifest, sha256 included; return the token count per split."""
    manifest = read_manifest(data_dir)
    totals = dict.fromkeys(SPLITS, 0)
    for entry in manifest["shards"]:
        check_shard(data_dir, entry, verify_hash=True)
        totals[entry["split"]] += entry["tokens"]
    return totals
