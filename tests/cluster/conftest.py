"""Real Slurm clusters for the tests, started by scripts/slurm_cluster.py.

Without root or without Debian's slurm-wlm/munge the tests skip, saying why;
with HVDTRAIN_REQUIRE_CLUSTER=1 (set by CI) such a skip is a failure instead.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "slurm_cluster.py"
DAEMONS = ("slurmctld", "slurmd", "sbatch", "munged", "scontrol")


def unavailable(reason: str):
    if os.environ.get("HVDTRAIN_REQUIRE_CLUSTER") == "1":
        pytest.fail(f"HVDTRAIN_REQUIRE_CLUSTER=1 but {reason}")
    pytest.skip(reason)


class Cluster:
    def __init__(self, directory: Path, nodes: int):
        self.dir, self.nodes = directory, nodes
        self.env = {**os.environ, "SLURM_CONF": str(directory / "slurm.conf")}
        self.jobs = directory / "jobs"  # what the nodes share, like a cluster filesystem
        self.jobs.mkdir()

    def hvdtrain(self, *args, timeout=600):
        return subprocess.run([sys.executable, "-m", "hvdtrain", *map(str, args)], cwd=self.jobs,
                              env=self.env, capture_output=True, text=True, timeout=timeout)

    def submit(self, spec, name, *args):
        """hvdtrain submit slurm --wait; returns (job id, sbatch exit status, job output)."""
        result = self.hvdtrain("submit", "slurm", spec, "--wait", "-o", self.jobs / f"{name}.sbatch",
                               f"output={self.jobs / name}", *args)
        found = re.search(r"submitted job (\d+)", result.stdout)
        assert found, result.stdout + result.stderr
        job = found.group(1)
        logs = list(self.jobs.glob(f"slurm-*-{job}.out"))
        return job, result.returncode, logs[0].read_text() if logs else ""

    def state(self, job):
        out = subprocess.run(["scontrol", "show", "job", job], env=self.env, capture_output=True,
                             text=True).stdout
        return re.search(r"JobState=(\S+)", out).group(1)


def start_cluster(nodes: int):
    if os.geteuid() != 0:
        unavailable("the throwaway Slurm cluster needs root")
    missing = [d for d in DAEMONS if not shutil.which(d)]
    if missing:
        unavailable(f"{', '.join(missing)} not installed (apt-get install slurm-wlm munge)")
    directory = Path(tempfile.mkdtemp(prefix=f"hvdtrain-slurm{nodes}-"))
    proc = subprocess.run([sys.executable, str(SCRIPT), "start", str(directory), "--nodes", str(nodes)],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        shutil.rmtree(directory, ignore_errors=True)
        unavailable(f"could not start a {nodes}-node Slurm cluster: {proc.stderr.strip()[-800:]}")
    return Cluster(directory, nodes)


def stop_cluster(cluster: Cluster):
    subprocess.run([sys.executable, str(SCRIPT), "stop", str(cluster.dir)], capture_output=True, timeout=120)
    shutil.rmtree(cluster.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm_one_node():
    cluster = start_cluster(1)
    yield cluster
    stop_cluster(cluster)


@pytest.fixture(scope="module")
def slurm_two_nodes():
    cluster = start_cluster(2)
    yield cluster
    stop_cluster(cluster)
