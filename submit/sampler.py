"""Pair batches for contrastive re-id training: no identity twice in a GLOBAL batch, reshuffled per epoch.

Every training image is the anchor of one pair per epoch, its positive another image of the same
player drawn at random. Identities with a single image are skipped (a crop paired with itself only
teaches augmentation invariance and would be a false 'positive' signal); `PairBatchSampler.skipped`
counts them. Pairs are packed greedily into global batches of `batch_pairs x world_size` pairs with
distinct identities (a pair whose identity is already in the batch waits for the next one); what
does not fill a last batch is dropped. Each global batch is then cut into `world_size` contiguous
shards, rank `r` taking shard `r`, so ranks never overlap and the batch list depends only on
(seed, epoch, global batch size) -- one process with the global batch sees exactly the same pairs.

Items are `(anchor_index, positive_index, aug_seed)` tuples: the per-pair augmentation seed makes the
augmentation deterministic whatever the number of DataLoader workers and across a resume.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterator, Sequence

import numpy as np

Pair = tuple[int, int, int]


class PairBatchSampler:
    """A DataLoader `batch_sampler` yielding this rank's `batch_pairs` pairs of each global batch."""

    def __init__(self, pids: Sequence[int], batch_pairs: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0) -> None:
        if batch_pairs < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler geometry: batch_pairs={batch_pairs} world_size={world_size} rank={rank}")
        self.pids = np.asarray(pids, dtype=np.int64)
        self.batch_pairs = batch_pairs
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.start = 0
        groups: dict[int, list[int]] = defaultdict(list)
        for index, pid in enumerate(self.pids.tolist()):
            groups[pid].append(index)
        self.groups = {pid: np.asarray(ix) for pid, ix in groups.items() if len(ix) > 1}
        self.skipped = len(groups) - len(self.groups)
        self.anchors = np.sort(np.concatenate(list(self.groups.values()))) if self.groups else np.zeros(0, int)
        self._cache: tuple[int, list[list[Pair]]] | None = None

    @property
    def global_pairs(self) -> int:
        """Pairs per global batch (all ranks together)."""
        return self.batch_pairs * self.world_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's shuffle; `start` skips the first batches (resuming mid-epoch)."""
        self.epoch = epoch
        self.start = start

    def global_batches(self, epoch: int | None = None) -> list[list[Pair]]:
        """All global batches of an epoch (deterministic in seed, epoch and the global batch size)."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self._draw(epoch))
        return self._cache[1]

    def __iter__(self) -> Iterator[list[Pair]]:
        lo, hi = self.rank * self.batch_pairs, (self.rank + 1) * self.batch_pairs
        for batch in self.global_batches()[self.start:]:
            yield batch[lo:hi]

    def __len__(self) -> int:
        return max(0, len(self.global_batches()) - self.start)

    def _draw(self, epoch: int) -> list[list[Pair]]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.anchors)
        aug_seeds = rng.integers(0, 2**62, size=len(order))
        offsets = rng.random(len(order))
        pairs = []
        for anchor, aug_seed, u in zip(order.tolist(), aug_seeds.tolist(), offsets.tolist()):
            group = self.groups[int(self.pids[anchor])]
            others = group[group != anchor]
            pairs.append((anchor, int(others[int(u * len(others))]), aug_seed))
        return self._pack(pairs)

    def _pack(self, pairs: list[Pair]) -> list[list[Pair]]:
        """Greedy packing into batches of distinct identities; a clashing pair waits for a later batch."""
        size, batches, deferred = self.global_pairs, [], []
        current: list[Pair] = []
        seen: set[int] = set()
        for pair in pairs:
            pid = int(self.pids[pair[0]])
            if pid in seen:
                deferred.append(pair)
                continue
            current.append(pair)
            seen.add(pid)
            while len(current) == size:
                batches.append(current)
                current, seen, waiting = [], set(), deferred
                deferred = []
                for item in waiting:
                    item_pid = int(self.pids[item[0]])
                    if len(current) < size and item_pid not in seen:
                        current.append(item)
                        seen.add(item_pid)
                    else:
                        deferred.append(item)
        return batches
