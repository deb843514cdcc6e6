"""transformers' own common model tests, taken from the source distribution of the installed version.

The repository holds none of transformers' code: `load_transformers_tests()` downloads the sdist of the
installed version from PyPI (`pip download --no-deps --no-binary :all: transformers==VERSION`) once into a
cache folder outside the repository, extracts the few files of its `tests/` tree that the contract test
uses, and imports them as the package `tests`, as transformers' own test run does. The pieces of
transformers' test tree that the sdist lacks and those files import are our stand-ins
(`transformers_standins.py`). Anything that keeps the files from being had (no network, no pip, a
different sdist layout) is a `TransformersTestsUnavailable` whose message says what and why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from importlib import import_module
from pathlib import Path

import transformers

# The files of the sdist's tests/ tree that the contract test imports.
NEEDED = ("test_modeling_common.py", "test_configuration_common.py", "test_pipeline_mixin.py")
# The modules of transformers' test tree that those files import and the sdist lacks: each is our
# `transformers_standins` module.
STANDIN_MODULES = (
    "tests.generation",
    "tests.generation.test_utils",
    "tests.exporters",
    "tests.exporters.test_export",
    "tests.utils",
    "tests.utils.test_configuration_utils",
    "tests.pipelines",
    "tests.pipelines.test_pipelines_text_generation",
)
DOWNLOAD_TIMEOUT_S = 300


class TransformersTestsUnavailable(RuntimeError):
    """transformers' test files for the installed version cannot be had here; the message says why."""


def cache_root() -> Path:
    """Where tests keep what they fetch from PyPI between runs: `$GPT2_SCRATCH_CACHE` or
    `~/.cache/gpt2-scratch` (XDG), outside the repository."""
    base = os.environ.get("GPT2_SCRATCH_CACHE")
    if base is None:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpt2-scratch"
    return Path(base)


def cache_dir() -> Path:
    """`cache_root()`, then `transformers-tests/VERSION`."""
    return cache_root() / "transformers-tests" / transformers.__version__


def fetch_tests(version: str = transformers.__version__) -> Path:
    """The extracted `tests/` folder of transformers' sdist `version`, downloaded on the first call."""
    folder = cache_dir() / "tests"
    if all((folder / name).is_file() for name in NEEDED):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as work:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        command += ["--disable-pip-version-check", "--timeout", "20", "-d", work, f"transformers=={version}"]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise TransformersTestsUnavailable(f"`pip download` of transformers=={version} did not finish: {err}")  # noqa: B904
        archives = sorted(Path(work).glob(f"transformers-{version}.tar.gz"))
        if result.returncode != 0 or not archives:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise TransformersTestsUnavailable(
                f"`pip download` of the transformers=={version} sdist failed (offline?): {last}"
            )
        staged = Path(work) / "tests"
        staged.mkdir()
        with tarfile.open(archives[0]) as archive:
            for name in NEEDED:
                try:
                    member = archive.getmember(f"transformers-{version}/tests/{name}")
                except KeyError:
                    raise TransformersTestsUnavailable(f"the transformers=={version} sdist has no tests/{name}")  # noqa: B904
                (staged / name).write_bytes(archive.extractfile(member).read())
        # transformers' test tree has an empty tests/__init__.py, which the sdist lacks;
        # `test_configuration_common` imports the folder as a package (`direct_transformers_import`).
        (staged / "__init__.py").write_text("")
        if folder.exists():  # a partial folder from an interrupted run
            shutil.rmtree(folder)
        staged.rename(folder)  # whole or not at all, so a concurrent run never sees half a folder
    return folder


def write_file(path: Path, text: str) -> None:
    """`text` into `path` (in the cache folder, ours) through a temporary name, so a concurrent run never
    reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        tmp.write(text)
    os.replace(tmp.name, path)


# `test_pipeline_mixin` reads, on import, which tiny model of each class to test from a summary of
# transformers' tiny models on the Hub (`tests/utils/tiny_model_summary.json`, not in the sdist), or from
# `$TRANSFORMERS_TINY_MODEL_PATH/reports/` when that names a local folder: ours names our class and GPT-2's
# tokenizer, and the pipeline test saves a tiny model of ours under that folder's `gpt2_scratch/`.
TINY_MODEL_SUMMARY = {
    "GPT2ScratchForCausalLM": {
        "tokenizer_classes": ["GPT2Tokenizer"],
        "processor_classes": [],
        "model_classes": ["GPT2ScratchForCausalLM"],
    }
}


def load_transformers_tests() -> dict[str, types.ModuleType]:
    """transformers' `test_modeling_common`, `test_configuration_common` and `test_pipeline_mixin` modules,
    imported as the package `tests` of the sdist, with our stand-ins in place of the modules it lacks."""
    folder = fetch_tests()
    package = sys.modules.get("tests")
    if package is None or list(getattr(package, "__path__", [])) != [str(folder)]:
        package = types.ModuleType("tests")
        package.__path__ = [str(folder)]
        sys.modules["tests"] = package
    import transformers_standins

    for name in STANDIN_MODULES:
        sys.modules.setdefault(name, transformers_standins)
    # `test_pipeline_mixin` imports transformers from the source tree beside tests/ (src/transformers), to
    # read class names off it; an empty package there makes that the installed transformers.
    write_file(folder.parent / "src" / "transformers" / "__init__.py", "")
    tiny_models = folder.parent / "tiny-models"
    write_file(tiny_models / "reports" / "tiny_model_summary.json", json.dumps(TINY_MODEL_SUMMARY))
    before = os.environ.get("TRANSFORMERS_TINY_MODEL_PATH")
    os.environ["TRANSFORMERS_TINY_MODEL_PATH"] = str(tiny_models)
    try:
        return {name[:-3]: import_module(f"tests.{name[:-3]}") for name in NEEDED}
    finally:
        if before is None:
            del os.environ["TRANSFORMERS_TINY_MODEL_PATH"]
        else:
            os.environ["TRANSFORMERS_TINY_MODEL_PATH"] = before
