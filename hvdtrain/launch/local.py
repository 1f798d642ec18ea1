"""Local launch: `horovodrun --gloo` starting N ranks on this machine."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from ..errors import UserError
from ..spec import JobSpec


def horovodrun_path() -> str:
    beside = Path(sys.executable).parent / "horovodrun"
    found = str(beside) if beside.exists() else shutil.which("horovodrun")
    if not found:
        raise UserError("horovodrun not found: build and install Horovod with `hvdtrain build-horovod`")
    return found


def rank_command(spec_path: str, overrides: list[str]) -> list[str]:
    """The per-rank entry point that every launcher runs."""
    return [sys.executable, "-m", "hvdtrain", "train", spec_path, *overrides]


def horovodrun_command(spec_path: str, overrides: list[str], np: int) -> list[str]:
    return [horovodrun_path(), "-np", str(np), "-H", f"localhost:{np}", "--gloo",
            *rank_command(spec_path, overrides)]


def rank_environment(spec: JobSpec) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(spec.resources.cpus_per_worker))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def launch(spec: JobSpec, spec_path: str, overrides: list[str], np: int) -> int:
    """Run the ranks; rank output streams through. Returns horovodrun's exit code.

    horovodrun reports a failed rank with a Python traceback of its own; that
    traceback is dropped (the rank's own error, prefixed [rank], is kept) and
    replaced by one line naming the failure.
    """
    cmd = horovodrun_command(spec_path, overrides, np)
    proc = subprocess.Popen(cmd, stdout=sys.stdout, stderr=subprocess.PIPE, text=True,
                            env=rank_environment(spec))
    launcher_lines = []
    for line in proc.stderr:
        if line.startswith("[") or not launcher_lines and not line.startswith("Traceback"):
            sys.stderr.write(line)
        else:
            launcher_lines.append(line)
    code = proc.wait()
    if code != 0:
        reason = next((ln.strip() for ln in reversed(launcher_lines) if ln.strip()), "")
        print(f"hvdtrain: training failed (horovodrun exit {code}). {reason}".rstrip(), file=sys.stderr)
    return code
