"""An image folder's index: built and checked once, reused while the folder is
unchanged, rebuilt when files come or go, built by one process of a machine."""
import multiprocessing
from pathlib import Path

import numpy as np
import pytest

from hvdtrain.data import folder_index, load_dataset
from hvdtrain.data.images import check_images
from hvdtrain.errors import DataError
from hvdtrain.spec import validate
from tests.data_sets import image_folder, truncated_jpeg, write_image


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HVDTRAIN_CACHE", str(tmp_path / "cache"))


class Checked:
    """A check that counts the files it was given, then checks them as hvdtrain does."""

    def __init__(self):
        self.files: list[Path] = []

    def __call__(self, paths):
        self.files += paths
        check_images(paths)


def test_the_index_is_built_and_checked_once_then_reused(tmp_path):
    root = image_folder(tmp_path / "img", per_class=5)
    check = Checked()
    first = folder_index.image_files(root, check)
    assert len(check.files) == 15 and first["red"] == [f"red-{i:03d}.png" for i in range(5)]
    assert folder_index.image_files(root, check) == first and len(check.files) == 15  # no listing, no check
    assert folder_index.cache_path(root).is_file()


def test_files_added_or_removed_since_make_it_stale(tmp_path):
    root = image_folder(tmp_path / "img", per_class=4)
    check = Checked()
    folder_index.image_files(root, check)
    write_image(root / "blue" / "blue-new.png", 2, 12, np.random.default_rng(1))
    assert "blue-new.png" in folder_index.image_files(root, check)["blue"] and len(check.files) == 12 + 13
    (root / "red" / "red-000.png").unlink()
    assert "red-000.png" not in folder_index.image_files(root, check)["red"]
    (root / "green" / "deeper").mkdir()
    write_image(root / "green" / "deeper" / "g.png", 1, 12, np.random.default_rng(2))
    assert folder_index.image_files(root, check)["green/deeper"] == ["g.png"]


def test_a_file_that_cannot_be_read_is_named_and_nothing_is_cached(tmp_path):
    root = image_folder(tmp_path / "img", per_class=4)
    broken = root / "green" / "green-002.png"
    broken.write_bytes(broken.read_bytes()[:60])
    with pytest.raises(DataError, match=f"{broken}: cannot read as an image"):
        folder_index.image_files(root, check_images)
    assert not folder_index.cache_path(root).exists()


def build_in_a_process(root: str, log: str) -> None:
    def check(paths):
        with open(log, "a") as handle:
            handle.write(f"{len(paths)}\n")
    folder_index.image_files(Path(root), check)


def test_the_ranks_of_a_machine_build_it_once(tmp_path):
    root = image_folder(tmp_path / "img", per_class=30)
    log = tmp_path / "built"
    context = multiprocessing.get_context("spawn")
    ranks = [context.Process(target=build_in_a_process, args=(str(root), str(log))) for _ in range(3)]
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join(60)
    assert [rank.exitcode for rank in ranks] == [0, 0, 0]
    assert log.read_text().split() == ["90"]  # one of them listed and checked; the others read its index


def test_the_data_set_follows_the_folder(tmp_path):
    root = image_folder(tmp_path / "img", per_class=10)
    spec = validate({"name": "t", "backend": "torch", "model": {"kind": "cnn"},
                     "data": {"source": "image_folder", "path": str(root), "image_size": 12}}).data
    before = load_dataset(spec, image=True)
    for i in range(5):
        write_image(root / "red" / f"red-extra-{i}.png", 0, 12, np.random.default_rng(i))
    after = load_dataset(spec, image=True)
    assert len(after.train) + len(after.val) == len(before.train) + len(before.val) + 5


def test_hvdtrain_index_writes_it_beside_the_data_for_every_node(cli, tmp_path, monkeypatch):
    root = image_folder(tmp_path / "img", per_class=4)
    result = cli("index", root)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"indexed and checked the headers of 12 image files: {root / folder_index.BESIDE}"
    monkeypatch.setenv("HVDTRAIN_CACHE", str(tmp_path / "a node's own cache"))
    check = Checked()
    assert folder_index.image_files(root, check)["blue"][0] == "blue-000.png" and check.files == []  # reused
    write_image(root / "blue" / "blue-new.png", 2, 12, np.random.default_rng(1))
    assert "blue-new.png" in folder_index.image_files(root, check)["blue"] and len(check.files) == 13  # stale
    missing = cli("index", tmp_path / "nowhere")
    assert missing.returncode == 2 and "nowhere: not a directory" in missing.stderr


def test_hvdtrain_index_decode_finds_the_jpeg_whose_header_reads_but_pixels_do_not(cli, tmp_path):
    root = image_folder(tmp_path / "img", per_class=4, size=64, suffix=".jpg")
    broken = root / "red" / "red-002.jpg"
    truncated_jpeg(broken)
    assert cli("index", root).returncode == 0  # the headers read: training finds it (data.on_bad_file)
    (root / folder_index.BESIDE).unlink()
    decoded = cli("index", "--decode", root)
    assert decoded.returncode == 2 and f"{broken}: cannot read as an image (OSError" in decoded.stderr
    assert "Traceback" not in decoded.stderr and not (root / folder_index.BESIDE).exists()


def test_a_cache_that_cannot_be_written_lists_and_checks_without_it(tmp_path, monkeypatch):
    root = image_folder(tmp_path / "img", per_class=3)
    (tmp_path / "a file").write_text("not a directory")
    monkeypatch.setenv("HVDTRAIN_CACHE", str(tmp_path / "a file" / "cache"))
    check = Checked()
    assert folder_index.image_files(root, check)["red"][0] == "red-000.png" and len(check.files) == 9
