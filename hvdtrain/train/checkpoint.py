"""Checkpoints: one file each, written atomically, checked by hash on load.

Layout: a magic line, one JSON header line (epoch, spec, payload sha256 and
length, free-form metadata) and the backend's payload bytes. A file is only
ever seen complete: it is written to a temporary name, flushed to disk and
renamed. Loading skips, with a warning, any file that fails its checks.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import WriteError

MAGIC = b"HVDTRAIN-CHECKPOINT 1\n"
# epoch-000003.ckpt: after 3 epochs; epoch-000003-step-000120.ckpt: and 120 steps of the 4th
BEST = "best.ckpt"
NAME = re.compile(r"^epoch-(\d{6})(?:-step-(\d{9}))?\.ckpt$")


class CheckpointError(Exception):
    pass


@dataclass
class Checkpoint:
    epoch: int  # epochs completed
    step: int  # steps of the next epoch completed (a checkpoint within an epoch), else 0
    payload: bytes
    meta: dict[str, Any]
    path: Path


def checkpoint_path(directory: Path, epoch: int, step: int = 0) -> Path:
    return Path(directory) / (f"epoch-{epoch:06d}-step-{step:09d}.ckpt" if step else f"epoch-{epoch:06d}.ckpt")


def save(directory: Path, epoch: int, payload: bytes, meta: dict[str, Any], keep_last: int,
         step: int = 0) -> Path:
    """Write the checkpoint after `epoch` epochs (and `step` steps of the next)
    atomically, then drop all but the newest keep_last."""
    target = write(checkpoint_path(directory, epoch, step), epoch, payload, meta, step)
    for old in list_checkpoints(directory)[:-keep_last]:
        old.unlink(missing_ok=True)
    return target


def save_best(directory: Path, epoch: int, payload: bytes, meta: dict[str, Any]) -> Path:
    """The best epoch's weights, kept apart from the rotation (and never resumed from)."""
    return write(Path(directory) / BEST, epoch, payload, meta)


def load_best(directory: Path) -> Checkpoint | None:
    path = Path(directory) / BEST
    try:
        return load(path) if path.is_file() else None
    except CheckpointError as err:
        print(f"hvdtrain: not exporting the best epoch: {err}", file=sys.stderr)
        return None


def write(target: Path, epoch: int, payload: bytes, meta: dict[str, Any], step: int = 0) -> Path:
    """One checkpoint file, written atomically (temporary name, fsync, rename)."""
    directory = target.parent
    directory.mkdir(parents=True, exist_ok=True)
    header = dict(meta, epoch=epoch, step=step, sha256=hashlib.sha256(payload).hexdigest(),
                  length=len(payload))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".partial-", dir=directory)
        with os.fdopen(fd, "wb") as handle:
            handle.write(MAGIC)
            handle.write(json.dumps(header, sort_keys=True).encode() + b"\n")
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        _fsync_dir(directory)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise write_error(target, err) from None
        raise
    return target


def write_error(target: Path, err: OSError) -> WriteError:
    """Writing `target` failed: what failed, and the checkpoint a rerun resumes from."""
    kept = [p for p in list_checkpoints(target.parent) if p != target]
    try:
        free = f", {shutil.disk_usage(target.parent).free / 2**20:.1f} MiB free there"
    except OSError:
        free = ""
    return WriteError(f"could not write checkpoint {target}: {err.strerror or err}{free}; nothing partial was "
                      f"left; the last good checkpoint is {kept[-1] if kept else 'none (no checkpoint yet)'}: "
                      f"make room or point checkpoint.dir elsewhere, and the same command resumes from it")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files, oldest first (by epoch, then step within it)."""
    if not Path(directory).is_dir():
        return []
    found = [(NAME.match(p.name), p) for p in Path(directory).iterdir()]
    return [p for _, p in sorted(((int(m[1]), int(m[2] or 0)), p) for m, p in found if m)]


def load(path: Path) -> Checkpoint:
    data = Path(path).read_bytes()
    if not data.startswith(MAGIC):
        raise CheckpointError(f"{path}: not an hvdtrain checkpoint")
    end = data.find(b"\n", len(MAGIC))
    try:
        header = json.loads(data[len(MAGIC):end])
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: unreadable header") from None
    payload = data[end + 1:]
    if len(payload) != header.get("length"):
        raise CheckpointError(f"{path}: truncated ({len(payload)} of {header.get('length')} bytes)")
    if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise CheckpointError(f"{path}: integrity hash mismatch (file altered or corrupt)")
    meta = {k: v for k, v in header.items() if k not in ("epoch", "step", "sha256", "length")}
    return Checkpoint(int(header["epoch"]), int(header.get("step", 0)), payload, meta, Path(path))


def latest_valid(directory: Path, warn=lambda msg: print(msg, file=sys.stderr)) -> Checkpoint | None:
    """The newest checkpoint that passes its checks; broken ones are reported."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return load(path)
        except (CheckpointError, OSError) as err:
            warn(f"hvdtrain: skipping checkpoint: {err}")
    return None
