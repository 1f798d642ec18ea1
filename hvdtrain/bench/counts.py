"""What a bench rank did in a window, counted as it happens: optimizer steps, gradient
allreduces, and how long each step ran on after its last gradient was ready."""
from __future__ import annotations

import statistics
import time


class Counts:
    """Optimizer steps and gradient allreduces (tensors or buckets handed to the
    communication library) so far; `tails`: for each optimizer step, the seconds from its
    last gradient's accumulation to the step's end: the wait for the allreduces and the
    update."""

    def __init__(self):
        self.optimizer_steps = 0
        self.allreduces = 0
        self.optimizer = None  # its class and hyperparameters, as built
        self.tails: list[float] = []
        self.last_gradient_at = None

    def counting(self, method, what: str):
        def counted(*args, **kwargs):
            setattr(self, what, getattr(self, what) + 1)
            return method(*args, **kwargs)
        return counted

    def timing_tail(self, step):
        def timed(*args, **kwargs):
            result = step(*args, **kwargs)
            if self.last_gradient_at is not None:
                self.tails.append(time.perf_counter() - self.last_gradient_at)
                self.last_gradient_at = None
            return result
        return timed

    def gradient_ready(self, _param) -> None:
        self.last_gradient_at = time.perf_counter()


def count_torch_optimizer(optimizer, counts: Counts, horovod: bool) -> None:
    """Count the optimizer's steps and, for Horovod's DistributedOptimizer, the
    gradients its hooks allreduce (none at size 1: Horovod registers no hooks); time
    each step from its parameters' last gradient to its end where they are on the CPU
    (on a GPU the host's clock tells when kernels were queued, not when they ran)."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    optimizer.step = counts.counting(optimizer.step, "optimizer_steps")
    if params and all(p.device.type == "cpu" for p in params):
        for param in params:
            param.register_post_accumulate_grad_hook(counts.gradient_ready)
        optimizer.step = counts.timing_tail(optimizer.step)
    group = optimizer.param_groups[0]
    counts.optimizer = {"name": type(optimizer).__name__, "lr": group["lr"],
                        **{k: group[k] for k in ("momentum", "weight_decay") if k in group}}
    if horovod:  # one a gradient, or one a bucket (horovod.bucket_mb), as DDP counts its buckets
        optimizer._allreduce_grad_async = counts.counting(optimizer._allreduce_grad_async, "allreduces")
        optimizer._grouped_allreduce_grad_async = counts.counting(optimizer._grouped_allreduce_grad_async,
                                                                  "allreduces")


def median_ms(seconds: list[float]) -> float | None:
    return round(statistics.median(seconds) * 1000, 3) if seconds else None
