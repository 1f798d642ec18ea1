"""One rank of a job: what horovodrun, srun and mpirun start on every process
(`hvdtrain train SPEC`). It reads top to bottom: spec -> Horovod's environment
-> the launcher's bootstrap -> data -> the backend's `fit`."""
from __future__ import annotations

import os

from .spec import CNNSpec, HorovodSpec, load_spec


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
    from .data import load_dataset
    from .launch.srun import prepare_rank

    spec = load_spec(spec_path, overrides)
    apply_horovod_environment(spec.horovod)
    # Under srun: Horovod's rank and size from Slurm's variables (nothing elsewhere).
    expected_size = prepare_rank(os.environ, spec.horovod.start_timeout_seconds)
    backend = get_backend(spec.backend)
    dataset = load_dataset(spec.data, image=isinstance(spec.model, CNNSpec))
    backend.fit(spec, dataset, expected_size=expected_size)
    return 0
