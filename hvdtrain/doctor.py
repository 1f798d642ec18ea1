"""`hvdtrain doctor`: what this environment can run, and how to fix what is missing."""
from __future__ import annotations

import json
import platform
import subprocess
import sys

from . import __version__
from .backends import FRAMEWORK_PACKAGES
from .horovod_build.build import BuildPlan, cache_root, cached_wheel, installed_version

# What `horovodrun --check-build` reports, asked of each framework's extension in its own
# process, all at once: horovodrun asks one question per process, one after another (8.9 s
# here with TensorFlow and torch installed, against the 3.6 s TensorFlow's import takes).
PROBE = """
import json, sys
hvd = __import__(sys.argv[1], fromlist=["mpi_built"])
print(json.dumps({name: bool(getattr(hvd, name + "_built")()) for name in
                  ("mpi", "gloo", "nccl", "ddl", "ccl")}))
"""
EXTENSIONS = {"PyTorch": "horovod.torch", "TensorFlow": "horovod.tensorflow"}
OPERATIONS = (("MPI", "mpi"), ("Gloo", "gloo"), ("NCCL", "nccl"), ("DDL", "ddl"), ("CCL", "ccl"))


def check_build(frameworks: list[str]) -> tuple[list[str], dict[str, bool]]:
    """Each installed framework's Horovod extension loaded, and what it was built with:
    (report lines, {"PyTorch": True, "Gloo": True, ...})."""
    probes = {name: subprocess.Popen([sys.executable, "-c", PROBE, EXTENSIONS[name]], text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
              for name in frameworks}
    found: dict[str, bool] = {}
    built: dict[str, bool] = {}
    failures = []
    for name, proc in probes.items():
        out, err = proc.communicate(timeout=120)
        found[name] = proc.returncode == 0
        if found[name]:
            for key, value in json.loads(out.splitlines()[-1]).items():
                built[key] = built.get(key, False) or value
        else:
            failures.append(f"    {EXTENSIONS[name]}: {(err.strip().splitlines() or ['no output'])[-1]}")
    mark = lambda ok: "X" if ok else " "  # noqa: E731
    lines = ["Horovod's extensions (each loaded in its own process):"]
    lines += [f"    [{mark(found.get(name))}] {name}" for name in EXTENSIONS]
    lines += failures
    lines.append("  built with:")
    lines += [f"    [{mark(built.get(key))}] {label}" for label, key in OPERATIONS]
    return lines, {**found, **{label: built.get(key, False) for label, key in OPERATIONS}}


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
    if not horovod:
        fixes.append("Horovod missing: hvdtrain build-horovod")
        return lines, fixes
    installed = {"PyTorch": plan.torch, "TensorFlow": plan.tensorflow}
    build_lines, built = check_build([name for name, version in installed.items() if version])
    lines += [""] + build_lines
    wanted = {**installed, "Gloo": True, "MPI": plan.mpi}
    for name, present_here in wanted.items():
        if present_here and not built.get(name):
            fixes.append(f"Horovod was built without {name}: hvdtrain build-horovod --force")
    return lines, fixes
