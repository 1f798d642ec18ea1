"""`hvdtrain run` end to end: 2 ranks through horovodrun --gloo, as a user runs it."""
import json
import re

import numpy as np
import pytest
from sklearn.datasets import load_digits

from hvdtrain import checkpoint
from tests.conftest import ROOT

pytestmark = pytest.mark.distributed
MLP = ROOT / "examples" / "digits-mlp-torch.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tests.conftest import hvdtrain
    out = tmp_path_factory.mktemp("mlp")
    result = hvdtrain("run", MLP, "-np", "2", f"output={out}")
    return out, result


def test_digits_mlp_reaches_095_and_prints_it(trained):
    out, result = trained
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["workers"] == 2
    assert summary["final"]["val_accuracy"] >= 0.95
    assert f"validation accuracy {summary['final']['val_accuracy']:.4f}" in result.stdout
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(1, 21))
    assert {"train_loss", "val_loss", "val_accuracy", "val_precision", "val_recall", "val_f1"} <= set(lines[-1])
    assert [p.name for p in checkpoint.list_checkpoints(out / "checkpoints")] == \
        ["epoch-000015.ckpt", "epoch-000020.ckpt"]


def test_exported_model_predicts_without_horovod(trained, cli, tmp_path):
    out, _ = trained
    digits = load_digits()
    np.savez(tmp_path / "in.npz", x=digits.data[:200])
    result = cli("predict", out, tmp_path / "in.npz", "-o", tmp_path / "pred.csv")
    assert result.returncode == 0, result.stderr
    rows = (tmp_path / "pred.csv").read_text().splitlines()
    assert rows[0].startswith("prediction,p_0,")
    predicted = np.array([int(r.split(",")[0]) for r in rows[1:]])
    assert (predicted == digits.target[:200]).mean() >= 0.95
    probs = np.array([[float(v) for v in r.split(",")[1:]] for r in rows[1:]])
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-4)


def test_predict_on_missing_model_is_a_clear_error(cli, tmp_path):
    result = cli("predict", tmp_path, tmp_path / "x.npz")
    assert result.returncode == 2 and "no exported model" in result.stderr
    assert "Traceback" not in result.stderr


def test_resume_after_stop_gives_the_same_final_weights(cli, tmp_path):
    args = ["-np", "2", "checkpoint.every_epochs=1", "checkpoint.keep_last=3"]
    whole = cli("run", MLP, *args, "train.epochs=6", f"output={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-3000:]
    part = tmp_path / "part"
    first = cli("run", MLP, *args, "train.epochs=4", f"output={part}")
    assert first.returncode == 0, first.stderr[-3000:]
    # the newest checkpoint is damaged: resume must fall back to the one before
    newest = checkpoint.checkpoint_path(part / "checkpoints", 4)
    newest.write_bytes(newest.read_bytes()[:-64])
    second = cli("run", MLP, *args, "train.epochs=6", f"output={part}")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "skipping checkpoint" in second.stderr and "truncated" in second.stderr
    assert "resuming from" in second.stdout and "epoch-000003.ckpt" in second.stdout
    digest = lambda d: json.loads((d / "summary.json").read_text())["weights_digest"]
    assert digest(part) == digest(tmp_path / "whole")
    epochs = [json.loads(ln)["epoch"] for ln in (part / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4, 5, 6]


def test_failing_rank_fails_the_job_with_its_message(cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = cli("run", MLP, "-np", "2", f"output={tmp_path / 'out'}", f"checkpoint.dir={blocker / 'ckpt'}")
    assert result.returncode == 2
    # rank 0 finds the problem and sends it to every rank: all stop with it, the first to exit is named
    assert "cannot write to" in result.stderr
    assert re.search(r"training failed: rank [01] exited with status 2", result.stderr)
    assert "Traceback" not in result.stderr


def test_digits_cnn_trains(cli, tmp_path):
    result = cli("run", ROOT / "examples" / "digits-cnn-torch.yaml", "-np", "2",
                 "train.epochs=10", f"output={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "summary.json").read_text())["final"]["val_accuracy"] >= 0.95
