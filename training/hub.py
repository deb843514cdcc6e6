"""The Hugging Face Hub: access checks before training, the push of the exports, their model cards."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from accelerate import Accelerator

from training import UserError, remote
from training.config import HUB_FORMATS, TrainConfig
from training.export import GPT2_EXPORT, SCRATCH_EXPORT, read_record
from training.processes import on_main_process

logger = logging.getLogger("train")

# The model card's `license:`. GPT-2's own weights and code are MIT; set another with write_model_cards(license=).
DEFAULT_LICENSE = "mit"
# The Hub copy of HellaSwag (rowanz/hellaswag's data), named in the model-index.
HELLASWAG_HUB_ID = "Rowan/hellaswag"
# Where hub_format=both puts our layout: a branch, as remote code does not load from a subfolder.
SCRATCH_BRANCH = "scratch"
TASK = {"type": "text-generation", "name": "Text Generation"}
RESULT_KEYS = ("train/loss", "val/loss", "hellaswag/acc", "hellaswag/acc_norm")
SERVING_TOOLS = (
    "vLLM, Text Generation Inference, llama.cpp's `convert_hf_to_gguf.py`, ONNX export with Optimum and transformers.js"
)
LAYOUT_TEXT = {
    "gpt2": "This is the official GPT-2 layout (`GPT2LMHeadModel`, `model_type: gpt2`, no custom code): stock "
    f"transformers loads it without `trust_remote_code`, and so do the tools that take GPT-2: {SERVING_TOOLS}.",
    "scratch": "This is gpt2-scratch's own class (`GPT2ScratchForCausalLM`, shipped here as "
    "`modeling_gpt2_scratch.py`), loaded with `trust_remote_code=True`. Its weights are those of the official "
    "GPT-2 layout, which loads without remote code.",
}


class HubError(UserError, RuntimeError):
    """The Hub cannot be reached, the user is not logged in, or the token cannot write the repository."""


def check_hub_access(repo_id: str, private: bool = False, api=None, purpose: str = "push_to_hub") -> str:
    """Fail fast, before training: the Hub is reachable, a token is set, and it can write `repo_id`
    (created if missing). Returns the user name. `purpose` (the field that needs the Hub) starts messages."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    if constants.is_offline_mode():
        raise HubError(
            f"{purpose} needs the Hub, but offline mode is on (HF_HUB_OFFLINE); unset it or drop --{purpose}"
        )
    api = api or HfApi()
    try:
        user = api.whoami()["name"]
    except LocalTokenNotFoundError as err:
        raise HubError(f"{purpose}: not logged in; run `hf auth login` or set HF_TOKEN to a write token") from err
    except HfHubHTTPError as err:
        raise HubError(f"{purpose}: the Hub rejected the token ({err}); set HF_TOKEN to a valid write token") from err
    except Exception as err:  # network errors differ by HTTP backend; all mean the same here
        raise HubError(f"{purpose}: cannot reach the Hub ({type(err).__name__}: {err}); check the network") from err
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.auth_check(repo_id, write=True)
    except HfHubHTTPError as err:
        raise HubError(
            f"{purpose}: user {user!r} cannot write to {repo_id!r} ({err}); check the repository name and that the "
            "token has write access"
        ) from err
    return user


def preflight_hub(config: TrainConfig, accelerator: Accelerator) -> None:
    """`check_hub_access` for push_to_hub, before any training."""
    if config.push_to_hub:
        user = on_main_process(accelerator, lambda: check_hub_access(config.hub_model_id, config.hub_private))
        logger.info("push_to_hub: logged in as %s", user)


def preflight_remote(config: TrainConfig, accelerator: Accelerator) -> remote.RemoteStore | None:
    """The checkpoint_remote store, checked before any training: for hf://, login and write access to the
    repository (`check_hub_access`); for every store, a probe file written and deleted."""
    if config.checkpoint_remote is None:
        return None
    store = remote.open_store(config.checkpoint_remote)  # a bad URL fails on every rank alike

    def check() -> None:
        if store.hub_repo is not None:
            check_hub_access(store.hub_repo, config.hub_private, purpose="checkpoint_remote")
        remote.check_writable(store)

    on_main_process(accelerator, check)
    logger.info("checkpoint_remote: %s is writable; checkpoints go to %s", store.url, store.checkpoints)
    return store


def push_export(out_dir: Path, repo_id: str, hub_format: str, message: str, api=None) -> str:
    """Upload the run's export to `repo_id`, one commit per layout; returns the commit URL(s).

    `hub_format`: "gpt2" uploads `hf-gpt2/` (the official layout, which loads everywhere) to the main
    branch; "scratch" uploads `hf/` (our class, remote code) there; "both" does the first, then puts
    `hf/` on the branch `scratch` (remote code cannot be loaded from a subfolder of a repository).
    """
    from huggingface_hub import HfApi

    if hub_format not in HUB_FORMATS:
        raise HubError(f"hub_format must be one of {HUB_FORMATS}, got {hub_format!r}")
    out_dir = Path(out_dir)
    gpt2, scratch = out_dir / GPT2_EXPORT, out_dir / SCRATCH_EXPORT
    if read_record(scratch, "scratch") is None:
        raise HubError(f"push_to_hub: {scratch} is not a complete export; rebuild it with python -m export_gpt2")
    if hub_format != "scratch" and read_record(gpt2, "gpt2") is None:
        reason = (read_record(scratch, "scratch") or {}).get("gpt2_unsupported") or "it is missing or incomplete"
        raise HubError(
            f"push_to_hub: no official-layout export at {gpt2} ({reason}); rebuild it with "
            f"`python -m export_gpt2 {out_dir.name}`, or push ours alone with --hub_format scratch"
        )
    api = api or HfApi()
    urls = []
    if hub_format in ("gpt2", "both"):
        urls.append(upload(api, repo_id, gpt2, message))
    if hub_format == "scratch":
        urls.append(upload(api, repo_id, scratch, message))
    if hub_format == "both":
        api.create_branch(repo_id, branch=SCRATCH_BRANCH, exist_ok=True)
        urls.append(upload(api, repo_id, scratch, message, revision=SCRATCH_BRANCH))
    return " ".join(urls)


def upload(api, repo_id: str, folder: Path, message: str, revision: str | None = None) -> str:
    branch = {"revision": revision} if revision else {}
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message, **branch)
    return getattr(commit, "commit_url", str(commit))


@dataclass
class DataSource:
    """The training data as the manifest records it: `ref` identifies it (a Hub dataset id, the file
    names, the built-in corpus's name), `text` describes it for a reader; `hub_id` only for Hub data."""

    ref: str
    text: str
    hub_id: str | None = None
    fields: dict = dataclasses.field(default_factory=dict)  # config, split, revision of a Hub dataset


def data_source(manifest: dict) -> DataSource:
    """What the data manifest (`data_prep`'s manifest.json) says the data came from: the Hub dataset with
    its config, split and revision, the files by name (never their local paths), or the built-in corpus."""
    source = manifest.get("source") if isinstance(manifest, dict) else None
    if not isinstance(source, dict):
        return DataSource("unrecorded", "data whose source no manifest records")
    kind = source.get("kind")
    if kind == "hub" and source.get("dataset"):
        dataset = str(source["dataset"])
        fields = {k: str(source[k]) for k in ("config", "split", "revision") if source.get(k)}
        details = ", ".join(f"{k} `{v}`" for k, v in fields.items())
        return DataSource(
            dataset, f"[{dataset}](https://huggingface.co/datasets/{dataset}) ({details})", dataset, fields
        )
    if kind == "files" and isinstance(source.get("files"), list):
        names = [Path(str(f.get("path", "?"))).name for f in source["files"] if isinstance(f, dict)]
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        column = f", text column `{source['text_column']}`" if source.get("text_column") else ""
        listed = ", ".join(f"`{name}`" for name in names[:5])
        return DataSource(", ".join(names[:5]) + more, f"local files {listed}{more}{column}")
    if kind == "builtin":
        name = str(source.get("name") or "builtin")
        python = f" {source['python']}" if source.get("python") else ""
        return DataSource(name, f"`{name}`, gpt2-scratch's built-in corpus: the documentation of Python{python}")
    name = str(source.get("name") or source.get("dataset") or kind or "unrecorded")
    return DataSource(name, f"`{name}`")


def run_results(log: Path, through_step: int | None = None) -> dict:
    """What the run's `log.jsonl` says, up to `through_step`: the last `step` and its `tokens`, and for
    each of train/loss, val/loss, hellaswag/acc and hellaswag/acc_norm its last (step, value); {} without a log."""
    from eval.plot import read_log

    if not Path(log).is_file():
        return {}
    records = [r for r in read_log(log) if through_step is None or r["step"] <= through_step]
    if not records:
        return {}
    last = max(records, key=lambda r: r["step"])
    results = {"step": last["step"], "tokens": last["tokens"]}
    for key in RESULT_KEYS:
        found = [r for r in records if isinstance(r.get(key), (int, float))]
        if found:
            record = max(found, key=lambda r: r["step"])
            results[key] = (record["step"], float(record[key]))
    return results


def portable(value, out_dir: Path):
    """A config value fit to publish: a local absolute path (or file:// URL) becomes relative to the
    run folder when inside it, else its name (`out_dir` itself included); anything else is unchanged."""
    if not isinstance(value, str):
        return value
    prefix, path = ("file://", value[len("file://") :]) if value.startswith("file://") else ("", value)
    if not (os.path.isabs(path) or path.startswith("~")):
        return value
    resolved, run = Path(path).expanduser().resolve(), Path(out_dir).resolve()
    if run in resolved.parents:
        return prefix + str(resolved.relative_to(run))
    return prefix + ".../" + resolved.name if prefix else resolved.name


class ModelCard:
    """The README.md of an export: Hub metadata (license, datasets, model-index with the results),
    what the folder is and how to load it, results, data and the training config."""

    def __init__(self, config, model, manifest: dict, results: dict, out_dir: Path, license: str = DEFAULT_LICENSE):
        from eval.common import count_parameters

        self.config, self.model_config, self.results = config, model.config, results
        self.parameters = count_parameters(model)
        self.source, self.license = data_source(manifest), license
        self.out_dir = Path(out_dir)
        self.repo = (config.hub_model_id if config else None) or self.out_dir.name
        self.hub_format = config.hub_format if config else "gpt2"

    def render(self, layout: str, plots: list[str]) -> str:
        """The card of the `layout` ("gpt2" or "scratch") export, showing `plots` (files beside it)."""
        meta = {"library_name": "transformers", "license": self.license, "pipeline_tag": "text-generation"}
        meta["tags"] = ["gpt2", "text-generation", "pretraining", "from-scratch"]
        if layout == "scratch":
            meta["tags"].append("custom_code")
        if self.source.hub_id:
            meta["datasets"] = [self.source.hub_id]
        if index := self.model_index():
            meta["model-index"] = index
        front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000)
        body = [
            f"# {self.repo}",
            "",
            self.summary(),
            "",
            LAYOUT_TEXT[layout],
            "",
            *self.results_section(plots),
            *self.usage(layout),
            "## Training data",
            "",
            f"{self.source.text}. Validation loss is measured on the held-out validation shard of the same data.",
            "",
            *self.config_section(),
        ]
        return "---\n" + front + "---\n\n" + "\n".join(body)

    def summary(self) -> str:
        m, c = self.model_config, self.config
        preset = f"`{c.model}` preset: " if c else ""
        trained = f" trained from scratch with gpt2-scratch's `train_accelerate.py` on {self.source.text}" if c else ""
        return (
            f"GPT-2 ({preset}{m.n_layer} layers, {m.n_head} heads, width {m.n_embd}, {m.n_positions} positions, "
            f"{self.parameters / 1e6:.1f}M parameters){trained}."
        )

    def model_index(self) -> list[dict]:
        """The results as the Hub's model-index: val loss on the data's validation shard, HellaSwag."""
        r, entries = self.results, []
        if "val/loss" in r:
            step, value = r["val/loss"]
            windows = f"{self.config.seq_len}-token windows, " if self.config else ""
            dataset = {"type": self.source.ref, "name": f"{self.source.ref} (held-out validation shard)"}
            metric = {"type": "loss", "value": value, "name": f"validation loss ({windows}step {step})"}
            entries.append({"task": TASK.copy(), "dataset": {**dataset, **self.source.fields}, "metrics": [metric]})
        if "hellaswag/acc" in r and "hellaswag/acc_norm" in r:
            (step, acc), (_, acc_norm) = r["hellaswag/acc"], r["hellaswag/acc_norm"]
            limit = self.config.hellaswag_limit if self.config else None
            examples = f"first {limit:,} examples" if limit else "all 10,042 examples"
            dataset = {"type": HELLASWAG_HUB_ID, "name": f"HellaSwag (validation, {examples})", "split": "validation"}
            metrics = [
                {"type": "acc", "value": acc, "name": f"accuracy (completion scoring, step {step})"},
                {"type": "acc_norm", "value": acc_norm, "name": f"length-normalized accuracy (step {step})"},
            ]
            entries.append({"task": TASK.copy(), "dataset": dataset, "metrics": metrics})
        return [{"name": self.repo, "results": entries}] if entries else []

    def results_section(self, plots: list[str]) -> list[str]:
        r = self.results
        if not r:
            return []
        steps = f"{r['step']:,}" + (f" of {self.config.max_steps:,}" if self.config else "")
        rows = [("optimizer steps", steps), ("tokens seen", f"{r['tokens']:,}")]
        rows += [
            (key, f"{r[key][1]:.4f}" + (f" (step {r[key][0]})" if r[key][0] != r["step"] else ""))
            for key in RESULT_KEYS
            if key in r
        ]
        lines = ["## Results", "", "| metric | value |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows), ""]
        alt = {"loss.png": "training and validation loss", "hellaswag.png": "HellaSwag acc_norm"}
        return lines + [line for plot in plots for line in (f"![{alt.get(plot, plot)}]({plot})", "")]

    def usage(self, layout: str) -> list[str]:
        branch = f', revision="{SCRATCH_BRANCH}"' if self.hub_format == "both" else ""
        ours = f'AutoModelForCausalLM.from_pretrained("{self.repo}"{branch}, trust_remote_code=True)'
        official = f'AutoModelForCausalLM.from_pretrained("{self.repo}")'
        load = official if layout == "gpt2" else ours
        lines = [
            "## Usage",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f"model = {load}",
            f'tokenizer = AutoTokenizer.from_pretrained("{self.repo}")',
            'inputs = tokenizer("Hello, I\'m a language model,", return_tensors="pt")',
            "print(tokenizer.decode(model.generate(**inputs, do_sample=True, top_k=50, max_new_tokens=40)[0]))",
            "```",
            "",
        ]
        if self.hub_format == "both":
            other = ours if layout == "gpt2" else official
            where = f"branch `{SCRATCH_BRANCH}`" if layout == "gpt2" else "main branch"
            lines += [f"The same weights in the other layout are on the {where}: `{other}`.", ""]
        return lines

    def config_section(self) -> list[str]:
        if not self.config:
            return []
        fields = {name: portable(value, self.out_dir) for name, value in dataclasses.asdict(self.config).items()}
        return [
            "## Training config",
            "",
            "Paths are relative to the run folder, or given by name.",
            "",
            "| field | value |",
            "| --- | --- |",
            *(f"| `{name}` | `{value}` |" for name, value in fields.items()),
            "",
        ]
