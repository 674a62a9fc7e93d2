"""r1mega.data.sampler: per-epoch permutations, resume equals uninterrupted, data-parallel slices."""

from __future__ import annotations

import json

import numpy as np
import pytest

from r1mega.data import PromptRecord, PromptSampler, epoch_permutation


def take(sampler, steps):
    return [next(sampler) for _ in range(steps)]


def test_permutation_is_pinned():
    # The order must not change across NumPy/torch/Python versions: a resumed run depends on it.
    assert epoch_permutation(10, seed=0, epoch=0).tolist() == [3, 4, 6, 7, 5, 1, 9, 8, 0, 2]
    assert epoch_permutation(10, seed=0, epoch=1).tolist() == [2, 6, 7, 4, 9, 8, 0, 1, 5, 3]
    assert epoch_permutation(10, seed=1, epoch=0).tolist() == [7, 2, 1, 5, 8, 0, 4, 9, 6, 3]


@pytest.mark.parametrize("n, batch", [(10, 3), (12, 4), (7, 7), (5, 1)])
def test_every_epoch_is_a_permutation(n, batch):
    sampler = PromptSampler(n, batch_size=batch, seed=3, drop_last=False)
    epochs = []
    for _ in range(4):
        flat = [i for b in take(sampler, sampler.batches_per_epoch) for i in b]
        assert sorted(flat) == list(range(n))
        epochs.append(flat)
    assert sampler.epoch == 4 and sampler.position == 0
    if n > 3:
        assert len({tuple(e) for e in epochs}) > 1  # epochs are reshuffled


def test_drop_last_gives_full_distinct_batches():
    sampler = PromptSampler(10, batch_size=4, seed=0)
    assert sampler.batches_per_epoch == 2
    for epoch in range(5):
        batches = take(sampler, 2)
        assert all(len(b) == 4 for b in batches)
        flat = batches[0] + batches[1]
        assert len(set(flat)) == 8
        assert flat == epoch_permutation(10, seed=0, epoch=epoch)[:8].tolist()


def test_short_last_batch_without_drop_last():
    sampler = PromptSampler(10, batch_size=4, seed=0, drop_last=False)
    assert [len(b) for b in take(sampler, 6)] == [4, 4, 2, 4, 4, 2]


@pytest.mark.parametrize("drop_last", [True, False])
def test_resume_anywhere_equals_uninterrupted(drop_last):
    n, batch, total = 11, 3, 17  # crosses several epoch boundaries
    reference = take(PromptSampler(n, batch_size=batch, seed=5, drop_last=drop_last), total)
    for k in range(total + 1):
        first = PromptSampler(n, batch_size=batch, seed=5, drop_last=drop_last)
        head = take(first, k)
        state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
        resumed = PromptSampler(n, batch_size=batch, seed=5, drop_last=drop_last)
        resumed.load_state_dict(state)
        assert head + take(resumed, total - k) == reference, k


def test_resume_with_other_batch_size_keeps_prompt_order():
    reference = [i for b in take(PromptSampler(20, batch_size=4, seed=2, drop_last=False), 15) for i in b]
    first = PromptSampler(20, batch_size=4, seed=2, drop_last=False)
    head = [i for b in take(first, 3) for i in b]
    second = PromptSampler(20, batch_size=6, seed=2, drop_last=False)
    second.load_state_dict(first.state_dict())
    tail = [i for b in take(second, 6) for i in b]
    assert (head + tail)[:len(reference)] == reference[:len(head + tail)]


def test_seeds_and_shuffle():
    a = take(PromptSampler(50, batch_size=10, seed=0), 10)
    assert a == take(PromptSampler(50, batch_size=10, seed=0), 10)
    assert a != take(PromptSampler(50, batch_size=10, seed=1), 10)
    assert take(PromptSampler(6, batch_size=2, seed=9, shuffle=False), 4) == [[0, 1], [2, 3], [4, 5], [0, 1]]
    assert take(PromptSampler(np.int64(50), batch_size=10, seed=0), 10) == a


def test_yields_records_and_stops_after_max_epochs():
    records = [PromptRecord(id=str(i), prompt=f"q{i}", task="general") for i in range(5)]
    sampler = PromptSampler(records, batch_size=2, seed=0, max_epochs=2)
    batches = list(sampler)
    assert len(batches) == 4 and all(isinstance(r, PromptRecord) for b in batches for r in b)
    assert [r.id for r in batches[0]] == [str(i) for i in epoch_permutation(5, seed=0, epoch=0)[:2]]


@pytest.mark.parametrize("n, batch, world", [(16, 8, 4), (17, 6, 2), (9, 4, 4)])
def test_ranks_split_each_global_batch(n, batch, world):
    for drop_last in (True, False):
        full = take(PromptSampler(n, batch_size=batch, seed=1, drop_last=drop_last), 7)
        shards = [take(PromptSampler(n, batch_size=batch, seed=1, drop_last=drop_last, rank=r,
                                     world_size=world), 7) for r in range(world)]
        for step, global_batch in enumerate(full):
            parts = [shards[r][step] for r in range(world)]
            assert [i for p in parts for i in p] == global_batch
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
            if len(global_batch) == batch:
                assert all(len(p) == batch // world for p in parts)


def test_argument_and_state_errors():
    with pytest.raises(ValueError, match="batch_size: 6 is not a multiple of world_size 4"):
        PromptSampler(10, batch_size=6, seed=0, world_size=4)
    with pytest.raises(ValueError, match="batch_size: 11 exceeds the 10 records"):
        PromptSampler(10, batch_size=11, seed=0)
    with pytest.raises(ValueError, match="rank: 2 must be < world_size 2"):
        PromptSampler(10, batch_size=2, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="seed: -1 must be an integer >= 0"):
        PromptSampler(10, batch_size=2, seed=-1)
    with pytest.raises(ValueError, match="the dataset is empty"):
        PromptSampler([], batch_size=1, seed=0, drop_last=False)
    state = PromptSampler(10, batch_size=2, seed=0).state_dict()
    for key, value, message in [("seed", 1, "'seed' is 1 but this sampler has 0"),
                                ("num_records", 11, "'num_records' is 11"),
                                ("position", 10, r"'position' 10 must be in \[0, 10\)"),
                                ("epoch", -1, "'epoch' -1 must be an integer >= 0")]:
        with pytest.raises(ValueError, match=message):
            PromptSampler(10, batch_size=2, seed=0).load_state_dict(dict(state, **{key: value}))
    with pytest.raises(ValueError, match="'epoch' missing"):
        PromptSampler(10, batch_size=2, seed=0).load_state_dict(
            {k: v for k, v in state.items() if k != "epoch"})


def test_large_permutation_is_fast_and_uniformish():
    perm = epoch_permutation(200_000, seed=7, epoch=3)
    assert np.array_equal(np.sort(perm), np.arange(200_000))
    # Position of item 0 over many epochs spreads over the range (not stuck near the start).
    firsts = [int(np.argmax(epoch_permutation(100, seed=7, epoch=e) == 0)) for e in range(400)]
    assert 35 < np.mean(firsts) < 65
