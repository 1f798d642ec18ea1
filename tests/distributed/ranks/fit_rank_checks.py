"""Run inside each rank by horovodrun (see test_torch_ranks.py): every check
reads hvd.rank()/hvd.size() and compares ranks through allgather."""
import os
from pathlib import Path

import horovod.torch as hvd
import pytest

from hvdtrain.backends import torch as backend
from hvdtrain.data import load_dataset
from hvdtrain.spec import CNNSpec, load_spec

ROOT = Path(__file__).resolve().parents[3]
OUT = Path(os.environ["HVDTRAIN_TEST_OUT"])


def fit(name, *overrides):
    spec = load_spec(ROOT / "examples" / "digits-mlp-torch.yaml",
                     [f"output={OUT / name}", *overrides])
    dataset = load_dataset(spec.data, image=isinstance(spec.model, CNNSpec))
    return backend.fit(spec, dataset, progress=lambda line: None)


def same_on_every_rank(value, name):
    gathered = hvd.allgather_object(value, name=name)
    return all(v == gathered[0] for v in gathered)


@pytest.mark.parametrize("name, overrides, floor", [
    ("sgd", ["train.epochs=10"], 0.95),
    ("adam-fp16-bpps2", ["train.epochs=10", "optimizer.name=adam", "optimizer.lr=0.002",
                         "horovod.fp16_compression=true", "horovod.backward_passes_per_step=2"], 0.93),
])
def test_ranks_end_identical_with_identical_metrics(name, overrides, floor):
    summary = fit(name, *overrides)
    assert hvd.size() == 2
    assert same_on_every_rank(summary["weights_digest"], f"{name}.digest")
    timing = ("seconds", "samples_per_s")  # each rank's own clock
    allreduced = {k: v for k, v in summary["final"].items() if k not in timing}
    assert set(allreduced) >= {"train_loss", "val_loss", "val_accuracy", "val_f1"}
    assert same_on_every_rank(allreduced, f"{name}.final")
    assert summary["final"]["val_accuracy"] >= floor
    if hvd.rank() == 0:
        assert (OUT / name / "model" / "weights.pt").exists()
