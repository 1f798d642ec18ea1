"""Training under Horovod's elastic API: the same epochs as `loop`, with workers
that may leave or join at any step."""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from ..data import Dataset
from ..errors import UserError
from ..spec import JobSpec
from .contract import Comm, Position, Steps
from .epoch_end import end_epoch
from .lr import lr_schedule, scaled_lr
from .metrics import final_metrics
from .loop import write_line
from .preflight import check_consistency, preflight
from .progress import EventLog, epoch_scalars, open_event_log
from .resume import load_latest
from .run_dir import finish, prepare_run_dir


def elastic_batches(remaining: np.ndarray, size: int, batch_size: int) -> list[np.ndarray]:
    """The global batches (size x batch_size samples each) that finish an epoch.

    A last chunk too small for every rank to get a sample joins the one before,
    so no sample is skipped or repeated and no rank gets an empty batch."""
    chunk = size * batch_size
    batches = [remaining[i:i + chunk] for i in range(0, len(remaining), chunk)]
    if len(batches) > 1 and len(batches[-1]) < size:
        batches[-2:] = [np.concatenate(batches[-2:])]
    return batches


def run_elastic(spec: JobSpec, dataset: Dataset, make_comm: Callable[[], Comm], steps: Steps,
                make_state: Callable[..., Any], elastic_run: Callable,
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Training under Horovod's elastic API: workers may leave or join at any step.

    `make_state(**attributes)` builds the backend's Horovod elastic state (model,
    optimizer and the attributes epoch, processed, loss_sum, seen). Every
    `commit_every_steps` steps it is committed in memory; when a worker fails,
    the others go back to the last commit, and the remaining samples of the epoch
    (its permutation from `processed` on) are shared anew among the workers now
    present.

    No collective may run before the elastic loop (a worker that joins later
    would meet the others inside it): rank 0 loads the checkpoint locally, and
    the state, model and optimizer included, is broadcast from rank 0 at every
    (re)start. Preflight runs after each reset."""
    progress = progress or write_line
    start, problem = load_latest(spec, steps) if make_comm().rank == 0 else (Position(0), None)
    if problem:
        raise UserError(problem)
    # a checkpoint taken within an epoch (by a static run) starts that epoch again
    state = make_state(epoch=start.epoch, processed=0, loss_sum=0.0, seen=0)
    elastic = spec.horovod.elastic
    n, bs = len(dataset.train), spec.train.batch_size
    events: list[EventLog] = []  # rank 0's event file, once it has written an epoch (log.tensorboard)

    @elastic_run
    def train(state) -> dict[str, Any]:
        comm = make_comm()
        preflight(spec.train, dataset, comm, steps)
        if comm.rank == 0:
            progress(f"{spec.backend} {spec.model.kind} with {steps.parameters:,} parameters on "
                     f"{comm.size} workers (elastic), from epoch {state.epoch + 1}")
        # Horovod: the lr follows the number of workers present
        target_lr = scaled_lr(spec.optimizer, spec.horovod.adasum, comm)
        record: dict[str, Any] = {}
        while state.epoch < spec.train.epochs:
            epoch, began = state.epoch, time.perf_counter()
            if comm.rank == 0 and state.processed == 0:
                prepare_run_dir(spec, epoch)
            samples = dataset.train
            order = np.random.default_rng([spec.train.seed, epoch]).permutation(n)
            global_batches = elastic_batches(order[state.processed:], comm.size, bs)
            per_epoch = len(elastic_batches(order, comm.size, bs))
            lr_at = lr_schedule(spec.optimizer, target_lr, epoch, per_epoch, spec.train.epochs)
            done = max(0, per_epoch - len(global_batches))  # steps of this epoch already taken
            for first in range(0, len(global_batches), elastic.commit_every_steps):
                group = global_batches[first:first + elastic.commit_every_steps]
                mine = [samples.batch(b, epoch) for b in (np.array_split(g, comm.size)[comm.rank] for g in group)]
                # dropout seed: per epoch, position in it and rank (reproducible after a reset)
                loss_sum, seen = steps.train_epoch(epoch * 1_000_003 + state.processed, mine,
                                                   lambda i: lr_at(done + first + i), 0, len(mine))
                totals = comm.allreduce_sum(np.array([loss_sum, seen]), f"hvdtrain.elastic.{epoch}.{first}")
                state.loss_sum += float(totals[0])
                state.seen += int(totals[1])
                state.processed += sum(len(g) for g in group)
                state.commit()
            record = end_epoch(spec, dataset, comm, steps, epoch, np.array([state.loss_sum, state.seen]),
                               lr_at(per_epoch - 1), time.perf_counter() - began, progress,
                               workers=comm.size)
            if comm.rank == 0 and spec.log.tensorboard:  # the epochs' records, from this worker on
                if not events:
                    events.append(open_event_log(spec))
                epoch_scalars(events[0], record)
                events[0].writer.flush()
            state.epoch, state.processed, state.loss_sum, state.seen = epoch + 1, 0, 0.0, 0
            state.commit()
        digest = check_consistency(comm, steps)
        return finish(spec, dataset, comm, steps, record, digest)

    try:
        summary = train(state)
    finally:
        for log in events:
            log.close()
    if make_comm().rank == 0 and summary["final"]:
        progress(f"final {final_metrics(spec.task, summary['final'])}")
    return summary
