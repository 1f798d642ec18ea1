"""The loop's rules, driven in one process through fake collectives: the
learning-rate rule is the same on the static and the elastic path."""
import json
from types import SimpleNamespace

import numpy as np
import pytest

from hvdtrain.train import elastic as elastic_path, loop
from hvdtrain.data import ArraySamples, Dataset, Preprocessing
from hvdtrain.train.contract import Comm, Position, Steps
from hvdtrain.train.lr import lr_schedule
from hvdtrain.spec import validate


def fake_comm(size, local_size, hierarchical):
    """Rank 0 of `size` ranks whose peers hold the same values."""
    return Comm(rank=0, size=size, local_rank=0, local_size=local_size,
                     allreduce_sum=lambda values, name: np.asarray(values, dtype=np.float64),
                     broadcast_object=lambda obj, name: obj,
                     allgather_object=lambda obj, name: [obj] * size, hierarchical=hierarchical)


def tiny_dataset(n=64, k=2):
    rng = np.random.default_rng(0)
    prep = Preprocessing(["a", "b"], ["0", "1"], [2], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0])
    return Dataset(ArraySamples(rng.normal(size=(n, 2)).astype(np.float32), np.arange(n) % k),
                   ArraySamples(rng.normal(size=(16, 2)).astype(np.float32), np.arange(16) % k), prep)


def recording_steps(seen_lrs, trained=None):
    """Steps that record the lr of each call's first step and (trained) the
    (epoch, step) of every step taken."""
    def train_epoch(epoch, batches, lr_at, first, count):
        batches = list(batches)
        seen_lrs.append(lr_at(first))
        if trained is not None:
            trained.extend((epoch, first + i) for i in range(len(batches)))
        return 0.5 * sum(len(y) for _, y in batches), sum(len(y) for _, y in batches)
    return Steps(train_epoch=train_epoch, evaluate_batch=lambda x, y: (np.zeros((len(x), 2)), 0.7 * len(y)),
                 loader=lambda samples, index_batches, epoch=None: (samples.batch(b, epoch) for b in index_batches),
                 state_bytes=lambda: b"state", load_state_bytes=lambda b: None,
                 weights_digest=lambda: "digest", export=lambda directory: None, parameters=6,
                 signature=[("w", (2, 2), "float32")])


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
        return loop.run_epochs(spec, tiny_dataset(), comm, steps, Position(0), quiet)
    state = SimpleNamespace(commit=lambda: None)
    make_state = lambda **attributes: (vars(state).update(attributes), state)[1]  # noqa: E731
    return elastic_path.run_elastic(spec, tiny_dataset(), lambda: comm, steps, make_state, lambda f: f, quiet)


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


def test_checkpoints_within_an_epoch_record_the_position_a_resumed_run_goes_on_from(tmp_path):
    """64 samples, 2 ranks, batch 4: 8 steps an epoch; every_steps 3 checkpoints
    after steps 3 and 6 of each epoch (and the epoch's end); resuming from the
    one after step 6 of epoch 2 trains steps 6 and 7 of it, then epoch 3."""
    from hvdtrain.train import checkpoint
    from hvdtrain.train.resume import load_latest
    raw = {"name": "mid", "backend": "torch", "model": {"kind": "mlp"}, "data": {"source": "iris"},
           "train": {"epochs": 3, "batch_size": 4}, "checkpoint": {"every_steps": 3, "keep_last": 100},
           "output": str(tmp_path / "run")}
    spec = validate(raw)
    trained = []
    loop.run_epochs(spec, tiny_dataset(), fake_comm(2, 2, False), recording_steps([], trained),
                    Position(0), lambda line: None)
    assert trained == [(e, s) for e in range(3) for s in range(8)]
    names = [p.name for p in checkpoint.list_checkpoints(spec.checkpoint.dir)]
    assert names == [n for e in range(3) for n in (f"epoch-{e:06d}-step-000000003.ckpt",
                                                    f"epoch-{e:06d}-step-000000006.ckpt",
                                                    f"epoch-{e + 1:06d}.ckpt")]
    # remove the files from the end of epoch 2 on, to resume within epoch 2
    for path in checkpoint.list_checkpoints(spec.checkpoint.dir)[-4:]:
        path.unlink()
    start, problem = load_latest(spec, recording_steps([]))
    # after step 6, rank 0 and its peer (the fake comm doubles nothing) trained 6 x 4 samples
    assert problem is None and (start.epoch, start.step, start.seen) == (1, 6, 24)
    assert start.loss_sum == 0.5 * 24
    resumed = []
    summary = loop.run_epochs(spec, tiny_dataset(), fake_comm(2, 2, False), recording_steps([], resumed),
                              start, lambda line: None)
    assert resumed == [(1, 6), (1, 7)] + [(2, s) for s in range(8)]
    # the resumed epoch's record covers all its steps: 8 batches of 4
    assert summary["final"]["epoch"] == 3
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3] and records[1]["train_loss"] == 0.5


def steering_spec(**train):
    return validate({"name": "s", "backend": "torch", "model": {"kind": "mlp"}, "data": {"source": "iris"},
                     "train": {"epochs": 50, **train}, "optimizer": {"schedule": "plateau", "patience": 2}})


def test_steering_stops_at_a_target_or_after_patience_and_decays_on_plateaus():
    from hvdtrain.train.steer import Steering
    target = Steering()
    spec = steering_spec(target={"metric": "val_accuracy", "value": 0.9})
    for epoch, acc in enumerate([0.5, 0.8, 0.91], start=1):
        assert target.stopped is None
        target.update(spec, {"epoch": epoch, "val_accuracy": acc, "val_loss": 1.0 / epoch})
    assert target.stopped == "target: val_accuracy 0.9100 reached 0.9"

    patient = Steering()
    spec = steering_spec(early_stopping={"metric": "val_loss", "patience": 3, "min_delta": 0.01})
    losses = [1.0, 0.8, 0.795, 0.81, 0.805]  # 0.795 is not better by more than 0.01
    for epoch, loss in enumerate(losses, start=1):
        patient.update(spec, {"epoch": epoch, "val_loss": loss})
    assert patient.stopped.startswith("early stopping: val_loss did not improve by more than 0.01 for 3 epochs")
    assert (patient.best_epoch, patient.best_value) == (2, 0.8)
    # plateau (patience 2, decay 0.1): no lower val_loss after 0.795 at epochs 4 and 5
    assert patient.lr_factor == pytest.approx(0.1)
    assert Steering.from_dict(patient.to_dict()) == patient  # what a checkpoint keeps


@pytest.mark.parametrize("schedule, expected", [
    ("constant", [1.0, 1.0, 1.0, 1.0]),
    ("cosine", [1.0, 0.5 * (1 + np.cos(np.pi / 4)), 0.5, 0.5 * (1 + np.cos(3 * np.pi / 4))]),
    ("step", [1.0, 1.0, 0.1, 0.1]),
])
def test_lr_schedules_after_warm_up(schedule, expected):
    spec = validate({"name": "s", "backend": "torch", "model": {"kind": "mlp"}, "data": {"source": "iris"},
                     "optimizer": {"lr": 0.1, "schedule": schedule, "decay_every_epochs": 2, "decay": 0.1}})
    got = [lr_schedule(spec.optimizer, 0.4, epoch, 10, epochs=4)(0) / 0.4 for epoch in range(4)]
    assert got == pytest.approx(expected)
    warm = spec.model_copy(update={"optimizer": spec.optimizer.model_copy(update={"warmup_epochs": 1.0})})
    assert lr_schedule(warm.optimizer, 0.4, 0, 10, epochs=4)(5) == pytest.approx(0.25)  # halfway up


def test_a_stop_asked_for_ends_training_after_a_complete_group_of_passes(tmp_path, monkeypatch):
    """Slurm's warning noted before training: with checks every 3 steps and groups of 2
    backward passes, the ranks stop after step 6 (not 3, inside a group), checkpointed there."""
    from hvdtrain.train import checkpoint, preempt
    monkeypatch.setattr(preempt, "_installed", [True])
    monkeypatch.setattr(preempt, "_asked", [10])
    spec = validate({"name": "stop", "backend": "torch", "model": {"kind": "mlp"}, "data": {"source": "iris"},
                     "train": {"epochs": 2, "batch_size": 4}, "slurm": {"check_every_steps": 3},
                     "horovod": {"backward_passes_per_step": 2}, "output": str(tmp_path / "run")})
    trained = []
    with pytest.raises(preempt.Preempted, match="after step 6 of epoch 1"):
        loop.run_epochs(spec, tiny_dataset(), fake_comm(2, 2, False), recording_steps([], trained),
                        Position(0), lambda line: None)
    assert trained == [(0, s) for s in range(6)]
    [saved] = checkpoint.list_checkpoints(spec.checkpoint.dir)
    assert saved.name == "epoch-000000-step-000000006.ckpt"
    assert (tmp_path / "run" / preempt.MARKER).read_text() == "epoch 1, step 6\n"


def test_labels_on_a_gpu_come_back_to_the_host_for_the_metrics():
    from hvdtrain.train.validation import host_labels

    class OnGpu:  # what a CUDA tensor offers: is_cuda and cpu()
        is_cuda = True

        def cpu(self):
            return np.array([1, 0, 2])
    assert host_labels(OnGpu()).tolist() == [1, 0, 2]
    assert host_labels(np.array([3, 4])).tolist() == [3, 4]
    import torch
    assert host_labels(torch.tensor([5, 6])).tolist() == [5, 6]


def shares(remaining: np.ndarray, size: int, batch_size: int) -> list[list[np.ndarray]]:
    """Each global batch of elastic_batches as the ranks train it: rank r takes part r."""
    return [np.array_split(g, size) for g in elastic_path.elastic_batches(remaining, size, batch_size)]


@pytest.mark.parametrize("n, size, batch_size", [(1437, 2, 32), (1437, 1, 32), (64, 2, 32), (65, 2, 32),
                                                 (129, 4, 32), (100, 3, 7), (5, 4, 2), (3, 2, 32)])
def test_elastic_batches_give_every_remaining_sample_to_one_rank_once(n, size, batch_size):
    remaining = np.random.default_rng(n).permutation(n)
    parts = shares(remaining, size, batch_size)
    trained = np.concatenate([part for batch in parts for part in batch])
    assert sorted(trained) == list(range(n)) and len(trained) == n  # each sample exactly once
    assert all(len(part) > 0 for batch in parts for part in batch)  # no rank gets an empty batch
    assert all(len(batch) == size for batch in parts)
    # full global batches of size x batch_size, except the last, which may hold up to size - 1 more
    sizes = [sum(len(part) for part in batch) for batch in parts]
    assert all(s == size * batch_size for s in sizes[:-1]) and 0 < sizes[-1] < (size + 1) * batch_size
    assert np.array_equal(np.concatenate([np.concatenate(batch) for batch in parts]), remaining)  # in order


def test_elastic_batches_merge_a_last_chunk_too_small_for_every_rank():
    batches = elastic_path.elastic_batches(np.arange(2 * 32 + 1), 2, 32)
    assert [len(b) for b in batches] == [65]  # one sample alone would leave rank 1 without any
    assert [len(b) for b in elastic_path.elastic_batches(np.arange(2 * 32 + 2), 2, 32)] == [64, 2]


def test_workers_leaving_and_joining_within_an_epoch_train_each_sample_once():
    """2 -> 1 -> 2 -> 3 workers, each change at a commit a few steps into the epoch (steps
    after the last commit are rolled back with the model): the rest of the permutation,
    from the committed count on, is shared among the workers now present."""
    n, batch_size, every = 1437, 32, 5
    order = np.random.default_rng([0, 3]).permutation(n)
    processed, trained = 0, []
    for size, commits in [(2, 2), (1, 4), (2, 3), (3, None)]:
        batches = shares(order[processed:], size, batch_size)
        steps = len(batches) if commits is None else commits * every
        for batch in batches[:steps]:
            trained.extend(np.concatenate(batch))
        processed += sum(len(np.concatenate(b)) for b in batches[:steps])  # what the commit records
    assert processed == n
    assert sorted(trained) == list(range(n))


def test_a_schedule_by_import_path_scales_the_lr_after_warm_up_and_is_checked(tmp_path):
    from hvdtrain import plugins
    from hvdtrain.errors import SpecError, UserError
    from tests.conftest import ROOT
    plugins.add_import_paths([str(ROOT / "tests" / "data" / "user_code")])
    raw = {"name": "s", "backend": "torch", "model": {"kind": "mlp"}, "data": {"source": "iris"},
           "optimizer": {"lr": 0.1, "warmup_epochs": 1, "schedule": "schedules:linear_to_zero"}}
    spec = validate(raw)
    lrs = [lr_schedule(spec.optimizer, 0.4, epoch, 10, epochs=5)(step) for epoch in range(5) for step in (0, 5)]
    # warm-up from 0.1 to 0.4 over epoch 1, then 0.4 falling to 0 over the 4 epochs after it
    assert lrs == pytest.approx([0.1, 0.25, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05])
    bad = validate({**raw, "optimizer": {**raw["optimizer"], "schedule": "schedules:not_a_number"}})
    with pytest.raises(UserError, match=r"optimizer.schedule: schedules:not_a_number\(0, 4\) gave nan; expected "
                                        "a factor >= 0"):
        lr_schedule(bad.optimizer, 0.4, 1, 10, epochs=5)(0)
    with pytest.raises(SpecError, match="optimizer.schedule: module 'schedules' .* has no 'missing'"):
        from hvdtrain.spec import load_spec
        (tmp_path / "s.yaml").write_text(json.dumps({**raw, "code": [str(ROOT / "tests" / "data" / "user_code")],
                                                     "optimizer": {"schedule": "schedules:missing"}}))
        load_spec(tmp_path / "s.yaml")


def test_verbose_runs_print_where_start_up_went(tmp_path):
    """log.level verbose: after the first epoch, rank 0 names each phase before the first
    step; the record keeps them, later epochs have none."""
    raw = {"name": "v", "backend": "torch", "model": {"kind": "mlp"}, "data": {"source": "iris"},
           "train": {"epochs": 2, "batch_size": 4}, "log": {"level": "verbose"}, "output": str(tmp_path / "run")}
    lines = []
    loop.run_epochs(validate(raw), tiny_dataset(), fake_comm(2, 2, False), recording_steps([]),
                    Position(0), lines.append)
    shown = [line for line in lines if line.startswith("start-up to the first step")]
    assert len(shown) == 1 and "first batch" in shown[0], lines
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "first batch" in records[0]["startup_phases"] and "startup_phases" not in records[1]


def test_a_process_start_is_known_to_the_clock_tick():
    """psutil's create_time may be a second early (it counts from the boot time in whole
    seconds); a fresh interpreter's own start is within a fraction of a second of now."""
    import subprocess
    import sys
    import time
    before = time.time()
    shown = subprocess.run([sys.executable, "-c", "from hvdtrain.train.startup import process_started_at as p; "
                            "print(p())"], capture_output=True, text=True, check=True).stdout
    assert before - 0.02 <= float(shown) <= time.time()
