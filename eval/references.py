"""Published scores that our runs are measured against, each with its source (see docs/eval.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reference:
    value: float
    label: str
    source: str


# GPT-2 124M (OpenAI's weights) on the FineWeb-Edu validation shard: build-nanogpt `play.ipynb`.
GPT2_124M_VAL_LOSS = Reference(3.2924, "GPT-2 124M", "build-nanogpt play.ipynb, FineWeb-Edu val")
# Completion-style HellaSwag scoring (this project's and build-nanogpt's `hellaswag.py`), all 10,042 val examples.
GPT2_124M_HELLASWAG_ACC_NORM = Reference(0.2955, "GPT-2 124M", "build-nanogpt hellaswag.py scoring")
# The GPT-3 paper's smallest model ("GPT-3 Small", 125M), HellaSwag zero-shot (Brown et al. 2020).
GPT3_124M_HELLASWAG_ACC_NORM = Reference(0.337, "GPT-3 124M", "Brown et al. 2020, GPT-3 paper")
