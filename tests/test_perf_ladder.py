"""The throughput ladder's command: its rungs and its JSON. Nothing here asserts a speed."""

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_ladder  # noqa: E402


def test_each_rung_adds_exactly_one_change_to_the_one_before():
    rungs = bench_ladder.ladder()
    assert [r.name for r in rungs[:7]] == [
        "fp32",
        "tf32",
        "bf16",
        "compile",
        "flash",
        "vocab_50304",
        "fused_adamw",
    ]  # the reproduction's order
    assert rungs[0].settings == bench_ladder.Settings()  # the first rung has every setting off
    for before, after in zip(rungs, rungs[1:], strict=False):
        a, b = dataclasses.asdict(before.settings), dataclasses.asdict(after.settings)
        changed = [k for k in a if a[k] != b[k]]
        assert len(changed) == 1, (after.name, changed)


def test_skipped_rungs_say_why_and_leave_their_change_out_of_the_rungs_above(monkeypatch):
    for bf16 in (False, True):
        monkeypatch.setattr(bench_ladder, "native_bf16", lambda device, bf16=bf16: bf16)
        reasons = {r.name: bench_ladder.skip_reason(r, "cpu") for r in bench_ladder.ladder()}
        assert {name for name, reason in reasons.items() if reason} == {"tf32"} | ({"bf16"} if not bf16 else set())
        top = bench_ladder.effective_settings("huge_pages", "cpu")
        assert not top.tf32 and top.bf16 == bf16 and top.compile and top.chunked_loss
    on_cuda = {r.name for r in bench_ladder.ladder() if bench_ladder.skip_reason(r, "cuda")}
    assert on_cuda == {"pinned_threads", "huge_pages"}
    assert bench_ladder.effective_settings("chunked_loss", "cuda") == bench_ladder.ladder()[7].settings


def test_command_writes_rungs_with_tokens_per_s_or_a_reason(tmp_path):
    out = tmp_path / "ladder.json"
    argv = ["--device", "cpu", "--preset", "cpu-nano", "--seq-len", "16", "--batch-size", "2"]
    argv += ["--steps", "1", "--warmup", "0", "--rungs", "fp32,tf32", "--out", str(out)]
    argv += ["--peak-tflops", "1"]
    bench_ladder.main(argv)
    rungs = {r["name"]: r for r in json.loads(out.read_text())["rungs"]}
    assert list(rungs) == ["fp32", "tf32"]  # later rungs compile: too slow for a unit test
    assert rungs["tf32"]["tokens_per_s"] is None and "tensor cores" in rungs["tf32"]["reason"]
    assert rungs["fp32"]["tokens_per_s"] > 0 and rungs["fp32"]["peak_memory_bytes"] > 0, rungs["fp32"]
    assert "| fp32 |" in out.with_suffix(".md").read_text()
