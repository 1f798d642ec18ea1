"""The data's shared types: a split's samples read a batch of indices at a time,
the preprocessing saved with a model, and the data set a reader gives the loop.

The loop deals out index batches (the sharding rule, `sharding.shard_batches`);
a backend's loader (torch `DataLoader`, `tf.data`) turns each into arrays by
calling `batch(indices)`, in its worker processes or threads. Only
`ArraySamples` holds its data in memory: the readers' other samples read what a
batch needs when it is asked for, so a data set larger than memory trains.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import DataError

Batch = tuple[np.ndarray, np.ndarray]


def row_chunks(rows: int, features: int, elements: int = 1 << 22) -> list[slice]:
    """Slices over `rows` rows of `features` values, about `elements` values each (at least a row)."""
    step = max(1, elements // max(1, features))
    return [slice(i, i + step) for i in range(0, rows, step)]


class Samples(Protocol):
    def __len__(self) -> int: ...

    def batch(self, indices: np.ndarray, epoch: int | None = None) -> Batch:
        """(inputs as float32 [n, *input_shape], or images as uint8 [n, 3, H, W], and
        labels) of the samples at indices; epoch: a training epoch's batch (images draw
        their augmentation from it), None for evaluation."""


class ArraySamples:
    """Preprocessed arrays held in memory."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, indices: np.ndarray, epoch: int | None = None) -> Batch:
        return self.x[indices], self.y[indices]


@dataclass
class Preprocessing:
    """What turns raw features into model inputs; saved with the exported model."""
    feature_names: list[str]
    classes: list[str]
    input_shape: list[int]
    fill: list[float]  # per-feature value for NaN/inf (training-split means)
    mean: list[float]
    std: list[float]
    task: str = "classification"
    columns: list[str] = field(default_factory=list)  # csv: the source columns, in order
    categories: dict[str, list[str]] = field(default_factory=dict)  # csv: one-hot columns
    target_mean: float = 0.0  # regression: the model learns (y - target_mean) / target_std
    target_std: float = 1.0
    image_size: list[int] = field(default_factory=list)  # image files: [H, W]; mean, std per channel
    augment: str = "none"  # image files: data.augment (predict and evaluate use its evaluation side)
    # text: the tokenizer (tokenizers' JSON), how texts become ids (`data.tokenizer`), its special ids
    text_column: str = ""
    tokenizer: str = ""
    max_length: int = 0
    padding: str = ""
    pad_id: int = 0
    end_id: int = 0
    start_id: int | None = None
    ignore_pad: bool = True  # the padding token is no text's token: losses and metrics skip it
    vocab_size: int = 0

    @property
    def text(self) -> bool:
        return bool(self.tokenizer)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Model inputs (float32) of raw samples; images: RGB uint8 [n, 3, H, W]; text: token
        ids (int64 [n, length]), as they are."""
        if self.text:
            return np.asarray(x, dtype=np.int64)
        if self.image_size:
            scale, shift = self.pixel_affine()
            return np.asarray(x, dtype=np.float32) * scale[:, None, None] - shift[:, None, None]
        x = np.asarray(x).reshape(len(x), -1)
        if x.shape[1] != len(self.mean):
            raise DataError(f"expected {len(self.mean)} features per sample, got {x.shape[1]}")
        fill, mean, std = (np.asarray(v, dtype=np.float64) for v in (self.fill, self.mean, self.std))
        out = np.empty(x.shape, dtype=np.float32)
        for rows in row_chunks(len(x), x.shape[1]):  # float64 a chunk at a time, not a float64 copy of the whole
            part = x[rows].astype(np.float64)
            bad = ~np.isfinite(part)
            if bad.any():
                part = np.where(bad, fill[None, :], part)
            out[rows] = (part - mean) / std
        return out.reshape((len(x), *self.input_shape))

    def pixel_affine(self) -> tuple[np.ndarray, np.ndarray]:
        """Images: per channel, the (scale, shift) that normalise uint8 pixels (x * scale
        - shift = (x / 255 - mean) / std); the backends apply it on the device."""
        std = np.asarray(self.std, np.float32)
        return (1.0 / (255.0 * std)).astype(np.float32), (np.asarray(self.mean, np.float32) / std)

    @property
    def outputs(self) -> int:
        """Outputs of the model: one per class, one value (regression), or one per token of the
        vocabulary at each position (language modelling)."""
        if self.task == "language_modeling":
            return self.vocab_size
        return len(self.classes) if self.task == "classification" else 1

    def targets(self, outputs: np.ndarray) -> np.ndarray:
        """A regression model's outputs in the targets' own units."""
        return np.asarray(outputs, dtype=np.float64).reshape(-1) * self.target_std + self.target_mean

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> "Preprocessing":
        return cls(**json.loads(path.read_text()))


@dataclass
class Dataset:
    # batches of float32 inputs (n, *input_shape), or image files' uint8 pixels, and
    # int64 class indices, or float32 standardised targets (regression)
    train: Samples
    val: Samples
    preprocessing: Preprocessing
    dropped_rows: int = 0
    test: Samples | None = None  # held out (data.test_fraction): the final summary and evaluate only
    skipped_before: int = field(default=0, repr=False)
    fingerprint: str = ""  # what every rank must have read alike (text: its tokenizer's digest)

    def newly_skipped(self) -> int:
        """Files skipped (`data.on_bad_file: skip`) by this rank's reads since the last call."""
        total = sum(s.skipped_count() for s in (self.train, self.val, self.test) if hasattr(s, "skipped_count"))
        new, self.skipped_before = total - self.skipped_before, total
        return new

    @property
    def num_classes(self) -> int:
        return len(self.preprocessing.classes)

    @property
    def outputs(self) -> int:
        return self.preprocessing.outputs


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
