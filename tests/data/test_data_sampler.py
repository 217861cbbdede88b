"""BucketBatchSampler: one bucket per batch, deterministic, exactly resumable."""

from __future__ import annotations

import pytest

from job.data import BucketBatchSampler

KEYS = ["832x480@81"] * 13 + ["480x832@81"] * 7 + ["624x624@81"] * 5 + ["832x480@49"] * 2


def test_batches_never_mix_buckets_and_drop_partial_ones():
    sampler = BucketBatchSampler(KEYS, batch_size=3, seed=1)
    batches = list(sampler)
    assert all(len(b) == 3 and len({KEYS[i] for i in b}) == 1 for b in batches)
    assert len(batches) == 4 + 2 + 1 + 0 == len(BucketBatchSampler(KEYS, 3, 1))
    seen = [i for b in batches for i in b]
    assert len(seen) == len(set(seen))
    keep_all = list(BucketBatchSampler(KEYS, 3, 1, drop_last=False))
    assert sorted(i for b in keep_all for i in b) == list(range(len(KEYS)))


def test_same_seed_and_epoch_same_order_other_epoch_other_order():
    a = list(BucketBatchSampler(KEYS, 2, seed=5, epoch=3))
    b = list(BucketBatchSampler(KEYS, 2, seed=5, epoch=3))
    c = list(BucketBatchSampler(KEYS, 2, seed=5, epoch=4))
    d = list(BucketBatchSampler(KEYS, 2, seed=6, epoch=3))
    assert a == b and a != c and a != d


def test_iterating_again_is_the_next_epoch():
    sampler = BucketBatchSampler(KEYS, 2, seed=5)
    first, second = list(sampler), list(sampler)
    assert first == list(BucketBatchSampler(KEYS, 2, 5, epoch=0))
    assert second == list(BucketBatchSampler(KEYS, 2, 5, epoch=1))
    assert sampler.state_dict()["epoch"] == 2


def test_resume_mid_epoch_gives_exactly_the_remaining_batches():
    full = list(BucketBatchSampler(KEYS, 2, seed=9, epoch=2))
    sampler = BucketBatchSampler(KEYS, 2, seed=9, epoch=2)
    it = iter(sampler)
    taken = [next(it) for _ in range(4)]
    state = sampler.state_dict()
    assert state["position"] == 4 and state["epoch"] == 2
    resumed = BucketBatchSampler(KEYS, 2, seed=0)  # seed and epoch come from the state
    resumed.load_state_dict(state)
    assert taken + list(resumed) == full
    # a prefetching DataLoader ran ahead: the loop says how many it consumed
    again = BucketBatchSampler(KEYS, 2, seed=0)
    again.load_state_dict(sampler.state_dict(batches_consumed=2))
    assert list(again) == full[2:]


def test_resume_refuses_other_data():
    state = BucketBatchSampler(KEYS, 2, seed=1).state_dict()
    with pytest.raises(ValueError, match="other data"):
        BucketBatchSampler(KEYS[:-1], 2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError):
        BucketBatchSampler(KEYS, 3, seed=1).load_state_dict(state)


def test_ranks_split_the_same_order():
    whole = list(BucketBatchSampler(KEYS, 2, seed=3))
    ranks = [list(BucketBatchSampler(KEYS, 2, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(whole) // 2
    assert ranks[0] == whole[0:len(whole) // 2 * 2:2] and ranks[1] == whole[1:len(whole) // 2 * 2:2]
