"""data.augment: what an image file becomes, and that a training sample's draws
depend only on (seed, epoch, its index)."""
import numpy as np
import pytest
from PIL import Image

from hvdtrain import plugins
from hvdtrain.data import load_dataset
from hvdtrain.data.transforms import centre_box, random_box, read_image, sample_rng
from hvdtrain.errors import DataError, SpecError, UserError
from hvdtrain.spec import validate
from tests.conftest import ROOT
from tests.data_sets import image_folder

BASE = {"name": "t", "backend": "torch", "model": {"kind": "cnn"}, "train": {"batch_size": 4}}
USER_CODE = ROOT / "tests" / "data" / "user_code"


def picture(path, width=64, height=48, quality=None):
    """A picture whose every pixel says where it is: red grows left to right, green top
    to bottom, so a crop's place and a flip can be read from its pixels."""
    xs, ys = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    pixels = np.stack([xs, ys, np.full_like(xs, 128)], axis=2).astype(np.uint8)
    Image.fromarray(pixels).save(path, **({"quality": quality} if quality else {}))
    return path


def test_random_boxes_follow_the_standard_recipe():
    rng = np.random.default_rng(0)
    boxes = [random_box(200, 200, rng) for _ in range(2000)]
    areas = np.array([(r - left) * (b - t) / 40_000 for left, t, r, b in boxes])
    aspects = np.array([(r - left) / (b - t) for left, t, r, b in boxes])
    assert all(0 <= left < r <= 200 and 0 <= t < b <= 200 for left, t, r, b in boxes)
    assert areas.min() >= 0.07 and areas.max() <= 1.0 and 0.4 < np.median(areas) < 0.6  # 8-100 %, uniform
    assert aspects.min() >= 0.74 and aspects.max() <= 1.35  # 3:4 to 4:3, rounding aside
    # an image too narrow for any try: the centre, its aspect clamped to 3:4 (10 x 13)
    assert random_box(10, 1000, np.random.default_rng(0)) == (0, 493, 10, 506)


def test_evaluation_keeps_the_centre_at_seven_eighths():
    left, top, right, bottom = centre_box(64, 48, (24, 24))
    # resized to cover 24 / 0.875 = 27.4 px on the short side: the middle 87.5 % of its height
    assert bottom - top == pytest.approx(48 * 0.875) and right - left == pytest.approx(48 * 0.875)
    assert (left + right) / 2 == pytest.approx(32) and (top + bottom) / 2 == pytest.approx(24)


@pytest.mark.parametrize("quality", [None, 95], ids=["png", "jpeg"])
def test_a_training_draw_depends_on_seed_epoch_and_index_only(tmp_path, quality):
    path = picture(tmp_path / ("p.jpg" if quality else "p.png"), quality=quality)
    draw = lambda epoch, index: read_image(path, (16, 16), "standard", True, sample_rng(0, epoch, index))  # noqa: E731
    first = draw(1, 7)
    assert first.shape == (3, 16, 16) and first.dtype == np.uint8
    assert np.array_equal(first, draw(1, 7))  # the same sample of the same epoch: the same pixels
    others = [draw(e, i) for e, i in [(2, 7), (1, 8), (3, 7), (1, 9)]]
    assert all(not np.array_equal(first, other) for other in others)
    # crops differ in place and extent; about half the draws flip (red then falls left to right)
    flips = [np.diff(draw(e, 0)[0].astype(int), axis=1).mean() < 0 for e in range(200)]
    assert 70 < sum(flips) < 130


def test_evaluation_and_none_are_fixed_and_cover_what_they_should(tmp_path):
    path = picture(tmp_path / "p.png")
    centre = read_image(path, (24, 24), "standard")
    assert np.array_equal(centre, read_image(path, (24, 24), "standard", False, sample_rng(0, None, 3)))
    whole = read_image(path, (24, 32), "none")
    # none: the whole picture, so red spans nearly 0..255; the centre crop leaves out the edges
    assert whole[0].min() < 10 and whole[0].max() > 245
    assert centre[0].min() > 40 and centre[0].max() < 215 and abs(int(centre[1].mean()) - 128) < 8


def test_a_large_jpeg_decoded_at_a_reduced_scale_gives_the_same_picture(tmp_path):
    """Draft decoding (1/2 ... 1/8 of the size) where the target needs fewer pixels: the
    result matches a full decode resized the same way, within JPEG's own error."""
    path = picture(tmp_path / "big.jpg", width=800, height=600, quality=95)
    small = read_image(path, (32, 32), "standard").astype(int)
    with Image.open(path) as image:
        box = centre_box(800, 600, (32, 32))
        full = np.asarray(image.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR, box=box))
    assert np.abs(small - full.transpose(2, 0, 1).astype(int)).mean() < 4


def test_a_users_transform_by_import_path(tmp_path):
    plugins.add_import_paths([str(USER_CODE)])
    path = picture(tmp_path / "p.png")
    grey = read_image(path, (8, 10), "transforms:grey_flip", True, sample_rng(0, 1, 2))
    assert grey.shape == (3, 8, 10) and (grey[0] == grey[1]).all()
    with pytest.raises(DataError, match=r"data.augment: transforms:wrong_size returned uint8 \[48, 64, 3\]; "
                                        r"expected uint8 \[8, 10, 3\]"):
        read_image(path, (8, 10), "transforms:wrong_size")
    with pytest.raises(DataError, match="data.augment: transforms:fails raised RuntimeError: no such filter"):
        read_image(path, (8, 10), "transforms:fails")


def test_image_samples_augment_training_batches_and_not_evaluation_ones(tmp_path):
    root = image_folder(tmp_path / "img", per_class=8, size=16)
    spec = validate({**BASE, "data": {"source": "image_folder", "path": str(root), "image_size": 12}}).data
    assert spec.augment == "standard"  # the default for image files
    dataset = load_dataset(spec, image=True)
    assert dataset.preprocessing.augment == "standard"
    rows = np.arange(6)
    assert np.array_equal(dataset.train.batch(rows)[0], dataset.train.batch(rows)[0])  # evaluation: fixed
    epoch1 = dataset.train.batch(rows, 1)[0]
    assert np.array_equal(epoch1, dataset.train.batch(rows, 1)[0])
    assert not np.array_equal(epoch1, dataset.train.batch(rows, 2)[0])
    # a sample draws the same alone or in any batch (whichever rank or step reads it)
    assert np.array_equal(dataset.train.batch(np.array([3]), 1)[0][0], epoch1[3])


def test_augment_is_for_image_files_and_a_missing_transform_is_named(tmp_path):
    with pytest.raises(SpecError, match="data.augment applies to image files"):
        validate({**BASE, "model": {"kind": "mlp"}, "data": {"source": "digits", "augment": "standard"}})
    root = image_folder(tmp_path / "img", per_class=4)
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: t\nbackend: torch\nmodel: {{kind: cnn}}\ndata: {{source: image_folder, path: {root}, "
                    "augment: 'nowhere.mod:fn'}\n")
    from hvdtrain.spec import load_spec
    with pytest.raises(SpecError, match="data.augment: "):
        load_spec(spec)


def test_batches_for_the_gpu_carry_the_draws_the_cpu_path_makes(tmp_path):
    """data.decode gpu: the loader's processes send each JPEG's bytes with the box and
    flip that decoding on the CPU would draw; cropped, resized and flipped as the GPU
    does it (here by torch on the CPU), a sample is the picture the CPU path gives."""
    import torch

    from hvdtrain.backends.torch_input import cropped_batch, jpeg_files
    root = tmp_path / "pictures"
    for k, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        for i in range(6):
            picture(root / name / f"{i}.jpg", width=96 + 8 * i, height=80, quality=95)
    picture(root / "a" / "odd.png", width=64, height=64)  # not a JPEG: decoded on the CPU
    spec = validate({**BASE, "data": {"source": "image_folder", "path": str(root), "image_size": 32,
                                      "standardize": False}}).data
    samples = load_dataset(spec, image=True).train
    rows = np.arange(len(samples))
    for epoch in (None, 0, 3):
        parts, labels = samples.encoded_batch(rows, epoch)
        expected, expected_labels = samples.batch(rows, epoch)
        np.testing.assert_array_equal(labels, expected_labels)
        png = [i for i in rows if samples.paths[i].suffix == ".png"]
        assert parts["pixels_at"].tolist() == png and len(parts["ends"]) == len(rows) - len(png)
        np.testing.assert_array_equal(parts["pixels"], expected[png])
        decoded = [torch.from_numpy(np.asarray(Image.open(samples.paths[at]).convert("RGB")).transpose(2, 0, 1).copy())
                   for at in parts["at"]]
        assert parts["jpeg"].flags.writeable  # torch warns, in every loader process, on wrapping read-only bytes
        files = jpeg_files(torch.from_numpy(parts["jpeg"]), torch.from_numpy(parts["ends"]))
        for data, at in zip(files, parts["at"]):
            assert data.numpy().tobytes() == samples.paths[at].read_bytes()
        # the whole batch at once, images of several sizes padded together
        pixels = cropped_batch(decoded, parts["box"], parts["flip"], [32, 32]).numpy().astype(int)
        for k, at in enumerate(parts["at"]):
            # the same crop and flip (a flip or another box would differ by tens of levels)
            assert np.abs(pixels[k] - expected[at]).mean() < 4, (epoch, at)
        flips = int(parts["flip"].sum())
        assert flips == 0 if epoch is None else 0 < flips < len(parts["at"])


def test_decoding_on_the_gpu_needs_one_and_torch(tmp_path):
    import torch

    from hvdtrain.backends.torch_input import decode_on_gpu
    root = image_folder(tmp_path / "img", per_class=4)
    raw = {**BASE, "data": {"source": "image_folder", "path": str(root), "decode": "gpu"}}
    with pytest.raises(UserError, match="data.decode: gpu decodes JPEG files with torchvision on the GPU, "
                                        "and this rank has no GPU"):
        decode_on_gpu(validate(raw).data, torch.device("cpu"))
    assert not decode_on_gpu(validate({**raw, "data": {**raw["data"], "decode": "auto"}}).data, torch.device("cpu"))
    with pytest.raises(SpecError, match="the tensorflow backend decodes on the CPU"):
        validate({**raw, "backend": "tensorflow"})
    with pytest.raises(SpecError, match="data.decode applies to image files"):
        validate({**BASE, "data": {"source": "digits", "decode": "cpu"}})


def test_a_loader_process_decodes_into_shared_memory_the_batch_the_samples_give(tmp_path):
    """With loader processes, a batch of image files is decoded straight into shared
    memory: what arrives holds the same pixels and labels as the samples' own batch,
    a repeated sample (a padded batch's) included."""
    import torch

    from hvdtrain.backends.torch_input import make_loader
    root = image_folder(tmp_path / "img", per_class=4)
    spec = validate({**BASE, "data": {"source": "image_folder", "path": str(root), "image_size": 16,
                                      "workers": 1}}).data
    samples = load_dataset(spec, image=True).train
    batches = [np.array([0, 3, 1, 0]), np.arange(len(samples))[::-1].copy()]
    loader = make_loader(spec, torch.device("cpu"))
    try:
        got = list(loader(samples, batches, 2))
    finally:
        loader.close()
    assert len(got) == 2
    for (x, y), indices in zip(got, batches):
        assert isinstance(x, torch.Tensor) and x.dtype == torch.uint8
        expected, labels = samples.batch(indices, 2)
        np.testing.assert_array_equal(x.numpy(), expected)
        np.testing.assert_array_equal(np.asarray(y), labels)
    np.testing.assert_array_equal(got[0][0][0].numpy(), got[0][0][3].numpy())
