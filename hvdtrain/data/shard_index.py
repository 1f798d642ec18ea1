"""What WebDataset tar shards hold: each sample's key, its image's offset and size in
its shard, and its class, read once from the tar headers and kept in the cache
directory while the shard file is unchanged (its size and modification time).

WebDataset's layout: a sample is the consecutive members that share a key (the
member's path up to the first dot of its file name), one member per extension:
here an image (`jpg`, `jpeg` or `png`) and its class (`cls`, an integer as text).
The shards must be plain tar files: a member is read at its offset, which a
compressed tar does not have.
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

from ..errors import DataError
from ..horovod_build.build import cache_root

VERSION = 1
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")


def split_name(name: str) -> tuple[str, str]:
    """(key, extension) of a member: WebDataset's rule, the extension from the first dot
    of the file name on, lower-cased."""
    directory, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension.lower() if dot else ""


def read_shard(path: Path) -> list[tuple[str, str, int, int, int]]:
    """(key, image extension, offset, size, class) of each sample of one shard."""
    samples: list[tuple[str, str, int, int, int]] = []
    current: dict = {}

    def close() -> None:
        if not current:
            return
        key = current["key"]
        if "image" not in current:
            raise DataError(f"{path}: sample {key!r} has no image member ({'/'.join(IMAGE_EXTENSIONS)})")
        if "cls" not in current:
            raise DataError(f"{path}: sample {key!r} has no class member (.cls)")
        samples.append((key, *current["image"], current["cls"]))
        current.clear()

    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, extension = split_name(member.name)
                if key.rpartition("/")[2].startswith("__"):  # WebDataset's own (__key__ ...), not data
                    continue
                if current and current["key"] != key:
                    close()
                current["key"] = key
                if extension in IMAGE_EXTENSIONS:
                    current["image"] = (extension, member.offset_data, member.size)
                elif extension == "cls":
                    text = tar.extractfile(member).read().decode("utf-8", "replace").strip()
                    try:
                        current["cls"] = int(text)
                    except ValueError:
                        raise DataError(f"{path}: {member.name} holds {text[:40]!r}, not a class "
                                        "number") from None
            close()
    except (tarfile.TarError, EOFError) as err:
        raise DataError(f"{path}: not a readable uncompressed tar file ({err})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err})") from None
    if not samples:
        raise DataError(f"{path}: holds no samples (an image and a .cls member by key)")
    return samples


def shard_samples(path: Path) -> list[tuple[str, str, int, int, int]]:
    """read_shard's list, from the cache while the shard is unchanged."""
    try:
        stat = path.stat()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None
    stamp = [VERSION, str(path.resolve()), stat.st_size, stat.st_mtime_ns]
    cached = cache_root() / "index" / f"shard-{hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:24]}.json"
    try:
        found = json.loads(cached.read_text())
        if found["stamp"] == stamp:
            return [tuple(s) for s in found["samples"]]
    except (OSError, ValueError, KeyError):
        pass
    samples = read_shard(path)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        written = cached.with_suffix(f".{os.getpid()}.tmp")
        written.write_text(json.dumps({"stamp": stamp, "samples": samples}))
        written.replace(cached)
    except OSError:
        pass  # a cache that cannot be written: read again next time
    return samples
