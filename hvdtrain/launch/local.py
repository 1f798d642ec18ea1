"""Local launch: `horovodrun --gloo` starting N ranks on this machine."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from . import rank_command
from ..errors import EXIT_FAILED, EXIT_USAGE, UserError
from ..spec import ElasticSpec, JobSpec


def horovodrun_path() -> str:
    beside = Path(sys.executable).parent / "horovodrun"
    found = str(beside) if beside.exists() else shutil.which("horovodrun")
    if not found:
        raise UserError("horovodrun not found: build and install Horovod with `hvdtrain build-horovod`")
    return found


def horovodrun_command(spec_path: str, overrides: list[str], np: int, start_timeout: int,
                       elastic: ElasticSpec | None = None) -> list[str]:
    if elastic is None:
        hosts = ["-H", f"localhost:{np}"]
    else:  # the discovery script names the hosts, now and as they change
        hosts = ["--min-np", str(elastic.min_workers), "--max-np", str(elastic.max_workers),
                 "--host-discovery-script", str(elastic.discovery.resolve())]
    return [horovodrun_path(), "-np", str(np), *hosts, "--gloo",
            "--start-timeout", str(start_timeout), *rank_command(spec_path, overrides)]


def rank_environment(spec: JobSpec) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(spec.resources.cpus_per_worker))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def launch(spec: JobSpec, spec_path: str, overrides: list[str], np: int) -> int:
    """Run the ranks with their output streaming through; return the exit code:
    0, the first failed rank's status when it is a usage error (2), else 1.

    horovodrun's own lines (not prefixed [rank]) are kept back: on failure they
    hold its traceback, replaced here by one line naming the rank that failed
    first. The ranks' own errors, prefixed [rank], are shown as they come.
    """
    elastic = spec.horovod.elastic
    if elastic is not None and not (elastic.discovery.is_file() and os.access(elastic.discovery, os.X_OK)):
        raise UserError(f"horovod.elastic.discovery: {str(elastic.discovery)!r} is not an executable file")
    cmd = horovodrun_command(spec_path, overrides, np, spec.horovod.start_timeout_seconds,
                             spec.horovod.elastic)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=rank_environment(spec))
    launcher_lines = []
    for line in proc.stdout:
        match = RANK_LINE.match(line)
        if match:
            (sys.stdout if match.group(1) == "stdout" else sys.stderr).write(line)
        else:
            launcher_lines.append(line)
    code = proc.wait()
    if code == 0:
        return 0
    # elastic: workers may fail and be replaced; the failure that ended the job is the last
    rank, status = first_failure(launcher_lines[::-1] if spec.horovod.elastic else launcher_lines)
    if rank is None:
        tail = "".join(launcher_lines[-5:]).rstrip()
        print(f"hvdtrain: training failed: horovodrun exited with status {code}\n{tail}", file=sys.stderr)
        return EXIT_FAILED
    # a signal shows as a negative status, or as 128 + signal from the shell horovodrun uses
    killed_by = -status if status < 0 else status - 128 if 128 < status <= 128 + 64 else None
    if killed_by:
        how = f"was killed by signal {killed_by} ({signal_name(killed_by)}) on localhost"
        where = "its last lines are above"
    else:
        how, where = f"exited with status {status}", "its error is above"
    print(f"hvdtrain: training failed: rank {rank} {how} ({where}, in lines starting [{rank}])",
          file=sys.stderr)
    return EXIT_USAGE if status == EXIT_USAGE else EXIT_FAILED


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown signal"


RANK_LINE = re.compile(r"^\[\d+\]<(stdout|stderr)>:")
FAILED_PROCESS = re.compile(r"Process (\d+) exit with status code (-?\d+)")


def first_failure(launcher_lines: list[str]) -> tuple[int | None, int | None]:
    for line in launcher_lines:
        match = FAILED_PROCESS.search(line)
        if match and match.group(2) != "0":
            return int(match.group(1)), int(match.group(2))
    return None, None
