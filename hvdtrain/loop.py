"""The framework-neutral epoch loop shared by every backend.

A backend does Horovod's set-up (init, pin, wrap, broadcast) and then hands
this loop two small bundles of callables: `Comm` (collectives on numpy values)
and `Steps` (train one epoch, predict, (de)serialise state). The loop owns the
learning-rate rule, sharding, the end of each epoch (metrics over all ranks,
rank-0 checkpoints) and export, so each is written once for all backends; the
checks that ranks agree are in `preflight`, finding a checkpoint in `resume`.
"""
from __future__ import annotations

import json
import math
import os
import resource
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import psutil
from tqdm import tqdm

from . import checkpoint, preempt
from .data import Batch, Dataset, Samples, eval_shard, shard_batches, steps_per_epoch
from .errors import UserError
from .metrics import (confusion, epoch_metrics, final_metrics, regression_scores,
                      regression_sums, scores)
from .preflight import check_consistency, preflight
from .resume import Position, load_latest
from .report import CURVES, Progress, plot_runs
from .spec import JobSpec, OptimizerSpec, dump
from .steer import Steering, monitored


@dataclass
class Comm:
    rank: int
    size: int
    local_rank: int
    local_size: int
    allreduce_sum: Callable[[np.ndarray, str], np.ndarray]
    broadcast_object: Callable[[Any, str], Any]
    allgather_object: Callable[[Any, str], list]
    hierarchical: bool = False  # GPUs with NCCL: allreduce sums within a node first


@dataclass
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


@dataclass
class Training:
    """What a backend's set-up hands back: Horovod initialised, the model and the
    wrapped optimizer on this rank's device, and the steps the loop drives."""
    hvd: Any  # horovod.torch or horovod.tensorflow
    comm: Comm
    model: Any
    optimizer: Any
    steps: Steps
    make_comm: Callable[[], Comm]  # a fresh Comm (an elastic reset changes rank and size)


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
    step (x decay every decay_every_epochs); plateau (x factor, the steering's)."""
    base, warmup = optimizer.lr, optimizer.warmup_epochs

    def at(step: int) -> float:
        progress = epoch + step / steps
        if warmup > 0 and progress < warmup:
            return base + (target_lr - base) * progress / warmup
        if optimizer.schedule == "cosine":
            done = min(1.0, (progress - warmup) / max(epochs - warmup, 1e-9))
            return target_lr * 0.5 * (1.0 + math.cos(math.pi * done))
        if optimizer.schedule == "step":
            return target_lr * optimizer.decay ** (epoch // optimizer.decay_every_epochs)
        return target_lr * factor
    return at


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


def evaluate(dataset: Dataset, comm: Comm, steps: Steps, batch_size: int,
             samples: Samples | None = None) -> tuple[np.ndarray, float]:
    """This rank's metric sums (confusion counts, or regression sums in the targets'
    units) and summed loss on its shard of the validation set (or of samples)."""
    prep, k = dataset.preprocessing, dataset.num_classes
    regression = prep.task == "regression"
    stats, loss = np.zeros(5 if regression else k * k), 0.0
    samples = dataset.val if samples is None else samples
    for x, y in steps.loader(samples, eval_shard(len(samples), comm.rank, comm.size, batch_size)):
        outputs, batch_loss = steps.evaluate_batch(x, y)
        loss += batch_loss
        labels = host_labels(y)
        stats += regression_sums(prep.targets(outputs), prep.targets(labels)) if regression else \
            confusion(labels, np.asarray(outputs).argmax(axis=1), k).ravel()
    return stats, loss


def host_labels(labels) -> np.ndarray:
    """A batch's labels as numpy, wherever the loader put them: the torch loader keeps
    them on the GPU when training there."""
    if getattr(labels, "is_cuda", False):
        labels = labels.cpu()
    return np.asarray(labels)


def task_scores(dataset: Dataset, stats: np.ndarray) -> dict[str, float]:
    if dataset.preprocessing.task == "regression":
        return regression_scores(stats)
    k = dataset.num_classes
    return scores(stats.reshape(k, k))


def run_epochs(spec: JobSpec, dataset: Dataset, comm: Comm, steps: Steps, start: Position,
               progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    say = (lambda line: None) if spec.log.level == "quiet" else (progress or write_line)
    n = len(dataset.train)
    per_epoch = steps_per_epoch(n, comm.size, spec.train.batch_size)
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
    shown = Progress(spec, comm.rank, comm.size, per_epoch, say)
    started: list[float] = []  # the seconds from launch to this run's first batch
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
    finally:
        shown.close()
    if comm.rank == 0 and steering.stopped:
        say(f"stopped after epoch {record.get('epoch', start.epoch)}: {steering.stopped}")
    digest = check_consistency(comm, steps)
    summary = finish(spec, dataset, comm, steps, record, digest, steering)
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
                                  groups=getattr(dataset.train, "groups", None))
    batches = iter(steps.loader(dataset.train, index_batches[start.step:], epoch))
    local, done = np.zeros(2), [start.step]
    shown.begin_epoch(epoch, start.step)

    def until(limit: int):
        """Batches up to step `limit`, or fewer: ends after a step (closing a group of
        backward passes) at which rank 0's progress is due."""
        while done[0] < limit:
            batch = next(batches)
            if started is not None and done[0] == start.step:
                started.append(since_launch())
            yield batch
            done[0] += 1
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
                (Path(spec.output) / preempt.MARKER).write_text(f"epoch {epoch + 1}, step {end}\n")
                say(f"stopping on request after step {end} of epoch {epoch + 1}: the rerun goes on from here")
            # every rank waits for rank 0's checkpoint before any of them ends the job step
            comm.allreduce_sum(np.zeros(1), "hvdtrain.stopped")
            raise preempt.Preempted(f"stopped after step {end} of epoch {epoch + 1}")
    return start.sums + comm.allreduce_sum(local, f"hvdtrain.train.{epoch}")


def end_epoch(spec: JobSpec, dataset: Dataset, comm: Comm, steps: Steps, epoch: int,
              train: np.ndarray, lr: float, train_seconds: float, progress: Callable[[str], None],
              steering: Steering | None = None, startup: float | None = None, **extra: Any) -> dict[str, Any]:
    """The end of an epoch on every path: validation over all ranks, the epoch's
    record, the steering's decisions (the same on every rank), and on rank 0 its
    line, metrics.jsonl, the best epoch's weights (with early stopping) and (when
    due, or when stopping) a checkpoint.
    train: the epoch's training loss sum and sample count, summed over all ranks;
    startup: this rank's seconds from launch to its first batch, in the run's first
    epoch (the record has the slowest rank's)."""
    began = time.perf_counter()
    steps.average_buffers()  # every rank validates and saves the same model
    stats, val_loss = evaluate(dataset, comm, steps, max(spec.train.batch_size, 256))
    totals = comm.allreduce_sum(np.concatenate([[val_loss, dataset.newly_skipped()], stats]),
                                f"hvdtrain.metrics.{epoch}")
    elapsed = train_seconds + time.perf_counter() - began
    # the largest resident memory any rank has had (its loader processes not counted)
    gathered = comm.allgather_object((peak_rss_mb(), startup), f"hvdtrain.rss.{epoch}")
    peak_rss = max(rss for rss, _ in gathered)
    record = {"epoch": epoch + 1, **extra, "train_loss": train[0] / max(train[1], 1),
              "val_loss": totals[0] / len(dataset.val),
              **{f"val_{m}": v for m, v in task_scores(dataset, totals[2:]).items()},
              "lr": lr, "samples_per_s": train[1] / elapsed, "seconds": elapsed,
              "peak_rss_mb": peak_rss}
    if startup is not None:
        record["startup_s"] = max(seconds for _, seconds in gathered)
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


def since_launch() -> float:
    """Seconds since `hvdtrain run` began launching the job (HVDTRAIN_LAUNCHED_AT, which
    it passes to the ranks), else since this process started (srun, mpirun, Kubernetes)."""
    launched = os.environ.get("HVDTRAIN_LAUNCHED_AT")
    try:
        return time.time() - (float(launched) if launched else psutil.Process().create_time())
    except ValueError:
        return time.time() - psutil.Process().create_time()


def write_line(line: str) -> None:
    """A line on stdout at once (around a tqdm bar), also where stdout is a pipe
    that Python would otherwise fill before passing on."""
    tqdm.write(line)
    sys.stdout.flush()


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

    @elastic_run
    def train(state) -> dict[str, Any]:
        comm = make_comm()
        preflight(spec, dataset, comm, steps)
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
            state.epoch, state.processed, state.loss_sum, state.seen = epoch + 1, 0, 0.0, 0
            state.commit()
        digest = check_consistency(comm, steps)
        return finish(spec, dataset, comm, steps, record, digest)

    summary = train(state)
    if make_comm().rank == 0 and summary["final"]:
        progress(f"final {final_metrics(spec.task, summary['final'])}")
    return summary


def log_epoch(spec: JobSpec, record: dict[str, Any], progress: Callable[[str], None]) -> None:
    """Rank 0: the epoch's line and its record in metrics.jsonl."""
    with open(Path(spec.output) / "metrics.jsonl", "a") as log:
        log.write(json.dumps(record) + "\n")
    workers = f"  ({record['workers']} workers)" if "workers" in record else ""
    progress(f"epoch {record['epoch']}/{spec.train.epochs}  train_loss {record['train_loss']:.4f}  "
             f"val_loss {record['val_loss']:.4f}  {epoch_metrics(spec.task, record)}  "
             f"({record['seconds']:.1f}s){workers}")


def checkpoint_due(spec: JobSpec, epochs_done: int) -> bool:
    return epochs_done % spec.checkpoint.every_epochs == 0 or epochs_done == spec.train.epochs


def save_checkpoint(spec: JobSpec, steps: Steps, record: dict[str, Any], within: Position | None = None,
                    steering: dict[str, Any] | None = None) -> None:
    """Rank 0: model and optimizer state after record['epoch'] epochs (and, within
    an epoch, `within.step` steps of the next), with the spec that wrote it (a
    later run with another model or data refuses it) and the steering's state."""
    meta = {"spec": spec.model_dump(mode="json"), "metrics": record,
            "steering": within.steering if within is not None else steering}
    if within is not None:
        meta["position"] = {"step": within.step, "loss_sum": within.loss_sum, "seen": within.seen}
    checkpoint.save(spec.checkpoint.dir, record["epoch"], steps.state_bytes(), meta,
                    spec.checkpoint.keep_last, step=within.step if within else 0)


def prepare_run_dir(spec: JobSpec, start_epoch: int) -> None:
    """Write the resolved spec; keep only metrics of epochs the checkpoint covers."""
    out = Path(spec.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / preempt.MARKER).unlink(missing_ok=True)  # this run goes on from the stop
    (out / "spec.yaml").write_text(dump(spec))
    log = out / "metrics.jsonl"
    if log.exists():
        kept = [ln for ln in log.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("epoch", 0) <= start_epoch]
        log.write_text("".join(ln + "\n" for ln in kept))


def finish(spec: JobSpec, dataset: Dataset, comm: Comm, steps: Steps, record: dict,
           digest: str, steering: Steering | None = None) -> dict[str, Any]:
    """Rank 0 exports the model (with early stopping, the best epoch's) with its
    preprocessing, writes summary.json (why training stopped, the best epoch) and
    draws curves.png."""
    if not record:  # resumed after the last epoch: report the last checkpoint's metrics
        last = checkpoint.latest_valid(spec.checkpoint.dir) if comm.rank == 0 else None
        record = comm.broadcast_object(last.meta.get("metrics", {}) if last else {}, "hvdtrain.final")
    hosts = comm.allgather_object(socket.gethostname(), "hvdtrain.hosts")
    summary = {"name": spec.name, "backend": spec.backend, "workers": comm.size, "hosts": hosts,
               "epochs": spec.train.epochs, "parameters": steps.parameters, "final": record,
               "weights_digest": digest}
    if steering is not None:
        metric, _ = monitored(spec)
        summary["stopped"] = steering.stopped or f"all {spec.train.epochs} epochs done"
        summary["best"] = {"epoch": steering.best_epoch, "metric": metric, "value": steering.best_value}
    if comm.rank == 0:
        summary["exported_epoch"] = record.get("epoch")
        best = checkpoint.load_best(spec.checkpoint.dir) if spec.train.early_stopping is not None else None
        if best is not None:  # the weights of the best epoch, not the last
            steps.load_state_bytes(best.payload)
            summary["exported_epoch"] = best.epoch
        if dataset.test is not None:  # the exported model on the held-out split, rank 0 alone
            alone = Comm(0, 1, 0, 1, lambda values, name: values, lambda obj, name: obj, lambda obj, name: [obj])
            stats, loss = evaluate(dataset, alone, steps, max(spec.train.batch_size, 256), dataset.test)
            summary["test"] = {"samples": len(dataset.test), "loss": loss / len(dataset.test),
                               **task_scores(dataset, stats)}
        model_dir = Path(spec.output) / "model"
        model_dir.mkdir(parents=True, exist_ok=True)
        steps.export(model_dir)
        dataset.preprocessing.save(model_dir / "preprocessing.json")
        (model_dir / "spec.yaml").write_text(dump(spec))
        (Path(spec.output) / "summary.json").write_text(json.dumps(summary, indent=2))
        if (Path(spec.output) / "metrics.jsonl").is_file():
            plot_runs([Path(spec.output)], Path(spec.output) / CURVES)
    return summary
