"""Build Horovod 0.28.1 from its pinned PyPI sdist with the project's fixes.

The wheel is cached outside the checkout under a key made of everything that
changes the binary: Horovod version, Python, torch/TensorFlow versions, the
MPI found and the fix list's hash. A second setup only reinstalls the wheel.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .fixes import apply_fixes, fixes_digest

HOROVOD_VERSION = "0.28.1"
SDIST_NAME = f"horovod-{HOROVOD_VERSION}.tar.gz"
SDIST_SHA256 = "92a43f5a94c43907a56805bad15f19700c62ffc83b7ca483f9e104e229f67ef0"


class BuildError(RuntimeError):
    """A build failure already explained to the user in a few lines."""


def cache_root() -> Path:
    return Path(os.environ.get("HVDTRAIN_CACHE", "~/.cache/hvdtrain")).expanduser()


def installed_version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def mpi_version() -> str | None:
    """Open MPI's version when an MPI compiler is on PATH, else None."""
    if not shutil.which("mpicc") or not shutil.which("mpirun"):
        return None
    out = subprocess.run(["mpirun", "--version"], capture_output=True, text=True).stdout
    match = re.search(r"(Open MPI|MPICH|Intel\(R\) MPI)\D*([\d.]+)", out)
    if not match:
        return "mpi"
    family = {"Open MPI": "openmpi", "MPICH": "mpich"}.get(match.group(1), "intelmpi")
    return f"{family}{match.group(2)}"


def torch_cuda() -> str | None:
    """The CUDA version the installed torch was built for (None: a CPU build, or no torch).
    Read from torch/version.py, so that the build does not import torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    version_py = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    match = re.search(r"^cuda(?:: \S+)? = '([\d.]+)'", version_py.read_text(), re.M) if version_py.exists() else None
    return match.group(1) if match else None


def pip_nccl() -> Path | None:
    """The NCCL of NVIDIA's pip package (nvidia-nccl-cu12/-cu13, a dependency of torch's
    CUDA wheels): its folder holding lib/libnccl.so.2 and include/nccl.h."""
    for entry in sys.path:
        folder = Path(entry or ".") / "nvidia" / "nccl"
        if (folder / "lib" / "libnccl.so.2").exists() and (folder / "include" / "nccl.h").exists():
            return folder.resolve()
    return None


def nvcc() -> str | None:
    """CUDA's compiler: on PATH, or in CUDA_HOME / /usr/local/cuda."""
    found = shutil.which("nvcc")
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if not found and home and (Path(home) / "bin" / "nvcc").exists():
            found = str(Path(home) / "bin" / "nvcc")
    return found


def gpu_operations() -> str | None:
    """NCCL tensor operations where they can be built: torch built for CUDA, CUDA's
    compiler and NCCL present. HOROVOD_GPU_OPERATIONS set by hand wins ("" or NONE: off)."""
    chosen = os.environ.get("HOROVOD_GPU_OPERATIONS")
    if chosen is not None:
        return chosen if chosen.upper() not in ("", "NONE", "0") else None
    if torch_cuda() and nvcc() and (pip_nccl() or os.environ.get("HOROVOD_NCCL_HOME")):
        return "NCCL"
    return None


def nccl_environment(cache: Path) -> dict[str, str]:
    """HOROVOD_NCCL_LIB / _INCLUDE for the pip package's NCCL. The package ships only
    libnccl.so.2, and Horovod's CMake looks for libnccl.so: the link is made in the cache."""
    if any(os.environ.get(k) for k in ("HOROVOD_NCCL_HOME", "HOROVOD_NCCL_LIB", "HOROVOD_NCCL_INCLUDE")):
        return {}  # the user's own NCCL
    nccl = pip_nccl()
    if nccl is None:
        return {}
    lib = cache / "nccl" / hashlib.sha256(str(nccl).encode()).hexdigest()[:12]
    lib.mkdir(parents=True, exist_ok=True)
    link = lib / "libnccl.so"
    if not link.is_symlink() or link.resolve() != (nccl / "lib" / "libnccl.so.2").resolve():
        link.unlink(missing_ok=True)
        link.symlink_to(nccl / "lib" / "libnccl.so.2")
    # SHARED: link the very libnccl.so.2 that torch loads (Horovod's CMake otherwise
    # prefers a static libnccl found elsewhere on the system)
    env = {"HOROVOD_NCCL_LIB": str(lib), "HOROVOD_NCCL_INCLUDE": str(nccl / "include"),
           "HOROVOD_NCCL_LINK": "SHARED"}
    compiler = nvcc()
    if compiler and not shutil.which("nvcc"):
        env["PATH"] = f"{Path(compiler).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return env


@dataclass(frozen=True)
class BuildPlan:
    torch: str | None
    tensorflow: str | None
    mpi: str | None
    python: str
    fixes: str
    gpu: str | None = None  # HOROVOD_GPU_OPERATIONS (e.g. NCCL): GPU tensor ops, part of the key

    @classmethod
    def detect(cls) -> "BuildPlan":
        return cls(
            torch=installed_version("torch"),
            tensorflow=installed_version("tensorflow", "tensorflow-cpu"),
            mpi=mpi_version(),
            python=f"cp{sys.version_info.major}{sys.version_info.minor}",
            fixes=fixes_digest(),
            gpu=gpu_operations(),
        )

    @property
    def key(self) -> str:
        parts = [f"horovod-{HOROVOD_VERSION}", self.python, platform.machine(),
                 f"torch-{self.torch or 'none'}", f"tf-{self.tensorflow or 'none'}",
                 f"mpi-{self.mpi or 'none'}", f"fixes-{self.fixes}"]
        if self.gpu:
            parts.insert(-1, f"gpu-{self.gpu.lower()}")
        return "_".join(parts).replace("+", "-")

    def environment(self) -> dict[str, str]:
        """Horovod's build switches: every installed framework, Gloo, MPI if found."""
        env = dict(os.environ)
        for name in ("PYTORCH", "TENSORFLOW", "MXNET", "MPI", "GLOO"):
            env.pop(f"HOROVOD_WITH_{name}", None)
            env.pop(f"HOROVOD_WITHOUT_{name}", None)
        env["HOROVOD_WITH_GLOO"] = "1"
        env["HOROVOD_WITHOUT_MXNET"] = "1"
        env["HOROVOD_WITH_PYTORCH" if self.torch else "HOROVOD_WITHOUT_PYTORCH"] = "1"
        env["HOROVOD_WITH_TENSORFLOW" if self.tensorflow else "HOROVOD_WITHOUT_TENSORFLOW"] = "1"
        env["HOROVOD_WITH_MPI" if self.mpi else "HOROVOD_WITHOUT_MPI"] = "1"
        env["HOROVOD_LOCAL_VERSION"] = f"hvdtrain.{self.fixes}"
        # CMake >= 4 also refuses the old minimum versions of nested projects.
        env["CMAKE_POLICY_VERSION_MINIMUM"] = "3.5"
        env.setdefault("MAKEFLAGS", f"-j{os.cpu_count() or 2}")
        env.pop("HOROVOD_GPU_OPERATIONS", None)
        if self.gpu:
            env["HOROVOD_GPU_OPERATIONS"] = self.gpu
            env.update(nccl_environment(cache_root()))
        return env


def fetch_sdist(cache: Path, log) -> Path:
    """The pinned sdist, checked by hash: from the cache, else from $HVDTRAIN_WHEELS (a
    machine without a package index keeps it beside the wheels), else from PyPI."""
    target = cache / "sdist" / SDIST_NAME
    wheels = os.environ.get("HVDTRAIN_WHEELS")
    if not target.exists() and wheels and (Path(wheels) / SDIST_NAME).is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(wheels) / SDIST_NAME, target)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                 f"horovod=={HOROVOD_VERSION}", "-d", tmp], log, what="downloading the Horovod sdist")
            os.replace(Path(tmp) / SDIST_NAME, target)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        target.unlink()
        raise BuildError(f"{SDIST_NAME} has sha256 {digest}, expected {SDIST_SHA256}; "
                         "the corrupt download was removed, run the build again")
    return target


def run(cmd: list[str], log, what: str, env: dict[str, str] | None = None) -> None:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise BuildError(f"{what} failed (exit {proc.returncode})")


def failure_summary(log_path: Path, limit: int = 8) -> str:
    """The few log lines that say why a build failed."""
    lines = log_path.read_text(errors="replace").splitlines()
    pattern = re.compile(r"(error[: ]|CMake Error|fatal|No such file|not found)", re.IGNORECASE)
    hits = [ln.strip() for ln in lines if pattern.search(ln) and "-Werror" not in ln]
    chosen = hits[:limit] if hits else lines[-limit:]
    return "\n".join(f"    {ln[:300]}" for ln in chosen)


def build_wheel(plan: BuildPlan, cache: Path, log_path: Path) -> Path:
    with open(log_path, "w") as log, tempfile.TemporaryDirectory(prefix="hvdtrain-build-") as tmp:
        sdist = fetch_sdist(cache, log)
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        source = Path(tmp) / f"horovod-{HOROVOD_VERSION}"
        for line in apply_fixes(source):
            log.write(f"fix applied: {line}\n")
        out = Path(tmp) / "wheel"
        run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
             "-w", str(out), str(source)], log, what="building the Horovod wheel",
            env=plan.environment())
        (wheel,) = out.glob("horovod-*.whl")
        final_dir = cache / "wheels" / plan.key
        final_dir.mkdir(parents=True, exist_ok=True)
        staged = final_dir / (wheel.name + ".partial")
        shutil.copy2(wheel, staged)
        os.replace(staged, final_dir / wheel.name)
        return final_dir / wheel.name


def cached_wheel(plan: BuildPlan, cache: Path) -> Path | None:
    found = sorted((cache / "wheels" / plan.key).glob("horovod-*.whl"))
    return found[0] if found else None


def install_wheel(wheel: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--force-reinstall", str(wheel)], check=True)


def ensure_horovod(force: bool = False, install: bool = True, echo=print) -> Path:
    """Return the cached wheel for this environment, building it if needed."""
    plan = BuildPlan.detect()
    if not plan.torch and not plan.tensorflow:
        raise BuildError("neither torch nor tensorflow is installed: install one first "
                         "(pip install torch==2.13.0)")
    cache = cache_root()
    (cache / "logs").mkdir(parents=True, exist_ok=True)
    with open(cache / f"{plan.key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build per key at a time
        wheel = None if force else cached_wheel(plan, cache)
        if wheel:
            echo(f"Horovod wheel from cache: {wheel}")
        else:
            log_path = cache / "logs" / f"{plan.key}.log"
            frameworks = " + ".join(n for n, v in (("torch", plan.torch), ("tensorflow", plan.tensorflow)) if v)
            echo(f"building Horovod {HOROVOD_VERSION} for {frameworks}, Gloo"
                 f"{' + MPI (' + plan.mpi + ')' if plan.mpi else ' (no MPI compiler found)'}"
                 f"{', ' + plan.gpu + ' GPU operations' if plan.gpu else ''}; "
                 f"log: {log_path}")
            started = time.monotonic()
            try:
                wheel = build_wheel(plan, cache, log_path)
            except BuildError as err:
                raise BuildError(f"{err}\n{failure_summary(log_path)}\n  full log: {log_path}") from None
            echo(f"built {wheel.name} in {time.monotonic() - started:.0f} s")
    if install:
        install_wheel(wheel)
    return wheel
