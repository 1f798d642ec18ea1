"""Data sets written to disk the way users keep them: class folders of PNG images,
.npy arrays, and a loader module of their own."""
from pathlib import Path

import numpy as np

COLOURS = np.array([[220, 40, 40], [40, 200, 40], [40, 60, 220]], dtype=np.float64)


def write_image(path: Path, label: int, size: int, rng: np.random.Generator) -> None:
    from PIL import Image
    pixels = COLOURS[label][None, None, :] + rng.normal(scale=40, size=(size, size, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)


def image_folder(root: Path, per_class: int = 24, size: int = 12, split: bool = False, seed: int = 0,
                 suffix: str = ".png") -> Path:
    """Three classes told apart by colour: red/, green/, blue/ (or train/ and val/ of such),
    PNG files (suffix .jpg: JPEG)."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(("red", "green", "blue")):
        for i in range(per_class):
            part = ("val" if i % 4 == 0 else "train") if split else ""
            # sizes vary: every image is resized to data.image_size
            write_image(root / part / name / f"{name}-{i:03d}{suffix}", label, size + i % 3, rng)
    return root


def truncated_jpeg(path: Path) -> Path:
    """Cut a JPEG file a little after the start of its pixel data: its header reads, its
    pixels do not."""
    data = path.read_bytes()
    path.write_bytes(data[:data.index(b"\xff\xda") + 40])
    return path


def npy_arrays(directory: Path, n: int = 1200, features: int = 16, classes: int = 3, seed: int = 0):
    """x.npy and y.npy: separable blobs."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=n)
    centres = rng.normal(scale=3.0, size=(classes, features))
    x = (centres[y] + rng.normal(size=(n, features))).astype(np.float32)
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / "x.npy", x)
    np.save(directory / "y.npy", y)
    return x, y
