"""Data: load, clean, split, standardise and shard. numpy only.

Every rank loads the same data with the same seed, so the split and the
preprocessing statistics are identical on all ranks without communication.
Data held in memory is read here; image folders, memory-mapped arrays and
user loaders are in `sources`, and give `Samples` read batch by batch.
"""
from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError
from .samples import ArraySamples, Samples
from .spec import CNNSpec, CustomModelSpec, DataSpec

IMAGE_SHAPES = {"digits": (1, 8, 8)}


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

    def apply(self, x: np.ndarray) -> np.ndarray:
        if self.image_size:
            mean = np.asarray(self.mean, np.float32)[:, None, None]
            std = np.asarray(self.std, np.float32)[:, None, None]
            return (np.asarray(x, dtype=np.float32) - mean) / std
        x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        if x.shape[1] != len(self.mean):
            raise DataError(f"expected {len(self.mean)} features per sample, got {x.shape[1]}")
        bad = ~np.isfinite(x)
        if bad.any():
            x = np.where(bad, np.asarray(self.fill)[None, :], x)
        x = (x - np.asarray(self.mean)) / np.asarray(self.std)
        return x.astype(np.float32).reshape((len(x), *self.input_shape))

    @property
    def outputs(self) -> int:
        """Outputs of the model: one per class, or one value (regression)."""
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
    # batches of float32 inputs (n, *input_shape) and int64 class indices, or float32
    # standardised targets (regression)
    train: Samples
    val: Samples
    preprocessing: Preprocessing
    dropped_rows: int = 0
    test: Samples | None = None  # held out (data.test_fraction): the final summary and evaluate only

    @property
    def num_classes(self) -> int:
        return len(self.preprocessing.classes)

    @property
    def outputs(self) -> int:
        return self.preprocessing.outputs


def image_input(model, data: DataSpec) -> bool:
    """Samples go to the model as images [C, H, W]: always for a cnn; for a custom
    model whenever the data has an image shape (digits, image_shape, 3-D synthetic)."""
    if isinstance(model, CNNSpec):
        return True
    has_shape = data.source in IMAGE_SHAPES or data.image_shape is not None or (
        data.synthetic is not None and len(data.synthetic.shape) == 3)
    return isinstance(model, CustomModelSpec) and has_shape


def load_dataset(spec: DataSpec, image: bool = False, task: str = "classification") -> Dataset:
    """The spec's data, cleaned, split (stratified for classes), standardised, shaped
    for the model."""
    if spec.source in ("image_folder", "custom") or spec.memory_mapped:
        from . import sources
        return sources.load(spec, image, task)
    x, labels, names, columns, categories = read_source(spec, task)
    if len(x) != len(labels):
        raise DataError(f"{len(x)} samples but {len(labels)} labels")
    x = x.reshape(len(x), -1).astype(np.float64)
    keep = usable_labels(labels, task)
    if spec.clean.missing == "drop":
        keep &= np.isfinite(x).all(axis=1)
    if spec.clean.duplicates == "drop":
        keep &= first_occurrences(x, labels)
    dropped = int((~keep).sum())
    x, labels = x[keep], labels[keep]
    targets = Targets.split(labels, task, spec)
    train, val = targets.train, targets.val
    fill = np.nan_to_num(np.nanmean(np.where(np.isfinite(x[train]), x[train], np.nan), axis=0))
    x = np.where(np.isfinite(x), x, fill[None, :])
    mean = x[train].mean(axis=0) if spec.standardize else np.zeros(x.shape[1])
    std = x[train].std(axis=0) if spec.standardize else np.ones(x.shape[1])
    std = np.where(std > 1e-12, std, 1.0)  # constant features stay constant, not NaN
    shape = input_shape(spec, x.shape[1], image)
    prep = targets.preprocessing(names, list(shape), fill, mean, std, columns, categories)
    xs, y = prep.apply(x), targets.y
    test = ArraySamples(xs[targets.test], y[targets.test]) if len(targets.test) else None
    return Dataset(ArraySamples(xs[train], y[train]), ArraySamples(xs[val], y[val]), prep, dropped, test)


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
            classes = sorted({str(v) for v in labels}, key=_natural)
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


def _natural(label: str):
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


def read_source(spec: DataSpec, task: str = "classification"):
    """Raw features, raw labels, feature names and (csv) the source columns and
    one-hot categories, before any cleaning."""
    if spec.source == "file" and not Path(spec.path).is_file():
        raise DataError(f"data.path {str(spec.path)!r}: no such file")
    if spec.source == "file" and Path(spec.path).suffix.lower() == ".csv":
        return read_csv(Path(spec.path), spec.label_column, spec.categorical)
    return (*read_arrays(spec, task), [], {})


def read_arrays(spec: DataSpec, task: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if spec.source == "synthetic":
        return synthetic(spec, task)
    if spec.source != "file":
        from sklearn import datasets  # bundled with scikit-learn: nothing downloads
        bunch = getattr(datasets, f"load_{spec.source}")()
        names = [str(n) for n in getattr(bunch, "feature_names", [])] or \
            [f"f{i}" for i in range(bunch.data.shape[1])]
        return bunch.data, bunch.target, names
    return read_npz(Path(spec.path))


def read_npz(path: Path, need_labels: bool = True) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            missing = ({"x", "y"} if need_labels else {"x"}) - set(arrays.files)
            if missing:
                raise DataError(f"{path}: needs arrays {sorted(missing)}, has {sorted(arrays.files)}")
            x = arrays["x"]
            y = np.asarray(arrays["y"]).reshape(-1) if "y" in arrays.files else None
    except (ValueError, OSError) as err:
        raise DataError(f"{path}: not a readable .npz file ({err})") from None
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{path}: array 'x' must be numeric, got {x.dtype}")
    return x, y, [f"f{i}" for i in range(int(np.prod(x.shape[1:])))]


def read_csv_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line number, fields) of each non-empty data row."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except (UnicodeDecodeError, OSError, csv.Error) as err:
        raise DataError(f"{path}: cannot read as UTF-8 CSV ({err})") from None
    if not rows:
        raise DataError(f"{path}: empty file; needs a header row")
    header = [h.strip() for h in rows[0]]
    body = [(line, row) for line, row in enumerate(rows[1:], start=2) if any(c.strip() for c in row)]
    for line, row in body:
        if len(row) != len(header):
            raise DataError(f"{path}:{line}: {len(row)} fields, header has {len(header)}")
    return header, body


def read_csv(path: Path, label_column: str, categorical: list[str] = ()):
    """Features (text categories one-hot encoded), labels, feature names, source
    columns and categories of a csv file."""
    header, body = read_csv_rows(path)
    if not body:
        raise DataError(f"{path}: needs at least one data row")
    if label_column not in header:
        raise DataError(f"{path}: no label column {label_column!r} (columns: {', '.join(header)}); "
                        "set data.label_column")
    unknown = [c for c in categorical if c not in header or c == label_column]
    if unknown:
        raise DataError(f"data.categorical: {', '.join(map(repr, unknown))} is not a feature column of "
                        f"{path} (columns: {', '.join(header)})")
    li = header.index(label_column)
    columns = [h for i, h in enumerate(header) if i != li]
    categories = {c: sorted({row[header.index(c)].strip() for _, row in body} - {""}) for c in categorical}
    labels = [row[li].strip() for _, row in body]
    x, names = csv_features(path, header, body, columns, categories)
    return x, np.asarray(labels), names, columns, categories


def csv_features(path: Path, header: list[str], body: list[tuple[int, list[str]]], columns: list[str],
                 categories: dict[str, list[str]]) -> tuple[np.ndarray, list[str]]:
    """The feature matrix of csv rows: numbers as they are, each categorical column
    as one 0/1 feature per category (an empty cell: NaN in each; a category not
    seen in training: 0 in each)."""
    blocks, names = [], []
    for column in columns:
        cells = [(line, row[header.index(column)].strip()) for line, row in body]
        if column in categories:
            known = categories[column]
            block = np.zeros((len(cells), len(known)))
            for r, (_, cell) in enumerate(cells):
                if cell == "":
                    block[r] = np.nan
                elif cell in known:
                    block[r, known.index(cell)] = 1.0
            names += [f"{column}={c}" for c in known]
        else:
            check_numeric_column(path, column, cells)
            block = np.asarray([[parse_number(cell, path, line, column)] for line, cell in cells])
            names.append(column)
        blocks.append(block.reshape(len(cells), -1))
    return np.concatenate(blocks, axis=1) if blocks else np.zeros((len(body), 0)), names


def check_numeric_column(path: Path, column: str, cells: list[tuple[int, str]]) -> None:
    """A column whose first value is not a number holds text: say so, and how to use it."""
    first = next(((line, cell) for line, cell in cells if cell != ""), None)
    if first is None:
        return
    try:
        float(first[1])
    except ValueError:
        raise DataError(f"{path}: column {column!r} holds text ({first[1]!r} on line {first[0]}), not "
                        f"numbers: list it in data.categorical to one-hot encode it, or drop the "
                        "column") from None


def parse_number(cell: str, path: Path, line: int, column: str) -> float:
    cell = cell.strip()
    if cell == "":
        return float("nan")
    try:
        return float(cell)
    except ValueError:
        raise DataError(f"{path}:{line}: column {column!r} holds {cell!r}, not a number") from None


def synthetic(spec: DataSpec, task: str = "classification") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Separable Gaussian blobs of the requested shape (classification), or a
    linear function of Gaussian features plus noise (regression): learnable tasks."""
    cfg = spec.synthetic
    rng = np.random.default_rng(spec.seed)
    features = int(np.prod(cfg.shape))
    if task == "regression":
        x = rng.normal(size=(cfg.samples, features)).astype(np.float32)
        y = x @ rng.normal(size=features) + rng.normal(scale=0.1, size=cfg.samples)
        return x, y, [f"f{i}" for i in range(features)]
    y = rng.integers(0, cfg.classes, size=cfg.samples)
    centers = rng.normal(size=(cfg.classes, features)).astype(np.float32)
    x = centers[y] + rng.normal(scale=2.0, size=(cfg.samples, features)).astype(np.float32)
    return x, y, [f"f{i}" for i in range(features)]


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


def steps_per_epoch(n: int, size: int, batch_size: int) -> int:
    """The same count on every rank: a rank with an extra batch would hang Horovod."""
    return max(1, -(-(n // size) // batch_size))


def shard_batches(n: int, rank: int, size: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """This rank's batches for one epoch.

    The epoch's permutation (from seed and epoch, so a resumed run sees the same
    order) is dealt round-robin: shards are disjoint and cover every sample.
    Each shard is cut into `steps_per_epoch` nearly equal batches, so batches
    may hold one sample more than batch_size rather than drop or repeat one.
    """
    if n < size:
        raise DataError(f"{n} training samples cannot be shared by {size} workers")
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return np.array_split(order[rank::size], steps_per_epoch(n, size, batch_size))


def eval_shard(n: int, rank: int, size: int, batch_size: int) -> list[np.ndarray]:
    """This rank's part of the validation set, in order; ranks may hold uneven counts."""
    mine = np.arange(n)[rank::size]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
