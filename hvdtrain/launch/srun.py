"""Inside a rank that srun started, before Horovod initialises: Horovod's
environment from Slurm's. Rank and size never come from Open MPI's variables.

- gloo: rank, size, local rank and node from SLURM_* variables; rank 0 starts
  Horovod's own rendezvous server (horovod.runner) on the node srun runs on,
  the others wait for it.
- mpi: Horovod's MPI controller takes rank and size from MPI (srun --mpi=pmix);
  here only the MPI type is checked and the size srun started is returned.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from typing import Mapping

from ..errors import UserError

MODES = ("gloo", "mpi")


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


def prepare_rank(env: dict[str, str], start_timeout: float) -> int | None:
    """Set up Horovod's environment for this srun task; nothing outside srun.
    Returns the number of ranks srun started when Horovod learns its size from
    MPI (so ranks that each came up alone can stop before training), else None.
    start_timeout: how long a rank waits for rank 0's rendezvous server."""
    if not in_srun_step(env):
        return None
    mode = env.get("HVDTRAIN_LAUNCH", "gloo")
    if mode not in MODES:
        raise UserError(f"HVDTRAIN_LAUNCH={mode!r}: choose one of {', '.join(MODES)}")
    if mode == "mpi":
        check_mpi_type(env.get("SLURM_MPI_TYPE", "none"))
        return int(env["SLURM_NTASKS"])
    prepare_gloo(env, start_timeout)
    return None


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


def prepare_gloo(env: dict[str, str], start_timeout: float) -> None:
    rank, size = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    local_rank, node = int(env["SLURM_LOCALID"]), int(env["SLURM_NODEID"])
    per_node = expand_counts(env.get("SLURM_STEP_TASKS_PER_NODE") or env["SLURM_TASKS_PER_NODE"])
    if node >= len(per_node):
        raise UserError(f"SLURM_NODEID={node} but the step has {len(per_node)} nodes")
    addr = env.get("HVDTRAIN_RENDEZVOUS_ADDR") or env.get("SLURM_LAUNCH_NODE_IPADDR")
    if not addr:
        raise UserError("no rendezvous address: set HVDTRAIN_RENDEZVOUS_ADDR to rank 0's node address")
    port = int(env.get("HVDTRAIN_RENDEZVOUS_PORT") or default_port(env["SLURM_JOB_ID"], env["SLURM_STEP_ID"]))
    secret = env.get(SECRET)
    if not secret:
        raise UserError(f"{SECRET} is not set: the rendezvous answers only requests signed with the job's "
                        "secret (the scripts of `hvdtrain render slurm` set it); before srun: export "
                        f"{SECRET}=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n')")
    if rank == 0:
        start_rendezvous(addr, port, secret)
    else:
        wait_for(addr, port, start_timeout)
    env.update({
        "HOROVOD_GLOO_RENDEZVOUS_SECRET": secret,  # Horovod's requests signed with it (a build fix)
        "HOROVOD_CONTROLLER": "gloo", "HOROVOD_CPU_OPERATIONS": "gloo",
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": addr, "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port),
        "HOROVOD_HOSTNAME": env.get("SLURMD_NODENAME") or socket.gethostname(),
        "HOROVOD_RANK": str(rank), "HOROVOD_SIZE": str(size),
        "HOROVOD_LOCAL_RANK": str(local_rank), "HOROVOD_LOCAL_SIZE": str(per_node[node]),
        "HOROVOD_CROSS_RANK": str(sum(1 for n in per_node[:node] if n > local_rank)),
        "HOROVOD_CROSS_SIZE": str(sum(1 for n in per_node if n > local_rank)),
    })
    env.setdefault("HOROVOD_GLOO_IFACE", interface_towards(addr, port))


SECRET = "HVDTRAIN_RENDEZVOUS_SECRET"
SIGNATURE = "X-Hvdtrain-Signature"


def signature(secret: str, method: str, path: str, body: bytes) -> str:
    """What Horovod's ranks send with each rendezvous request (hvdtrain's build)."""
    return hmac.new(secret.encode(), f"{method} {path}\n".encode() + body, hashlib.sha256).hexdigest()


def signed_handler(secret: str):
    """Horovod's rendezvous handler that answers only requests signed with the job's secret;
    the others get 403 and a line on rank 0's stderr."""
    import io

    from horovod.runner.http.http_server import RendezvousHandler

    class Signed(RendezvousHandler):
        def signed(self) -> bool:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            self.rfile = io.BytesIO(body)  # read again by Horovod's PUT
            expected = signature(secret, self.command, self.path, body)
            if hmac.compare_digest(self.headers.get(SIGNATURE, ""), expected):
                return True
            print(f"hvdtrain: rendezvous: refused {self.command} {self.path} from {self.client_address[0]}: "
                  f"not signed with this job's secret", file=sys.stderr, flush=True)
            self.send_status_code(403)
            return False

        def do_GET(self):
            if self.signed():
                super().do_GET()

        def do_PUT(self):
            if self.signed():
                super().do_PUT()

        def do_DELETE(self):
            if self.signed():
                super().do_DELETE()

    return Signed


def start_rendezvous(addr: str, port: int, secret: str) -> None:
    """Horovod's rendezvous server (the one horovodrun starts) in a thread of rank 0,
    answering only the job's signed requests."""
    from horovod.runner.http.http_server import RendezvousHTTPServer
    if addr not in local_addresses():
        raise UserError(f"rank 0 runs on {socket.gethostname()}, which does not have the rendezvous "
                        f"address {addr} (the node srun was started on): start srun from the "
                        "batch script, or set HVDTRAIN_RENDEZVOUS_ADDR to rank 0's node address")
    try:
        server = RendezvousHTTPServer(("0.0.0.0", port), signed_handler(secret), 0)
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
