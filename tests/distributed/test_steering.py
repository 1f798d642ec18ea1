"""Seeing and steering a run on 2 gloo ranks, both backends: progress lines under
the launcher, TensorBoard event files, curves.png, bf16, a held-out test split
that `evaluate` scores as the summary did, early stopping with the best epoch
exported and the plateau schedule."""
import json

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.distributed
MLP = {"torch": ROOT / "examples" / "digits-mlp-torch.yaml", "tensorflow": ROOT / "examples" / "digits-mlp-tf.yaml"}


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_run_shows_progress_writes_events_and_curves_and_scores_its_test_split(cli, tmp_path, backend, figure):
    out = tmp_path / "run"
    result = cli("run", MLP[backend], "-np", "2", f"output={out}", "train.epochs=6", "log.every_seconds=0.001",
                 "log.tensorboard=true", "log.every_steps=5", "data.test_fraction=0.2", "train.precision=bf16",
                 "train.grad_clip_norm=5.0")
    assert result.returncode == 0, result.stderr[-3000:]
    # under horovodrun stdout is a pipe: rank 0's progress lines within epochs, not a bar
    steps = [line for line in result.stdout.splitlines() if "  step " in line]
    assert steps and all(line.startswith("[0]<stdout>:epoch ") and "samples/s  ETA " in line for line in steps)
    assert "[1]<stdout>:epoch" not in result.stdout
    figure(f"{backend} progress line: {steps[0].split(':', 1)[1]}")

    summary = json.loads((out / "summary.json").read_text())
    figure(f"{backend} bf16: validation accuracy {summary['final']['val_accuracy']:.3f}, "
           f"test accuracy {summary['test']['accuracy']:.3f}")
    assert summary["final"]["val_accuracy"] >= 0.93 and summary["test"]["accuracy"] >= 0.93
    assert summary["stopped"] == "all 6 epochs done"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert {"epoch/train_loss", "epoch/val_loss", "epoch/val_accuracy", "epoch/lr", "train/step_loss",
            "train/lr"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("epoch/val_accuracy")] == [1, 2, 3, 4, 5, 6]
    assert [round(e.value, 6) for e in events.Scalars("epoch/val_loss")] == \
        [round(r["val_loss"], 6) for r in records(out)]
    step_events = events.Scalars("train/step_loss")
    assert len(step_events) >= 6 and [e.step for e in step_events] == sorted({e.step for e in step_events})
    assert "spec" in tags["tensors"] and b"backend: " + backend.encode() in \
        events.Tensors("spec")[0].tensor_proto.string_val[0]

    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    evaluated = cli("evaluate", out)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    scored = json.loads((out / "evaluation" / "evaluation.json").read_text())
    assert scored["samples"] == summary["test"]["samples"]
    # the summary scored the model under bf16 autocast, `evaluate` the export in float32:
    # a sample on a decision boundary may fall the other way (at most one seen)
    assert abs(scored["accuracy"] - summary["test"]["accuracy"]) * scored["samples"] <= 1.01
    for key in ("precision", "recall", "f1"):
        assert scored[key] == pytest.approx(summary["test"][key], abs=0.01), key
    assert scored["loss"] == pytest.approx(summary["test"]["loss"], rel=0.02)
    assert (out / "evaluation" / "confusion.png").is_file() and len(scored["per_class"]) == 10


def plateau_factors(records, decay, patience):
    """The lr factor each epoch should have had, by the plateau rule on val_loss."""
    factor, best, wait, factors = 1.0, None, 0, []
    for r in records:
        factors.append(factor)
        if best is None or r["val_loss"] < best:
            best, wait = r["val_loss"], 0
        else:
            wait += 1
            if wait >= patience:
                factor, wait = factor * decay, 0
    return factors


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_early_stopping_ends_both_ranks_at_one_epoch_and_exports_the_best(cli, tmp_path, backend, figure):
    out = tmp_path / "run"
    result = cli("run", MLP[backend], "-np", "2", f"output={out}", "train.epochs=30", "train.batch_size=8",
                 "train.early_stopping={metric: val_loss, patience: 2}", "optimizer.schedule=plateau",
                 "optimizer.patience=1", "optimizer.decay=0.1")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    logged = records(out)
    stopped_at = len(logged)
    figure(f"{backend} early stopping: {summary['stopped']}")
    # both ranks left the loop at the same epoch: the end-of-run digest check met on both
    assert stopped_at < 30 and summary["final"]["epoch"] == stopped_at
    assert summary["stopped"].startswith("early stopping: val_loss did not improve")
    best = min(logged, key=lambda r: r["val_loss"])
    assert summary["best"] == {"epoch": best["epoch"], "metric": "val_loss", "value": best["val_loss"]}
    assert summary["exported_epoch"] == best["epoch"] < stopped_at
    # the plateau schedule: the logged lr follows the rule, and it did lower the lr
    lrs = [r["lr"] for r in logged]  # epoch 1 ends in the example's warm-up
    factors = plateau_factors(logged, 0.1, 1)
    assert lrs[1:] == pytest.approx([lrs[1] * f for f in factors[1:]], rel=1e-9)
    assert min(factors) < 1.0
    if backend == "torch":  # the exported weights are the best epoch's checkpoint
        import io

        import torch
        from hvdtrain.train.checkpoint import load_best
        kept = torch.load(io.BytesIO(load_best(out / "checkpoints").payload), weights_only=True)["model"]
        exported = torch.load(out / "model" / "weights.pt", weights_only=True)
        assert all(torch.equal(kept[k], exported[k]) for k in kept)
    # a rerun finds the stop in its checkpoint and trains no further
    again = cli("run", MLP[backend], "-np", "2", f"output={out}", "train.epochs=30", "train.batch_size=8",
                "train.early_stopping={metric: val_loss, patience: 2}", "optimizer.schedule=plateau",
                "optimizer.patience=1", "optimizer.decay=0.1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(records(out)) == stopped_at and "epoch 1/30" not in again.stdout


def test_plot_draws_several_runs_on_one_figure(cli, tmp_path):
    runs = []
    for lr in ("0.01", "0.05"):
        out = tmp_path / f"lr{lr}"
        quiet = cli("run", MLP["torch"], "-np", "2", f"output={out}", "train.epochs=3", f"optimizer.lr={lr}", "-q")
        assert quiet.returncode == 0, quiet.stderr[-3000:]
        assert "epoch 1/3" not in quiet.stdout and "validation accuracy" in quiet.stdout.splitlines()[-1]
        runs.append(out)
    result = cli("plot", *runs, "-o", tmp_path / "both.png")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "both.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = cli("plot", tmp_path / "nothing")
    assert missing.returncode == 2 and "no metrics.jsonl" in missing.stderr


def test_compiled_channels_last_training_follows_the_plain_model_and_exports_it(cli, tmp_path, figure):
    """train.compile + train.channels_last on 2 ranks learn as the plain model does
    (other kernels sum in another order, so the runs drift apart as SGD goes on: the
    first epoch's loss within 1%, then the accuracy; the run's end-of-training check
    has compared the ranks' weights), export the plain model, and predict from it."""
    cnn = ROOT / "examples" / "digits-cnn-torch.yaml"
    runs = {}
    for name, extra in (("plain", []), ("compiled", ["train.compile=true", "train.channels_last=true"])):
        out = tmp_path / name
        result = cli("run", cnn, "-np", "2", f"output={out}", "train.epochs=2", *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = records(out)
    plain, compiled = ([r["train_loss"] for r in runs[k]] for k in ("plain", "compiled"))
    accuracy = {k: runs[k][-1]["val_accuracy"] for k in runs}
    figure(f"train loss per epoch, plain {plain} / compiled, channels-last {compiled}; "
           f"validation accuracy {accuracy}")
    assert compiled[0] == pytest.approx(plain[0], rel=1e-2)
    assert compiled[-1] < 0.5 * compiled[0]
    assert accuracy["compiled"] >= accuracy["plain"] - 0.03
    import torch
    weights = torch.load(tmp_path / "compiled" / "model" / "weights.pt", weights_only=True)
    assert not [k for k in weights if k.startswith("_orig_mod")]
    rows = tmp_path / "rows.npz"
    import numpy as np
    from sklearn.datasets import load_digits
    np.savez(rows, x=load_digits().data[:5])
    predicted = cli("predict", tmp_path / "compiled", rows, "-o", tmp_path / "p.csv")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 6
