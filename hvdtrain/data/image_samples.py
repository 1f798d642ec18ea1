"""Samples that are encoded images (files of a folder, members of tar shards),
decoded and transformed (`data.augment`) when a batch is asked for."""
from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path
from typing import IO

import numpy as np

from ..errors import DataError
from ..spec import DataSpec
from .transforms import jpeg_placement, read_image, sample_rng
from .types import Batch

STATISTICS_SAMPLE = 256  # training images the per-channel mean and std are taken from
RANK_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")


class EncodedImages:
    """RGB uint8 [n, 3, H, W] batches, normalised on the device
    (`Preprocessing.pixel_affine`). A batch of a training epoch draws its random
    crops and flips from (seed, epoch, each sample's index); without an epoch, the
    evaluation transform. A reader's subclass says where sample i's bytes are
    (`encoded`) and what to call it in a message (`name`).

    A sample that cannot be decoded stops the job (`data.on_bad_file: fail`), or its
    place in the batch goes to the next sample of the batch that reads (`skip`: the
    batch keeps its size), named on stderr once per process and counted in `skipped`,
    which the loader's worker processes share with the training process."""

    def __init__(self, y: np.ndarray, preprocessing, seed: int = 0, on_bad_file: str = "fail"):
        self.y, self.preprocessing, self.seed, self.on_bad_file = y, preprocessing, seed, on_bad_file
        self.skipped = multiprocessing.Value("q", 0)  # reads skipped, in every process
        self.named: set[int] = set()

    def __len__(self) -> int:
        return len(self.y)

    def encoded(self, i: int) -> Path | IO[bytes]:
        raise NotImplementedError

    def name(self, i: int) -> str:
        raise NotImplementedError

    def batch(self, indices: np.ndarray, epoch: int | None = None, out: np.ndarray | None = None) -> Batch:
        """The decoded batch at indices (a training epoch's draws, or the evaluation
        transform); out: a uint8 [n, 3, H, W] array to decode into (a loader process's
        shared memory: the batch is not copied again on its way to the training process)."""
        size, augment = self.preprocessing.image_size, self.preprocessing.augment
        x = out if out is not None else np.empty((len(indices), 3, *size), np.uint8)
        indices = [int(i) for i in indices]
        row_of, bad = {}, []  # an index read (a padded batch repeats some) -> its row
        for row, i in enumerate(indices):
            if i in row_of:
                x[row] = x[row_of[i]]
                continue
            try:
                x[row] = read_image(self.encoded(i), size, augment, epoch is not None,
                                    sample_rng(self.seed, epoch, i), name=self.name(i))
                row_of[i] = row
            except DataError as err:
                if self.on_bad_file == "fail":
                    raise DataError(f"{err} ({where(epoch)}; data.on_bad_file: skip goes on without "
                                    "it)") from None
                bad.append(row)
                if i not in self.named:
                    self.named.add(i)
                    print(f"hvdtrain: skipped {err} ({where(epoch)})", file=sys.stderr, flush=True)
        if bad:
            with self.skipped.get_lock():
                self.skipped.value += len(bad)
            good = list(row_of.items())
            if not good:
                raise DataError(f"{self.name(indices[bad[0]])}: no sample of its batch of {len(indices)} could "
                                f"be read ({where(epoch)}); data.on_bad_file: skip needs one")
            for k, row in enumerate(bad):  # the batch keeps its size: the next good samples stand in
                indices[row], source = good[k % len(good)]
                x[row] = x[source]
        return x, self.y[np.asarray(indices, dtype=np.int64)]

    def encoded_batch(self, indices: np.ndarray, epoch: int | None = None) -> tuple[dict, np.ndarray]:
        """The batch at indices for decoding on the GPU: the JPEGs' bytes one after another
        in one array (`jpeg`; file k is jpeg[ends[k - 1]:ends[k]], `ends`), each with its
        crop box and flip (`box`, `flip`, its place in the batch `at`), drawn as `batch`
        draws them; a file of another format, or one whose header does not read, decoded
        here (`pixels` at `pixels_at`, as `batch` decodes it: data.on_bad_file applies).
        The labels; `indices` for decoding the batch here when the GPU cannot.
        One array, not one per file: a loader process hands each array to the training
        process through shared memory of its own, and 256 of them a batch cost more
        than decoding it."""
        size, augment = self.preprocessing.image_size, self.preprocessing.augment
        jpegs, boxes, flips, at, others = [], [], [], [], []
        for position, i in enumerate(map(int, indices)):
            try:
                found = jpeg_placement(self.encoded(i), size, augment, epoch is not None,
                                       sample_rng(self.seed, epoch, i), self.name(i))
            except DataError:  # the whole batch decoded here, where data.on_bad_file applies
                jpegs, boxes, flips, at, others = [], [], [], [], list(range(len(indices)))
                break
            if found is None:
                others.append(position)
                continue
            jpegs.append(found[0])
            boxes.append(found[1])
            flips.append(found[2])
            at.append(position)
        ends = np.cumsum([len(j) for j in jpegs], dtype=np.int64)
        # writable: torch warns, once per loader process, on wrapping read-only bytes
        packed = np.frombuffer(bytearray(b"".join(jpegs)), dtype=np.uint8)
        parts = {"jpeg": packed, "ends": ends, "box": np.asarray(boxes, np.float32).reshape(-1, 4),
                 "flip": np.asarray(flips, bool), "at": np.asarray(at, np.int64),
                 "pixels_at": np.asarray(others, np.int64), "indices": np.asarray(indices, np.int64)}
        y = self.y[np.asarray(indices, dtype=np.int64)]
        if others:
            pixels, others_y = self.batch(np.asarray(indices)[others], epoch)
            parts["pixels"], y = pixels, y.copy()
            y[others] = others_y  # a skipped file's stand-in has its own label
        else:
            parts["pixels"] = np.zeros((0, 3, *size), np.uint8)
        return parts, y

    def skipped_count(self) -> int:
        return int(self.skipped.value)


def launched_rank() -> str:
    """This process's rank as its launcher set it (also in a loader's worker process,
    and before Horovod starts); "0" where none did."""
    return next((os.environ[v] for v in RANK_VARIABLES if v in os.environ), "0")


def where(epoch: int | None) -> str:
    """This process's rank and the epoch, for a message."""
    return f"rank {launched_rank()}, " + (f"epoch {epoch + 1}" if epoch is not None else "validation")


def channel_statistics(samples: EncodedImages, train: np.ndarray, size: list[int],
                       spec: DataSpec) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of a seeded sample of the training images (those that
    decode, with `data.on_bad_file: skip`)."""
    if not spec.standardize:
        return [0.0] * 3, [1.0] * 3
    chosen = np.random.default_rng(spec.seed).choice(train, size=min(len(train), STATISTICS_SAMPLE),
                                                     replace=False)
    read = []
    for i in sorted(int(c) for c in chosen):
        try:
            read.append(read_image(samples.encoded(i), size, name=samples.name(i)))
        except DataError as err:
            if spec.on_bad_file == "fail":
                raise DataError(f"{err} (reading the channel statistics; data.on_bad_file: skip goes on "
                                "without it)") from None
    if not read:
        raise DataError(f"{spec.path}: none of {len(chosen)} training images decodes")
    pixels = np.stack(read) / 255.0
    std = pixels.std(axis=(0, 2, 3))
    return pixels.mean(axis=(0, 2, 3)).tolist(), np.where(std > 1e-6, std, 1.0).tolist()


def image_size(samples: EncodedImages, i: int) -> tuple[int, int]:
    """(H, W) of sample i, from its header."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(samples.encoded(i)) as image:
            return image.size[1], image.size[0]
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"{samples.name(i)}: cannot read as an image ({err})") from None
