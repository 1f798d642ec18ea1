"""An image folder's list of files, built and checked once, then reused while the
folder is unchanged: by every rank of a machine (one builds it under a lock, the
others read it) and by later runs.

The index records every directory under the root with its modification time: a
file added, removed or renamed changes its directory's time, so a stale index is
seen with one `stat` per directory (a thousand for ImageNet) instead of a listing
and a decode of every file. Each file is checked (header, PNG checksums, a JPEG
decoded) when the index is built; a file changed in place later is named when a
loader reads it. The index lives in $HVDTRAIN_CACHE/index (default
~/.cache/hvdtrain/index), keyed by the folder's absolute path; `hvdtrain index
DIR` writes it beside the data instead (DIR/.hvdtrain-index.json), where every
node of a cluster's shared filesystem finds it.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterator

from ..horovod_build.build import cache_root
from ..spec import IMAGE_SUFFIXES

VERSION = 1
BESIDE = ".hvdtrain-index.json"  # hidden: not listed as data


def cache_path(root: Path) -> Path:
    return cache_root() / "index" / f"{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:24]}.json"


def image_files(root: Path, check: Callable[[list[Path]], None]) -> dict[str, list[str]]:
    """{directory relative to root ("" for root): its image files' names, sorted}, for
    every directory under root (hidden ones left out); `check` is called with every
    file when the index is (re)built and raises on a file that cannot be used."""
    root = Path(root)
    path = cache_path(root)
    for found in (read(root / BESIDE), read(path)):
        if found is not None and fresh(root, found):
            return found["files"]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path.with_suffix(".lock"), "a")
    except OSError:  # a cache that cannot be written (a read-only home): list and check uncached
        return checked_build(root, check)["files"]
    with handle, exclusive(handle):  # the machine's other ranks wait here, then read it
        index = read(path)
        if index is not None and fresh(root, index):
            return index["files"]
        index = checked_build(root, check)
        written = path.with_suffix(f".{os.getpid()}.tmp")
        written.write_text(json.dumps(index))
        written.replace(path)
    return index["files"]


def write_beside(root: Path, check: Callable[[list[Path]], None]) -> int:
    """Build and check the index of root and write it into root (`hvdtrain index`); the
    count of image files. The file is made before the listing and then filled in
    place, so that its own entry does not make the index stale."""
    target = Path(root) / BESIDE
    target.touch()
    try:
        index = checked_build(Path(root), check)
    except BaseException:
        target.unlink()
        raise
    with open(target, "r+") as handle:
        handle.truncate()
        handle.write(json.dumps(index))
    return sum(len(names) for names in index["files"].values())


def checked_build(root: Path, check: Callable[[list[Path]], None]) -> dict:
    """A new index of root, once `check` has taken every file it lists."""
    index = build(root)
    check([root / d / name for d, names in index["files"].items() for name in names])
    return index


def build(root: Path) -> dict:
    dirs: dict[str, int] = {}
    files: dict[str, list[str]] = {}
    pending = [""]
    while pending:
        rel = pending.pop()
        where = root / rel
        dirs[rel] = where.stat().st_mtime_ns
        names = []
        with os.scandir(where) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    pending.append(f"{rel}/{entry.name}" if rel else entry.name)
                elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
                    names.append(entry.name)
        files[rel] = sorted(names)
    return {"version": VERSION, "root": str(root.resolve()), "dirs": dirs, "files": files}


def fresh(root: Path, index: dict) -> bool:
    """The folder still holds what the index lists: every directory is there with the
    modification time recorded (a file added or removed changes it)."""
    if index.get("version") != VERSION or index.get("root") != str(root.resolve()):
        return False
    try:
        return all((root / rel).stat().st_mtime_ns == mtime for rel, mtime in index["dirs"].items())
    except OSError:
        return False


def read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextmanager
def exclusive(handle: IO) -> Iterator[None]:
    """An exclusive lock on an open file, for the block."""
    fcntl.flock(handle, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
