"""Runs kept in object storage, against a real S3-protocol server that these tests
start once: moto's server mode on localhost with its IAM checks on (the first three
calls, INITIAL_NO_AUTH_ACTION_COUNT, create a user, its key and an s3:* policy;
every later call must be signed with that key). moto rather than Ceph's radosgw:
radosgw needs a RADOS cluster behind it (monitors, OSDs), moto is one Python
process that starts in seconds and answers the S3 API s3fs speaks, signatures
checked. Data, checkpoints and the run directory all live in the bucket here."""
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import yaml

from tests.conftest import ROOT, free_port, hvdtrain, missing, require_module
from tests.distributed.test_faults import DEADLINE_S, rank_process, wait_for_file
from tests.output import Lines

pytestmark = pytest.mark.distributed
MLP = ROOT / "examples" / "digits-mlp-torch.yaml"
USER_CODE = ROOT / "tests" / "data" / "user_code"
BUCKET = "hvdtrain-runs"



@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The server's address and a signed user's credentials as environment variables,
    a bucket, and the digits data in it as an .npz object."""
    require_module("moto")
    require_module("s3fs")
    import boto3
    root = tmp_path_factory.mktemp("s3")
    port = free_port()
    log = (root / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, cwd=root,
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"})
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                missing(f"moto server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.2)
    anonymous = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                     aws_secret_access_key="setup")
    iam = boto3.client("iam", **anonymous)
    iam.create_user(UserName="trainer")
    key = iam.create_access_key(UserName="trainer")["AccessKey"]
    iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    env = {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
           "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_DEFAULT_REGION": "us-east-1",
           "HVDTRAIN_CACHE": str(root / "cache")}  # staging and the data cache, this module's own
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    client.create_bucket(Bucket=BUCKET)
    from sklearn.datasets import load_digits
    digits = load_digits()
    data = io.BytesIO()
    np.savez(data, x=digits.data.astype(np.float32), y=digits.target)
    client.put_object(Bucket=BUCKET, Key="data/digits.npz", Body=data.getvalue())
    yield env
    server.terminate()
    server.wait(timeout=30)


def bucket(env):
    """The bucket as the trainer sees it (s3fs, the same credentials)."""
    import s3fs
    return s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                             client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL_S3"], "region_name": "us-east-1"},
                             skip_instance_cache=True)


def run(args, env):
    return hvdtrain("run", *args, env=env)


def test_a_run_in_a_bucket_killed_resumes_from_its_committed_checkpoints_exactly(tmp_path, s3, figure):
    """Data, checkpoints and run directory in the bucket, 2 ranks. Rank 1 is SIGKILLed in
    epoch 4 of 6; before the rerun the bucket gets a newer checkpoint object without its
    commit marker (an upload that never committed) and a committed one whose bytes are
    damaged. The rerun ignores the first, reports and skips the second, resumes after
    epoch 3 and ends with the weights of an uninterrupted run; the bucket then holds
    keep_last committed checkpoints and the whole run directory."""
    from hvdtrain.data import load_dataset, steps_per_epoch
    from hvdtrain.spec import load_spec
    spec = yaml.safe_load(MLP.read_text())
    spec["model"] = {"kind": "custom", "builder": "probes:held_at_step"}
    spec["code"] = [str(USER_CODE)]
    spec["data"] = {**spec["data"], "source": "file", "path": f"s3://{BUCKET}/data/digits.npz"}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    epochs, held_epoch, held_step = 6, 4, 3
    # the same samples as sklearn's digits, which the example reads
    per_epoch = steps_per_epoch(len(load_dataset(load_spec(MLP).data).train), 2, spec["train"]["batch_size"])
    args = [tmp_path / "spec.yaml", "-np", "2", f"train.epochs={epochs}", "checkpoint.every_epochs=1",
            "checkpoint.keep_last=2"]
    whole = run([*args, f"output=s3://{BUCKET}/whole"], s3)
    assert whole.returncode == 0, whole.stdout[-2000:] + whole.stderr[-3000:]
    fs = bucket(s3)
    final = fs.cat_file(f"{BUCKET}/whole/checkpoints/epoch-{epochs:06d}.ckpt")

    killed = [*args, f"output=s3://{BUCKET}/killed"]
    marker = tmp_path / "held"
    proc = subprocess.Popen([sys.executable, "-m", "hvdtrain", "run", *map(str, killed)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **s3, "PYTHONUNBUFFERED": "1",
                                 "HVDTRAIN_TEST_HOLD": f"1:{(held_epoch - 1) * per_epoch + held_step}:{marker}"})
    lines = Lines(proc)
    wait_for_file(marker, lines, 600)
    victim = rank_process(psutil.Process(proc.pid), 1, "HOROVOD_RANK")
    assert victim is not None, lines.text()[-3000:]
    victim.send_signal(signal.SIGKILL)
    output = lines.finish(DEADLINE_S + 30)
    assert proc.returncode != 0 and f"epoch {held_epoch - 1}/{epochs}  train_loss" in output, output[-3000:]
    checkpoints = f"{BUCKET}/killed/checkpoints"
    committed = sorted(n.rsplit("/", 1)[-1] for n in fs.ls(checkpoints, refresh=True))
    assert committed == [f"epoch-{e:06d}.ckpt{m}" for e in (held_epoch - 2, held_epoch - 1)
                         for m in ("", ".committed")], committed
    # an upload that never committed, of the final weights: resuming from it would skip epochs
    fs.pipe_file(f"{checkpoints}/epoch-{epochs:06d}.ckpt", final)
    # a committed checkpoint whose bytes were damaged after it was written
    damaged = bytearray(fs.cat_file(f"{checkpoints}/epoch-{held_epoch - 1:06d}.ckpt"))
    damaged[-10] ^= 0xFF
    fs.pipe_file(f"{checkpoints}/epoch-{held_epoch:06d}.ckpt", bytes(damaged))
    fs.pipe_file(f"{checkpoints}/epoch-{held_epoch:06d}.ckpt.committed", b"planted")

    again = run(killed, s3)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert f"skipping checkpoint: s3://{checkpoints}/epoch-{held_epoch:06d}.ckpt: integrity hash mismatch" \
        in again.stderr, again.stderr[-2000:]
    assert f"resuming from s3://{checkpoints}/epoch-{held_epoch - 1:06d}.ckpt (epoch {held_epoch - 1} done)" \
        in again.stdout, again.stdout[-2000:]
    assert f"epoch {held_epoch}/{epochs}  train_loss" in again.stdout
    assert f"epoch {held_epoch - 1}/{epochs}  train_loss" not in again.stdout
    summary = {run: json.loads(fs.cat_file(f"{BUCKET}/{run}/summary.json")) for run in ("whole", "killed")}
    assert summary["killed"]["weights_digest"] == summary["whole"]["weights_digest"]
    names = sorted(n.rsplit("/", 1)[-1] for n in fs.ls(checkpoints, refresh=True))
    assert names == [f"epoch-{e:06d}.ckpt{m}" for e in (epochs - 1, epochs) for m in ("", ".committed")], names
    records = fs.cat_file(f"{BUCKET}/killed/metrics.jsonl").decode().splitlines()
    assert [json.loads(r)["epoch"] for r in records] == list(range(1, epochs + 1))
    for name in ("spec.yaml", "curves.png", "model/weights.pt", "model/preprocessing.json"):
        assert fs.isfile(f"{BUCKET}/killed/{name}"), name
    figure(f"object storage: killed in epoch {held_epoch} of {epochs}, resumed from the bucket after epoch "
           f"{held_epoch - 1} (an uncommitted and a damaged checkpoint passed over), weights identical")


@pytest.mark.parametrize("case", ["bad secret", "missing bucket", "missing data key"])
def test_bad_credentials_a_missing_bucket_and_a_missing_key_are_bad_input(tmp_path, s3, case):
    overrides, env, named = {
        "bad secret": ([f"output=s3://{BUCKET}/denied"], {"AWS_SECRET_ACCESS_KEY": "not-the-secret"},
                       f"output: cannot write to s3://{BUCKET}/denied: access denied"),
        "missing bucket": (["output=s3://no-such-bucket/run"], {},
                           "output: cannot write to s3://no-such-bucket/run: not found"),
        "missing data key": (["data.source=file", f"data.path=s3://{BUCKET}/data/absent.npz",
                              f"output={tmp_path / 'out'}"], {},
                             f"data.path: s3://{BUCKET}/data/absent.npz does not exist"),
    }[case]
    began = time.monotonic()
    result = run([MLP, *overrides, "train.epochs=1"], {**s3, **env})
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert named in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert time.monotonic() - began < 60


def test_parquet_files_under_a_prefix_are_fetched_once_per_node_and_trained_on(tmp_path, s3):
    """A directory of Parquet files in the bucket (the wine set, a text column one-hot):
    2 ranks on one node fetch it once into data.cache_dir and train to high accuracy; a
    rerun fetches nothing, and after one object changes, only that one."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_wine
    wine = load_wine()
    colour = np.random.default_rng(0).choice(["red", "white"], len(wine.target))
    table = pa.table({**{f"f{i}": wine.data[:, i] for i in range(wine.data.shape[1])}, "colour": colour,
                      "label": np.array(wine.target_names)[wine.target]})
    fs = bucket(s3)
    for part, rows in enumerate((slice(0, 90), slice(90, None))):
        sink = io.BytesIO()
        pq.write_table(table[rows], sink, row_group_size=30)
        fs.pipe_file(f"{BUCKET}/tables/wine/part-{part}.parquet", sink.getvalue())
    cache = tmp_path / "cache"
    args = [MLP, "data.source=parquet", f"data.path=s3://{BUCKET}/tables/wine", "data.categorical=[colour]",
            f"data.cache_dir={cache}", "data.workers=2", "train.epochs=25", f"output={tmp_path / 'run'}"]
    first = run(args, s3)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final"]["val_accuracy"] >= 0.9, summary["final"]
    # predict reads a Parquet file of the same columns (the label column ignored)
    pq.write_table(table, tmp_path / "all.parquet")
    predicted = hvdtrain("predict", tmp_path / "run", tmp_path / "all.parquet", timeout=300)
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    labels = predicted.stdout.split()  # one predicted class a row
    assert np.mean(np.array(labels) == np.array(wine.target_names)[wine.target]) >= 0.9
    # evaluate scores the same file against its label column, agreeing with predict's classes
    scored = hvdtrain("evaluate", tmp_path / "run", tmp_path / "all.parquet", "-o", tmp_path / "evaluation",
                      timeout=300)
    assert scored.returncode == 0, scored.stderr[-2000:]
    report = json.loads((tmp_path / "evaluation" / "evaluation.json").read_text())
    assert report["samples"] == len(wine.target)
    assert report["accuracy"] == pytest.approx(np.mean(np.array(labels) == np.array(wine.target_names)[wine.target]))
    local = [p for p in cache.rglob("*.parquet")]
    assert sorted(p.name for p in local) == ["part-0.parquet", "part-1.parquet"]
    stamps = {p.name: p.stat().st_mtime_ns for p in local}

    again = run([*args, "train.epochs=26"], s3)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in local} == stamps  # nothing fetched again
    sink = io.BytesIO()
    pq.write_table(table[90:], sink, row_group_size=20)
    fs.pipe_file(f"{BUCKET}/tables/wine/part-1.parquet", sink.getvalue())
    third = run([*args, "train.epochs=27"], s3)
    assert third.returncode == 0, third.stderr[-3000:]
    now = {p.name: p.stat().st_mtime_ns for p in local}
    assert now["part-0.parquet"] == stamps["part-0.parquet"] and now["part-1.parquet"] != stamps["part-1.parquet"]


def test_webdataset_shards_named_by_a_brace_pattern_in_the_bucket(tmp_path, s3, monkeypatch):
    """data.path s3://.../train-{000000..000002}.tar: each shard (and classes.txt beside them)
    fetched into the cache and read as the same pattern on local files reads; a missing shard
    is named by its URL."""
    from hvdtrain.data import load_dataset
    from hvdtrain.errors import DataError
    from hvdtrain.spec import validate
    from tests.data_sets import image_folder
    images = image_folder(tmp_path / "colours", per_class=20, size=24, split=True, suffix=".jpg")
    local = tmp_path / "shards"
    made = hvdtrain("shards", images, local, "--per-shard", "16")
    assert made.returncode == 0, made.stderr
    fs = bucket(s3)
    for shard in sorted(local.iterdir()):  # the shards and classes.txt
        fs.put_file(str(shard), f"{BUCKET}/shards/{shard.name}")
    for name, value in {**s3, "HVDTRAIN_CACHE": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(name, value)

    def loaded(path):
        spec = validate({"name": "t", "backend": "torch", "model": {"kind": "cnn"},
                         "data": {"source": "webdataset", "path": path, "image_size": 16}}).data
        return load_dataset(spec, image=True)
    pattern = "train-{000000..000002}.tar"
    remote, here = loaded(f"s3://{BUCKET}/shards/{pattern}"), loaded(str(local / pattern))
    assert (len(remote.train), len(remote.val)) == (len(here.train), len(here.val)) and len(remote.train) > 0
    assert remote.preprocessing.classes == here.preprocessing.classes
    np.testing.assert_array_equal(remote.train.y, here.train.y)
    fetched = sorted(p.name for p in (tmp_path / "cache").rglob("train-*.tar"))
    assert fetched == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    with pytest.raises(DataError, match=rf"data.path: cannot fetch s3://{BUCKET}/shards/train-000003.tar"):
        loaded(f"s3://{BUCKET}/shards/train-{{000000..000003}}.tar")
