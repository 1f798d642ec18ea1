"""The framework-neutral epoch loop shared by every backend.

A backend does Horovod's set-up (init, pin, scale, wrap, broadcast) and then
hands this loop two small bundles of callables: `Comm` (collectives on numpy
values) and `Steps` (train one epoch, predict, (de)serialise state). The loop
owns resume, sharding, metrics, rank-0 checkpoints, the final cross-rank
consistency check and export, so each is written once for all backends.
"""
from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from . import checkpoint
from .data import Dataset, eval_shard, shard_batches, steps_per_epoch
from .errors import TrainingError, UserError
from .metrics import confusion, scores
from .spec import JobSpec, dump

Batch = tuple[np.ndarray, np.ndarray]


@dataclass
class Comm:
    rank: int
    size: int
    local_rank: int
    local_size: int
    allreduce_sum: Callable[[np.ndarray, str], np.ndarray]
    broadcast_object: Callable[[Any, str], Any]
    allgather_object: Callable[[Any, str], list]


@dataclass
class Steps:
    train_epoch: Callable[[int, list[Batch], Callable[[int], float]], tuple[float, int]]
    logits: Callable[[np.ndarray], np.ndarray]
    state_bytes: Callable[[], bytes]
    load_state_bytes: Callable[[bytes], None]
    weights_digest: Callable[[], str]
    export: Callable[[Path], None]
    parameters: int  # trainable parameters of the model
    signature: list[tuple[str, tuple[int, ...], str]]  # (name, shape, dtype) of each parameter


def scaled_lr(spec: JobSpec, comm: Comm, gpu_adasum: bool = False) -> float:
    """Horovod's rule: lr x workers. Adasum adapts to the number of workers
    itself, so it is scaled by the local size only where the GPU hierarchical
    allreduce sums within a node first (Horovod's examples do the same)."""
    if spec.optimizer.lr_scaling == "none":
        return spec.optimizer.lr
    if spec.horovod.adasum:
        return spec.optimizer.lr * (comm.local_size if gpu_adasum else 1)
    return spec.optimizer.lr * comm.size


def lr_schedule(spec: JobSpec, target_lr: float, epoch: int, steps: int) -> Callable[[int], float]:
    """lr for each step of an epoch: linear warm-up from the base lr to target_lr."""
    base, warmup = spec.optimizer.lr, spec.optimizer.warmup_epochs

    def at(step: int) -> float:
        progress = epoch + step / steps
        if warmup <= 0 or progress >= warmup:
            return target_lr
        return base + (target_lr - base) * progress / warmup
    return at


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Per-rank, per-epoch RNG seed (dropout): a resumed epoch draws the same numbers."""
    return (seed * 1_000_003 + epoch * 10_007 + rank) % (2**31)


def preflight(spec: JobSpec, dataset: Dataset, comm: Comm, steps: Steps) -> None:
    """Before any tensor is exchanged: every rank has the same parameters (names,
    shapes, dtypes) and the same number of steps per epoch. A difference would
    otherwise show as Horovod's stall warning and a hang; here it is a diff."""
    check_world(comm)
    mine = {"parameters": [list(map(str, p)) for p in steps.signature],
            "steps_per_epoch": steps_per_epoch(len(dataset.y_train), comm.size, spec.train.batch_size),
            "training samples": len(dataset.y_train), "classes": dataset.num_classes}
    everyone = comm.allgather_object(mine, "hvdtrain.preflight")
    problems = []
    for rank, theirs in enumerate(everyone[1:], start=1):
        problems += [f"rank {rank} vs rank 0: {line}" for line in differences(everyone[0], theirs)]
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise UserError("ranks disagree before training (different specs, code or data on "
                        "different hosts?):\n  " + "\n  ".join(shown))


def differences(root: dict, other: dict) -> list[str]:
    lines = [f"{key} {other[key]} instead of {root[key]}" for key in root
             if key != "parameters" and root[key] != other[key]]
    ours, theirs = root["parameters"], other["parameters"]
    if len(ours) != len(theirs):
        lines.append(f"{len(theirs)} parameters instead of {len(ours)}")
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            lines.append(f"parameter {i}: {b[0]} shape {b[1]} {b[2]} instead of {a[0]} shape {a[1]} {a[2]}")
    return lines


def resume(spec: JobSpec, comm: Comm, steps: Steps) -> int:
    """Rank 0 checks the run dir and loads the newest valid checkpoint; returns
    the epoch to start at on every rank.

    Only rank 0 reads the file (no shared filesystem needed); the backend's
    broadcast of initial state then carries the weights to the other ranks.
    A problem found by rank 0 is sent to all ranks, so all stop with it at once.
    """
    start, problem = load_latest(spec, steps) if comm.rank == 0 else (0, None)
    start, problem = comm.broadcast_object((start, problem), "hvdtrain.resume")
    if problem:
        raise UserError(problem)
    return start


def load_latest(spec: JobSpec, steps: Steps) -> tuple[int, str | None]:
    """Rank 0's part of resume, with no collective: (epoch to start at, problem)."""
    problem = writable_problem(spec)
    found = None if problem else checkpoint.latest_valid(spec.checkpoint.dir)
    if found is None:
        return 0, problem
    problem = foreign_checkpoint(spec, found)
    if problem:
        return 0, problem
    steps.load_state_bytes(found.payload)
    print(f"resuming from {found.path} (epoch {found.epoch} done)", flush=True)
    return found.epoch, None


def check_world(comm: Comm) -> None:
    """A launcher that knows how many ranks it started (srun in MPI mode) sets
    HVDTRAIN_EXPECTED_SIZE: ranks that each came up alone stop before training."""
    expected = os.environ.get("HVDTRAIN_EXPECTED_SIZE")
    if expected and int(expected) != comm.size:
        raise UserError(f"Horovod sees {comm.size} rank(s) but the launcher started {expected}: "
                        "the ranks did not join one MPI job (under srun use --mpi=pmix)")


def writable_problem(spec: JobSpec) -> str | None:
    """Why the run dir or checkpoint dir cannot be written, found before training."""
    for directory in (Path(spec.output), Path(spec.checkpoint.dir)):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with open(directory / ".write-test", "wb") as probe:
                probe.write(b"0" * 4096)
                probe.flush()
            (directory / ".write-test").unlink()
        except OSError as err:
            return f"cannot write to {directory}: {err.strerror or err}"
    return None


def foreign_checkpoint(spec: JobSpec, found: checkpoint.Checkpoint) -> str | None:
    previous = found.meta.get("spec", {})
    now = spec.model_dump(mode="json")
    for section in ("backend", "model", "data"):
        if previous.get(section) != now[section]:
            return (f"{found.path} was written for a different '{section}' section: use another "
                    "output/checkpoint dir, or remove the old checkpoints")
    return None


def evaluate(dataset: Dataset, comm: Comm, steps: Steps, batch_size: int) -> tuple[np.ndarray, float]:
    """This rank's confusion counts and summed cross-entropy on its validation shard."""
    k = dataset.num_classes
    counts, loss = np.zeros((k, k), dtype=np.int64), 0.0
    for idx in eval_shard(len(dataset.y_val), comm.rank, comm.size, batch_size):
        logits = steps.logits(dataset.x_val[idx]).astype(np.float64)
        labels = dataset.y_val[idx]
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        loss -= log_probs[np.arange(len(idx)), labels].sum()
        counts += confusion(labels, logits.argmax(axis=1), k)
    return counts, loss


def run_epochs(spec: JobSpec, dataset: Dataset, comm: Comm, steps: Steps, target_lr: float,
               start_epoch: int, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    progress = progress or tqdm.write
    n, k = len(dataset.y_train), dataset.num_classes
    per_epoch = steps_per_epoch(n, comm.size, spec.train.batch_size)
    if comm.rank == 0:
        prepare_run_dir(spec, start_epoch)
        progress(f"{spec.backend} {spec.model.kind} with {steps.parameters:,} parameters on "
                 f"{comm.size} workers, {per_epoch} steps per epoch")
    record: dict[str, Any] = {}
    # Rank 0's bar over epochs; under a launcher that pipes output only the epoch lines show.
    bar = tqdm(range(start_epoch, spec.train.epochs), initial=start_epoch, total=spec.train.epochs,
               desc=spec.name, unit="epoch", leave=False,
               disable=comm.rank != 0 or not sys.stderr.isatty())
    for epoch in bar:
        began = time.perf_counter()
        batches = [(dataset.x_train[b], dataset.y_train[b])
                   for b in shard_batches(n, comm.rank, comm.size, spec.train.batch_size,
                                          spec.train.seed, epoch)]
        lr_at = lr_schedule(spec, target_lr, epoch, per_epoch)
        loss_sum, seen = steps.train_epoch(epoch, batches, lr_at)
        counts, val_loss = evaluate(dataset, comm, steps, max(spec.train.batch_size, 256))
        totals = comm.allreduce_sum(np.concatenate([[loss_sum, seen, val_loss], counts.ravel()]),
                                    f"hvdtrain.metrics.{epoch}")
        elapsed = time.perf_counter() - began
        record = {"epoch": epoch + 1, "train_loss": totals[0] / totals[1],
                  "val_loss": totals[2] / len(dataset.y_val),
                  **{f"val_{m}": v for m, v in scores(totals[3:].reshape(k, k)).items()},
                  "lr": lr_at(per_epoch - 1),
                  "samples_per_s": totals[1] / elapsed, "seconds": elapsed}
        if not all(math.isfinite(record[m]) for m in ("train_loss", "val_loss")):
            raise UserError(f"epoch {epoch + 1}: loss is not finite; lower optimizer.lr")
        # Horovod: checkpoint and log on rank 0 only, so ranks never race on one file.
        if comm.rank == 0:
            bar.set_postfix(val_acc=f"{record['val_accuracy']:.4f}", refresh=False)
            log_epoch(spec, record, steps, progress)
    digest = check_consistency(comm, steps)
    summary = finish(spec, dataset, comm, steps, record, digest)
    if comm.rank == 0 and summary["final"]:
        progress(f"final validation accuracy {summary['final']['val_accuracy']:.4f}")
    return summary


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
    progress = progress or tqdm.write
    start_epoch, problem = load_latest(spec, steps) if make_comm().rank == 0 else (0, None)
    if problem:
        raise UserError(problem)
    state = make_state(epoch=start_epoch, processed=0, loss_sum=0.0, seen=0)
    elastic = spec.horovod.elastic
    n, k, bs = len(dataset.y_train), dataset.num_classes, spec.train.batch_size

    @elastic_run
    def train(state) -> dict[str, Any]:
        comm = make_comm()
        preflight(spec, dataset, comm, steps)
        if comm.rank == 0:
            progress(f"{spec.backend} {spec.model.kind} with {steps.parameters:,} parameters on "
                     f"{comm.size} workers (elastic), from epoch {state.epoch + 1}")
        record: dict[str, Any] = {}
        while state.epoch < spec.train.epochs:
            epoch, began = state.epoch, time.perf_counter()
            if comm.rank == 0 and state.processed == 0:
                prepare_run_dir(spec, epoch)
            order = np.random.default_rng([spec.train.seed, epoch]).permutation(n)
            global_batches = elastic_batches(order[state.processed:], comm.size, bs)
            per_epoch = len(elastic_batches(order, comm.size, bs))
            # Horovod: the lr follows the number of workers present
            lr_at = lr_schedule(spec, scaled_lr(spec, comm), epoch, per_epoch)
            done = max(0, per_epoch - len(global_batches))  # steps of this epoch already taken
            for first in range(0, len(global_batches), elastic.commit_every_steps):
                group = global_batches[first:first + elastic.commit_every_steps]
                mine = [(dataset.x_train[b], dataset.y_train[b])
                        for b in (np.array_split(g, comm.size)[comm.rank] for g in group)]
                # dropout seed: per epoch, position in it and rank (reproducible after a reset)
                loss_sum, seen = steps.train_epoch(epoch * 1_000_003 + state.processed, mine,
                                                   lambda i: lr_at(done + first + i))
                totals = comm.allreduce_sum(np.array([loss_sum, seen]), f"hvdtrain.elastic.{epoch}.{first}")
                state.loss_sum += float(totals[0])
                state.seen += int(totals[1])
                state.processed += sum(len(g) for g in group)
                state.commit()
            counts, val_loss = evaluate(dataset, comm, steps, max(bs, 256))
            totals = comm.allreduce_sum(np.concatenate([[val_loss], counts.ravel()]),
                                        f"hvdtrain.metrics.{epoch}")
            elapsed = time.perf_counter() - began
            record = {"epoch": epoch + 1, "workers": comm.size,
                      "train_loss": state.loss_sum / max(state.seen, 1),
                      "val_loss": totals[0] / len(dataset.y_val),
                      **{f"val_{m}": v for m, v in scores(totals[1:].reshape(k, k)).items()},
                      "lr": lr_at(per_epoch - 1), "samples_per_s": state.seen / elapsed,
                      "seconds": elapsed}
            if comm.rank == 0:
                log_epoch(spec, record, steps, progress)
            state.epoch, state.processed, state.loss_sum, state.seen = epoch + 1, 0, 0.0, 0
            state.commit()
        digest = check_consistency(comm, steps)
        return finish(spec, dataset, comm, steps, record, digest)

    summary = train(state)
    if make_comm().rank == 0 and summary["final"]:
        progress(f"final validation accuracy {summary['final']['val_accuracy']:.4f}")
    return summary


def log_epoch(spec: JobSpec, record: dict[str, Any], steps: Steps, progress: Callable[[str], None]) -> None:
    """Rank 0: the epoch's line, metrics.jsonl and, when due, a checkpoint."""
    out, epoch = Path(spec.output), record["epoch"]
    with open(out / "metrics.jsonl", "a") as log:
        log.write(json.dumps(record) + "\n")
    workers = f"  ({record['workers']} workers)" if "workers" in record else ""
    progress(f"epoch {epoch}/{spec.train.epochs}  train_loss {record['train_loss']:.4f}  "
             f"val_loss {record['val_loss']:.4f}  val_acc {record['val_accuracy']:.4f}  "
             f"val_f1 {record['val_f1']:.4f}  ({record['seconds']:.1f}s){workers}")
    if epoch % spec.checkpoint.every_epochs == 0 or epoch == spec.train.epochs:
        checkpoint.save(spec.checkpoint.dir, epoch, steps.state_bytes(),
                        {"spec": spec.model_dump(mode="json"), "metrics": record},
                        spec.checkpoint.keep_last)


def prepare_run_dir(spec: JobSpec, start_epoch: int) -> None:
    """Write the resolved spec; keep only metrics of epochs the checkpoint covers."""
    out = Path(spec.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.yaml").write_text(dump(spec))
    log = out / "metrics.jsonl"
    if log.exists():
        kept = [ln for ln in log.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("epoch", 0) <= start_epoch]
        log.write_text("".join(ln + "\n" for ln in kept))


def check_consistency(comm: Comm, steps: Steps) -> str:
    """Every rank must end with the same weights; name the ranks that do not.
    Returns the weights' digest, the same on every rank."""
    digests = comm.allgather_object(steps.weights_digest(), "hvdtrain.weights_digest")
    if len(set(digests)) != 1:
        groups = {d: [r for r, x in enumerate(digests) if x == d] for d in digests}
        raise TrainingError("ranks ended with different weights: " +
                           "; ".join(f"ranks {r}: {d[:12]}" for d, r in groups.items()))
    return digests[0]


def finish(spec: JobSpec, dataset: Dataset, comm: Comm, steps: Steps, record: dict,
           digest: str) -> dict[str, Any]:
    """Rank 0 exports the model with its preprocessing and writes summary.json."""
    if not record:  # resumed after the last epoch: report the last checkpoint's metrics
        last = checkpoint.latest_valid(spec.checkpoint.dir) if comm.rank == 0 else None
        record = comm.broadcast_object(last.meta.get("metrics", {}) if last else {}, "hvdtrain.final")
    hosts = comm.allgather_object(socket.gethostname(), "hvdtrain.hosts")
    summary = {"name": spec.name, "backend": spec.backend, "workers": comm.size, "hosts": hosts,
               "epochs": spec.train.epochs, "parameters": steps.parameters, "final": record,
               "weights_digest": digest}
    if comm.rank == 0:
        model_dir = Path(spec.output) / "model"
        model_dir.mkdir(parents=True, exist_ok=True)
        steps.export(model_dir)
        dataset.preprocessing.save(model_dir / "preprocessing.json")
        (model_dir / "spec.yaml").write_text(dump(spec))
        (Path(spec.output) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
