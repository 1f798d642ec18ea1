"""Data at scale on 2 gloo ranks: image folders (both backends, augmented, resumed
within an epoch on the uninterrupted weights), memory-mapped .npy arrays, user
loaders, a run killed within an epoch and resumed from its mid-epoch checkpoint,
and bad data named with exit 2."""
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from hvdtrain.data import load_dataset, shard_batches
from hvdtrain.spec import load_spec
from hvdtrain.train import checkpoint
from tests.conftest import ROOT
from tests.data_sets import image_folder, npy_arrays, truncated_jpeg
from tests.distributed.test_faults import DEADLINE_S, kill_rank_after
from tests.output import Lines

pytestmark = pytest.mark.distributed
CNN = {"torch": ROOT / "examples" / "digits-cnn-torch.yaml", "tensorflow": ROOT / "examples" / "digits-cnn-tf.yaml"}
MLP = ROOT / "examples" / "digits-mlp-torch.yaml"


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_image_folder_trains_and_predicts_files_and_folders(cli, tmp_path, backend, figure):
    """...with 4 loader workers, which end with the job: it exits within 5 s of its final line."""
    images = image_folder(tmp_path / "colours")
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "hvdtrain", "run", CNN[backend], "-np", "2", f"output={out}",
                             "data.source=image_folder", f"data.path={images}", "data.image_size=12",
                             "data.workers=4", "train.epochs=6", "train.batch_size=8", "model.channels=[8]",
                             "model.hidden=[16]"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = Lines(proc)
    lines.wait_for_text("final validation accuracy", 600)
    final_at = time.monotonic()
    output = lines.finish(120)
    exit_seconds = time.monotonic() - final_at
    assert proc.returncode == 0, output[-3000:]
    final = summary(out)["final"]
    figure(f"image folder ({backend}): validation accuracy {final['val_accuracy']:.3f}; exited "
           f"{exit_seconds:.1f} s after its final line (data.workers 4)")
    assert exit_seconds <= 5.0
    assert final["val_accuracy"] >= 0.9
    prep = json.loads((out / "model" / "preprocessing.json").read_text())
    assert prep["classes"] == ["blue", "green", "red"] and prep["input_shape"] == [3, 12, 12]
    # predict takes a folder (every image in it) and single files
    predicted = cli("predict", out, images / "red")
    assert predicted.returncode == 0, predicted.stderr
    assert predicted.stdout.split().count("red") >= 0.9 * 24
    one = cli("predict", out, images / "blue" / "blue-001.png")
    assert one.returncode == 0 and one.stdout.split() == ["blue"], one.stderr


@pytest.mark.parametrize("backend, source", [("torch", "image_folder"), ("tensorflow", "image_folder"),
                                             ("torch", "webdataset")])
def test_augmented_images_resumed_within_an_epoch_end_on_the_uninterrupted_weights(cli, tmp_path, backend, source):
    """Random crops and flips (data.augment standard) drawn from (seed, epoch, sample):
    a run resumed at step 2 of epoch 2 draws what the uninterrupted run drew, from an
    image folder or from the tar shards `hvdtrain shards` writes of it."""
    images = image_folder(tmp_path / "colours", per_class=16, size=16, suffix=".jpg")
    if source == "webdataset":
        written = cli("shards", images, tmp_path / "shards", "--per-shard", "10")
        assert written.returncode == 0, written.stderr
        images = tmp_path / "shards"
    args = ["-np", "2", f"data.source={source}", f"data.path={images}", "data.image_size=12",
            "data.workers=2", "train.epochs=2", "train.batch_size=4", "model.channels=[8]", "model.hidden=[16]",
            "checkpoint.every_steps=2", "checkpoint.keep_last=100"]
    whole = cli("run", CNN[backend], *args, f"output={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-3000:]
    partial = tmp_path / "partial"
    first = cli("run", CNN[backend], *args, f"output={partial}")
    assert first.returncode == 0, first.stderr[-3000:]
    assert summary(partial)["weights_digest"] == summary(tmp_path / "whole")["weights_digest"]
    for path in checkpoint.list_checkpoints(partial / "checkpoints"):
        match = checkpoint.NAME.match(path.name)
        if (int(match[1]), int(match[2] or 0)) > (1, 2):  # after 1 epoch and 2 steps
            path.unlink()
    (partial / "summary.json").unlink()
    again = cli("run", CNN[backend], *args, f"output={partial}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "epoch 1 done, and 2 steps of epoch 2" in again.stdout
    assert summary(partial)["weights_digest"] == summary(tmp_path / "whole")["weights_digest"]


def test_image_folder_with_train_and_val_folders_keeps_their_split(cli, tmp_path):
    images = image_folder(tmp_path / "colours", split=True)
    out = tmp_path / "run"
    result = cli("run", CNN["torch"], "-np", "2", f"output={out}", "data.source=image_folder",
                 f"data.path={images}", "data.image_size=[10,12]", "train.epochs=2", "train.batch_size=8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "model" / "preprocessing.json").read_text())["input_shape"] == [3, 10, 12]
    # 18 of each class's 24 images are in train/: 27 a rank, 4 steps of batch 8
    assert "4 steps per epoch" in result.stdout


def test_memory_mapped_npy_trains(cli, tmp_path, figure):
    npy_arrays(tmp_path / "arrays")
    out = tmp_path / "run"
    result = cli("run", MLP, "-np", "2", f"output={out}", "data.source=file",
                 f"data.path={tmp_path / 'arrays' / 'x.npy'}", "data.workers=1", "train.epochs=4")
    assert result.returncode == 0, result.stderr[-3000:]
    final = summary(out)["final"]
    figure(f"memory-mapped .npy: validation accuracy {final['val_accuracy']:.3f}")
    assert final["val_accuracy"] >= 0.95
    np.savez(tmp_path / "new.npz", x=np.load(tmp_path / "arrays" / "x.npy")[:50])
    predicted = cli("predict", out, tmp_path / "new.npz")
    expected = np.load(tmp_path / "arrays" / "y.npy")[:50].astype(str)
    assert (np.array(predicted.stdout.split()) == expected).mean() >= 0.95


@pytest.mark.parametrize("spec", ["custom-loader-torch.yaml", "custom-loader-tf.yaml"])
def test_custom_loader_trains(cli, tmp_path, spec, figure):
    out = tmp_path / "run"
    result = cli("run", ROOT / "examples" / spec, "-np", "2", f"output={out}", "train.epochs=4")
    assert result.returncode == 0, result.stderr[-3000:]
    final = summary(out)["final"]
    figure(f"{spec}: validation accuracy {final['val_accuracy']:.3f}")
    assert final["val_accuracy"] >= 0.85
    # 1437 training digits from the loader's own split: 23 steps of batch 32 on 2 ranks
    assert "23 steps per epoch" in result.stdout


def test_run_killed_within_an_epoch_resumes_from_its_step_with_the_uninterrupted_weights(tmp_path, figure):
    """Long epochs (20,000 samples, batch 8: 1,250 steps on 2 ranks), a checkpoint
    every 100 steps: rank 1 is killed within epoch 1, and the rerun goes on from
    the step of the last checkpoint, ending on the uninterrupted run's weights."""
    args = [sys.executable, "-m", "hvdtrain", "run", ROOT / "examples" / "digits-mlp-torch.yaml", "-np", "2",
            "data.source=synthetic", "data.synthetic.samples=25000", "data.synthetic.shape=[16]",
            "model.hidden=[32]", "model.dropout=0.2", "train.epochs=2", "train.batch_size=8",
            "checkpoint.every_steps=100", "checkpoint.keep_last=2", "data.workers=1"]
    args = list(map(str, args))
    whole = subprocess.run([*args, f"output={tmp_path / 'whole'}"], capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]

    run = [*args, f"output={tmp_path / 'killed'}"]
    proc = subprocess.Popen(run, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds, output = kill_rank_after(proc, "checkpoint: epoch 1, step 300/", rank=1, variable="HOROVOD_RANK")
    assert proc.returncode != 0 and seconds < DEADLINE_S, output[-3000:]
    assert "epoch 1/2" not in output  # killed within the first epoch

    again = subprocess.run(run, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = again.stdout.split("resuming from")[1].splitlines()[0]
    figure(f"killed within epoch 1, resumed from:{resumed}")
    assert "epoch 0 done, and " in resumed and " steps of epoch 1" in resumed
    step = int(resumed.split("and ")[1].split()[0])
    assert step >= 300 and step % 100 == 0
    digest = {d: summary(tmp_path / d)["weights_digest"] for d in ("whole", "killed")}
    assert digest["killed"] == digest["whole"]
    assert summary(tmp_path / "killed")["final"]["epoch"] == 2


def bad_run(cli, tmp_path, *overrides, spec=CNN["torch"]):
    result = cli("run", spec, "-np", "2", f"output={tmp_path / 'run'}", *overrides)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
    return result.stderr


def test_corrupt_image_is_named(cli, tmp_path):
    images = image_folder(tmp_path / "colours")
    broken = images / "green" / "green-005.png"
    broken.write_bytes(broken.read_bytes()[:60])  # truncated
    (images / "blue" / "notes.txt").write_text("not an image: ignored")
    err = bad_run(cli, tmp_path, "data.source=image_folder", f"data.path={images}")
    assert f"{broken}: cannot read as an image" in err


def test_a_jpeg_that_does_not_decode_stops_the_job_or_is_skipped_and_counted(cli, tmp_path):
    images = image_folder(tmp_path / "colours", size=32, suffix=".jpg")
    broken = truncated_jpeg(images / "green" / "green-005.jpg")  # its header reads: found when read
    args = ["data.source=image_folder", f"data.path={images}", "data.standardize=false", "train.epochs=2"]
    failed = cli("run", CNN["torch"], "-np", "2", f"output={tmp_path / 'run'}", *args)
    err = failed.stderr
    assert failed.returncode == 2 and "Traceback" not in err, failed.stdout[-2000:] + err[-3000:]
    assert re.search(f"{broken}: cannot read as an image .*\\(rank [01], epoch 1; data.on_bad_file: skip", err)
    result = cli("run", CNN["torch"], "-np", "2", f"output={tmp_path / 'skipped'}", *args,
                 "data.on_bad_file=skip")
    assert result.returncode == 0, result.stderr[-3000:]
    # skipped each time it is read: once an epoch in validation, or as often as the epoch's
    # batches hold it in training (train.last_batch pad repeats a few samples); named once
    records = [json.loads(line) for line in (tmp_path / "skipped" / "metrics.jsonl").read_text().splitlines()]
    spec = load_spec(CNN["torch"], [*args, "data.on_bad_file=skip"])
    train = load_dataset(spec.data, image=True).train
    reads = [1, 1] if broken not in train.paths else [
        sum(int((batch == train.paths.index(broken)).sum()) for rank in (0, 1)
            for batch in shard_batches(len(train), rank, 2, spec.train.batch_size, spec.train.seed, epoch))
        for epoch in (0, 1)]
    assert min(reads) >= 1 and [r["skipped_files"] for r in records] == reads
    assert 1 <= result.stdout.count(f"hvdtrain: skipped {broken}: cannot read as an image") + \
        result.stderr.count(f"hvdtrain: skipped {broken}") <= 2


def test_empty_class_folder_is_named(cli, tmp_path):
    images = image_folder(tmp_path / "colours")
    (images / "grey").mkdir()
    err = bad_run(cli, tmp_path, "data.source=image_folder", f"data.path={images}")
    assert f"{images / 'grey'}: no PNG/JPG/JPEG images in class folder 'grey'" in err


def test_class_missing_from_validation_is_named(cli, tmp_path):
    images = image_folder(tmp_path / "colours", split=True)
    for path in (images / "val" / "green").iterdir():
        path.unlink()
    (images / "val" / "green").rmdir()
    err = bad_run(cli, tmp_path, "data.source=image_folder", f"data.path={images}")
    assert f"{images / 'val'}: class 'green' is missing" in err


def test_npy_samples_and_labels_of_different_lengths_are_named(cli, tmp_path):
    x, y = npy_arrays(tmp_path / "arrays")
    np.save(tmp_path / "arrays" / "y.npy", y[:-5])
    err = bad_run(cli, tmp_path, "data.source=file", f"data.path={tmp_path / 'arrays' / 'x.npy'}", spec=MLP)
    assert f"has 1200 samples but {tmp_path / 'arrays' / 'y.npy'} has 1195 labels" in err
