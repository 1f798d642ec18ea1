"""The first process of a Kubernetes worker pod (MPIJob workers, Trainer's nodes):

    python3 -m hvdtrain.launch.pod_init /usr/sbin/sshd -De -f /home/mpiuser/.sshd_config

runs its command (sshd, through which the launcher's mpirun starts the ranks) and
stands where the kubelet's signals arrive. The kubelet stops a pod (an eviction, a
node drain, a deleted job) with SIGTERM to each container's first process and
SIGKILL after terminationGracePeriodSeconds; sshd as that process would die at once,
and its ranks with it, without a checkpoint. Here SIGTERM goes on to every rank in
the container instead, which take their stop path (the ranks agree to stop after a
step, rank 0 writes a checkpoint, each exits 75); once they are gone, the command is
stopped and this process exits. As the first process it also reaps the orphans the
ranks' launchers leave."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from .common import terminate_ranks


def reap() -> None:
    """Collect every exited child, ours or an orphan handed to us."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def main(command: list[str]) -> int:
    if not command:
        print("usage: python3 -m hvdtrain.launch.pod_init COMMAND [ARG ...]", file=sys.stderr)
        return 2
    asked: list[int] = []
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda n, frame: asked.append(n))
    child = subprocess.Popen(command)
    while child.poll() is None and not asked:
        time.sleep(0.2)
        reap()
    if child.returncode is not None:
        return child.returncode
    ranks = terminate_ranks()
    print(f"hvdtrain: {signal.Signals(asked[0]).name}: {len(ranks)} rank(s) in this pod asked to stop "
          f"after their current step (a checkpoint), then {command[0]}", file=sys.stderr, flush=True)
    while any(map(alive, ranks)):
        time.sleep(0.2)  # the kubelet's SIGKILL ends the wait at the grace period
        reap()
    child.terminate()
    try:
        child.wait(timeout=10)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    reap()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
