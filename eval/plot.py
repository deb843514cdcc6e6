"""Training curves from a run's `log.jsonl`: loss and HellaSwag over tokens seen, with reference lines.

    python -m eval.plot runs/gpt2-124m            # writes runs/gpt2-124m/plots/{loss,hellaswag}.png

`log.jsonl` holds one JSON object per line with at least `step` and `tokens` (tokens seen), and any of
`train/loss`, `val/loss`, `hellaswag/acc_norm` (the trainer's names). A step logged twice (a run resumed
from an earlier checkpoint) keeps its last value.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from eval.references import GPT2_124M_HELLASWAG_ACC_NORM, GPT2_124M_VAL_LOSS, GPT3_124M_HELLASWAG_ACC_NORM, Reference
from gpt2_scratch.training.files import replace_with
from gpt2_scratch.user_errors import UserError, run_command

LOG_NAME = "log.jsonl"


def read_log(path: str | os.PathLike) -> list[dict]:
    """The records of a `log.jsonl`, each checked to have integer `step` and `tokens`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found: the trainer writes {LOG_NAME} into its --out_dir")
    records = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{line_no}: not valid JSON ({err.msg})") from err
        if not isinstance(record, dict) or not all(isinstance(record.get(k), int) for k in ("step", "tokens")):
            raise UserError(f"{path}:{line_no}: expected an object with integer 'step' and 'tokens', got {line!r}")
        records.append(record)
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(tokens, values) of `key`, one point per step (the last logged wins), in step order."""
    by_step = {r["step"]: (r["tokens"], r[key]) for r in records if r.get(key) is not None}
    points = [by_step[step] for step in sorted(by_step)]
    return [p[0] for p in points], [float(p[1]) for p in points]


def draw(ax, curves: list[tuple[str, str, list[int], list[float]]], refs: list[Reference], ylabel: str) -> None:
    styles = ("--", ":")
    for label, marker, x, y in curves:
        ax.plot(x, y, marker=marker, markersize=3, linewidth=1, label=label)
    for ref, style in zip(refs, styles, strict=False):
        ax.axhline(ref.value, color="tab:red", linestyle=style, label=f"{ref.label}: {ref.value} ({ref.source})")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_training(out_dir: str | os.PathLike, plots_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write `loss.png` (train and val loss) and, when HellaSwag was evaluated, `hellaswag.png`.

    Returns the paths written, into `plots_dir` (default `out_dir/plots`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = Path(out_dir) / LOG_NAME
    records = read_log(log)
    plots_dir = Path(plots_dir) if plots_dir is not None else Path(out_dir) / "plots"
    loss_curves = [
        (name, marker, *series(records, key))
        for name, marker, key in (("train", None, "train/loss"), ("val", "o", "val/loss"))
    ]
    loss_curves = [c for c in loss_curves if c[2]]
    if not loss_curves:
        raise UserError(f"{log} has no 'train/loss' or 'val/loss' values to plot")
    plots_dir.mkdir(parents=True, exist_ok=True)
    figures = [("loss.png", "loss", loss_curves, [GPT2_124M_VAL_LOSS], "cross-entropy loss")]
    hellaswag = series(records, "hellaswag/acc_norm")
    if hellaswag[0]:
        refs = [GPT2_124M_HELLASWAG_ACC_NORM, GPT3_124M_HELLASWAG_ACC_NORM]
        figures.append(("hellaswag.png", "HellaSwag", [("acc_norm", "o", *hellaswag)], refs, "acc_norm"))
    written = []
    for filename, title, curves, refs, ylabel in figures:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        draw(ax, curves, refs, ylabel)
        ax.set_title(f"{title}: {Path(out_dir).resolve().name}")
        fig.tight_layout()
        replace_with(plots_dir / filename, lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=120))
        plt.close(fig)
        written.append(plots_dir / filename)
    return written


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eval.plot",
        description="Plot a training run's loss and HellaSwag curves from OUT_DIR/log.jsonl, with GPT-2 / GPT-3 "
        "reference lines.",
    )
    parser.add_argument("out_dir", help="the run's output folder (the trainer's --out_dir), holding log.jsonl")
    parser.add_argument("--plots_dir", default=None, help="where to write the PNGs (default: OUT_DIR/plots)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for path in plot_training(args.out_dir, args.plots_dir):
        print(f"wrote {path}")


if __name__ == "__main__":
    run_command(main)
