"""Run inside each rank by horovodrun (see test_ranks.py) for the backend named
by HVDTRAIN_TEST_BACKEND: every check reads hvd.rank()/hvd.size() and
compares ranks through allgather."""
import os
from pathlib import Path

import pytest

from hvdtrain.backends import get_backend, import_horovod
from hvdtrain.data import load_dataset
from hvdtrain.spec import CNNSpec, load_spec

ROOT = Path(__file__).resolve().parents[3]
OUT = Path(os.environ["HVDTRAIN_TEST_OUT"])
BACKEND = os.environ["HVDTRAIN_TEST_BACKEND"]
EXAMPLE = {"torch": "digits-mlp-torch.yaml", "tensorflow": "digits-mlp-tf.yaml"}[BACKEND]
ARTIFACT = {"torch": "weights.pt", "tensorflow": "model.keras"}[BACKEND]
backend = get_backend(BACKEND)
hvd = import_horovod(BACKEND)


def fit(name, *overrides):
    """Train; return the summary and this rank's own weights digest, computed on this
    rank from its own model (the summary holds the digest the ranks agreed on)."""
    spec = load_spec(ROOT / "examples" / EXAMPLE, [f"output={OUT / name}", *overrides])
    dataset = load_dataset(spec.data, image=isinstance(spec.model, CNNSpec))
    computed = []
    original = backend.weights_digest

    def recording(model):
        computed.append(original(model))
        return computed[-1]
    backend.weights_digest = recording  # the Steps' digest reads it at call time
    try:
        summary = backend.fit(spec, dataset, progress=lambda line: None)
    finally:
        backend.weights_digest = original
    assert computed, "fit never computed this rank's weights digest"
    return summary, computed[-1]


def same_on_every_rank(value, name):
    gathered = hvd.allgather_object(value, name=name)
    return all(v == gathered[0] for v in gathered)


@pytest.mark.parametrize("name, overrides, floor", [
    ("sgd", ["train.epochs=10"], 0.95),
    ("adam-fp16-bpps2", ["train.epochs=10", "optimizer.name=adam", "optimizer.lr=0.002",
                         "horovod.fp16_compression=true", "horovod.backward_passes_per_step=2"], 0.93),
])
def test_ranks_end_identical_with_identical_metrics(name, overrides, floor):
    summary, own_digest = fit(name, *overrides)
    assert hvd.size() == 2
    assert same_on_every_rank(own_digest, f"{name}.digest")
    assert own_digest == summary["weights_digest"]
    timing = ("seconds", "samples_per_s", "train_samples_per_s")  # each rank's own clock
    allreduced = {k: v for k, v in summary["final"].items() if k not in timing}
    assert set(allreduced) >= {"train_loss", "val_loss", "val_accuracy", "val_f1"}
    assert same_on_every_rank(allreduced, f"{name}.final")
    assert summary["final"]["val_accuracy"] >= floor
    if hvd.rank() == 0:
        model_dir = OUT / name / "model"
        assert (model_dir / "model.json").exists() and (model_dir / ARTIFACT).exists()


def test_ranks_with_different_weights_stop_with_the_digest_message():
    """check_consistency on real models whose weights differ on rank 1."""
    from types import SimpleNamespace

    from hvdtrain.errors import TrainingError
    from hvdtrain.train.contract import horovod_comm
    from hvdtrain.train.preflight import check_consistency
    if BACKEND == "tensorflow":
        import keras
        import tensorflow as tf
        tensor = tf.constant
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        if hvd.rank() == 1:
            model.trainable_weights[0].assign_add(model.trainable_weights[0] * 0 + 1e-3)
    else:
        import torch
        tensor = torch.from_numpy
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        if hvd.rank() == 1:
            with torch.no_grad():
                model.weight.add_(1e-3)
    steps = SimpleNamespace(weights_digest=lambda: backend.weights_digest(model))
    with pytest.raises(TrainingError, match=r"ranks ended with different weights: ranks \[0\]: \w{12}; "
                                            r"ranks \[1\]: \w{12}"):
        check_consistency(horovod_comm(hvd, tensor), steps)
