"""What every launcher module shares: the per-rank command, the templates shipped
in the package, and the shape a launcher gives the table (`Launcher`, `Verb`)."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Mapping


def rank_command(spec_path: str, overrides: list[str] = (), python: str | None = None) -> list[str]:
    """The per-rank command that every launcher runs (horovodrun, srun, mpirun).
    python: the interpreter as the ranks' machine names it (default: this one)."""
    return [python or sys.executable, "-m", "hvdtrain", "train", str(spec_path), *overrides]


def is_rank(process, arguments: list[str] | None = None) -> bool:
    """A rank of the job: `python -m hvdtrain train ...` (rank_command), not horovodrun
    nor its helpers, whose command lines hold it further on, nor the rank's loader
    processes; with `arguments`, a rank whose spec path and overrides are exactly these."""
    try:
        line = process.cmdline()
    except Exception:  # gone, or not ours to read
        return False
    if line[1:4] != ["-m", "hvdtrain", "train"] or (arguments is not None and line[4:] != list(arguments)):
        return False
    try:  # a rank's loader processes are forked from it and share its command line
        return process.parent().cmdline()[1:4] != ["-m", "hvdtrain", "train"]
    except Exception:  # an orphan: its rank is gone
        return True


def terminate_ranks(arguments: list[str] | None = None, host: str | None = None) -> list:
    """SIGTERM to this machine's ranks (those of one job, given its rank arguments; with
    `host`, those horovodrun started for that -H entry, by their HOROVOD_HOSTNAME, where
    they have one): each takes its stop path once. Returns the processes asked."""
    import psutil

    def started_for(process) -> bool:
        try:
            return process.environ().get("HOROVOD_HOSTNAME", host) == host
        except psutil.Error:
            return False
    ranks = [p for p in psutil.process_iter() if is_rank(p, arguments) and (host is None or started_for(p))]
    for rank in ranks:
        try:
            rank.terminate()
        except psutil.NoSuchProcess:
            pass
    return ranks


def template(name: str) -> str:
    """A template shipped inside the package (hvdtrain/templates/NAME)."""
    return resources.files("hvdtrain").joinpath("templates", name).read_text()


def emit(text: str, output: str | None) -> int:
    """A rendered file to OUTPUT, or to stdout."""
    if output:
        Path(output).write_text(text)
        print(f"wrote {output}", file=sys.stderr)
    else:
        print(text, end="")
    return 0


def spec_arguments(parser: argparse.ArgumentParser, overrides_help: str = "override spec values, e.g. "
                   "train.epochs=3") -> None:
    parser.add_argument("spec", help="job spec (YAML)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help=overrides_help)


@dataclass(frozen=True, kw_only=True)
class Verb:
    """A command a launcher adds: `path` ("run",) or ("render", "slurm"), its help,
    its arguments and what it does (an exit status)."""
    path: tuple[str, ...]
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    call: Callable[[argparse.Namespace], int]


@dataclass(frozen=True, kw_only=True)
class Launcher:
    """One way to start the ranks: its commands, and what a rank it started does first,
    before Horovod starts (`prepare_rank(env, start_timeout)`: the world size it started
    where Horovod learns it elsewhere, else None; nothing in a rank it did not start)."""
    name: str
    verbs: tuple[Verb, ...]
    prepare_rank: Callable[[Mapping[str, str], float], int | None] | None = None
