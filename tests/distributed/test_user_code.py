"""User code under `hvdtrain run` on 2 gloo ranks: custom models (torch and
Keras, and library models), regression with built-in and custom losses, user
code that fails, and the user's own Horovod script as the entry."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.datasets import load_diabetes, load_digits
from sklearn.metrics import accuracy_score, mean_absolute_error, precision_recall_fscore_support, r2_score

from hvdtrain.data import random_split, stratified_split
from tests.conftest import ROOT

pytestmark = pytest.mark.distributed
EXAMPLES = ROOT / "examples"
USER_CODE = ROOT / "tests" / "data" / "user_code"
BACKENDS = {"torch": "torch", "tensorflow": "tf"}


def summary_of(out):
    return json.loads((out / "summary.json").read_text())


def predictions(cli, run_dir, x, tmp_path):
    """hvdtrain predict, from a directory away from the checkout and the user's code."""
    np.savez(tmp_path / "in.npz", x=x)
    away = tmp_path / "elsewhere"
    away.mkdir(exist_ok=True)
    result = subprocess.run([sys.executable, "-m", "hvdtrain", "predict", str(run_dir), str(tmp_path / "in.npz"),
                             "-o", str(tmp_path / "pred.csv")], cwd=away, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    return [row.split(",")[0] for row in (tmp_path / "pred.csv").read_text().splitlines()[1:]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_model_trains_identically_and_exports(cli, tmp_path, backend, figure):
    """...and the classification metrics, summed over the 2 ranks' shards of the validation
    split by allreduce, are scikit-learn's on the whole split."""
    out = tmp_path / "run"
    result = cli("run", EXAMPLES / f"custom-mlp-{BACKENDS[backend]}.yaml", "-np", "2", f"output={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = summary_of(out)  # written only after every rank's own weights digest matched
    final = summary["final"]
    assert summary["workers"] == 2 and final["val_accuracy"] >= 0.95
    model = json.loads((out / "model" / "model.json").read_text())
    assert model["model"]["kind"] == "custom"
    artifact = "program.pt2" if backend == "torch" else "model.keras"  # loads without the builder
    assert (out / "model" / artifact).is_file()
    digits = load_digits()
    _, val = stratified_split(digits.target, 0.2, 0)
    predicted = np.array(predictions(cli, out, digits.data[val], tmp_path), dtype=int)
    truth = digits.target[val]
    assert (predicted != truth).sum() > 0  # errors to count, else every metric is 1 whichever rank scored
    assert final["val_accuracy"] == pytest.approx(accuracy_score(truth, predicted), abs=1e-9)
    for metric in ("precision", "recall", "f1"):
        expected = precision_recall_fscore_support(truth, predicted, average="macro", zero_division=0)
        assert final[f"val_{metric}"] == pytest.approx(expected[("precision", "recall", "f1").index(metric)],
                                                       abs=1e-9), metric
    figure(f"custom-mlp-{BACKENDS[backend]}: {summary['parameters']:,} parameters; on 2 ranks validation "
           f"accuracy {final['val_accuracy']:.4f}, precision {final['val_precision']:.4f}, recall "
           f"{final['val_recall']:.4f}, F1 {final['val_f1']:.4f}: scikit-learn's on the exported model's "
           f"{len(val)} predictions")


@pytest.mark.parametrize("backend", BACKENDS)
def test_regression_metrics_are_those_of_the_whole_validation_set(cli, tmp_path, backend, figure):
    out = tmp_path / "run"
    result = cli("run", EXAMPLES / f"diabetes-regression-{BACKENDS[backend]}.yaml", "-np", "2", f"output={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    final = summary_of(out)["final"]
    assert final["val_r2"] >= 0.40 and final["val_mae"] <= 50
    assert f"validation MAE {final['val_mae']:.4f}" in result.stdout
    # the exported model on the validation split, scored by scikit-learn in one process
    data = load_diabetes()
    _, val = random_split(len(data.target), 0.2, 0)
    predicted = np.array(predictions(cli, out, data.data[val], tmp_path), dtype=float)
    assert r2_score(data.target[val], predicted) == pytest.approx(final["val_r2"], abs=1e-3)
    assert mean_absolute_error(data.target[val], predicted) == pytest.approx(final["val_mae"], rel=1e-3)
    figure(f"diabetes-regression-{BACKENDS[backend]}: MAE {final['val_mae']:.2f}, RMSE {final['val_rmse']:.2f}, "
           f"R2 {final['val_r2']:.4f}")


def test_custom_loss_from_user_code(cli, tmp_path):
    out = tmp_path / "run"
    result = cli("run", EXAMPLES / "diabetes-regression-torch.yaml", "-np", "2", f"output={out}",
                 f"code=[{USER_CODE}]", "loss=faulty_models:squared_log_error")
    assert result.returncode == 0, result.stderr[-3000:]
    assert summary_of(out)["final"]["val_r2"] >= 0.40


def test_a_model_with_sparse_gradients_trains_with_the_default_buckets(cli, tmp_path, figure):
    """An EmbeddingBag(sparse=True): Horovod's grouped allreduce refuses sparse tensors
    ("Tensor type torch.sparse.FloatTensor is not supported"), so its gradients go one at a
    time, said once, and the model trains on 2 ranks."""
    out = tmp_path / "run"
    result = cli("run", EXAMPLES / "digits-mlp-torch.yaml", "-np", "2", f"output={out}", f"code=[{USER_CODE}]",
                 "model={kind: custom, builder: 'probes:sparse_binned'}", "optimizer.lr=0.1",
                 "optimizer.momentum=0", "optimizer.weight_decay=0", "train.epochs=5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("sparse gradients (table)") == 1, result.stdout[-3000:]
    final = summary_of(out)["final"]
    figure(f"EmbeddingBag with sparse gradients on 2 ranks: validation accuracy {final['val_accuracy']:.3f} "
           "after 5 epochs")
    assert final["val_accuracy"] >= 0.85


@pytest.mark.parametrize("backend, optimizer", [("torch", "torch.optim:AdamW"), ("tensorflow", "keras.optimizers:AdamW")])
def test_an_optimizer_by_import_path_trains_and_resumes(cli, tmp_path, backend, optimizer, figure):
    """The framework's own AdamW with its options from the spec, the lr scaled and warmed up
    by hvdtrain; a run resumed from its checkpoint goes on with the optimizer's state."""
    out = tmp_path / "run"
    args = ["-np", "2", f"output={out}", f"optimizer={{name: {optimizer}, lr: 0.002, warmup_epochs: 1, "
            "args: {weight_decay: 0.01}}", "checkpoint.every_epochs=1"]
    first = cli("run", EXAMPLES / f"digits-mlp-{BACKENDS[backend]}.yaml", *args, "train.epochs=4")
    assert first.returncode == 0, first.stderr[-3000:]
    again = cli("run", EXAMPLES / f"digits-mlp-{BACKENDS[backend]}.yaml", *args, "train.epochs=8")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resum" in again.stdout.lower()
    final = summary_of(out)["final"]
    figure(f"{optimizer} on 2 ranks: validation accuracy {final['val_accuracy']:.3f} after 8 epochs (4 resumed)")
    assert final["epoch"] == 8 and final["val_accuracy"] >= 0.93


def test_library_model_keras_resnet50(cli, tmp_path, figure):
    out = tmp_path / "run"
    result = cli("run", EXAMPLES / "resnet50-keras.yaml", "-np", "2", f"output={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [json.loads(line)["train_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = summary_of(out)  # BatchNorm statistics averaged: every rank ended with the same weights
    assert summary["parameters"] > 23_000_000 and losses[-1] < 0.5 * losses[0]
    assert (out / "model" / "model.keras").is_file()
    figure(f"resnet50-keras: {summary['parameters']:,} parameters, train loss {losses[0]:.3f} -> {losses[-1]:.3f}")


@pytest.mark.parametrize("builder, message", [
    ("faulty_models:fails_on_rank_1", "model.builder: faulty_models:fails_on_rank_1 raised RuntimeError: "
                                      "CUDA out of memory on this rank (on rank 1)"),
    ("faulty_models:not_a_module", "model.builder: faulty_models:not_a_module returned a dict, "
                                   "not a torch.nn.Module"),
])
def test_failing_builder_stops_every_rank_with_its_message(cli, tmp_path, builder, message):
    result = cli("run", EXAMPLES / "custom-mlp-torch.yaml", "-np", "2", f"output={tmp_path / 'run'}",
                 f"code=[{USER_CODE}]", f"model.builder={builder}", "model.args={}", timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count(message) == 2  # both ranks stop with it, neither waits
    assert "Traceback" not in result.stderr


def test_loss_that_is_not_a_scalar_is_a_clear_error(cli, tmp_path):
    result = cli("run", EXAMPLES / "custom-mlp-torch.yaml", "-np", "2", f"output={tmp_path / 'run'}",
                 f"code=[{USER_CODE}]", "loss=faulty_models:per_sample_loss", timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "loss: faulty_models:per_sample_loss returned a Tensor of shape" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_builder_is_found_by_validate_without_importing_frameworks(tmp_path):
    code = ("import sys; from hvdtrain.spec import load_spec; from hvdtrain.errors import SpecError\n"
            "try:\n    load_spec(sys.argv[1], sys.argv[2:])\nexcept SpecError as err:\n    print(err)\n"
            "print(sorted(m for m in ('torch', 'tensorflow', 'keras', 'faulty_models') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code, str(EXAMPLES / "custom-mlp-torch.yaml"),
                             f"code=[{USER_CODE}]", "model.builder=faulty_models:no_such_builder",
                             "loss=no_such_package.losses:loss"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "model.builder: module 'faulty_models' (" in result.stdout
    assert "has no 'no_such_builder'" in result.stdout
    assert "loss: module 'no_such_package.losses' not found" in result.stdout
    assert result.stdout.strip().endswith("[]")  # nothing imported: neither frameworks nor user code


def test_run_of_a_missing_builder_exits_2_before_launching(cli, tmp_path):
    result = cli("run", EXAMPLES / "custom-mlp-torch.yaml", "-np", "2", "model.builder=user_models.nope:build")
    assert result.returncode == 2
    assert "model.builder: module 'user_models.nope' not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_entry_script_runs_under_hvdtrain_run(cli, tmp_path, figure):
    out = tmp_path / "result.json"
    result = cli("run", EXAMPLES / "plain-horovod-torch.yaml", "-np", "2",
                 f"entry.args=[--epochs, '10', --out, {out}]")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "plain-horovod-torch: examples/plain_horovod_torch.py finished on 2 ranks" in result.stdout
    outcome = json.loads(out.read_text())
    assert outcome["ranks"] == 2 and len(set(outcome["digests"])) == 1 and outcome["accuracy"] >= 0.93
    figure(f"plain Horovod script under hvdtrain run: 2 ranks, accuracy {outcome['accuracy']:.4f}")


def test_entry_script_failure_is_the_jobs_failure(cli, tmp_path):
    result = cli("run", EXAMPLES / "plain-horovod-torch.yaml", "-np", "2", "entry.args=[--epochs, none]")
    assert result.returncode != 0
    assert "argument --epochs: invalid int value: 'none'" in result.stderr
    assert "training failed: rank" in result.stderr
