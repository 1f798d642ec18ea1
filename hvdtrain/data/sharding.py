"""Which samples each rank trains and validates on, step by step."""
from __future__ import annotations

import numpy as np

from ..errors import DataError


def steps_per_epoch(n: int, size: int, batch_size: int) -> int:
    """The same count on every rank: a rank with an extra batch would hang Horovod."""
    return max(1, -(-(n // size) // batch_size))


def shard_batches(n: int, rank: int, size: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """This rank's batches for one epoch.

    The epoch's permutation (from seed and epoch, so a resumed run sees the same
    order) is dealt round-robin: shards are disjoint and cover every sample.
    Each shard is cut into `steps_per_epoch` nearly equal batches, so batches
    may hold one sample more than batch_size rather than drop or repeat one.
    """
    if n < size:
        raise DataError(f"{n} training samples cannot be shared by {size} workers")
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return np.array_split(order[rank::size], steps_per_epoch(n, size, batch_size))


def eval_shard(n: int, rank: int, size: int, batch_size: int) -> list[np.ndarray]:
    """This rank's part of the validation set, in order; ranks may hold uneven counts."""
    mine = np.arange(n)[rank::size]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
