"""Stopping a job by signal, for real under gloo on CPU: SIGTERM or SIGINT to `hvdtrain
run` leaves no rank running after 10 s; SIGTERM to the ranks themselves (a Kubernetes
eviction, scancel, a node drain) stops them after an agreed step with a checkpoint, and
the same command resumes to the weights of an uninterrupted run."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from tests.conftest import ROOT
from tests.distributed.test_faults import wait_for_file
from tests.output import Lines

pytestmark = pytest.mark.distributed
MLP = ROOT / "examples" / "digits-mlp-torch.yaml"
USER_CODE = ROOT / "tests" / "data" / "user_code"
GONE_WITHIN_S = 10


def paced_spec(tmp_path, builder="probes:paced"):
    spec = yaml.safe_load(MLP.read_text())
    spec["model"] = {"kind": "custom", "builder": builder}
    spec["code"] = [str(USER_CODE)]
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def ranks_of(proc: subprocess.Popen) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if child.cmdline()[1:4] == ["-m", "hvdtrain", "train"]:
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def start(spec, out, env, *args):
    return subprocess.Popen([sys.executable, "-m", "hvdtrain", "run", spec, "-np", "2", f"output={out}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **env})


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_launcher_stops_every_rank_with_a_checkpoint(tmp_path, number, figure):
    marker = tmp_path / "step-30"
    proc = start(paced_spec(tmp_path), tmp_path / "out", {"HVDTRAIN_TEST_PACE": f"0.05:30:{marker}"},
                 "train.epochs=100")
    lines = Lines(proc)
    wait_for_file(marker, lines, 300)
    ranks = ranks_of(proc)
    assert len(ranks) == 2, lines.text()[-3000:]
    sent = time.monotonic()
    proc.send_signal(number)
    output = lines.finish(GONE_WITHIN_S + 20)
    seconds = time.monotonic() - sent
    psutil.wait_procs(ranks, timeout=max(0.0, GONE_WITHIN_S - seconds))
    figure(f"{signal.Signals(number).name} to hvdtrain run: exited after {seconds:.1f} s")
    assert seconds <= GONE_WITHIN_S and not alive(ranks), output[-3000:]
    assert proc.returncode == 75, output[-3000:]
    stop = [ln for ln in output.splitlines() if ln.startswith(f"hvdtrain: stopped by {signal.Signals(number).name}")]
    assert stop and "after epoch 2, step" in stop[0] and "latest checkpoint" in stop[0], output[-3000:]
    assert "Traceback" not in output


def test_a_rank_that_does_not_stop_is_killed_within_the_grace(tmp_path):
    """Rank 1 held in its step (it notes the signal but never reaches a check): both
    ranks and horovodrun are gone within 10 s all the same."""
    marker = tmp_path / "held"
    proc = start(paced_spec(tmp_path, "probes:held_at_step"), tmp_path / "out",
                 {"HVDTRAIN_TEST_HOLD": f"1:30:{marker}"})
    lines = Lines(proc)
    wait_for_file(marker, lines, 300)
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    output = lines.finish(GONE_WITHIN_S + 20)
    psutil.wait_procs(tree, timeout=max(0.0, GONE_WITHIN_S - (time.monotonic() - sent)))
    assert time.monotonic() - sent <= GONE_WITHIN_S + 1 and not alive(tree), output[-3000:]
    assert "hvdtrain: stopped by SIGTERM before a checkpoint was agreed" in output, output[-3000:]


def test_sigterm_to_the_ranks_checkpoints_and_the_rerun_ends_as_an_uninterrupted_run(tmp_path, figure):
    spec, epochs = paced_spec(tmp_path), 4
    whole = start(spec, tmp_path / "whole", {}, f"train.epochs={epochs}")
    assert whole.wait(300) == 0, whole.stdout.read()[-3000:]
    marker = tmp_path / "step-30"
    proc = start(spec, tmp_path / "stopped", {"HVDTRAIN_TEST_PACE": f"0.05:30:{marker}"}, f"train.epochs={epochs}")
    lines = Lines(proc)
    wait_for_file(marker, lines, 300)
    for rank in ranks_of(proc):  # what a node drain or an eviction sends each rank
        rank.send_signal(signal.SIGTERM)
    output = lines.finish(60)
    assert proc.returncode == 75, output[-3000:]
    assert "stopping on request after step 10 of epoch 2" in output, output[-3000:]
    checkpoints = sorted(p.name for p in (tmp_path / "stopped" / "checkpoints").iterdir())
    assert checkpoints[-1] == "epoch-000001-step-000000010.ckpt", checkpoints
    again = start(spec, tmp_path / "stopped", {}, f"train.epochs={epochs}")
    rerun = Lines(again).finish(300)
    assert again.returncode == 0, rerun[-3000:]
    digest = {d: json.loads((tmp_path / d / "summary.json").read_text())["weights_digest"]
              for d in ("whole", "stopped")}
    assert digest["stopped"] == digest["whole"]
    figure(f"SIGTERM to both ranks: checkpoint {checkpoints[-1]}, the rerun's weights equal the uninterrupted run's")


def test_a_pods_sigterm_reaches_its_ranks_through_pod_init(tmp_path):
    """What the kubelet does to a worker pod: SIGTERM to the container's first process,
    here pod_init running a stand-in for sshd; the ranks in the pod (this machine) stop
    with a checkpoint, then pod_init stops its command and exits."""
    marker = tmp_path / "step-30"
    job = start(paced_spec(tmp_path), tmp_path / "out", {"HVDTRAIN_TEST_PACE": f"0.05:30:{marker}"},
                "train.epochs=100")
    lines = Lines(job)
    wait_for_file(marker, lines, 300)
    init = subprocess.Popen([sys.executable, "-m", "hvdtrain.launch.pod_init", "sleep", "600"],
                            stderr=subprocess.PIPE, text=True)
    time.sleep(1)
    sleeper = psutil.Process(init.pid).children()
    init.send_signal(signal.SIGTERM)
    output = lines.finish(GONE_WITHIN_S + 20)
    assert init.wait(30) == 0 and not alive(sleeper)
    assert "hvdtrain: SIGTERM: 2 rank(s) in this pod asked to stop" in init.stderr.read()
    assert job.returncode == 75 and "stopping on request after step" in output, output[-3000:]
    assert re.search(r"hvdtrain: stopped after epoch \d+, step \d+; latest checkpoint", output), output[-3000:]


def test_sigterm_to_mpirun_stops_its_ranks_with_a_checkpoint(tmp_path):
    """The MPIJob launcher pod's first process is mpirun: the kubelet's SIGTERM to it
    (Open MPI's defaults) reaches the ranks, which stop at a step with a checkpoint."""
    marker = tmp_path / "step-30"
    mpirun = ["mpirun", "-np", "2", "--oversubscribe", "-bind-to", "none", "-map-by", "slot",
              *(["--allow-run-as-root"] if os.geteuid() == 0 else []), "-x", "HVDTRAIN_TEST_PACE",
              sys.executable, "-m", "hvdtrain", "train", str(paced_spec(tmp_path)), "train.epochs=100",
              f"output={tmp_path / 'out'}"]
    proc = subprocess.Popen(mpirun, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "HVDTRAIN_TEST_PACE": f"0.05:30:{marker}"})
    lines = Lines(proc)
    wait_for_file(marker, lines, 300)
    proc.send_signal(signal.SIGTERM)
    output = lines.finish(60)
    assert "stopping on request after step" in output and output.count("exiting 75") == 2, output[-3000:]
    assert any(p.name.endswith("-step-000000010.ckpt") for p in (tmp_path / "out" / "checkpoints").iterdir())
