"""The run directory describes itself: where each record goes, the resolved config and the launch's
environment (processes, precision, package versions, git revision).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from training.config import ROOT, TrainConfig, config_to_yaml


@dataclass
class RunPaths:
    """Where a run keeps each of its records."""

    out_dir: Path

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.config = self.out_dir / "config.yaml"
        self.run_info = self.out_dir / "run_info.json"
        self.log = self.out_dir / "log.jsonl"
        self.samples = self.out_dir / "samples.jsonl"
        self.plots = self.out_dir / "plots"
        self.checkpoints = self.out_dir / "checkpoints"
        self.hf = self.out_dir / "hf"
        self.upload_staging = self.out_dir / ".upload_staging"  # what the background upload reads


def describe_run(config: TrainConfig, paths: RunPaths, info: dict) -> None:
    """Write the resolved config and the run's environment into the run directory (main process)."""
    paths.out_dir.mkdir(parents=True, exist_ok=True)
    paths.config.write_text(config_to_yaml(config))
    info = {
        **info,
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "git": git_revision(),
    }
    paths.run_info.write_text(json.dumps(info, indent=2) + "\n")


def package_versions() -> dict[str, str | None]:
    names = ("torch", "transformers", "accelerate", "huggingface_hub", "tiktoken", "numpy", "safetensors")
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_revision() -> dict[str, Any] | None:
    """The commit of this code and whether the working tree had uncommitted changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
