"""Strangers kept out of a job's start-up, for real: two ranks started as srun starts
them in gloo mode (SLURM_* variables, no launcher), rank 0 serving Horovod's rendezvous,
Horovod's own C++ client signing each request with the job's secret (hvdtrain's
build); a stranger PUTs and GETs the ranks' keys while they start. It is refused and
logged, and the job trains to its accuracy."""
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.distributed
MLP = ROOT / "examples" / "digits-mlp-torch.yaml"



def test_a_strangers_requests_are_refused_and_the_job_trains(tmp_path, figure):
    port = free_port()
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "2",
             "SLURM_NODEID": "0", "SLURM_LAUNCH_NODE_IPADDR": "127.0.0.1", "HVDTRAIN_RENDEZVOUS_PORT": str(port),
             "HVDTRAIN_LAUNCH": "gloo", "HVDTRAIN_RENDEZVOUS_SECRET": os.urandom(32).hex(), "PYTHONUNBUFFERED": "1"}
    ranks = [subprocess.Popen([sys.executable, "-m", "hvdtrain", "train", MLP, "train.epochs=5",
                               f"output={tmp_path / 'out'}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, **slurm, "SLURM_PROCID": str(rank),
                                              "SLURM_LOCALID": str(rank)})
             for rank in (0, 1)]
    refused, answered = [], []

    def stranger():
        """Writes garbage where the ranks put their addresses, reads, deletes, until training starts."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and ranks[0].poll() is None:
            for method, path, data in (("PUT", "/global/0", b"10.0.0.66:1"), ("PUT", "/global/1", b"x"),
                                       ("GET", "/global/0", None), ("DELETE", "/global/1", None)):
                try:
                    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                                                  method=method), timeout=2)
                    answered.append((method, path))
                except urllib.error.HTTPError as err:
                    refused.append(err.code)
                except OSError:
                    pass  # not up yet, or gone
            time.sleep(0.05)
            if (tmp_path / "out" / "metrics.jsonl").exists():
                return
    thread = threading.Thread(target=stranger)
    thread.start()
    outputs = [proc.communicate(timeout=300) for proc in ranks]
    thread.join()
    assert [proc.returncode for proc in ranks] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    assert answered == [] and refused and set(refused) == {403}
    assert "hvdtrain: rendezvous: refused PUT /global/0 from 127.0.0.1" in outputs[0][1]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["final"]["val_accuracy"] >= 0.9
    figure(f"rendezvous: {len(refused)} stranger's requests refused during start-up; the job reached "
           f"validation accuracy {summary['final']['val_accuracy']:.4f}")
