"""Checkpoints: one file each, written atomically, checked by hash on load.

Layout: a magic line, one JSON header line (epoch, spec, payload sha256 and
length, free-form metadata) and the backend's payload bytes. A file is only
ever seen complete: it is written to a temporary name, flushed to disk and
renamed. In object storage (checkpoint.dir a URL), which has no rename, a
checkpoint is one object written whole, then a commit marker beside it
(`<name>.committed`, holding its hash); only checkpoints with their marker are
listed, and pruning removes the marker first. Loading skips, with a warning, any
file that fails its checks.
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

from .. import storage
from ..errors import WriteError

MAGIC = b"HVDTRAIN-CHECKPOINT 1\n"
# epoch-000003.ckpt: after 3 epochs; epoch-000003-step-000120.ckpt: and 120 steps of the 4th
BEST = "best.ckpt"
NAME = re.compile(r"^epoch-(\d{6})(?:-step-(\d{9}))?\.ckpt$")
COMMITTED = ".committed"  # in object storage: the marker that makes a checkpoint visible
Location = Path | str  # a directory, or a URL (train.storage)


class CheckpointError(Exception):
    pass


@dataclass
class Checkpoint:
    epoch: int  # epochs completed
    step: int  # steps of the next epoch completed (a checkpoint within an epoch), else 0
    payload: bytes
    meta: dict[str, Any]
    path: Location


def checkpoint_path(directory: Location, epoch: int, step: int = 0) -> Location:
    return storage.join(directory, f"epoch-{epoch:06d}-step-{step:09d}.ckpt" if step else f"epoch-{epoch:06d}.ckpt")


def save(directory: Location, epoch: int, payload: bytes, meta: dict[str, Any], keep_last: int,
         step: int = 0) -> Location:
    """Write the checkpoint after `epoch` epochs (and `step` steps of the next)
    atomically, then drop all but the newest keep_last."""
    target = write(checkpoint_path(directory, epoch, step), epoch, payload, meta, step)
    for old in list_checkpoints(directory)[:-keep_last]:
        remove(old)
    return target


def save_best(directory: Location, epoch: int, payload: bytes, meta: dict[str, Any]) -> Location:
    """The best epoch's weights, kept apart from the rotation (and never resumed from)."""
    return write(storage.join(directory, BEST), epoch, payload, meta)


def load_best(directory: Location) -> Checkpoint | None:
    path = storage.join(directory, BEST)
    try:
        return load(path) if exists(path) else None
    except (CheckpointError, OSError) as err:
        print(f"hvdtrain: not exporting the best epoch: {err}", file=sys.stderr)
        return None


def exists(path: Location) -> bool:
    if storage.is_url(path):
        fs, where = storage.filesystem(path)
        return fs.isfile(where) and fs.isfile(where + COMMITTED)
    return Path(path).is_file()


def remove(path: Location) -> None:
    if storage.is_url(path):
        fs, where = storage.filesystem(path)
        fs.rm_file(where + COMMITTED)  # invisible first, then gone
        fs.rm_file(where)
    else:
        Path(path).unlink(missing_ok=True)


def header_line(epoch: int, payload: bytes, meta: dict[str, Any], step: int) -> tuple[bytes, str]:
    """A checkpoint's header line (after its magic line, before its payload) and the
    payload's hash."""
    digest = hashlib.sha256(payload).hexdigest()
    header = dict(meta, epoch=epoch, step=step, sha256=digest, length=len(payload))
    return json.dumps(header, sort_keys=True).encode() + b"\n", digest


def write(target: Location, epoch: int, payload: bytes, meta: dict[str, Any], step: int = 0) -> Location:
    """One checkpoint file, written atomically (temporary name, fsync, rename), or one
    object and then its commit marker."""
    header, digest = header_line(epoch, payload, meta, step)
    if storage.is_url(target):
        return write_object(target, header, payload, digest)
    directory = target.parent
    directory.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".partial-", dir=directory)
        with os.fdopen(fd, "wb") as handle:
            handle.write(MAGIC)
            handle.write(header)
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


def write_object(target: str, header: bytes, payload: bytes, digest: str) -> str:
    """A checkpoint in object storage: a marker of the same name withdrawn first, the
    object uploaded, then its commit marker; a failure removes what was written and
    names the last committed checkpoint. Until its marker exists no reader lists it,
    whatever the store shows of an upload cut short."""
    fs, where = storage.filesystem(target)
    try:
        if fs.exists(where + COMMITTED):
            fs.rm_file(where + COMMITTED)
        with fs.open(where, "wb") as handle:
            handle.write(MAGIC)
            handle.write(header)
            handle.write(payload)
        fs.pipe_file(where + COMMITTED, digest.encode())
    except Exception as err:  # noqa: BLE001 -- each store's library raises its own
        for leftover in (where + COMMITTED, where):
            try:
                fs.rm_file(leftover)
            except Exception:  # noqa: BLE001 -- not there, or the store is unreachable
                pass
        kept = [p for p in list_checkpoints(target.rsplit("/", 1)[0]) if p != target] if not isinstance(
            err, PermissionError) else []
        raise WriteError(f"could not write checkpoint {target}: {storage.describe(err)}; the last committed "
                         f"checkpoint is {kept[-1] if kept else 'none found'}: the same command resumes from "
                         "it") from None
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


def list_checkpoints(directory: Location) -> list[Location]:
    """Checkpoint files (in object storage: those committed), oldest first (by epoch,
    then step within it)."""
    if storage.is_url(directory):
        fs, where = storage.filesystem(directory)
        try:
            names = {n.rsplit("/", 1)[-1] for n in fs.ls(where, detail=False, refresh=True)}
        except FileNotFoundError:
            return []
        found = [(NAME.match(n), storage.join(directory, n)) for n in names if n + COMMITTED in names]
    else:
        if not Path(directory).is_dir():
            return []
        found = [(NAME.match(p.name), p) for p in Path(directory).iterdir()]
    return [p for _, p in sorted(((int(m[1]), int(m[2] or 0)), p) for m, p in found if m)]


def read_bytes(path: Location) -> bytes:
    if storage.is_url(path):
        fs, where = storage.filesystem(path)
        return fs.cat_file(where)
    return Path(path).read_bytes()


def load(path: Location) -> Checkpoint:
    data = read_bytes(path)
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
    return Checkpoint(int(header["epoch"]), int(header.get("step", 0)), payload, meta,
                      path if storage.is_url(path) else Path(path))


def latest_valid(directory: Location, warn=lambda msg: print(msg, file=sys.stderr)) -> Checkpoint | None:
    """The newest checkpoint that passes its checks; broken ones are reported."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return load(path)
        except (CheckpointError, OSError) as err:
            warn(f"hvdtrain: skipping checkpoint: {err}")
    return None
