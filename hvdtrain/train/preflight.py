"""Checks that the ranks agree: before the first step (same parameters, step
counts and world size) and after the last (same weights). A disagreement stops
every rank with a diff naming the ranks, instead of a stall and a hang."""
from __future__ import annotations

from typing import Any, Callable

from ..data import Dataset, steps_per_epoch
from ..errors import TrainingError, UserError
from ..spec import TrainSpec
from .contract import Comm, Steps


def preflight(train: TrainSpec, dataset: Dataset, comm: Comm, steps: Steps,
              expected_size: int | None = None) -> None:
    """Before any tensor is exchanged: every rank has the same parameters (names,
    shapes, dtypes) and the same number of steps per epoch. A difference would
    otherwise show as Horovod's stall warning and a hang; here it is a diff.
    expected_size: the ranks the launcher started, where it knows (srun, MPI mode)."""
    check_world(comm, expected_size)
    mine = {"parameters": [list(map(str, p)) for p in steps.signature],
            "steps_per_epoch": steps_per_epoch(len(dataset.train), comm.size, train.batch_size, train.last_batch),
            "training samples": len(dataset.train), "classes": dataset.num_classes,
            "data (the tokenizer's digest)": dataset.fingerprint[:16]}
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


def check_world(comm: Comm, expected: int | None) -> None:
    """Ranks that each came up alone (srun without the right --mpi) stop before training."""
    if expected is not None and expected != comm.size:
        raise UserError(f"Horovod sees {comm.size} rank(s) but the launcher started {expected}: "
                        "the ranks did not join one MPI job (under srun use --mpi=pmix)")


def check_consistency(comm: Comm, steps: Steps) -> str:
    """Every rank must end with the same weights; name the ranks that do not.
    Returns the weights' digest, the same on every rank."""
    digests = comm.allgather_object(steps.weights_digest(), "hvdtrain.weights_digest")
    if len(set(digests)) != 1:
        groups = {d: [r for r, x in enumerate(digests) if x == d] for d in digests}
        raise TrainingError("ranks ended with different weights: " +
                           "; ".join(f"ranks {r}: {d[:12]}" for d, r in groups.items()))
    return digests[0]


def built_on_every_rank(comm: Comm, build: Callable[[], Any], elastic: bool) -> Any:
    """Run a rank's set-up step that may fail on some ranks only (user code: a model
    builder, a loss). Every rank learns before its first collective whether all ranks
    succeeded, and all stop with the first failure's message naming its rank, where
    otherwise the others would wait for it until a timeout.

    Under elastic training no collective may run before the elastic loop: a failure
    ends this worker, and Horovod's driver ends or shrinks the job."""
    try:
        value, problem = build(), None
    except UserError as err:
        value, problem = None, str(err)
    if elastic:
        if problem:
            raise UserError(problem)
        return value
    problems = comm.allgather_object(problem, "hvdtrain.build")
    failed = [(rank, text) for rank, text in enumerate(problems) if text]
    if failed:
        rank, text = failed[0]
        others = f" and {len(failed) - 1} other rank(s)" if len(failed) > 1 else ""
        raise UserError(f"{text} (on rank {rank}{others})")
    return value
