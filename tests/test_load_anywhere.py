"""The exports load where this project does not: `hf/` with `trust_remote_code`, `hf-gpt2/` with stock
transformers, and the folders each `--hub_format` uploads, in an interpreter that cannot import the
project (tests/clean_interpreter.py), with the logits of the model in this process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from clean_interpreter import ROOT, project_modules, run_clean
from safetensors.torch import load_file
from transformers.dynamic_module_utils import get_imports

from gpt2_scratch.training.export import write_exports
from gpt2_scratch.training.hub import push_export
from modeling_gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM

# What the shipped model file may import (STYLE.md 13), besides the standard library.
ALLOWED_IMPORTS = {"torch", "transformers", "huggingface_hub", "safetensors"}
TOKENS = [[15496, 11, 314, 1101, 257, 3303, 2746, 11, 50256, 464, 6766, 318]]
# Longer than cpu-nano's 64 positions once tokenized: truncation must cut it to the model's length.
LONG_TEXT = "Ünïcödé text, naïve café, 東京 and <|endoftext|> again. " * 20

LOAD = """
import json
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

outputs, report = {}, {}
for i, (folder, remote) in enumerate(json.loads(sys.argv[1])):
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    truncated = tokenizer(sys.argv[3], truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        outputs[f"logits{i}"] = model(torch.tensor(json.loads(sys.argv[2]))).logits.contiguous()
        outputs[f"truncated{i}"] = model(truncated).logits.contiguous()
    report[folder] = {"cls": type(model).__module__ + "." + type(model).__name__, "length": truncated.shape[1]}
save_file(outputs, "logits.safetensors")
print(json.dumps(report))
"""


def load_clean(folders: list[tuple[Path, bool]], cwd: Path) -> dict[Path, SimpleNamespace]:
    """Load each (folder, trust_remote_code) in one clean interpreter: per folder, the class it loaded, and
    its logits of `TOKENS` and of `LONG_TEXT` truncated by the folder's own tokenizer (and that length)."""
    spec = json.dumps([[str(folder), remote] for folder, remote in folders])
    done = run_clean(LOAD, spec, json.dumps(TOKENS), LONG_TEXT, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    report, tensors = json.loads(done.stdout.strip().splitlines()[-1]), load_file(cwd / "logits.safetensors")
    return {
        folder: SimpleNamespace(**report[str(folder)], logits=tensors[f"logits{i}"], truncated=tensors[f"truncated{i}"])
        for i, (folder, _) in enumerate(folders)
    }


def logits(model: GPT2ScratchForCausalLM, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Both exports of a cpu-nano model whose every weight is random (biases and LayerNorms too)."""
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("cpu-nano")).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    out_dir = tmp_path_factory.mktemp("run")
    write_exports(model, out_dir, step=3)
    return SimpleNamespace(out_dir=out_dir, model=model)


def test_the_shipped_model_file_imports_only_what_remote_code_may(run, tmp_path):
    """transformers' own `get_imports`, which decides whether `trust_remote_code` loads the file."""
    lazy = tmp_path / "lazy.py"
    lazy.write_text("import torch\n\ndef f():\n    from conversion import to_gpt2\n    return to_gpt2\n")
    assert set(get_imports(lazy)) == {"torch", "conversion"}  # it reads imports inside functions too
    shipped = run.out_dir / "hf" / "modeling_gpt2_scratch.py"
    assert shipped.read_bytes() == (ROOT / "modeling_gpt2_scratch.py").read_bytes()
    imports = set(get_imports(shipped))
    assert "torch" in imports and "transformers" in imports
    assert imports <= ALLOWED_IMPORTS | set(sys.stdlib_module_names), imports - ALLOWED_IMPORTS


def test_the_clean_interpreter_cannot_import_the_project(tmp_path):
    assert {"modeling_gpt2_scratch", "train_accelerate", "gpt2_scratch", "data_prep", "eval"} <= set(project_modules())
    done = run_clean("print('clean')", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "clean", done.stderr
    with_project = run_clean("print('clean')", cwd=tmp_path, extra_path=[str(ROOT)])  # the check can fail
    assert with_project.returncode != 0 and "this project is importable here" in with_project.stderr


class CopyingHub:
    """Stands in for `huggingface_hub.HfApi`: keeps a copy of each uploaded folder, per branch."""

    def __init__(self, root: Path):
        self.root, self.uploads = root, []

    def create_branch(self, repo_id, branch, exist_ok=False):
        pass

    def upload_folder(self, repo_id, folder_path, commit_message, revision=None):
        copy = self.root / f"{len(self.uploads)}-{revision or 'main'}"
        shutil.copytree(folder_path, copy)
        self.uploads.append(copy)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{len(self.uploads)}")


@pytest.fixture(scope="module")
def loaded(run, tmp_path_factory):
    """`hf/`, `hf-gpt2/` and the folders each `--hub_format` uploads, loaded in one clean interpreter."""
    base = tmp_path_factory.mktemp("clean")
    uploads = []
    for hub_format in ("gpt2", "scratch", "both"):
        hub = CopyingHub(base / hub_format)
        push_export(run.out_dir, "me/tiny-gpt2", hub_format, "step 3", api=hub)
        uploads += hub.uploads
    exports = [(run.out_dir / "hf", True), (run.out_dir / "hf-gpt2", False)]
    uploads = [(folder, (folder / "modeling_gpt2_scratch.py").is_file()) for folder in uploads]
    return SimpleNamespace(exports=exports, uploads=uploads, found=load_clean(exports + uploads, base))


def test_both_exports_load_without_the_project(run, loaded):
    hf, gpt2 = run.out_dir / "hf", run.out_dir / "hf-gpt2"
    n_positions = run.model.config.n_positions
    assert json.loads((gpt2 / "config.json").read_text())["n_ctx"] == n_positions == 64
    for folder in (hf, gpt2):
        assert {"vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer.json"} <= {
            p.name for p in folder.iterdir()
        }
        assert json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"] == n_positions

    found = loaded.found
    assert found[hf].cls.startswith("transformers_modules.")  # the folder's own code
    assert found[hf].cls.endswith(".GPT2ScratchForCausalLM")
    assert found[gpt2].cls == "transformers.models.gpt2.modeling_gpt2.GPT2LMHeadModel"
    from data_prep.tokenizer import get_encoding

    long_tokens = get_encoding().encode(LONG_TEXT, allowed_special="all")
    assert len(long_tokens) > n_positions
    for folder in (hf, gpt2):
        assert found[folder].length == n_positions
        torch.testing.assert_close(found[folder].logits, logits(run.model, TOKENS), rtol=0, atol=1e-5)
        expected = logits(run.model, [long_tokens[:n_positions]])
        torch.testing.assert_close(found[folder].truncated, expected, rtol=0, atol=1e-5)


def test_what_each_hub_format_uploads_loads_without_the_project(run, loaded):
    # gpt2: hf-gpt2/ on main; scratch: hf/ on main; both: hf-gpt2/ on main, then hf/ on the branch scratch
    assert [(folder.name, code) for folder, code in loaded.uploads] == [
        ("0-main", False),
        ("0-main", True),
        ("0-main", False),
        ("1-scratch", True),
    ]
    for folder, code in loaded.uploads:
        found = loaded.found[folder]
        assert found.cls.endswith("GPT2ScratchForCausalLM" if code else "GPT2LMHeadModel")
        assert found.length == run.model.config.n_positions
        torch.testing.assert_close(found.logits, logits(run.model, TOKENS), rtol=0, atol=1e-5)


def make_stale(out_dir: Path) -> None:
    """Turn a run's exports into what the trainer wrote before models loaded anywhere: a model file
    with a lazy import of the project, no `n_ctx`, GPT-2's 1024 as the tokenizer's limit, no BPE files."""
    code = out_dir / "hf" / "modeling_gpt2_scratch.py"
    code.write_text(
        code.read_text() + "\n\ndef to_gpt2(model):\n    from conversion import to_gpt2\n\n    return to_gpt2(model)\n"
    )
    config = json.loads((out_dir / "hf-gpt2" / "config.json").read_text())
    del config["n_ctx"]
    (out_dir / "hf-gpt2" / "config.json").write_text(json.dumps(config))
    for folder in (out_dir / "hf", out_dir / "hf-gpt2"):
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "model_max_length": 1024}))
        for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
            (folder / name).unlink()


def test_export_gpt2_refreshes_both_exports_of_an_older_run(run, tmp_path):
    from gpt2_scratch import export_gpt2
    from gpt2_scratch.training.config import TrainConfig, config_to_yaml

    out = Path(shutil.copytree(run.out_dir, tmp_path / "old-run"))
    config = TrainConfig(model="cpu-nano", seq_len=32, out_dir=str(out), data_dir=str(tmp_path / "elsewhere"))
    (out / "config.yaml").write_text(config_to_yaml(config))
    make_stale(out)
    stale = run_clean(LOAD, json.dumps([[str(out / "hf"), True]]), json.dumps(TOKENS), LONG_TEXT, cwd=tmp_path)
    assert stale.returncode != 0 and "conversion" in stale.stderr  # what users of such a model met

    export_gpt2.main([str(out)])
    assert json.loads((out / "hf-gpt2" / "config.json").read_text())["n_ctx"] == 64
    assert (out / "hf" / "modeling_gpt2_scratch.py").read_bytes() == (ROOT / "modeling_gpt2_scratch.py").read_bytes()
    found = load_clean([(out / "hf", True), (out / "hf-gpt2", False)], tmp_path)
    for folder in (out / "hf", out / "hf-gpt2"):
        assert found[folder].length == 64 and (folder / "vocab.json").is_file()
        torch.testing.assert_close(found[folder].logits, logits(run.model, TOKENS), rtol=0, atol=1e-5)


# The last transformers 4.x, with the huggingface_hub and tokenizers releases it requires.
TRANSFORMERS_4 = ("transformers==4.57.6", "huggingface_hub==0.36.0", "tokenizers==0.22.1")

ON_TRANSFORMERS_4 = """
sys.path.insert(0, sys.argv[1])  # before the venv's transformers 5
import json
import transformers
import torch
from transformers import AutoModelForCausalLM

assert transformers.__version__ == "4.57.6", transformers.__version__
gpt2 = AutoModelForCausalLM.from_pretrained(sys.argv[2]).eval()
with torch.no_grad():
    logits = gpt2(torch.tensor(json.loads(sys.argv[4]))).logits
try:
    AutoModelForCausalLM.from_pretrained(sys.argv[3], trust_remote_code=True)
    error = None
except ImportError as err:
    error = str(err)
print(json.dumps({"cls": type(gpt2).__name__, "logits": logits.tolist(), "error": error}))
"""


@pytest.fixture(scope="module")
def transformers_4() -> Path:
    """transformers 4.57.6 installed from PyPI once into the tests' cache (kept between runs)."""
    from transformers_suite import cache_root

    target = cache_root() / "transformers-4.57.6"
    if not (target / "installed").is_file():
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target)]
        done = subprocess.run([*pip, *TRANSFORMERS_4], capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            pytest.skip(f"could not install {' '.join(TRANSFORMERS_4)} from PyPI: {done.stderr.strip()[-300:]}")
        (target / "installed").write_text("\n".join(TRANSFORMERS_4) + "\n")
    return target


def test_on_transformers_4_hf_gpt2_loads_and_hf_says_what_to_do(run, transformers_4, tmp_path):
    """hf/ needs transformers >= 5 (its model file is written against the v5 API); on 4.57.6, the last
    4.x (still needed by Optimum's ONNX exporter), hf-gpt2/ loads with the same logits and hf/ refuses
    with an ImportError that points to it."""
    folders = (str(run.out_dir / "hf-gpt2"), str(run.out_dir / "hf"))
    done = run_clean(ON_TRANSFORMERS_4, str(transformers_4), *folders, json.dumps(TOKENS), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["cls"] == "GPT2LMHeadModel"
    torch.testing.assert_close(torch.tensor(found["logits"]), logits(run.model, TOKENS), rtol=0, atol=1e-5)
    assert "needs transformers >= 5 (this is 4.57.6)" in found["error"] and "hf-gpt2/" in found["error"]
