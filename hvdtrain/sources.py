"""Data read batch by batch: image folders, memory-mapped .npy arrays and user
loaders. Each gives a `Dataset` whose splits are `Samples`; nothing here
holds more than the labels, the file list or one chunk in memory.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import plugins
from .data import Dataset, Preprocessing, Targets, _natural, first_occurrences, input_shape, usable_labels
from .errors import DataError, UserError
from .samples import (ArraySamples, ImageSamples, MappedSamples, UserSamples, as_numpy, check_image,
                      image_size, open_npy, read_image, release_pages)
from .spec import IMAGE_KINDS, IMAGE_SUFFIXES, DataSpec

STATISTICS_SAMPLE = 256  # training images the per-channel mean and std are taken from
CHUNK_BYTES = 16 * 2**20  # a .npy file is scanned this much (as float64) at a time


def load(spec: DataSpec, image: bool, task: str) -> Dataset:
    if spec.source == "image_folder":
        return image_folder(spec)
    if spec.source == "custom":
        return custom(spec, task)
    return memory_mapped(spec, image, task)


# -- image folders --------------------------------------------------------------

def image_folder(spec: DataSpec) -> Dataset:
    """A root with one folder of images per class, or train/ and val/ folders of such
    (else a stratified split). Every file is checked here, so no rank trains on a
    file it cannot read; the pixels are read later, by the loader."""
    root = Path(spec.path)
    split_dirs = [root / "train", next((root / n for n in ("val", "validation") if (root / n).is_dir()), None)]
    if split_dirs[0].is_dir() and split_dirs[1] is not None:
        if spec.test_fraction:
            raise DataError(f"{root}: data.test_fraction splits one folder of classes; with train/ and "
                            "val/ folders, put the test images in test/")
        train_files, classes = class_files(split_dirs[0])
        parts = [train_files, class_files(split_dirs[1], classes)[0]]
        if (root / "test").is_dir():
            parts.append(class_files(root / "test", classes)[0])
        paths = [p for files in parts for c in classes for p in files[c]]
        labels = np.asarray([i for files in parts for i, c in enumerate(classes) for _ in files[c]], dtype=np.int64)
        ends = np.cumsum([sum(len(v) for v in files.values()) for files in parts])
        train, val = np.arange(ends[0]), np.arange(ends[0], ends[1])
        test = np.arange(ends[1], ends[2]) if len(parts) == 3 else np.zeros(0, dtype=np.int64)
    else:
        files, classes = class_files(root)
        paths = [p for c in classes for p in files[c]]
        labels = np.asarray([i for i, c in enumerate(classes) for _ in files[c]], dtype=np.int64)
        # Targets sorts class names as class_files does, so its indices are the folders'
        targets = Targets.split(np.asarray([classes[k] for k in labels]), "classification", spec)
        train, val, test = targets.train, targets.val, targets.test
        empty = [classes[k] for k in range(len(classes)) if not (labels[val] == k).any()]
        if empty:
            raise DataError(f"{root}: class {empty[0]!r} has too few images for a validation share "
                            f"(validation_fraction {spec.validation_fraction}); add images or give "
                            "train/ and val/ folders")
    check_images(paths)
    size = list(spec.image_size or image_size(paths[train[0]]))
    mean, std = channel_statistics([paths[i] for i in train], size, spec)
    prep = Preprocessing([], classes, [3, *size], [], mean, std, image_size=size)
    return Dataset(ImageSamples([paths[i] for i in train], labels[train], prep),
                   ImageSamples([paths[i] for i in val], labels[val], prep), prep,
                   test=ImageSamples([paths[i] for i in test], labels[test], prep) if len(test) else None)


def class_files(folder: Path, classes: list[str] | None = None) -> tuple[dict[str, list[Path]], list[str]]:
    """The image files of each class folder, sorted; classes: the training split's,
    which a validation folder must have, each with at least one image."""
    found = sorted((d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")),
                   key=_natural)
    files = {c: sorted(p for p in (folder / c).rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
             for c in found}
    if classes is None:
        if len(found) < 2:
            raise DataError(f"{folder}: needs a folder of images per class, at least 2 classes; "
                            f"found {len(found)}")
        classes = found
    extra = [c for c in found if c not in classes]
    if extra:
        raise DataError(f"{folder / extra[0]}: class {extra[0]!r} is not among the training classes")
    for c in classes:
        if c not in files:
            raise DataError(f"{folder}: class {c!r} is missing (no folder {folder / c})")
        if not files[c]:
            raise DataError(f"{folder / c}: no {IMAGE_KINDS} images "
                            f"in class folder {c!r}")
    return files, classes


def check_images(paths: list[Path]) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        problems = [p for p in pool.map(check_image, paths) if p]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)


def channel_statistics(paths: list[Path], size: list[int], spec: DataSpec) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of a seeded sample of the training images."""
    if not spec.standardize:
        return [0.0] * 3, [1.0] * 3
    rng = np.random.default_rng(spec.seed)
    chosen = rng.choice(len(paths), size=min(len(paths), STATISTICS_SAMPLE), replace=False)
    pixels = np.stack([read_image(paths[i], size) for i in sorted(chosen)])
    std = pixels.std(axis=(0, 2, 3))
    return pixels.mean(axis=(0, 2, 3)).tolist(), np.where(std > 1e-6, std, 1.0).tolist()


# -- memory-mapped arrays -------------------------------------------------------

def memory_mapped(spec: DataSpec, image: bool, task: str) -> Dataset:
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


# -- user loaders ---------------------------------------------------------------

def custom(spec: DataSpec, task: str) -> Dataset:
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
