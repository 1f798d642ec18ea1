"""The learning-rate rule, once for every path (static, elastic after each reset,
bench): Horovod's scaling by the number of workers, warm-up, the schedules."""
from __future__ import annotations

import math
from typing import Callable

from .. import plugins
from ..errors import UserError
from ..spec import OptimizerSpec
from .contract import Comm


def scaled_lr(optimizer: OptimizerSpec, adasum: bool, comm: Comm) -> float:
    """Horovod's rule: lr x workers. Adasum adapts to the number of workers
    itself, so it is scaled by the local size only where the GPU hierarchical
    allreduce sums within a node first (Horovod's examples do the same).
    Every path (static, elastic after each reset, bench) takes the lr from here."""
    if optimizer.lr_scaling == "none":
        return optimizer.lr
    if adasum:
        return optimizer.lr * (comm.local_size if comm.hierarchical else 1)
    return optimizer.lr * comm.size


def lr_schedule(optimizer: OptimizerSpec, target_lr: float, epoch: int, steps: int, epochs: int = 1,
                factor: float = 1.0) -> Callable[[int], float]:
    """lr for each step of an epoch: linear warm-up from the base lr to target_lr,
    then the schedule: constant; cosine (to 0 at the end of the last epoch);
    step (x decay every decay_every_epochs); plateau (x factor, the steering's);
    or the user's function of (epochs since warm-up, epochs after warm-up)."""
    base, warmup = optimizer.lr, optimizer.warmup_epochs
    users = user_schedule(optimizer.schedule) if ":" in optimizer.schedule else None

    def at(step: int) -> float:
        progress = epoch + step / steps
        if warmup > 0 and progress < warmup:
            return base + (target_lr - base) * progress / warmup
        if users is not None:
            return target_lr * users(progress - warmup, max(epochs - warmup, 0.0))
        if optimizer.schedule == "cosine":
            done = min(1.0, (progress - warmup) / max(epochs - warmup, 1e-9))
            return target_lr * 0.5 * (1.0 + math.cos(math.pi * done))
        if optimizer.schedule == "step":
            return target_lr * optimizer.decay ** (epoch // optimizer.decay_every_epochs)
        return target_lr * factor
    return at


def user_schedule(reference: str) -> Callable[[float, float], float]:
    """The user's schedule, its factor checked at every call: a finite number >= 0."""
    function = plugins.load(reference, "optimizer.schedule")

    def factor(progress: float, epochs: float) -> float:
        try:
            value = float(function(progress, epochs))
        except Exception as err:
            raise UserError(f"optimizer.schedule: {reference}({progress:g}, {epochs:g}) raised "
                            f"{type(err).__name__}: {err}") from None
        if not (math.isfinite(value) and value >= 0):
            raise UserError(f"optimizer.schedule: {reference}({progress:g}, {epochs:g}) gave {value}; "
                            "expected a factor >= 0 of the scaled learning rate")
        return value
    return factor
