"""The epochs of a run, shared by every backend: this rank's shard of each epoch
(the sharding rule), the steps (through the backend's `Steps`), checkpoints
within an epoch and stops asked for by the scheduler, then the end of each epoch
(`epoch_end`) and of the run (`run_dir`)."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from ..data import Dataset, shard_batches, steps_per_epoch
from ..spec import JobSpec
from . import preempt, startup, watchdog
from .contract import Comm, Position, Steps
from .epoch_end import end_epoch, save_checkpoint
from .lr import lr_schedule, scaled_lr
from .metrics import final_metrics
from .preflight import check_consistency
from .progress import Progress
from .run_dir import finish, prepare_run_dir, publish
from .steer import Steering
from .tracking import Tracker
from .watchdog import Watchdog


def run_epochs(spec: JobSpec, dataset: Dataset, comm: Comm, steps: Steps, start: Position,
               progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    say = (lambda line: None) if spec.log.level == "quiet" else (progress or write_line)
    n = len(dataset.train)
    per_epoch = steps_per_epoch(n, comm.size, spec.train.batch_size, spec.train.last_batch)
    # Horovod: the learning rate scaled by the number of workers.
    target_lr = scaled_lr(spec.optimizer, spec.horovod.adasum, comm)
    if comm.rank == 0:
        prepare_run_dir(spec, start.epoch)
        say(f"{spec.backend} {spec.model.kind} with {steps.parameters:,} parameters on "
            f"{comm.size} workers, {per_epoch} steps per epoch")
        if spec.log.level == "verbose":
            test = f", {len(dataset.test)} test" if dataset.test is not None else ""
            say(f"data: {len(dataset.train)} training, {len(dataset.val)} validation{test} samples "
                f"({type(dataset.train).__name__}); loader: data.workers {spec.data.workers}, prefetch "
                f"{spec.data.prefetch}; lr {target_lr:g} after scaling, schedule {spec.optimizer.schedule}")
    record: dict[str, Any] = {}
    steering = Steering.from_dict(start.steering)
    resumed = (start.epoch, start.step) != (0, 0)
    tracker = Tracker(spec.log.mlflow, spec, resumed, say) if comm.rank == 0 and spec.log.mlflow else None
    shown = Progress(spec, comm.rank, comm.size, per_epoch, say)
    started: list[float] = []  # the seconds from launch to this run's first batch
    watch = Watchdog(spec.horovod.hang_seconds, comm, spec.run_dir).start() if spec.horovod.hang_seconds else None
    try:
        for epoch in range(start.epoch, spec.train.epochs):
            if steering.stopped:  # every rank holds the same records, so all stop here
                break
            began = time.perf_counter()
            position = start if epoch == start.epoch else Position(epoch, steering=steering.to_dict())
            lr_at = lr_schedule(spec.optimizer, target_lr, epoch, per_epoch, spec.train.epochs,
                                steering.lr_factor)
            train = train_epoch(spec, dataset, comm, steps, position, lr_at, per_epoch, shown, say,
                                started if epoch == start.epoch else None)
            record = end_epoch(spec, dataset, comm, steps, epoch, train, lr_at(per_epoch - 1),
                               time.perf_counter() - began, say, steering=steering,
                               startup=started.pop() if started else None)
            shown.end_epoch(record)
            if tracker is not None:
                tracker.epoch(record)
            if comm.rank == 0:
                publish(spec)
    except BaseException as err:
        if watch is not None:
            watch.stop()
        if tracker is not None:
            tracker.finish("KILLED" if isinstance(err, preempt.Preempted) else "FAILED")
        if comm.rank == 0:
            publish(spec)  # what the run has written so far (a warning if that fails too)
        raise
    finally:
        shown.close()
    if comm.rank == 0 and steering.stopped:
        say(f"stopped after epoch {record.get('epoch', start.epoch)}: {steering.stopped}")
    watchdog.progress("finishing")
    try:
        digest = check_consistency(comm, steps)
        summary = finish(spec, dataset, comm, steps, record, digest, steering)
    except BaseException:
        if tracker is not None:
            tracker.finish("FAILED")
        raise
    finally:
        if watch is not None:
            watch.stop()
    if tracker is not None:
        tracker.finish("FINISHED")
    if comm.rank == 0 and summary["final"]:
        say(f"final {final_metrics(spec.task, summary['final'])}")
    return summary


def train_epoch(spec: JobSpec, dataset: Dataset, comm: Comm, steps: Steps, start: Position,
                lr_at: Callable[[int], float], per_epoch: int, shown: Progress,
                say: Callable[[str], None], started: list[float] | None = None) -> np.ndarray:
    """One epoch from start.step on, through the backend's loader; with
    checkpoint.every_steps, a checkpoint each that many steps records the position
    (the step, the epoch's loss so far, the steering). A training call also ends
    where rank 0's progress wants the loss (a line, the bar, TensorBoard), so the
    loss is read from the device only then. Returns the epoch's loss sum and
    sample count over all ranks. started: a list that takes the seconds from launch
    to the first batch (`since_launch`) if it is the run's first epoch."""
    epoch, every = start.epoch, spec.checkpoint.every_steps or per_epoch
    passes = spec.horovod.backward_passes_per_step
    index_batches = shard_batches(n=len(dataset.train), rank=comm.rank, size=comm.size,
                                  batch_size=spec.train.batch_size, seed=spec.train.seed, epoch=epoch,
                                  groups=getattr(dataset.train, "groups", None), last_batch=spec.train.last_batch)
    batches = iter(steps.loader(dataset.train, index_batches[start.step:], epoch))
    local, done = np.zeros(2), [start.step]
    shown.begin_epoch(epoch, start.step)

    def until(limit: int):
        """Batches up to step `limit`, or fewer: ends after a step (closing a group of
        backward passes) at which rank 0's progress is due."""
        while done[0] < limit:
            batch = next(batches)
            watchdog.progress("train", epoch, done[0] + 1)
            if started is not None and done[0] == start.step:
                started.append(startup.since_launch())
                startup.mark("first batch")
            yield batch
            done[0] += 1
            if started is not None:
                startup.mark("first step")
            shown.step_done()
            if done[0] < limit and done[0] % passes == 0 and shown.due(done[0]):
                return

    check = spec.slurm.check_every_steps if preempt.enabled() else None
    while done[0] < per_epoch:
        first = done[0]
        end = min(per_epoch, (first // every + 1) * every, (first // check + 1) * check if check else per_epoch)
        part = np.asarray(steps.train_epoch(epoch, until(end), lr_at, first, per_epoch), dtype=np.float64)
        local += part
        shown.segment(epoch, done[0], part[0], part[1], lr_at(done[0] - 1))
        if not done[0] == end < per_epoch:
            continue
        # a stop asked for (Slurm's warning signal) on any rank: all stop after this step,
        # where a group of backward passes is complete (its gradients are in no checkpoint)
        stop = bool(check and end % check == 0 and end % passes == 0 and comm.allreduce_sum(
            np.array([float(preempt.asked())]), f"hvdtrain.stop.{epoch}.{end}")[0] > 0)
        if stop or (spec.checkpoint.every_steps and end % every == 0):
            totals = start.sums + comm.allreduce_sum(local, f"hvdtrain.train.{epoch}.{end}")
            if comm.rank == 0:
                save_checkpoint(spec, steps, {"epoch": epoch},
                                Position(epoch, end, *totals, steering=start.steering))
                say(f"checkpoint: epoch {epoch + 1}, step {end}/{per_epoch}")
        if stop:
            if comm.rank == 0:
                (spec.run_dir / preempt.MARKER).write_text(f"epoch {epoch + 1}, step {end}\n")
                say(f"stopping on request after step {end} of epoch {epoch + 1}: the rerun goes on from here")
            # every rank waits for rank 0's checkpoint before any of them ends the job step
            comm.allreduce_sum(np.zeros(1), "hvdtrain.stopped")
            raise preempt.Preempted(f"stopped after step {end} of epoch {epoch + 1}")
    return start.sums + comm.allreduce_sum(local, f"hvdtrain.train.{epoch}")


def write_line(line: str) -> None:
    """A line on stdout at once (around a tqdm bar), also where stdout is a pipe
    that Python would otherwise fill before passing on."""
    tqdm.write(line)
    sys.stdout.flush()
