"""Where a rank's time goes before its first step. The rank marks the end of each
phase as it reaches it (`mark`); `phases` turns the marks into seconds, starting
from the launch: `hvdtrain run` passes its launch time to the ranks
(HVDTRAIN_LAUNCHED_AT), elsewhere (srun, mpirun, Kubernetes) the clock starts
with the rank's own process. Phases, in a training rank's order: launcher (the
launch until this process started), python (the interpreter and hvdtrain's
imports), bootstrap (the spec, the launcher's bootstrap), framework (torch or
TensorFlow imported), data (the data set up), horovod (Horovod imported and
initialised), model (model and optimizer built), sync (checks, resume and rank
0's weights broadcast), first batch (the loader's first batch), first step."""
from __future__ import annotations

import os
import time

import psutil

_marks: list[tuple[str, float]] = []


def mark(phase: str) -> None:
    """`phase` ended now (a phase marked twice keeps its first end)."""
    if all(name != phase for name, _ in _marks):
        _marks.append((phase, time.time()))


def process_started_at() -> float:
    """When this process started, to the clock tick: psutil's create_time counts from the
    boot time in whole seconds, up to a second early."""
    try:
        with open("/proc/self/stat") as stat:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return psutil.Process().create_time()


def launched_at() -> float:
    try:
        return float(os.environ["HVDTRAIN_LAUNCHED_AT"])
    except (KeyError, ValueError):
        return process_started_at()


def since_launch() -> float:
    """Seconds since `hvdtrain run` began launching the job, else since this process started."""
    return time.time() - launched_at()


def phases() -> dict[str, float]:
    """Seconds of each phase marked so far, in order, from the launch."""
    began, process = launched_at(), process_started_at()
    seconds = {"launcher": max(0.0, process - began)} if process > began else {}
    previous = max(began, process)
    for name, at in _marks:
        seconds[name] = round(max(0.0, at - previous), 3)
        previous = at
    return seconds


def describe(seconds: dict[str, float]) -> str:
    """'4.1 s: launcher 1.5, python 0.4, ...'"""
    parts = ", ".join(f"{name} {value:.1f}" for name, value in seconds.items())
    return f"{sum(seconds.values()):.1f} s: {parts}"
