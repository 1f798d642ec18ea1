"""A folder of image files, one folder per class: the files are listed and checked
here, decoded and resized by the loader a batch at a time."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError
from ..spec import IMAGE_KINDS, DataSpec
from . import folder_index
from .image_samples import EncodedImages, channel_statistics, image_size
from .split import Targets, natural_key
from .types import Dataset, Preprocessing


class ImageSamples(EncodedImages):
    """Image files of a folder."""

    def __init__(self, paths: Sequence[Path], y: np.ndarray, preprocessing, seed: int = 0,
                 on_bad_file: str = "fail"):
        super().__init__(y, preprocessing, seed, on_bad_file)
        self.paths = list(paths)

    def encoded(self, i: int) -> Path:
        return self.paths[i]

    def name(self, i: int) -> str:
        return str(self.paths[i])


def load(spec: DataSpec, image: bool = True, task: str = "classification") -> Dataset:
    """A root with one folder of images per class, or train/ and val/ folders of such
    (else a stratified split). The files are listed and checked once, into an index
    reused while the folder is unchanged (`folder_index`), so no rank trains on a
    file it cannot read; the pixels are read later, by the loader."""
    root = Path(spec.path)
    listing = folder_index.image_files(root, check_images)
    split_dirs = [root / "train", next((root / n for n in ("val", "validation") if (root / n).is_dir()), None)]
    if split_dirs[0].is_dir() and split_dirs[1] is not None:
        if spec.test_fraction:
            raise DataError(f"{root}: data.test_fraction splits one folder of classes; with train/ and "
                            "val/ folders, put the test images in test/")
        train_files, classes = class_files(root, "train", listing)
        parts = [train_files, class_files(root, split_dirs[1].name, listing, classes)[0]]
        if (root / "test").is_dir():
            parts.append(class_files(root, "test", listing, classes)[0])
        paths = [p for files in parts for c in classes for p in files[c]]
        labels = np.asarray([i for files in parts for i, c in enumerate(classes) for _ in files[c]], dtype=np.int64)
        ends = np.cumsum([sum(len(v) for v in files.values()) for files in parts])
        train, val = np.arange(ends[0]), np.arange(ends[0], ends[1])
        test = np.arange(ends[1], ends[2]) if len(parts) == 3 else np.zeros(0, dtype=np.int64)
    else:
        files, classes = class_files(root, "", listing)
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
    probe = ImageSamples(paths, labels, None)
    size = list(spec.image_size or image_size(probe, int(train[0])))
    mean, std = channel_statistics(probe, train, size, spec)
    prep = Preprocessing([], classes, [3, *size], [], mean, std, image_size=size, augment=spec.augment or "none")
    split = lambda rows: ImageSamples([paths[i] for i in rows], labels[rows], prep, spec.seed,
                                      spec.on_bad_file)  # noqa: E731
    return Dataset(split(train), split(val), prep, test=split(test) if len(test) else None)


def class_files(root: Path, part: str, listing: dict[str, list[str]],
                classes: list[str] | None = None) -> tuple[dict[str, list[Path]], list[str]]:
    """The image files of each class folder of root/part (at any depth below it),
    sorted, from the folder's index; classes: the training split's, which a
    validation folder must have, each with at least one image."""
    folder = root / part if part else root
    prefix = f"{part}/" if part else ""
    below = [d[len(prefix):] for d in listing if d.startswith(prefix) and d != part]
    found = sorted({d.split("/")[0] for d in below}, key=natural_key)
    files: dict[str, list[Path]] = {c: [] for c in found}
    for d in below:
        files[d.split("/")[0]] += [root / prefix / d / name for name in listing[prefix + d]]
    files = {c: sorted(paths) for c, paths in files.items()}
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


def check_images(paths: list[Path], decode: bool = False) -> None:
    """Every file's header, in this thread (35 us a JPEG: threads would only contend
    for the interpreter), or with decode its pixels too, in threads; the first
    problem raised."""
    if decode:
        with ThreadPoolExecutor(max_workers=8) as pool:
            problems = [p for p in pool.map(lambda path: check_image(path, True), paths) if p]
    else:
        problems = [p for p in map(check_image, paths) if p]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)


def check_image(path: Path, decode: bool = False) -> str | None:
    """Why an image file cannot be used, or None: its header is read (a PNG's chunks
    checked against their checksums) without decoding the pixels, which the loader
    does; decode: a JPEG is decoded too (`hvdtrain index --decode`)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.format == "PNG":
                image.verify()
            elif decode:
                image.load()
    except Exception as err:  # PIL raises many kinds for broken files
        return f"{path}: cannot read as an image ({type(err).__name__}: {err})"
    return None
