"""Launchers: each module turns a spec into the commands or files that start the
per-rank command (`hvdtrain train SPEC`) once per rank, adds its verbs to the
`hvdtrain` command, and says what a rank it started does first. `LAUNCHERS` is
the one table that cli.py and rank.py read; a new launcher is one module and one
entry here."""
from __future__ import annotations

from . import k8s, local, slurm, trainjob
from .common import Launcher, Verb, rank_command, template

LAUNCHERS: dict[str, Launcher] = {
    "local": local.LAUNCHER,        # hvdtrain run: horovodrun here, or on -H hosts
    "slurm": slurm.LAUNCHER,        # render/submit slurm, status, logs; srun's ranks (srun.py)
    "k8s": k8s.LAUNCHER,            # render k8s: a Kubeflow MPIJob
    "trainjob": trainjob.LAUNCHER,  # render trainjob / runtime: Kubeflow Trainer v2
}


def prepare_rank(env, start_timeout: float) -> int | None:
    """In a rank, before Horovod starts: what the launcher that started it sets up."""
    for launcher in LAUNCHERS.values():
        if launcher.prepare_rank is not None:
            expected = launcher.prepare_rank(env, start_timeout)
            if expected is not None:
                return expected
    return None


__all__ = ["LAUNCHERS", "Launcher", "Verb", "prepare_rank", "rank_command", "template"]
