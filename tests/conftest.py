"""Tests never touch the network: every model and data set is built in the test."""

import os
import re
import sys
from pathlib import Path

import pytest

# The suite runs in two worker processes (pyproject's addopts): one thread each, here and in every
# process a test starts, since OpenMP threads spin and two 2-thread jobs on 2 cores slow each other far
# more than twice. Set before torch is imported, which sizes its thread pool then.
IN_WORKER = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if IN_WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

if IN_WORKER:
    torch.set_num_threads(1)  # also where a plugin imported torch first

for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[var] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The built-in corpus, tokenized once for the whole session."""
    from data_prep import prepare_builtin

    return prepare_builtin(tmp_path_factory.mktemp("builtin"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and far more steadily when other work shares the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    """Deselect the tests a module names in `NOT_APPLICABLE` (test name -> why it does not apply), so that
    they show as deselected, never as passed or failed (tests/test_transformers_contract.py)."""
    keep, deselected = [], []
    for item in items:
        not_applicable = getattr(getattr(item, "module", None), "NOT_APPLICABLE", {})
        # `parameterized` names each case `<test>_<index>_<params>`
        name = re.sub(r"_\d+(_.*)?$", "", item.name.split("[")[0])
        (deselected if name in not_applicable or item.name in not_applicable else keep).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = keep
