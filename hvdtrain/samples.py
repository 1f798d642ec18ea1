"""Samples: random access to one split of the data, a batch of indices at a time.

The loop deals out index batches (the sharding rule, `data.shard_batches`);
a backend's loader (torch `DataLoader`, `tf.data`) turns each into arrays by
calling `batch(indices)`, in its worker processes or threads. Only
`ArraySamples` holds its data in memory: the others read what a batch needs
when it is asked for, so a data set larger than memory trains.
"""
from __future__ import annotations

import mmap
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from .errors import DataError

Batch = tuple[np.ndarray, np.ndarray]


class Samples(Protocol):
    def __len__(self) -> int: ...

    def batch(self, indices: np.ndarray) -> Batch:
        """(inputs as float32 [n, *input_shape], labels) of the samples at indices."""


class ArraySamples:
    """Preprocessed arrays held in memory."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, indices: np.ndarray) -> Batch:
        return self.x[indices], self.y[indices]


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

    def batch(self, indices: np.ndarray) -> Batch:
        array, rows = self.array(), self.rows[indices]
        order = np.argsort(rows, kind="stable")
        raw = np.empty((len(rows), *array.shape[1:]), dtype=array.dtype)
        raw[order] = array[rows[order]]
        release_pages(array)
        return self.preprocessing.apply(raw), self.y[indices]


class ImageSamples:
    """Image files, decoded and resized when a batch is asked for."""

    def __init__(self, paths: Sequence[Path], y: np.ndarray, preprocessing):
        self.paths, self.y, self.preprocessing = list(paths), y, preprocessing

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, indices: np.ndarray) -> Batch:
        size = self.preprocessing.image_size
        pixels = np.stack([read_image(self.paths[i], size) for i in indices])
        return self.preprocessing.apply(pixels), self.y[indices]


class UserSamples:
    """A map-style data set of the user's (`len` and `[i]` giving (x, y)), such as a
    torch `Dataset`: samples are converted to numpy and stacked."""

    def __init__(self, data: Any, label_type: type, key: str):
        self.data, self.label_type, self.key = data, label_type, key

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, indices: np.ndarray) -> Batch:
        xs, ys = [], []
        for i in indices:
            sample = self.data[int(i)]
            if not (isinstance(sample, (tuple, list)) and len(sample) == 2):
                raise DataError(f"{self.key}: sample {int(i)} is {type(sample).__name__}, not a pair (x, y)")
            xs.append(as_numpy(sample[0]))
            ys.append(as_numpy(sample[1]))
        return np.stack(xs).astype(np.float32, copy=False), np.asarray(ys).reshape(-1).astype(self.label_type)


def loader_failure(err: Exception) -> DataError:
    """A DataError raised in a loader's worker, as its own message: torch re-raises it
    with the worker's traceback, tf.data within an error of its own."""
    text = str(err)
    marker = "DataError: "
    if marker in text:
        text = text[text.rindex(marker) + len(marker):].strip().splitlines()[0]
    return DataError(text)


def as_numpy(value: Any) -> np.ndarray:
    """A sample's array: numpy, a torch tensor (detached, on the CPU) or a TF tensor."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
    return np.asarray(value)


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


def read_image(path: Path, size: Sequence[int]) -> np.ndarray:
    """One image file as float32 [3, H, W] in [0, 1], resized to size (H, W)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image.size != (size[1], size[0]):
                image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DataError(f"{path}: cannot read as an image ({err})") from None
    return pixels.transpose(2, 0, 1) / 255.0


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image file, from its header."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.size[1], image.size[0]
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read as an image ({err})") from None


def check_image(path: Path) -> str | None:
    """Why an image file cannot be used, or None: its header is read and its data
    checked (PNG chunks' checksums; a JPEG is decoded) without keeping the pixels."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.format == "PNG":
                image.verify()
            else:
                image.load()
    except Exception as err:  # PIL raises many kinds for broken files
        return f"{path}: cannot read as an image ({type(err).__name__}: {err})"
    return None
