"""Where documents come from: a Hub dataset, local files, or the built-in corpus.

Every source becomes a stream (a `datasets.IterableDataset`; for the built-in corpus a `DocumentStream`
with the same methods, so that it needs no `datasets`), so the disk holds only the shards and a
restarted run can skip the documents it has already written with `.skip(n)`.
"""

from __future__ import annotations

import ast
import codecs
import functools
import glob
import itertools
import json
import os
import platform
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.shards import DataPrepError

DEFAULT_DATASET = "HuggingFaceFW/fineweb-edu"
DEFAULT_CONFIG = "sample-10BT"
BUILTIN_NAME = "python-stdlib-docs"


def shared_corpus(name: str) -> Path:
    """A corpus file of the developers' shared folder, for checks and benchmarks only: in
    `$GPT2_SCRATCH_SHARED_DATA` when set, else in `../shared/data/` beside the repository. It may be
    absent; callers skip when it is."""
    folder = os.environ.get("GPT2_SCRATCH_SHARED_DATA")
    root = Path(folder) if folder else Path(__file__).resolve().parents[2] / "shared" / "data"
    return root / name


# `datasets` builder for each local file kind.
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TXT_SAMPLE_BY = ("document", "paragraph", "line")
# What a byte that is not UTF-8 does in a .txt or .jsonl file: stop with its file and offset, become U+FFFD,
# or be dropped (Python's codec error handlers).
ENCODING_ERRORS = ("strict", "replace", "ignore")
# Docstrings shorter than this are mostly one-liners ("Return self."), noise for a corpus.
MIN_DOCSTRING_CHARS = 200


@dataclass
class Source:
    """A stream of documents plus the description that goes into the manifest."""

    dataset: Any  # datasets.IterableDataset, or a DocumentStream
    description: dict[str, Any]
    text_column: str
    num_docs: int | None  # known for the Hub (from its metadata) and the built-in corpus


def resolve_files(patterns: list[str], flag: str = "--files") -> list[Path]:
    """Expand file names and glob patterns in order (each sorted), without duplicates. Each pattern goes to
    `glob` as given: on Windows both `\\` and `/` separate folders there; elsewhere `\\` is part of a name.
    Errors name the option the patterns came from, `flag`."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise DataPrepError(f"{flag}: no file matches '{pattern}'{separator_hint(pattern)}")
        for match in matches:
            path = Path(match).resolve()
            if path.is_dir():
                raise DataPrepError(f"{flag}: {match} is a folder; give files or a glob such as '{match}/*.jsonl'")
            if path not in files:
                files.append(path)
    return files


def separator_hint(pattern: str, sep: str = os.sep) -> str:
    """For a pattern that matched nothing: a Windows-style path on a system whose separator is `/`."""
    if "\\" not in pattern or sep != "/":
        return ""
    return f" (here '\\' is part of a file name, not a folder separator: write '{pattern.replace(chr(92), '/')}')"


def local_source(
    patterns: list[str],
    text_column: str = "text",
    txt_sample_by: str = "document",
    encoding_errors: str = "strict",
    flag: str = "--files",
) -> Source:
    """Stream `.txt`, `.jsonl`/`.json` or `.parquet` files, all of one kind, in the given order.

    A `.txt` file gives one document per file (`document`), per blank-line-separated paragraph
    (`paragraph`) or per line (`line`); its text column is always `text`. Bytes of a `.txt` or `.jsonl`
    file that are not UTF-8 stop the stream (`strict`; see `undecodable`), or are decoded as U+FFFD
    (`replace`) or dropped (`ignore`).
    """
    import datasets

    if encoding_errors not in ENCODING_ERRORS:
        raise DataPrepError(f"encoding_errors must be one of {ENCODING_ERRORS}, got {encoding_errors!r}")
    files = resolve_files(patterns, flag)
    kinds = {path.suffix.lower() for path in files}
    unknown = sorted(k for k in kinds if k not in BUILDERS)
    if unknown:
        raise DataPrepError(f"{flag}: unsupported extension {unknown[0]!r}; use one of {sorted(BUILDERS)}")
    builders = {BUILDERS[k] for k in kinds}
    if len(builders) > 1:
        raise DataPrepError(f"{flag} mixes file kinds {sorted(kinds)}; give one kind at a time")
    builder = builders.pop()
    kwargs: dict[str, Any] = {}
    if builder == "text":
        if txt_sample_by not in TXT_SAMPLE_BY:
            raise DataPrepError(f"txt_sample_by must be one of {TXT_SAMPLE_BY}, got {txt_sample_by!r}")
        kwargs["sample_by"] = txt_sample_by
        text_column = "text"
    if builder in ("text", "json"):
        kwargs["encoding_errors"] = encoding_errors
    if builder == "json" and encoding_errors != "strict":
        # datasets' JSON reader hands UTF-8 bytes to pyarrow as they are and applies encoding_errors only
        # when it re-encodes another encoding; "utf_8" is the same codec under another name, which does.
        kwargs["encoding"] = "utf_8"
    for path in files:
        if path.stat().st_size == 0:
            raise DataPrepError(f"{path} is empty")
    if builder == "text" and txt_sample_by == "document":
        dataset = DocumentStream(lambda: (read_document(path, encoding_errors) for path in files))
    elif kinds == {".jsonl"}:
        dataset = DocumentStream(lambda: (row for path in files for row in read_jsonl_rows(path, encoding_errors)))
    else:
        dataset = datasets.load_dataset(
            builder, data_files=[str(p) for p in files], split="train", streaming=True, **kwargs
        )
    description = {
        "kind": "files",
        "files": [{"path": str(p), "bytes": p.stat().st_size} for p in files],
        "text_column": text_column,
    }
    if builder == "text":
        description["txt_sample_by"] = txt_sample_by
    if encoding_errors != "strict":  # other text, other tokens (absent: the manifests made before the option)
        description["encoding_errors"] = encoding_errors
    return Source(dataset, description, text_column, None)


def read_document(path: Path, encoding_errors: str = "strict") -> str:
    """A .txt file as one document, read as datasets' text builder reads it (UTF-8, universal newlines,
    `encoding_errors`), but held once: that builder keeps the text, an Arrow copy and the Python string
    made from it, three copies of what may be a multi-GB one-line file."""
    with open(path, encoding="utf-8", errors=encoding_errors) as f:
        return f.read()


def read_jsonl_rows(path: Path, encoding_errors: str = "strict") -> Iterator[dict[str, Any]]:
    """The rows of a .jsonl file, one JSON object a line (blank lines skipped), decoded as `read_document`
    decodes text, and read line by line so that a huge line is held as its line and then only as its
    values, not also as datasets' block of bytes, an Arrow copy and the Python strings made from it. A
    line that is not a JSON object is one error naming the file and the line."""
    number = 0
    with open(path, encoding="utf-8", errors=encoding_errors) as f:
        for line in f:  # not enumerate(): its reused result tuple would keep each line alive
            number += 1
            if not line or line.isspace():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataPrepError(f"{path} line {number} is not JSON: {err.msg} (column {err.colno})") from None
            del line
            if not isinstance(row, dict):
                raise DataPrepError(f"{path} line {number} is not a JSON object but {type(row).__name__}")
            yield row


def first_invalid_utf8(path: Path, block: int = 1 << 20) -> tuple[int, str] | None:
    """The byte offset in the file `path` of its first byte that is not UTF-8, and why; None if it all is."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes of the file before `data`
    with open(path, "rb") as f:
        while True:
            data = f.read(block)
            pending = len(decoder.getstate()[0])  # the start of a character cut by the previous block
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as err:
                return offset - pending + err.start, err.reason
            if not data:
                return None
            offset += len(data)


def undecodable(description: dict[str, Any], err: UnicodeDecodeError) -> DataPrepError:
    """The one-line error for bytes that are not UTF-8 in a source: the file and the offset of the first
    such byte (the reader's own offset counts from a chunk it read, not from the file's start)."""
    return undecodable_file(description) or DataPrepError(f"the source is not UTF-8 text: {err}")


def undecodable_file(description: dict[str, Any]) -> DataPrepError | None:
    """The error naming the first file of a files source that is not UTF-8 (a binary file, say), or None."""
    for entry in description.get("files", []) if description.get("kind") == "files" else []:
        found = first_invalid_utf8(Path(entry["path"]))
        if found is not None:
            offset, reason = found
            return DataPrepError(
                f"{entry['path']} is not UTF-8 text: {reason} at byte {offset}; fix the file, or pass "
                "--encoding_errors replace (each bad byte becomes U+FFFD) or ignore (bad bytes are dropped)"
            )
    return None


def hub_source(
    dataset: str,
    config: str | None,
    split: str,
    text_column: str = "text",
    revision: str | None = None,
    hint: str = "Use --files for local files or --builtin for the offline built-in corpus.",
) -> Source:
    """Stream a Hub dataset at `revision`, or at its current one; the revision is pinned in the manifest.

    Fails at once, naming the dataset, when offline instead of waiting on retries.
    """
    import datasets
    from huggingface_hub import HfApi
    from huggingface_hub import constants as hub_constants

    if hub_constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE"):
        raise DataPrepError(f"cannot stream {dataset}: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set. {hint}")
    try:
        # The default branch by name: Hub mirrors (olah) answer only the API's /revision/ form.
        info = HfApi().dataset_info(dataset, revision=revision or "main", timeout=20)
    except Exception as err:  # network errors come from several libraries; all mean the same here
        raise DataPrepError(f"cannot reach the Hub for dataset {dataset!r}: {err}. {hint}") from err
    stream = datasets.load_dataset(dataset, name=config, split=split, streaming=True, revision=info.sha)
    num_docs = None
    splits = getattr(stream.info, "splits", None)
    if splits and split in splits and splits[split].num_examples:
        num_docs = int(splits[split].num_examples)
    description = {
        "kind": "hub",
        "dataset": dataset,
        "config": config,
        "split": split,
        "revision": info.sha,
        "text_column": text_column,
    }
    return Source(stream, description, text_column, num_docs)


@functools.cache
def builtin_documents() -> tuple[str, ...]:
    """The built-in corpus: English prose that ships with every CPython install.

    The `pydoc_data.topics` help pages (the text behind `help("if")`), then the longer
    module, class and function docstrings of the top-level standard-library modules, read
    with `ast` so that no module is imported. About 340k GPT-2 tokens on Python 3.11. Parsed once
    per process (a few CPU seconds): a streaming run reads it for its validation tokens, then for
    every epoch.
    """
    from pydoc_data import topics

    docs = [topics.topics[key] for key in sorted(topics.topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):  # e.g. lib2to3 test fixtures in some builds
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                    docs.append(doc)
    return tuple(docs)


class DocumentStream:
    """Documents (strings) or rows (dicts) read lazily from `documents()`, with the methods of
    `datasets.IterableDataset` that `prepare` and `stream` use (`skip`, `take`, `iter`, `state_dict`,
    `load_state_dict`), so that the built-in corpus needs no `datasets` (machines without it, such as the
    GPU image, prepare it too), and a `.txt` document or `.jsonl` row is read by us, held once."""

    def __init__(self, documents: Callable[[], Iterable[str]], start: int = 0, stop: int | None = None) -> None:
        self.documents, self.start, self.stop = documents, start, stop
        self.position = 0  # documents after `start` that `iter` has yielded (or `load_state_dict` set)

    def state_dict(self) -> dict[str, int]:
        """Where the next `iter` begins, as `datasets.IterableDataset.state_dict` says it for a Hub stream."""
        return {"doc": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["doc"])

    def skip(self, n: int) -> DocumentStream:
        start = self.start + n
        return DocumentStream(self.documents, start if self.stop is None else min(start, self.stop), self.stop)

    def take(self, n: int) -> DocumentStream:
        stop = self.start + n
        return DocumentStream(self.documents, self.start, stop if self.stop is None else min(stop, self.stop))

    def iter(self, batch_size: int) -> Iterator[dict[str, list[Any]]]:
        docs = itertools.islice(self.documents(), self.start + self.position, self.stop)
        while batch := list(itertools.islice(docs, batch_size)):
            self.position += len(batch)
            yield as_columns(batch)


def as_columns(batch: list[str | dict[str, Any]]) -> dict[str, list[Any]]:
    """A batch column by column, as `datasets` gives it: strings are documents of the column `text`;
    dicts are rows, and a row without a column holds None there."""
    if all(isinstance(doc, str) for doc in batch):
        return {"text": batch}
    rows = [doc if isinstance(doc, dict) else {"text": doc} for doc in batch]
    names = dict.fromkeys(name for row in rows for name in row)
    return {name: [row.get(name) for row in rows] for name in names}


def builtin_source() -> Source:
    """The built-in corpus as a lazy stream (see `builtin_documents`): nothing is parsed until read,
    so a re-run over complete shards returns at once."""
    description = {"kind": "builtin", "name": BUILTIN_NAME, "python": platform.python_version()}
    return Source(DocumentStream(builtin_documents), description, "text", None)
