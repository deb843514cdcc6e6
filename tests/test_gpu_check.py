"""benchmarks/gpu_check.py: its --smoke form run as the GPU machine runs it (from the repository with
PYTHONPATH, without `datasets`, `evaluate` or this project's editable install), its report, and its
exit status when a check fails."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_prep.sources import DocumentStream

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402
from gpu_checks.common import GPU_SHAPE, SMOKE_SHAPE, Context  # noqa: E402
from gpu_checks.kernels import compare_generations  # noqa: E402
from gpu_checks.launch import train_command  # noqa: E402
from gpu_checks.precision import forcing_init_scale, fp16_and_bf16_runs, judge_fp16  # noqa: E402

# Put on PYTHONPATH, this makes every Python process started under it look like the GPU image: `datasets`
# and `evaluate` are not installed (their modules and their package metadata are hidden from every
# finder, as if absent), and this project's editable install is gone, so only PYTHONPATH finds it.
SITECUSTOMIZE = """
import sys

HIDDEN = {"datasets", "evaluate"}


class Hiding:
    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in HIDDEN:
            return None
        return self.inner.find_spec(fullname, path, target)

    def find_distributions(self, *args, **kwargs):
        find = getattr(self.inner, "find_distributions", None)
        found = find(*args, **kwargs) if find else ()
        return [d for d in found if (d.metadata["Name"] or "").lower() not in HIDDEN]


def editable(finder):
    return "__editable__" in getattr(finder, "__module__", "") and "gpt2_scratch" in finder.__module__


sys.meta_path[:] = [Hiding(f) for f in sys.meta_path if not editable(f)]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
for name in [m for m in sys.modules if m.partition(".")[0] in HIDDEN]:
    del sys.modules[name]
"""

# What the blocked process must see: checked inside it, before the smoke run, with the same environment.
PROBE = """
import importlib.metadata, importlib.util, sys
assert importlib.util.find_spec("datasets") is None and importlib.util.find_spec("evaluate") is None
for name in ("datasets", "evaluate"):
    try:
        importlib.metadata.version(name)
        raise SystemExit(name + " metadata still visible")
    except importlib.metadata.PackageNotFoundError:
        pass
try:
    import datasets  # noqa: F401
    raise SystemExit("datasets still importable")
except ImportError:
    pass
finders = [getattr(f, "inner", f) for f in sys.meta_path]  # unwrapped
assert not any("__editable__" in getattr(f, "__module__", "") for f in finders), finders
from gpt2_scratch import user_errors
print(user_errors.__file__)
"""


def blocked_env(tmp_path: Path) -> dict:
    blocker = tmp_path / "gpu_image"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{blocker}", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_smoke_runs_every_check_without_datasets_evaluate_or_the_editable_install(tmp_path):
    env = blocked_env(tmp_path)
    probe = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    assert Path(probe.stdout.strip()) == ROOT / "gpt2_scratch" / "user_errors.py"  # found through PYTHONPATH alone

    out = tmp_path / "report" / "gpu_check.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(out)]
    command += ["--work", str(tmp_path / "work")]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())

    checks = report["checks"]
    assert [c["name"] for c in checks] == list(gpu_check.CHECK_NAMES)
    failed = [c for c in checks if c["ok"] is not True and c["ok"] is not None]
    assert not failed, failed
    for c in checks:
        assert set(c) >= {"name", "ok", "detail", "seconds"} and c["seconds"] >= 0
        if c["ok"] is None:  # skipped: never counted as passed, and says why
            assert c["detail"].startswith("skipped: ") and len(c["detail"]) > len("skipped: ") + 10
    cpu = not torch.cuda.is_available()
    # TF32 needs CUDA; Accelerate runs FSDP only on accelerators (test_gpu_check_fsdp.py tests the check's parts)
    # and makes fp16's loss scaler only on a GPU (the check's parts are tested below)
    assert {c["name"] for c in checks if c["ok"] is None} == ({"tf32", "fsdp", "fp16"} if cpu else set())
    assert report["finished"] and report["running"] is None and report["smoke"]
    assert report["versions"]["datasets"] is None and report["versions"]["evaluate"] is None  # seen inside
    assert "absent: datasets, evaluate" in checks[0]["detail"]

    trainer = report["trainer"]
    assert trainer["resumed_from_step"] < trainer["killed_at_step"]
    assert trainer["bitwise_equal"] or not cpu  # CPU kernels are deterministic: the resume is exact
    assert trainer["tokens_per_s"] > 0 and 0 < trainer["mfu"]
    assert report["eval"]["val_loss"] == pytest.approx(report["eval"]["trainer_val_loss"], abs=1e-5)

    rungs = {r["name"]: r for r in report["rungs"]}
    assert rungs["fp32"]["tokens_per_s"] > 0
    assert all(r["reason"] for name, r in rungs.items() if r["tokens_per_s"] is None)

    table = Path(out).with_suffix(".md").read_text()
    for c in checks:
        assert f"| {c['name']} | {'skipped' if c['ok'] is None else 'ok'} |" in table
    assert "| fp32 |" in table


def test_a_failed_check_is_recorded_and_the_exit_status_is_one(tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "trainer-x" / "uninterrupted" / "hf-gpt2").mkdir(parents=True)  # an export folder with nothing in it
    out = tmp_path / "r.json"
    status = gpu_check.main(["--smoke", "--only", "tf32,eval", "--work", str(work), "--out", str(out)])
    checks = {c["name"]: c for c in json.loads(out.read_text())["checks"]}
    assert status == 1
    assert checks["tf32"]["ok"] is None and checks["eval"]["ok"] is False
    assert "holds no export" in checks["eval"]["detail"] and checks["eval"]["traceback"]
    assert "| eval | FAILED |" in out.with_suffix(".md").read_text()


def test_generations_agree_only_when_equal_or_parted_at_a_near_tie():
    torch.manual_seed(0)
    scores = torch.randn(2, 4, 10)
    scores[:, :, 3] = float("-inf")  # masked, as min_new_tokens masks the end of text
    tokens = scores.argmax(-1)
    assert "tokens equal" in compare_generations(tokens, tokens.clone(), scores, scores + 1e-7)
    with pytest.raises(AssertionError):  # equal tokens, scores apart
        compare_generations(tokens, tokens.clone(), scores, scores + 1e-2)
    with pytest.raises(AssertionError):  # a NaN never passes
        compare_generations(tokens, tokens.clone(), scores, scores.clone().fill_(float("nan")))

    parted, other = tokens.clone(), tokens.clone()
    runner_up = scores[1, 2].topk(2).indices[1]
    other[1, 2:] = runner_up  # the second run took the runner-up at position 2, then went its own way
    tied = scores.clone()
    tied[1, 2, runner_up] = tied[1, 2, parted[1, 2]] - 1e-7  # a near-tie: within the rounding between the runs
    noise = tied + 1e-6 * torch.randn_like(tied)
    assert "near-tie" in compare_generations(parted, other, tied, noise)
    with pytest.raises(AssertionError, match="not a near-tie"):  # the runner-up was far behind
        compare_generations(parted, other, scores, scores + 1e-6 * torch.randn_like(scores))


def test_an_unknown_check_or_the_full_check_without_cuda_is_a_user_error():
    from gpt2_scratch.user_errors import UserError

    with pytest.raises(UserError, match="unknown check.*bogus"):
        gpu_check.parse_args(["--smoke", "--only", "bogus"])
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="needs a CUDA device.*--smoke"):  # 124M training on a CPU: refused
            gpu_check.parse_args([])


@pytest.mark.parametrize(("skip", "take", "batch"), [(0, None, 3), (2, None, 4), (1, 5, 2), (4, 10, 8), (7, 1, 1)])
def test_the_builtin_corpus_stream_skips_and_batches_as_datasets_does(skip, take, batch):
    datasets = pytest.importorskip("datasets")
    docs = [f"document {i}" for i in range(9)]
    ours, theirs = (
        DocumentStream(lambda: iter(docs)),
        datasets.IterableDataset.from_generator(lambda: ({"text": d} for d in docs)),
    )
    ours, theirs = ours.skip(skip), theirs.skip(skip)
    if take is not None:
        ours, theirs = ours.take(take), theirs.take(take)
    assert list(ours.iter(batch_size=batch)) == list(theirs.iter(batch_size=batch))


def test_the_gpu_trainer_command_is_a_valid_config_that_the_builtin_corpus_feeds(data_dir, tmp_path):
    # The CUDA path cannot run here; its trainer command can be parsed, and its batches drawn from the corpus.
    from data_prep import ShardLoader, iter_val_batches
    from gpt2_scratch.training.config import parse_config
    from gpt2_scratch.training.recipe import grad_accum_steps

    args = argparse.Namespace(smoke=False)
    ctx = Context(args, torch.device("cuda"), GPU_SHAPE, tmp_path, {})
    command = train_command(ctx, tmp_path / "run")
    assert command[command.index("--config_file") + 1].endswith("accelerate_configs/gpu_1.yaml")
    config = parse_config(command[command.index(str(ROOT / "train_accelerate.py")) + 1 :])
    assert (config.model, config.seq_len, config.compile, config.mixed_precision) == ("gpt2", 1024, True, "auto")
    assert grad_accum_steps(config, world_size=1) == 2  # the accumulation path runs too
    assert config.warmup_steps < ctx.shape.kill_after < config.max_steps
    assert config.save_interval < ctx.shape.kill_after  # a checkpoint lies before the kill
    assert config.peak_flops is None  # MFU against the datasheet peak

    x, y = ShardLoader(data_dir, batch_size=config.micro_batch_size, seq_len=config.seq_len).next_batch()
    assert x.shape == y.shape == (32, 1024)
    val = list(iter_val_batches(data_dir, config.micro_batch_size, config.seq_len, max_batches=config.val_batches))
    assert len(val) == config.val_batches  # the built-in val shard holds the trainer's evaluation batches


def test_the_fp16_check_forces_overflows_and_tracks_bf16(data_dir, tmp_path, monkeypatch):
    """The fp16 check's runs on the CPU, with a real CPU GradScaler where Accelerate keeps it on a GPU
    (tests/fp16_on_cpu.py, which honours the check's GradScalerKwargs): the first step overflows, the scale
    halves, fp16 ends close to bf16; and the verdict fails a run whose scale never came down (the bug of
    issue 26: every step overflowed) or whose loss went astray."""
    import fp16_on_cpu
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "__init__", fp16_on_cpu.init_with_cpu_scaler)
    torch.set_num_threads(1)
    ctx = Context(argparse.Namespace(smoke=True), torch.device("cpu"), SMOKE_SHAPE, tmp_path, {})
    runs = fp16_and_bf16_runs(ctx, data_dir)
    s = SMOKE_SHAPE.fp16
    init_scale = forcing_init_scale(s["micro_batch_size"] * s["seq_len"])
    detail = judge_fp16(runs, init_scale)
    assert runs["fp16"][0]["overflow"] and runs["fp16"][0]["loss_scale"] == init_scale / 2, detail
    # bf16 skips the updates fp16 overflowed on, and has no scaler
    skipped = [i for i, r in enumerate(runs["fp16"]) if r["overflow"]]
    assert [i for i, r in enumerate(runs["bf16"]) if r is None] == skipped
    assert all(not r["overflow"] and r["loss_scale"] is None for r in runs["bf16"] if r is not None)
    print(detail)

    stuck = [{**r, "overflow": True, "loss_scale": init_scale} for r in runs["fp16"]]
    with pytest.raises(AssertionError):
        judge_fp16({**runs, "fp16": stuck}, init_scale)
    astray = [{**r, "loss": r["loss"] * 1.05} if i == len(runs["fp16"]) // 2 else r for i, r in enumerate(runs["fp16"])]
    with pytest.raises(AssertionError):
        judge_fp16({**runs, "fp16": astray}, init_scale)
    never = [{**r, "overflow": False} for r in runs["fp16"]]  # no overflow forced: the check proves nothing
    with pytest.raises(AssertionError):
        judge_fp16({**runs, "fp16": never}, init_scale)
