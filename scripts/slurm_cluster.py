#!/usr/bin/env python3
"""A throwaway Slurm cluster on this machine, from Debian's slurm-wlm and munge.

    scripts/slurm_cluster.py start DIR            # one node (node1) on 127.0.0.1
    scripts/slurm_cluster.py start DIR --nodes 2  # node1, node2 in network namespaces
    scripts/slurm_cluster.py stop DIR

Everything lives in DIR (config, munge key and socket, state, logs); `start`
prints the `SLURM_CONF=...` to export for sbatch/srun/sinfo and waits until
sinfo shows every node idle. With --nodes N each slurmd runs in a network
namespace and UTS namespace of its own (its own address on a veth bridge and
its own hostname, /etc/hosts and PMIx directory), so a job spans N "hosts" that
share the filesystem, like a cluster's nodes. Needs root.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BRIDGE, SUBNET = "hvdbr0", "10.77.0"
CONTROLLER_ADDR = f"{SUBNET}.1"


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def node_addr(i: int) -> str:
    return f"{SUBNET}.{10 + i}"


def netns_name(i: int) -> str:
    return f"hvdnode{i}"


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def slurm_conf(d: Path, nodes: int, netns: bool, cpus: int, memory_mb: int) -> str:
    ctl_port, node_port = free_ports(2)
    ctl_addr = CONTROLLER_ADDR if netns else "127.0.0.1"
    node_lines = [f"NodeName=node{i} NodeAddr={node_addr(i) if netns else '127.0.0.1'} "
                  f"CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN" for i in range(1, nodes + 1)]
    return "\n".join([
        "ClusterName=hvdtrain",
        f"SlurmctldHost={socket.gethostname()}({ctl_addr})",  # slurmctld checks its host name
        "MailProg=/bin/true",
        f"SlurmctldPort={ctl_port}",
        f"SlurmdPort={node_port}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={d}/munge.socket",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"StateSaveLocation={d}/state",
        f"SlurmdSpoolDir={d}/spool-%n",
        f"SlurmctldPidFile={d}/slurmctld.pid",
        f"SlurmdPidFile={d}/slurmd-%n.pid",
        f"SlurmctldLogFile={d}/slurmctld.log",
        f"SlurmdLogFile={d}/slurmd-%n.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "MpiDefault=none",
        "ReturnToService=2",
        "JobCompType=jobcomp/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "MinJobAge=3600",
        "KillWait=5",
        "SlurmdTimeout=60",
        "InactiveLimit=0",
        *node_lines,
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


def start_netns(d: Path, nodes: int) -> None:
    run("ip", "link", "add", BRIDGE, "type", "bridge")
    run("ip", "addr", "add", f"{CONTROLLER_ADDR}/24", "dev", BRIDGE)
    run("ip", "link", "set", BRIDGE, "up")
    hosts = "127.0.0.1 localhost\n" + f"{CONTROLLER_ADDR} ctl\n" + "".join(
        f"{node_addr(i)} node{i}\n" for i in range(1, nodes + 1))
    for i in range(1, nodes + 1):
        ns = netns_name(i)
        run("ip", "netns", "add", ns)
        run("ip", "link", "add", f"hvdveth{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
        run("ip", "link", "set", f"hvdveth{i}", "master", BRIDGE, "up")
        run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{node_addr(i)}/24", "dev", "eth0")
        run("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
        run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
    (d / "hosts").write_text(hosts)  # each node's /etc/hosts


def stop_netns(nodes: int) -> None:
    for i in range(1, nodes + 1):
        run("ip", "netns", "del", netns_name(i), check=False)
    run("ip", "link", "del", BRIDGE, check=False)


def wait_idle(env: dict, nodes: int, timeout: float = 90) -> None:
    deadline, states = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=env, capture_output=True, text=True)
        states = proc.stdout.strip() or proc.stderr.strip()
        lines = [ln.split() for ln in proc.stdout.splitlines() if ln.strip()]
        if proc.returncode == 0 and len(lines) == nodes and all(s == "idle" for _, s in lines):
            return
        time.sleep(1)
    raise SystemExit(f"Slurm nodes not idle after {timeout:.0f}s: {states}")


def start(d: Path, nodes: int, netns: bool) -> None:
    d = d.resolve()
    d.mkdir(parents=True, exist_ok=True)
    (d / "state").mkdir(exist_ok=True)
    key = d / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o400)
    cpus = max(1, os.cpu_count() or 1)
    memory_mb = max(500, int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 // (2 * nodes)))
    conf = d / "slurm.conf"
    conf.write_text(slurm_conf(d, nodes, netns, cpus, memory_mb))
    (d / "pmix").mkdir(exist_ok=True)
    (d / "mpi.conf").write_text(f"PMIxCliTmpDirBase={d}/pmix\n")
    (d / "cluster.json").write_text(json.dumps({"nodes": nodes, "netns": netns}))
    env = {**os.environ, "SLURM_CONF": str(conf)}

    run("munged", "--force", f"--key-file={key}", f"--socket={d}/munge.socket",
        f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log", f"--seed-file={d}/munge.seed")
    if netns:
        start_netns(d, nodes)
    subprocess.run(["slurmctld", "-i", "-f", str(conf)], env=env, check=True)
    for i in range(1, nodes + 1):
        daemon = ["slurmd", "-N", f"node{i}", "-f", str(conf)]
        if netns:
            # Own network, hostname and /etc/hosts: a separate host as far as the job can
            # tell. nsenter rather than `ip netns exec`, which remounts /sys without the
            # cgroup hierarchy that slurmd needs.
            # Each node has its own PMIx directory (PMIxCliTmpDirBase in mpi.conf), as
            # each host has its own /tmp; everything else is shared like a cluster filesystem.
            node_pmix = d / f"node{i}-pmix"
            node_pmix.mkdir(exist_ok=True)
            node_pmix.chmod(0o1777)
            daemon = ["nsenter", f"--net=/run/netns/{netns_name(i)}", "unshare", "--mount", "--uts",
                      "sh", "-c", f"mount --bind {d}/hosts /etc/hosts && mount --bind {node_pmix} {d}/pmix && "
                                  f"hostname node{i} && exec {' '.join(daemon)}"]
        subprocess.run(daemon, env=env, check=True)
    wait_idle(env, nodes)
    print(f"SLURM_CONF={conf}")


def stop(d: Path) -> None:
    d = d.resolve()
    info = json.loads((d / "cluster.json").read_text()) if (d / "cluster.json").exists() else {}
    pids = sorted(d.glob("slurmd-*.pid")) + [d / "slurmctld.pid", d / "munged.pid"]
    for pid_file in pids:
        try:
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        except (OSError, ValueError):
            pass
    # daemons of a start that failed half-way may have no pid file: find them by their config
    for marker in (str(d / "slurm.conf"), str(d / "munge.socket")):
        subprocess.run(["pkill", "-f", marker], capture_output=True)
    time.sleep(1)
    if info.get("netns"):
        stop_netns(info["nodes"])


def main() -> int:
    top = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("action", choices=["start", "stop"])
    top.add_argument("dir", type=Path)
    top.add_argument("--nodes", type=int, default=1,
                     help="1: one node on 127.0.0.1; 2 or more: one network namespace per node")
    args = top.parse_args()
    if os.geteuid() != 0:
        print("slurm_cluster.py needs root (daemons run as root; namespaces need CAP_NET_ADMIN)",
              file=sys.stderr)
        return 2
    if args.action == "start":
        try:
            start(args.dir, args.nodes, netns=args.nodes > 1)
        except (subprocess.CalledProcessError, SystemExit) as err:
            detail = getattr(err, "stderr", None) or str(err)
            print(f"could not start the Slurm cluster: {detail}", file=sys.stderr)
            stop(args.dir)
            return 1
    else:
        stop(args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
