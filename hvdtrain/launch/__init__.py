"""Launchers: each turns a spec into a command line and environment that
start the per-rank command once per rank. They build commands and files;
what runs inside a rank is `hvdtrain.rank`."""
from __future__ import annotations

import sys
from importlib import resources


def rank_command(spec_path: str, overrides: list[str] = (), python: str | None = None) -> list[str]:
    """The per-rank command that every launcher runs (horovodrun, srun, mpirun).
    python: the interpreter as the ranks' machine names it (default: this one)."""
    return [python or sys.executable, "-m", "hvdtrain", "train", str(spec_path), *overrides]


def template(name: str) -> str:
    """A template shipped inside the package (hvdtrain/templates/NAME)."""
    return resources.files("hvdtrain").joinpath("templates", name).read_text()
