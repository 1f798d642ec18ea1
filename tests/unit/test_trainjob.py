"""Kubeflow Trainer v2: rendered TrainJobs and the Horovod ClusterTrainingRuntime are
valid for Trainer v2.3.0's CRDs (strict) and Kubernetes' schemas, and carry what the
per-rank entry point reads."""
import pytest
import yaml

from hvdtrain.errors import UserError
from hvdtrain.launch import k8s, template, trainjob
from tests.conftest import EXAMPLES, ROOT
from tests.k8s_schema import TRAINER, manifest_problems

SPECS = [e for e in EXAMPLES if e.suffix == ".yaml"]
CNN = ROOT / "examples" / "digits-cnn-torch.yaml"


def rendered(spec=CNN, overrides=(), **kwargs):
    options = {"nodes": 2, "gpus_per_node": 4, "image": "registry.example/hvdtrain:1"} | kwargs
    return trainjob.render(spec, list(overrides), **options)


def test_shipped_templates_are_valid_as_they_stand():
    assert manifest_problems(template(trainjob.TEMPLATE)) == []
    assert manifest_problems(template(trainjob.RUNTIME_TEMPLATE)) == []


@pytest.mark.parametrize("spec", [s for s in SPECS if "elastic" not in s.name], ids=lambda p: p.name)
@pytest.mark.parametrize("gpus", [0, 4])
def test_rendered_manifests_are_valid(spec, gpus):
    text = rendered(spec, gpus_per_node=gpus, namespace="ml-team", with_runtime=True)
    assert manifest_problems(text) == []
    runtime, configmap, job = yaml.safe_load_all(text)
    assert (runtime["kind"], configmap["kind"], job["kind"]) == ("ClusterTrainingRuntime", "ConfigMap", "TrainJob")
    assert configmap["metadata"]["namespace"] == job["metadata"]["namespace"] == "ml-team"
    assert "namespace" not in runtime["metadata"]  # cluster-wide


def test_unknown_fields_and_wrong_types_are_rejected():
    text = rendered()
    configmap, job = yaml.safe_load_all(text)
    job["spec"]["trainer"]["numNodes"] = "two"
    job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["hostNetwork"] = True
    problems = manifest_problems(yaml.dump_all([configmap, job]))
    assert any("numNodes" in p for p in problems) and any("hostNetwork" in p for p in problems)


def test_the_job_runs_the_entry_point_on_the_spec_it_mounts():
    configmap, job = yaml.safe_load_all(rendered(overrides=["train.epochs=3"], nodes=3))
    spec = yaml.safe_load(configmap["data"][k8s.SPEC_KEY])
    assert spec["train"]["epochs"] == 3 and spec["output"] == f"{k8s.OUTPUT_DIR}/digits-cnn-torch"
    assert spec["resources"]["workers"] == 12 and spec["resources"]["gpus_per_worker"] == 1
    trainer = job["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (3, 4)
    assert trainer["command"] == ["mpirun"] and trainer["args"][trainer["args"].index("-np") + 1] == "12"
    assert trainer["args"][-5:] == ["python3", "-m", "hvdtrain", "train", f"{k8s.SPEC_DIR}/{k8s.SPEC_KEY}"]
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 4
    assert job["spec"]["runtimeRef"]["name"] == "hvdtrain-horovod"
    for replicated in job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
        pod = replicated["template"]["spec"]["template"]["spec"]
        assert {"name": "spec", "configMap": {"name": configmap["metadata"]["name"]}} in pod["volumes"]
        mounts = pod["containers"][0]["volumeMounts"]
        assert {"name": "spec", "mountPath": k8s.SPEC_DIR, "readOnly": True} in mounts
        assert {"name": "output", "mountPath": k8s.OUTPUT_DIR} in mounts
    assert {r["name"] for r in job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"][
        "replicatedJobs"]} == {"node", "launcher"}


def test_runtime_follows_trainers_own_mpi_runtime():
    """The parts Trainer's MPI plugin relies on, as in the deepspeed runtime it ships."""
    ours = yaml.safe_load(trainjob.render_runtime("registry.example/hvdtrain:1", shm="2Gi"))
    theirs = yaml.safe_load((TRAINER / "deepspeed_distributed.yaml").read_text())
    mpi = ours["spec"]["mlPolicy"]["mpi"]
    assert mpi["mpiImplementation"] == theirs["spec"]["mlPolicy"]["mpi"]["mpiImplementation"] == "OpenMPI"
    # keys in the non-root user's home, as in Trainer's own runtime
    assert mpi["runLauncherAsNode"] is True
    assert mpi["sshAuthMountPath"] == theirs["spec"]["mlPolicy"]["mpi"]["sshAuthMountPath"] == "/home/mpiuser/.ssh"
    jobs = {j["name"]: j for j in ours["spec"]["template"]["spec"]["replicatedJobs"]}
    assert set(jobs) == {j["name"] for j in theirs["spec"]["template"]["spec"]["replicatedJobs"]}
    assert jobs["launcher"]["dependsOn"] == [{"name": "node", "status": "Ready"}]
    assert jobs["launcher"]["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    node = jobs["node"]["template"]["spec"]["template"]["spec"]
    assert node["containers"][0]["command"] == ["python3", "-m", "hvdtrain.launch.pod_init"]
    assert node["containers"][0]["args"][0] == "/usr/sbin/sshd" and node["containers"][0]["image"].endswith(":1")
    assert node["containers"][0]["readinessProbe"]["tcpSocket"]["port"] == 2222  # sshd as uid 1000
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}} in node["volumes"]


def test_cli_renders_the_runtime_and_the_job(cli, tmp_path):
    result = cli("render", "trainjob", CNN, "--nodes", "2", "--image", "r/h:1", "--runtime", "-o", tmp_path / "j.yaml")
    assert result.returncode == 0, result.stderr
    assert manifest_problems((tmp_path / "j.yaml").read_text()) == []
    runtime = cli("render", "runtime", "--image", "r/h:1")
    assert runtime.returncode == 0 and manifest_problems(runtime.stdout) == []


@pytest.mark.parametrize("kwargs, message", [
    ({"nodes": 0}, "--nodes"), ({"image": "a b"}, "--image"), ({"memory": "lots"}, "--memory"),
    ({"gpus_per_node": 4, "procs_per_node": 2}, "one rank per GPU"), ({"namespace": "Bad_NS"}, "--namespace"),
])
def test_bad_options_are_clear_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        rendered(**kwargs)


def test_elastic_specs_are_sent_to_the_mpijob():
    with pytest.raises(UserError, match="render k8s --elastic"):
        rendered(overrides=["horovod.elastic={max_workers: 4, discovery: d.sh}"])
