"""A deterministic, resumable batch sampler that never mixes buckets.

Each epoch: the samples of every bucket are shuffled and cut into batches of `batch_size`
(a bucket's last partial batch is dropped unless `drop_last=False`), then the batches of all
buckets are shuffled together. Everything is drawn from a generator seeded by (seed, epoch), so
the same (samples, batch_size, seed, epoch) always gives the same batches, on any machine.

Resume: `state_dict()` records the epoch and how many batches were handed out; a new sampler
given `load_state_dict(state)` yields exactly the remaining batches of that epoch. With a
prefetching DataLoader the sampler runs ahead of training: pass the number of batches the
training loop actually consumed, `state_dict(batches_consumed=n)`.

Several processes (GPUs): give each its `rank` and `world_size`; each takes every
`world_size`-th batch of the same order (the order is truncated to a multiple of `world_size`
so every rank runs the same number of steps).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from typing import Any


def _bucket_of(item: Any) -> str:
    return item if isinstance(item, str) else item.bucket


def stable_seed(*parts: Any) -> int:
    """A 64-bit seed from any values, equal across runs and machines (unlike `hash()`)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


class BucketBatchSampler:
    """Batches of indices into `samples` (Sample objects or bucket keys), one bucket per batch."""

    def __init__(self, samples: Sequence[Any], batch_size: int, seed: int, epoch: int = 0, *,
                 drop_last: bool = True, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.buckets: dict[str, list[int]] = {}
        for index, item in enumerate(samples):
            self.buckets.setdefault(_bucket_of(item), []).append(index)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = epoch
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.position = 0  # batches of this epoch already handed out (this rank)
        self._fingerprint = stable_seed(batch_size, drop_last, world_size,
                                        *(f"{k}:{len(v)}" for k, v in sorted(self.buckets.items())))
        self._cache: tuple[int, list[list[int]]] | None = None

    # -- the order ---------------------------------------------------------------------------
    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """All batches of `epoch` for this rank, in order."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache and self._cache[0] == epoch:
            return self._cache[1]
        rng = random.Random(stable_seed("buckets", self.seed, epoch))
        batches: list[list[int]] = []
        for key in sorted(self.buckets):
            indices = list(self.buckets[key])
            rng.shuffle(indices)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        rng.shuffle(batches)
        usable = len(batches) - len(batches) % self.world_size
        mine = batches[:usable][self.rank::self.world_size]
        self._cache = (epoch, mine)
        return mine

    def __len__(self) -> int:
        return len(self.batches())

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches()
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield list(batch)
        # the epoch is done: the next iteration is the next epoch
        self.epoch += 1
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.position = 0

    # -- resume ------------------------------------------------------------------------------
    def state_dict(self, batches_consumed: int | None = None) -> dict[str, Any]:
        position = self.position if batches_consumed is None else batches_consumed
        return {"seed": self.seed, "epoch": self.epoch, "position": position, "batch_size": self.batch_size,
                "rank": self.rank, "world_size": self.world_size, "fingerprint": self._fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` stopped. Raises ValueError if the data or batching changed."""
        if state.get("fingerprint") != self._fingerprint or state.get("batch_size") != self.batch_size:
            raise ValueError("the sampler state was saved for other data or another batch size "
                             "(buckets, sample counts, batch_size or world_size differ): cannot resume mid-epoch exactly")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._cache = None
