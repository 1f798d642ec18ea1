"""Slurm: sbatch scripts rendered from slurm/hvdtrain.sbatch, and the set-up of
a rank that srun started (before Horovod initialises).

Two launch modes (HVDTRAIN_LAUNCH, written into the script):
- mpi: `srun --mpi=pmix`; Horovod's MPI controller takes rank and size from MPI.
- gloo: ranks from SLURM_* variables, and Horovod's own rendezvous server
  (horovod.runner) started by rank 0, on the node srun runs on.
Rank and size never come from Open MPI's variables.
"""
from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Mapping

from ..errors import UserError
from ..spec import JobSpec

TEMPLATE = Path(__file__).resolve().parents[2] / "slurm" / "hvdtrain.sbatch"
MODES = ("gloo", "mpi")
START_TIMEOUT_S = 120


def render(spec: JobSpec, spec_path: Path, overrides: list[str], *, nodes: int = 1,
           tasks_per_node: int | None = None, gpus_per_node: int | None = None,
           cpus_per_task: int | None = None, time_limit: str = "01:00:00",
           partition: str | None = None, mode: str = "gloo", template: Path = TEMPLATE) -> str:
    """The template with its {{...}} fields filled; lines of empty fields are dropped."""
    if mode not in MODES:
        raise UserError(f"launch mode {mode!r}: choose one of {', '.join(MODES)}")
    if nodes < 1:
        raise UserError("--nodes must be at least 1")
    if not re.fullmatch(r"(\d+-)?\d{1,3}(:\d\d){0,2}", time_limit):
        raise UserError(f"--time {time_limit!r}: use Slurm's form, e.g. 30:00, 02:00:00 or 1-00:00:00")
    if gpus_per_node is None:
        per_node = tasks_per_node or max(1, math.ceil(spec.resources.workers / nodes))
        gpus_per_node = spec.resources.gpus_per_worker * per_node
    if tasks_per_node is None:  # one rank per GPU, or the spec's workers spread over the nodes
        tasks_per_node = gpus_per_node or max(1, math.ceil(spec.resources.workers / nodes))
    if tasks_per_node < 1 or gpus_per_node < 0:
        raise UserError("--tasks-per-node must be at least 1 and --gpus-per-node at least 0")
    command = [sys.executable, "-m", "hvdtrain", "train", str(spec_path.resolve()), *overrides]
    fields = {
        "name": spec.name, "nodes": nodes, "tasks_per_node": tasks_per_node,
        "cpus_per_task": cpus_per_task or spec.resources.cpus_per_worker,
        "gpus_per_node": gpus_per_node or None, "time": time_limit, "partition": partition,
        "workdir": Path.cwd(), "mode": mode, "srun_mpi": "pmix" if mode == "mpi" else "none",
        "command": shlex.join(command),
    }
    fields["spec"] = spec_path.resolve()
    lines = []
    for line in template.read_text().splitlines():
        if line.startswith("#%"):  # a note about the template itself
            continue
        names = re.findall(r"{{(\w+)}}", line)
        if any(fields[n] is None for n in names):
            continue
        for n in names:
            line = line.replace("{{%s}}" % n, str(fields[n]))
        lines.append(line)
    return "\n".join(lines) + "\n"


def submit(script: Path, wait: bool) -> int:
    """sbatch the script; with wait, block until the job ends and return its exit status."""
    sbatch = shutil.which("sbatch")
    if not sbatch:
        raise UserError("sbatch not found: run on a Slurm login node, or render the script "
                        "with `hvdtrain render slurm` and submit it there")
    args = [sbatch, "--parsable", *(["--wait"] if wait else []), str(script)]
    proc = subprocess.run(args, capture_output=True, text=True)
    job = proc.stdout.strip().split(";")[0]
    if job:
        print(f"submitted job {job} ({script})", flush=True)
    if proc.returncode != 0 and not (wait and job):
        raise UserError(f"sbatch failed: {proc.stderr.strip() or proc.returncode}")
    if wait:
        print(f"job {job} ended with exit status {proc.returncode}", flush=True)
    return proc.returncode


# -- inside a rank started by srun -------------------------------------------------

def expand_counts(text: str) -> list[int]:
    """Slurm's compressed counts, e.g. SLURM_STEP_TASKS_PER_NODE '2(x3),1' -> [2, 2, 2, 1]."""
    counts = []
    for part in text.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise UserError(f"cannot read Slurm's task counts {text!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def in_srun_step(env: Mapping[str, str]) -> bool:
    """A task of an srun step (not the batch script itself, not another launcher's rank)."""
    other_launcher = "HOROVOD_RANK" in env or "OMPI_COMM_WORLD_SIZE" in env
    return "SLURM_STEP_ID" in env and "SLURM_PROCID" in env and not other_launcher


def prepare_rank(env: dict[str, str] | None = None) -> None:
    """Set up Horovod's environment for this srun task; nothing outside srun."""
    env = os.environ if env is None else env
    if not in_srun_step(env):
        return
    mode = env.get("HVDTRAIN_LAUNCH", "gloo")
    if mode not in MODES:
        raise UserError(f"HVDTRAIN_LAUNCH={mode!r}: choose one of {', '.join(MODES)}")
    if mode == "mpi":
        check_mpi_type(env.get("SLURM_MPI_TYPE", "none"))
        env["HVDTRAIN_EXPECTED_SIZE"] = env["SLURM_NTASKS"]
    else:
        prepare_gloo(env)


def check_mpi_type(mpi_type: str) -> None:
    """Catch the srun --mpi types this MPI cannot start under, before MPI_Init's wall of text."""
    if mpi_type.startswith("pmix"):
        return
    if mpi_type in ("none", ""):
        raise UserError("HVDTRAIN_LAUNCH=mpi but srun started this rank without MPI support "
                        "(--mpi=none): use `srun --mpi=pmix`, or HVDTRAIN_LAUNCH=gloo")
    if not open_mpi_has_pmi():
        raise UserError(f"srun --mpi={mpi_type}: this Open MPI was built without Slurm's "
                        "PMI-1/PMI-2 support, only PMIx: use `srun --mpi=pmix` "
                        "(`srun --mpi=list` shows the types Slurm offers)")


def open_mpi_has_pmi() -> bool:
    ompi_info = shutil.which("ompi_info")
    if not ompi_info:
        return True  # not Open MPI: let MPI itself decide
    out = subprocess.run([ompi_info, "--parsable"], capture_output=True, text=True).stdout
    return bool(re.search(r"^mca:pmix:s[12]:", out, re.MULTILINE))


def default_port(job_id: str, step_id: str) -> int:
    """One port per job step, the same on every rank without talking: 20000-29999."""
    return 20000 + (int(job_id) * 16 + int(step_id)) % 10000


def prepare_gloo(env: dict[str, str]) -> None:
    rank, size = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    local_rank, node = int(env["SLURM_LOCALID"]), int(env["SLURM_NODEID"])
    per_node = expand_counts(env.get("SLURM_STEP_TASKS_PER_NODE") or env["SLURM_TASKS_PER_NODE"])
    if node >= len(per_node):
        raise UserError(f"SLURM_NODEID={node} but the step has {len(per_node)} nodes")
    addr = env.get("HVDTRAIN_RENDEZVOUS_ADDR") or env.get("SLURM_LAUNCH_NODE_IPADDR")
    if not addr:
        raise UserError("no rendezvous address: set HVDTRAIN_RENDEZVOUS_ADDR to rank 0's node address")
    port = int(env.get("HVDTRAIN_RENDEZVOUS_PORT") or default_port(env["SLURM_JOB_ID"], env["SLURM_STEP_ID"]))
    if rank == 0:
        start_rendezvous(addr, port)
    else:
        wait_for(addr, port, float(env.get("HVDTRAIN_START_TIMEOUT", START_TIMEOUT_S)))
    env.update({
        "HOROVOD_CONTROLLER": "gloo", "HOROVOD_CPU_OPERATIONS": "gloo",
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": addr, "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port),
        "HOROVOD_HOSTNAME": env.get("SLURMD_NODENAME") or socket.gethostname(),
        "HOROVOD_RANK": str(rank), "HOROVOD_SIZE": str(size),
        "HOROVOD_LOCAL_RANK": str(local_rank), "HOROVOD_LOCAL_SIZE": str(per_node[node]),
        "HOROVOD_CROSS_RANK": str(sum(1 for n in per_node[:node] if n > local_rank)),
        "HOROVOD_CROSS_SIZE": str(sum(1 for n in per_node if n > local_rank)),
    })
    env.setdefault("HOROVOD_GLOO_IFACE", interface_towards(addr, port))


def start_rendezvous(addr: str, port: int) -> None:
    """Horovod's rendezvous server (the one horovodrun starts) in a thread of rank 0."""
    from horovod.runner.http.http_server import RendezvousHandler, RendezvousHTTPServer
    if addr not in local_addresses():
        raise UserError(f"rank 0 runs on {socket.gethostname()}, which does not have the rendezvous "
                        f"address {addr} (the node srun was started on): start srun from the "
                        "batch script, or set HVDTRAIN_RENDEZVOUS_ADDR to rank 0's node address")
    try:
        server = RendezvousHTTPServer(("0.0.0.0", port), RendezvousHandler, 0)
    except OSError as err:
        raise UserError(f"cannot start the rendezvous server on port {port} ({err.strerror}): "
                        "set HVDTRAIN_RENDEZVOUS_PORT to a free port") from None
    threading.Thread(target=server.serve_forever, name="hvdtrain-rendezvous", daemon=True).start()


def wait_for(addr: str, port: int, timeout: float) -> None:
    """Ranks other than 0 wait for rank 0's server (Horovod retries only 3 x 0.5 s)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((addr, port), timeout=2).close()
            return
        except OSError as err:
            if time.monotonic() > deadline:
                raise UserError(f"rank 0's rendezvous server at {addr}:{port} did not answer within "
                                f"{timeout:.0f}s ({err.strerror or err}): did rank 0 start?") from None
            time.sleep(0.2)


def local_addresses() -> set[str]:
    import psutil
    return {a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family == socket.AF_INET}


def interface_towards(addr: str, port: int) -> str:
    """The network interface this host uses to reach addr: Gloo's HOROVOD_GLOO_IFACE."""
    import psutil
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((addr, port))  # no packet is sent; the kernel picks the route
        local = probe.getsockname()[0]
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == local for a in addrs):
            return name
    raise UserError(f"no network interface holds {local}, the address towards {addr}: "
                    "set HOROVOD_GLOO_IFACE")
