"""Sources read batch by batch: memory-mapped .npy (the same preprocessing as the
same arrays in memory), image folders, user loaders, and the spec's rules."""
import subprocess
import sys

import numpy as np
import pytest

from hvdtrain.data import load_dataset
from hvdtrain.errors import DataError, UserError
from hvdtrain.data import ArraySamples
from hvdtrain.data.custom import UserSamples
from hvdtrain.data.images import ImageSamples
from hvdtrain.data.npy import MappedSamples
from hvdtrain.spec import validate
from tests.data_sets import image_folder, npy_arrays, truncated_jpeg

BASE = {"name": "t", "backend": "torch", "model": {"kind": "mlp"}}


def data_spec(**data):
    return validate({**BASE, "data": data}).data


def test_npy_memory_mapped_gives_what_the_same_arrays_in_memory_give(tmp_path):
    x, y = npy_arrays(tmp_path, n=500, features=6)
    x[7, 2] = np.nan  # a missing value: dropped by both
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "same.npz", x=x, y=y)
    mapped = load_dataset(data_spec(source="file", path=str(tmp_path / "x.npy")))
    memory = load_dataset(data_spec(source="file", path=str(tmp_path / "same.npz")))
    assert isinstance(mapped.train, MappedSamples) and isinstance(memory.train, ArraySamples)
    assert mapped.dropped_rows == memory.dropped_rows == 1
    assert len(mapped.train) == len(memory.train) and len(mapped.val) == len(memory.val)
    np.testing.assert_allclose(mapped.preprocessing.mean, memory.preprocessing.mean, rtol=1e-9)
    np.testing.assert_allclose(mapped.preprocessing.std, memory.preprocessing.std, rtol=1e-9)
    idx = np.array([5, 0, 17, 3])
    for a, b in ((mapped.train, memory.train), (mapped.val, memory.val)):
        (xa, ya), (xb, yb) = a.batch(idx), b.batch(idx)
        np.testing.assert_allclose(xa, xb, atol=1e-6)
        assert (ya == yb).all() and xa.dtype == np.float32


def test_npy_images_keep_their_stored_shape_and_labels_may_be_named(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "images.npy", rng.normal(size=(60, 2, 4, 4)).astype(np.float32))
    np.save(tmp_path / "targets.npy", np.arange(60) % 3)
    spec = validate({**BASE, "model": {"kind": "cnn"},
                     "data": {"source": "file", "path": str(tmp_path / "images.npy"),
                              "labels": str(tmp_path / "targets.npy")}})
    ds = load_dataset(spec.data, image=True)
    assert ds.preprocessing.input_shape == [2, 4, 4] and ds.num_classes == 3
    assert ds.train.batch(np.arange(3))[0].shape == (3, 2, 4, 4)


def test_npy_without_labels_beside_it_is_named(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((10, 2)))
    with pytest.raises(DataError, match="no labels: expected .*y.npy beside it, or set data.labels"):
        load_dataset(data_spec(source="file", path=str(tmp_path / "x.npy")))


def test_reading_every_row_of_a_mapped_file_keeps_resident_memory_far_below_its_size(tmp_path):
    """A fresh process scans a 250 MiB .npy (cleaning, statistics) and reads every
    row in batches: its peak RSS stays far below the file's size, because the
    mapped pages are given back after each chunk and batch."""
    x = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=(64_000, 1024))
    x[:] = np.arange(1024, dtype=np.float32)
    x.flush()
    del x
    np.save(tmp_path / "y.npy", np.arange(64_000) % 2)
    script = f"""
import numpy as np
from hvdtrain.data import load_dataset
from hvdtrain.train.epoch_end import peak_rss_mb
from hvdtrain.spec import validate
spec = validate({{"name": "t", "backend": "torch", "model": {{"kind": "mlp"}},
                  "data": {{"source": "file", "path": "{tmp_path / 'x.npy'}"}}}})
ds = load_dataset(spec.data)
for part in (ds.train, ds.val):
    for start in range(0, len(part), 512):
        part.batch(np.arange(start, min(start + 512, len(part))))
print(peak_rss_mb())
"""
    peak_mb = float(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                 check=True).stdout.split()[-1])
    assert peak_mb < 150, peak_mb  # the file: 250 MiB


def test_image_folder_split_statistics_and_batches(tmp_path):
    root = image_folder(tmp_path / "img", per_class=10, size=8)
    ds = load_dataset(data_spec(source="image_folder", path=str(root), image_size=[6, 5], augment="none"))
    assert isinstance(ds.train, ImageSamples)
    assert ds.preprocessing.classes == ["blue", "green", "red"] and ds.preprocessing.input_shape == [3, 6, 5]
    assert len(ds.train) + len(ds.val) == 30 and len(ds.val) == 6  # 2 of each class's 10
    assert sorted(np.bincount(ds.val.y)) == [2, 2, 2]
    pixels, y = ds.train.batch(np.arange(len(ds.train)))
    assert pixels.shape == (24, 3, 6, 5) and pixels.dtype == np.uint8  # the backends normalise on the device
    x = ds.preprocessing.apply(pixels)
    assert x.dtype == np.float32
    # standardised per channel from the training images
    assert np.abs(x.mean(axis=(0, 2, 3))).max() < 0.1 and np.abs(x.std(axis=(0, 2, 3)) - 1).max() < 0.1
    scale, shift = ds.preprocessing.pixel_affine()
    mean, std = np.asarray(ds.preprocessing.mean), np.asarray(ds.preprocessing.std)
    np.testing.assert_allclose(x, (pixels / 255.0 - mean[:, None, None]) / std[:, None, None], rtol=1e-5, atol=1e-5)


def test_image_folder_with_one_class_is_refused(tmp_path):
    root = image_folder(tmp_path / "img", per_class=4)
    for name in ("green", "blue"):
        for p in (root / name).iterdir():
            p.unlink()
        (root / name).rmdir()
    with pytest.raises(DataError, match="at least 2 classes; found 1"):
        load_dataset(data_spec(source="image_folder", path=str(root)))


def test_image_folder_class_too_small_for_a_validation_share_is_named(tmp_path):
    root = image_folder(tmp_path / "img", per_class=6)
    for p in sorted((root / "green").iterdir())[1:]:
        p.unlink()
    with pytest.raises(DataError, match="class 'green' has too few images for a validation share"):
        load_dataset(data_spec(source="image_folder", path=str(root)))


def test_a_jpeg_that_does_not_decode_stops_the_job_naming_it_rank_and_epoch(tmp_path, monkeypatch):
    root = image_folder(tmp_path / "img", per_class=10, size=64, suffix=".jpg")
    broken = truncated_jpeg(root / "green" / "green-003.jpg")
    monkeypatch.setenv("HOROVOD_RANK", "1")
    # the header reads: found when a batch reads it (the statistics would read it first)
    ds = load_dataset(data_spec(source="image_folder", path=str(root), image_size=16, standardize=False))
    at = next(i for i, p in enumerate(ds.train.paths + ds.val.paths) if p == broken)
    samples, i = (ds.train, at) if at < len(ds.train) else (ds.val, at - len(ds.train))
    with pytest.raises(DataError, match=f"{broken}: cannot read as an image .*rank 1, epoch 3; "
                                        "data.on_bad_file: skip goes on without it"):
        samples.batch(np.array([i]), epoch=2)


def test_a_jpeg_that_does_not_decode_is_skipped_named_once_and_counted(tmp_path, capfd):
    root = image_folder(tmp_path / "img", per_class=10, size=64, suffix=".jpg")
    broken = truncated_jpeg(root / "red" / "red-004.jpg")
    ds = load_dataset(data_spec(source="image_folder", path=str(root), image_size=16, on_bad_file="skip"))
    samples = ds.train if broken in ds.train.paths else ds.val
    bad = samples.paths.index(broken)
    indices = np.array([bad, (bad + 1) % len(samples), (bad + 2) % len(samples)])
    for epoch in (0, 0, 1):
        pixels, labels = samples.batch(indices, epoch)
        # the batch keeps its size: the next file of the batch stands in, with its own label
        assert pixels.shape == (3, 3, 16, 16)
        expected, _ = samples.batch(indices[1:2], epoch)
        np.testing.assert_array_equal(pixels[0], expected[0])
        np.testing.assert_array_equal(labels, samples.y[[indices[1], indices[1], indices[2]]])
    assert capfd.readouterr().err.count(f"hvdtrain: skipped {broken}: cannot read as an image") == 1
    assert ds.newly_skipped() == 3 and ds.newly_skipped() == 0
    with pytest.raises(DataError, match=f"{broken}: no sample of its batch of 1 could be read"):
        samples.batch(np.array([bad]), 0)


def write_loader(tmp_path, body):
    (tmp_path / "my_loaders.py").write_text(body)
    import sys
    sys.path.insert(0, str(tmp_path))
    sys.modules.pop("my_loaders", None)


def test_custom_loader_map_style_sets_with_classes_from_their_labels(tmp_path):
    write_loader(tmp_path, '''
import numpy as np

class Pairs:
    def __init__(self, n, seed):
        self.x = np.random.default_rng(seed).normal(size=(n, 3)).astype("float32")
    def __len__(self):
        return len(self.x)
    def __getitem__(self, i):
        return self.x[i], i % 4

def load(n=40, seed=0):
    return Pairs(n, seed), Pairs(8, seed + 1)
''')
    ds = load_dataset(data_spec(source="custom", loader="my_loaders:load", args={"n": 20}, seed=3))
    assert isinstance(ds.train, UserSamples) and len(ds.train) == 20 and len(ds.val) == 8
    assert ds.preprocessing.classes == ["0", "1", "2", "3"] and ds.preprocessing.input_shape == [3]
    x, y = ds.train.batch(np.array([1, 2]))
    assert x.dtype == np.float32 and y.tolist() == [1, 2]


@pytest.mark.parametrize("body, message", [
    ("def load():\n    return [1, 2, 3, 4]\n", "returned list; expected a pair"),
    ("def load():\n    return 1, 2\n", "training set\\): got int; expected a map-style data set"),
    ("import numpy as np\ndef load():\n    return (np.zeros((4, 2)), np.zeros(3)), (np.zeros((2, 2)), np.zeros(2))\n",
     "4 samples but 3 labels"),
    ("import numpy as np\ndef load():\n    return (np.zeros((4, 2)), np.array([0, 1, 2, 3])), "
     "(np.zeros((2, 2)), np.array([0, 7]))\n", "validation label 7 is not a class index 0..3"),
    ("def load():\n    raise OSError('bucket not found')\n", "raised OSError: bucket not found"),
])
def test_custom_loader_problems_are_named(tmp_path, body, message):
    write_loader(tmp_path, body)
    with pytest.raises(UserError, match=message):
        load_dataset(data_spec(source="custom", loader="my_loaders:load"))


@pytest.mark.parametrize("raw, message", [
    ({"data": {"source": "custom"}}, "source 'custom' needs data.loader"),
    ({"data": {"source": "iris", "loader": "a.b:c"}}, "data.loader needs source 'custom'"),
    ({"data": {"source": "image_folder"}}, "needs data.path"),
    ({"data": {"source": "iris", "image_size": 8}}, "image_size applies to image files \\(source 'image_folder' or 'webdataset'\\)"),
    ({"data": {"source": "iris", "labels": "y.npy"}}, "data.labels names the labels of a .npy"),
    ({"data": {"source": "iris"}, "checkpoint": {"every_steps": 3}, "horovod": {"backward_passes_per_step": 2}},
     "every_steps \\(3\\) must be a multiple of horovod.backward_passes_per_step \\(2\\)"),
    ({"data": {"source": "iris"}, "checkpoint": {"every_steps": 4},
      "horovod": {"elastic": {"max_workers": 2, "discovery": "d.sh"}}}, "does not apply to elastic training"),
])
def test_spec_rules_for_sources_and_step_checkpoints(raw, message):
    from hvdtrain.errors import SpecError
    with pytest.raises(SpecError, match=message):
        validate({**BASE, **raw})


def test_workers_default_by_source():
    assert data_spec(source="iris").workers == 0
    assert data_spec(source="image_folder", path="imgs").workers == 2
    assert data_spec(source="file", path="x.npy").workers == 2
    assert data_spec(source="file", path="x.npy", workers=0).workers == 0
