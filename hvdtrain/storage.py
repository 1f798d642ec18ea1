"""Run files in object storage: `output` and `checkpoint.dir` may be URLs
(`s3://bucket/prefix`, `gs://...`, any filesystem fsspec knows), read and written
through fsspec with the credentials its library finds where it always looks (for
S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE and ~/.aws; an
S3-compatible server by AWS_ENDPOINT_URL_S3). `file://` URLs are local paths.

A run whose `output` is a URL writes its run directory on rank 0's node, under
the cache directory (`staging_dir`), and copies it to the URL at every epoch's end
and at the end of the run (`upload`); a rerun on any node first fetches what the
URL holds (`download`). Checkpoints are written to their URL directly (see
train/checkpoint.py).
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from .horovod_build.build import cache_root

URL = re.compile(r"^([a-z][a-z0-9+.-]*)://")
EXTRA = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}  # pip extras that bring a scheme's library


def is_url(location: object) -> bool:
    """Whether a spec location is a URL (a str: the spec keeps local locations as Paths)."""
    return isinstance(location, str) and URL.match(location) is not None


def location(value: str | Path) -> Path | str:
    """A spec location: a Path, or a URL of a filesystem fsspec can open here (else
    ValueError saying what is missing)."""
    text = str(value)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    found = URL.match(text)
    if found is None:
        return Path(text)
    scheme = found[1]
    try:
        import fsspec
    except ImportError:
        raise ValueError(f"{text}: URLs are read through fsspec, which is not installed: pip install "
                         f"'hvdtrain[{EXTRA.get(scheme, 's3')}]'") from None
    try:
        fsspec.get_filesystem_class(scheme)
    except ValueError:
        raise ValueError(f"{text}: unknown storage scheme '{scheme}://' (a local path, file://, s3://, gs:// or "
                         "another filesystem fsspec knows)") from None
    except ImportError as err:
        extra = EXTRA.get(scheme)
        hint = f"pip install 'hvdtrain[{extra}]'" if extra else "install its fsspec library"
        raise ValueError(f"{text}: {scheme}:// needs {getattr(err, 'name', None) or err}: {hint}") from None
    return text.rstrip("/")


def join(base: Path | str, *names: str) -> Path | str:
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *names])
    return Path(base).joinpath(*names)


def filesystem(url: str):
    """(fsspec filesystem, path within it) of a URL."""
    import fsspec
    return fsspec.core.url_to_fs(url)


def local_name(url: str) -> str:
    """A file name for what is kept of `url` on this node: readable, and unique by its hash."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[1])[-80:]
    return f"{slug}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


def staging_dir(url: str) -> Path:
    """Where a run whose output is `url` writes its run directory on this node."""
    return cache_root() / "runs" / local_name(url)


def describe(err: BaseException) -> str:
    """An object store's failure in a few words, with what to check."""
    if isinstance(err, PermissionError):
        return f"access denied ({err}); check the credentials (for S3: AWS_ACCESS_KEY_ID, " \
               "AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the bucket's policy"
    if isinstance(err, FileNotFoundError):
        return f"not found ({err})"
    return f"{type(err).__name__}: {err}"


def access_problem(url: str) -> str | None:
    """Why `url` cannot be written (a probe object is written and removed), or None."""
    probe = join(url, ".hvdtrain-write-test")
    try:
        fs, path = filesystem(probe)
        fs.pipe_file(path, b"0")
        fs.rm_file(path)
    except Exception as err:  # noqa: BLE001 -- each store's library raises its own
        return f"cannot write to {url}: {describe(err)}"
    return None


def read_problem(url: str) -> str | None:
    """Why nothing can be read at `url` (a missing key, bucket or permission), or None."""
    try:
        fs, path = filesystem(url)
        if not fs.exists(path):
            return f"{url} does not exist"
    except Exception as err:  # noqa: BLE001 -- each store's library raises its own
        return f"cannot read {url}: {describe(err)}"
    return None


def fetch(url: str, cache: Path, max_bytes: float) -> Path:
    """The object (or every object under the prefix) at url, in a directory of `cache`
    of its own: fetched by one process of the node at a time (a lock), again only
    where an object's size or tag changed, files gone from url removed; the local
    file (or directory) returned. More than max_bytes: an error saying so."""
    import fcntl
    import json
    import os
    fs, path = filesystem(url)
    info = fs.info(path)
    directory = info["type"] == "directory"
    found = fs.find(path, detail=True) if directory else {path: info}
    total = sum(int(i.get("size") or 0) for i in found.values())
    if total > max_bytes:
        raise ValueError(f"{url} holds {total / 1e9:.1f} GB, more than data.cache_max_gb "
                         f"({max_bytes / 1e9:g} GB) allows")
    target = cache / local_name(url)
    target.mkdir(parents=True, exist_ok=True)
    stamp = {(p[len(path):].lstrip("/") if directory else p.rsplit("/", 1)[-1]):
             [int(i.get("size") or 0), str(i.get("ETag") or i.get("etag") or i.get("mtime") or "")]
             for p, i in found.items()}
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the node's other ranks wait, then find it fetched
        manifest_path = target / ".hvdtrain-fetched.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        for remote, name in zip(found, stamp):
            local = target / name
            if manifest.get(name) != stamp[name] or not local.is_file():
                local.parent.mkdir(parents=True, exist_ok=True)
                partial = local.with_name(f".partial-{local.name}")
                fs.get_file(remote, str(partial))
                os.replace(partial, local)
        for name in set(manifest) - set(stamp):
            (target / name).unlink(missing_ok=True)
        manifest_path.write_text(json.dumps(stamp))
    return target if directory else target / next(iter(stamp))


def upload(local: Path, url: str, names: list[str] | None = None) -> None:
    """Copy the run directory's files (or those named, where they exist) to url."""
    fs, path = filesystem(url)
    files = [local / n for n in names] if names is not None else [p for p in local.rglob("*") if p.is_file()]
    for file in files:
        if file.is_file():
            fs.put_file(str(file), f"{path}/{file.relative_to(local).as_posix()}")


def download(url: str, local: Path, names: list[str]) -> None:
    """Fetch the named files of url that exist into the run directory."""
    fs, path = filesystem(url)
    local.mkdir(parents=True, exist_ok=True)
    for name in names:
        if fs.isfile(f"{path}/{name}"):
            fs.get_file(f"{path}/{name}", str(local / name))
