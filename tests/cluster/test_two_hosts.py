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


def test_a_signal_to_the_launcher_stops_the_ranks_on_every_host(ssh_hosts, tmp_path, figure):
    """SIGTERM to `hvdtrain run -H`: the ranks run under the hosts' sshd, not under this
    process; each host's ranks are asked to stop through ssh, agree on a step, rank 0
    checkpoints, and none is left running."""
    import signal
    import time

    import psutil

    from hvdtrain.launch.common import is_rank
    from tests.distributed.test_faults import wait_for_file
    from tests.distributed.test_stops import GONE_WITHIN_S, alive, paced_spec
    from tests.output import Lines
    hosts, key = ssh_hosts
    marker, out = tmp_path / "step-30", tmp_path / "run"
    spec = paced_spec(tmp_path)
    overrides = [f"output={out}", "train.epochs=100"]
    proc = subprocess.Popen([sys.executable, "-m", "hvdtrain", "run", str(spec), "-H", hosts,
                             "--ssh-identity-file", str(key), *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "HVDTRAIN_TEST_PACE": f"0.05:30:{marker}"})
    lines = Lines(proc)
    wait_for_file(marker, lines, 300)
    ranks = [p for p in psutil.process_iter() if is_rank(p, [str(spec), *overrides])]
    assert len(ranks) == 2 and all(proc.pid not in {a.pid for a in r.parents()} for r in ranks), lines.text()[-3000:]
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    output = lines.finish(GONE_WITHIN_S + 20)
    seconds = time.monotonic() - sent
    psutil.wait_procs(ranks, timeout=max(0.0, GONE_WITHIN_S - seconds))
    figure(f"SIGTERM to hvdtrain run -H {hosts}: every host's ranks gone after {seconds:.1f} s")
    assert not alive(ranks), output[-3000:]
    assert proc.returncode == 75, output[-3000:]
    stop = [ln for ln in output.splitlines() if ln.startswith("hvdtrain: stopped by SIGTERM")]
    assert stop and "latest checkpoint" in stop[0], output
