"""Rendered MPIJobs: valid for the real MPIJob CRD and Kubernetes' schemas, and
consistent with what the per-rank entry point reads."""
import copy

import pytest
import yaml

from hvdtrain.errors import UserError
from hvdtrain.launch import k8s, template
from tests.conftest import EXAMPLES, ROOT
from tests.k8s_schema import manifest_problems, mpijob_problems

SPECS = [e for e in EXAMPLES if e.suffix == ".yaml"]


def rendered(spec=ROOT / "examples" / "digits-cnn-torch.yaml", overrides=(), **kwargs):
    options = {"workers": 2, "gpus_per_worker": 4, "image": "registry.example/hvdtrain:1"} | kwargs
    return k8s.render(spec, list(overrides), **options)


def documents(text):
    configmap, job = yaml.safe_load_all(text)
    return configmap, job


def test_shipped_template_is_valid_as_it_stands():
    assert manifest_problems(template(k8s.TEMPLATE)) == []


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.name)
@pytest.mark.parametrize("gpus", [0, 4])
def test_rendered_manifests_are_valid(spec, gpus):
    text = rendered(spec, gpus_per_worker=gpus, namespace="ml-team")
    assert manifest_problems(text) == []
    configmap, job = documents(text)
    assert configmap["metadata"]["namespace"] == job["metadata"]["namespace"] == "ml-team"


def test_cli_prints_the_manifest_for_kubectl(cli):
    result = cli("render", "k8s", ROOT / "examples" / "digits-cnn-torch.yaml", "--workers", "2",
                 "--gpus-per-worker", "4", "--image", "X")
    assert result.returncode == 0, result.stderr
    assert manifest_problems(result.stdout) == []
    _, job = documents(result.stdout)
    assert job["spec"]["slotsPerWorker"] == 4
    assert job["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"] == 2
    args = job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("-np") + 1] == "8"


def test_wrong_field_type_is_rejected():
    _, job = documents(rendered())
    job["spec"]["slotsPerWorker"] = "four"
    assert any("slotsPerWorker" in p and "integer" in p for p in mpijob_problems(job))
    job = documents(rendered())[1]
    job["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"] = [2]
    assert mpijob_problems(job)


def test_unknown_replica_type_and_unknown_field_are_rejected():
    _, job = documents(rendered())
    bad = copy.deepcopy(job)
    bad["spec"]["mpiReplicaSpecs"]["Server"] = bad["spec"]["mpiReplicaSpecs"].pop("Worker")
    assert "mpiReplicaSpecs: unknown replica type 'Server'" in mpijob_problems(bad)
    bad = copy.deepcopy(job)
    bad["spec"]["slotsPerWorkers"] = 2
    assert any("slotsPerWorkers" in p for p in mpijob_problems(bad))
    bad = copy.deepcopy(job)
    bad["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]["resources"] = {
        "limits": {"memory": "lots"}}
    assert manifest_problems(yaml.safe_dump_all([bad]))


def launcher_and_worker(job):
    replicas = job["spec"]["mpiReplicaSpecs"]
    return (replicas["Launcher"]["template"]["spec"], replicas["Worker"]["template"]["spec"])


def test_environment_and_volumes_match_what_the_entry_point_reads():
    configmap, job = documents(rendered(overrides=["train.epochs=7"]))
    launcher_pod, worker_pod = launcher_and_worker(job)
    launcher, worker = launcher_pod["containers"][0], worker_pod["containers"][0]
    args = launcher["args"]
    # the ranks run `python3 -m hvdtrain train <spec>` on the ConfigMap's file, as mounted
    entry = args[args.index("python3"):]
    assert entry[:4] == ["python3", "-m", "hvdtrain", "train"]
    spec_path = entry[4]
    for pod, container in ((launcher_pod, launcher), (worker_pod, worker)):
        [mount] = [m for m in container["volumeMounts"] if m["name"] == "spec"]
        [volume] = [v for v in pod["volumes"] if v["name"] == "spec"]
        assert spec_path == f"{mount['mountPath']}/{k8s.SPEC_KEY}" and mount["readOnly"]
        assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    spec = yaml.safe_load(configmap["data"][k8s.SPEC_KEY])
    assert spec["train"]["epochs"] == 7  # overrides are baked into the ConfigMap
    assert spec["resources"] == {"workers": 8, "cpus_per_worker": 1, "gpus_per_worker": 1}
    # output and checkpoints land in the worker's output volume
    [out] = [m for m in worker["volumeMounts"] if m["name"] == "output"]
    assert spec["output"].startswith(out["mountPath"] + "/")
    assert spec["checkpoint"]["dir"].startswith(spec["output"])
    # /dev/shm is a memory volume of the asked size
    [shm] = [m for m in worker["volumeMounts"] if m["name"] == "dshm"]
    [shm_volume] = [v for v in worker_pod["volumes"] if v["name"] == "dshm"]
    assert shm["mountPath"] == "/dev/shm" and shm_volume["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Gi"}
    # every variable mpirun exports is set in the launcher (PATH comes from the image)
    exported = [args[i + 1] for i, a in enumerate(args) if a == "-x"]
    launcher_env = {e["name"]: e["value"] for e in launcher["env"]}
    assert set(exported) - {"PATH"} <= set(launcher_env)
    assert launcher_env["OMP_NUM_THREADS"] == "1"
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert {"-bind-to", "none", "-map-by", "slot"} <= set(args)


def test_no_privileged_pods_host_network_or_secrets():
    text = rendered()
    _, job = documents(text)
    for pod in launcher_and_worker(job):
        assert not pod.get("hostNetwork")
        for container in pod["containers"]:
            assert not (container.get("securityContext") or {}).get("privileged")
        assert all("secret" not in v for v in pod["volumes"])
    assert "kind: Secret" not in text


@pytest.mark.parametrize("kwargs, message", [
    ({"workers": 0}, "--workers"), ({"image": "has space"}, "--image"),
    ({"memory": "lots"}, "--memory"), ({"namespace": "Bad_NS"}, "--namespace"),
    ({"gpus_per_worker": 2, "slots_per_worker": 3}, "one rank per GPU"),
])
def test_bad_options_are_clear_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        rendered(**kwargs)


def test_job_names_become_kubernetes_names():
    assert k8s.k8s_name("Digits_MLP.v2") == "digits-mlp-v2"
    assert k8s.k8s_name("9lives") == "lives"
    assert len(k8s.k8s_name("a" * 60)) <= 45
    with pytest.raises(UserError, match="no valid Kubernetes name"):
        k8s.k8s_name("123")


def test_image_recipe_matches_the_manifest_and_the_tested_build():
    """The Dockerfile cannot be built here (no Docker engine): check what ties it to
    the manifest and to the build path that is tested."""
    from hvdtrain.backends import FRAMEWORK_PACKAGES
    recipe = (ROOT / "k8s" / "Dockerfile").read_text()
    assert "hvdtrain build-horovod" in recipe and "HOROVOD_GPU_OPERATIONS=NCCL" in recipe
    assert FRAMEWORK_PACKAGES["torch"] in recipe and "tensorflow[and-cuda]==2.21.0" in recipe
    assert "openmpi-bin" in recipe and "openssh-server" in recipe
    _, job = documents(rendered())
    launcher, worker = (pod["containers"][0] for pod in launcher_and_worker(job))
    assert worker["command"] == ["python3", "-m", "hvdtrain.launch.pod_init"] and "mkdir -p /run/sshd" in recipe
    assert worker["args"][:3] == ["/usr/sbin/sshd", "-De", "-f"] and worker["args"][3] in recipe
    assert "python3" in launcher["args"] and "ENV VIRTUAL_ENV=/opt/hvdtrain PATH=/opt/hvdtrain/bin:$PATH" in recipe


def test_elastic_variant_uses_the_operators_discovery_script():
    text = rendered(ROOT / "examples" / "digits-mlp-torch.yaml", gpus_per_worker=0, elastic=(1, 4))
    assert manifest_problems(text) == []
    configmap, job = documents(text)
    launcher, _ = (pod["containers"][0] for pod in launcher_and_worker(job))
    assert launcher["command"] == ["horovodrun"]
    args = launcher["args"]
    assert args[:10] == ["--gloo", "-np", "2", "--min-np", "1", "--max-np", "4",
                         "--host-discovery-script", "/etc/mpi/discover_hosts.sh", "python3"]
    assert job["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"] == 4
    assert job["spec"]["runPolicy"]["schedulingPolicy"] == {"minAvailable": 1}
    elastic = yaml.safe_load(configmap["data"][k8s.SPEC_KEY])["horovod"]["elastic"]
    assert elastic["discovery"] == "/etc/mpi/discover_hosts.sh" and elastic["max_workers"] == 4
    with pytest.raises(UserError, match="--elastic"):
        rendered(gpus_per_worker=0, elastic=(3, 1))


# Pod Security Standards "restricted" (and "baseline" below it) as checkov's Kubernetes checks
# name them: privileged, host PID / IPC / network, privilege escalation, root, added and NET_RAW
# and SYS_ADMIN capabilities, hostPort, the docker socket, security contexts, seccomp, all
# capabilities dropped. The scanner's other checks (probes, limits, image digests, a read-only
# root filesystem, high UIDs) are good practice but not the profile, and are not asked here.
RESTRICTED = ["CKV_K8S_16", "CKV_K8S_17", "CKV_K8S_18", "CKV_K8S_19", "CKV_K8S_20", "CKV_K8S_23", "CKV_K8S_25",
              "CKV_K8S_26", "CKV_K8S_27", "CKV_K8S_28", "CKV_K8S_29", "CKV_K8S_30", "CKV_K8S_31", "CKV_K8S_37",
              "CKV_K8S_39"]


def scanned(pods: dict, directory) -> dict[str, list[str]]:
    """checkov's verdicts on each pod spec, written as a Pod: {pod: [failed check ids]}, and
    the number of checks that passed; checkov runs from its own virtualenv (.venv-tools)."""
    import json
    import subprocess
    from tests.conftest import missing
    checkov = ROOT / ".venv-tools" / "bin" / "checkov"
    if not checkov.exists():
        missing("checkov not installed: scripts/test.sh installs it in .venv-tools")
    for name, spec in pods.items():
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "ml-team"}, "spec": spec}
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(pod))
    out = subprocess.run([str(checkov), "-d", str(directory), "--framework", "kubernetes", "--check",
                          ",".join(RESTRICTED), "-o", "json", "--compact"], capture_output=True, text=True)
    report = json.loads(out.stdout)
    failed = {name: [] for name in pods}
    for check in report["results"]["failed_checks"]:
        failed[check["resource"].split(".")[2]].append(check["check_id"])  # Pod.ml-team.NAME
    return failed, len(report["results"]["passed_checks"])


def test_the_pods_pass_the_restricted_pod_security_checks_of_a_real_scanner(tmp_path, figure):
    from hvdtrain.launch import trainjob
    launcher, worker = launcher_and_worker(documents(rendered())[1])
    runtime = yaml.safe_load(trainjob.render_runtime("registry.example/hvdtrain:1"))
    nodes = {f"runtime-{job['name']}": job["template"]["spec"]["template"]["spec"]
             for job in runtime["spec"]["template"]["spec"]["replicatedJobs"]}
    pods = {"mpijob-launcher": launcher, "mpijob-worker": worker, **nodes}
    (tmp_path / "ours").mkdir()
    failed, passed = scanned(pods, tmp_path / "ours")
    assert failed == {name: [] for name in pods} and passed == len(RESTRICTED) * len(pods)
    # the scanner does refuse a pod as these were before: root, no security context
    bare = copy.deepcopy(worker)
    del bare["securityContext"], bare["containers"][0]["securityContext"]
    (tmp_path / "bare").mkdir()
    refused, _ = scanned({"bare": bare}, tmp_path / "bare")
    assert {"CKV_K8S_20", "CKV_K8S_23", "CKV_K8S_31", "CKV_K8S_37"} <= set(refused["bare"])
    figure(f"checkov {len(RESTRICTED)} restricted-profile checks: {passed} passed on the 4 pod templates, none failed")
    assert all(pod["terminationGracePeriodSeconds"] >= 60 for pod in pods.values())
