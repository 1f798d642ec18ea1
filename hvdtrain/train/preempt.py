"""Stopping on request: Slurm's warning signal before preemption or the time limit,
SIGTERM (a Kubernetes eviction, scancel, a node drain, `hvdtrain run` stopped) and
SIGINT.

The sbatch script names its signal (HVDTRAIN_STOP_SIGNAL=USR1) and passes it on
to every rank. A rank only notes it; every `slurm.check_every_steps` steps the
ranks allreduce their notes, so all stop after the same step. Rank 0 then writes
a checkpoint there (within the epoch if need be) and a marker file, the ranks
meet once more (so none ends the job step while rank 0 still writes), and each
exits with EXIT_PREEMPTED; the script sees the marker and requeues the job. A
second SIGTERM or SIGINT ends the rank at once, as it would have without this.
"""
from __future__ import annotations

import os
import signal

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again later
MARKER = ".preempted"  # in the run directory: written by rank 0 once its checkpoint is safe
_asked: list[int] = []


class Preempted(Exception):
    """Raised on every rank once the stop is agreed and the checkpoint written."""


_installed: list[bool] = []


def install(env=os.environ) -> None:
    """Note SIGTERM, SIGINT and the signal the launcher names (HVDTRAIN_STOP_SIGNAL)
    instead of dying of them."""
    named = env.get("HVDTRAIN_STOP_SIGNAL")
    for number in {signal.SIGTERM, signal.SIGINT, *([getattr(signal, f"SIG{named}")] if named else [])}:
        signal.signal(number, note)
    _installed.append(True)


def note(number: int, frame) -> None:
    if number in (signal.SIGTERM, signal.SIGINT) and number in _asked:
        signal.signal(number, signal.SIG_DFL)  # asked twice: stop now
        os.kill(os.getpid(), number)
    _asked.append(number)


def asked() -> bool:
    return bool(_asked)


def enabled() -> bool:
    """The ranks check for a stop (install was called: a rank of a job, not a test's loop)."""
    return bool(_installed)
