"""Data: one reader per kind of source, chosen from `READERS` by `data.source`.

Layers, imports running one way: `types` (samples, preprocessing, data set) <-
`split` (labels, splits, shapes) and `sharding` (what each rank reads) <- `npy`,
`transforms` (what an image becomes) and the indexes (`folder_index`,
`shard_index`) <- `image_samples` (encoded images, decoded a batch at a time) <-
the readers (`arrays`, `images`, `shards`, `tables`, `text`, `custom`) <- this table. A reader takes the
spec's data section and gives a `Dataset`; a new source is one module and one
entry here. numpy only: the backends' loaders turn samples into batches.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .. import storage
from ..errors import DataError
from ..horovod_build.build import cache_root
from ..spec import DataSpec
from . import arrays, custom, images, shards, tables, text
from .arrays import csv_features, read_csv_rows, read_npz, synthetic
from .shards import shard_list
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
    "parquet": tables.load,  # columnar files, a row group at a time
    "hf_dataset": tables.load,  # a Hugging Face dataset's Arrow files (save_to_disk), memory-mapped
    "text": text.load,  # texts made token ids by a tokenizers tokenizer
    "custom": custom.load,
}


def load_dataset(spec: DataSpec, image: bool = False, task: str = "classification") -> Dataset:
    """The spec's data, cleaned, split (stratified for classes), standardised and
    shaped for the model (image: samples as [C, H, W]). Data at a URL is read from
    this node's copy (`fetched`)."""
    return READERS[spec.source](fetched(spec), image, task)


def fetched(spec: DataSpec) -> DataSpec:
    """The spec with data.path (and data.labels) at a URL replaced by this node's copy
    in data.cache_dir (a .npy's labels, y.npy beside it, fetched with it)."""
    if not storage.is_url(spec.path):
        return spec
    cache = spec.cache_dir or cache_root() / "data"
    limit = spec.cache_max_gb * 1e9
    labels = spec.labels
    if spec.memory_mapped and labels is None:
        labels = f"{str(spec.path).rsplit('/', 1)[0]}/y.npy"

    def fetch(key: str, url: str) -> Path:
        try:
            return storage.fetch(url, cache, limit)
        except Exception as err:  # noqa: BLE001 -- each store's library raises its own
            raise DataError(f"{key}: cannot fetch {url}: {storage.describe(err)}") from None

    urls = shard_list(str(spec.path)) if spec.source == "webdataset" else [str(spec.path)]
    if urls != [str(spec.path)]:  # a brace pattern or list of shard URLs: each fetched, the reader given the list
        local = [fetch("data.path", url) for url in urls]
        names = f"{urls[0].rsplit('/', 1)[0]}/classes.txt"  # the class names beside the shards, if there
        if storage.read_problem(names) is None:
            beside = local[0].parent / "classes.txt"  # where the reader looks for them
            listed = fetch("data.path's classes.txt", names)
            try:
                beside.symlink_to(listed)
            except FileExistsError:  # this node's copy, linked before (or by another rank now)
                pass
        return spec.model_copy(update={"path": ",".join(map(str, local))})
    path = fetch("data.path", str(spec.path))
    if storage.is_url(labels):
        labels = fetch("data.labels" if spec.labels is not None else "data.path's labels (y.npy beside it)", labels)
    if spec.memory_mapped and spec.labels is None and labels is not None:
        local = path.with_name("y.npy")  # where the .npy reader looks for its labels
        if not local.exists():
            local.symlink_to(labels)
    return spec.model_copy(update={"path": path, "labels": labels if spec.labels is not None else None})


__all__ = ["READERS", "ArraySamples", "Batch", "Dataset", "Preprocessing", "Samples", "csv_features",
           "eval_shard", "image_input", "load_dataset", "loader_failure", "random_split", "read_csv_rows",
           "read_npz", "shard_batches", "stratified_split", "steps_per_epoch", "synthetic"]
