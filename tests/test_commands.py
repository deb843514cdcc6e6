"""One voice for every command: bad input is one `error: ...` line on stderr and exit status 2; a bug
keeps its traceback. Each command runs through its own `if __name__ == "__main__":` block (runpy, in
this process, so that the eleven of them cost imports once); one real process checks the exit path."""

import json
import runpy
import subprocess
import sys
import warnings

import pytest
from trainer_runs import ROOT

from gpt2_scratch import export_gpt2
from gpt2_scratch.user_errors import UserError, run_command

SCRIPTS = (
    "train_accelerate.py",
    "benchmarks/bench_train.py",
    "benchmarks/bench_ladder.py",
    "benchmarks/bench_data.py",
    "benchmarks/gpu_check.py",
    "benchmarks/bench_optimizers.py",
    "benchmarks/bench_mix.py",
    "benchmarks/bench_prep_memory.py",
)
MODULES = (
    "data_prep",
    "gpt2_scratch.export_gpt2",
    "gpt2_scratch.convert_nanogpt",
    "eval.val_loss",
    "eval.hellaswag",
    "eval.compare",
    "eval.plot",
)
NAMES = [*SCRIPTS, *MODULES]


def commands(tmp):
    """Every command, with a cheap bad input and what its one line must say."""
    binary = tmp / "hellaswag.bin"
    binary.write_bytes(bytes(range(128, 256)))
    missing = str(tmp / "missing")
    return {
        "train_accelerate.py": (["--max_steps", "0"], "max_steps must be >= 1"),
        "data_prep": (["--verify", "--out_dir", missing], "no manifest.json in"),
        "gpt2_scratch.export_gpt2": ([missing], "no folder at"),
        "gpt2_scratch.convert_nanogpt": ([f"{missing}.pt", str(tmp / "out")], "no checkpoint file at"),
        "eval.val_loss": (["--model", missing, "--data_dir", missing, "--device", "bogus"], "not a torch device"),
        "eval.hellaswag": (["--model", missing, "--data", str(binary)], "is not UTF-8 text"),
        "eval.compare": (["--model", missing, "--device", "bogus"], "not a torch device"),
        "eval.plot": ([missing], "log.jsonl not found"),
        "benchmarks/bench_train.py": (["--seq-len", "0"], "--seq-len must be >= 1, got 0"),
        "benchmarks/bench_ladder.py": (["--seq-len", "0"], "--seq-len must be >= 1, got 0"),
        "benchmarks/bench_data.py": (["--tokens", "0"], "--tokens must be >= 1, got 0"),
        "benchmarks/gpu_check.py": (["--smoke", "--only", "bogus"], "--only: unknown check(s) bogus"),
        "benchmarks/bench_optimizers.py": (["--data-dir", missing, "--steps", "0"], "--steps must be >= 1, got 0"),
        "benchmarks/bench_mix.py": (["--repeats", "0"], "--repeats must be >= 1, got 0"),
        "benchmarks/bench_prep_memory.py": (["--mb", "0"], "--mb must be >= 1, got 0"),
    }


def run_as_main(name: str, argv: list[str], monkeypatch) -> int:
    """Run command `name` (a module, or a script under the repository) as `python -m name argv` or
    `python name argv` would, in this process; returns its exit status."""
    monkeypatch.setattr(sys, "argv", [name, *argv])
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # a script's own folder is on its path
    with warnings.catch_warnings(), pytest.raises(SystemExit) as exited:
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: "found in sys.modules" (already imported)
        if name in SCRIPTS:
            runpy.run_path(str(ROOT / name), run_name="__main__")
        else:
            runpy.run_module(name, run_name="__main__", alter_sys=True)
    return exited.value.code


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_is_one_error_line_and_exit_2(name, tmp_path, monkeypatch, capsys):
    argv, message = commands(tmp_path)[name]
    status = run_as_main(name, argv, monkeypatch)
    err = capsys.readouterr().err
    assert status == 2, err[-3000:]
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert message in line
    assert not (tmp_path / "missing").exists()


def test_every_command_is_in_the_list(tmp_path):
    """A new command with a `__main__` block joins the parametrised test above."""
    found = set()
    for path in [
        *ROOT.glob("*.py"),
        *ROOT.glob("benchmarks/*.py"),
        *ROOT.glob("eval/*.py"),
        *ROOT.glob("gpt2_scratch/*.py"),
        ROOT / "data_prep/__main__.py",
    ]:
        if 'if __name__ == "__main__":' in path.read_text():
            rel = path.relative_to(ROOT).as_posix()
            found.add(rel if rel in SCRIPTS else rel.removesuffix(".py").removesuffix("/__main__").replace("/", "."))
    assert found == set(NAMES) == set(commands(tmp_path))


def test_a_real_process_exits_2_with_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "data_prep", "--verify", "--out_dir", str(tmp_path / "missing")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [done.stderr.strip()] and done.stderr.startswith("error: no manifest.json")


def test_a_user_error_of_several_lines_is_still_one_line(capsys):
    def main(argv):
        raise UserError("first\nsecond")

    with pytest.raises(SystemExit) as exited:
        run_command(main, [])
    assert exited.value.code == 2 and capsys.readouterr().err == "error: first second\n"


def test_an_unexpected_exception_is_not_turned_into_error(monkeypatch, tmp_path):
    """A bug inside a command (here export_gpt2's, made to fail the way a bug does) propagates as itself."""

    def broken(path, out=None):
        raise KeyError("a bug, not bad input")

    monkeypatch.setattr(export_gpt2, "export", broken)
    with pytest.raises(KeyError, match="a bug"):
        run_command(export_gpt2.main, [str(tmp_path)])
    # and as a process: Python's traceback and exit status 1, no `error:` line
    script = "from gpt2_scratch.user_errors import run_command\n"
    script += "def main(argv):\n    return {}['missing']\nrun_command(main)\n"
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "KeyError: 'missing'" in done.stderr
    assert not any(line.startswith("error:") for line in done.stderr.splitlines())


def test_a_command_returning_a_status_exits_with_it():
    for result, status in ((None, 0), ({"a": 1}, 0), (3, 3)):
        with pytest.raises(SystemExit) as exited:
            run_command(lambda argv, result=result: result)
        assert exited.value.code == status


def test_bench_optimizers_joins_the_reports_of_a_split_run_and_names_a_bad_one(tmp_path, monkeypatch, capsys):
    """`--families` spreads the sweep over processes; `--reuse-from` joins their reports: each run from the
    file that holds it, a later file's replacing an earlier one's."""
    bench = runpy.run_path(str(ROOT / "benchmarks/bench_optimizers.py"))
    first, second = tmp_path / "a.json", tmp_path / "m.json"
    first.write_text(json.dumps({"runs": {"adamw-cosine lr 0.001": {"final_val_loss": 6.5}, "x": {"v": 1}}}))
    second.write_text(json.dumps({"runs": {"muon-wsd lr 0.02": {"final_val_loss": 5.9}, "x": {"v": 2}}}))
    runs = bench["reusable_runs"]([first, second])
    assert runs == {
        "adamw-cosine lr 0.001": (first, {"final_val_loss": 6.5}),
        "muon-wsd lr 0.02": (second, {"final_val_loss": 5.9}),
        "x": (second, {"v": 2}),
    }
    (tmp_path / "plot.png").write_bytes(b"\x89PNG")
    argv = ["--data-dir", str(tmp_path / "missing"), "--reuse-from", str(first), str(tmp_path / "plot.png")]
    assert run_as_main("benchmarks/bench_optimizers.py", argv, monkeypatch) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {tmp_path / 'plot.png'}: not a report of this benchmark to reuse")
