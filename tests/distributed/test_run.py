"""`hvdtrain run` end to end for both backends: 2 ranks through horovodrun
--gloo, as a user runs it."""
import json
import re

import numpy as np
import pytest
import yaml
from sklearn.datasets import load_digits

from hvdtrain.train import checkpoint
from tests.conftest import ROOT, hvdtrain

pytestmark = pytest.mark.distributed
EXAMPLES = ROOT / "examples"
BACKENDS = {"torch": "torch", "tensorflow": "tf"}  # backend -> example suffix


def example(model, backend):
    return EXAMPLES / f"digits-{model}-{BACKENDS[backend]}.yaml"


@pytest.fixture(scope="module")
def run_example(tmp_path_factory):
    """Each bundled example trained once (20 epochs, 2 ranks) and shared by the tests."""
    done = {}

    def run(model, backend):
        if (model, backend) not in done:
            out = tmp_path_factory.mktemp(f"{model}-{backend}")
            done[model, backend] = out, hvdtrain("run", example(model, backend), "-np", "2", f"output={out}")
        return done[model, backend]
    return run


def summary_of(out):
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_example_reaches_095_and_prints_it(run_example, model, backend):
    out, result = run_example(model, backend)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = summary_of(out)
    assert summary["workers"] == 2 and summary["backend"] == backend
    assert summary["final"]["val_accuracy"] >= 0.95
    assert f"validation accuracy {summary['final']['val_accuracy']:.4f}" in result.stdout
    assert f"{summary['parameters']:,} parameters on 2 workers" in result.stdout
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(1, 21))
    assert {"train_loss", "val_loss", "val_accuracy", "val_precision", "val_recall", "val_f1"} <= set(lines[-1])
    assert [p.name for p in checkpoint.list_checkpoints(out / "checkpoints")] == \
        ["epoch-000015.ckpt", "epoch-000020.ckpt"]


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_backends_have_parity(run_example, model, figure):
    """Same spec but for the backend: same parameter count, accuracy within 0.03."""
    runs = {b: run_example(model, b) for b in BACKENDS}
    assert all(result.returncode == 0 for _, result in runs.values())
    torch_run, tf_run = (summary_of(out) for out, _ in runs.values())
    assert torch_run["parameters"] == tf_run["parameters"] > 0
    gap = abs(torch_run["final"]["val_accuracy"] - tf_run["final"]["val_accuracy"])
    assert gap <= 0.03, (torch_run["final"], tf_run["final"])
    figure(f"parity {model}: {torch_run['parameters']:,} parameters; accuracy torch "
           f"{torch_run['final']['val_accuracy']:.4f}, tensorflow {tf_run['final']['val_accuracy']:.4f} "
           f"(gap {gap:.4f})")


PHASES = ["launcher", "python", "bootstrap", "framework", "data", "horovod", "model", "sync", "first batch",
          "first step"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_start_up_is_timed_phase_by_phase(run_example, backend, figure):
    """The first epoch's record: the slowest rank's seconds from `hvdtrain run` to its first
    batch, made of its phases in the order a rank goes through them."""
    out, result = run_example("mlp", backend)
    assert result.returncode == 0
    first, second = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()[:2]]
    phases = first["startup_phases"]
    assert list(phases) == PHASES and all(seconds >= 0 for seconds in phases.values())
    assert sum(phases.values()) - phases["first step"] == pytest.approx(first["startup_s"], abs=0.05)
    assert "startup_s" not in second and "startup_phases" not in second
    figure(f"start-up digits-mlp {backend}, 2 ranks: {first['startup_s']:.1f} s to the first batch ("
           + ", ".join(f"{name} {seconds:.1f}" for name, seconds in phases.items()) + ")")


def test_tensorflow_start_up_noise_stays_out_of_the_terminal(run_example):
    _, result = run_example("mlp", "tensorflow")
    assert result.returncode == 0
    for noise in ("cpu_feature_guard", "oneDNN custom operations", "TF_ENABLE_ONEDNN_OPTS"):
        assert noise not in result.stdout + result.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_exported_model_predicts_without_horovod(run_example, cli, tmp_path, backend):
    out, _ = run_example("mlp", backend)
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_after_stop_gives_the_same_final_weights(cli, tmp_path, backend):
    spec = example("mlp", backend)
    args = ["-np", "2", "checkpoint.every_epochs=1", "checkpoint.keep_last=3"]
    whole = cli("run", spec, *args, "train.epochs=6", f"output={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-3000:]
    part = tmp_path / "part"
    first = cli("run", spec, *args, "train.epochs=4", f"output={part}")
    assert first.returncode == 0, first.stderr[-3000:]
    # the newest checkpoint is damaged: resume must fall back to the one before
    newest = checkpoint.checkpoint_path(part / "checkpoints", 4)
    newest.write_bytes(newest.read_bytes()[:-64])
    second = cli("run", spec, *args, "train.epochs=6", f"output={part}")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "skipping checkpoint" in second.stderr and "truncated" in second.stderr
    assert "resuming from" in second.stdout and "epoch-000003.ckpt" in second.stdout
    assert summary_of(part)["weights_digest"] == summary_of(tmp_path / "whole")["weights_digest"]
    epochs = [json.loads(ln)["epoch"] for ln in (part / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("backend", BACKENDS)
def test_failing_rank_fails_the_job_with_its_message(cli, tmp_path, backend):
    # a data file that passes the spec's checks but cannot be parsed: each rank finds it when loading
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,label\n1,2,0\n3,oops,1\n")
    result = cli("run", example("mlp", backend), "-np", "2", f"output={tmp_path / 'out'}",
                 "data.source=file", f"data.path={bad}")
    assert result.returncode == 2
    assert f"{bad}:3: column 'b' holds 'oops', not a number" in result.stderr
    assert re.search(r"training failed: rank [01] exited with status 2", result.stderr)
    assert "Traceback" not in result.stderr


def test_a_sweep_runs_each_value_in_its_own_directory_and_lists_them(cli, tmp_path):
    """hvdtrain run --sweep: one run after another, each with its value and directory; the
    table at the end and `hvdtrain status` on the sweep's directory, best first."""
    out = tmp_path / "sweep"
    result = cli("run", example("mlp", "torch"), "-np", "2", "--sweep", "optimizer.lr=0.002,0.05",
                 f"output={out}", "train.epochs=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sweep run 1/2: lr=0.002" in result.stdout and "sweep run 2/2: lr=0.05" in result.stdout
    best = {}
    for name, lr in (("lr=0.002", 0.002), ("lr=0.05", 0.05)):
        assert yaml.safe_load((out / name / "spec.yaml").read_text())["optimizer"]["lr"] == lr
        records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in records] == [1, 2] and (out / name / "summary.json").is_file()
        best[name] = min(r["val_loss"] for r in records)
    shown = cli("status", out)
    assert shown.returncode == 0, shown.stderr
    rows = [line.split() for line in shown.stdout.splitlines()[1:]]
    assert rows == [[n, "done", "2/2", f"{best[n]:.4f}"] for n in sorted(best, key=best.get)]
    assert shown.stdout in result.stdout  # the same table ended the sweep
    bad = cli("run", example("mlp", "torch"), "--sweep", "optimizer.lr=0.1,-2", f"output={tmp_path / 'bad'}")
    assert bad.returncode == 2 and "optimizer.lr" in bad.stderr and not (tmp_path / "bad").exists()

