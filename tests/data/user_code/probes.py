"""Models that report what training did to them, for the tests that check the
loop's claims from outside: which samples were trained in which epoch (elastic),
a rank held at a known step (the kill-and-resume test), paced steps (the stop
tests), BatchNorm in front of the data (its running statistics are those of the
inputs alone)."""
import math
import os
import time
from pathlib import Path

import horovod.torch as hvd
import torch
from torch import nn


def mlp(features: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(features, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                         nn.Linear(64, num_classes))


class SampleCounter(nn.Module):
    """An MLP on every feature but the last, which holds the sample's row number.

    `counts[e, i]` is how many times row i was trained in epoch e, summed over the
    ranks by an allreduce in each training step. The counts are buffers, so Horovod's
    elastic state commits, rolls back and broadcasts them with the weights: a step
    rolled back by a reset is not counted. An epoch is `train_samples` samples.

    hold_for_regrowth: in the last epoch, a worker that saw the job shrink to one
    worker and not grow again waits (a short pause each step, so commits and with
    them the join still happen) until it grows, for at most `hold_seconds`."""

    def __init__(self, features, num_classes, rows, train_samples, epochs, hold_seconds=0.0):
        super().__init__()
        self.net = mlp(features - 1, num_classes)
        self.rows, self.train_samples, self.hold_seconds = rows, train_samples, hold_seconds
        self.register_buffer("counts", torch.zeros(epochs, rows, dtype=torch.int32))
        self.register_buffer("trained", torch.zeros((), dtype=torch.int64))
        self.sizes: list[int] = []  # worker counts this process trained with, in order
        self.held = 0.0

    def forward(self, x):
        if self.training:
            self.count(x[:, -1].round().long())
        return self.net(x[:, :-1])

    def count(self, rows):
        size = hvd.size()
        if not self.sizes or self.sizes[-1] != size:
            self.sizes.append(size)
        # every rank names the step by the committed total, which all of them hold
        step = int(self.trained)
        batch = hvd.allreduce(torch.bincount(rows, minlength=self.rows).to(torch.int32), op=hvd.Sum,
                              name=f"probe.count.{step}")
        epoch = min(step // self.train_samples, self.counts.shape[0] - 1)
        self.counts[epoch] += batch
        self.trained += int(batch.sum())
        last_epoch = step >= (self.counts.shape[0] - 1) * self.train_samples
        if last_epoch and self.sizes[-1] == 1 and len(self.sizes) > 1 and self.held < self.hold_seconds:
            time.sleep(0.2)
            self.held += 0.2


def sample_counter(input_shape, num_classes, rows, train_samples, epochs, hold_seconds=0.0):
    return SampleCounter(math.prod(input_shape), num_classes, rows, train_samples, epochs, hold_seconds)


class HeldAtStep(nn.Module):
    """An MLP; with HVDTRAIN_TEST_HOLD="RANK:STEP:FILE" in the environment, that rank's
    training step number STEP (counted from 1 in this process) writes FILE and then
    waits there until the process is killed: a kill that lands at a known step."""

    def __init__(self, features, num_classes):
        super().__init__()
        self.net = mlp(features, num_classes)
        self.steps = 0
        rank, step, marker = (os.environ.get("HVDTRAIN_TEST_HOLD", "") or "-1:0:").split(":", 2)
        self.hold = (int(step), Path(marker)) if rank == os.environ.get("HOROVOD_RANK") else None

    def forward(self, x):
        if self.training:
            self.steps += 1
            if self.hold and self.steps == self.hold[0]:
                self.hold[1].write_text(f"{self.steps}\n")
                while True:
                    time.sleep(1)
        return self.net(x.flatten(1))


def held_at_step(input_shape, num_classes):
    return HeldAtStep(math.prod(input_shape), num_classes)


def batchnorm_first(input_shape, num_classes):
    """BatchNorm on the inputs themselves, with momentum 1: after each training step
    its running mean and variance are those of that step's batch of inputs."""
    features = math.prod(input_shape)
    return nn.Sequential(nn.Flatten(), nn.BatchNorm1d(features, momentum=1.0), mlp(features, num_classes))


class Paced(nn.Module):
    """An MLP whose training steps take at least SECONDS each, with
    HVDTRAIN_TEST_PACE="SECONDS:STEP:FILE": the step numbered STEP (from 1 in this
    process) writes FILE, so a signal can land while training runs."""

    def __init__(self, features, num_classes):
        super().__init__()
        self.net = mlp(features, num_classes)
        self.steps = 0
        seconds, step, marker = (os.environ.get("HVDTRAIN_TEST_PACE", "") or "0:0:").split(":", 2)
        self.seconds, self.mark_at, self.marker = float(seconds), int(step), Path(marker)

    def forward(self, x):
        if self.training:
            self.steps += 1
            time.sleep(self.seconds)
            if self.steps == self.mark_at:
                self.marker.write_text(f"{self.steps}\n")
        return self.net(x.flatten(1))


def paced(input_shape, num_classes):
    return Paced(math.prod(input_shape), num_classes)


class Binned(nn.Module):
    """Each (standardised) feature cut into 17 bins, each (feature, bin) a row of an
    EmbeddingBag with sparse gradients, summed; then a linear head."""

    def __init__(self, features: int, num_classes: int, width: int):
        super().__init__()
        self.features = features
        self.table = nn.EmbeddingBag(features * 17, width, mode="sum", sparse=True)
        nn.init.normal_(self.table.weight, std=0.05)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        bins = (x.flatten(1) * 2).round().clamp(-8, 8).long() + 8
        return self.head(torch.relu(self.table(bins + 17 * torch.arange(self.features, device=x.device))))


def sparse_binned(input_shape, num_classes, width=32):
    """A model whose embedding's gradients are sparse (torch)."""
    return Binned(math.prod(input_shape), num_classes, width)
