"""Peak memory of `python -m data_prep` on one huge document, as a multiple of the document's size.

Writes a file holding a single document of `--mb` MB on one line (English-like words and numbers, no
newline, as a scraped page or a book joined into one line can be): a `.txt` (`--kind txt`, one
document per file) or a one-line `.jsonl` (`--kind jsonl`, the text in one JSON string). Then runs
`python -m data_prep --files FILE --num_proc 1` in `--repo` (default: this checkout; another checkout
measures its code with the same interpreter) and reports the process's peak resident memory (its
ru_maxrss, read from wait4) and that peak divided by the file's size:

    nice -n 19 .venv/bin/python benchmarks/bench_prep_memory.py --mb 300 --kind txt
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt2_scratch.user_errors import check_at_least, run_command  # noqa: E402

WORDS = (
    "the of and to in a is that for it as was with be by on not he I this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no will what more can its out up who them "
    "about into time only some could other these than then two first any new like our over such after most also "
    "language model training tokenizer memory document paragraph 1984 2024 3.14159 don't it's we'll they've"
).split()


def write_document(path: Path, mb: int, kind: str, seed: int = 0) -> None:
    """One document of about `mb` MB of space-separated words, written 1 MB at a time."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS, dtype=object)
    with open(path, "w", encoding="utf-8") as f:
        if kind == "jsonl":
            f.write('{"text": "')
        written = 0
        while written < mb * 1_000_000:
            chunk = " ".join(words[rng.integers(0, len(words), 200_000)]) + " "
            f.write(chunk)
            written += len(chunk)
        f.write("end")
        if kind == "jsonl":
            f.write('"}\n')


def peak_rss_mb(argv: list[str], cwd: Path) -> tuple[float, float, int]:
    """Peak RSS in MB (this process's and its waited-for children's, from wait4), seconds, exit status."""
    tick = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"error: data_prep failed ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - tick, proc.returncode


def cpu_name() -> str:
    """The CPU's model name (what `lscpu` prints), else the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=300, help="size of the one document in MB")
    parser.add_argument("--kind", choices=("txt", "jsonl"), default="txt", help="a one-line .txt or .jsonl")
    parser.add_argument("--repo", type=Path, default=ROOT, help="the checkout whose data_prep runs")
    parser.add_argument("--work", type=Path, default=None, help="folder for the file and shards (default: a temp one)")
    args = parser.parse_args(argv)
    check_at_least({"--mb": args.mb}, {"--mb": 1})
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        source = Path(tmp) / f"one_document.{args.kind}"
        write_document(source, args.mb, args.kind)
        size_mb = source.stat().st_size / 1e6
        argv = [sys.executable, "-m", "data_prep", "--files", str(source), "--out_dir", str(Path(tmp) / "out")]
        argv += ["--val_tokens", "1000000", "--num_proc", "1", "--no_progress"]
        peak, seconds, _ = peak_rss_mb(argv, args.repo.resolve())
        baseline, _, _ = peak_rss_mb([sys.executable, "-c", "import data_prep.prepare, datasets"], args.repo.resolve())
    result = {
        "repo": str(args.repo),
        "kind": args.kind,
        "document_mb": round(size_mb, 1),
        "peak_rss_mb": round(peak),
        "peak_over_document": round(peak / size_mb, 2),
        "imports_rss_mb": round(baseline),
        "seconds": round(seconds, 1),
        "cpu": cpu_name(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    run_command(main)
