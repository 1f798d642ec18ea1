"""WebDataset tar shards: `hvdtrain shards` writes what WebDataset's own reader reads,
`data.source: webdataset` gives the pixels the image folder gives, shards are dealt
to the ranks whole with every sample once an epoch, and bad shards are named."""
import gzip
import io
import tarfile

import numpy as np
import pytest

from hvdtrain.data import load_dataset, shard_batches
from hvdtrain.data import shard_index
from hvdtrain.errors import DataError
from hvdtrain.spec import validate
from tests.data_sets import image_folder

BASE = {"name": "t", "backend": "torch", "model": {"kind": "cnn"}}


def data_spec(**data):
    return validate({**BASE, "data": data}).data


@pytest.fixture
def shards(tmp_path, cli):
    images = image_folder(tmp_path / "colours", per_class=20, size=24, split=True, suffix=".jpg")
    out = tmp_path / "shards"
    result = cli("shards", images, out, "--per-shard", "16")
    assert result.returncode == 0, result.stderr
    assert "wrote 4 shards (45 train, 15 val samples)" in result.stdout  # 15 + 5 of each class
    return images, out


def test_written_shards_are_what_webdatasets_own_reader_reads(shards):
    import webdataset
    images, out = shards
    assert sorted(p.name for p in out.iterdir()) == ["classes.txt", "train-000000.tar", "train-000001.tar",
                                                     "train-000002.tar", "val-000000.tar"]
    classes = out.joinpath("classes.txt").read_text().split()
    assert classes == ["blue", "green", "red"]
    originals = {p.read_bytes(): p.parent.name for p in (images / "train").rglob("*.jpg")}
    read = list(webdataset.WebDataset(str(out / "train-{000000..000002}.tar"), shardshuffle=False))
    assert len(read) == 45 and len({s["__key__"] for s in read}) == 45
    for sample in read:  # the file's bytes unchanged, its class by number
        assert originals[sample["jpg"]] == classes[int(sample["cls"])]
    labels = [int(s["cls"]) for s in read[:16]]
    assert len(set(labels)) == 3  # a shard holds a mix of the classes, not one class after another


def test_webdataset_gives_the_image_folders_pixels_and_splits(shards):
    images, out = shards
    common = {"image_size": 16, "augment": "standard"}
    from_shards = load_dataset(data_spec(source="webdataset", path=str(out), **common), image=True)
    from_folder = load_dataset(data_spec(source="image_folder", path=str(images), **common), image=True)
    assert from_shards.preprocessing.classes == from_folder.preprocessing.classes
    assert (len(from_shards.train), len(from_shards.val)) == (45, 15)  # val-*.tar is the validation split
    np.testing.assert_allclose(from_shards.preprocessing.mean, from_folder.preprocessing.mean, atol=0.02)
    # the same file decodes to the same evaluation pixels, whichever source holds it
    by_bytes = {p.read_bytes(): i for i, p in enumerate(from_folder.val.paths)}
    for i in range(len(from_shards.val)):
        twin = by_bytes[from_shards.val.encoded(i).getvalue()]
        pixels, label = from_shards.val.batch(np.array([i]))
        expected, expected_label = from_folder.val.batch(np.array([twin]))
        np.testing.assert_array_equal(pixels, expected)
        assert from_shards.preprocessing.classes[label[0]] == from_folder.preprocessing.classes[expected_label[0]]
    # a brace pattern of the training shards alone: the validation split is drawn, stratified
    pattern = load_dataset(data_spec(source="webdataset", path=str(out / "train-{000000..000002}.tar"),
                                     validation_fraction=0.2, **common), image=True)
    assert (len(pattern.train), len(pattern.val)) == (36, 9) and sorted(np.bincount(pattern.val.y)) == [3, 3, 3]
    assert pattern.preprocessing.classes == ["blue", "green", "red"]  # classes.txt beside the shards


def test_shards_are_dealt_whole_and_every_sample_trains_once_an_epoch():
    sizes = [40, 40, 40, 17, 40, 40, 23]  # the last shards of a set are often short; 240 fill 1-3 ranks' steps
    groups = list(np.split(np.arange(sum(sizes)), np.cumsum(sizes)[:-1]))
    shard_of = np.repeat(np.arange(len(sizes)), sizes)
    for size in (1, 2, 3):
        orders = []
        for epoch in (0, 1):
            batches = [shard_batches(sum(sizes), rank, size, 8, seed=0, epoch=epoch, groups=groups)
                       for rank in range(size)]
            assert len({len(b) for b in batches}) == 1  # the same step count on every rank
            seen = np.concatenate([np.concatenate(b) for b in batches])
            assert sorted(seen.tolist()) == list(range(sum(sizes)))  # every sample once
            for rank_batches in batches:
                touched = np.unique(shard_of[np.concatenate(rank_batches)])
                # whole shards but for the two at the rank's edges
                partial = [s for s in touched if np.isin(groups[s], np.concatenate(rank_batches)).sum() < sizes[s]]
                assert len(partial) <= 2
            orders.append(seen)
        assert not np.array_equal(orders[0], orders[1])  # each epoch its own order
        again = [shard_batches(sum(sizes), 0, size, 8, seed=0, epoch=1, groups=groups)]
        assert all(np.array_equal(a, b) for a, b in zip(again[0], shard_batches(sum(sizes), 0, size, 8, 0, 1,
                                                                                   groups=groups)))
    # samples that do not fill the last step (242 for 3 ranks x 8): the last rank also takes the
    # epoch's first 22 again (pad), so every sample is trained at least once
    batches = [np.concatenate(shard_batches(242, rank, 3, 8, seed=0, epoch=0, groups=groups + [np.arange(240, 242)]))
               for rank in range(3)]
    assert [len(b) for b in batches] == [88, 88, 88] and set(np.concatenate(batches).tolist()) == set(range(242))
    np.testing.assert_array_equal(batches[2][-22:], batches[0][:22])


def test_a_shards_index_is_cached_while_it_is_unchanged(shards, monkeypatch):
    _, out = shards
    shard = out / "train-000000.tar"
    first = shard_index.shard_samples(shard)
    assert len(first) == 16 and all(ext == "jpg" for _, ext, _, _, _ in first)
    monkeypatch.setattr(shard_index, "read_shard", lambda path: pytest.fail("read again"))
    assert shard_index.shard_samples(shard) == first
    monkeypatch.undo()
    with tarfile.open(shard, "a") as tar:  # changed: one more sample
        for name, data in (("extra.jpg", (out.parent / "colours" / "train" / "red").glob("*.jpg")), ):
            payload = next(data).read_bytes()
            for member, content in ((name, payload), ("extra.cls", b"2")):
                info = tarfile.TarInfo(member)
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    assert len(shard_index.shard_samples(shard)) == 17


@pytest.mark.parametrize("make, message", [
    (lambda d: d.joinpath("a.tar").write_text("not a tar file at all" * 40), "not a readable uncompressed tar"),
    (lambda d: d.joinpath("a.tar").write_bytes(gzip.compress(tar_bytes({"k.jpg": b"x", "k.cls": b"1"}))),
     "not a readable uncompressed tar"),
    (lambda d: d.joinpath("a.tar").write_bytes(tar_bytes({"k.jpg": b"x"})), "sample 'k' has no class member"),
    (lambda d: d.joinpath("a.tar").write_bytes(tar_bytes({"k.cls": b"1"})), "sample 'k' has no image member"),
    (lambda d: d.joinpath("a.tar").write_bytes(tar_bytes({"k.jpg": b"x", "k.cls": b"cat"})),
     "k.cls holds 'cat', not a class number"),
    (lambda d: None, "no .tar shards in the directory"),
])
def test_bad_shards_are_named(tmp_path, make, message):
    folder = tmp_path / "shards"
    folder.mkdir()
    make(folder)
    with pytest.raises(DataError, match=message):
        load_dataset(data_spec(source="webdataset", path=str(folder)), image=True)


def test_a_missing_shard_of_a_pattern_is_named(shards):
    _, out = shards
    with pytest.raises(DataError, match=r"shard .*train-000003.tar does not exist"):
        load_dataset(data_spec(source="webdataset", path=str(out / "train-{000000..000003}.tar")), image=True)


def test_hvdtrain_shards_refuses_a_directory_that_holds_shards(shards, cli):
    images, out = shards
    again = cli("shards", images, out)
    assert again.returncode == 2 and f"{out}: holds .tar files already" in again.stderr
    assert "Traceback" not in again.stderr


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def test_a_process_keeps_few_shards_open_however_many_it_reads(shards, monkeypatch):
    from hvdtrain.data import shards as reader
    _, out = shards
    monkeypatch.setattr(reader, "OPEN_SHARDS", 2)
    samples = load_dataset(data_spec(source="webdataset", path=str(out), image_size=8), image=True).train
    for i in range(len(samples)):  # every sample of three shards, in order
        samples.batch(np.array([i]))
        assert len(samples.files) <= 2
    assert samples.batch(np.arange(len(samples)))[0].shape == (len(samples), 3, 8, 8)
