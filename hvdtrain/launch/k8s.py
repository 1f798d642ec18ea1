"""Kubernetes: a Kubeflow MPIJob (v2beta1) and the ConfigMap carrying the job
spec, filled in from the package's templates/mpijob.yaml. The template's structure, comments aside,
is kept; only the job-specific values are set here."""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from ..spec import JobSpec, ResourcesSpec, dump, load_spec
from .common import Launcher, Verb, emit, rank_command, spec_arguments, template

TEMPLATE = "mpijob.yaml"
SPEC_DIR, SPEC_KEY, OUTPUT_DIR = "/etc/hvdtrain", "spec.yaml", "/output"
DISCOVER_HOSTS = "/etc/mpi/discover_hosts.sh"  # written by the mpi-operator into the launcher
QUANTITY = re.compile(r"^\d+(\.\d+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")


def k8s_name(name: str) -> str:
    """A DNS-1035 label for the job (pods are named <job>-launcher, <job>-worker-N)."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    label = re.sub(r"^[^a-z]+", "", label)[:45].rstrip("-")
    if not label:
        raise UserError(f"job name {name!r} gives no valid Kubernetes name: use letters first")
    return label


def render(spec_path: Path, overrides: list[str], *, workers: int, gpus_per_worker: int | None,
           image: str, namespace: str | None = None, slots_per_worker: int | None = None,
           memory: str = "4Gi", shm: str = "1Gi", elastic: tuple[int, int] | None = None) -> str:
    """Multi-document YAML: the ConfigMap, then the MPIJob."""
    if workers < 1:
        raise UserError("--workers must be at least 1")
    check_image(image)
    for flag, value in (("--memory", memory), ("--shm", shm)):
        if not QUANTITY.match(value):
            raise UserError(f"{flag} {value!r} is not a Kubernetes quantity (e.g. 4Gi, 512Mi)")
    check_namespace(namespace)
    given = load_spec(spec_path, overrides, check_paths=False)
    name = k8s_name(given.name)
    gpus, slots = ranks_per_pod(given.resources, gpus_per_worker, slots_per_worker, "worker", "--slots-per-worker")
    extra = []
    if elastic is not None:
        low, high = elastic
        if not 1 <= low <= workers * slots <= high * slots:
            raise UserError(f"--elastic {low}:{high}: need 1 <= min ranks <= workers x slots "
                            f"({workers * slots}) <= max workers x slots")
        extra.append(f"horovod.elastic={{min_workers: {low}, max_workers: {high * slots}, "
                     f"discovery: {DISCOVER_HOSTS}}}")
    # The spec as every rank reads it: overrides applied, output inside the output volume,
    # resources as deployed (one GPU per rank when there are GPUs).
    spec = load_spec(spec_path, [*overrides, f"output={OUTPUT_DIR}/{name}",
                                 f"resources.workers={workers * slots}",
                                 f"resources.gpus_per_worker={1 if gpus else 0}", *extra], check_paths=False)
    configmap, job = yaml.safe_load_all(template(TEMPLATE))
    fill_configmap(configmap, name, spec)
    fill_job(job, name, spec, workers=workers, gpus=gpus, slots=slots, image=image,
             memory=memory, shm=shm)
    for doc in (configmap, job):
        if namespace:
            doc["metadata"]["namespace"] = namespace
    return yaml.dump_all([configmap, job], Dumper=ManifestDumper, sort_keys=False, width=100)


def ranks_per_pod(resources: ResourcesSpec, gpus: int | None, ranks: int | None, pod: str, flag: str) -> tuple[int, int]:
    """(GPUs, ranks) per pod: the GPUs given (default: the spec's per worker), one rank
    each (Horovod's rule), or the ranks given for CPU pods."""
    gpus = resources.gpus_per_worker if gpus is None else gpus
    if gpus < 0:
        raise UserError(f"--gpus-per-{pod} must be at least 0")
    ranks = ranks or gpus or 1
    if gpus and ranks != gpus:
        raise UserError(f"{flag} {ranks} with {gpus} GPUs per {pod}: Horovod runs one rank per GPU, "
                        "so they must be equal")
    return gpus, ranks


def check_image(image: str) -> None:
    if not image.strip() or any(c.isspace() for c in image):
        raise UserError(f"--image {image!r} is not an image reference")


def check_namespace(namespace: str | None) -> None:
    if namespace is not None and not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", namespace):
        raise UserError(f"--namespace {namespace!r} is not a valid namespace name")


class ManifestDumper(yaml.SafeDumper):
    """Multi-line strings (the spec in the ConfigMap) as readable | blocks; a value the
    template shares (a YAML alias) written out in full at each place."""

    def ignore_aliases(self, data) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, text: str):
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


ManifestDumper.add_representer(str, _str)


def fill_configmap(configmap: dict, name: str, spec: JobSpec) -> None:
    configmap["metadata"]["name"] = f"{name}-spec"
    configmap["metadata"]["labels"]["app.kubernetes.io/instance"] = name
    configmap["data"] = {SPEC_KEY: dump(spec)}


def fill_job(job: dict, name: str, spec: JobSpec, *, workers: int, gpus: int, slots: int,
             image: str, memory: str, shm: str) -> None:
    job["metadata"]["name"] = name
    job["metadata"]["labels"]["app.kubernetes.io/instance"] = name
    job["spec"]["slotsPerWorker"] = slots
    replicas = job["spec"]["mpiReplicaSpecs"]
    replicas["Worker"]["replicas"] = workers
    threads = str(spec.resources.cpus_per_worker)
    for role in ("Launcher", "Worker"):
        pod = replicas[role]["template"]["spec"]
        pod["volumes"] = [set_configmap(v, f"{name}-spec") for v in pod["volumes"]]
        container = pod["containers"][0]
        container["image"] = image
        container["env"] = [{**e, "value": threads} if e["name"] == "OMP_NUM_THREADS" else dict(e)
                            for e in container["env"]]
    launcher = replicas["Launcher"]["template"]["spec"]["containers"][0]
    # the image's python3 runs the spec as mounted from the ConfigMap
    command = rank_command(f"{SPEC_DIR}/{SPEC_KEY}", python="python3")
    launcher["args"] = [*with_np(launcher["args"], workers * slots), *command]
    if spec.horovod.elastic is not None:
        # Elastic: horovodrun instead of mpirun, with the hosts the operator lists in
        # /etc/mpi/discover_hosts.sh as worker pods come and go (ssh to the workers as mpirun).
        elastic = spec.horovod.elastic
        launcher["command"] = ["horovodrun"]
        launcher["args"] = ["--gloo", "-np", str(workers * slots), "--min-np", str(elastic.min_workers),
                            "--max-np", str(elastic.max_workers), "--host-discovery-script",
                            str(elastic.discovery), *command]
        replicas["Worker"]["replicas"] = elastic.max_workers // slots
        job["spec"]["runPolicy"]["schedulingPolicy"] = {"minAvailable": -(-elastic.min_workers // slots)}
    worker_pod = replicas["Worker"]["template"]["spec"]
    worker = worker_pod["containers"][0]
    resources = worker["resources"]
    resources["requests"] = {"cpu": str(spec.resources.cpus_per_worker * slots), "memory": memory}
    resources["limits"] = {"memory": memory, **({"nvidia.com/gpu": gpus} if gpus else {})}
    for volume in worker_pod["volumes"]:
        if volume["name"] == "dshm":
            volume["emptyDir"]["sizeLimit"] = shm


def set_configmap(volume: dict[str, Any], configmap: str) -> dict[str, Any]:
    volume = copy.deepcopy(volume)
    if "configMap" in volume:
        volume["configMap"]["name"] = configmap
    return volume


def with_np(args: list[str], ranks: int) -> list[str]:
    args = list(args)
    args[args.index("-np") + 1] = str(ranks)
    return args


def pod_arguments(parser, pod: str, kind: str) -> None:
    """What the MPIJob and the TrainJob both take: the spec, overrides, image, namespace,
    GPUs, memory and /dev/shm per pod, and the output file."""
    spec_arguments(parser, "override spec values (baked into the ConfigMap)")
    parser.add_argument(f"--gpus-per-{pod}", type=int, help="default: resources.gpus_per_worker")
    parser.add_argument("--image", required=True, help="image with hvdtrain (k8s/Dockerfile)")
    parser.add_argument("--namespace", help=f"namespace of the ConfigMap and {kind}")
    parser.add_argument("--memory", default="4Gi", help=f"memory per {pod} (default 4Gi)")
    parser.add_argument("--shm", default="1Gi", help=f"/dev/shm size per {pod} (default 1Gi)")
    parser.add_argument("-o", "--output", help="write the manifests here")


def mpijob_arguments(parser) -> None:
    pod_arguments(parser, "worker", "MPIJob")
    parser.add_argument("--workers", type=int, required=True, help="worker pods")
    parser.add_argument("--slots-per-worker", type=int, help="ranks per worker (default: GPUs, or 1)")
    parser.add_argument("--elastic", metavar="MIN_RANKS:MAX_WORKERS",
                        help="elastic job: horovodrun with the operator's discover_hosts.sh; "
                             "Worker replicas = MAX_WORKERS")


def elastic_range(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    low, sep, high = text.partition(":")
    if not (sep and low.isdigit() and high.isdigit()):
        raise UserError(f"--elastic {text!r}: expected MIN_RANKS:MAX_WORKERS, e.g. 2:8")
    return int(low), int(high)


def render_mpijob(args) -> int:
    return emit(render(Path(args.spec), args.overrides, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                       image=args.image, namespace=args.namespace, slots_per_worker=args.slots_per_worker,
                       memory=args.memory, shm=args.shm, elastic=elastic_range(args.elastic)), args.output)


LAUNCHER = Launcher(name="k8s", verbs=(
    Verb(path=("render", "k8s"), help="a Kubeflow MPIJob (v2beta1) and its spec ConfigMap, as multi-document "
         "YAML for kubectl apply -f -", arguments=mpijob_arguments, call=render_mpijob),
))
