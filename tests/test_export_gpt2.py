"""The official-layout export `hf-gpt2/` beside ours, the export records, the model cards, the Hub push
per `hub_format`, and `python -m gpt2_scratch.export_gpt2` on runs, exports and checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from clean_interpreter import run_clean
from permissions import obeying_file_modes
from safetensors import safe_open
from safetensors.torch import save_file

from gpt2_scratch import export_gpt2
from gpt2_scratch.training.config import TrainConfig, config_to_yaml
from gpt2_scratch.training.export import export_model, exported_step, write_exports, write_folder
from gpt2_scratch.training.hub import push_export
from gpt2_scratch.training.model_card import data_source, run_results, write_model_cards
from gpt2_scratch.user_errors import UserError
from modeling_gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM

ROOT = Path(__file__).resolve().parents[1]
HUB_MANIFEST = {
    "source": {
        "kind": "hub",
        "dataset": "HuggingFaceFW/fineweb-edu",
        "config": "sample-10BT",
        "split": "train",
        "revision": "0123456789abcdef0123456789abcdef01234567",
    }
}
TOKENS = [[15496, 11, 314, 1101, 257, 3303, 2746, 11, 50256, 464, 6766, 318]]


def train_tiny(steps: int = 3) -> GPT2ScratchForCausalLM:
    """A cpu-nano model after a few AdamW steps on random tokens: weights away from their init."""
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("cpu-nano"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        x = torch.randint(0, 50257, (4, 33))
        model(x[:, :-1], shift_labels=x[:, 1:], loss_only=True).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def write_log(out_dir: Path, steps: int = 3) -> None:
    lines = [{"step": s, "tokens": 256 * s, "train/loss": 10.0 - s, "lr": 1e-3} for s in range(1, steps + 1)]
    lines.insert(0, {"step": 0, "tokens": 0, "val/loss": 10.8})
    lines.append(
        {"step": steps, "tokens": 256 * steps, "val/loss": 7.25, "hellaswag/acc": 0.25, "hellaswag/acc_norm": 0.5}
    )
    (out_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def run_config(out_dir: Path, data_dir: Path, **overrides) -> TrainConfig:
    fields = dict(model="cpu-nano", seq_len=32, out_dir=str(out_dir), data_dir=str(data_dir), hellaswag_limit=40)
    fields.update(hub_model_id="me/tiny-gpt2", init_from=str(out_dir / "checkpoints" / "step_000001"))
    return TrainConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained tiny model exported at step 3 with absolute out_dir / data_dir, a log, plots and cards."""
    from eval.plot import plot_training

    base = tmp_path_factory.mktemp("export")
    out_dir, data_dir = base / "runs" / "tiny", base / "data" / "fineweb"
    out_dir.mkdir(parents=True)
    model = train_tiny()
    try:
        export_model(Accelerator(cpu=True), model, out_dir, step=3)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    write_log(out_dir)
    plot_training(out_dir)
    config = run_config(out_dir, data_dir)
    write_model_cards(out_dir, config, model, HUB_MANIFEST)
    return SimpleNamespace(base=base, out_dir=out_dir, data_dir=data_dir, model=model, config=config)


def our_logits(folder: Path) -> torch.Tensor:
    with torch.no_grad():
        return GPT2ScratchForCausalLM.from_pretrained(folder).eval()(torch.tensor(TOKENS)).logits


FRESH_PROCESS = """
import json
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
with torch.no_grad():
    logits = model(torch.tensor(json.loads(sys.argv[2]))).logits
save_file({"logits": logits.contiguous()}, sys.argv[3])
print(type(model).__name__, tokenizer("Hello world")["input_ids"])
"""


def test_official_layout_loads_in_a_fresh_process_with_our_logits(run, tmp_path):
    gpt2 = run.out_dir / "hf-gpt2"
    config = json.loads((gpt2 / "config.json").read_text())
    assert (
        config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"] and "auto_map" not in config
    )
    assert not list(gpt2.glob("*.py"))
    with safe_open(gpt2 / "model.safetensors", "pt") as weights:
        assert weights.get_slice("transformer.wte.weight").get_shape() == [50257, 32]  # padding rows dropped

    out = tmp_path / "logits.safetensors"
    done = run_clean(FRESH_PROCESS, str(gpt2), json.dumps(TOKENS), str(out), cwd=tmp_path)  # without this project
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[0] == "GPT2LMHeadModel" and "[15496, 995]" in done.stdout

    with safe_open(out, "pt") as f:
        official = f.get_tensor("logits")
    ours = our_logits(run.out_dir / "hf")
    assert official.shape == ours.shape == (1, len(TOKENS[0]), 50257)
    torch.testing.assert_close(official, ours, rtol=0, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(ours, run.model(torch.tensor(TOKENS)).logits, rtol=0, atol=1e-5)


def test_exported_step_is_the_step_both_exports_hold(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run.out_dir, out)
    assert exported_step(out) == 3
    record = out / "hf-gpt2" / "export.json"
    record.write_text(json.dumps({"step": 2, "layout": "gpt2"}))
    assert exported_step(out) is None  # stale: another step than hf/
    record.unlink()
    assert exported_step(out) is None  # incomplete
    shutil.rmtree(out / "hf-gpt2")
    assert exported_step(out) is None  # missing, though the model has an official layout
    write_exports(run.model, out, 4)
    assert exported_step(out) == 4
    (out / "hf" / "model.safetensors").unlink()
    assert exported_step(out) is None


def test_an_export_killed_midway_leaves_the_previous_one(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run.out_dir, out)

    def crash(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt  # the process dies with the temporary folder half written

    with pytest.raises(KeyboardInterrupt):
        write_folder(out / "hf-gpt2", crash)
    assert exported_step(out) == 3 and len(list(out.glob(".tmp_hf-gpt2.*"))) == 1
    write_exports(run.model, out, 5)
    assert exported_step(out) == 5 and not list(out.glob(".tmp_hf-gpt2*"))


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_model_cards_carry_the_results_as_model_index(run):
    for layout in ("hf", "hf-gpt2"):
        card = (run.out_dir / layout / "README.md").read_text()
        meta = front_matter(card)
        assert meta["license"] == "mit" and meta["library_name"] == "transformers"
        assert meta["datasets"] == ["HuggingFaceFW/fineweb-edu"]
        (index,) = meta["model-index"]
        assert index["name"] == "me/tiny-gpt2"
        val, hellaswag = index["results"]
        assert val["dataset"]["type"] == "HuggingFaceFW/fineweb-edu"
        assert val["dataset"]["revision"] == HUB_MANIFEST["source"]["revision"]
        assert val["dataset"]["config"] == "sample-10BT"
        assert val["metrics"] == [{"type": "loss", "value": 7.25, "name": "validation loss (32-token windows, step 3)"}]
        assert hellaswag["dataset"]["type"] == "Rowan/hellaswag" and "first 40 examples" in hellaswag["dataset"]["name"]
        assert [(m["type"], m["value"]) for m in hellaswag["metrics"]] == [("acc", 0.25), ("acc_norm", 0.5)]
        assert "| optimizer steps | 3 of 80 |" in card and "| tokens seen | 768 |" in card
        assert "| train/loss | 7.0000 |" in card and "| val/loss | 7.2500 |" in card
        assert "![training and validation loss](loss.png)" in card and (run.out_dir / layout / "loss.png").is_file()
        assert "![HellaSwag acc_norm](hellaswag.png)" in card and (run.out_dir / layout / "hellaswag.png").is_file()
        assert "revision `0123456789abcdef0123456789abcdef01234567`" in card
    official = (run.out_dir / "hf-gpt2" / "README.md").read_text()
    ours = (run.out_dir / "hf" / "README.md").read_text()
    assert (
        'AutoModelForCausalLM.from_pretrained("me/tiny-gpt2")\n' in official
        and "trust_remote_code=True" not in official
    )
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-gpt2", trust_remote_code=True)' in ours
    assert "custom_code" in front_matter(ours)["tags"] and "custom_code" not in front_matter(official)["tags"]


def test_no_card_or_config_holds_a_local_absolute_path(run):
    written = [p for name in ("hf", "hf-gpt2") for p in (run.out_dir / name).iterdir()]
    texts = {p: p.read_text() for p in written if p.suffix in (".json", ".md", ".txt", ".py")}
    assert {"README.md", "config.json", "export.json", "tokenizer_config.json"} <= {p.name for p in texts}
    for path, text in texts.items():
        for local in (run.base, run.out_dir, run.data_dir, Path.cwd(), ROOT):
            assert str(local) not in text, f"{path} holds {local}"
    card = (run.out_dir / "hf-gpt2" / "README.md").read_text()
    assert "| `out_dir` | `tiny` |" in card and "| `data_dir` | `fineweb` |" in card
    assert "| `init_from` | `checkpoints/step_000001` |" in card  # inside the run: relative to it


def test_the_card_says_which_precision_auto_trained_in(run, tmp_path):
    """`mixed_precision: auto` is bf16 on most GPUs, fp16 with loss scaling on CUDA GPUs without bf16 units
    and fp32 on a CPU: the card's config table adds what
    the run's last launch trained in (run_info.json), and shows the config as given where that record
    is missing or is not a regular file."""
    assert run.config.mixed_precision == "auto"
    cases = {
        "bf16": "| `mixed_precision` | `auto (bf16)` |",
        "fp16": "| `mixed_precision` | `auto (fp16, loss-scaled)` |",
        None: "| `mixed_precision` | `auto` |",
    }
    for trained, row in cases.items():
        out_dir = tmp_path / str(trained)
        shutil.copytree(run.out_dir, out_dir)
        if trained:
            (out_dir / "run_info.json").write_text(json.dumps({"processes": 1, "mixed_precision": trained}))
        else:
            os.mkfifo(out_dir / "run_info.json")  # refused at once, never waited on
        write_model_cards(out_dir, run.config, run.model, HUB_MANIFEST)
        for layout in ("hf", "hf-gpt2"):
            assert row in (out_dir / layout / "README.md").read_text(), (trained, layout)


def test_data_source_names_what_the_manifest_records():
    files = {"source": {"kind": "files", "files": [{"path": "/srv/me/corpus/a.jsonl", "bytes": 3}], "text_column": "t"}}
    assert data_source(files).ref == "a.jsonl" and "/srv/me" not in data_source(files).text
    # a manifest written by data_prep on Windows, the run trained elsewhere: still the name, never the path
    windows = {"source": {"kind": "files", "files": [{"path": "C:\\Users\\me\\corpus\\b.jsonl", "bytes": 3}]}}
    assert data_source(windows).ref == "b.jsonl" and "Users" not in data_source(windows).text
    builtin = {"source": {"kind": "builtin", "name": "python-stdlib-docs", "python": "3.11.7"}}
    assert data_source(builtin).ref == "python-stdlib-docs" and "Python 3.11.7" in data_source(builtin).text
    hub = data_source(HUB_MANIFEST)
    assert (hub.hub_id, hub.fields["revision"]) == ("HuggingFaceFW/fineweb-edu", HUB_MANIFEST["source"]["revision"])
    assert data_source({}).ref == "unrecorded"


def test_results_come_from_the_log_up_to_the_exported_step(run):
    results = run_results(run.out_dir / "log.jsonl", through_step=2)
    assert (results["step"], results["tokens"], results["train/loss"]) == (2, 512, (2, 8.0))
    assert results["val/loss"] == (0, 10.8) and "hellaswag/acc" not in results
    assert run_results(run.out_dir / "missing.jsonl") == {}


class RecordingHub:
    """Stands in for `huggingface_hub.HfApi` (as in test_train_run): records what each call would send."""

    def __init__(self):
        self.calls = []

    def create_branch(self, repo_id, branch, exist_ok=False):
        self.calls.append(("create_branch", repo_id, branch, exist_ok))

    def upload_folder(self, repo_id, folder_path, commit_message, revision=None):
        folder = Path(folder_path)
        files = sorted(p.name for p in folder.iterdir())
        self.calls.append(("upload_folder", repo_id, folder.name, revision, files))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{len(self.calls)}")


@pytest.mark.parametrize(
    "hub_format, expected",
    [
        ("gpt2", [("upload_folder", "hf-gpt2", None)]),
        ("scratch", [("upload_folder", "hf", None)]),
        (
            "both",
            [("upload_folder", "hf-gpt2", None), ("create_branch", "scratch"), ("upload_folder", "hf", "scratch")],
        ),
    ],
)
def test_push_uploads_what_hub_format_says(run, hub_format, expected):
    hub = RecordingHub()
    url = push_export(run.out_dir, "me/tiny-gpt2", hub_format, "step 3", api=hub)
    assert [(c[0], c[2]) if c[0] == "create_branch" else (c[0], c[2], c[3]) for c in hub.calls] == expected
    uploads = [i + 1 for i, call in enumerate(hub.calls) if call[0] == "upload_folder"]
    assert url.split() == [f"https://huggingface.co/me/tiny-gpt2/commit/{i}" for i in uploads]
    for call in hub.calls:
        if call[0] == "upload_folder":
            files = set(call[4])
            assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "loss.png"} <= files
            assert ("modeling_gpt2_scratch.py" in files) == (call[2] == "hf")
    with pytest.raises(UserError, match="hub_format must be one of"):
        push_export(run.out_dir, "me/tiny-gpt2", "onnx", "msg", api=hub)


def test_cli_exports_a_run_made_before_the_official_layout(run, tmp_path):
    out = tmp_path / "old-run"
    shutil.copytree(run.out_dir, out)
    shutil.rmtree(out / "hf-gpt2")
    (out / "hf" / "export.json").unlink()
    (out / "checkpoints" / "step_000003").mkdir(parents=True)
    (out / "config.yaml").write_text(config_to_yaml(run.config))  # data_dir is not on this machine
    export_gpt2.main([str(out)])
    assert exported_step(out) == 3
    torch.testing.assert_close(official_logits(out / "hf-gpt2"), our_logits(out / "hf"), rtol=0, atol=1e-4)
    meta = front_matter((out / "hf-gpt2" / "README.md").read_text())
    assert meta["model-index"][0]["results"][0]["dataset"]["type"] == "fineweb"  # named by its folder


def official_logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(model).__name__ == "GPT2LMHeadModel"
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits


def test_cli_exports_a_checkpoint_and_a_bare_export(run, tmp_path):
    out = tmp_path / "run"
    checkpoint = out / "checkpoints" / "step_000002"
    checkpoint.mkdir(parents=True)
    (out / "config.yaml").write_text(config_to_yaml(run.config))
    write_log(out, steps=3)
    # save_state of a compiled model: prefixed keys, the tied lm_head left out
    state = {f"_orig_mod.{k}": v.contiguous() for k, v in run.model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, checkpoint / "model.safetensors")
    export_gpt2.main([str(checkpoint)])
    folder = out / "hf-gpt2-step_000002"
    torch.testing.assert_close(official_logits(folder), our_logits(run.out_dir / "hf"), rtol=0, atol=1e-4)
    assert json.loads((folder / "export.json").read_text())["step"] == 2
    meta = front_matter((folder / "README.md").read_text())
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 10.8  # the val loss of step <= 2

    run.model.save_pretrained(tmp_path / "my-gpt2")
    export_gpt2.main([str(tmp_path / "my-gpt2")])
    torch.testing.assert_close(
        official_logits(tmp_path / "my-gpt2-gpt2"), our_logits(run.out_dir / "hf"), atol=1e-4, rtol=0
    )
    card = (tmp_path / "my-gpt2-gpt2" / "README.md").read_text()
    assert "model-index" not in front_matter(card) and 'from_pretrained("my-gpt2-gpt2")' in card


def test_cli_errors_are_one_line(run, tmp_path):
    with pytest.raises(UserError, match="no folder at"):
        export_gpt2.export(tmp_path / "nope")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(config_to_yaml(run.config))
    with pytest.raises(UserError, match="--out is for an export or a checkpoint"):
        export_gpt2.export(tmp_path / "run", out=tmp_path / "elsewhere")
    done = subprocess.run(
        [sys.executable, "-m", "gpt2_scratch.export_gpt2", str(run.out_dir / "hf-gpt2")],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "already in the official" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def set_modes(folder: Path, files: int, folders: int) -> None:
    for path in [folder, *folder.rglob("*")]:
        path.chmod(folders if path.is_dir() else files)


def test_exporting_a_read_only_run_says_so_and_its_advice_works(run, tmp_path):
    read_only = Path(shutil.copytree(run.out_dir, tmp_path / "read-only-run"))
    (read_only / "config.yaml").write_text(config_to_yaml(run.config))
    before = sorted(p.relative_to(read_only) for p in read_only.rglob("*"))
    set_modes(read_only, 0o444, 0o555)  # as a read-only mount, for any user (root included: permissions.py)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            obeying_file_modes([sys.executable, "-m", "gpt2_scratch.export_gpt2", *args]),
            cwd=ROOT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
        )

    try:
        done = cli(str(read_only))
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert done.stderr.startswith(f"error: cannot export the run {read_only}: the folder is not writable")
        assert "trainer" not in done.stderr
        advice = f"python -m gpt2_scratch.export_gpt2 {read_only / 'hf'} --out FOLDER"
        assert done.stderr.strip().endswith(advice)
        assert sorted(p.relative_to(read_only) for p in read_only.rglob("*")) == before  # not even a .lock
        elsewhere = tmp_path / "elsewhere"
        done = cli(str(read_only / "hf"), "--out", str(elsewhere))  # the advice, as given
        assert done.returncode == 0, done.stderr
    finally:
        set_modes(read_only, 0o644, 0o755)
    torch.testing.assert_close(official_logits(elsewhere), our_logits(run.out_dir / "hf"), rtol=0, atol=1e-4)


def test_out_never_replaces_a_folder_that_is_not_an_official_export(run, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("keep")
    for out in (precious, run.out_dir):  # a user's folder, and the run folder that holds the source
        with pytest.raises(UserError, match="exists and is not an hf-gpt2 export"):
            export_gpt2.export(run.out_dir / "hf", out=out)
    assert (precious / "thesis.txt").read_text() == "keep" and (run.out_dir / "hf" / "config.json").is_file()
    export_gpt2.export(run.out_dir / "hf", out=tmp_path / "mine")  # a new folder, then replaced on a rerun
    export_gpt2.export(run.out_dir / "hf", out=tmp_path / "mine")
    assert json.loads((tmp_path / "mine" / "export.json").read_text())["layout"] == "gpt2"


def test_a_truncated_export_is_one_line(run, tmp_path):
    broken = Path(shutil.copytree(run.out_dir / "hf", tmp_path / "broken"))
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    with pytest.raises(UserError, match="not a readable safetensors file"):
        export_gpt2.export(broken)
