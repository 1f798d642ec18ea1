"""Which samples each rank trains and validates on, step by step."""
from __future__ import annotations

import numpy as np

from ..errors import DataError


def steps_per_epoch(n: int, size: int, batch_size: int) -> int:
    """The same count on every rank: a rank with an extra batch would hang Horovod."""
    return max(1, -(-(n // size) // batch_size))


def shard_batches(n: int, rank: int, size: int, batch_size: int, seed: int, epoch: int,
                  groups: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """This rank's batches for one epoch.

    The epoch's permutation (from seed and epoch, so a resumed run sees the same
    order) is dealt round-robin: shards are disjoint and cover every sample.
    Each shard is cut into `steps_per_epoch` nearly equal batches, so batches
    may hold one sample more than batch_size rather than drop or repeat one.
    groups (samples stored together: a tar shard's): the epoch's order is the
    groups in a random order, each shuffled within, and each rank takes a
    contiguous run of it, so that it reads whole groups but for the two at its
    edges; again every sample once.
    """
    if n < size:
        raise DataError(f"{n} training samples cannot be shared by {size} workers")
    rng = np.random.default_rng([seed, epoch])
    if groups is None:
        mine = rng.permutation(n)[rank::size]
    else:
        order = np.concatenate([rng.permutation(groups[g]) for g in rng.permutation(len(groups))])
        mine = np.array_split(order, size)[rank]
    return np.array_split(mine, steps_per_epoch(n, size, batch_size))


def eval_shard(n: int, rank: int, size: int, batch_size: int) -> list[np.ndarray]:
    """This rank's part of the validation set, in order; ranks may hold uneven counts."""
    mine = np.arange(n)[rank::size]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
