"""Faults provoked for real under gloo on CPU: ranks that disagree, and a rank
SIGKILLed mid-training under `hvdtrain run` (horovodrun) and under mpirun. Each
must end the job within 60 s with a message naming the rank; rerunning the same
command resumes and ends with the weights of an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from hvdtrain.launch.local import horovodrun_path
from tests.conftest import ROOT
from tests.output import Lines

pytestmark = pytest.mark.distributed
MLP = ROOT / "examples" / "digits-mlp-torch.yaml"
DEADLINE_S = 60


def rank_process(parent: psutil.Process, rank: int, variable: str) -> psutil.Process | None:
    for child in parent.children(recursive=True):
        try:
            if "hvdtrain" in child.cmdline() and "train" in child.cmdline() and \
                    child.environ().get(variable) == str(rank):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def kill_rank_after(proc: subprocess.Popen, marker: str, rank: int, variable: str):
    """Read output until `marker`, SIGKILL the rank; return (seconds to exit, output)."""
    lines = Lines(proc)
    lines.wait_for_text(marker, 600)
    victim = None
    for _ in range(50):
        victim = rank_process(psutil.Process(proc.pid), rank, variable)
        if victim:
            break
        time.sleep(0.1)
    assert victim is not None, lines.text()[-3000:]
    killed_at = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    output = lines.finish(DEADLINE_S + 30)  # fails the test if the job outlives the kill by that
    return time.monotonic() - killed_at, output


def test_ranks_that_disagree_fail_fast_with_a_diff(tmp_path):
    # rank 1 reads a different model: what a spec file that differs between hosts does
    script = (f'if [ "$HOROVOD_RANK" = 1 ]; then set -- model.hidden=[32]; fi; '
              f'exec {sys.executable} -m hvdtrain train {MLP} output={tmp_path} "$@"')
    began = time.monotonic()
    result = subprocess.run([horovodrun_path(), "-np", "2", "-H", "localhost:2", "--gloo", "sh", "-c", script],
                            capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - began
    output = result.stdout + result.stderr
    assert result.returncode != 0 and elapsed < DEADLINE_S, output[-3000:]
    assert "ranks disagree before training" in output
    assert "rank 1 vs rank 0: 4 parameters instead of 6" in output
    assert "rank 1 vs rank 0: parameter 0: 1.weight shape (32, 64) torch.float32 instead of " \
           "1.weight shape (128, 64) torch.float32" in output
    assert not (tmp_path / "checkpoints").exists()


def test_killed_rank_under_run_ends_the_job_then_rerun_resumes_exactly(tmp_path, figure):
    args = [sys.executable, "-m", "hvdtrain", "run", MLP, "-np", "2", "train.epochs=12",
            "checkpoint.every_epochs=1", "checkpoint.keep_last=3"]
    whole = subprocess.run([*args, f"output={tmp_path / 'whole'}"], capture_output=True, text=True,
                           timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]

    run = [*args, f"output={tmp_path / 'killed'}"]
    proc = subprocess.Popen(run, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds, output = kill_rank_after(proc, "epoch 4/12", rank=1, variable="HOROVOD_RANK")
    figure(f"hvdtrain run: exited {seconds:.1f}s after SIGKILL of rank 1")
    assert proc.returncode != 0 and seconds < DEADLINE_S, output[-3000:]
    assert "training failed: rank 1 was killed by signal 9 (SIGKILL) on localhost" in output
    assert "Traceback" not in output.split("training failed")[-1]

    again = subprocess.run(run, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = json.loads(again.stdout.split("resuming from")[1].split("(epoch ")[1].split()[0])
    assert resumed >= 3  # at most one checkpoint interval is repeated (killed during epoch 5 at the latest)
    digest = {d: json.loads((tmp_path / d / "summary.json").read_text())["weights_digest"]
              for d in ("whole", "killed")}
    assert digest["killed"] == digest["whole"]


def test_killed_rank_under_mpirun_ends_the_job(tmp_path, figure):
    mpirun = ["mpirun", "-np", "2", "--oversubscribe", "-bind-to", "none", "-map-by", "slot",
              *(["--allow-run-as-root"] if os.geteuid() == 0 else []),
              sys.executable, "-m", "hvdtrain", "train", str(MLP), "train.epochs=200",
              f"output={tmp_path}"]
    proc = subprocess.Popen(mpirun, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds, output = kill_rank_after(proc, "epoch 2/200", rank=1, variable="OMPI_COMM_WORLD_RANK")
    figure(f"mpirun: exited {seconds:.1f}s after SIGKILL of rank 1")
    assert proc.returncode != 0 and seconds < DEADLINE_S, output[-3000:]
    assert "process rank 1 with PID" in output and "exited on signal 9 (Killed)" in output
