"""A .npy file opened memory-mapped: read batch by batch, never whole."""
from __future__ import annotations

import mmap
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..spec import DataSpec
from .split import Targets, first_occurrences, input_shape, usable_labels
from .types import Batch, Dataset

CHUNK_BYTES = 16 * 2**20  # a .npy file is scanned this much (as float64) at a time


class MappedSamples:
    """Rows of a memory-mapped .npy file, preprocessed batch by batch.

    Each batch's rows are copied out in file order, then the mapping's pages
    are given back (madvise DONTNEED): they stay in the kernel's page cache
    while memory allows, but no longer count in the process's resident memory,
    which so stays at a few batches whatever the file's size."""

    def __init__(self, path: Path, rows: np.ndarray, y: np.ndarray, preprocessing):
        self.path, self.rows, self.y, self.preprocessing = Path(path), rows, y, preprocessing
        self._array: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict[str, Any]:  # a loader process maps the file itself
        return {**self.__dict__, "_array": None}

    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = open_npy(self.path)
        return self._array

    def batch(self, indices: np.ndarray, epoch: int | None = None) -> Batch:
        array, rows = self.array(), self.rows[indices]
        order = np.argsort(rows, kind="stable")
        raw = np.empty((len(rows), *array.shape[1:]), dtype=array.dtype)
        raw[order] = array[rows[order]]
        release_pages(array)
        return self.preprocessing.apply(raw), self.y[indices]


def load(spec: DataSpec, image: bool, task: str) -> Dataset:
    """x from a .npy file opened memory-mapped, labels (read whole) from y.npy beside
    it or data.labels. Cleaning and the training split's statistics are found in
    one pass over the file, chunk by chunk."""
    path = Path(spec.path)
    labels_path = Path(spec.labels) if spec.labels else path.with_name("y.npy")
    if not labels_path.is_file():
        raise DataError(f"{path}: no labels: expected {labels_path} beside it, or set data.labels")
    x = open_npy(path)
    labels = np.asarray(open_npy_labels(labels_path))
    if len(x) != len(labels):
        raise DataError(f"{path} has {len(x)} samples but {labels_path} has {len(labels)} labels")
    keep = usable_labels(labels, task)
    features = int(np.prod(x.shape[1:]))
    chunk = max(1, CHUNK_BYTES // (8 * max(1, features)))  # rows per chunk, as float64
    seen: set[bytes] = set()
    for start in range(0, len(x), chunk):
        block = np.asarray(x[start:start + chunk], dtype=np.float64).reshape(-1, features)
        if spec.clean.missing == "drop":
            keep[start:start + chunk] &= np.isfinite(block).all(axis=1)
        if spec.clean.duplicates == "drop":
            keep[start:start + chunk] &= first_occurrences(block, labels[start:start + chunk], seen)
        release_pages(x)
    rows = np.flatnonzero(keep)
    targets = Targets.split(labels[rows], task, spec)
    fill, mean, std = feature_statistics(x, rows[targets.train], features, chunk, spec.standardize)
    shape = input_shape(spec, features, image, tuple(x.shape[1:]))
    prep = targets.preprocessing([f"f{i}" for i in range(features)], list(shape), fill, mean, std)
    y, test = targets.y, targets.test
    return Dataset(MappedSamples(path, rows[targets.train], y[targets.train], prep),
                   MappedSamples(path, rows[targets.val], y[targets.val], prep), prep,
                   int((~keep).sum()), MappedSamples(path, rows[test], y[test], prep) if len(test) else None)


def open_npy_labels(path: Path) -> np.ndarray:
    try:
        labels = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DataError(f"{path}: not a readable .npy array of labels ({err})") from None
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels.reshape(-1)
    if labels.ndim != 1:
        raise DataError(f"{path}: labels must be one value per sample, got shape {list(labels.shape)}")
    return labels


def feature_statistics(x: np.ndarray, rows: np.ndarray, features: int, chunk: int,
                       standardize: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-feature fill (mean of the finite values), mean and std of the rows, as the
    in-memory path finds them: missing values filled first, so the mean is the fill
    and the variance that of the finite values over all rows."""
    count, total, squares = np.zeros(features), np.zeros(features), np.zeros(features)
    for start in range(0, len(rows), chunk):
        block = np.asarray(x[rows[start:start + chunk]], dtype=np.float64).reshape(-1, features)
        release_pages(x)
        finite = np.isfinite(block)
        block = np.where(finite, block, 0.0)
        count += finite.sum(axis=0)
        total += block.sum(axis=0)
        squares += (block ** 2).sum(axis=0)
    fill = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    if not standardize:
        return fill, np.zeros(features), np.ones(features)
    variance = np.maximum(squares - count * fill ** 2, 0.0) / max(len(rows), 1)
    std = np.sqrt(variance)
    return fill, fill, np.where(std > 1e-12, std, 1.0)


def open_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DataError(f"{path}: not a readable .npy array ({err})") from None
    if not isinstance(array, np.ndarray) or array.ndim < 1:
        raise DataError(f"{path}: expected an array of samples, got a scalar")
    if not np.issubdtype(array.dtype, np.number):
        raise DataError(f"{path}: the array must be numeric, got {array.dtype}")
    return array


def release_pages(array: np.ndarray) -> None:
    handle = getattr(array, "_mmap", None)
    if isinstance(handle, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        handle.madvise(mmap.MADV_DONTNEED)
