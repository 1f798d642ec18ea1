"""A hung rank named, for real under gloo on CPU (horovod.hang_seconds 10): a rank
frozen by SIGSTOP (its heartbeat falls silent) and a rank stuck in its own code
(its heartbeat goes on, its step does not) end the job within hang_seconds + 30 s
with one line naming the rank, and every rank's stack in the run directory."""
import signal
import subprocess
import sys
import time

import pytest

from tests.distributed.test_faults import rank_process, wait_for_file
from tests.distributed.test_stops import paced_spec, start
from tests.output import Lines

pytestmark = pytest.mark.distributed
HANG_S = 10


def ended_by_the_watchdog(proc, lines, since, out, figure, what):
    output = lines.finish(HANG_S + 60)
    seconds = time.monotonic() - since
    figure(f"{what}: the job ended {seconds:.1f} s later (horovod.hang_seconds {HANG_S})")
    assert proc.returncode == 4 and seconds <= HANG_S + 30, output[-3000:]
    hung = [ln for ln in output.splitlines() if "hvdtrain: hung: " in ln]
    assert len(hung) == 1 and f"every rank's stack is in {out / 'hang'}" in hung[0], output[-3000:]
    assert "training failed: rank 0 ended the job: a rank made no progress" in output
    return hung[0], {rank: (out / "hang" / f"rank-{rank}.txt").read_text() for rank in (0, 1)}


def test_a_frozen_rank_is_named_with_its_host_and_pid(tmp_path, figure):
    marker, out = tmp_path / "step-30", tmp_path / "out"
    proc = start(paced_spec(tmp_path), out, {"HVDTRAIN_TEST_PACE": f"0.05:30:{marker}"}, "train.epochs=100",
                 f"horovod.hang_seconds={HANG_S}")
    lines = Lines(proc)
    wait_for_file(marker, lines, 300)
    victim = rank_process(__import__("psutil").Process(proc.pid), 1, "HOROVOD_RANK")
    victim.send_signal(signal.SIGSTOP)
    hung, stacks = ended_by_the_watchdog(proc, lines, time.monotonic(), out, figure, "SIGSTOP of rank 1")
    assert "rank 1 (host " in hung and f"pid {victim.pid}: epoch " in hung and ", train, heartbeat silent" in hung
    assert "rank 0 (" not in hung
    assert "no answer" in stacks[1] and "train_epoch" in stacks[0]  # rank 0's main thread, in its loop


def test_a_rank_stuck_in_its_step_is_named_with_its_stack(tmp_path, figure):
    """Rank 1 sleeps forever inside its model's forward (probes.held_at_step) while rank 0
    waits for it in the step's allreduce: rank 1 is named, and its stack shows where."""
    marker, out = tmp_path / "held", tmp_path / "out"
    proc = start(paced_spec(tmp_path, "probes:held_at_step"), out, {"HVDTRAIN_TEST_HOLD": f"1:30:{marker}"},
                 f"horovod.hang_seconds={HANG_S}")
    lines = Lines(proc)
    wait_for_file(marker, lines, 300)
    hung, stacks = ended_by_the_watchdog(proc, lines, time.monotonic(), out, figure, "rank 1 stuck in forward")
    assert "rank 1 (host " in hung and ": epoch 2, step 7, train)" in hung and "rank 0 (" not in hung, hung
    assert "in forward" in stacks[1] and "probes.py" in stacks[1]
    assert "/horovod/" in stacks[0]  # rank 0 waits in the allreduce


def test_a_job_without_hangs_is_left_alone(tmp_path):
    """hang_seconds 2 on steps of 0.05 s, a first epoch and checkpoints: nothing trips."""
    result = subprocess.run([sys.executable, "-m", "hvdtrain", "run", paced_spec(tmp_path), "-np", "2",
                             f"output={tmp_path / 'out'}", "train.epochs=3", "horovod.hang_seconds=2",
                             "checkpoint.every_steps=5"], capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "HVDTRAIN_TEST_PACE": "0.05:0:"})
    assert result.returncode == 0 and "hung" not in result.stderr, result.stderr[-3000:]
