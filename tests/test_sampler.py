"""PairBatchSampler: distinct identities per global batch, disjoint rank shards, determinism, resume, workers."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from submit.sampler import PairBatchSampler


def _pids(n_ids: int = 12, per_id: int = 5, singletons: int = 2) -> list[int]:
    pids = [pid for pid in range(n_ids) for _ in range(per_id)] + [100 + i for i in range(singletons)]
    return list(np.random.default_rng(3).permutation(pids))


def test_pairs_are_positives_and_identities_distinct_per_batch():
    pids = _pids()
    sampler = PairBatchSampler(pids, batch_pairs=4, seed=1)
    batches = list(sampler)
    assert batches and all(len(b) == 4 for b in batches)
    for batch in batches:
        assert len({pids[a] for a, _, _ in batch}) == len(batch)
        for a, p, _ in batch:
            assert a != p and pids[a] == pids[p]
    anchors = [a for b in batches for a, _, _ in b]
    assert len(anchors) == len(set(anchors))  # each image is an anchor at most once per epoch


def test_singletons_skipped_and_leftovers_dropped():
    pids = _pids(n_ids=3, per_id=5, singletons=2)
    sampler = PairBatchSampler(pids, batch_pairs=2, seed=0)
    assert sampler.skipped == 2
    used = {pids[a] for b in sampler for a, _, _ in b}
    assert used <= {0, 1, 2}
    assert len(sampler) <= 15 // 2 and len(sampler) == len(list(sampler))


def test_global_batch_sharded_without_overlap_and_equal_to_single_process():
    pids = _pids(n_ids=20, per_id=4)
    single = PairBatchSampler(pids, batch_pairs=6, world_size=1, seed=5)
    ranks = [PairBatchSampler(pids, batch_pairs=3, world_size=2, rank=r, seed=5) for r in range(2)]
    for s in [single, *ranks]:
        s.set_epoch(2)
    shards = [list(s) for s in ranks]
    assert len(shards[0]) == len(shards[1]) == len(single)
    for whole, b0, b1 in zip(single, *shards):
        assert b0 + b1 == whole
        assert len({pids[a] for a, _, _ in b0 + b1}) == 6  # no identity twice across ranks


def test_deterministic_per_seed_and_reshuffled_per_epoch():
    pids = _pids()
    a, b = PairBatchSampler(pids, 4, seed=7), PairBatchSampler(pids, 4, seed=7)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert list(PairBatchSampler(pids, 4, seed=8)) != first


def test_set_epoch_start_skips_consumed_batches():
    sampler = PairBatchSampler(_pids(), 4, seed=2)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.set_epoch(3, start=2)
    assert list(sampler) == full[2:] and len(sampler) == len(full) - 2


def test_dense_identities_still_fill_batches():
    pids = [pid for pid in range(5) for _ in range(30)]  # few identities, many images each
    batches = list(PairBatchSampler(pids, 5, seed=0))
    assert len(batches) >= 20
    assert all(sorted(pids[a] for a, _, _ in b) == [0, 1, 2, 3, 4] for b in batches)


class _Echo(Dataset):
    def __len__(self) -> int:
        return 1000

    def __getitem__(self, item):
        anchor, positive, aug_seed = item
        return torch.tensor([anchor, positive]), aug_seed


def test_works_with_dataloader_workers():
    pids = _pids()
    sampler = PairBatchSampler(pids, 4, seed=4)
    loader = DataLoader(_Echo(), batch_sampler=sampler, num_workers=2)
    got = [pairs.tolist() for pairs, _ in loader]
    assert got == [[[a, p] for a, p, _ in b] for b in sampler]


def test_bad_geometry_rejected():
    for kwargs in ({"batch_pairs": 0}, {"batch_pairs": 2, "world_size": 2, "rank": 2}):
        try:
            PairBatchSampler([0, 0], **kwargs)
        except ValueError as exc:
            assert "batch_pairs" in str(exc)
        else:
            raise AssertionError("expected ValueError")
