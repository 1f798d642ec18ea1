"""What an image file becomes on its way to the model (`data.augment`): RGB uint8
pixels of `data.image_size`, [3, H, W].

`standard` is the usual recipe for training image classifiers: a random crop of
8-100 % of the image's area with an aspect ratio from 3:4 to 4:3 (torchvision's
RandomResizedCrop: ten tries, then the centre), resized to the target size and
flipped left-right half the time; for validation, `evaluate` and `predict` the
image is resized so that the target size is 87.5 % of it and the centre cut out.
`none` resizes every image to the target size. A function by import path is the
user's own. The crop and the resize are one PIL operation on the decoded image;
a JPEG is decoded at the smallest scale (1/2, 1/4, 1/8) that still holds the
pixels the crop needs.

A training sample's draws come from (data.seed, epoch, its index in the split):
whichever rank or step reads it, and in a resumed run, the draws are the same.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import IO, Any, Callable, Sequence

import numpy as np

from ..errors import DataError, UserError

SCALE = (0.08, 1.0)  # of the image's area
RATIO = (3 / 4, 4 / 3)  # width / height
CENTRE = 0.875  # the evaluation crop's share of the resized image


def sample_rng(seed: int, epoch: int | None, index: int) -> np.random.Generator:
    """The draws of one sample: in training from (seed, epoch, index), else (seed, index)."""
    return np.random.default_rng([seed, index] if epoch is None else [seed, epoch, index])


def random_box(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop, as torchvision's RandomResizedCrop draws it."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    # the centre, with the aspect ratio clamped to RATIO
    aspect = width / height
    w, h = (width, round(width / RATIO[0])) if aspect < RATIO[0] else \
        (round(height * RATIO[1]), height) if aspect > RATIO[1] else (width, height)
    w, h = min(w, width), min(h, height)
    return (width - w) // 2, (height - h) // 2, (width - w) // 2 + w, (height - h) // 2 + h


def centre_box(width: int, height: int, size: Sequence[int]) -> tuple[float, float, float, float]:
    """The centre of the image that resizing it to cover size / CENTRE and cutting out
    `size` keeps, in the image's own pixels."""
    scale = max(size[0] / CENTRE / height, size[1] / CENTRE / width)
    w, h = size[1] / scale, size[0] / scale
    return (width - w) / 2, (height - h) / 2, (width + w) / 2, (height + h) / 2


def placement(width: int, height: int, size: Sequence[int], augment: str, training: bool,
              rng: np.random.Generator | None) -> tuple[tuple[float, ...], bool]:
    """(the box of the image that becomes the sample, in its pixels; whether it is then
    flipped left-right), drawn from rng in one order wherever the image is decoded."""
    if augment != "standard":
        return (0, 0, width, height), False
    if not training:
        return centre_box(width, height, size), False
    box = random_box(width, height, rng)
    return box, bool(rng.random() < 0.5)


def read_image(source: Path | IO[bytes], size: Sequence[int], augment: str = "none", training: bool = False,
               rng: np.random.Generator | None = None, name: str | None = None) -> np.ndarray:
    """One encoded image (a file, or its bytes) as RGB uint8 [3, H, W] of size (H, W),
    through `augment`; name: what to call it in an error (default: the path)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as image:
            if ":" in augment:
                return users(augment, np.asarray(image.convert("RGB")), size, training, rng)
            width, height = image.size
            box, flip = placement(width, height, size, augment, training, rng)
            image = decoded(image, box, size)
            box = scaled(box, image.size, (width, height))
            resized = image.resize((size[1], size[0]), Image.Resampling.BILINEAR, box=box) \
                if image.size != (size[1], size[0]) or box != (0, 0, *image.size) else image
            pixels = np.asarray(resized, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DataError(f"{name or source}: cannot read as an image ({err})") from None
    if flip:
        pixels = pixels[:, ::-1]
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def jpeg_placement(source: Path | IO[bytes], size: Sequence[int], augment: str, training: bool,
                   rng: np.random.Generator | None, name: str) -> tuple[bytes, tuple[float, ...], bool] | None:
    """For a JPEG decoded on the GPU: (its bytes, its box, its flip), drawn as read_image
    draws them, from its header alone; None for another format (decoded by read_image)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as image:
            if image.format != "JPEG" or image.mode not in ("RGB", "L"):
                return None
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DataError(f"{name}: cannot read as an image ({err})") from None
    box, flip = placement(width, height, size, augment, training, rng)
    if hasattr(source, "seek"):
        source.seek(0)
        return source.read(), box, flip
    return Path(source).read_bytes(), box, flip


def decoded(image, box: tuple[float, ...], size: Sequence[int]):
    """The image in RGB; a JPEG decoded at the smallest scale that keeps at least the
    target's pixels across the box (PIL's draft mode: 1/2, 1/4 or 1/8)."""
    if image.format == "JPEG":
        width, height = image.size
        need = (math.ceil(width * size[1] / max(box[2] - box[0], 1)),
                math.ceil(height * size[0] / max(box[3] - box[1], 1)))
        if need[0] < width and need[1] < height:
            image.draft("RGB", need)
    return image.convert("RGB")


def scaled(box: tuple[float, ...], now: tuple[int, int], was: tuple[int, int]) -> tuple[float, ...]:
    if now == was:
        return box
    fx, fy = now[0] / was[0], now[1] / was[1]
    return box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy


_USER: dict[str, Callable[..., Any]] = {}


def user_transform(reference: str) -> Callable[..., Any]:
    if reference not in _USER:
        from .. import plugins
        _USER[reference] = plugins.load(reference, "data.augment")
    return _USER[reference]


def users(reference: str, image: np.ndarray, size: Sequence[int], training: bool,
          rng: np.random.Generator | None) -> np.ndarray:
    """The user's transform of one image, checked: an RGB uint8 array [H, W, 3] of the
    target size, returned as [3, H, W]. Errors are DataErrors, which a loader's
    worker passes on as their message."""
    try:
        pixels = user_transform(reference)(image, tuple(size), training,
                                           rng if rng is not None else np.random.default_rng(0))
    except DataError:
        raise
    except UserError as err:
        raise DataError(str(err)) from None
    except Exception as err:
        raise DataError(f"data.augment: {reference} raised {type(err).__name__}: {err}") from None
    pixels = np.asarray(pixels)
    if pixels.shape != (size[0], size[1], 3) or pixels.dtype != np.uint8:
        raise DataError(f"data.augment: {reference} returned {pixels.dtype} {list(pixels.shape)}; expected "
                        f"uint8 [{size[0]}, {size[1]}, 3] (RGB, the size it was given)")
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))
