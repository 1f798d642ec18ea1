"""The project's compatibility fixes to Horovod 0.28.1's sdist.

Each fix is one exact text edit with the reason it is needed. A fix whose
``old`` text is not found exactly ``count`` times stops the build: the sdist
is pinned by hash, so a mismatch means the fix list itself is wrong.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Fix:
    path: str  # relative to the unpacked sdist
    old: str
    new: str
    why: str
    count: int = 1


FIXES: tuple[Fix, ...] = (
    Fix(
        path="third_party/gloo/CMakeLists.txt",
        old="cmake_minimum_required(VERSION 2.8.12 FATAL_ERROR)",
        new="cmake_minimum_required(VERSION 3.5 FATAL_ERROR)",
        why="CMake >= 4 removed compatibility with versions < 3.5 and refuses "
            "gloo's old minimum; nothing in gloo relies on pre-3.5 policies.",
    ),
    Fix(
        path="third_party/flatbuffers/CMakeLists.txt",
        old="cmake_minimum_required(VERSION 2.8.12)",
        new="cmake_minimum_required(VERSION 3.5)",
        why="Same CMake >= 4 minimum-version refusal as gloo.",
    ),
    Fix(
        path="CMakeLists.txt",
        old="set(CMAKE_CXX_STANDARD 14)",
        new="set(CMAKE_CXX_STANDARD 17)",
        why="gloo and Horovod's core must share the C++ standard of the torch "
            "extension that links them: built as C++14, gloo's store.cc defines "
            "Store::kDefaultTimeout out of line while C++17 code emits it inline, "
            "and the link fails with a multiple definition.",
    ),
    Fix(
        path="horovod/torch/CMakeLists.txt",
        old='if(NOT Pytorch_VERSION VERSION_LESS "1.5.0")\n    set(CMAKE_CXX_STANDARD 14)\nendif()',
        new='if(NOT Pytorch_VERSION VERSION_LESS "2.1.0")\n    set(CMAKE_CXX_STANDARD 17)\n'
            'elseif(NOT Pytorch_VERSION VERSION_LESS "1.5.0")\n    set(CMAKE_CXX_STANDARD 14)\nendif()',
        why="PyTorch >= 2.1 headers require C++17; Horovod asks for C++14.",
    ),
    Fix(
        path="horovod/tensorflow/CMakeLists.txt",
        old='list(APPEND TF_SOURCES "${PROJECT_SOURCE_DIR}/horovod/tensorflow/xla_mpi_ops.cc")',
        new='if(EXISTS "${Tensorflow_INCLUDE_DIRS}/highwayhash")\n'
            '    list(APPEND TF_SOURCES "${PROJECT_SOURCE_DIR}/horovod/tensorflow/xla_mpi_ops.cc")\n'
            'else()\n'
            '    message(STATUS "TensorFlow ships no highwayhash headers: building without the optional XLA ops")\n'
            'endif()',
        why="TensorFlow >= 2.16 ships no highwayhash headers, which xla_mpi_ops.cc "
            "includes; the XLA ops are optional, so they are built only where possible.",
    ),
)


def fixes_digest(fixes: tuple[Fix, ...] = FIXES) -> str:
    """A short hash of the fix list: part of the wheel cache key."""
    payload = json.dumps([asdict(f) for f in fixes], sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()[:12]


class FixError(RuntimeError):
    pass


def apply_fixes(source_root: Path, fixes: tuple[Fix, ...] = FIXES) -> list[str]:
    """Apply every fix in place; return one line per fix for the build log."""
    applied = []
    for fix in fixes:
        target = source_root / fix.path
        if not target.is_file():
            raise FixError(f"fix target {fix.path} is missing from the sdist")
        text = target.read_text()
        found = text.count(fix.old)
        if found != fix.count:
            raise FixError(
                f"fix for {fix.path} expected its text {fix.count} time(s), found {found}: "
                f"the sdist differs from the one the fixes were written for")
        target.write_text(text.replace(fix.old, fix.new))
        applied.append(f"{fix.path}: {fix.why}")
    return applied
