"""Where a run keeps each of its records on the local disk, and the names of its checkpoint folders
(`step_NNNNNN`, the same locally and in a remote store). Imports nothing of the project, so every part
of the trainer may name a folder."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

STEP_PREFIX = "step_"


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
        self.lock = self.out_dir / ".lock"
        self.data_cache = self.out_dir / "data_cache"  # shards of a data_dir URL, unless data_cache_dir says
        self.run_id = self.out_dir / "run_id"  # the run's identity, which its checkpoint_remote store records

    def records(self) -> tuple[Path, ...]:
        """The files a resumed run reads or appends to: each must be a regular file (or absent)."""
        return (self.config, self.run_info, self.log, self.samples, self.run_id)


def step_name(step: int) -> str:
    """The folder name of the checkpoint of `step`: step_NNNNNN."""
    return f"{STEP_PREFIX}{step:06d}"


def parse_step(name: str) -> int | None:
    """The step of a folder named step_NNNNNN (6+ ASCII digits), else None: `str.isdigit` would also take
    a superscript (which `int` refuses) and other scripts' digits (which `int` reads, aliasing a step)."""
    match = re.fullmatch(rf"{STEP_PREFIX}([0-9]{{6,}})", name)
    return int(match[1]) if match else None


def local_files(folder: Path) -> dict[str, Path]:
    """Every file under `folder`, by its POSIX path relative to `folder`, sorted."""
    return {p.relative_to(folder).as_posix(): p for p in sorted(Path(folder).rglob("*")) if p.is_file()}
