"""The machine, its GPUs and the versions a bench report names."""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(memory / 2**30, 1),
            "os": platform.platform()}


def gpu_names() -> list[str]:
    try:
        import torch
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except (ImportError, RuntimeError, AssertionError):  # no CUDA build or driver
        return []


def versions() -> dict[str, str | None]:
    from ..horovod_build.build import installed_version, mpi_version
    return {"python": platform.python_version(), "torch": installed_version("torch"),
            "tensorflow": installed_version("tensorflow", "tensorflow-cpu"),
            "horovod": installed_version("horovod"), "mpi": mpi_version()}
