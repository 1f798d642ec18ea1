"""Data: one reader per kind of source, chosen from `READERS` by `data.source`.

Layers, imports running one way: `types` (samples, preprocessing, data set) <-
`split` (labels, splits, shapes) and `sharding` (what each rank reads) <- `npy`,
`transforms` (what an image becomes) and the indexes (`folder_index`,
`shard_index`) <- `image_samples` (encoded images, decoded a batch at a time) <-
the readers (`arrays`, `images`, `shards`, `custom`) <- this table. A reader takes the
spec's data section and gives a `Dataset`; a new source is one module and one
entry here. numpy only: the backends' loaders turn samples into batches.
"""
from __future__ import annotations

from typing import Callable

from ..spec import DataSpec
from . import arrays, custom, images, shards
from .arrays import csv_features, read_csv_rows, read_npz, synthetic
from .sharding import eval_shard, shard_batches, steps_per_epoch
from .split import image_input, random_split, stratified_split
from .types import ArraySamples, Batch, Dataset, Preprocessing, Samples, loader_failure

Reader = Callable[[DataSpec, bool, str], Dataset]

READERS: dict[str, Reader] = {
    **{name: arrays.load for name in ("digits", "iris", "wine", "breast_cancer", "diabetes")},
    "synthetic": arrays.load,
    "file": arrays.load,  # .npz and .csv in memory; .npy memory-mapped (data.npy)
    "image_folder": images.load,
    "webdataset": shards.load,  # tar shards of images, read at each member's offset
    "custom": custom.load,
}


def load_dataset(spec: DataSpec, image: bool = False, task: str = "classification") -> Dataset:
    """The spec's data, cleaned, split (stratified for classes), standardised and
    shaped for the model (image: samples as [C, H, W])."""
    return READERS[spec.source](spec, image, task)


__all__ = ["READERS", "ArraySamples", "Batch", "Dataset", "Preprocessing", "Samples", "csv_features",
           "eval_shard", "image_input", "load_dataset", "loader_failure", "random_split", "read_csv_rows",
           "read_npz", "shard_batches", "stratified_split", "steps_per_epoch", "synthetic"]
