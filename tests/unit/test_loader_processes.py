"""The torch loader's processes end with their rank, even one stuck in a read: a rank
killed (or ended by the watchdog) must not leave loader processes that hold the job's
output open, and a loader process is never taken for a rank by the stop paths."""
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from hvdtrain.launch.common import is_rank
from tests.conftest import ROOT

pytest.importorskip("torch")

# a rank whose 2 loader processes are stuck in their first read (each sleeps 600 s)
STUCK = textwrap.dedent("""
    import sys, threading, time
    import numpy as np, torch
    from hvdtrain.backends.torch_input import make_loader
    from hvdtrain.train.watchdog import own_stacks
    from hvdtrain.spec import DataSpec

    class Stuck:
        def __len__(self):
            return 64

        def batch(self, indices, epoch=None):
            time.sleep(600)

    def stacks():  # what the watchdog's report reads of this rank, once the loaders are stuck
        time.sleep(3)
        print(own_stacks().splitlines()[-1], flush=True)

    loader = make_loader(DataSpec(source="synthetic", workers=2), torch.device("cpu"))
    batches = iter(loader(Stuck(), [np.arange(8), np.arange(8, 16)], 0))
    print("started", flush=True)
    threading.Thread(target=stacks, daemon=True).start()
    next(batches)
""")


def test_loader_processes_stuck_in_a_read_end_within_seconds_of_their_rank(tmp_path):
    """...and before that, asked for stacks as the watchdog asks the rank, each writes
    where it is stuck to the rank's stderr."""
    log = tmp_path / "stderr"
    rank = subprocess.Popen([sys.executable, "-c", STUCK], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            stderr=log.open("w"))
    workers = []
    try:
        assert rank.stdout.readline().strip() == "started"
        deadline = time.monotonic() + 60
        while len(psutil.Process(rank.pid).children()) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = psutil.Process(rank.pid).children()
        assert len(workers) == 2
        said = rank.stdout.readline()
        assert said.startswith("Loader processes ") and all(str(w.pid) in said for w in workers), said
        time.sleep(1)
        text = log.read_text()
        for worker in workers:
            header = f"hvdtrain: the stacks of loader process {worker.pid} (of the rank with pid {rank.pid}):\n"
            assert header in text, text
            assert text.split(header)[1].split("hvdtrain: ")[0].count("in batch\n") == 1, text
        rank.send_signal(signal.SIGKILL)
        rank.wait(10)
        gone, alive = psutil.wait_procs(workers, timeout=5)
        assert not alive, f"{len(alive)} loader process(es) outlived their rank by 5 s"
    finally:
        rank.kill()
        for worker in workers:
            if worker.is_running():
                worker.kill()


def test_a_ranks_loader_processes_are_not_ranks(tmp_path):
    """A forked loader process has its rank's command line; only the rank is a rank."""
    script = tmp_path / "hvdtrain"
    script.mkdir()
    (script / "__main__.py").write_text(textwrap.dedent("""
        import multiprocessing, sys, time
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
        child.start()
        print(child.pid, flush=True)
        time.sleep(60)
    """))
    rank = subprocess.Popen([sys.executable, "-m", "hvdtrain", "train", "spec.yaml"], cwd=tmp_path,
                            stdout=subprocess.PIPE, text=True)
    worker = None
    try:
        worker = psutil.Process(int(rank.stdout.readline()))
        assert worker.cmdline()[1:4] == ["-m", "hvdtrain", "train"]
        assert is_rank(psutil.Process(rank.pid), ["spec.yaml"])
        assert not is_rank(worker) and not is_rank(worker, ["spec.yaml"])
    finally:
        rank.kill()
        if worker is not None and worker.is_running():
            worker.kill()
