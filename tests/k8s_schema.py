"""Validate manifests as a Kubernetes API server with the mpi-operator would:
the MPIJob against the CRD's v2beta1 openAPIV3Schema (strict: unknown fields
rejected, as `kubectl apply --validate=strict`), the operator's own rules on
replica specs, and the ConfigMap and pod templates against Kubernetes' schemas."""
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate.utils import latest_version

CRD = Path(__file__).parent / "data" / "kubeflow.org_mpijobs.yaml"
REPLICA_TYPES = {"Launcher", "Worker"}
RESTART_POLICIES = {"Always", "OnFailure", "Never", "ExitCode"}


def strict(schema):
    """Unknown fields are errors, except where the schema preserves them."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def mpijob_schema():
    crd = yaml.safe_load(CRD.read_text())
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v2beta1"]
    return strict(version["schema"]["openAPIV3Schema"])


_VALIDATOR = jsonschema.Draft7Validator(mpijob_schema())


def mpijob_problems(job) -> list[str]:
    problems = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                for e in _VALIDATOR.iter_errors(job)]
    if job.get("apiVersion") != "kubeflow.org/v2beta1" or job.get("kind") != "MPIJob":
        problems.append("not a kubeflow.org/v2beta1 MPIJob")
    specs = (job.get("spec") or {}).get("mpiReplicaSpecs") or {}
    # the operator's validation (pkg/apis/kubeflow/validation): replica types and counts
    for kind in set(specs) - REPLICA_TYPES:
        problems.append(f"mpiReplicaSpecs: unknown replica type {kind!r}")
    if "Launcher" not in specs:
        problems.append("mpiReplicaSpecs: a Launcher is required")
    elif (specs["Launcher"] or {}).get("replicas", 1) != 1:
        problems.append("mpiReplicaSpecs.Launcher.replicas must be 1")
    for kind, replica in specs.items():
        policy = (replica or {}).get("restartPolicy")
        if policy is not None and policy not in RESTART_POLICIES:
            problems.append(f"mpiReplicaSpecs.{kind}.restartPolicy {policy!r} is not allowed")
    return problems


def kubernetes_problems(doc) -> list[str]:
    try:
        kubernetes_validate.validate(doc, latest_version(), strict=True)
    except kubernetes_validate.ValidationError as err:
        return [f"{doc.get('kind')}: {err.message}"]
    return []


def pod_templates(job):
    for kind, replica in job["spec"]["mpiReplicaSpecs"].items():
        template = replica["template"]
        yield kind, {"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": f"{job['metadata']['name']}-{kind.lower()}",
                                  **template.get("metadata", {})},
                     "spec": template["spec"]}


TRAINER = Path(__file__).parent / "data" / "kubeflow-trainer-v2.3.0"
TRAINER_CRDS = {"TrainJob": "trainer.kubeflow.org_trainjobs.yaml",
                "ClusterTrainingRuntime": "trainer.kubeflow.org_clustertrainingruntimes.yaml"}
_TRAINER_VALIDATORS = {}


def trainer_problems(doc) -> list[str]:
    """A Trainer v2.3.0 object against its CRD's v1alpha1 schema, strictly; and the
    CEL rules (x-kubernetes-validations) of the fields rendered here, checked by hand."""
    kind = doc.get("kind")
    if kind not in _TRAINER_VALIDATORS:
        crd = yaml.safe_load((TRAINER / TRAINER_CRDS[kind]).read_text())
        [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
        _TRAINER_VALIDATORS[kind] = jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))
    problems = [f"{kind} {'/'.join(map(str, e.absolute_path))}: {e.message}"
                for e in _TRAINER_VALIDATORS[kind].iter_errors(doc)]
    if doc.get("apiVersion") != "trainer.kubeflow.org/v1alpha1":
        problems.append(f"{kind}: not trainer.kubeflow.org/v1alpha1")
    trainer = (doc.get("spec") or {}).get("trainer") or {}
    if trainer.get("numProcPerNode", 1) < 1:
        problems.append("TrainJob trainer.numProcPerNode must be greater than or equal to 1")
    reserved = {"OMPI_MCA_orte_default_hostfile", "OMPI_MCA_plm_rsh_args", "OMPI_MCA_orte_keep_fqdn_hostnames",
                "OMPI_MCA_orte_set_default_slots"}  # the MPI plugin's own (constants.MPIReservedEnvNames)
    problems += [f"TrainJob trainer.env: {e['name']} is reserved by the MPI plugin"
                 for e in trainer.get("env", []) if e["name"] in reserved]
    return problems


def runtime_pod_templates(runtime):
    for job in runtime["spec"]["template"]["spec"]["replicatedJobs"]:
        template = job["template"]["spec"]["template"]
        yield job["name"], {"apiVersion": "v1", "kind": "Pod",
                            "metadata": {"name": f"{runtime['metadata']['name']}-{job['name']}",
                                         **template.get("metadata", {})},
                            "spec": template["spec"]}


def manifest_problems(text: str) -> list[str]:
    docs = [d for d in yaml.safe_load_all(text) if d]
    problems = []
    for doc in docs:
        if doc.get("kind") == "MPIJob":
            problems += mpijob_problems(doc)
            for kind, pod in pod_templates(doc):
                problems += [f"{kind} pod: {p}" for p in kubernetes_problems(pod)]
        elif doc.get("kind") in TRAINER_CRDS:
            problems += trainer_problems(doc)
            if doc["kind"] == "ClusterTrainingRuntime":
                for name, pod in runtime_pod_templates(doc):
                    problems += [f"{name} pod: {p}" for p in kubernetes_problems(pod)]
        else:
            problems += kubernetes_problems(doc)
    return problems
