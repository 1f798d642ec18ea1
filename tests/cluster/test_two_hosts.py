"""`hvdtrain run -H` across two hosts: network namespaces with sshd of their own
(scripts/ssh_hosts.py), reached through ssh as horovodrun reaches hosts, with Gloo
and with Open MPI."""
import json
import os
import subprocess
import sys

import pytest

from tests.cluster.conftest import unavailable
from tests.conftest import ROOT

pytestmark = pytest.mark.cluster
SCRIPT = ROOT / "scripts" / "ssh_hosts.py"
MLP = ROOT / "examples" / "digits-mlp-torch.yaml"


@pytest.fixture(scope="module")
def ssh_hosts(tmp_path_factory):
    if os.geteuid() != 0:
        unavailable("the ssh hosts need root (network namespaces)")
    if not os.path.exists("/usr/sbin/sshd"):
        unavailable("sshd not installed (apt-get install openssh-server)")
    directory = tmp_path_factory.mktemp("ssh-hosts")
    started = subprocess.run([sys.executable, str(SCRIPT), "start", str(directory)], capture_output=True, text=True)
    assert started.returncode == 0, started.stderr
    yield started.stdout.split()[-1], directory / "id_ed25519"
    subprocess.run([sys.executable, str(SCRIPT), "stop", str(directory)], capture_output=True)


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_run_trains_across_two_hosts(ssh_hosts, tmp_path, controller, figure):
    hosts, key = ssh_hosts
    out = tmp_path / "run"
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    result = subprocess.run([sys.executable, "-m", "hvdtrain", "run", str(MLP), "-H", hosts,
                             "--ssh-identity-file", str(key), *(["--mpi"] if controller == "mpi" else []),
                             f"output={out}", "train.epochs=10"],
                            capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    figure(f"two hosts ({controller}): {summary['hosts']}, accuracy {summary['final']['val_accuracy']:.4f}")
    assert summary["workers"] == 2 and summary["hosts"] == ["host1", "host2"]
    assert summary["final"]["val_accuracy"] >= 0.95


def test_bad_host_lists_are_named(cli, tmp_path):
    for hosts, message in (("host1,host2:2", "'host1' is not host:slots"), ("a:0", "'a:0' is not host:slots")):
        result = cli("run", MLP, "-H", hosts)
        assert result.returncode == 2 and message in result.stderr, result.stderr
    missing = cli("run", MLP, "--hostfile", tmp_path / "nope")
    assert missing.returncode == 2 and "no such file" in missing.stderr
