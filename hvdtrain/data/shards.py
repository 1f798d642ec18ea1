"""WebDataset tar shards (`data.source: webdataset`): many small image files kept as
a few large ones, each image member read at its offset (`shard_index`) when a
batch needs it, decoded and transformed as an image folder's files are.

data.path: a directory of shards (as `hvdtrain shards` writes: train-*.tar, and
val-*.tar for a validation split of its own, classes.txt naming the classes), a
brace pattern (`/data/train-{000000..000146}.tar`) or a comma list. Without
val-*.tar shards the validation split is drawn from the samples, stratified, as
for an image folder. An epoch deals the shards to the ranks (`sharding`): each
rank reads whole shards but for the two at its edges, and every sample once.
"""
from __future__ import annotations

import io
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..spec import DataSpec
from .image_samples import EncodedImages, channel_statistics, image_size
from .shard_index import shard_samples
from .split import Targets, natural_key
from .types import Dataset, Preprocessing

OPEN_SHARDS = 64  # descriptors a process keeps open (ImageNet has 1,281 training shards)


class ShardSamples(EncodedImages):
    """Images inside tar shards; `groups`: the samples of each shard, which the
    sharding deals to the ranks whole."""

    def __init__(self, shards: list[Path], rows: np.ndarray, y: np.ndarray, names: list[str],
                 preprocessing, seed: int = 0, on_bad_file: str = "fail"):
        super().__init__(y, preprocessing, seed, on_bad_file)
        self.shards, self.rows, self.names = [str(s) for s in shards], rows, names  # rows: shard, offset, size
        self.files: OrderedDict[int, int] = OrderedDict()  # shard -> descriptor, this process's, most recent last
        order = np.argsort(rows[:, 0], kind="stable")
        self.groups = [g for g in np.split(order, np.flatnonzero(np.diff(rows[order, 0])) + 1) if len(g)]

    def encoded(self, i: int) -> io.BytesIO:
        shard, offset, size = (int(v) for v in self.rows[i])
        try:
            data = os.pread(self.descriptor(shard), size, offset)  # pread: no position shared across a fork
        except OSError as err:
            raise DataError(f"{self.name(i)}: cannot read ({err.strerror})") from None
        if len(data) != size:
            raise DataError(f"{self.name(i)}: the shard ends inside it (changed since it was indexed?)")
        return io.BytesIO(data)

    def name(self, i: int) -> str:
        return f"{self.shards[int(self.rows[i, 0])]}:{self.names[i]}"

    def descriptor(self, shard: int) -> int:
        """An open descriptor of the shard; the least recently used one is closed beyond
        OPEN_SHARDS (each of the loader's processes holds its own)."""
        if shard in self.files:
            self.files.move_to_end(shard)
            return self.files[shard]
        if len(self.files) >= OPEN_SHARDS:
            os.close(self.files.popitem(last=False)[1])
        self.files[shard] = os.open(self.shards[shard], os.O_RDONLY)
        return self.files[shard]


def shard_paths(path: str) -> tuple[list[Path], list[Path]]:
    """(training shards, validation shards or []) that data.path names."""
    folder = Path(path)
    if folder.is_dir():
        train = sorted(folder.glob("train-*.tar"))
        if train:
            return train, sorted(folder.glob("val-*.tar"))
        shards = sorted(folder.glob("*.tar"))
        if not shards:
            raise DataError(f"{folder}: no .tar shards in the directory")
        return shards, []
    shards = [Path(p) for p in shard_list(str(path))]
    missing = [p for p in shards if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"data.path: shard {missing[0]} does not exist{more}")
    return shards, []


def shard_list(pattern: str) -> list[str]:
    """The shards a brace pattern (`train-{000000..000146}.tar`) or comma list names, in
    order: local paths or URLs alike."""
    if "{" not in pattern and "," not in pattern:
        return [pattern]
    try:
        from braceexpand import braceexpand  # webdataset's own dependency
    except ImportError:
        raise DataError("data.path: a brace pattern or list of shards needs the webdataset package (pip "
                        "install 'hvdtrain[webdataset]'), or give the shards' directory") from None
    return [p for part in pattern.split(",") for p in braceexpand(part.strip())]


def index(shards: list[Path], first: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(rows: shard number, offset, size; classes; names) of every sample of the shards."""
    rows, labels, names = [], [], []
    for number, shard in enumerate(shards, start=first):
        for key, extension, offset, size, label in shard_samples(shard):
            rows.append((number, offset, size))
            labels.append(label)
            names.append(f"{key}.{extension}")
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3), np.asarray(labels, dtype=np.int64), names


def class_names(shards: list[Path], labels: np.ndarray) -> list[str]:
    """classes.txt beside the shards (one name a line, as `hvdtrain shards` writes it), else
    the class numbers."""
    listed = shards[0].parent / "classes.txt"
    if listed.is_file():
        names = [line.strip() for line in listed.read_text().splitlines() if line.strip()]
        if labels.max() >= len(names) or labels.min() < 0:
            raise DataError(f"{listed}: names {len(names)} classes, the shards hold class {int(labels.max())}")
        return names
    if labels.min() < 0:
        raise DataError(f"{shards[0]}: class numbers must be 0 or more; found {int(labels.min())}")
    return [str(k) for k in range(int(labels.max()) + 1)]


def load(spec: DataSpec, image: bool = True, task: str = "classification") -> Dataset:
    train_shards, val_shards = shard_paths(str(spec.path))
    shards = train_shards + val_shards
    rows, labels, names = index(shards)
    classes = class_names(train_shards, labels)
    if val_shards:
        if spec.test_fraction:
            raise DataError(f"{spec.path}: data.test_fraction splits one set of shards; with val-*.tar "
                            "shards, keep test images apart")
        in_val = rows[:, 0] >= len(train_shards)
        train, val, test = np.flatnonzero(~in_val), np.flatnonzero(in_val), np.zeros(0, dtype=np.int64)
    else:
        targets = Targets.split(np.asarray([f"{k:09d}" for k in labels]), "classification", spec)
        train, val, test = targets.train, targets.val, targets.test
    missing = sorted(set(range(len(classes))) - set(labels[train].tolist()), key=natural_key)
    if missing:
        raise DataError(f"{spec.path}: class {classes[missing[0]]!r} has no training sample")
    probe = ShardSamples(shards, rows, labels, names, None)
    size = list(spec.image_size or image_size(probe, int(train[0])))
    mean, std = channel_statistics(probe, train, size, spec)
    prep = Preprocessing([], classes, [3, *size], [], mean, std, image_size=size, augment=spec.augment or "none")

    def split(part: np.ndarray) -> ShardSamples:
        return ShardSamples(shards, rows[part], labels[part], [names[i] for i in part], prep, spec.seed,
                            spec.on_bad_file)
    return Dataset(split(train), split(val), prep, test=split(test) if len(test) else None)
