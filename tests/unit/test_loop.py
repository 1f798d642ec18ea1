"""The loop's rules, driven in one process through fake collectives: the
learning-rate rule is the same on the static and the elastic path."""
from types import SimpleNamespace

import numpy as np
import pytest

from hvdtrain import loop
from hvdtrain.data import Dataset, Preprocessing
from hvdtrain.spec import validate


def fake_comm(size, local_size, hierarchical):
    """Rank 0 of `size` ranks whose peers hold the same values."""
    return loop.Comm(rank=0, size=size, local_rank=0, local_size=local_size,
                     allreduce_sum=lambda values, name: np.asarray(values, dtype=np.float64),
                     broadcast_object=lambda obj, name: obj,
                     allgather_object=lambda obj, name: [obj] * size, hierarchical=hierarchical)


def tiny_dataset(n=64, k=2):
    rng = np.random.default_rng(0)
    prep = Preprocessing(["a", "b"], ["0", "1"], [2], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0])
    return Dataset(rng.normal(size=(n, 2)).astype(np.float32), np.arange(n) % k,
                   rng.normal(size=(16, 2)).astype(np.float32), np.arange(16) % k, prep)


def recording_steps(seen_lrs):
    def train_epoch(epoch, batches, lr_at):
        seen_lrs.append(lr_at(0))
        return 0.5 * sum(len(y) for _, y in batches), sum(len(y) for _, y in batches)
    return loop.Steps(train_epoch, lambda x, y: (np.zeros((len(x), 2)), 0.7 * len(y)), lambda: b"state",
                      lambda b: None,
                      lambda: "digest", lambda directory: None, 6, [("w", (2, 2), "float32")])


def spec_for(tmp_path, adasum, elastic):
    raw = {"name": "lr", "backend": "torch", "model": {"kind": "mlp"}, "data": {"source": "iris"},
           "optimizer": {"lr": 0.1}, "train": {"epochs": 1, "batch_size": 4},
           "horovod": {"adasum": adasum}, "output": str(tmp_path / "run")}
    if elastic:
        raw["horovod"]["elastic"] = {"max_workers": 8, "discovery": "discover.sh"}
    return validate(raw)


def run_path(spec, comm, steps):
    quiet = lambda line: None  # noqa: E731
    if spec.horovod.elastic is None:
        return loop.run_epochs(spec, tiny_dataset(), comm, steps, 0, quiet)
    state = SimpleNamespace(commit=lambda: None)
    make_state = lambda **attributes: (vars(state).update(attributes), state)[1]  # noqa: E731
    return loop.run_elastic(spec, tiny_dataset(), lambda: comm, steps, make_state, lambda f: f, quiet)


@pytest.mark.parametrize("adasum, hierarchical, expected", [
    (False, False, 0.1 * 4),  # lr x workers
    (True, False, 0.1),  # Adasum adapts to the number of workers itself
    (True, True, 0.1 * 2),  # ... after a sum within the node on GPUs: lr x local size
])
def test_static_and_elastic_paths_take_the_same_learning_rate(tmp_path, adasum, hierarchical, expected):
    lrs = {}
    for elastic in (False, True):
        seen = []
        spec = spec_for(tmp_path / str(elastic), adasum, elastic)
        summary = run_path(spec, fake_comm(4, 2, hierarchical), recording_steps(seen))
        assert summary["final"]["lr"] == pytest.approx(expected)
        lrs[elastic] = seen
    assert lrs[False] and lrs[True]
    assert all(lr == pytest.approx(expected) for lr in lrs[False] + lrs[True]), lrs


def test_end_of_epoch_records_and_checkpoints_on_both_paths(tmp_path):
    for elastic in (False, True):
        spec = spec_for(tmp_path / str(elastic), False, elastic)
        run_path(spec, fake_comm(4, 2, False), recording_steps([]))
        out = tmp_path / str(elastic) / "run"
        assert (out / "metrics.jsonl").read_text().count("\n") == 1
        assert [p.name for p in (out / "checkpoints").iterdir()] == ["epoch-000001.ckpt"]
