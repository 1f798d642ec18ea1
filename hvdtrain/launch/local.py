"""`hvdtrain run`: horovodrun starting the ranks, on this machine (`localhost:N`) or
on the hosts named with -H / --hostfile, through ssh as horovodrun does; Gloo by
default, or Open MPI with --mpi."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import EXIT_FAILED, EXIT_HUNG, EXIT_PEER, EXIT_USAGE, EXIT_WRITE, UserError
from ..spec import ElasticSpec, JobSpec, ResourcesSpec
from ..train import preempt
from .common import Launcher, Verb, is_rank, rank_command


def horovodrun_path() -> str:
    beside = Path(sys.executable).parent / "horovodrun"
    found = str(beside) if beside.exists() else shutil.which("horovodrun")
    if not found:
        raise UserError("horovodrun not found: build and install Horovod with `hvdtrain build-horovod`")
    return found


@dataclass
class Hosts:
    """Where the ranks run: horovodrun's -H list or hostfile, and how it reaches them."""
    hosts: str | None = None  # "a:4,b:4"
    hostfile: Path | None = None  # lines "a slots=4" (or "a:4")
    mpi: bool = False  # Open MPI's mpirun instead of Gloo
    ssh_port: int | None = None
    ssh_identity_file: Path | None = None
    network_interfaces: str | None = None  # "eth0,eth1"

    def items(self) -> list[str]:
        """The hosts as "host:slots" items, from -H or the hostfile ("a slots=4" or "a:4"
        lines); none for this machine alone."""
        if self.hosts is not None:
            return self.hosts.split(",")
        if self.hostfile is not None:
            if not self.hostfile.is_file():
                raise UserError(f"--hostfile {str(self.hostfile)!r}: no such file")
            lines = [ln.split("#")[0].strip() for ln in self.hostfile.read_text().splitlines()]
            return [ln.replace(" slots=", ":") for ln in lines if ln]
        return []

    def slots(self) -> int | None:
        """Ranks the hosts hold in all, or None for this machine alone."""
        if self.hosts is None and self.hostfile is None:
            return None
        where = "-H" if self.hosts is not None else f"--hostfile {self.hostfile}"
        return sum(slot_count(item, where) for item in self.items())

    def arguments(self, np: int) -> list[str]:
        where = (["-H", self.hosts] if self.hosts else ["--hostfile", str(self.hostfile)] if self.hostfile
                 else ["-H", f"localhost:{np}"])
        ssh = [*(["--ssh-port", str(self.ssh_port)] if self.ssh_port else []),
               *(["--ssh-identity-file", str(self.ssh_identity_file)] if self.ssh_identity_file else []),
               *(["--network-interfaces", self.network_interfaces] if self.network_interfaces else [])]
        return [*where, *ssh, "--mpi" if self.mpi else "--gloo"]


def slot_count(item: str, where: str) -> int:
    host, sep, slots = item.strip().rpartition(":")
    if not (sep and host and slots.isdigit() and int(slots) > 0):
        raise UserError(f"{where}: {item.strip()!r} is not host:slots (e.g. node1:4)")
    return int(slots)


def horovodrun_command(spec_path: str, overrides: list[str], np: int, start_timeout: int,
                       elastic: ElasticSpec | None = None, hosts: Hosts | None = None) -> list[str]:
    hosts = hosts or Hosts()
    if elastic is None:
        where = hosts.arguments(np)
    else:  # the discovery script names the hosts, now and as they change
        where = ["--min-np", str(elastic.min_workers), "--max-np", str(elastic.max_workers),
                 "--host-discovery-script", str(elastic.discovery.resolve()), "--gloo",
                 # Horovod's elastic driver waits up to this long for hosts (default 600 s, silently)
                 "--elastic-timeout", str(start_timeout)]
        if hosts.network_interfaces:
            where += ["--network-interfaces", hosts.network_interfaces]
        elif all_local(discovered_hosts(elastic)):
            # Horovod's elastic Gloo driver finds the interfaces the hosts share by probing from
            # host to host, so it waits for two hosts; ranks on this machine alone talk over
            # the loopback interface, and naming it skips the wait.
            where += ["--network-interfaces", "lo"]
    return [horovodrun_path(), "-np", str(np), *where,
            "--start-timeout", str(start_timeout), *rank_command(spec_path, overrides)]


def discovered_hosts(elastic: ElasticSpec) -> list[str]:
    """The hosts the discovery script names now ("host:slots" lines)."""
    try:
        out = subprocess.run([str(elastic.discovery.resolve())], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise UserError(f"horovod.elastic.discovery: {elastic.discovery} failed to run: {err}") from None
    if out.returncode != 0:
        raise UserError(f"horovod.elastic.discovery: {elastic.discovery} exited with {out.returncode}: "
                        f"{out.stderr.strip()[:300]}")
    return [line.split(":")[0].strip() for line in out.stdout.splitlines() if line.strip()]


def all_local(hosts: list[str]) -> bool:
    """Every host is this machine (so the ranks can use the loopback interface)."""
    import socket
    local = {"localhost", socket.gethostname(), socket.getfqdn()}
    return bool(hosts) and all(h in local or h.startswith("127.") for h in hosts)


def remote_hosts(hosts: Hosts) -> list[str]:
    """The hosts of -H / --hostfile that are not this machine."""
    names = list(dict.fromkeys(item.strip().rpartition(":")[0] for item in hosts.items()))
    return [name for name in names if not all_local([name])]


def rank_environment(resources: ResourcesSpec) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(resources.cpus_per_worker))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def launch(spec: JobSpec, spec_path: str, overrides: list[str], np: int, hosts: Hosts | None = None) -> int:
    """Run the ranks with their output streaming through; return the exit code:
    0, the first failed rank's status when it is a usage error (2), else 1.

    horovodrun's own lines (not prefixed [rank]) are kept back: on failure they
    hold its traceback, replaced here by one line naming the rank that failed
    first. The ranks' own errors, prefixed [rank], are shown as they come.
    """
    elastic = spec.horovod.elastic
    if elastic is not None and not (elastic.discovery.is_file() and os.access(elastic.discovery, os.X_OK)):
        raise UserError(f"horovod.elastic.discovery: {str(elastic.discovery)!r} is not an executable file")
    if elastic is not None and hosts is not None and (hosts.hosts or hosts.hostfile or hosts.mpi):
        raise UserError("-H, --hostfile and --mpi do not apply to elastic training: the discovery "
                        "script names the hosts, and elastic Horovod runs on Gloo")
    cmd = horovodrun_command(spec_path, overrides, np, spec.horovod.start_timeout_seconds,
                             spec.horovod.elastic, hosts)
    # its own session: a Ctrl-C reaches this process, which stops the job (Stopper)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=rank_environment(spec.resources), start_new_session=True)
    launcher_lines = []
    with Stopper(proc, hosts, [spec_path, *overrides]) as stopper:
        for line in proc.stdout:
            match = RANK_LINE.match(line)
            if match:
                (sys.stdout if match.group(1) == "stdout" else sys.stderr).write(line)
            else:
                launcher_lines.append(line)
        code = proc.wait()
    if code == 0 and not stopper.signal:
        return 0
    # elastic: workers may fail and be replaced; the failure that ended the job is the last
    rank, status = first_failure(launcher_lines[::-1] if spec.horovod.elastic else launcher_lines)
    if stopper.signal or status == preempt.EXIT_PREEMPTED:
        return stopped(spec, stopper.signal)
    waited = next((ln for ln in launcher_lines if "Timed out waiting for" in ln), None)
    if rank is None and waited is not None:
        print(f"hvdtrain: training failed: no workers within horovod.start_timeout_seconds "
              f"({spec.horovod.start_timeout_seconds} s): Horovod timed out "
              f"{waited.split('Timed out', 1)[1].strip().replace('{activity}', 'hosts with enough slots')}",
              file=sys.stderr)
        return EXIT_FAILED
    if rank is None:
        tail = "".join(launcher_lines[-5:]).rstrip()
        print(f"hvdtrain: training failed: horovodrun exited with status {code}\n{tail}", file=sys.stderr)
        return EXIT_FAILED
    # a signal shows as a negative status, or as 128 + signal from the shell horovodrun uses
    killed_by = -status if status < 0 else status - 128 if 128 < status <= 128 + 64 else None
    if killed_by:
        on = "localhost" if hosts is None or not (hosts.hosts or hosts.hostfile) else "its host"
        how = f"was killed by signal {killed_by} ({signal_name(killed_by)}) on {on}"
        where = "its last lines are above"
    elif status == EXIT_HUNG:
        how, where = "ended the job: a rank made no progress", "the line 'hvdtrain: hung:' names it"
    else:
        how, where = f"exited with status {status}", "its error is above"
    print(f"hvdtrain: training failed: rank {rank} {how} ({where}, in lines starting [{rank}])",
          file=sys.stderr)
    return status if status in (EXIT_USAGE, EXIT_WRITE, EXIT_HUNG) else EXIT_FAILED


class Stopper:
    """SIGTERM or SIGINT to `hvdtrain run` while the job runs: every rank gets SIGTERM,
    their stop path (the ranks agree to stop after a step, rank 0 writes a checkpoint,
    each exits EXIT_PREEMPTED): those on this machine directly, those on other hosts (-H,
    --hostfile) through ssh as horovodrun reached them, found by their exact rank
    arguments; after STOP_GRACE_SECONDS whatever is left of horovodrun and its processes
    here gets SIGKILL (its ssh sessions with them). A second signal kills at once."""

    def __init__(self, proc: subprocess.Popen, hosts: Hosts | None = None, arguments: list[str] = ()):
        self.proc, self.signal, self.stopping = proc, 0, None
        self.hosts, self.arguments = hosts, list(arguments)
        self.previous: dict[int, object] = {}

    def __enter__(self):
        for number in (signal.SIGTERM, signal.SIGINT):
            self.previous[number] = signal.signal(number, self.asked)
        return self

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        if self.stopping is not None:
            self.stopping.join()
        return False

    def asked(self, number: int, frame) -> None:
        import threading
        if self.signal:  # asked twice
            self.kill(self.processes())
            return
        self.signal = number
        print(f"hvdtrain: {signal_name(number)}: stopping the ranks (a checkpoint after their current "
              f"step; all gone within {STOP_GRACE_SECONDS} s)", file=sys.stderr, flush=True)
        self.stopping = threading.Thread(target=self.stop, daemon=True)
        self.stopping.start()

    def processes(self) -> list:
        import psutil
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        import psutil
        tree = self.processes()
        ranks = [p for p in tree if is_rank(p)]
        for rank in ranks:
            try:
                rank.terminate()
            except psutil.NoSuchProcess:
                pass
        began = time.monotonic()
        remote = [subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL) for command in self.remote_stops()]
        # horovodrun ends once every rank has (here or through its ssh sessions to them)
        try:
            self.proc.wait(timeout=STOP_GRACE_SECONDS - 2)
        except subprocess.TimeoutExpired:
            pass
        for process in remote:
            try:
                process.wait(timeout=max(0.0, STOP_GRACE_SECONDS - 2 - (time.monotonic() - began)))
            except subprocess.TimeoutExpired:
                process.kill()
        self.kill(tree + self.processes())

    def remote_stops(self) -> list[list[str]]:
        """One ssh command per host other than this one: SIGTERM to the job's ranks there."""
        hosts = self.hosts
        if hosts is None or not (hosts.hosts or hosts.hostfile):
            return []
        names = remote_hosts(hosts)
        ssh = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "ConnectTimeout=5",
               *(["-p", str(hosts.ssh_port)] if hosts.ssh_port else []),
               *(["-i", str(hosts.ssh_identity_file)] if hosts.ssh_identity_file else [])]
        import shlex
        code = ("import sys; from hvdtrain.launch.common import terminate_ranks; "
                "print(len(terminate_ranks(sys.argv[2:], sys.argv[1])), 'rank(s) asked to stop')")
        return [[*ssh, name, shlex.join([sys.executable, "-c", code, name, *self.arguments])] for name in names]

    @staticmethod
    def kill(processes: list) -> None:
        import psutil
        for process in processes:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(processes, timeout=2)


STOP_GRACE_SECONDS = 10


def stopped(spec: JobSpec, number: int) -> int:
    """The job was stopped (a signal to this process, or to the ranks): what was kept."""
    from ..train import checkpoint
    marker = spec.run_dir / preempt.MARKER
    latest = checkpoint.list_checkpoints(spec.checkpoint.dir)
    where = f"after {marker.read_text().strip()}" if marker.exists() else "before a checkpoint was agreed"
    print(f"hvdtrain: stopped{' by ' + signal_name(number) if number else ''} {where}; "
          f"{'latest checkpoint ' + str(latest[-1]) if latest else 'no checkpoint yet'}; the same command "
          f"resumes", file=sys.stderr)
    return preempt.EXIT_PREEMPTED


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown signal"


RANK_LINE = re.compile(r"^\[\d+\]<(stdout|stderr)>:")
FAILED_PROCESS = re.compile(r"Process (\d+) exit with status code (-?\d+)")


def first_failure(launcher_lines: list[str]) -> tuple[int | None, int | None]:
    """(rank, status) of the first rank that failed, passing over ranks that only stopped
    because another failed (EXIT_PEER) while one that failed itself is listed."""
    failures = [(int(m.group(1)), int(m.group(2))) for m in map(FAILED_PROCESS.search, launcher_lines)
                if m and m.group(2) != "0"]
    own = [f for f in failures if f[1] != EXIT_PEER]
    return (own or failures or [(None, None)])[0]


def run_arguments(parser) -> None:
    from .common import spec_arguments
    spec_arguments(parser)
    parser.add_argument("-np", type=int, metavar="N", help="ranks (default: resources.workers)")
    parser.add_argument("-H", "--hosts", metavar="HOST:SLOTS,...",
                        help="run the ranks on these hosts through ssh, as horovodrun does (default: "
                             "localhost); -np defaults to the slots in all")
    parser.add_argument("--hostfile", help="hosts from a file, one 'HOST slots=N' per line")
    parser.add_argument("--mpi", action="store_true", help="Open MPI's mpirun instead of Gloo")
    parser.add_argument("--ssh-port", type=int, help="ssh port of the hosts")
    parser.add_argument("--ssh-identity-file", help="ssh key for the hosts")
    parser.add_argument("--network-interfaces", metavar="NIC,...", help="interfaces for the ranks' traffic")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="one run per value, one after another, each in its own directory under the "
                             "spec's output (repeatable: every combination); `hvdtrain status OUTPUT` "
                             "lists them, best first")
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("-q", "--quiet", action="store_true", help="only the final line (log.level=quiet)")
    loudness.add_argument("-v", "--verbose", action="store_true", help="also data and checkpoint details "
                                                                        "(log.level=verbose)")


def run(args) -> int:
    """`hvdtrain run`: check the spec, start the ranks, say how the run ended."""
    from ..backends import keras_environment, require_framework
    from ..spec import load_spec
    if args.np is not None and args.np < 1:
        raise UserError("-np must be at least 1")
    if args.quiet or args.verbose:  # an override, so that every rank gets it
        args.overrides = [*args.overrides, f"log.level={'quiet' if args.quiet else 'verbose'}"]
    spec = load_spec(args.spec, args.overrides)  # invalid specs stop here, before any launch
    require_framework(spec.backend)
    if spec.entry is not None:
        keras_environment(spec.entry.keras)
    if args.hosts and args.hostfile:
        raise UserError("give -H or --hostfile, not both")
    hosts = Hosts(args.hosts, Path(args.hostfile) if args.hostfile else None, args.mpi, args.ssh_port,
                  Path(args.ssh_identity_file) if args.ssh_identity_file else None, args.network_interfaces)
    ranks = args.np or hosts.slots() or spec.resources.workers
    if args.sweep:
        return run_sweep(args, ranks, hosts)
    return run_one(spec, args.spec, args.overrides, ranks, hosts)


def run_one(spec: JobSpec, spec_path: str, overrides: list[str], ranks: int, hosts: Hosts) -> int:
    import json

    from ..train.metrics import final_metrics
    os.environ["HVDTRAIN_LAUNCHED_AT"] = str(time.time())  # the ranks' start-up is timed from here
    code = launch(spec, spec_path, overrides, ranks, hosts)
    if code == 0 and spec.entry is not None:
        print(f"{spec.name}: {spec.entry.script or spec.entry.module} finished on {ranks} ranks")
    summary = spec.run_dir / "summary.json"
    if code == 0 and spec.entry is None and summary.exists():
        final = json.loads(summary.read_text())["final"]
        print(f"{spec.name}: {final_metrics(spec.task, final)} after {final['epoch']} epochs; "
              f"run dir {spec.output}")
    return code


def run_sweep(args, ranks: int, hosts: Hosts) -> int:
    """The sweep's runs one after another (a failed run does not stop the others); the
    table of all at the end; the first failure's exit status."""
    from ..spec import load_spec
    from . import sweep
    base, runs = sweep.plan(args.spec, args.overrides, args.sweep)
    directory = sweep.write_plan(base, runs, args.spec, args.overrides, "local")
    codes = []
    for number, one in enumerate(runs, start=1):
        print(f"sweep run {number}/{len(runs)}: {one.name}", flush=True)
        overrides = [*args.overrides, *one.overrides]
        codes.append(run_one(load_spec(args.spec, overrides), args.spec, overrides, ranks, hosts))
    print(sweep.table(directory), flush=True)
    failed = [(one.name, code) for one, code in zip(runs, codes) if code]
    if failed:
        print(f"{len(failed)} of {len(runs)} runs failed: " + ", ".join(f"{n} (exit {c})" for n, c in failed),
              file=sys.stderr)
    return failed[0][1] if failed else 0


LAUNCHER = Launcher(name="local", verbs=(
    Verb(path=("run",), help="train through horovodrun: N ranks here, or on the -H hosts (Gloo, or --mpi)",
         arguments=run_arguments, call=run),
))
