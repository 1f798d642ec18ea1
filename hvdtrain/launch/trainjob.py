"""Kubernetes through Kubeflow Trainer v2: a TrainJob (with the ConfigMap carrying the
job spec) on a Horovod ClusterTrainingRuntime, filled in from the package's
templates/trainjob.yaml and templates/horovod-runtime.yaml. Only the job-specific
values are set here; the rest is kept as the templates have it."""
from __future__ import annotations

from pathlib import Path

import yaml

from ..errors import UserError
from ..spec import load_spec
from .common import Launcher, Verb, emit, rank_command, template
from .k8s import (OUTPUT_DIR, QUANTITY, SPEC_DIR, SPEC_KEY, ManifestDumper, check_image, check_namespace,
                  fill_configmap, k8s_name, pod_arguments, ranks_per_pod, with_np)

TEMPLATE, RUNTIME_TEMPLATE = "trainjob.yaml", "horovod-runtime.yaml"


def render_runtime(image: str, shm: str = "1Gi") -> str:
    """The Horovod ClusterTrainingRuntime (cluster-wide: namespace is not used)."""
    check_image(image)
    if not QUANTITY.match(shm):
        raise UserError(f"--shm {shm!r} is not a Kubernetes quantity (e.g. 1Gi)")
    runtime = yaml.safe_load(template(RUNTIME_TEMPLATE))
    for job in runtime["spec"]["template"]["spec"]["replicatedJobs"]:
        pod = job["template"]["spec"]["template"]["spec"]
        pod["containers"][0]["image"] = image
        for volume in pod["volumes"]:
            if volume["name"] == "dshm":
                volume["emptyDir"]["sizeLimit"] = shm
    return yaml.dump(runtime, Dumper=ManifestDumper, sort_keys=False, width=100)


def render(spec_path: Path, overrides: list[str], *, nodes: int, gpus_per_node: int | None, image: str,
           namespace: str | None = None, procs_per_node: int | None = None, memory: str = "4Gi",
           with_runtime: bool = False, shm: str = "1Gi") -> str:
    """Multi-document YAML: the ConfigMap and the TrainJob (after the runtime, with_runtime)."""
    if nodes < 1:
        raise UserError("--nodes must be at least 1")
    check_image(image)
    check_namespace(namespace)
    if not QUANTITY.match(memory):
        raise UserError(f"--memory {memory!r} is not a Kubernetes quantity (e.g. 4Gi, 512Mi)")
    given = load_spec(spec_path, overrides, check_paths=False)
    if given.horovod.elastic is not None:
        raise UserError("horovod.elastic: Kubeflow Trainer v2 keeps no host list up to date for "
                        "elastic Horovod; render an MPIJob (`hvdtrain render k8s --elastic`)")
    name = k8s_name(given.name)
    gpus, procs = ranks_per_pod(given.resources, gpus_per_node, procs_per_node, "node", "--procs-per-node")
    # The spec as every rank reads it: output inside the output volume, resources as deployed.
    spec = load_spec(spec_path, [*overrides, f"output={OUTPUT_DIR}/{name}",
                                 f"resources.workers={nodes * procs}",
                                 f"resources.gpus_per_worker={1 if gpus else 0}"], check_paths=False)
    configmap, job = yaml.safe_load_all(template(TEMPLATE))
    fill_configmap(configmap, name, spec)
    job["metadata"]["name"] = name
    job["metadata"]["labels"]["app.kubernetes.io/instance"] = name
    trainer = job["spec"]["trainer"]
    trainer.update(image=image, numNodes=nodes, numProcPerNode=procs)
    trainer["args"] = [*with_np(trainer["args"], nodes * procs),
                       *rank_command(f"{SPEC_DIR}/{SPEC_KEY}", python="python3")]
    trainer["env"] = [{**e, "value": str(spec.resources.cpus_per_worker)} if e["name"] == "OMP_NUM_THREADS"
                      else e for e in trainer["env"]]
    trainer["resourcesPerNode"] = {
        "requests": {"cpu": str(spec.resources.cpus_per_worker * procs), "memory": memory},
        "limits": {"memory": memory, **({"nvidia.com/gpu": gpus} if gpus else {})}}
    for patch in job["spec"]["runtimePatches"]:
        for replicated in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
            for volume in replicated["template"]["spec"]["template"]["spec"]["volumes"]:
                if "configMap" in volume:
                    volume["configMap"]["name"] = f"{name}-spec"
    docs = [configmap, job]
    for doc in docs:
        if namespace:
            doc["metadata"]["namespace"] = namespace
    text = yaml.dump_all(docs, Dumper=ManifestDumper, sort_keys=False, width=100)
    return (render_runtime(image, shm=shm) + "---\n" + text) if with_runtime else text


def trainjob_arguments(parser) -> None:
    pod_arguments(parser, "node", "TrainJob")
    parser.add_argument("--nodes", type=int, required=True, help="training nodes (pods), the launcher's included")
    parser.add_argument("--procs-per-node", type=int, help="ranks per node (default: GPUs, or 1)")
    parser.add_argument("--runtime", action="store_true", help="also the Horovod ClusterTrainingRuntime")


def runtime_arguments(parser) -> None:
    parser.add_argument("--image", required=True, help="image with hvdtrain (k8s/Dockerfile)")
    parser.add_argument("--shm", default="1Gi", help="/dev/shm size per node (default 1Gi)")
    parser.add_argument("-o", "--output", help="write the manifest here")


def render_trainjob(args) -> int:
    return emit(render(Path(args.spec), args.overrides, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                       image=args.image, namespace=args.namespace, procs_per_node=args.procs_per_node,
                       memory=args.memory, with_runtime=args.runtime, shm=args.shm), args.output)


LAUNCHER = Launcher(name="trainjob", verbs=(
    Verb(path=("render", "trainjob"), help="a Kubeflow Trainer v2 TrainJob (trainer.kubeflow.org/v1alpha1) on "
         "the Horovod ClusterTrainingRuntime, and its spec ConfigMap", arguments=trainjob_arguments,
         call=render_trainjob),
    Verb(path=("render", "runtime"), help="the Horovod ClusterTrainingRuntime that TrainJobs from `render "
         "trainjob` run on; apply once per cluster", arguments=runtime_arguments,
         call=lambda args: emit(render_runtime(args.image, shm=args.shm), args.output)),
))
