"""Labels, the split into training, validation and test samples, and the shape a
sample takes for the model. Every rank splits the same data with the same seed,
so the split is identical on all ranks without communication."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from ..errors import DataError
from ..spec import CNNSpec, CustomModelSpec, DataSpec
from .types import Preprocessing

IMAGE_SHAPES = {"digits": (1, 8, 8)}


def image_input(model, data: DataSpec) -> bool:
    """Samples go to the model as images [C, H, W]: always for a cnn; for a custom
    model whenever the data has an image shape (digits, image_shape, 3-D synthetic)."""
    if isinstance(model, CNNSpec):
        return True
    has_shape = data.source in IMAGE_SHAPES or data.image_shape is not None or (
        data.synthetic is not None and len(data.synthetic.shape) == 3)
    return isinstance(model, CustomModelSpec) and has_shape


def usable_labels(labels: np.ndarray, task: str) -> np.ndarray:
    """True for each sample with a label (regression: a numeric one)."""
    if task == "regression":
        return np.isfinite(numeric_targets(labels))
    return np.asarray([str(v) not in ("", "nan", "None") for v in labels])


@dataclass
class Targets:
    """Labels as the model learns them, and the split of the samples."""
    y: np.ndarray  # int64 class indices, or float32 standardised targets
    train: np.ndarray  # sample indices
    val: np.ndarray
    task: str
    classes: list[str]
    target_mean: float = 0.0
    target_std: float = 1.0
    test: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @classmethod
    def split(cls, labels: np.ndarray, task: str, spec: DataSpec) -> "Targets":
        """Classes (sorted naturally) and a stratified split, or standardised numeric
        targets and a random split."""
        if task == "regression":
            values = numeric_targets(labels)
            split = lambda kept, fraction, seed: random_split(len(kept), fraction, seed)  # noqa: E731
        else:
            classes = sorted({str(v) for v in labels}, key=natural_key)
            if len(classes) < 2:
                raise DataError(f"need at least 2 classes, found {len(classes)} after cleaning")
            index = {label: i for i, label in enumerate(classes)}
            y = np.asarray([index[str(v)] for v in labels], dtype=np.int64)
            split = lambda kept, fraction, seed: stratified_split(y[kept], fraction, seed)  # noqa: E731
        # the test split first, from its own seed; then validation from the rest
        rest, test = np.arange(len(labels)), np.zeros(0, dtype=np.int64)
        if spec.test_fraction:
            kept, held = split(rest, spec.test_fraction, spec.seed + 1)
            rest, test = rest[kept], rest[held]
        train, val = (rest[i] for i in split(rest, spec.validation_fraction / (1 - spec.test_fraction),
                                              spec.seed))
        if task == "regression":
            mean = float(values[train].mean()) if len(train) else 0.0
            std = (float(values[train].std()) or 1.0) if len(train) else 1.0
            found = cls(((values - mean) / std).astype(np.float32), train, val, task, [], mean, std, test)
        else:
            found = cls(y, train, val, task, classes, test=test)
        if spec.test_fraction and len(found.test) == 0:
            raise DataError(f"{len(found.y)} usable samples leave none for test_fraction {spec.test_fraction}")
        if len(found.train) == 0 or len(found.val) == 0:
            raise DataError(f"{len(found.y)} usable samples cannot be split with validation_fraction "
                            f"{spec.validation_fraction}")
        return found

    def preprocessing(self, names: list[str], shape: list[int], fill, mean, std, columns=(),
                      categories=None) -> Preprocessing:
        return Preprocessing(names, self.classes, shape, list(map(float, fill)), list(map(float, mean)),
                             list(map(float, std)), self.task, list(columns), dict(categories or {}),
                             self.target_mean, self.target_std)


def first_occurrences(x: np.ndarray, labels: np.ndarray, seen: set[bytes] | None = None) -> np.ndarray:
    """True for each row whose features and label do not repeat an earlier row's
    (of this call, or of earlier calls sharing `seen`: a file read in chunks).
    Rows are remembered by a 16-byte digest, not kept."""
    seen = set() if seen is None else seen
    keep = np.ones(len(x), dtype=bool)
    for i, (row, label) in enumerate(zip(x, labels)):
        key = hashlib.blake2b(np.ascontiguousarray(row).tobytes() + str(label).encode(),
                              digest_size=16).digest()
        keep[i] = key not in seen
        seen.add(key)
    return keep


def numeric_targets(labels: np.ndarray) -> np.ndarray:
    """Regression targets as numbers (empty cells are NaN and dropped)."""
    values = []
    for i, v in enumerate(labels):
        text = str(v).strip()
        try:
            values.append(float(text) if text not in ("", "None") else float("nan"))
        except ValueError:
            raise DataError(f"task regression needs numeric targets; sample {i} has {text!r}") from None
    return np.asarray(values, dtype=np.float64)


def natural_key(label: str):
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def input_shape(spec: DataSpec, features: int, image: bool, stored: tuple[int, ...] = ()) -> tuple[int, ...]:
    """A sample's shape for the model; stored: its shape in the file (a .npy array)."""
    if not image:
        return (features,)
    shape = tuple(spec.image_shape or (stored if len(stored) == 3 else ()))
    if spec.source in IMAGE_SHAPES:
        shape = IMAGE_SHAPES[spec.source]
    elif spec.source == "synthetic":
        shape = tuple(spec.synthetic.shape)
    if not shape:
        raise DataError(f"{spec.path}: samples of shape {list(stored)} are not images [C, H, W]: "
                        "set data.image_shape")
    if int(np.prod(shape)) != features:
        raise DataError(f"data.image_shape {list(shape)} holds {int(np.prod(shape))} values, "
                        f"but each sample has {features} features")
    return shape


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation indices; each class keeps its share of validation samples."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        n_val = int(round(len(members) * fraction))
        val.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def random_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation indices for numeric targets (no classes to stratify by)."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * fraction))
    return np.sort(order[n_val:]), np.sort(order[:n_val])
