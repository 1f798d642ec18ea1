"""Parquet files and Hugging Face datasets as sources (hvdtrain/data/tables.py): the
same rules as the CSV path (cleaning, categories, the split, the statistics), read a
group of rows at a time, with the groups as the sharding's."""
import csv

import numpy as np
import pytest

from hvdtrain.data import load_dataset, shard_batches
from hvdtrain.data import tables
from hvdtrain.errors import DataError
from hvdtrain.spec import DataSpec
from tests.conftest import require_module

pa = require_module("pyarrow")
import pyarrow.parquet as pq  # noqa: E402


def rows(n=240, seed=0):
    """Features with a category, a missing value here and there, and a label."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 3, n)
    size = rng.normal(size=n) + label
    weight = rng.normal(size=n) * 10 + 5 * label
    weight[rng.choice(n, 12, replace=False)] = np.nan
    colour = rng.choice(["red", "green", "blue"], n)
    colour[rng.choice(n, 5, replace=False)] = ""
    return {"size": size, "weight": weight, "colour": colour, "label": np.array(["a", "b", "c"])[label]}


def write_both(tmp_path, columns, row_group_size=50):
    """The same rows as a .csv and as a .parquet of several row groups."""
    n = len(columns["label"])
    with open(tmp_path / "t.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(columns))
        for i in range(n):
            writer.writerow(["" if isinstance(v[i], float) and np.isnan(v[i]) else v[i] for v in columns.values()])
    table = pa.table({k: (pa.array([None if v == "" else v for v in vs]) if vs.dtype.kind == "U" else
                          pa.array(vs, from_pandas=True)) for k, vs in columns.items()})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=row_group_size)
    return tmp_path / "t.csv", tmp_path / "t.parquet"


@pytest.mark.parametrize("missing", ["impute", "drop"])
def test_parquet_gives_what_the_same_rows_as_csv_give(tmp_path, missing):
    csv_path, parquet = write_both(tmp_path, rows())
    common = {"categorical": ["colour"], "clean": {"missing": missing}, "validation_fraction": 0.25}
    from_csv = load_dataset(DataSpec(source="file", path=csv_path, **common))
    from_parquet = load_dataset(DataSpec(source="parquet", path=parquet, **common))
    a, b = from_csv.preprocessing, from_parquet.preprocessing
    assert a.feature_names == b.feature_names == ["size", "weight", "colour=blue", "colour=green", "colour=red"]
    assert a.classes == b.classes and a.categories == b.categories
    np.testing.assert_allclose(a.mean, b.mean)
    np.testing.assert_allclose(a.std, b.std)
    np.testing.assert_allclose(a.fill, b.fill)
    columns = rows()
    incomplete = int((np.isnan(columns["weight"]) | (columns["colour"] == "")).sum())
    assert from_csv.dropped_rows == from_parquet.dropped_rows == (incomplete if missing == "drop" else 0)
    for split in ("train", "val"):
        left, right = getattr(from_csv, split), getattr(from_parquet, split)
        assert len(left) == len(right)
        order = np.arange(len(left))[::-1]
        (xa, ya), (xb, yb) = left.batch(order), right.batch(order)
        np.testing.assert_allclose(xa, xb, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(ya, yb)


def test_row_groups_are_dealt_to_the_ranks_whole_and_read_a_few_at_a_time(tmp_path):
    _, parquet = write_both(tmp_path, rows(n=400), row_group_size=40)
    data = load_dataset(DataSpec(source="parquet", path=parquet, validation_fraction=0.2, categorical=["colour"]))
    train = data.train
    starts = train.rows.table.starts
    assert len(train.rows.table.groups) == 10
    group_of = np.searchsorted(starts, train.indices, side="right") - 1
    assert sorted(np.concatenate(train.groups).tolist()) == list(range(len(train)))
    assert all(len(set(group_of[g])) == 1 for g in train.groups)
    seen = []
    for rank in range(2):
        batches = shard_batches(len(train), rank, 2, 16, seed=0, epoch=3, groups=train.groups)
        groups_read = {int(g) for b in batches for g in group_of[b]}
        assert len(groups_read) <= 6, groups_read  # its run of groups, not all ten
        for b in batches:
            train.batch(b, 3)
            assert len(train.rows.cached) <= tables.CACHED_GROUPS
        seen += [i for b in batches for i in b]
    assert set(seen) == set(range(len(train)))  # every sample in the epoch (a few twice: pad)


def test_a_hugging_face_dataset_saved_to_disk_with_a_list_column(tmp_path):
    datasets = require_module("datasets")
    rng = np.random.default_rng(1)
    label = rng.integers(0, 2, 300)
    vectors = rng.normal(size=(300, 4)) + label[:, None]
    saved = datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"vector": vectors.tolist(), "note": ["x"] * 300, "label": label.tolist()})})
    saved.save_to_disk(str(tmp_path / "ds"))
    data = load_dataset(DataSpec(source="hf_dataset", path=tmp_path / "ds", columns=["vector"]))
    assert data.preprocessing.feature_names == ["vector[0]", "vector[1]", "vector[2]", "vector[3]"]
    assert len(data.train) + len(data.val) == 300
    x, y = data.train.batch(np.arange(len(data.train)))
    rows_ = data.train.indices
    np.testing.assert_allclose(x * np.asarray(data.preprocessing.std) + np.asarray(data.preprocessing.mean),
                               vectors[rows_], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(data.preprocessing.classes)[y], label[rows_].astype(str))


@pytest.mark.parametrize("change, message", [
    ({"label_column": "kind"}, "has no label column 'kind' (columns: size, weight, colour, label)"),
    ({"columns": ["size", "height"]}, "data.columns: 'height' is not a feature column of"),
    ({"categorical": ["shade"]}, "data.categorical: 'shade' is not a feature column of"),
    ({}, "column 'colour' holds string, not numbers: list it in data.categorical"),
])
def test_bad_columns_are_named(tmp_path, change, message):
    _, parquet = write_both(tmp_path, rows())
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_dataset(DataSpec(source="parquet", path=parquet, **change))


def test_a_file_that_is_not_parquet_is_named(tmp_path):
    (tmp_path / "bad.parquet").write_text("label,x\n1,2\n")
    with pytest.raises(DataError, match=f"{tmp_path / 'bad.parquet'}: not a readable Parquet file"):
        load_dataset(DataSpec(source="parquet", path=tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match="is not a dataset saved with save_to_disk"):
        require_module("datasets")
        load_dataset(DataSpec(source="hf_dataset", path=tmp_path))


def test_a_forked_loader_process_reads_with_its_own_parquet_readers(tmp_path):
    """A loader process is forked with its rank's open readers in memory: it opens its own
    (sharing Arrow reader state across a fork is how forked readers deadlock)."""
    import multiprocessing
    import pyarrow as pa
    pq.write_table(pa.table({"a": np.arange(100.0)}), tmp_path / "t.parquet", row_group_size=25)
    table = tables.ParquetTable(tmp_path / "t.parquet")
    assert table.read(0, ["a"]).num_rows == 25
    table._open[0].rank_s = True  # the rank's reader, marked
    context = multiprocessing.get_context("fork")
    results = context.Queue()

    def child():
        rows = table.read(1, ["a"]).column("a").to_pylist()
        results.put((rows[0], hasattr(table._open[0], "rank_s")))
    process = context.Process(target=child)
    process.start()
    first, shared = results.get(timeout=60)
    process.join(60)
    assert (first, shared) == (25.0, False)
    assert hasattr(table._open[0], "rank_s")  # the rank keeps its own
