"""Columnar data: Parquet (`data.source: parquet`: a .parquet file or a directory of
them, read a row group at a time with pyarrow) and Hugging Face datasets saved with
`save_to_disk` (`data.source: hf_dataset`: opened with `datasets`, its Arrow files
memory-mapped; of a DatasetDict, its `train` split).

Features: `data.columns` (default: every column but `data.label_column`): numbers as
they are (a missing value is NaN, cleaned as for CSV), lists of numbers as one
feature per element, `data.categorical` columns one-hot as for CSV. One pass over
the table, a group of rows at a time, finds the labels, the rows to keep and the
categories; another the training split's statistics; batches are then read as the
loader asks for them, so memory stays at a few groups whatever the table's size.
A group (a Parquet row group; GROUP_ROWS rows of a dataset) is to the sharding what
a tar shard is: each rank reads whole groups, every sample once an epoch.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..spec import DataSpec
from .npy import feature_statistics
from .split import Targets, first_occurrences, input_shape, usable_labels
from .types import Dataset

GROUP_ROWS = 16_384  # rows of a Hugging Face dataset read together
CACHED_GROUPS = 4  # groups a process keeps decoded


class ParquetTable:
    """The row groups of one or more Parquet files, in file order."""

    def __init__(self, path: Path):
        import pyarrow.parquet as pq
        self.files = sorted(path.rglob("*.parquet"), key=str) if path.is_dir() else [path]
        if not self.files:
            raise DataError(f"data.path: {path} holds no .parquet file")
        self.groups: list[tuple[int, int]] = []  # (file, row group)
        sizes, schema = [], None
        for f, file in enumerate(self.files):
            try:
                meta = pq.ParquetFile(file).metadata
            except Exception as err:  # noqa: BLE001 -- pyarrow raises several kinds
                raise DataError(f"{file}: not a readable Parquet file ({err})") from None
            names = [meta.schema.column(i).path.split(".")[0] for i in range(meta.num_columns)]
            if schema is not None and list(dict.fromkeys(names)) != schema:
                raise DataError(f"{file}: its columns differ from {self.files[0]}'s")
            schema = list(dict.fromkeys(names))
            for g in range(meta.num_row_groups):
                self.groups.append((f, g))
                sizes.append(meta.row_group(g).num_rows)
        self.columns = schema or []
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._open: dict[int, Any] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:  # a loader process opens the files itself
        return {**self.__dict__, "_open": {}}

    def read(self, group: int, columns: list[str]):
        """One row group, read on this thread: Arrow's thread pool is not started, since
        loader processes forked while it runs can deadlock in their first read (a rank
        waited on one for 300 s); the loader processes read groups in parallel instead."""
        import pyarrow.parquet as pq
        f, g = self.groups[group]
        if self._pid != os.getpid():  # a forked loader process: its own readers, not its rank's
            self._open, self._pid = {}, os.getpid()
        if f not in self._open:
            self._open[f] = pq.ParquetFile(self.files[f])
        return self._open[f].read_row_group(g, columns=columns, use_threads=False)


class DatasetTable:
    """A Hugging Face dataset saved with save_to_disk (its train split, for a DatasetDict),
    in groups of GROUP_ROWS rows of its memory-mapped Arrow table."""

    def __init__(self, path: Path):
        self.path = path
        table = self.table()
        self.columns = list(table.column_names)
        self.starts = np.append(np.arange(0, table.num_rows, GROUP_ROWS), table.num_rows).astype(np.int64)
        self.groups = list(range(len(self.starts) - 1))

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_table"}

    def table(self):
        if getattr(self, "_table", None) is None:
            try:
                import datasets
            except ImportError:
                raise DataError("data.source hf_dataset reads with the datasets package: pip install "
                                "'hvdtrain[datasets]'") from None
            try:
                found = datasets.load_from_disk(str(self.path))
            except Exception as err:  # noqa: BLE001 -- datasets raises several kinds
                raise DataError(f"data.path: {self.path} is not a dataset saved with save_to_disk ({err})") from None
            if isinstance(found, datasets.DatasetDict):
                if "train" not in found:
                    raise DataError(f"data.path: {self.path} holds splits {', '.join(found)}; hvdtrain reads "
                                    "the 'train' split (and makes its own validation split)")
                found = found["train"]
            found = found.flatten_indices() if found._indices is not None else found
            self._table = found.data.table  # pyarrow, memory-mapped
        return self._table

    def read(self, group: int, columns: list[str]):
        start = int(self.starts[group])
        return self.table().slice(start, int(self.starts[group + 1]) - start).select(columns)


def open_table(spec: DataSpec) -> ParquetTable | DatasetTable:
    return ParquetTable(Path(spec.path)) if spec.source == "parquet" else DatasetTable(Path(spec.path))


class TableRows:
    """Rows of a table as float features, read a group at a time (the groups read last
    kept decoded): what the statistics pass indexes and the batches come from."""

    def __init__(self, table, columns: list[str], categories: dict[str, list[str]]):
        self.table, self.columns, self.categories = table, columns, categories
        self.cached: OrderedDict[int, np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "cached": OrderedDict()}

    def group(self, g: int) -> np.ndarray:
        if g not in self.cached:
            self.cached[g] = features(self.table.read(g, self.columns), self.columns, self.categories)
            while len(self.cached) > CACHED_GROUPS:
                self.cached.popitem(last=False)
        self.cached.move_to_end(g)
        return self.cached[g]

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        where = np.searchsorted(self.table.starts, rows, side="right") - 1
        out = None
        for g in np.unique(where):
            block = self.group(int(g))
            mine = np.flatnonzero(where == g)
            if out is None:
                out = np.empty((len(rows), block.shape[1]), np.float64)
            out[mine] = block[rows[mine] - self.table.starts[g]]
        return out if out is not None else np.empty((0, 0), np.float64)


class TableSamples:
    """Samples that are rows of a table; `groups`: the samples of each group of rows,
    which the sharding deals to the ranks whole."""

    def __init__(self, rows: TableRows, indices: np.ndarray, y: np.ndarray, preprocessing):
        self.rows, self.indices, self.y, self.preprocessing = rows, indices, y, preprocessing
        where = np.searchsorted(rows.table.starts, indices, side="right") - 1
        order = np.argsort(where, kind="stable")
        self.groups = [g for g in np.split(order, np.flatnonzero(np.diff(where[order])) + 1) if len(g)]

    def __len__(self) -> int:
        return len(self.indices)

    def batch(self, indices: np.ndarray, epoch: int | None = None):
        x = self.rows[self.indices[np.asarray(indices, dtype=np.int64)]]
        return self.preprocessing.apply(x), self.y[indices]


def features(table, columns: list[str], categories: dict[str, list[str]]) -> np.ndarray:
    """A group's feature matrix: numbers (missing: NaN), lists of numbers element by
    element, categories one-hot (missing: NaN in each; unseen: 0 in each)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    blocks = []
    for name in columns:
        column = table.column(name)
        kind = column.type
        if name in categories:
            known = {c: i for i, c in enumerate(categories[name])}
            block = np.zeros((len(column), len(known)))
            for r, value in enumerate(column.to_pylist()):
                if value is None or str(value) == "":
                    block[r] = np.nan
                elif str(value) in known:
                    block[r, known[str(value)]] = 1.0
        elif pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
            values = column.to_pylist()
            try:
                block = np.asarray([[np.nan] if v is None else v for v in values], dtype=np.float64)
            except ValueError:
                raise DataError(f"column {name!r}: its lists differ in length (or hold other than numbers); "
                                "a feature column needs one length") from None
            block = block.reshape(len(values), -1)
        elif pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind) or \
                pa.types.is_decimal(kind):
            block = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False).reshape(-1, 1)
        else:
            raise DataError(f"column {name!r} holds {kind}, not numbers: list it in data.categorical (one-hot), "
                            "or leave it out of data.columns")
        blocks.append(block)
    return np.concatenate(blocks, axis=1) if blocks else np.zeros((table.num_rows, 0))


def feature_names(table, columns: list[str], categories: dict[str, list[str]]) -> list[str]:
    """Each feature's name: the column's, `column=category`, or `column[i]` for a list's element."""
    sample = table.read(0, columns)
    names = []
    for name in columns:
        if name in categories:
            names += [f"{name}={c}" for c in categories[name]]
            continue
        width = features(sample.select([name]), [name], {}).shape[1]
        names += [name] if width == 1 else [f"{name}[{i}]" for i in range(width)]
    return names


def load(spec: DataSpec, image: bool, task: str) -> Dataset:
    table = open_table(spec)
    label = spec.label_column
    if label not in table.columns:
        raise DataError(f"data.path: {spec.path} has no label column {label!r} (columns: {', '.join(table.columns)}); "
                        "set data.label_column")
    columns = list(spec.columns) if spec.columns else [c for c in table.columns if c != label]
    unknown = [c for c in [*columns, *spec.categorical] if c not in table.columns or c == label]
    if unknown:
        key = "data.categorical" if unknown[0] in spec.categorical else "data.columns"
        raise DataError(f"{key}: {unknown[0]!r} is not a feature column of {spec.path} "
                        f"(columns: {', '.join(table.columns)})")
    columns += [c for c in spec.categorical if c not in columns]
    if not columns:
        raise DataError(f"data.path: {spec.path} has no feature column besides {label!r}")
    if not table.groups or int(table.starts[-1]) == 0:
        raise DataError(f"data.path: {spec.path} has no rows")
    # pass 1: labels and categories, only their columns read
    labels, found = [], {c: set() for c in spec.categorical}
    for g in range(len(table.groups)):
        part = table.read(g, [label, *spec.categorical])
        labels.extend(part.column(label).to_pylist())
        for c in spec.categorical:
            found[c].update(str(v) for v in part.column(c).to_pylist() if v is not None and str(v) != "")
    if task == "regression":
        try:
            labels = np.asarray([np.nan if v is None else v for v in labels], dtype=np.float64)
        except (TypeError, ValueError):
            raise DataError(f"{spec.path}: label column {label!r} holds other than numbers (task regression)") from None
    else:
        labels = np.asarray(["" if v is None else str(v) for v in labels])
    categories = {c: sorted(found[c]) for c in spec.categorical}
    rows = TableRows(table, columns, categories)
    keep = usable_labels(labels, task)
    if spec.clean.missing == "drop" or spec.clean.duplicates == "drop":
        seen: set[bytes] = set()
        for g in range(len(table.groups)):
            first, end = int(table.starts[g]), int(table.starts[g + 1])
            block = rows.group(g)
            if spec.clean.missing == "drop":
                keep[first:end] &= np.isfinite(block).all(axis=1)
            if spec.clean.duplicates == "drop":
                keep[first:end] &= first_occurrences(block, labels[first:end], seen)
    kept = np.flatnonzero(keep)
    targets = Targets.split(labels[kept], task, spec)
    names = feature_names(table, columns, categories)
    train_rows = np.sort(kept[targets.train])
    fill, mean, std = feature_statistics(rows, train_rows, len(names), GROUP_ROWS, spec.standardize)
    shape = input_shape(spec, len(names), image)
    prep = targets.preprocessing(names, list(shape), fill, mean, std, columns, categories)
    y, test = targets.y, targets.test
    return Dataset(TableSamples(rows, kept[targets.train], y[targets.train], prep),
                   TableSamples(rows, kept[targets.val], y[targets.val], prep), prep,
                   int((~keep).sum()), TableSamples(rows, kept[test], y[test], prep) if len(test) else None)
