"""One rank of a job: what horovodrun, srun and mpirun start on every process
(`hvdtrain train SPEC`). It reads top to bottom: spec -> Horovod's environment
-> the launcher's bootstrap -> the user's code path -> data -> the backend's
`fit`, or the user's own script where the spec has an `entry`."""
from __future__ import annotations

import os
import runpy
import sys

from .train import preempt, startup
from .spec import EntrySpec, HorovodSpec, load_spec


def horovod_environment(knobs: HorovodSpec) -> dict[str, str]:
    """The spec's horovod section as Horovod's variables."""
    env = {
        "HOROVOD_STALL_CHECK_TIME_SECONDS": str(knobs.stall_check_seconds),
        "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": str(knobs.stall_shutdown_seconds),
        "HOROVOD_GLOO_TIMEOUT_SECONDS": str(knobs.gloo_timeout_seconds),
        # Both always set: Horovod 0.28.1 crashed re-initialising with them set (fixed in
        # the build), and setting them keeps the values the spec records.
        "HOROVOD_FUSION_THRESHOLD": str(int(knobs.fusion_threshold_mb * 2**20)),
        "HOROVOD_CYCLE_TIME": str(knobs.cycle_time_ms),
    }
    if knobs.stall_check_seconds == 0:
        env["HOROVOD_STALL_CHECK_DISABLE"] = "1"
    if knobs.autotune:
        env["HOROVOD_AUTOTUNE"] = "1"
        if knobs.autotune_log:
            env["HOROVOD_AUTOTUNE_LOG"] = str(knobs.autotune_log)
    if knobs.timeline:
        env["HOROVOD_TIMELINE"] = str(knobs.timeline)
    return env


def apply_horovod_environment(knobs: HorovodSpec) -> None:
    """Set Horovod's variables for this process; a variable the user set wins."""
    for name, value in horovod_environment(knobs).items():
        os.environ.setdefault(name, value)
    if knobs.timeline:
        knobs.timeline.parent.mkdir(parents=True, exist_ok=True)


def main(spec_path: str, overrides: list[str]) -> int:
    from .backends import get_backend
    from .data import image_input, load_dataset
    from .data.image_samples import launched_rank
    from .launch import prepare_rank
    from .plugins import add_import_paths, import_paths
    from .train.progress import require_tensorboard

    startup.mark("python")
    spec = load_spec(spec_path, overrides, writes=launched_rank() == "0")  # rank 0 writes output and checkpoints
    preempt.install()  # before anything slow: a stop asked for early is not lost
    apply_horovod_environment(spec.horovod)
    # What the launcher that started this rank sets up first (under srun: Horovod's rank
    # and size from Slurm's variables); the size it started, where Horovod learns it elsewhere.
    expected_size = prepare_rank(os.environ, spec.horovod.start_timeout_seconds)
    add_import_paths(import_paths(spec_path, spec.code))
    if spec.entry is not None:
        return run_entry(spec.entry)
    startup.mark("bootstrap")
    backend = get_backend(spec.backend)
    require_tensorboard(spec.log)
    startup.mark("framework")
    dataset = load_dataset(spec.data, image=image_input(spec.model, spec.data), task=spec.task)
    startup.mark("data")
    try:
        backend.fit(spec, dataset, expected_size=expected_size)
    except preempt.Preempted as stop:
        print(f"hvdtrain: {stop}; exiting {preempt.EXIT_PREEMPTED}: the same command resumes from here "
              "(a Slurm job is requeued)", flush=True)
        return preempt.EXIT_PREEMPTED
    return 0


def run_entry(entry: EntrySpec) -> int:
    """The user's script in this process, as `python SCRIPT ARGS` or `python -m MODULE
    ARGS` would run it: in this process, so that what the launcher's bootstrap set up
    (Horovod's variables, rank 0's rendezvous server under srun) serves it."""
    from .backends import keras_environment
    os.environ.update(keras_environment(entry.keras))  # before the script imports TensorFlow
    target = str(entry.script) if entry.script is not None else entry.module
    sys.argv = [target, *entry.args]
    try:
        if entry.script is not None:
            sys.path.insert(0, str(entry.script.resolve().parent))
            runpy.run_path(target, run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    except SystemExit as done:
        code = done.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
    return 0
