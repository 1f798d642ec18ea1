#!/usr/bin/env python3
"""Throwaway ssh hosts on this machine, for `hvdtrain run -H` across hosts.

    scripts/ssh_hosts.py start DIR [--hosts 2]   # host1, host2: own network, hostname, sshd
    scripts/ssh_hosts.py stop DIR

Each host is a network namespace with an address of its own on a bridge
(10.78.0.1x; this machine is 10.78.0.1) and an sshd in its own UTS namespace
(hostname hostN, an /etc/hosts naming all hosts), sharing the filesystem like a
cluster's nodes. `start` writes
DIR/id_ed25519, the key the hosts accept for root, and prints the hosts as
`-H` wants them. Needs root and openssh-server.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

BRIDGE, SUBNET = "hvdsshbr0", "10.78.0"


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def addr(i: int) -> str:
    return f"{SUBNET}.{10 + i}"


def netns(i: int) -> str:
    return f"hvdsshhost{i}"


def start(d: Path, hosts: int) -> None:
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(sshd).exists():
        raise SystemExit("sshd not found: apt-get install openssh-server")
    d = d.resolve()
    d.mkdir(parents=True, exist_ok=True)
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "id_ed25519"))
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key"))
    (d / "authorized_keys").write_text((d / "id_ed25519.pub").read_text())
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    # each host's /etc/hosts: the hosts know each other by name, as a cluster's nodes do
    (d / "hosts").write_text("127.0.0.1 localhost\n" + "".join(f"{addr(i)} host{i}\n" for i in range(1, hosts + 1)))
    run("ip", "link", "add", BRIDGE, "type", "bridge")
    run("ip", "addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
    run("ip", "link", "set", BRIDGE, "up")
    for i in range(1, hosts + 1):
        run("ip", "netns", "add", netns(i))
        run("ip", "link", "add", f"hvdssh{i}", "type", "veth", "peer", "name", "eth0", "netns", netns(i))
        run("ip", "link", "set", f"hvdssh{i}", "master", BRIDGE, "up")
        run("ip", "netns", "exec", netns(i), "ip", "addr", "add", f"{addr(i)}/24", "dev", "eth0")
        run("ip", "netns", "exec", netns(i), "ip", "link", "set", "eth0", "up")
        run("ip", "netns", "exec", netns(i), "ip", "link", "set", "lo", "up")
        # this machine is the way out, as a cluster's router: the hosts reach the addresses
        # of horovodrun's driver (its rendezvous server) whichever interface they are on
        run("ip", "netns", "exec", netns(i), "ip", "route", "add", "default", "via", f"{SUBNET}.1")
        # horovodrun's ssh trusts new host keys but not changed ones: forget an earlier run's
        run("ssh-keygen", "-R", addr(i), check=False)
        config = d / f"sshd{i}.conf"
        config.write_text(f"ListenAddress {addr(i)}\nHostKey {d / 'host_key'}\n"
                          f"AuthorizedKeysFile {d / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
                          f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
                          f"StrictModes no\nPidFile {d / f'sshd{i}.pid'}\nAcceptEnv *\n")
        run("nsenter", f"--net=/run/netns/{netns(i)}", "unshare", "--uts", "--mount", "sh", "-c",
            f"mount --bind {d / 'hosts'} /etc/hosts && hostname host{i} && "
            f"exec {sshd} -f {config} -E {d / f'sshd{i}.log'}")
    for i in range(1, hosts + 1):  # sshd daemonises: wait until it answers
        deadline = time.monotonic() + 30
        while run("ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o",
                  f"UserKnownHostsFile={d / 'known_hosts'}", "-i", str(d / "id_ed25519"), addr(i),
                  "hostname", check=False).stdout.strip() != f"host{i}":
            if time.monotonic() > deadline:
                raise SystemExit(f"sshd on {addr(i)} does not answer; see {d / f'sshd{i}.log'}")
            time.sleep(0.2)
    (d / "hosts.json").write_text(json.dumps({"hosts": hosts}))
    print(",".join(f"{addr(i)}:1" for i in range(1, hosts + 1)))


def stop(d: Path) -> None:
    d = d.resolve()
    info = json.loads((d / "hosts.json").read_text()) if (d / "hosts.json").exists() else {"hosts": 4}
    for i in range(1, info["hosts"] + 1):
        pid = d / f"sshd{i}.pid"
        if pid.exists():
            run("kill", pid.read_text().strip(), check=False)
        run("ip", "netns", "del", netns(i), check=False)
    run("ip", "link", "del", BRIDGE, check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--hosts", type=int, default=2)
    args = parser.parse_args()
    if args.action == "start":
        start(args.dir, args.hosts)
    else:
        stop(args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
