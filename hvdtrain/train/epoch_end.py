"""The end of an epoch on every path: validation over all ranks, the epoch's
record (the same on every rank), and on rank 0 its line, metrics.jsonl, the best
epoch's weights and the checkpoints."""
from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..data import Dataset
from ..errors import UserError, writing
from ..spec import JobSpec
from . import checkpoint, watchdog
from .contract import Comm, Position, Steps
from .metrics import epoch_metrics
from .startup import describe, phases as startup_phases
from .steer import Steering
from .validation import batch_size, evaluate, task_scores


def end_epoch(spec: JobSpec, dataset: Dataset, comm: Comm, steps: Steps, epoch: int,
              train: np.ndarray, lr: float, train_seconds: float, progress: Callable[[str], None],
              steering: Steering | None = None, startup: float | None = None, **extra: Any) -> dict[str, Any]:
    """The end of an epoch on every path: validation over all ranks, the epoch's
    record, the steering's decisions (the same on every rank), and on rank 0 its
    line, metrics.jsonl, the best epoch's weights (with early stopping) and (when
    due, or when stopping) a checkpoint.
    train: the epoch's training loss sum and sample count, summed over all ranks;
    startup: this rank's seconds from launch to its first batch, in the run's first
    epoch (the record has the slowest rank's, and that rank's phases: `startup`)."""
    began = time.perf_counter()
    watchdog.progress("validation")
    steps.average_buffers()  # every rank validates and saves the same model
    stats, val_loss = evaluate(dataset, comm, steps, batch_size(spec))
    totals = comm.allreduce_sum(np.concatenate([[val_loss, dataset.newly_skipped()], stats]),
                                f"hvdtrain.metrics.{epoch}")
    elapsed = train_seconds + time.perf_counter() - began
    # the largest resident memory any rank has had (its loader processes not counted)
    gathered = comm.allgather_object((peak_rss_mb(), startup, startup_phases() if startup is not None else None),
                                     f"hvdtrain.rss.{epoch}")
    peak_rss = max(rss for rss, _, _ in gathered)
    record = {"epoch": epoch + 1, **extra, "train_loss": train[0] / max(train[1], 1),
              "val_loss": totals[0] / len(dataset.val),
              **{f"val_{m}": v for m, v in task_scores(dataset, totals[2:], totals[0] / len(dataset.val)).items()},
              "lr": lr, "samples_per_s": train[1] / elapsed, "seconds": elapsed,
              "train_samples_per_s": train[1] / max(train_seconds, 1e-9),
              "peak_rss_mb": peak_rss}
    if dataset.preprocessing.task == "language_modeling":  # every block holds max_length tokens
        record["train_tokens_per_s"] = record["train_samples_per_s"] * dataset.preprocessing.max_length
    if startup is not None:  # the slowest rank's seconds to its first batch, and its phases
        _, record["startup_s"], record["startup_phases"] = max(gathered, key=lambda g: g[1])
    if spec.data is not None and spec.data.on_bad_file == "skip":
        record["skipped_files"] = int(totals[1])  # this epoch's reads, training and validation, all ranks
    if not all(math.isfinite(record[m]) for m in ("train_loss", "val_loss")):
        raise UserError(f"epoch {epoch + 1}: loss is not finite; lower optimizer.lr")
    best = steering.update(spec, record) if steering is not None else False
    # Horovod: checkpoint and log on rank 0 only, so ranks never race on one file.
    if comm.rank == 0:
        log_epoch(spec, record, progress)
        if best and spec.train.early_stopping is not None:
            checkpoint.save_best(spec.checkpoint.dir, epoch + 1, steps.state_bytes(),
                                 {"spec": spec.model_dump(mode="json"), "metrics": record})
        if checkpoint_due(spec, epoch + 1) or (steering is not None and steering.stopped):
            save_checkpoint(spec, steps, record, steering=steering.to_dict() if steering else None)
            if spec.log.level == "verbose":
                progress(f"checkpoint: {checkpoint.checkpoint_path(spec.checkpoint.dir, epoch + 1)}")
    return record


def log_epoch(spec: JobSpec, record: dict[str, Any], progress: Callable[[str], None]) -> None:
    """Rank 0: the epoch's line and its record in metrics.jsonl."""
    path = spec.run_dir / "metrics.jsonl"
    with writing(path), open(path, "a") as log:
        log.write(json.dumps(record) + "\n")
    workers = f"  ({record['workers']} workers)" if "workers" in record else ""
    progress(f"epoch {record['epoch']}/{spec.train.epochs}  train_loss {record['train_loss']:.4f}  "
             f"val_loss {record['val_loss']:.4f}  {epoch_metrics(spec.task, record)}  "
             f"({record['seconds']:.1f}s){workers}")
    if spec.log.level == "verbose" and "startup_phases" in record:
        progress(f"start-up to the first step (the slowest rank) {describe(record['startup_phases'])}")


def checkpoint_due(spec: JobSpec, epochs_done: int) -> bool:
    return epochs_done % spec.checkpoint.every_epochs == 0 or epochs_done == spec.train.epochs


def save_checkpoint(spec: JobSpec, steps: Steps, record: dict[str, Any], within: Position | None = None,
                    steering: dict[str, Any] | None = None) -> None:
    """Rank 0: model and optimizer state after record['epoch'] epochs (and, within
    an epoch, `within.step` steps of the next), with the spec that wrote it (a
    later run with another model or data refuses it) and the steering's state."""
    watchdog.progress("checkpoint")
    meta = {"spec": spec.model_dump(mode="json"), "metrics": record,
            "steering": within.steering if within is not None else steering}
    if within is not None:
        meta["position"] = {"step": within.step, "loss_sum": within.loss_sum, "seen": within.seen}
    checkpoint.save(spec.checkpoint.dir, record["epoch"], steps.state_bytes(), meta,
                    spec.checkpoint.keep_last, step=within.step if within else 0)


def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM, which starts afresh with the
    program (getrusage's maxrss also holds the peak of the process that started it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
