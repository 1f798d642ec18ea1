"""The watchdog's channel, in one process: a heartbeat with the job's token is taken,
a connection without it is refused and logged, and the job's own ranks go on."""
import json
import socket
import time

import numpy as np

from hvdtrain.train import watchdog
from hvdtrain.train.contract import Comm


def one_rank():
    return Comm(rank=0, size=1, local_rank=0, local_size=1,
                allreduce_sum=lambda values, name: np.asarray(values, dtype=np.float64),
                broadcast_object=lambda obj, name: obj, allgather_object=lambda obj, name: [obj],
                hierarchical=False)


def wait_until(predicate, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()


def test_a_stranger_is_refused_and_the_ranks_heartbeat_is_taken(tmp_path, capfd):
    dog = watchdog.Watchdog(60, one_rank(), tmp_path).start()
    try:
        server = dog.server
        assert wait_until(lambda: 0 in server.ranks)  # this rank's own heartbeat arrived
        watchdog.progress("train", 0, 5)
        assert wait_until(lambda: (server.ranks[0]["progress"] or {}).get("step") == 5)
        for hello in ({"rank": 1, "host": "x", "pid": 1}, {"token": "0" * 32, "rank": 1, "host": "x", "pid": 1}):
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as stranger:
                stranger.sendall((json.dumps(hello) + "\n").encode())
                stranger.sendall(b'{"epoch": 9, "step": 9, "phase": "train"}\n')
                try:  # closed without an answer (reset: the server closed with the line unread)
                    answer = stranger.recv(100)
                except ConnectionResetError:
                    answer = b""
                assert answer == b""
        assert sorted(server.ranks) == [0]
        assert capfd.readouterr().err.count("refused a connection from 127.0.0.1 without this job's token") == 2
    finally:
        dog.stop()


def test_the_rank_furthest_behind_is_at_the_earliest_step_then_phase():
    positions = {r: watchdog.position(p) for r, p in {
        0: {"epoch": 1, "step": 5, "phase": "checkpoint"}, 1: {"epoch": 1, "step": 6, "phase": "train"},
        2: {"epoch": 1, "step": 5, "phase": "train"}, 3: None}.items()}
    assert sorted(positions, key=positions.get) == [3, 2, 0, 1]


ALONE = """
import sys, time
from pathlib import Path
from tests.unit.test_watchdog import one_rank
from hvdtrain.train import watchdog
dog = watchdog.Watchdog(1, one_rank(), Path(sys.argv[2])).start()
watchdog.progress(sys.argv[1], 0, 3)
time.sleep(4)
print("still running")
"""


def test_a_rank_past_its_epochs_is_not_taken_for_hung(tmp_path):
    """hang_seconds 1, one rank that stops making progress: in training it is named and the
    process ends (exit 4); finishing (export, a test set scored on rank 0 alone) it is left alone."""
    import subprocess
    import sys
    from tests.conftest import ROOT
    runs = {phase: subprocess.run([sys.executable, "-c", ALONE, phase, str(tmp_path / phase)], cwd=ROOT,
                                  capture_output=True, text=True, timeout=60) for phase in ("train", "finishing")}
    assert runs["train"].returncode == 4 and "hvdtrain: hung: rank 0 (host " in runs["train"].stderr
    assert (tmp_path / "train" / "hang" / "rank-0.txt").read_text().count("Thread 0x") >= 2
    assert runs["finishing"].returncode == 0 and "still running" in runs["finishing"].stdout
