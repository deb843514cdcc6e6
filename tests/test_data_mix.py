"""`--data_mix`: sources drawn by weight (realised fractions, the seed, any number of processes, epochs),
its resumable position (checked before it is loaded), what a bad mixture says, and one killed and
resumed run on two real shard folders."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from trainer_runs import kill_at_step, metric, nano_args, records, train_in_process

import train_accelerate as ta
from data_prep import ShardLoader
from data_prep.mixture import MixtureLoader, allocate, parse_mix
from data_prep.shards import write_manifest, write_shard
from gpt2_scratch.export_gpt2 import run_manifest
from gpt2_scratch.training.checkpoints import latest_checkpoint
from gpt2_scratch.training.config import ConfigError, parse_config
from gpt2_scratch.training.data import build_loader, prepare_data
from gpt2_scratch.training.model_card import ModelCard
from gpt2_scratch.training.verify import CheckpointError, loader_position_valid, settings_changes
from gpt2_scratch.user_errors import UserError, run_command
from modeling_gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM

# The killed runs are processes on one thread (trainer_runs.ONE_THREAD): the in-process runs they are
# compared with must be too, or the sums of a step can differ in the last bit
pytestmark = pytest.mark.usefixtures("one_thread")

SEQ = 8


def token_folder(folder, first: int, train_tokens: int, val_tokens: int = 200, name: str | None = None, period=100):
    """A shard folder whose tokens are all in [first, first + period): a sequence tells its source by its
    first token."""
    folder.mkdir(parents=True)
    entries = []
    for split, count in (("val", val_tokens), ("train", train_tokens)):
        tokens = (first + np.arange(count) % period).astype(np.uint16)
        file = f"{split}_000000.bin"
        entries.append({"file": file, "split": split, "tokens": count, "sha256": write_shard(folder / file, tokens)})
    source = {"kind": "synthetic", "name": name or folder.name}
    write_manifest(folder, {"format_version": 1, "tokenizer": "gpt2", "source": source, "shards": entries})
    return folder


def mixture(folders, weights, batch_size=4, world_size=1, rank=0, seed=1337, per_step=16):
    loaders = [ShardLoader(folder, batch_size=1, seq_len=SEQ, seed=seed) for folder in folders]
    sources = [(str(f), w, loader) for f, w, loader in zip(folders, weights, loaders, strict=True)]
    return MixtureLoader(sources, batch_size, SEQ, rank, world_size, seed, per_step, fingerprints=["fp"] * len(folders))


def source_of(rows: torch.Tensor) -> np.ndarray:
    """Each row's source index, read from its first token (source i holds tokens 1000 * (i + 1) + [0, 100))."""
    return rows[:, 0].numpy() // 1000 - 1


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    return [token_folder(root / f"s{i}", 1000 * (i + 1), 20_000) for i in range(3)]


@pytest.mark.parametrize("weights", [(0.7, 0.3), (0.5, 0.3, 0.2), (0.95, 0.05)])
def test_realised_fractions_are_within_one_percent_of_the_weights_over_200_steps(weights, folders):
    loader = mixture(folders[: len(weights)], weights)
    steps, per_step = 200, 16
    seen = np.concatenate([source_of(loader.next_batch()[0]) for _ in range(steps * per_step // 4)])
    fractions = np.bincount(seen, minlength=len(weights)) / len(seen)
    assert np.abs(fractions - np.array(weights)).max() < 0.01
    # stronger: after every step, each source is within one sequence of its share (random draws: ~23 off)
    counts = np.zeros(len(weights))
    for step in range(steps):
        counts += np.bincount(allocate(weights, counts.astype(int).tolist(), per_step), minlength=len(weights))
        assert np.abs(counts - np.array(weights) * (step + 1) * per_step).max() < 1


def test_the_order_is_the_seeds_and_the_same_steps_on_two_processes(folders):
    def steps(loader, count):
        return [loader.next_batch()[0] for _ in range(count)]

    one = steps(mixture(folders[:2], (0.6, 0.4), batch_size=4, seed=7), 40)
    again, other_seed = (steps(mixture(folders[:2], (0.6, 0.4), seed=seed), 40) for seed in (7, 8))
    assert all(torch.equal(a, b) for a, b in zip(one, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(one, other_seed, strict=True))
    # two ranks of batch_size 2: micro-step m of rank 0 then rank 1 is micro-step m of one process
    loaders = [mixture(folders[:2], (0.6, 0.4), batch_size=2, world_size=2, rank=r, seed=7) for r in (0, 1)]
    ranks = [steps(loader, 40) for loader in loaders]
    assert all(torch.equal(a, torch.cat([r0, r1])) for a, r0, r1 in zip(one, *ranks, strict=True))
    assert loaders[0].state_dict()["sources"] == loaders[1].state_dict()["sources"]  # each skipped the other's


def test_a_source_that_runs_out_starts_its_next_epoch_and_says_so(folders, tmp_path):
    small = token_folder(tmp_path / "small", 2000, 40 * SEQ + 1, period=1000)  # 40 distinct sequences of 8 (+1)
    loader = mixture([folders[0], small], (0.5, 0.5), per_step=8)  # 4 of each source per step, 2 micro-batches
    first_epoch = [x for _ in range(20) for x in loader.next_batch()[0] if x[0] >= 2000]  # 10 steps
    assert loader.take_events() == [] and loader.metrics()["data/epoch/small"] == 0
    starts = sorted(int(x[0]) for x in first_epoch)
    assert len(first_epoch) == 40 and len(set(starts)) == 40  # each sequence once
    loader.next_batch()
    assert loader.take_events() == [f"data source {small} ran out: epoch 1 starts at step 11"]
    metrics = loader.metrics()
    assert metrics["data/epoch/small"] == 1 and metrics["data/epoch/s0"] == 0
    assert metrics["data/tokens/small"] == (40 + 4) * SEQ  # the whole epoch, then step 11's 4 of the next one


def test_a_remote_source_gives_the_batches_of_the_same_local_folder(folders, tmp_path):
    def batches(mix: str) -> list[torch.Tensor]:
        shape = ["--model", "cpu-nano", "--seq_len", str(SEQ), "--micro_batch_size", "4", "--total_batch_size", "128"]
        config = parse_config(["--data_mix", mix, *shape, "--data_cache_dir", str(tmp_path / "cache")])
        manifest = prepare_data(config)
        loader = build_loader(config, SimpleNamespace(process_index=0, num_processes=1), manifest)
        return [loader.next_batch()[0] for _ in range(20)]

    local = batches(f"{folders[0]}:0.7,{folders[1]}:0.3")
    fetched = batches(f"file://{folders[0]}:0.7,{folders[1]}:0.3")  # the first source through the shard cache
    assert all(torch.equal(a, b) for a, b in zip(local, fetched, strict=True))
    assert any((tmp_path / "cache").glob("shards-*/train_000000.bin"))


def test_a_saved_position_resumes_exactly_and_a_changed_mixture_is_refused_by_name(folders):
    loader = mixture(folders[:2], (0.7, 0.3))
    for _ in range(9):  # 2 steps of 4 micro-batches, and one micro-batch into the third
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))  # as train_state.json holds it
    assert loader_position_valid(state) and state["sequences_done"] == 4
    rest = [loader.next_batch()[0] for _ in range(12)]
    resumed = mixture(folders[:2], (0.7, 0.3))
    resumed.load_state_dict(state)
    assert all(torch.equal(a, resumed.next_batch()[0]) for a in rest)
    with pytest.raises(ValueError, match=r"saved data mixture is .*s0:0.7 .*s1:0.3.* this run's .*s1:0.4"):
        mixture(folders[:2], (0.7, 0.4)).load_state_dict(state)


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: s["counts"].append(1),  # one count more than sources
        lambda s: s["counts"].__setitem__(0, -1),
        lambda s: s["sources"][0].__setitem__("weight", 0),
        lambda s: s["sources"][1].pop("state"),
        lambda s: s["sources"][1]["state"].__setitem__("chunks_done", "3"),
        lambda s: s.__setitem__("sources", []),
        lambda s: s.pop("steps"),
    ],
)
def test_a_malformed_mixture_position_is_refused(damage, folders):
    state = mixture(folders[:2], (0.7, 0.3)).state_dict()
    assert loader_position_valid(state)
    damage(state)
    assert not loader_position_valid(state)


def test_a_resume_compares_the_mixture_by_weights_and_shards_not_paths():
    saved = [{"source": "data/a", "weight": 0.7, "data": "aa"}, {"source": "data/b", "weight": 0.3, "data": "bb"}]
    moved = [{**saved[0], "source": "/mnt/a"}, saved[1]]
    assert settings_changes({"data": "x", "data_mix": saved}, {"data": "x", "data_mix": moved}) == []
    reweighted = [saved[0], {**saved[1], "weight": 0.5}]
    assert settings_changes({"data": "x", "data_mix": saved}, {"data": "y", "data_mix": reweighted}) == [
        "data_mix: the weight of data/b 0.3 -> 0.5"
    ]
    other = [saved[0], {"source": "data/c", "weight": 0.3, "data": "cc"}]
    assert settings_changes({"data": "x", "data_mix": saved}, {"data": "y", "data_mix": other}) == [
        "data_mix: data/b -> data/c: other training shards"
    ]


BAD_MIXES = {
    "negative": ("data/a:-0.5,data/b:0.5", "the weight of data/a is -0.5; weights must be finite and above 0"),
    "zero": ("data/a:0,data/b:1", "the weight of data/a is 0; weights must be finite and above 0"),
    "not a number": ("data/a:lots,data/b:1", "the weight of data/a is 'lots', not a number"),
    "not finite": ("data/a:nan,data/b:1", "the weight of data/a is nan; weights must be finite"),
    "missing": ("data/a,data/b:0.3", "'data/a' has no weight; write it as SOURCE:WEIGHT"),
    "a URL without a weight": ("s3://bucket/x,data/b:0.3", "'s3://bucket/x' has no weight"),
    "empty entry": ("data/a:1,,data/b:1", "has an empty entry"),
    "named twice": ("data/a:0.5,./data/a/:0.5", "./data/a/ is named twice (also as data/a)"),
}


@pytest.mark.parametrize("kind", BAD_MIXES)
def test_a_bad_mixture_is_one_line_naming_the_source(kind):
    text, message = BAD_MIXES[kind]
    with pytest.raises(ConfigError, match="data_mix: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        parse_config(["--data_mix", text])


def test_data_dir_and_data_mix_together_are_refused_but_the_command_line_wins_over_a_preset(tmp_path):
    with pytest.raises(ConfigError, match="give data_dir .* or data_mix, not both"):
        parse_config(["--data_mix", "data/a:1", "--data_dir", "data/b"])
    preset = tmp_path / "preset.yaml"
    preset.write_text("data_dir: data/fineweb\n")
    assert parse_config(["--config", str(preset), "--data_mix", "data/a:1"]).data_dir == "data/builtin"
    assert parse_mix("s3://bucket/x:2,hf://datasets/me/d@v1:1") == [
        ("s3://bucket/x", 2.0),
        ("hf://datasets/me/d@v1", 1.0),
    ]


def test_a_bad_weight_on_the_command_line_is_one_error_line_and_status_2(tmp_path, capsys):
    argv = ["--data_mix", "data/a:0.7,data/b:-1", "--out_dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as stop:
        run_command(ta.command, argv)
    assert stop.value.code == 2 and capsys.readouterr().err.splitlines() == [
        "error: invalid training config: data_mix: the weight of data/b is -1; weights must be finite and above 0"
    ]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda folder: folder.mkdir(), "data_mix source .*/code holds no manifest.json; make shards there"),
        (
            lambda folder: token_folder(folder, 60_000, 2000),
            "code/val_000000.bin: token id 600.. is outside the model's vocabulary",
        ),
    ],
)
def test_a_source_without_a_manifest_or_beyond_the_vocabulary_is_refused(make, message, data_dir, tmp_path):
    make(tmp_path / "code")
    mix = f"{data_dir}:0.5,{tmp_path / 'code'}:0.5"
    config = parse_config(["--data_mix", mix, "--model", "cpu-nano", "--seq_len", "32"])
    with pytest.raises(UserError, match=message):
        prepare_data(config)


def test_the_model_card_lists_each_source_with_its_share_and_the_hub_datasets(tmp_path):
    hub = {"source": {"kind": "hub", "dataset": "HuggingFaceFW/fineweb-edu", "config": "sample-10BT"}}
    files = {"source": {"kind": "files", "files": [{"path": "/data/raw/code.jsonl"}]}}
    manifest = {
        "mixture": [
            {"source": "hf://datasets/me/fw", "weight": 3, "manifest": hub},
            {"source": "data/code", "weight": 1, "manifest": files},
        ]
    }
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("cpu-nano"))
    card = ModelCard(None, model, manifest, {"step": 5, "tokens": 640, "val/loss": (5, 3.25)}, tmp_path / "run")
    text = card.render("gpt2", [])
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["datasets"] == ["HuggingFaceFW/fineweb-edu"]
    assert "75.0% [HuggingFaceFW/fineweb-edu](https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu)" in text
    assert "25.0% local files `code.jsonl`" in text and "/data/raw" not in text
    assert "the mean of the sources' held-out validation losses, weighted as in training" in text


def test_export_gpt2_names_a_mixture_runs_sources_even_where_a_folder_is_not_on_this_machine(folders, tmp_path):
    config = parse_config(["--data_mix", f"{folders[0]}:0.7,{tmp_path / 'elsewhere'}:0.3"])
    manifest = run_manifest(config)
    assert [part["weight"] for part in manifest["mixture"]] == [0.7, 0.3]
    assert manifest["mixture"][0]["manifest"]["source"] == {"kind": "synthetic", "name": "s0"}
    assert manifest["mixture"][1]["manifest"] == {"source": {"name": "elsewhere"}}


MIX_RUN = dict(max_steps=12, stop_at_step=8, save_interval=4, eval_interval=4, dropout=0.1, num_samples=0)


def test_sigkill_then_resume_auto_logs_the_same_losses_per_source(data_dir, tmp_path):
    code = token_folder(tmp_path / "code", 3000, 12 * 32 + 1, val_tokens=300, name="synthetic-code")  # 12 sequences
    mix = f"{data_dir}:0.7,{code}:0.3"

    def argv(out, **more):
        args = nano_args(data_dir, out, **{**MIX_RUN, **more})
        return [a for a in args if a != "--data_dir" and a != str(data_dir)]

    reference, out = tmp_path / "reference", tmp_path / "killed"
    train_in_process([*argv(reference), "--data_mix", mix])
    kill_at_step([*argv(out), "--data_mix", mix], out, 5)
    assert int(latest_checkpoint(out / "checkpoints").name[5:]) < 6, "the run was to be killed before its epoch ended"
    train_in_process([*argv(out, resume="auto"), "--data_mix", mix])

    assert sorted(metric(out, "train/loss")) == list(range(1, 9))
    assert metric(out, "train/loss") == metric(reference, "train/loss")
    for name in ("val/loss", f"val/loss/{data_dir.name}", "val/loss/code", "data/tokens/code", "data/epoch/code"):
        assert metric(out, name) == metric(reference, name), name
    last = records(out)[-2]  # the last training record (the last is the evaluation's)
    assert last["data/tokens/code"] + last[f"data/tokens/{data_dir.name}"] == last["tokens"] == 8 * 256
    assert abs(last["data/tokens/code"] / last["tokens"] - 0.3) < 1 / 64  # within one of the 64 sequences
    assert metric(out, "data/epoch/code") == {step: int(step > 5) for step in range(1, 9)}  # 12 ran out at step 5
    info = json.loads((out / "run_info.json").read_text())
    assert info["data"] == {"mix": mix, "sources": [{"url": str(data_dir)}, {"url": str(code)}]}
    card = (out / "hf" / "README.md").read_text()
    assert "70.0% `python-stdlib-docs`" in card and "30.0% `synthetic-code`" in card
    assert f"| `data_mix` | `{data_dir.name}:0.7,code:0.3` |" in card and str(tmp_path) not in card

    changed = [*argv(out, resume="auto", stop_at_step=10), "--data_mix", f"{data_dir}:0.6,{code}:0.4"]
    weights = rf"changed: data_mix: the weight of {data_dir} 0.7 -> 0.6, the weight of {code} 0.3 -> 0.4\. "
    with pytest.raises(CheckpointError, match=weights):
        train_in_process(changed)
    shutil.rmtree(code)
    token_folder(code, 3000, 12 * 32 + 2, val_tokens=300)  # one token more: other shards
    with pytest.raises(CheckpointError, match=rf"changed: data_mix: {code} -> {code}: other training shards\. "):
        train_in_process([*argv(out, resume="auto", stop_at_step=10), "--data_mix", mix])
