"""The model card (README.md) of each export: Hub metadata (license, datasets, model-index with the
results), what the folder is and how to load it, the results, the data and the training config."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

import yaml

from gpt2_scratch.training.export import GPT2_EXPORT, PLOTS, SCRATCH_EXPORT, read_record, write_text
from gpt2_scratch.training.files import copy_replacing, read_regular
from gpt2_scratch.training.hub import SCRATCH_BRANCH

# The model card's `license:`. GPT-2's own weights and code are MIT; set another with write_model_cards(license=).
DEFAULT_LICENSE = "mit"
# The Hub copy of HellaSwag (rowanz/hellaswag's data), named in the model-index.
HELLASWAG_HUB_ID = "Rowan/hellaswag"
TASK = {"type": "text-generation", "name": "Text Generation"}
RESULT_KEYS = ("train/loss", "val/loss", "hellaswag/acc", "hellaswag/acc_norm")
# Only tools whose run on an export is recorded, with its figures, in gpt2-scratch's docs/where-it-runs.md.
MEASURED_TOOLS = (
    "lm-evaluation-harness, llama.cpp (its `convert_hf_to_gguf.py` and inference), onnxruntime (through "
    "`torch.onnx` and Optimum's exporter), transformers.js and CTranslate2"
)
UNTRIED_TOOLS = "vLLM and Text Generation Inference"
LAYOUT_TEXT = {
    "gpt2": "This is the official GPT-2 layout (`GPT2LMHeadModel`, `model_type: gpt2`, no custom code): stock "
    f"transformers loads it without `trust_remote_code`. Measured on such an export, with this folder's logits "
    f"to 1e-5 (1e-3 in llama.cpp): {MEASURED_TOOLS}. Not tried: {UNTRIED_TOOLS}, which serve `GPT2LMHeadModel` "
    "checkpoints.",
    "scratch": "This is gpt2-scratch's own class (`GPT2ScratchForCausalLM`, shipped here as "
    "`modeling_gpt2_scratch.py`), loaded with `trust_remote_code=True`; it needs transformers >= 5. Its weights "
    "are those of the official GPT-2 layout, which loads without remote code, on transformers 4.x too.",
}


VAL_TEXT = {
    False: "Validation loss is measured on the held-out validation shard of the same data.",
    True: "Validation loss is the mean of the sources' held-out validation losses, weighted as in training.",
}


@dataclass
class DataSource:
    """The training data as the manifest records it: `ref` identifies it (a Hub dataset id, the file
    names, the built-in corpus's name), `text` describes it for a reader; `hub_id` only for Hub data."""

    ref: str
    text: str
    hub_id: str | None = None
    fields: dict = dataclasses.field(default_factory=dict)  # config, split, revision of a Hub dataset
    hub_ids: list = dataclasses.field(default_factory=list)  # a mixture's Hub datasets
    mixed: bool = False  # several sources by weight (`data_mix`)


def data_source(manifest: dict) -> DataSource:
    """What the data manifest (`data_prep`'s manifest.json) says the data came from: the Hub dataset with
    its config, split and revision, the files by name (never their local paths), or the built-in corpus."""
    if isinstance(manifest, dict) and isinstance(manifest.get("mixture"), list):
        return mixture_source(manifest["mixture"])
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
        # by name only, whichever system wrote the manifest: PureWindowsPath splits at backslashes and slashes
        names = [PureWindowsPath(str(f.get("path", "?"))).name for f in source["files"] if isinstance(f, dict)]
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


def mixture_source(parts: list[dict]) -> DataSource:
    """A `data_mix` run's sources (`gpt2_scratch.training.data.prepare_mixture`), each with its share."""
    total = sum(part["weight"] for part in parts)
    sources = [(part["weight"] / total, data_source(part["manifest"])) for part in parts]
    text = "a mixture of " + "; ".join(f"{share:.1%} {source.text}" for share, source in sources)
    ref = " + ".join(f"{source.ref} ({share:.0%})" for share, source in sources)
    hub_ids = list(dict.fromkeys(source.hub_id for _, source in sources if source.hub_id))
    text += " (shares of the training sequences, by `data_mix` weight)"
    return DataSource(ref, text, hub_ids=hub_ids, mixed=True)


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
        if self.source.hub_id or self.source.hub_ids:
            meta["datasets"] = [self.source.hub_id] if self.source.hub_id else self.source.hub_ids
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
            f"{self.source.text}. {VAL_TEXT[self.source.mixed]}",
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
            held_out = "weighted held-out validation shards" if self.source.mixed else "held-out validation shard"
            dataset = {"type": self.source.ref, "name": f"{self.source.ref} ({held_out})"}
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
        if self.config.data_mix:  # each source's path made portable, not the whole list as one path
            from data_prep.mixture import STREAM_PREFIX, parse_mix, stream_of

            def source_text(source: str) -> str:  # a stream's files too (`stream:/abs/*.jsonl`)
                stream = stream_of(source)
                return STREAM_PREFIX + portable(stream, self.out_dir) if stream else portable(source, self.out_dir)

            mix = parse_mix(self.config.data_mix)
            fields["data_mix"] = ",".join(f"{source_text(source)}:{weight:g}" for source, weight in mix)
        trained = trained_precision(self.out_dir)
        if trained and fields.get("mixed_precision") != trained:  # 'auto' says which: bf16, fp16 or fp32 ('no')
            label = "fp16, loss-scaled" if trained == "fp16" else trained
            fields["mixed_precision"] = f"{fields['mixed_precision']} ({label})"
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


def trained_precision(out_dir: Path) -> str | None:
    """The precision the run's last launch trained in, as run_info.json records it, or None where that
    file is missing or not ours to trust (the card then shows the config as given)."""
    try:
        info = json.loads(read_regular(Path(out_dir) / "run_info.json", limit=1 << 20))
    except (OSError, ValueError):
        return None
    precision = info.get("mixed_precision") if isinstance(info, dict) else None
    return precision if isinstance(precision, str) else None


def write_model_cards(out_dir: Path, config, model, manifest: dict, license: str | None = None) -> list[Path]:
    """README.md model cards for the exports in `out_dir` (main process only), with the plots of
    `out_dir/plots` copied beside them. The results come from `out_dir/log.jsonl`, up to the step the
    export holds, so a relaunched finished run writes the same card. Returns the cards written."""
    out_dir = Path(out_dir)
    scratch = read_record(out_dir / SCRATCH_EXPORT, "scratch")
    results = run_results(out_dir / "log.jsonl", through_step=scratch["step"] if scratch else None)
    card = ModelCard(config, model, manifest, results, out_dir, license=license or DEFAULT_LICENSE)
    written = []
    for name, layout in ((SCRATCH_EXPORT, "scratch"), (GPT2_EXPORT, "gpt2")):
        folder = out_dir / name
        if not folder.is_dir():
            continue
        plots = [p for p in PLOTS if (out_dir / "plots" / p).is_file()]
        for plot in plots:  # through a temporary copy: a kill never leaves a cut plot in the export
            copy_replacing(out_dir / "plots" / plot, folder / plot)
        write_text(folder / "README.md", card.render(layout, plots))
        written.append(folder / "README.md")
    return written
