"""Elastic training for real: `hvdtrain run` with horovod.elastic starts 2 workers
on two local "hosts" named by a discovery script; one worker is SIGKILLed and
its host removed, the job goes on alone; a host added to the discovery output
brings a worker back, which joins. The job must finish with identical weights
on every rank, accuracy >= 0.95 on digits, and each training sample trained
exactly once in every epoch."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml

from tests.conftest import ROOT
from tests.output import Lines

pytestmark = pytest.mark.distributed
MLP = ROOT / "examples" / "digits-mlp-torch.yaml"
USER_CODE = ROOT / "tests" / "data" / "user_code"


def worker_on(host: str, parent: psutil.Process):
    for child in parent.children(recursive=True):
        try:
            if "hvdtrain" in child.cmdline() and child.environ().get("HOROVOD_HOSTNAME") == host:
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def counted_digits_spec(tmp_path, epochs: int) -> tuple[Path, int, int]:
    """The digits MLP as probes.sample_counter, on the digits with each row's number as its
    last feature: (spec, rows, training samples)."""
    from sklearn.datasets import load_digits

    from hvdtrain.data import load_dataset
    from hvdtrain.spec import load_spec
    digits = load_digits()
    x = (digits.data - digits.data.mean(0)) / np.where(digits.data.std(0) > 0, digits.data.std(0), 1)
    np.savez(tmp_path / "digits.npz", x=np.hstack([x, np.arange(len(x))[:, None]]), y=digits.target)
    spec = yaml.safe_load(MLP.read_text())
    spec["data"] = {"source": "file", "path": str(tmp_path / "digits.npz"), "standardize": False,
                    "validation_fraction": 0.2, "seed": 0}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    train = len(load_dataset(load_spec(path).data).train)
    spec["model"] = {"kind": "custom", "builder": "probes:sample_counter",
                     "args": {"rows": len(x), "train_samples": train, "epochs": epochs, "hold_seconds": 240}}
    spec["code"] = [str(USER_CODE)]
    path.write_text(yaml.safe_dump(spec))
    return path, len(x), train


def test_worker_killed_then_added_back_trains_each_sample_once_per_epoch(tmp_path, figure):
    """2 workers -> 1 (one SIGKILLed, its host gone) -> 2 (a host added back). The model
    counts, over all workers, which rows each epoch trained (rolled back with the weights
    on a reset): each training row exactly once per epoch, no validation row ever."""
    epochs = 40
    spec, rows, train = counted_digits_spec(tmp_path, epochs)
    third = socket.gethostname()  # a third local name, resolving to this machine
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost:1\n127.0.0.1:1\n")
    discover = tmp_path / "discover.sh"
    discover.write_text(f"#!/bin/sh\ncat {hosts}\n")
    discover.chmod(0o755)
    elastic = (f"horovod.elastic={{min_workers: 1, max_workers: 2, discovery: {discover}, "
               "commit_every_steps: 5}")
    proc = subprocess.Popen([sys.executable, "-m", "hvdtrain", "run", spec, "-np", "2", f"train.epochs={epochs}",
                             f"output={tmp_path / 'out'}", "log.tensorboard=true", elastic],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = Lines(proc)
    try:
        lines.wait_for_text(f"epoch 3/{epochs}", 300)
        victim = worker_on("127.0.0.1", psutil.Process(proc.pid))
        assert victim is not None
        hosts.write_text("localhost:1\n")
        victim.send_signal(signal.SIGKILL)
        lines.wait_for_text("on 1 workers (elastic)", 120)
        # the remaining worker holds in the last epoch until the job has grown again
        hosts.write_text(f"localhost:1\n{third}:1\n")
        lines.wait_for_text("on 2 workers (elastic)", 300)
        output = lines.finish(600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-4000:]
    records = [json.loads(ln) for ln in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, epochs + 1))  # every epoch once, none lost
    workers = [r["workers"] for r in records]
    assert workers[0] == 2 and 1 in workers and workers[-1] == 2  # shrank, then grew back
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["final"]["val_accuracy"] >= 0.95
    state = torch.load(tmp_path / "out" / "model" / "weights.pt", weights_only=True)
    counts = state["counts"].numpy()
    assert int(state["trained"]) == epochs * train
    trained_rows = counts[0] > 0
    assert trained_rows.sum() == train
    assert (counts[:, trained_rows] == 1).all(), [np.unique(c, return_counts=True) for c in counts]
    assert (counts[:, ~trained_rows] == 0).all()  # validation rows are never trained
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "out" / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert sorted({e.step for e in events.Scalars("epoch/val_accuracy")}) == list(range(1, epochs + 1))
    assert {e.step: e.value for e in events.Scalars("epoch/workers")} == {r["epoch"]: r["workers"] for r in records}
    figure(f"elastic: workers {workers[0]} -> 1 (after the kill) -> {workers[-1]}; each of {train} rows "
           f"trained once in each of {epochs} epochs; final accuracy {summary['final']['val_accuracy']:.4f}")


def elastic_run(tmp_path, hosts_text, *overrides):
    discover = tmp_path / "discover.sh"
    discover.write_text(f"#!/bin/sh\nprintf '{hosts_text}'\n")
    discover.chmod(0o755)
    began = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "hvdtrain", "run", str(MLP), "train.epochs=3",
                             f"output={tmp_path / 'out'}", *overrides,
                             f"horovod.elastic={{min_workers: 1, max_workers: 2, discovery: {discover}}}"],
                            capture_output=True, text=True, timeout=300)
    return result, time.monotonic() - began


def test_one_local_host_with_two_slots_starts_at_once(tmp_path, figure):
    """Horovod's elastic Gloo driver waits for two hosts to probe their shared interfaces;
    for this machine alone hvdtrain names the loopback interface, so it starts."""
    result, seconds = elastic_run(tmp_path, "localhost:2\\n")
    figure(f"elastic, discovery 'localhost:2': exit {result.returncode} after {seconds:.1f}s")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(2 workers)" in result.stdout and seconds < 120


def test_no_hosts_ends_within_the_start_timeout_saying_what_it_waited_for(tmp_path, figure):
    result, seconds = elastic_run(tmp_path, "", "horovod.start_timeout_seconds=15")
    figure(f"elastic, discovery printing no host: exit {result.returncode} after {seconds:.1f}s")
    assert result.returncode == 1 and seconds < 60
    assert "no workers within horovod.start_timeout_seconds (15 s): Horovod timed out waiting for hosts " \
           "with enough slots" in result.stderr
