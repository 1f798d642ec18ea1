import dataclasses
import importlib.util
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from hvdtrain.horovod_build import build
from hvdtrain.horovod_build.fixes import FIXES, Fix, FixError, NewFile, apply_fixes, fixes_digest
from tests.conftest import missing


@pytest.fixture(scope="module")
def sdist_tree(tmp_path_factory):
    """The real pinned sdist, as the build uses it (downloaded once into the cache)."""
    cache = build.cache_root()
    sdist = cache / "sdist" / build.SDIST_NAME
    if not sdist.exists():
        missing(f"{sdist} not cached yet: scripts/setup.sh downloads it")
    root = tmp_path_factory.mktemp("sdist")
    with tarfile.open(sdist) as tar:
        tar.extractall(root, filter="data")
    return root / f"horovod-{build.HOROVOD_VERSION}"


def test_every_fix_applies_exactly_and_changes_its_file(sdist_tree):
    before = {f.path: (sdist_tree / f.path).read_text() if (sdist_tree / f.path).exists() else None
              for f in FIXES}
    assert [f.path for f in FIXES if isinstance(f, NewFile) and before[f.path] is not None] == []
    lines = apply_fixes(sdist_tree)
    assert len(lines) == len(FIXES)
    for fix in FIXES:
        text = (sdist_tree / fix.path).read_text()
        assert fix.new in text and text != before[fix.path]
    compile((sdist_tree / "horovod/_keras/keras3.py").read_text(), "keras3.py", "exec")
    cmake = (sdist_tree / "third_party/gloo/CMakeLists.txt").read_text()
    assert "cmake_minimum_required(VERSION 2.8" not in cmake


def test_the_sdist_beside_offline_wheels_is_taken_and_checked(tmp_path, monkeypatch):
    """A machine without a package index keeps the sdist in HVDTRAIN_WHEELS: no download."""
    cached = build.cache_root() / "sdist" / build.SDIST_NAME
    if not cached.exists():
        missing(f"{cached} not cached yet: scripts/setup.sh downloads it")
    wheels, cache = tmp_path / "wheels", tmp_path / "cache"
    wheels.mkdir()
    (wheels / build.SDIST_NAME).write_bytes(cached.read_bytes())
    monkeypatch.setenv("HVDTRAIN_WHEELS", str(wheels))
    monkeypatch.setattr(build, "run", lambda *a, **k: pytest.fail("downloaded instead"))
    taken = build.fetch_sdist(cache, log=None)
    assert taken == cache / "sdist" / build.SDIST_NAME and taken.read_bytes() == cached.read_bytes()
    (wheels / build.SDIST_NAME).write_bytes(b"not the sdist")
    taken.unlink()
    with pytest.raises(build.BuildError, match="has sha256 .*, expected 92a43f5a"):
        build.fetch_sdist(cache, log=None)


def test_a_horovodrun_launch_does_not_import_tensorflow_to_check_the_build(tmp_path):
    """horovodrun's check that Horovod has Gloo asks torch's extension first (a fix): every
    launch was 3.4 s longer importing TensorFlow in a child process."""
    from hvdtrain.launch.local import horovodrun_path
    if importlib.util.find_spec("torch") is None:
        missing("torch is not installed: the check answers from TensorFlow")
    result = subprocess.run([horovodrun_path(), "-np", "1", "-H", "localhost:1", "--gloo", sys.executable, "-c", "pass"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.count("|") == 2}
    assert "horovod.runner.launch" in imported and "torch" in imported  # the profile is read
    assert "tensorflow" not in imported


def test_a_fix_that_does_not_match_stops_the_build(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(FixError, match="expected its text 1 time"):
        apply_fixes(tmp_path, (Fix("a.txt", "absent", "x", "test"),))
    with pytest.raises(FixError, match="missing from the sdist"):
        apply_fixes(tmp_path, (Fix("b.txt", "hello", "x", "test"),))
    with pytest.raises(FixError, match="already exists"):
        apply_fixes(tmp_path, (NewFile("a.txt", "keras3.py", "test"),))


def test_cache_key_covers_versions_mpi_and_fixes():
    plan = build.BuildPlan(torch="2.13.0", tensorflow=None, mpi="openmpi4.1.4", python="cp311",
                           fixes=fixes_digest())
    keys = {plan.key,
            dataclasses.replace(plan, torch="2.14.1").key,
            dataclasses.replace(plan, tensorflow="2.21.0").key,
            dataclasses.replace(plan, mpi=None).key,
            dataclasses.replace(plan, fixes=fixes_digest(FIXES[:-1])).key}
    assert len(keys) == 5


def test_build_switches_follow_what_is_installed():
    env = build.BuildPlan(torch="2.13.0", tensorflow=None, mpi=None, python="cp311", fixes="abc").environment()
    assert env["HOROVOD_WITH_PYTORCH"] == "1" and env["HOROVOD_WITHOUT_TENSORFLOW"] == "1"
    assert env["HOROVOD_WITHOUT_MPI"] == "1" and env["HOROVOD_WITH_GLOO"] == "1"
    assert env["CMAKE_POLICY_VERSION_MINIMUM"] == "3.5"
    env = build.BuildPlan(torch=None, tensorflow="2.21.0", mpi="openmpi4.1.4", python="cp311",
                          fixes="abc").environment()
    assert env["HOROVOD_WITH_TENSORFLOW"] == "1" and env["HOROVOD_WITHOUT_PYTORCH"] == "1"
    assert env["HOROVOD_WITH_MPI"] == "1"


def test_gpu_build_is_chosen_from_cuda_torch_nvcc_and_nccl(monkeypatch):
    monkeypatch.delenv("HOROVOD_GPU_OPERATIONS", raising=False)
    monkeypatch.delenv("HOROVOD_NCCL_HOME", raising=False)
    monkeypatch.setattr(build, "torch_cuda", lambda: "13.0")
    monkeypatch.setattr(build, "nvcc", lambda: "/usr/local/cuda/bin/nvcc")
    monkeypatch.setattr(build, "pip_nccl", lambda: "/site/nvidia/nccl")
    assert build.gpu_operations() == "NCCL"
    monkeypatch.setattr(build, "pip_nccl", lambda: None)
    assert build.gpu_operations() is None  # no NCCL
    monkeypatch.setattr(build, "pip_nccl", lambda: "/site/nvidia/nccl")
    monkeypatch.setattr(build, "torch_cuda", lambda: None)
    assert build.gpu_operations() is None  # a CPU build of torch
    monkeypatch.setenv("HOROVOD_GPU_OPERATIONS", "NCCL")
    assert build.gpu_operations() == "NCCL"  # set by hand wins
    monkeypatch.setenv("HOROVOD_GPU_OPERATIONS", "")
    monkeypatch.setattr(build, "torch_cuda", lambda: "13.0")
    assert build.gpu_operations() is None


def test_pip_nccl_gets_the_libnccl_link_horovod_looks_for(tmp_path, monkeypatch):
    for name in ("HOROVOD_NCCL_HOME", "HOROVOD_NCCL_LIB", "HOROVOD_NCCL_INCLUDE"):
        monkeypatch.delenv(name, raising=False)
    nccl = tmp_path / "site" / "nvidia" / "nccl"
    (nccl / "lib").mkdir(parents=True)
    (nccl / "include").mkdir()
    (nccl / "lib" / "libnccl.so.2").write_bytes(b"\x7fELF")
    (nccl / "include" / "nccl.h").write_text("#define NCCL_MAJOR 2\n")
    monkeypatch.setattr(sys, "path", [str(tmp_path / "site"), *sys.path])
    assert build.pip_nccl() == nccl.resolve()
    env = build.nccl_environment(tmp_path / "cache")
    link = build.Path(env["HOROVOD_NCCL_LIB"]) / "libnccl.so"
    assert link.is_symlink() and link.resolve() == (nccl / "lib" / "libnccl.so.2").resolve()
    assert env["HOROVOD_NCCL_INCLUDE"] == str(nccl.resolve() / "include")
    assert build.nccl_environment(tmp_path / "cache") == env  # a second build finds the link made
    monkeypatch.setenv("HOROVOD_NCCL_HOME", "/opt/nccl")
    assert build.nccl_environment(tmp_path / "cache") == {}  # the user's own NCCL
    plan = build.BuildPlan(torch="2.13.0", tensorflow=None, mpi=None, python="cp312", fixes="abc", gpu="NCCL")
    assert plan.environment()["HOROVOD_GPU_OPERATIONS"] == "NCCL" and "gpu-nccl" in plan.key


def test_failure_summary_picks_the_error_lines(tmp_path):
    log = tmp_path / "build.log"
    log.write_text("compiling a\ncompiling b\n/usr/bin/ld: multiple definition of `x'\n"
                   "collect2: error: ld returned 1 exit status\nmore noise\n")
    summary = build.failure_summary(log)
    assert "collect2: error: ld returned 1" in summary and "compiling a" not in summary


def test_installed_horovod_is_this_build():
    version = build.installed_version("horovod")
    if version is None:
        missing("Horovod not installed: scripts/setup.sh builds it")
    assert version == f"{build.HOROVOD_VERSION}+hvdtrain.{fixes_digest()}"


def test_doctor_shows_pytorch_and_gloo(cli):
    if build.installed_version("horovod") is None:
        missing("Horovod not installed: scripts/setup.sh builds it")
    result = cli("doctor")
    assert result.returncode == 0, result.stdout + result.stderr
    for line in ("torch:      2.13.0", "[X] PyTorch", "[X] Gloo", "Horovod's extensions"):
        assert line in result.stdout


REINIT = """
import horovod.torch as hvd, torch
for attempt in range(3):  # what an elastic reset does: shutdown, then init again
    hvd.init()
    print(int(hvd.allreduce(torch.ones(4), op=hvd.Sum).sum()))
    hvd.shutdown()
"""


@pytest.mark.parametrize("knobs", [{"HOROVOD_FUSION_THRESHOLD": "8388608", "HOROVOD_CYCLE_TIME": "2.5"},
                                   {"HOROVOD_CYCLE_TIME": "2.5"}, {"HOROVOD_FUSION_THRESHOLD": "0"}])
def test_reinit_keeps_fixed_fusion_and_cycle_knobs(knobs):
    """Horovod 0.28.1 crashed (SIGSEGV) re-initialising with both knobs fixed."""
    if build.installed_version("horovod") is None:
        missing("Horovod not installed: scripts/setup.sh builds it")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOROVOD_")}
    env.update(HOROVOD_CONTROLLER="gloo", HOROVOD_CPU_OPERATIONS="gloo")  # MPI cannot re-init
    result = subprocess.run([sys.executable, "-c", REINIT], env={**env, **knobs},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["4", "4", "4"]


def test_build_horovod_copies_the_wheel_out_for_nodes_without_compilers(cli, tmp_path):
    """The cached wheel of this environment (setup built it), copied out whole."""
    import zipfile
    result = cli("build-horovod", "--wheel-out", tmp_path / "wheels", timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    [wheel] = (tmp_path / "wheels").glob("horovod-0.28.1+hvdtrain.*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("horovod/torch/mpi_lib_v2") for n in names)
    assert any(n.startswith("horovod/tensorflow/mpi_lib") for n in names)
    assert f"wrote {wheel}" in result.stdout


def test_the_rendezvous_signature_in_cpp_is_the_one_the_server_checks(tmp_path):
    """The header the build adds to Horovod signs as hvdtrain's rendezvous server verifies
    (Python's hmac): long and short secrets, empty and binary-ish bodies, and no header
    without a secret."""
    import shutil
    from hvdtrain.launch import srun
    if shutil.which("g++") is None:
        missing("g++ not installed: the Horovod build needs it")
    header = Path(build.__file__).parent / "rendezvous_signature.h"
    (tmp_path / "sign.cc").write_text(
        f'#include "{header}"\n#include <iostream>\n'
        "int main(int argc, char** argv) {\n"
        "  for (const auto& h : horovod::common::rendezvous_signature::headers(argv[1], argv[2], argv[3]))\n"
        "    std::cout << h << std::endl;\n}\n")
    subprocess.run(["g++", "-std=c++17", "-o", tmp_path / "sign", tmp_path / "sign.cc"], check=True)
    for secret, method, path, body in [("s" * 100, "PUT", "/global/0", "10.1.2.3:4444\x01\x7f"),
                                       ("0f" * 32, "GET", "/global/rank_1", ""), ("k", "DELETE", "/x/y", "")]:
        shown = subprocess.run([tmp_path / "sign", method, f"http://10.0.0.1:20001{path}", body],
                               env={"HOROVOD_GLOO_RENDEZVOUS_SECRET": secret}, capture_output=True,
                               text=True, check=True).stdout.strip()
        assert shown == f"{srun.SIGNATURE}: {srun.signature(secret, method, path, body.encode())}"
    unsigned = subprocess.run([tmp_path / "sign", "GET", "http://h:1/a/b", ""], env={}, capture_output=True,
                              text=True, check=True).stdout
    assert unsigned == ""
