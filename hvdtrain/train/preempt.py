"""Stopping on request: Slurm's warning signal before preemption or the time limit.

The sbatch script names the signal (HVDTRAIN_STOP_SIGNAL=USR1) and passes it on
to every rank. A rank only notes it; every `slurm.check_every_steps` steps the
ranks allreduce their notes, so all stop after the same step. Rank 0 then writes
a checkpoint there (within the epoch if need be) and a marker file, the ranks
meet once more (so none ends the job step while rank 0 still writes), and each
exits with EXIT_PREEMPTED; the script sees the marker and requeues the job.
"""
from __future__ import annotations

import os
import signal

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again later
MARKER = ".preempted"  # in the run directory: written by rank 0 once its checkpoint is safe
_asked: list[int] = []


class Preempted(Exception):
    """Raised on every rank once the stop is agreed and the checkpoint written."""


def install(env=os.environ) -> bool:
    """Note the signal the launcher names (HVDTRAIN_STOP_SIGNAL) instead of dying of it."""
    name = env.get("HVDTRAIN_STOP_SIGNAL")
    if not name:
        return False
    signal.signal(getattr(signal, f"SIG{name}"), lambda number, frame: _asked.append(number))
    return True


def asked() -> bool:
    return bool(_asked)


def enabled() -> bool:
    return "HVDTRAIN_STOP_SIGNAL" in os.environ
