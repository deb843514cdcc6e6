"""Side-by-side comparison of checkpoints: parameters, val loss, HellaSwag and samples from the same prompts.

    python -m eval.compare --model runs/gpt2-124m/hf-gpt2 --baseline openai-community/gpt2 \\
        --data_dir data/fineweb-edu-10BT --hellaswag hellaswag_val.jsonl --out_dir compare/

writes `compare.md` (a Markdown table and the samples), `compare.json` and `compare.png` (bar charts
with the published GPT-2 / GPT-3 reference lines). A model is a folder in either export layout (`hf/`,
ours; `hf-gpt2/`, official GPT-2) or a Hub id. Local folders work offline; Hub ids need network or the
Hub cache. Val loss uses the same windows for every model: `--seq_len`, or by default the shortest
context among the models compared. Models are loaded one at a time, so any number fits in memory.
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import torch
from torch import nn

from eval.common import (
    config_positions,
    count_parameters,
    load_model,
    load_model_config,
    max_positions,
    parse_device,
    resolve_device,
)
from eval.hellaswag import evaluate_hellaswag, load_examples
from eval.references import GPT2_124M_HELLASWAG_ACC_NORM, GPT2_124M_VAL_LOSS, GPT3_124M_HELLASWAG_ACC_NORM
from eval.val_loss import evaluate_val_loss
from gpt2_scratch.training.files import check_writable, replace_text, replace_with
from gpt2_scratch.user_errors import UserError, run_command

DEFAULT_PROMPTS = ["Hello, I'm a language model,", "The meaning of life is", "In 1905, Albert Einstein"]


def generate_samples(
    model: nn.Module,
    prompts: list[str],
    *,
    max_new_tokens: int,
    top_k: int | None,
    seed: int,
    device: torch.device,
) -> list[str]:
    """One completion per prompt (the prompt included). Sampling restarts from `seed` for every model
    and prompt, so all models draw from the same random stream; `top_k=None` decodes greedily."""
    from data_prep.tokenizer import EOT_ID, get_encoding

    encoding, limit = get_encoding(), max_positions(model)
    samples = []
    for prompt in prompts:
        ids = encoding.encode_ordinary(prompt)
        new_tokens = max_new_tokens if limit is None else min(max_new_tokens, limit - len(ids))
        if not ids or new_tokens < 1:
            raise UserError(f"prompt {prompt!r} is empty or leaves no room in the model's {limit} positions")
        input_ids = torch.tensor([ids], device=device)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=new_tokens,
                do_sample=top_k is not None,
                top_k=top_k,
                pad_token_id=EOT_ID,
                eos_token_id=None,  # always as many tokens, so samples compare at equal length
            )
        samples.append(encoding.decode(out[0].tolist()))
    return samples


def compare_models(
    models: list[str],
    *,
    baselines: tuple[str, ...] = (),
    data_dir: str | None = None,
    hellaswag_examples: list[dict] | None = None,
    prompts: list[str] = DEFAULT_PROMPTS,
    batch_size: int = 8,
    seq_len: int | None = None,
    val_batches: int | None = None,
    max_new_tokens: int = 32,
    top_k: int | None = 50,
    seed: int = 42,
    device: str | None = None,
) -> dict:
    """Evaluate each model in turn with the same data, settings and prompts; return a JSON-able dict.

    Val loss runs when `data_dir` is given, every model on the same `seq_len`-token windows (by default
    the shortest context among the models, so that every model takes them); HellaSwag runs when
    `hellaswag_examples` are given. `baselines` are entries of `models` to mark as such.
    """
    device = resolve_device(device=device)
    window = "given"
    if data_dir is not None:
        seq_len, window = val_window(models, seq_len)
    rows = []
    for name in models:
        model = load_model(name, device=device)
        row = {"model": name, "baseline": name in baselines, "parameters": count_parameters(model)}
        if data_dir is not None:
            row["val_loss"] = evaluate_val_loss(
                model, data_dir, batch_size=batch_size, seq_len=seq_len, max_batches=val_batches, device=device
            )
        if hellaswag_examples is not None:
            scores = evaluate_hellaswag(model, hellaswag_examples, batch_size=batch_size, device=device)
            row.update(hellaswag_acc=scores["acc"], hellaswag_acc_norm=scores["acc_norm"])
        row["samples"] = generate_samples(
            model, prompts, max_new_tokens=max_new_tokens, top_k=top_k, seed=seed, device=device
        )
        rows.append(row)
        del model
        gc.collect()
    settings = {
        "data_dir": data_dir,
        "seq_len": seq_len if data_dir is not None else None,
        "seq_len_from": window if data_dir is not None else None,
        "val_batches": val_batches,
        "hellaswag_examples": len(hellaswag_examples) if hellaswag_examples is not None else None,
        "prompts": prompts,
        "max_new_tokens": max_new_tokens,
        "top_k": top_k,
        "seed": seed,
    }
    return {"models": rows, "settings": settings}


def val_window(models: list[str], seq_len: int | None) -> tuple[int, str]:
    """The val-loss window and where it came from: `seq_len` when given ("given"), else the shortest
    context (`n_positions`) among `models` ("shortest context"), read from their configs. A given
    window longer than some model's context is refused before any model is evaluated."""
    positions = {name: config_positions(load_model_config(name)) for name in models}
    known = {name: n for name, n in positions.items() if n is not None}
    if seq_len is None:
        if not known:
            raise UserError("no model's config gives its context length (n_positions); pass --seq_len")
        return min(known.values()), "shortest context"
    too_short = {name: n for name, n in known.items() if n < seq_len}
    if too_short:
        name, n = min(too_short.items(), key=lambda item: item[1])
        raise UserError(
            f"--seq_len {seq_len} is longer than the {n} positions of {name}; lower it, or leave it out to use "
            f"the shortest context of the models compared ({min(known.values())})"
        )
    return seq_len, "given"


def fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def to_markdown(result: dict) -> str:
    """The comparison as a Markdown table (one column per model) followed by the samples."""
    rows, settings = result["models"], result["settings"]
    names = [f"{r['model']} (baseline)" if r["baseline"] else r["model"] for r in rows]
    lines = ["| | " + " | ".join(f"`{n}`" for n in names) + " |", "|---|" + "---:|" * len(rows)]
    lines.append("| parameters | " + " | ".join(f"{r['parameters'] / 1e6:.2f}M" for r in rows) + " |")
    if settings["data_dir"] is not None:
        shortest = ", the shortest context compared" if settings.get("seq_len_from") == "shortest context" else ""
        label = f"val loss ({settings['seq_len']}-token windows{shortest})"
        lines.append(f"| {label} | " + " | ".join(fmt(r["val_loss"]) for r in rows) + " |")
    if settings["hellaswag_examples"] is not None:
        for key in ("acc", "acc_norm"):
            label = f"HellaSwag {key} ({settings['hellaswag_examples']} examples)"
            lines.append(f"| {label} | " + " | ".join(fmt(r[f"hellaswag_{key}"]) for r in rows) + " |")
    refs = (GPT2_124M_VAL_LOSS, GPT2_124M_HELLASWAG_ACC_NORM, GPT3_124M_HELLASWAG_ACC_NORM)
    val, hs2, hs3 = (f"{r.label} {r.value} ({r.source})" for r in refs)
    decoding = f"top-k {settings['top_k']}, seed {settings['seed']}" if settings["top_k"] else "greedy"
    lines += [
        "",
        f"References: val loss {val}; HellaSwag acc_norm {hs2}, {hs3}.",
        "",
        f"## Samples ({decoding}, {settings['max_new_tokens']} new tokens)",
    ]
    fence = "`" * 3
    for i, prompt in enumerate(settings["prompts"]):
        lines += ["", f"### {prompt!r}"]
        for name, row in zip(names, rows, strict=True):
            lines += ["", f"`{name}`:", "", fence + "text", row["samples"][i].replace(fence, "'''"), fence]
    return "\n".join(lines) + "\n"


def plot_comparison(result: dict, path: str | Path) -> Path:
    """Bar charts of parameters, val loss and HellaSwag acc_norm, with the published reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, settings = result["models"], result["settings"]
    panels = [("parameters (M)", [r["parameters"] / 1e6 for r in rows], [])]
    if settings["data_dir"] is not None:
        panels.append(("val loss (lower is better)", [r["val_loss"] for r in rows], [GPT2_124M_VAL_LOSS]))
    if settings["hellaswag_examples"] is not None:
        refs = [GPT2_124M_HELLASWAG_ACC_NORM, GPT3_124M_HELLASWAG_ACC_NORM]
        panels.append(("HellaSwag acc_norm (higher is better)", [r["hellaswag_acc_norm"] for r in rows], refs))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.5), squeeze=False)
    colors = ["tab:gray" if r["baseline"] else "tab:blue" for r in rows]
    ticks = [r["model"].rstrip("/").split("/")[-1] for r in rows]
    for ax, (title, values, refs) in zip(axes[0], panels, strict=True):
        bars = ax.bar(range(len(rows)), values, color=colors)
        ax.bar_label(bars, fmt="%.4g", fontsize=8)
        for ref, style in zip(refs, ("--", ":"), strict=False):
            ax.axhline(ref.value, color="tab:red", linestyle=style, label=f"{ref.label} {ref.value} ({ref.source})")
        if refs:
            ax.legend(fontsize=6, loc="lower right")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(rows)), ticks, rotation=20, fontsize=7)
    fig.tight_layout()
    replace_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return Path(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eval.compare",
        description="Compare checkpoints side by side: parameters, val loss, HellaSwag and generation samples. "
        "Writes compare.md, compare.json and compare.png into --out_dir.",
    )
    parser.add_argument(
        "--model", action="append", default=[], help="a model folder or Hub id to compare; repeat for several"
    )
    parser.add_argument(
        "--baseline",
        action="append",
        default=[],
        help="a reference model (e.g. openai-community/gpt2), shown after the models and marked; repeatable",
    )
    parser.add_argument("--data_dir", default=None, help="data_prep shard folder for val loss (skipped when absent)")
    parser.add_argument(
        "--hellaswag",
        default=None,
        help="hellaswag_val.jsonl for HellaSwag, or 'auto' for the cached / downloaded file (skipped when absent)",
    )
    parser.add_argument("--limit", type=int, default=None, help="score only the first N HellaSwag examples")
    parser.add_argument("--val_batches", type=int, default=None, help="val-loss batches per model (default: all)")
    parser.add_argument(
        "--batch_size", type=int, default=8, help="sequences (val loss) or examples (HellaSwag) per forward pass"
    )
    parser.add_argument(
        "--seq_len",
        type=int,
        default=None,
        help="val-loss window length, the same for every model (default: the shortest context among them)",
    )
    parser.add_argument(
        "--prompt", action="append", default=None, help=f"a generation prompt, repeatable (default: {DEFAULT_PROMPTS})"
    )
    parser.add_argument("--max_new_tokens", type=int, default=32, help="tokens to generate per prompt")
    parser.add_argument("--top_k", type=int, default=50, help="top-k sampling, as build-nanogpt; 0 for greedy decoding")
    parser.add_argument("--seed", type=int, default=42, help="sampling seed, reset for every model and prompt")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda, else mps, else cpu)")
    parser.add_argument("--out_dir", default="compare", help="folder for compare.md, compare.json, compare.png")
    args = parser.parse_args(argv)
    if not args.model and not args.baseline:
        parser.error("give at least one --model or --baseline")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device is not None:
        parse_device(args.device)
    if Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        raise UserError(f"--out_dir {args.out_dir} is a file; give a folder for compare.md, .json and .png")
    check_writable(Path(args.out_dir), "compare.md, .json and .png")  # now, not after the evaluations
    examples = None
    if args.hellaswag is not None:
        examples = load_examples(None if args.hellaswag == "auto" else args.hellaswag, limit=args.limit)
    result = compare_models(
        args.model + args.baseline,
        baselines=tuple(args.baseline),
        data_dir=args.data_dir,
        hellaswag_examples=examples,
        prompts=args.prompt or DEFAULT_PROMPTS,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        val_batches=args.val_batches,
        max_new_tokens=args.max_new_tokens,
        top_k=args.top_k or None,
        seed=args.seed,
        device=args.device,
    )
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(result)
    replace_text(out_dir / "compare.md", markdown)  # a full disk: one line, no cut file
    replace_text(out_dir / "compare.json", json.dumps(result, indent=2) + "\n")
    plot_comparison(result, out_dir / "compare.png")
    print(markdown)
    print(f"wrote {out_dir / 'compare.md'}, {out_dir / 'compare.json'}, {out_dir / 'compare.png'}")


if __name__ == "__main__":
    run_command(main)
