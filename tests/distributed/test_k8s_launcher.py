"""The MPIJob's launcher command, run as the mpi-operator runs it.

The operator mounts the ConfigMap at its path, writes the hostfile
(`<worker> slots=N` per worker) and points Open MPI at it through
OMPI_MCA_orte_default_hostfile; the launcher container then runs its command
and args. Here the hostfile names this machine, and the command and args are
taken exactly as rendered. Writing the pod's paths (/etc/hvdtrain, /output)
needs root: without it the test skips, and under HVDTRAIN_REQUIRE_CLUSTER=1 fails.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hvdtrain.launch import k8s
from tests.conftest import ROOT

pytestmark = pytest.mark.distributed


@pytest.fixture
def pod_paths():
    if os.geteuid() != 0:
        if os.environ.get("HVDTRAIN_REQUIRE_CLUSTER") == "1":
            pytest.fail("HVDTRAIN_REQUIRE_CLUSTER=1 but the launcher proof needs root")
        pytest.skip("the launcher proof writes the pod's paths /etc/hvdtrain and /output: needs root")
    created = [p for p in (Path(k8s.SPEC_DIR), Path(k8s.OUTPUT_DIR)) if not p.exists()]
    yield
    for path in created:
        shutil.rmtree(path, ignore_errors=True)


def run_in_pod(configmap, mounts, command, env_list, hostfile, slots, extra_env, tmp_path):
    """What the operator and kubelet do (mount the ConfigMap where the container's
    `spec` mount is, write the hostfile "localhost slots=N"), then the command as
    rendered in the image's environment (its python3 has hvdtrain) plus the
    container's env. Returns (result, the spec's output dir, kept); cleans the pod's paths."""
    [mount] = [m for m in mounts if m["name"] == "spec"]
    spec_dir = Path(mount["mountPath"])
    spec_dir.mkdir(parents=True, exist_ok=True)
    for key, content in configmap["data"].items():
        (spec_dir / key).write_text(content)
    hostfile.write_text(f"localhost slots={slots}\n")
    output = Path(yaml.safe_load(configmap["data"][k8s.SPEC_KEY])["output"])
    shutil.rmtree(output, ignore_errors=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           **{e["name"]: e["value"] for e in env_list}, "OMPI_MCA_orte_default_hostfile": str(hostfile),
           **extra_env}
    try:
        result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        kept = tmp_path / "output"
        if output.exists():
            shutil.copytree(output, kept)
        return result, kept
    finally:
        shutil.rmtree(output, ignore_errors=True)
        for key in configmap["data"]:
            (spec_dir / key).unlink(missing_ok=True)


def run_launcher(spec, overrides, tmp_path):
    """Render an MPIJob for 1 worker with 2 slots and run its launcher as the operator would."""
    text = k8s.render(spec, overrides, workers=1, gpus_per_worker=0, slots_per_worker=2,
                      image="hvdtrain:test")
    configmap, job = yaml.safe_load_all(text)
    container = job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
    return run_in_pod(configmap, container["volumeMounts"], container["command"] + container["args"],
                      container["env"], tmp_path / "hostfile", job["spec"]["slotsPerWorker"], {}, tmp_path)


def test_launcher_command_trains_two_ranks_with_the_configmap_spec(pod_paths, tmp_path, figure):
    result, output = run_launcher(ROOT / "examples" / "digits-mlp-torch.yaml",
                                  ["checkpoint.every_epochs=10"], tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["final"]["val_accuracy"] >= 0.95
    assert (output / "checkpoints" / "epoch-000020.ckpt").exists()
    figure(f"k8s launcher: mpirun -np 2 trained to {summary['final']['val_accuracy']:.4f}")


def test_launcher_command_runs_the_users_own_script(pod_paths, tmp_path, figure):
    """An entry spec: the image holds the script (here: the checkout's example)."""
    script = ROOT / "examples" / "plain_horovod_torch.py"
    result, output = run_launcher(ROOT / "examples" / "plain-horovod-torch.yaml",
                                  [f"entry.script={script}",
                                   f"entry.args=[--epochs, '10', --out, {k8s.OUTPUT_DIR}/plain-horovod-torch/result.json]"],
                                  tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    outcome = json.loads((output / "result.json").read_text())
    assert outcome["ranks"] == 2 and len(set(outcome["digests"])) == 1 and outcome["accuracy"] >= 0.93
    figure(f"k8s launcher: plain Horovod script on mpirun -np 2, accuracy {outcome['accuracy']:.4f}")


def test_launcher_command_runs_horovods_keras_2_example_unchanged(pod_paths, tmp_path, figure):
    """Horovod's tensorflow2_synthetic_benchmark.py (read from the upstream examples; an
    image would hold it) through the MPIJob's launcher: mpirun -np 2, Keras 2."""
    import re

    from tests.conftest import missing
    from tests.distributed.test_upstream_examples import SMALL, entry_spec, find_examples
    examples = find_examples()
    if examples is None:
        missing("Horovod's examples not found (HVDTRAIN_HOROVOD_EXAMPLES, or shared/upstream/horovod-examples)")
    spec = entry_spec(tmp_path, examples / "tensorflow2" / "tensorflow2_synthetic_benchmark.py",
                      [*SMALL, "--num-warmup-batches", "1"], keras=2)
    result, _ = run_launcher(spec, [f"output={k8s.OUTPUT_DIR}/keras2-example"], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    total = re.search(r"Total img/sec on 2 CPU\(s\): ([\d.]+)", output)
    assert total and float(total.group(1)) > 0, output[-3000:]
    figure(f"k8s launcher: Horovod's Keras 2 synthetic benchmark unchanged on mpirun -np 2, {total.group(1)} img/s")


@pytest.fixture
def trainer_paths(pod_paths):
    """Also the hostfile's directory, as Trainer's MPI plugin mounts it in the launcher."""
    hostfile_dir = Path("/etc/mpi")
    created = not hostfile_dir.exists()
    hostfile_dir.mkdir(parents=True, exist_ok=True)
    yield hostfile_dir
    (hostfile_dir / "hostfile").unlink(missing_ok=True)
    if created:
        shutil.rmtree(hostfile_dir, ignore_errors=True)


def test_trainjob_launcher_command_trains_on_the_hostfile_trainer_writes(trainer_paths, tmp_path, figure):
    """A TrainJob of 1 node with 2 processes: what Trainer's MPI plugin and the kubelet do
    (the ConfigMap mounted, /etc/mpi/hostfile as "<endpoint> slots=<numProcPerNode>", the
    plugin's Open MPI variables), then the trainer's command and args as rendered."""
    from hvdtrain.launch import trainjob
    text = trainjob.render(ROOT / "examples" / "digits-mlp-torch.yaml", ["checkpoint.every_epochs=10"], nodes=1,
                           gpus_per_node=0, procs_per_node=2, image="hvdtrain:test")
    configmap, job = yaml.safe_load_all(text)
    trainer = job["spec"]["trainer"]
    [patch] = job["spec"]["runtimePatches"]
    [launcher] = [j for j in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
                  if j["name"] == "launcher"]
    mounts = launcher["template"]["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    slots = trainer["numProcPerNode"]
    # what the MPI plugin sets besides the hostfile (pkg/runtime/framework/plugins/mpi, constants.go of v2.3.0)
    plugin_env = {"OMPI_MCA_orte_keep_fqdn_hostnames": "true", "OMPI_MCA_orte_set_default_slots": str(slots),
                  "OMPI_MCA_plm_rsh_args": "-o ConnectionAttempts=10"}
    result, output = run_in_pod(configmap, mounts, trainer["command"] + trainer["args"], trainer["env"],
                                trainer_paths / "hostfile", slots, plugin_env, tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["final"]["val_accuracy"] >= 0.95
    figure(f"TrainJob launcher: mpirun -np 2 on Trainer's hostfile trained to {summary['final']['val_accuracy']:.4f}")
