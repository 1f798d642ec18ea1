"""Steering a run from its epoch records: the plateau schedule's lr factor,
early stopping, a target, and which epoch is the best so far.

Every rank computes the same records (the metrics are allreduced sums), so
every rank takes each decision at the same epoch without exchanging anything.
The state is saved in each checkpoint, so a resumed run decides as an
uninterrupted one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..spec import METRICS, JobSpec


@dataclass
class Steering:
    lr_factor: float = 1.0  # plateau schedule: the product of its decays so far
    plateau_best: float | None = None  # val_loss
    plateau_wait: int = 0
    best_value: float | None = None  # the monitored metric's best value, at best_epoch
    best_epoch: int = 0
    wait: int = 0  # epochs since the best one (early stopping)
    stopped: str | None = None  # why training stopped before the last epoch

    @classmethod
    def from_dict(cls, state: dict[str, Any] | None) -> "Steering":
        return cls(**state) if state else cls()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def update(self, spec: JobSpec, record: dict[str, Any]) -> bool:
        """Take in an epoch's record; True when it is the best epoch so far."""
        metric, larger = monitored(spec)
        min_delta = spec.train.early_stopping.min_delta if spec.train.early_stopping else 0.0
        value = record[metric]
        improved = self.best_value is None or (
            value > self.best_value + min_delta if larger else value < self.best_value - min_delta)
        if improved:
            self.best_value, self.best_epoch, self.wait = value, record["epoch"], 0
        else:
            self.wait += 1
        if spec.optimizer.schedule == "plateau":
            self.plateau(spec, record["val_loss"])
        stopping, target = spec.train.early_stopping, spec.train.target
        if stopping is not None and self.wait >= stopping.patience:
            self.stopped = (f"early stopping: {metric} did not improve by more than {stopping.min_delta:g} "
                            f"for {stopping.patience} epochs (best {self.best_value:.4f} at epoch "
                            f"{self.best_epoch})")
        elif target is not None and reached(target.metric, record[target.metric], target.value):
            self.stopped = f"target: {target.metric} {record[target.metric]:.4f} reached {target.value:g}"
        return improved

    def plateau(self, spec: JobSpec, val_loss: float) -> None:
        """Horovod users' ReduceLROnPlateau: x decay after `patience` epochs without a lower val_loss."""
        if self.plateau_best is None or val_loss < self.plateau_best:
            self.plateau_best, self.plateau_wait = val_loss, 0
            return
        self.plateau_wait += 1
        if self.plateau_wait >= spec.optimizer.patience:
            self.lr_factor *= spec.optimizer.decay
            self.plateau_wait = 0


def monitored(spec: JobSpec) -> tuple[str, bool]:
    """The metric that names the best epoch, and whether larger is better."""
    metric = (spec.train.early_stopping.metric if spec.train.early_stopping else
              spec.train.target.metric if spec.train.target else "val_loss")
    return metric, METRICS[spec.task][metric]


def reached(metric: str, value: float, target: float) -> bool:
    larger = next(m[metric] for m in METRICS.values() if metric in m)
    return value >= target if larger else value <= target
