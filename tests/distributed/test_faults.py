"""Faults provoked for real under gloo on CPU: ranks that disagree, and a rank
SIGKILLed mid-training under `hvdtrain run` (horovodrun) and under mpirun. Each
must end the job within 60 s with a message naming the rank; rerunning the same
command resumes from the last checkpoint before the kill and ends with the
weights of an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from hvdtrain.launch.local import horovodrun_path
from tests.conftest import ROOT
from tests.output import Lines

pytestmark = pytest.mark.distributed
MLP = ROOT / "examples" / "digits-mlp-torch.yaml"
USER_CODE = ROOT / "tests" / "data" / "user_code"
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


def wait_for_file(path: Path, lines: Lines, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if lines.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{path.name} not written; the output:\n{lines.finish(30)[-3000:]}")
        time.sleep(0.05)


def test_killed_rank_under_run_ends_the_job_then_rerun_resumes_exactly(tmp_path, figure):
    """Rank 1 is held at step 10 of epoch 5 (probes.held_at_step) and SIGKILLed there: the
    last checkpoint is epoch 4's, so the rerun resumes after epoch 4 of 12, and ends with the
    weights of an uninterrupted run."""
    from hvdtrain.data import load_dataset, steps_per_epoch
    from hvdtrain.spec import load_spec
    spec = yaml.safe_load(MLP.read_text())
    spec["model"] = {"kind": "custom", "builder": "probes:held_at_step"}
    spec["code"] = [str(USER_CODE)]
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    per_epoch = steps_per_epoch(len(load_dataset(load_spec(tmp_path / "spec.yaml").data).train), 2,
                                spec["train"]["batch_size"])
    epochs, held_epoch, held_step = 12, 5, 10
    args = [sys.executable, "-m", "hvdtrain", "run", tmp_path / "spec.yaml", "-np", "2", f"train.epochs={epochs}",
            "checkpoint.every_epochs=1", "checkpoint.keep_last=3"]
    whole = subprocess.run([*args, f"output={tmp_path / 'whole'}"], capture_output=True, text=True,
                           timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]

    run = [*args, f"output={tmp_path / 'killed'}"]
    marker = tmp_path / "held"
    hold = f"1:{(held_epoch - 1) * per_epoch + held_step}:{marker}"
    proc = subprocess.Popen(run, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "HVDTRAIN_TEST_HOLD": hold})
    lines = Lines(proc)
    wait_for_file(marker, lines, 600)
    victim = rank_process(psutil.Process(proc.pid), 1, "HOROVOD_RANK")
    assert victim is not None, lines.text()[-3000:]
    killed_at = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    output = lines.finish(DEADLINE_S + 30)
    seconds = time.monotonic() - killed_at
    figure(f"hvdtrain run: exited {seconds:.1f}s after SIGKILL of rank 1 (held at epoch {held_epoch}, "
           f"step {held_step})")
    assert proc.returncode != 0 and seconds < DEADLINE_S, output[-3000:]
    assert "training failed: rank 1 was killed by signal 9 (SIGKILL) on localhost" in output
    assert "Traceback" not in output.split("training failed")[-1]
    assert f"epoch {held_epoch - 1}/{epochs}  train_loss" in output
    assert f"epoch {held_epoch}/{epochs}  train_loss" not in output

    again = subprocess.run(run, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = json.loads(again.stdout.split("resuming from")[1].split("(epoch ")[1].split()[0])
    assert resumed == held_epoch - 1  # the epoch the killed run had finished last, of 12
    assert f"epoch {held_epoch}/{epochs}  train_loss" in again.stdout
    assert f"epoch {held_epoch - 1}/{epochs}  train_loss" not in again.stdout
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


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB filesystem (tmpfs): room for one checkpoint of the model below, not two."""
    from tests.conftest import missing
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        missing(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_names_the_checkpoint_and_the_last_good_one(tmp_path, small_disk):
    """Checkpoints of 1.4 MB (176k parameters and their momentum) on 2 MiB: epoch 1's is
    written, epoch 2's cannot be; the job ends with the path, the checkpoint a rerun
    resumes from, status 74, and no partial file."""
    result = subprocess.run([sys.executable, "-m", "hvdtrain", "run", MLP, "-np", "2", "model.hidden=[384,384]",
                             "train.epochs=3", "checkpoint.every_epochs=1", "checkpoint.keep_last=5",
                             f"checkpoint.dir={small_disk}", f"output={tmp_path / 'out'}"],
                            capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 74, output[-3000:]
    assert (f"could not write checkpoint {small_disk / 'epoch-000002.ckpt'}: No space left on device" in output
            and f"the last good checkpoint is {small_disk / 'epoch-000001.ckpt'}" in output), output[-3000:]
    assert "rank 0 exited with status 74" in output and "Traceback" not in output
    assert sorted(p.name for p in small_disk.iterdir()) == ["epoch-000001.ckpt"]
