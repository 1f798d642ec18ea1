"""Which samples each rank trains and validates on, step by step."""
from __future__ import annotations

import numpy as np

from ..errors import DataError


def steps_per_epoch(n: int, size: int, batch_size: int, last_batch: str = "pad") -> int:
    """The same count on every rank (a rank with an extra batch would hang Horovod), each
    step a batch of exactly batch_size on every rank: enough steps for every sample
    (`pad`), or the whole steps the samples fill (`drop`; none is an error)."""
    per_step = size * batch_size
    steps = -(-n // per_step) if last_batch == "pad" else n // per_step
    if steps < 1:
        raise DataError(f"{n} training samples do not fill one step of {size} ranks x batch_size {batch_size} "
                        "(train.last_batch: drop); use pad, or a smaller train.batch_size")
    return steps


def shard_batches(n: int, rank: int, size: int, batch_size: int, seed: int, epoch: int,
                  groups: list[np.ndarray] | None = None, last_batch: str = "pad") -> list[np.ndarray]:
    """This rank's batches for one epoch, each of exactly batch_size samples.

    The epoch's permutation (from seed and epoch, so a resumed run sees the same
    order) is made a whole number of steps long: `pad` repeats its first samples
    after its end (as torch's DistributedSampler does), so every sample is trained
    at least once an epoch and a few twice; `drop` leaves out its last samples, a
    different few each epoch. It is then dealt round-robin: every rank the same
    number of batches, of the same size, so no shape changes from step to step.
    groups (samples stored together: a tar shard's): the epoch's order is the
    groups in a random order, each shuffled within, and each rank takes a
    contiguous run of it, so that it reads whole groups but for the two at its
    edges.
    """
    steps = steps_per_epoch(n, size, batch_size, last_batch)
    rng = np.random.default_rng([seed, epoch])
    if groups is None:
        order = rng.permutation(n)
    else:
        order = np.concatenate([rng.permutation(groups[g]) for g in rng.permutation(len(groups))])
    order = np.resize(order, steps * size * batch_size)  # repeated from its start (pad), or cut (drop)
    mine = order[rank::size] if groups is None else np.split(order, size)[rank]
    return list(mine.reshape(steps, batch_size))


def eval_shard(n: int, rank: int, size: int, batch_size: int) -> list[np.ndarray]:
    """This rank's part of the validation set, in order; ranks may hold uneven counts."""
    mine = np.arange(n)[rank::size]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
