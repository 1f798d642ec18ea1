"""The user's own loader (`data.loader`, by import path): its training and validation
sets as it gives them."""
from __future__ import annotations

from typing import Any

import numpy as np

from .. import plugins
from ..errors import DataError, UserError
from ..spec import DataSpec
from .types import ArraySamples, Batch, Dataset, Preprocessing, as_numpy


class UserSamples:
    """A map-style data set of the user's (`len` and `[i]` giving (x, y)), such as a
    torch `Dataset`: samples are converted to numpy and stacked."""

    def __init__(self, data: Any, label_type: type, key: str):
        self.data, self.label_type, self.key = data, label_type, key

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, indices: np.ndarray, epoch: int | None = None) -> Batch:
        xs, ys = [], []
        for i in indices:
            sample = self.data[int(i)]
            if not (isinstance(sample, (tuple, list)) and len(sample) == 2):
                raise DataError(f"{self.key}: sample {int(i)} is {type(sample).__name__}, not a pair (x, y)")
            xs.append(as_numpy(sample[0]))
            ys.append(as_numpy(sample[1]))
        return np.stack(xs).astype(np.float32, copy=False), np.asarray(ys).reshape(-1).astype(self.label_type)


def load(spec: DataSpec, image: bool = False, task: str = "classification") -> Dataset:
    """The training and validation sets of the user's loader, as it gives them: map-style
    data sets (torch Datasets: `len` and `[i]` giving (x, y)), (x, y) arrays, or
    finite tf.data.Datasets of (x, y) samples (read once into memory)."""
    loader = plugins.load(spec.loader, "data.loader")
    result = plugins.call(loader, dict(spec.args), {"seed": spec.seed}, "data.loader", spec.loader)
    if not (isinstance(result, (tuple, list)) and len(result) in (2, 3)):
        raise UserError(f"data.loader: {spec.loader} returned {type(result).__name__}; expected a pair "
                        "(train, validation) or (train, validation, test)")
    label_type = np.int64 if task == "classification" else np.float32
    names = ("training", "validation", "test")
    parts = [user_samples(part, label_type, f"data.loader ({name} set)") for part, name in zip(result, names)]
    for part, name in zip(parts, names):
        if len(part) == 0:
            raise DataError(f"data.loader: the {name} set is empty")
    train, val, test = (*parts, None)[:3]
    x, _ = train.batch(np.arange(1))
    classes = loader_classes(result[0], train, task)
    features = int(np.prod(x.shape[1:]))
    prep = Preprocessing([f"f{i}" for i in range(features)], classes, list(x.shape[1:]), [0.0] * features,
                         [0.0] * features, [1.0] * features, task)
    for part, name in zip(parts, names):
        check_labels(part, prep, name)
    return Dataset(train, val, prep, test=test)


def user_samples(part, label_type: type, key: str):
    if hasattr(part, "as_numpy_iterator"):  # a tf.data.Dataset
        pairs = list(part.as_numpy_iterator())
        if not pairs or not all(isinstance(p, tuple) and len(p) == 2 for p in pairs):
            raise DataError(f"{key}: a tf.data.Dataset of (x, y) samples is needed")
        part = (np.stack([p[0] for p in pairs]), np.asarray([p[1] for p in pairs]))
    if isinstance(part, (tuple, list)) and len(part) == 2 and all(hasattr(a, "shape") for a in part):
        x, y = (as_numpy(a) for a in part)
        if len(x) != len(y):
            raise DataError(f"{key}: {len(x)} samples but {len(y)} labels")
        return ArraySamples(np.asarray(x, dtype=np.float32), np.asarray(y).reshape(-1).astype(label_type))
    if hasattr(part, "__len__") and hasattr(part, "__getitem__"):
        return UserSamples(part, label_type, key)
    raise DataError(f"{key}: got {type(part).__name__}; expected a map-style data set (len and [i] giving "
                    "(x, y)), a pair of arrays (x, y) or a tf.data.Dataset")


def loader_classes(data, samples, task: str) -> list[str]:
    """Class names: the data set's `classes` (as torchvision's), else one per label
    index up to the largest label (found from `targets`, or by reading the labels)."""
    if task == "regression":
        return []
    names = getattr(data, "classes", None)
    if isinstance(names, (list, tuple)) and len(names) >= 2:
        return [str(n) for n in names]
    targets = getattr(data, "targets", None)
    labels = np.asarray(as_numpy(targets)) if targets is not None else samples_labels(samples)
    count = int(labels.max()) + 1 if len(labels) else 0
    if count < 2:
        raise DataError("data.loader: the training set's labels hold fewer than 2 classes")
    return [str(i) for i in range(count)]


def samples_labels(samples) -> np.ndarray:
    if isinstance(samples, ArraySamples):
        return samples.y
    return np.concatenate([samples.batch(np.arange(i, min(i + 256, len(samples))))[1]
                           for i in range(0, len(samples), 256)])


def check_labels(samples, prep: Preprocessing, name: str) -> None:
    """Class labels must be indices 0..classes-1 (checked where they are in memory)."""
    if prep.task != "classification" or not isinstance(samples, ArraySamples):
        return
    bad = (samples.y < 0) | (samples.y >= len(prep.classes))
    if bad.any():
        raise DataError(f"data.loader: {name} label {int(samples.y[bad][0])} is not a class index "
                        f"0..{len(prep.classes) - 1}")
