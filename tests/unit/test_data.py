import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hvdtrain.data import load_dataset, shard_batches, stratified_split, steps_per_epoch
from hvdtrain.errors import DataError
from hvdtrain.spec import DataSpec


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 3000), size=st.integers(1, 16), batch=st.integers(1, 256),
       seed=st.integers(0, 10), epoch=st.integers(0, 50), last_batch=st.sampled_from(["pad", "drop"]))
def test_every_rank_takes_the_same_steps_of_exactly_batch_size(n, size, batch, seed, epoch, last_batch):
    if last_batch == "drop" and n < size * batch:
        with pytest.raises(DataError, match=f"{n} training samples do not fill one step of {size} ranks x "
                                            f"batch_size {batch}"):
            shard_batches(n, 0, size, batch, seed, epoch, last_batch=last_batch)
        return
    shards = [shard_batches(n, r, size, batch, seed, epoch, last_batch=last_batch) for r in range(size)]
    steps = {len(s) for s in shards}
    assert steps == {steps_per_epoch(n, size, batch, last_batch)}
    assert {len(b) for s in shards for b in s} == {batch}  # the spec's batch size, every step, every rank
    every = np.concatenate([np.concatenate(s) for s in shards])
    counts = np.bincount(every, minlength=n)
    if last_batch == "pad":  # every sample at least once; the repeats are the fewest that fill the last step
        assert counts.min() >= 1 and len(every) - n < size * batch
        assert counts.max() <= -(-size * batch // n) + 1
    else:  # no sample twice; fewer than one step's worth left out
        assert counts.max() == 1 and n - len(every) < size * batch


def test_shard_order_depends_on_seed_and_epoch_only():
    a = shard_batches(1000, 1, 4, 32, seed=3, epoch=5)
    b = shard_batches(1000, 1, 4, 32, seed=3, epoch=5)
    c = shard_batches(1000, 1, 4, 32, seed=3, epoch=6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_stratified_split_keeps_class_shares_and_is_deterministic():
    y = np.repeat(np.arange(3), [100, 50, 10])
    train, val = stratified_split(y, 0.2, seed=1)
    assert np.bincount(y[val]).tolist() == [20, 10, 2]
    assert not set(train) & set(val) and len(train) + len(val) == len(y)
    again = stratified_split(y, 0.2, seed=1)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])


@pytest.mark.parametrize("source, classes", [("digits", 10), ("iris", 3), ("wine", 3), ("breast_cancer", 2)])
def test_bundled_datasets_load_standardised(source, classes):
    ds = load_dataset(DataSpec(source=source))
    assert ds.num_classes == classes
    assert ds.train.x.dtype == np.float32 and ds.train.y.dtype == np.int64
    features = ds.train.x.reshape(len(ds.train.x), -1)
    varying = features.std(axis=0) > 0
    assert np.allclose(features.mean(axis=0), 0, atol=1e-4)
    assert np.allclose(features.std(axis=0)[varying], 1, atol=1e-3)
    assert np.isfinite(ds.val.x).all()


def test_digits_as_images_for_a_cnn():
    ds = load_dataset(DataSpec(source="digits"), image=True)
    assert ds.train.x.shape[1:] == (1, 8, 8)


def write_csv(path, rows):
    path.write_text("\n".join(",".join(map(str, r)) for r in rows) + "\n")


def test_csv_cleaning_drops_or_imputes_non_finite_rows(tmp_path):
    path = tmp_path / "d.csv"
    rows = [["a", "b", "label"]] + [[i, 2 * i, "cat" if i % 2 else "dog"] for i in range(20)]
    rows[3][0] = ""        # missing value
    rows[5][1] = "inf"     # non-finite
    write_csv(path, rows)
    dropped = load_dataset(DataSpec(source="file", path=path, validation_fraction=0.25))
    assert dropped.dropped_rows == 2
    assert len(dropped.train.y) + len(dropped.val.y) == 18
    assert dropped.preprocessing.classes == ["cat", "dog"]
    imputed = load_dataset(DataSpec(source="file", path=path, clean="impute", validation_fraction=0.25))
    assert imputed.dropped_rows == 0 and len(imputed.train.y) + len(imputed.val.y) == 20
    assert np.isfinite(imputed.train.x).all() and np.isfinite(imputed.val.x).all()


@pytest.mark.parametrize("rows, message", [
    ([["a", "label"], ["x", "1"], ["2", "0"]],
     r"column 'a' holds text \('x' on line 2\), not numbers: list it in data.categorical"),
    ([["a", "label"], ["1", "1"], ["x", "0"]], "d.csv:3: column 'a' holds 'x', not a number"),
    ([["a", "y"], ["1", "1"]], "no label column 'label'"),
    ([["a", "label"], ["1", "1", "3"]], "3 fields, header has 2"),
    ([["a", "label"], ["1", "1"], ["2", "1"]], "at least 2 classes"),
])
def test_bad_csv_files_give_clear_errors(tmp_path, rows, message):
    path = tmp_path / "d.csv"
    write_csv(path, rows)
    with pytest.raises(DataError, match=message):
        load_dataset(DataSpec(source="file", path=path))


def test_npz_file_and_image_shape(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x=rng.normal(size=(40, 2, 3, 3)), y=np.arange(40) % 4)
    ds = load_dataset(DataSpec(source="file", path=path, image_shape=[2, 3, 3]), image=True)
    assert ds.train.x.shape[1:] == (2, 3, 3) and ds.num_classes == 4
    with pytest.raises(DataError, match="holds 12 values"):
        load_dataset(DataSpec(source="file", path=path, image_shape=[3, 2, 2]), image=True)
    np.savez(path, features=np.zeros((4, 2)))
    with pytest.raises(DataError, match="needs arrays"):
        load_dataset(DataSpec(source="file", path=path))


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_dataset(DataSpec(source="file", path=tmp_path / "none.csv"))


def test_synthetic_data_has_requested_shape_and_classes():
    spec = DataSpec(source="synthetic", synthetic={"samples": 500, "shape": [3, 4, 4], "classes": 5})
    ds = load_dataset(spec, image=True)
    assert ds.train.x.shape[1:] == (3, 4, 4) and ds.num_classes == 5
    assert len(ds.train.y) + len(ds.val.y) == 500


def test_preprocessing_applies_training_statistics_to_new_inputs():
    ds = load_dataset(DataSpec(source="iris"))
    raw = np.array([[5.1, 3.5, 1.4, 0.2], [np.nan, 3.0, 5.0, 1.8]])
    out = ds.preprocessing.apply(raw)
    prep = ds.preprocessing
    assert np.allclose(out[0], (raw[0] - prep.mean) / np.asarray(prep.std), atol=1e-6)
    assert np.isfinite(out).all()
    with pytest.raises(DataError, match="expected 4 features"):
        prep.apply(np.zeros((1, 3)))


def test_categorical_columns_are_one_hot_encoded(tmp_path):
    path = tmp_path / "d.csv"
    rows = [["size", "color", "label"]] + [[i, ["red", "green", "blue"][i % 3], i % 2] for i in range(30)]
    write_csv(path, rows)
    ds = load_dataset(DataSpec(source="file", path=path, categorical=["color"], standardize=False))
    prep = ds.preprocessing
    assert prep.feature_names == ["size", "color=blue", "color=green", "color=red"]
    assert prep.columns == ["size", "color"] and prep.categories == {"color": ["blue", "green", "red"]}
    assert set(np.unique(ds.train.x[:, 1:])) == {0.0, 1.0} and (ds.train.x[:, 1:].sum(axis=1) == 1).all()
    with pytest.raises(DataError, match="data.categorical: 'shade' is not a feature column"):
        load_dataset(DataSpec(source="file", path=path, categorical=["shade"]))


def test_duplicate_rows_are_dropped_when_asked(tmp_path):
    path = tmp_path / "d.csv"
    rows = [["a", "b", "label"]] + [[i % 20, 1, i % 20 % 2] for i in range(40)]  # 20 rows, each twice
    write_csv(path, rows)
    assert load_dataset(DataSpec(source="file", path=path)).dropped_rows == 0
    ds = load_dataset(DataSpec(source="file", path=path, clean={"duplicates": "drop"}))
    assert ds.dropped_rows == 20 and len(ds.train.y) + len(ds.val.y) == 20


def test_a_bundled_set_is_read_from_its_cached_copy_after_the_first_launch(tmp_path):
    """Importing scikit-learn took a second of each launch's start-up: the first load keeps
    the set as .npz in the cache directory, later ones read it without importing
    scikit-learn and get the same arrays; an unreadable copy is written again."""
    code = ("import sys, json\nfrom hvdtrain.data.arrays import bundled\nx, y, names = bundled('digits')\n"
            "print(json.dumps({'sklearn': 'sklearn' in sys.modules, 'x': [list(x.shape), str(x.dtype), float(x.sum())],"
            " 'y': [str(y.dtype), int(y.sum())], 'names': names[:2] + names[-1:]}))")
    env = {**os.environ, "HVDTRAIN_CACHE": str(tmp_path)}

    def load() -> dict:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout)
    first = load()
    assert first["sklearn"] and first["x"][0] == [1797, 64] and first["names"] == ["pixel_0_0", "pixel_0_1", "pixel_7_7"]
    copies = sorted((tmp_path / "bundled").iterdir())
    assert len(copies) == 1 and copies[0].name.startswith("digits-scikit-learn-")  # nothing left aside
    second = load()
    assert not second.pop("sklearn") and second == {k: v for k, v in first.items() if k != "sklearn"}
    copies[0].write_bytes(b"not an npz")
    third = load()
    assert third.pop("sklearn") and third == second
    assert load()["sklearn"] is False


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16])
def test_arrays_are_standardised_with_float64_statistics_whatever_they_are_stored_as(tmp_path, dtype):
    """Float32 features are no longer copied to float64 whole (ResNet-50's synthetic images
    were 3 GB so): the statistics are still float64, and the inputs those of the formula
    in float64; a missing value is imputed with the training rows' column mean."""
    from hvdtrain.data.types import row_chunks
    rng = np.random.default_rng(5)
    x = (rng.normal(3.0, 2.0, size=(400, 6)) * 50).astype(dtype)
    y = np.arange(400) % 4
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_dataset(DataSpec(source="file", path=tmp_path / "d.npz", validation_fraction=0.25))
    train = np.sort(stratified_split(y, 0.25, 0)[0])
    ref = x[train].astype(np.float64)
    prep = ds.preprocessing
    np.testing.assert_allclose(prep.mean, ref.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(prep.std, ref.std(axis=0), rtol=1e-12)
    expected = ((x.astype(np.float64) - ref.mean(axis=0)) / ref.std(axis=0)).astype(np.float32)
    assert ds.train.x.dtype == np.float32
    np.testing.assert_allclose(np.sort(ds.train.x, axis=0), np.sort(expected[train], axis=0), rtol=0, atol=1e-6)
    assert prep.apply(x[:3]).tobytes() == expected[:3].tobytes()
    holed = x.astype(np.float64)
    holed[7, 2] = np.nan
    imputed = prep.apply(holed[5:9])
    assert imputed[2, 2] == np.float32((prep.fill[2] - prep.mean[2]) / prep.std[2])
    assert [(s.start, s.stop) for s in row_chunks(10, 3, elements=7)] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert [(s.start, s.stop) for s in row_chunks(3, 100, elements=7)] == [(0, 1), (1, 2), (2, 3)]


def test_float32_samples_are_preprocessed_without_a_float64_copy_of_the_whole(monkeypatch):
    """Memory while loading, beyond the source's own float32 array: the preprocessed copy
    and the train / validation arrays, with float64 only a chunk at a time (chunks made
    small here, so that they count for little): under 3x the source, where a float64 copy
    with its temporaries took 5.5x."""
    import functools
    import tracemalloc
    from hvdtrain.data import arrays, types
    small = functools.partial(types.row_chunks, elements=1 << 14)
    monkeypatch.setattr(arrays, "row_chunks", small)
    monkeypatch.setattr(types, "row_chunks", small)
    spec = DataSpec(source="synthetic", synthetic={"samples": 512, "shape": [3, 32, 32], "classes": 10})
    source = arrays.synthetic(spec)
    monkeypatch.setattr(arrays, "read_source", lambda *_: (*source, [], {}))
    tracemalloc.start()
    try:
        ds = arrays.load(spec, image=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ds.train.x.dtype == np.float32 and len(ds.train) + len(ds.val) == 512
    assert peak < 3 * source[0].nbytes, peak / source[0].nbytes
