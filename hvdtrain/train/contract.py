"""What the loop and the backends share: a backend does Horovod's set-up (init, pin,
wrap, broadcast) and hands the loop `Comm` (collectives on numpy values) and
`Steps` (train, evaluate, (de)serialise state), both with keyword-only fields;
`Position` is where a run starts; `horovod_comm` is the one Comm over Horovod."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from ..data import Batch


@dataclass(kw_only=True)
class Comm:
    rank: int
    size: int
    local_rank: int
    local_size: int
    allreduce_sum: Callable[[np.ndarray, str], np.ndarray]
    broadcast_object: Callable[[Any, str], Any]
    allgather_object: Callable[[Any, str], list]
    hierarchical: bool = False  # GPUs with NCCL: allreduce sums within a node first


@dataclass(kw_only=True)
class Steps:
    # train_epoch(epoch, batches, lr_at, first, count): the steps first, first+1, ... of an
    # epoch of count steps, one per batch given; returns (summed loss, samples)
    train_epoch: Callable[[int, Iterable[Batch], Callable[[int], float], int, int], tuple[float, int]]
    # (outputs as numpy, summed loss) of one validation batch, with the training loss
    evaluate_batch: Callable[[Any, Any], tuple[np.ndarray, float]]
    # the backend's input pipeline (torch DataLoader, tf.data): loader(samples, index
    # batches, epoch=None) gives the batches of samples at each index batch, in order,
    # read ahead by its workers; with a training epoch, images are augmented for it
    loader: Callable[..., Iterable[Batch]]
    state_bytes: Callable[[], bytes]
    load_state_bytes: Callable[[bytes], None]
    weights_digest: Callable[[], str]
    export: Callable[[Path], None]
    parameters: int  # trainable parameters of the model
    signature: list[tuple[str, tuple[int, ...], str]]  # (name, shape, dtype) of each parameter
    # Average the model's non-trained float state (BatchNorm's running statistics)
    # over the ranks: each rank updates it from its own shard, so it would differ.
    average_buffers: Callable[[], None] = lambda: None


@dataclass(kw_only=True)
class Training:
    """What a backend's set-up hands back: Horovod initialised, the model and the
    wrapped optimizer on this rank's device, and the steps the loop drives."""
    hvd: Any  # horovod.torch or horovod.tensorflow
    comm: Comm
    model: Any
    optimizer: Any
    steps: Steps
    make_comm: Callable[[], Comm]  # a fresh Comm (an elastic reset changes rank and size)


@dataclass
class Position:
    """Where a run starts: after `epoch` epochs and `step` steps of the next, with
    that epoch's training loss sum and sample count so far (over all ranks)."""
    epoch: int
    step: int = 0
    loss_sum: float = 0.0
    seen: float = 0.0
    steering: dict | None = None  # the Steering's state after `epoch` epochs

    @property
    def sums(self) -> np.ndarray:
        return np.array([self.loss_sum, self.seen])


def horovod_comm(hvd, tensor: Callable[[np.ndarray], Any], hierarchical: bool = False) -> Comm:
    """Horovod's collectives as a Comm; tensor: a float64 array as the framework's tensor."""
    def allreduce_sum(values: np.ndarray, name: str) -> np.ndarray:
        return hvd.allreduce(tensor(np.asarray(values, dtype=np.float64)), op=hvd.Sum, name=name).numpy()

    return Comm(rank=hvd.rank(), size=hvd.size(), local_rank=hvd.local_rank(), local_size=hvd.local_size(),
                allreduce_sum=allreduce_sum,
                broadcast_object=lambda obj, name: hvd.broadcast_object(obj, root_rank=0, name=name),
                allgather_object=lambda obj, name: hvd.allgather_object(obj, name=name),
                hierarchical=hierarchical)


def alone() -> Comm:
    """A Comm of one rank (rank 0 on its own: the held-out test split at the end)."""
    return Comm(rank=0, size=1, local_rank=0, local_size=1, allreduce_sum=lambda values, name: values,
                broadcast_object=lambda obj, name: obj, allgather_object=lambda obj, name: [obj])


MASK64 = (1 << 64) - 1



def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """Per-rank RNG seed (dropout) of each step: a run resumed at any step draws
    the same numbers as an uninterrupted one. SplitMix64's finaliser over the four
    numbers (about 1 us; numpy's SeedSequence took 16 us, a tenth of a small
    model's step on a GPU)."""
    h = 0
    for value in (seed, epoch, step, rank):
        h = (h ^ (value & MASK64)) + 0x9E3779B97F4A7C15 & MASK64
        h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9 & MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & MASK64
        h ^= h >> 31
    return h >> 1


FIRST_BUCKET_MB = 1.0  # the first bucket's cap, as DDP's: the first allreduce starts early in backward


def bucket_indices(sizes: list[int], bucket_mb: float) -> list[list[int]] | None:
    """The gradients' buckets for Horovod's grouped allreduces (`horovod.bucket_mb`), as
    indices into the trainable parameters whose sizes in bytes are given: the parameters
    in reverse order (backward computes the last layers' gradients first), a bucket closed
    by the parameter that brings it to its cap, the first one's FIRST_BUCKET_MB, as DDP
    closes its buckets (cutting before that parameter instead left a model whose last
    layer is near 1 MiB with a first bucket of its biases alone, and all of its allreduce
    after the backward pass); a parameter larger than the open bucket's cap starts the
    next bucket instead, alone where it passes that one's cap too (a tensor alone is
    reduced in place; bucketed with others it is copied into and out of Horovod's fusion
    buffer: a 32 MB dense weight bucketed with its bias waited about 5 ms a step longer). Each bucket is one negotiation and one fused allreduce; None
    (bucket_mb 0): one allreduce per gradient."""
    if not bucket_mb:
        return None
    groups: list[list[int]] = [[]]
    size, cap = 0, min(FIRST_BUCKET_MB, bucket_mb) * 2**20
    for i in reversed(range(len(sizes))):
        if sizes[i] > cap and groups[-1]:
            groups.append([])
            size, cap = 0, bucket_mb * 2**20
        groups[-1].append(i)
        size += sizes[i]
        if size >= cap:
            groups.append([])
            size, cap = 0, bucket_mb * 2**20
    return [group for group in groups if group]

