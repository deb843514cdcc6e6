"""The report's Markdown table, and the atomic writes of it and the JSON."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def markdown_path(args: argparse.Namespace) -> Path:
    return Path(args.md) if args.md else Path(args.out).with_suffix(".md")


def markdown(report: dict[str, Any]) -> str:
    import bench_ladder

    device = report["device"]
    head = f"**{device.get('name')}**"
    if device.get("memory_bytes"):
        head += f", {device['memory_bytes'] / 2**30:.0f} GiB, compute capability {device['compute_capability']}"
    found = report["versions"]
    head += "; " + ", ".join(f"{k} {found[k]}" for k in ("python", "torch", "transformers", "accelerate"))
    head += f"; {report['date']}" + (" (--smoke)" if report["smoke"] else "")
    lines = [head, ""]
    differ = report["version_differences"]
    if differ:
        lines += [
            "Versions other than tested: "
            + ", ".join(f"{d['package']} {d['found']} (tested {d['tested']})" for d in differ),
            "",
        ]
    if report.get("goal"):
        goal = report["goal"]
        verdict = "met" if goal["met"] else "not met"
        lines += [f"Trainer MFU {goal['mfu']:.1%} against the goal of {goal['target']:.0%}: {verdict}.", ""]
    lines += ["| check | result | detail | seconds |", "|---|---|---|---|"]
    for c in report["checks"]:
        result = "ok" if c["ok"] else ("skipped" if c["ok"] is None else "FAILED")
        detail = str(c["detail"]).replace("|", "/").replace("\n", " ")
        lines.append(f"| {c['name']} | {result} | {detail} | {c['seconds']:.1f} |")
    if report.get("running"):
        lines.append(f"| {report['running']} | stopped while running | | |")
    if report.get("rungs"):
        lines += ["", bench_ladder.markdown({"rungs": report["rungs"]})]
    return "\n".join(lines)
