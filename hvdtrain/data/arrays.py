"""Data held in memory: scikit-learn's bundled sets, .npz and .csv files and
synthetic data, cleaned, split and standardised here (a .npy file is opened
memory-mapped by `npy` instead)."""
from __future__ import annotations

import csv
import os
import zipfile
from importlib.metadata import version
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..horovod_build.build import cache_root
from ..spec import DataSpec
from . import npy
from .split import Targets, first_occurrences, input_shape, usable_labels
from .types import ArraySamples, Dataset, row_chunks


def load(spec: DataSpec, image: bool = False, task: str = "classification") -> Dataset:
    """The spec's data, cleaned, split (stratified for classes) and standardised."""
    if spec.memory_mapped:
        return npy.load(spec, image, task)
    x, labels, names, columns, categories = read_source(spec, task)
    if len(x) != len(labels):
        raise DataError(f"{len(x)} samples but {len(labels)} labels")
    # float32 features stay float32 until preprocessed, their statistics summed in float64: a
    # float64 copy of ResNet-50's 2,560 synthetic images was 3 GB, with as many again in temporaries
    x = x.reshape(len(x), -1)
    x = x if x.dtype in (np.float32, np.float64) else x.astype(np.float64)
    finite = np.ones(len(x), dtype=bool)
    for rows in row_chunks(len(x), x.shape[1]):
        finite[rows] = np.isfinite(x[rows]).all(axis=1)
    keep = usable_labels(labels, task)
    if spec.clean.missing == "drop":
        keep &= finite
    if spec.clean.duplicates == "drop":
        keep &= first_occurrences(x, labels)
    dropped = int((~keep).sum())
    if dropped:
        x, labels, finite = x[keep], labels[keep], finite[keep]
    targets = Targets.split(labels, task, spec)
    train, val = targets.train, targets.val
    if finite.all():
        fill, spread = column_statistics(x, train)
        centre = fill
    else:  # missing values imputed with the training rows' column means
        x = x.astype(np.float64)
        fill = np.nan_to_num(np.nanmean(np.where(np.isfinite(x[train]), x[train], np.nan), axis=0))
        x = np.where(np.isfinite(x), x, fill[None, :])
        centre, spread = x[train].mean(axis=0), x[train].std(axis=0)
    mean = centre if spec.standardize else np.zeros(x.shape[1])
    std = spread if spec.standardize else np.ones(x.shape[1])
    std = np.where(std > 1e-12, std, 1.0)  # constant features stay constant, not NaN
    shape = input_shape(spec, x.shape[1], image)
    prep = targets.preprocessing(names, list(shape), fill, mean, std, columns, categories)
    xs, y = prep.apply(x), targets.y
    test = ArraySamples(xs[targets.test], y[targets.test]) if len(targets.test) else None
    return Dataset(ArraySamples(xs[train], y[train]), ArraySamples(xs[val], y[val]), prep, dropped, test)


def column_statistics(x: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each column over the given rows, in float64, a
    chunk of rows at a time (two passes, as numpy's own std)."""
    chunks = [rows[part] for part in row_chunks(len(rows), x.shape[1])]
    total = sum((x[c].sum(axis=0, dtype=np.float64) for c in chunks), np.zeros(x.shape[1]))
    mean = total / len(rows)
    squares = sum((np.square(x[c].astype(np.float64) - mean).sum(axis=0) for c in chunks), np.zeros(x.shape[1]))
    return mean, np.sqrt(squares / len(rows))


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
        return bundled(spec.source)
    return read_npz(Path(spec.path))


def bundled(source: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One of scikit-learn's bundled data sets (nothing downloads), kept as .npz in the
    cache directory for each scikit-learn version: importing scikit-learn took a second of
    every launch's start-up (a fifth of the digits MLP's), reading the copy milliseconds."""
    copy = cache_root() / "bundled" / f"{source}-scikit-learn-{version('scikit-learn')}.npz"
    try:
        with np.load(copy, allow_pickle=False) as saved:
            return saved["x"], saved["y"], [str(n) for n in saved["names"]]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # none yet, or unreadable
        pass
    from sklearn import datasets
    bunch = getattr(datasets, f"load_{source}")()
    names = [str(n) for n in getattr(bunch, "feature_names", [])] or [f"f{i}" for i in range(bunch.data.shape[1])]
    try:  # written aside and renamed: ranks starting together never read half a file
        copy.parent.mkdir(parents=True, exist_ok=True)
        aside = copy.with_name(f".{copy.stem}.{os.getpid()}.npz")
        np.savez(aside, x=bunch.data, y=bunch.target, names=np.array(names))
        os.replace(aside, copy)
    except OSError:
        pass  # a cache that cannot be written: the next launch reads scikit-learn's again
    return bunch.data, bunch.target, names


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
    # drawn as float32 in place: ResNet-50's 2,560 images of 3 x 224 x 224 take 5 s, not
    # the 41 s of float64 draws converted (a bench launch's start-up was mostly this)
    if task == "regression":
        x = rng.standard_normal(size=(cfg.samples, features), dtype=np.float32)
        y = x @ rng.normal(size=features) + rng.normal(scale=0.1, size=cfg.samples)
        return x, y, [f"f{i}" for i in range(features)]
    y = rng.integers(0, cfg.classes, size=cfg.samples)
    centers = rng.normal(size=(cfg.classes, features)).astype(np.float32)
    x = rng.standard_normal(size=(cfg.samples, features), dtype=np.float32)
    x *= 2.0
    for first in range(0, cfg.samples, 1024):
        x[first:first + 1024] += centers[y[first:first + 1024]]
    return x, y, [f"f{i}" for i in range(features)]
