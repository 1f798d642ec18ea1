"""Image transforms of the user's own (data.augment), for the tests."""
import numpy as np


def grey_flip(image, size, training, rng):
    """Grey pixels resized by striding; flipped top-down in training when the draw says so."""
    rows = np.linspace(0, image.shape[0] - 1, size[0]).astype(int)
    cols = np.linspace(0, image.shape[1] - 1, size[1]).astype(int)
    grey = image[rows][:, cols].mean(axis=2, keepdims=True).repeat(3, axis=2).astype(np.uint8)
    return grey[::-1] if training and rng.random() < 0.5 else grey


def wrong_size(image, size, training, rng):
    return image


def fails(image, size, training, rng):
    raise RuntimeError("no such filter")
