"""Resume: rank 0 finds the newest valid checkpoint of the run and loads it;
the backend's broadcast of initial state carries it to the other ranks."""
from __future__ import annotations

from pathlib import Path

from .. import storage
from ..errors import UserError
from ..spec import JobSpec
from . import checkpoint
from .contract import Comm, Position, Steps


def resume(spec: JobSpec, comm: Comm, steps: Steps) -> Position:
    """Rank 0 checks the run dir and loads the newest valid checkpoint; returns
    the position to start at on every rank.

    Only rank 0 reads the file (no shared filesystem needed); the backend's
    broadcast of initial state then carries the weights to the other ranks.
    A problem found by rank 0 is sent to all ranks, so all stop with it at once.
    """
    start, problem = load_latest(spec, steps) if comm.rank == 0 else (Position(0), None)
    start, problem = comm.broadcast_object((start, problem), "hvdtrain.resume")
    if problem:
        raise UserError(problem)
    return start


def load_latest(spec: JobSpec, steps: Steps) -> tuple[Position, str | None]:
    """Rank 0's part of resume, with no collective: (position to start at, problem)."""
    problem = writable_problem(spec)
    found = None if problem else checkpoint.latest_valid(spec.checkpoint.dir)
    if found is None:
        return Position(0), problem
    problem = foreign_checkpoint(spec, found)
    if problem:
        return Position(0), problem
    steps.load_state_bytes(found.payload)
    within = found.meta.get("position")
    if within:
        print(f"resuming from {found.path} (epoch {found.epoch} done, and {within['step']} steps of "
              f"epoch {found.epoch + 1})", flush=True)
        return Position(found.epoch, within["step"], within["loss_sum"], within["seen"],
                        found.meta.get("steering")), None
    print(f"resuming from {found.path} (epoch {found.epoch} done)", flush=True)
    return Position(found.epoch, steering=found.meta.get("steering")), None


def writable_problem(spec: JobSpec) -> str | None:
    """Why the run dir or checkpoint dir cannot be written, found before training. A URL
    was written to when rank 0 loaded the spec (path_problems in spec/job.py), a moment before."""
    for directory in dict.fromkeys((spec.run_dir, spec.checkpoint.dir)):
        if storage.is_url(directory):
            continue
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
