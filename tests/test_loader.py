"""`ShardLoader` and `iter_val_batches`: targets, rank disjointness, shuffling and exact resume.

The shards here hold the token values 0, 1, 2, ... (one run across all shards, each value once),
so every row of a batch says exactly where in the data it came from.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep import DataPrepError, ShardError, ShardLoader, iter_val_batches, prepare_builtin, read_manifest
from data_prep.loader import IGNORE_INDEX
from data_prep.shards import write_manifest, write_shard

T = 8
SIZES = [50, 101, 67, 90, 33]  # the first is val; the train shards give 12 + 8 + 11 + 4 = 35 chunks


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    shards, start = [], 0
    for i, size in enumerate(SIZES):
        split = "val" if i == 0 else "train"
        name = f"{split}_{i:06d}.bin"
        sha = write_shard(tmp_path / name, np.arange(start, start + size, dtype=np.uint16))
        shards.append({"file": name, "split": split, "tokens": size, "sha256": sha})
        start += size
    write_manifest(
        tmp_path, {"format_version": 1, "tokenizer": "gpt2", "source": {}, "complete": True, "shards": shards}
    )
    return tmp_path


def train_chunk_starts() -> set[int]:
    """First token value of every full (T + 1)-token chunk of the train shards, by direct count."""
    starts, offset = set(), SIZES[0]
    for size in SIZES[1:]:
        starts |= {offset + j * T for j in range((size - 1) // T)}
        offset += size
    return starts


def epoch_rows(loader: ShardLoader) -> list[int]:
    return [int(v) for _ in range(loader.batches_per_epoch) for v in loader.next_batch()[0][:, 0]]


def test_batches_are_next_token_pairs(data_dir: Path) -> None:
    loader = ShardLoader(data_dir, batch_size=3, seq_len=T, seed=0)
    for _ in range(20):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (3, T) and x.dtype == y.dtype == torch.int64
        assert x.is_contiguous() and y.is_contiguous()
        # Consecutive token values inside a shard: each row is a run, y is x shifted by one.
        torch.testing.assert_close(y, x + 1)
        torch.testing.assert_close(x, x[:, :1] + torch.arange(T))
    assert loader.tokens_per_batch == 3 * T


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ranks_are_disjoint_and_cover_the_epoch(data_dir: Path, world_size: int) -> None:
    loaders = [ShardLoader(data_dir, batch_size=2, seq_len=T, rank=r, world_size=world_size) for r in range(world_size)]
    rows = [epoch_rows(loader) for loader in loaders]
    seen = [v for rank_rows in rows for v in rank_rows]
    assert len(seen) == len(set(seen))  # no chunk on two ranks, none twice
    assert set(seen) <= train_chunk_starts()
    assert len(seen) == (35 // (2 * world_size)) * 2 * world_size
    assert len({len(r) for r in rows}) == 1
    # The same global batches whatever the split across ranks, as long as B x W is fixed.
    single = ShardLoader(data_dir, batch_size=2 * world_size, seq_len=T)
    assert sorted(epoch_rows(single)) == sorted(seen)


def test_order_is_shuffled_per_epoch_and_seeded(data_dir: Path) -> None:
    loader = ShardLoader(data_dir, batch_size=5, seq_len=T, seed=1)
    first, second = epoch_rows(loader), epoch_rows(loader)
    assert loader.epoch == 1 and set(first) == set(second) and first != second
    assert epoch_rows(ShardLoader(data_dir, batch_size=5, seq_len=T, seed=1)) == first
    assert epoch_rows(ShardLoader(data_dir, batch_size=5, seq_len=T, seed=2)) != first
    in_order = epoch_rows(ShardLoader(data_dir, batch_size=5, seq_len=T, shuffle=False))
    assert in_order == sorted(train_chunk_starts())[:35]


@pytest.mark.parametrize("stop", [0, 3, 7, 19])  # 7 steps per epoch: stops inside and at epoch ends
def test_resume_is_exact(data_dir: Path, stop: int) -> None:
    reference = ShardLoader(data_dir, batch_size=2, seq_len=T, rank=1, world_size=2, seed=5)
    expected = [reference.next_batch() for _ in range(stop + 12)]

    first = ShardLoader(data_dir, batch_size=2, seq_len=T, rank=1, world_size=2, seed=5)
    for _ in range(stop):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON file
    # State is rank-independent: rank 0's copy (what Accelerate saves) restores rank 1.
    assert state == {
        **ShardLoader(data_dir, batch_size=2, seq_len=T, world_size=2, seed=5).state_dict(),
        "epoch": state["epoch"],
        "chunks_done": state["chunks_done"],
    }
    resumed = ShardLoader(data_dir, batch_size=2, seq_len=T, rank=1, world_size=2, seed=5)
    resumed.load_state_dict(state)
    for x_expected, y_expected in expected[stop:]:
        x, y = resumed.next_batch()
        assert torch.equal(x, x_expected) and torch.equal(y, y_expected)


def test_skip_leaves_the_position_that_reading_leaves_across_an_epoch(data_dir: Path) -> None:
    read = ShardLoader(data_dir, batch_size=4, seq_len=T, seed=5)
    skipped = ShardLoader(data_dir, batch_size=4, seq_len=T, seed=5)
    count = read.batches_per_epoch + 3  # into the second epoch
    for _ in range(count):
        read.next_batch()
    skipped.skip(count)
    assert skipped.state_dict() == read.state_dict() and read.epoch == 1
    assert torch.equal(skipped.next_batch()[0], read.next_batch()[0])


def test_resume_on_other_world_size_keeps_global_batches(data_dir: Path) -> None:
    old = [ShardLoader(data_dir, batch_size=2, seq_len=T, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        for loader in old:
            loader.next_batch()
    state = old[0].state_dict()
    new = [ShardLoader(data_dir, batch_size=1, seq_len=T, rank=r, world_size=4) for r in range(4)]
    for loader in new:
        loader.load_state_dict(state)
    for _ in range(10):
        before = torch.cat([loader.next_batch()[0] for loader in old])
        after = torch.cat([loader.next_batch()[0] for loader in new])
        assert torch.equal(before, after)


def test_resume_refuses_other_shapes_and_data(data_dir: Path, tmp_path: Path) -> None:
    state = ShardLoader(data_dir, batch_size=2, seq_len=T, world_size=2).state_dict()
    with pytest.raises(
        ValueError, match="saved batch_size 2 x world_size 2 = 4 .* now batch_size 3 x world_size 2 = 6"
    ):
        ShardLoader(data_dir, batch_size=3, seq_len=T, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="seq_len 8, this loader 4"):
        ShardLoader(data_dir, batch_size=4, seq_len=4).load_state_dict(state)
    with pytest.raises(ValueError, match="seed 1337, this loader 7"):
        ShardLoader(data_dir, batch_size=4, seq_len=T, seed=7).load_state_dict(state)
    other = tmp_path / "other"
    other.mkdir()
    sha = write_shard(other / "train.bin", np.arange(200, dtype=np.uint16))
    entry = {"file": "train.bin", "split": "train", "tokens": 200, "sha256": sha}
    write_manifest(other, {"format_version": 1, "tokenizer": "gpt2", "source": {}, "shards": [entry]})
    with pytest.raises(ValueError, match="saved loader state has shards"):
        ShardLoader(other, batch_size=4, seq_len=T).load_state_dict(state)


def test_loader_checks_shards(data_dir: Path) -> None:
    path = data_dir / "train_000002.bin"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    loader = ShardLoader(data_dir, batch_size=35, seq_len=T, shuffle=False)  # one batch reads every shard
    with pytest.raises(ShardError, match="train_000002.bin: sha256"):
        loader.next_batch()
    path.write_bytes(bytes(data[:-2]))
    with pytest.raises(ShardError, match="train_000002.bin: truncated"):
        ShardLoader(data_dir, batch_size=2, seq_len=T)
    path.write_bytes(bytes(data))
    with pytest.raises(DataPrepError, match="fewer than one global batch of batch_size 36"):
        ShardLoader(data_dir, batch_size=36, seq_len=T, verify=False)


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("max_batches", [None, 1, 2])
def test_val_batches_split_one_evaluation_over_the_ranks(data_dir: Path, world_size: int, max_batches) -> None:
    """Every rank yields as many (B, T) batches, and their real rows (the targets that are not
    IGNORE_INDEX) are the first max_batches x B val chunks, each once, for any number of ranks: the
    val shard's 50 tokens hold 6 chunks of T + 1, starting at 0, 8, ..., 40 (the tokens are their
    positions). A rank whose share runs out pads whole rows."""
    B = 2
    per_rank = [
        list(iter_val_batches(data_dir, B, T, rank=r, world_size=world_size, max_batches=max_batches))
        for r in range(world_size)
    ]
    assert len({len(batches) for batches in per_rank}) == 1
    starts = []
    for batches in per_rank:
        for x, y in batches:
            assert x.shape == y.shape == (B, T)
            real = (y != IGNORE_INDEX).all(dim=1)
            assert (real | (y == IGNORE_INDEX).all(dim=1)).all()
            torch.testing.assert_close(y[real], x[real] + 1)
            starts += x[real, 0].tolist()
    every = [c * T for c in range((SIZES[0] - 1) // T)]
    assert sorted(starts) == (every if max_batches is None else every[: max_batches * B])
    with pytest.raises(DataPrepError, match="has no chunk of 51 tokens"):
        iter_val_batches(data_dir, B, 50)


def test_builtin_corpus_feeds_the_loader(tmp_path: Path) -> None:
    data_dir = prepare_builtin(tmp_path / "builtin")
    (val_tokens,) = [shard["tokens"] for shard in read_manifest(data_dir)["shards"] if shard["split"] == "val"]
    x, y = ShardLoader(data_dir, batch_size=4, seq_len=64).next_batch()
    assert x.shape == (4, 64) and int(x.max()) < 50257
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert sum(1 for _ in iter_val_batches(data_dir, 4, 64, rank=1, world_size=2)) == -(-((val_tokens - 1) // 64) // 8)
