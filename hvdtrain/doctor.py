"""`hvdtrain doctor`: what this environment can run, and how to fix what is missing."""
from __future__ import annotations

import platform
import subprocess
import sys

from . import __version__
from .backends import FRAMEWORK_PACKAGES
from .horovod_build.build import BuildPlan, cache_root, cached_wheel, installed_version
from .launch.local import horovodrun_path
from .errors import UserError


def check_build() -> str | None:
    """horovodrun --check-build's report, or None when Horovod is not installed."""
    try:
        path = horovodrun_path()
    except UserError:
        return None
    proc = subprocess.run([path, "--check-build"], capture_output=True, text=True, timeout=120)
    return proc.stdout.strip() or proc.stderr.strip()


def report() -> tuple[list[str], list[str]]:
    """(lines to print, problems to fix)."""
    plan = BuildPlan.detect()
    lines = [f"hvdtrain {__version__}, Python {platform.python_version()} ({sys.executable})"]
    fixes = []
    lines.append(f"torch:      {plan.torch or 'not installed'}")
    if not plan.torch:
        fixes.append(f"torch missing: pip install {FRAMEWORK_PACKAGES['torch']}, then hvdtrain build-horovod")
    lines.append(f"tensorflow: {plan.tensorflow or 'not installed (optional)'}")
    lines.append(f"MPI:        {plan.mpi or 'not found (optional; Gloo works without it)'}")
    if not plan.mpi:
        fixes.append("no MPI compiler: apt-get install openmpi-bin libopenmpi-dev, "
                     "then hvdtrain build-horovod (adds the MPI controller)")
    horovod = installed_version("horovod")
    lines.append(f"horovod:    {horovod or 'not installed'}")
    wheel = cached_wheel(plan, cache_root())
    lines.append(f"wheel cache: {wheel or 'no wheel for this environment in ' + str(cache_root())}")
    build = check_build() if horovod else None
    if build is None:
        fixes.append("Horovod missing: hvdtrain build-horovod")
    else:
        lines += ["", "horovodrun --check-build:", build]
        wanted = {"PyTorch": plan.torch, "TensorFlow": plan.tensorflow, "Gloo": True, "MPI": plan.mpi}
        for name, present_here in wanted.items():
            if present_here and f"[X] {name}" not in build:
                fixes.append(f"Horovod was built without {name}: hvdtrain build-horovod --force")
    return lines, fixes
