"""Rendering sbatch scripts, and what a rank started by srun derives from Slurm's variables."""
import socket
import subprocess
import sys

import pytest

from hvdtrain.errors import UserError
from hvdtrain.launch import slurm, srun
from hvdtrain.spec import HorovodSpec, load_spec
from tests.conftest import ROOT

MLP = ROOT / "examples" / "digits-mlp-torch.yaml"
START_TIMEOUT = HorovodSpec().start_timeout_seconds


def directives(text):
    """{option: value} of the #SBATCH lines (None for a flag)."""
    return dict((*line[len("#SBATCH --"):].split("=", 1), None)[:2] for line in text.splitlines()
                if line.startswith("#SBATCH --"))


def srun_line(text):
    [line] = [ln for ln in text.splitlines() if ln.startswith("srun ")]
    return line


def test_render_fills_the_template_from_spec_and_options():
    spec = load_spec(MLP)
    text = slurm.render(spec, MLP, ["train.epochs=3", "output=runs/a b"], nodes=2, gpus_per_node=4,
                        time_limit="02:00:00", partition="gpu", mode="mpi")
    head = directives(text)
    assert head == {"job-name": "digits-mlp-torch", "nodes": "2", "ntasks-per-node": "4",
                    "cpus-per-task": "1", "gpus-per-node": "4", "time": "02:00:00",
                    "partition": "gpu", "chdir": str(ROOT.cwd()), "output": "slurm-%x-%j.out",
                    "requeue": None, "open-mode": "append", "signal": "B:USR1@120"}
    assert "export HVDTRAIN_LAUNCH=mpi" in text
    assert srun_line(text) == (f"srun --kill-on-bad-exit=1 --mpi=pmix {sys.executable} -m hvdtrain train "
                               f"{MLP.resolve()} train.epochs=3 'output=runs/a b' &")
    assert "{{" not in text and text.startswith("#!/bin/bash\n")


def test_cpu_job_drops_gpu_and_partition_lines_and_spreads_workers():
    spec = load_spec(MLP, ["resources.workers=4", "resources.cpus_per_worker=2"])
    head = directives(slurm.render(spec, MLP, [], nodes=2))
    assert "gpus-per-node" not in head and "partition" not in head
    assert head["ntasks-per-node"] == "2" and head["cpus-per-task"] == "2"
    text = slurm.render(spec, MLP, [], mode="gloo")
    assert "--mpi=none" in srun_line(text) and "export HVDTRAIN_LAUNCH=gloo" in text
    # a secret per job, made when the script runs (never written into it), 64 hex digits
    [line] = [ln for ln in text.splitlines() if ln.startswith("export HVDTRAIN_RENDEZVOUS_SECRET=")]
    made = subprocess.run(["bash", "-c", line + '; printf %s "$HVDTRAIN_RENDEZVOUS_SECRET"'], capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin"}).stdout
    assert len(made) == 64 and int(made, 16) >= 0


def test_site_options_and_containers_reach_sbatch_and_srun():
    spec = load_spec(MLP)
    text = slurm.render(spec, MLP, [], account="proj1", qos="high", mem="64G", constraint="a100",
                        exclusive=True, sbatch_args=["--mail-type=END", "--reservation=r 1"],
                        container_image="nvcr.io/nvidia/pytorch:26.10-py3", container_mounts="/data:/data")
    head = directives(text)
    assert {k: head[k] for k in ("account", "qos", "mem", "constraint", "exclusive", "mail-type")} == \
        {"account": "proj1", "qos": "high", "mem": "64G", "constraint": "a100", "exclusive": None,
         "mail-type": "END"}
    assert "#SBATCH '--reservation=r 1'" in text
    assert srun_line(text).startswith("srun --kill-on-bad-exit=1 --mpi=none "
                                      "--container-image=nvcr.io/nvidia/pytorch:26.10-py3 --container-mounts=/data:/data ")
    with pytest.raises(UserError, match="--sbatch-arg 'mail'"):
        slurm.render(spec, MLP, [], sbatch_args=["mail"])


def test_requeue_is_on_by_default_and_can_be_turned_off():
    on = slurm.render(load_spec(MLP, ["slurm.signal_seconds=300", "slurm.max_restarts=5"]), MLP, [])
    assert directives(on)["signal"] == "B:USR1@300" and "requeue" in directives(on)
    assert "export HVDTRAIN_STOP_SIGNAL=USR1" in on and 'if [ "${SLURM_RESTART_COUNT:-0}" -lt 5 ]' in on
    marker = (ROOT.cwd() / "runs" / "digits-mlp-torch" / ".preempted").resolve()  # the spec's output
    assert 'scontrol requeue "$SLURM_JOB_ID"' in on and f"if [ -f {marker} ]" in on
    off = slurm.render(load_spec(MLP, ["slurm.requeue=false"]), MLP, [])
    assert "no-requeue" in directives(off) and "signal" not in directives(off)
    assert "HVDTRAIN_STOP_SIGNAL" not in off and "scontrol" not in off and not srun_line(off).endswith("&")
    assert "{{" not in on + off


@pytest.mark.parametrize("kwargs, message", [
    ({"nodes": 0}, "--nodes"), ({"time_limit": "soon"}, "--time"), ({"mode": "ssh"}, "launch mode"),
    ({"tasks_per_node": 0}, "--tasks-per-node"),
])
def test_render_rejects_bad_options(kwargs, message):
    with pytest.raises(UserError, match=message):
        slurm.render(load_spec(MLP), MLP, [], **kwargs)


@pytest.mark.parametrize("text, counts", [("2", [2]), ("2(x3)", [2, 2, 2]), ("2(x2),1", [2, 2, 1]),
                                          ("4,3(x2)", [4, 3, 3])])
def test_slurm_task_counts_expand(text, counts):
    assert srun.expand_counts(text) == counts


def srun_env(**extra):
    env = {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "5",
           "SLURM_STEP_TASKS_PER_NODE": "2(x2),1", "SLURMD_NODENAME": "nodeB",
           "SLURM_LAUNCH_NODE_IPADDR": "127.0.0.1", "HVDTRAIN_RENDEZVOUS_SECRET": "s3cret"}
    env.update(extra)
    return env


def test_gloo_rank_takes_everything_from_slurm_variables():
    with socket.socket() as server:  # stands in for rank 0's rendezvous server
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        env = srun_env(SLURM_PROCID="3", SLURM_LOCALID="1", SLURM_NODEID="1",
                       HVDTRAIN_RENDEZVOUS_PORT=str(port), HVDTRAIN_LAUNCH="gloo")
        srun.prepare_rank(env, START_TIMEOUT)
    # node 0 holds ranks 0-1, node 1 ranks 2-3, node 2 rank 4; this is local rank 1 of node 1
    assert {k: env[k] for k in env if k.startswith("HOROVOD_")} == {
        "HOROVOD_GLOO_RENDEZVOUS_SECRET": "s3cret", "HOROVOD_CONTROLLER": "gloo", "HOROVOD_CPU_OPERATIONS": "gloo",
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": "127.0.0.1", "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port),
        "HOROVOD_HOSTNAME": "nodeB", "HOROVOD_RANK": "3", "HOROVOD_SIZE": "5",
        "HOROVOD_LOCAL_RANK": "1", "HOROVOD_LOCAL_SIZE": "2",
        "HOROVOD_CROSS_RANK": "1", "HOROVOD_CROSS_SIZE": "2", "HOROVOD_GLOO_IFACE": "lo"}


def test_gloo_rank_0_serves_the_rendezvous_to_the_job_alone(capfd):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = srun_env(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", HVDTRAIN_RENDEZVOUS_PORT=str(port))
    srun.prepare_rank(env, START_TIMEOUT)
    import urllib.error
    import urllib.request

    def request(method, data=None, secret="s3cret"):
        headers = {srun.SIGNATURE: srun.signature(secret, method, "/global/key", data or b"")} if secret else {}
        return urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/global/key", data=data, method=method, headers=headers), timeout=5)
    assert request("PUT", b"v").status == 200  # Horovod's KV store answers the job's signed requests
    assert request("GET").read() == b"v"
    for secret in (None, "another job's"):  # a stranger can neither write nor read
        for method, data in (("PUT", b"poison"), ("GET", None), ("DELETE", None)):
            with pytest.raises(urllib.error.HTTPError, match="403"):
                request(method, data, secret)
    assert request("GET").read() == b"v"
    assert capfd.readouterr().err.count("hvdtrain: rendezvous: refused ") == 6


def test_a_rendezvous_without_the_jobs_secret_is_refused():
    env = srun_env(SLURM_PROCID="1", SLURM_LOCALID="1", SLURM_NODEID="0")
    del env["HVDTRAIN_RENDEZVOUS_SECRET"]
    with pytest.raises(UserError, match="HVDTRAIN_RENDEZVOUS_SECRET is not set"):
        srun.prepare_rank(env, START_TIMEOUT)


def test_gloo_rank_without_rank_0_stops_with_a_clear_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = srun_env(SLURM_PROCID="1", SLURM_LOCALID="1", SLURM_NODEID="0",
                   HVDTRAIN_RENDEZVOUS_PORT=str(port))
    with pytest.raises(UserError, match="did not answer within 1s"):
        srun.prepare_rank(env, start_timeout=1)


def test_rank_0_away_from_the_launch_node_is_told_so():
    env = srun_env(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0",
                   SLURM_LAUNCH_NODE_IPADDR="192.0.2.1")  # TEST-NET: never local
    with pytest.raises(UserError, match="does not have the rendezvous address 192.0.2.1"):
        srun.prepare_rank(env, START_TIMEOUT)


def test_mpi_mode_checks_the_mpi_type_and_records_the_size():
    env = srun_env(SLURM_PROCID="0", HVDTRAIN_LAUNCH="mpi", SLURM_MPI_TYPE="pmix")
    assert srun.prepare_rank(env, START_TIMEOUT) == 5 and "HOROVOD_RANK" not in env
    with pytest.raises(UserError, match="without MPI support"):
        srun.prepare_rank(srun_env(SLURM_PROCID="0", HVDTRAIN_LAUNCH="mpi", SLURM_MPI_TYPE="none"),
                          START_TIMEOUT)


def test_other_launchers_and_the_batch_script_are_left_alone():
    for env in ({"SLURM_JOB_ID": "1", "SLURM_PROCID": "0"},  # the batch script: no step
                srun_env(SLURM_PROCID="0", HOROVOD_RANK="0"),  # horovodrun inside an allocation
                srun_env(SLURM_PROCID="0", OMPI_COMM_WORLD_SIZE="2")):  # mpirun inside one
        before = dict(env)
        assert srun.prepare_rank(env, START_TIMEOUT) is None
        assert env == before


def test_the_launcher_names_the_rank_that_failed_not_the_one_it_stopped():
    from hvdtrain.errors import EXIT_PEER
    from hvdtrain.launch.local import first_failure
    lines = ["[2026-12-04 21:00:01.000000]: Process 0 exit with status code 3.\n",
             "[2026-12-04 21:00:01.100000]: Process 1 exit with status code 2.\n"]
    assert EXIT_PEER == 3 and first_failure(lines) == (1, 2)
    assert first_failure(lines[:1]) == (0, 3)  # none failed on its own: the one that stopped
    assert first_failure(["Process 1 exit with status code -9\n", lines[1]]) == (1, -9)
    assert first_failure(["nothing here\n"]) == (None, None)
