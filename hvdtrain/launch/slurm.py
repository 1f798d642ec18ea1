"""Slurm, on the login node: sbatch scripts rendered from the package's
templates/hvdtrain.sbatch, and their submission. What runs inside a rank that
srun started is `hvdtrain.launch.srun`.

Two launch modes (HVDTRAIN_LAUNCH, written into the script):
- mpi: `srun --mpi=pmix`; Horovod's MPI controller takes rank and size from MPI.
- gloo: ranks from SLURM_* variables, and Horovod's own rendezvous server
  (horovod.runner) started by rank 0, on the node srun runs on.
"""
from __future__ import annotations

import json
import math
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from ..errors import UserError
from ..spec import JobSpec
from ..train import preempt
from .common import Launcher, Verb, emit, rank_command, template
from .srun import MODES, prepare_rank
from .sweep import SWEEP_FILE, SweepRun

TEMPLATE = "hvdtrain.sbatch"


def render(spec: JobSpec, spec_path: Path, overrides: list[str], *, nodes: int = 1,
           tasks_per_node: int | None = None, gpus_per_node: int | None = None,
           cpus_per_task: int | None = None, time_limit: str = "01:00:00",
           partition: str | None = None, mode: str = "gloo", account: str | None = None,
           qos: str | None = None, mem: str | None = None, constraint: str | None = None,
           exclusive: bool = False, sbatch_args: list[str] = (), container_image: str | None = None,
           container_mounts: str | None = None, sweep: list[SweepRun] = (), array_limit: int | None = None) -> str:
    """The template with its {{...}} fields filled; lines of empty fields are dropped,
    and {{#flag}} ... {{/flag}} blocks ({{^flag}}: where it is off) kept or dropped. A
    sweep's runs become one job array: task i runs sweep[i] (its overrides after
    `overrides`), at most array_limit at a time."""
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
    if array_limit is not None and (not sweep or array_limit < 1):
        raise UserError("--array-limit: with --sweep, and at least 1")
    command = shlex.join(rank_command(spec_path.resolve(), overrides))
    marker = shlex.quote(str((Path.cwd() / spec.run_dir / preempt.MARKER).resolve()))
    if sweep:  # each task adds its run's overrides; its stop marker is in its run directory
        command += ' "${run_args[@]}"'
        marker = '"$run_marker"'
    fields = {
        "name": spec.name, "nodes": nodes, "tasks_per_node": tasks_per_node,
        "cpus_per_task": cpus_per_task or spec.resources.cpus_per_worker,
        "gpus_per_node": gpus_per_node or None, "time": time_limit, "partition": partition,
        "workdir": Path.cwd(), "mode": mode, "srun_mpi": "pmix" if mode == "mpi" else "none",
        "command": command, "account": account, "qos": qos, "mem": mem,
        "constraint": constraint, "exclusive": "" if exclusive else None,
        "sbatch_args": "\n".join(f"#SBATCH {shlex.quote(a)}" for a in sbatch_args) or None,
        "container": "".join(f" {o}" for o in (
            f"--container-image={shlex.quote(container_image)}" if container_image else "",
            f"--container-mounts={shlex.quote(container_mounts)}" if container_mounts else "") if o),
        "signal_seconds": spec.slurm.signal_seconds, "max_restarts": spec.slurm.max_restarts,
        "marker": marker, "exit_preempted": preempt.EXIT_PREEMPTED,
        "array": f"0-{len(sweep) - 1}" + (f"%{array_limit}" if array_limit else "") if sweep else None,
        "log_pattern": "slurm-%x-%A_%a.out" if sweep else "slurm-%x-%j.out",
        "sweep_dir": Path.cwd() / spec.run_dir,
        "sweep_cases": "\n".join(
            f"    {i}) run_args=({shlex.join(run.overrides)}); "
            f"run_marker={shlex.quote(str((Path.cwd() / run.output / preempt.MARKER).resolve()))} ;;"
            for i, run in enumerate(sweep)),
    }
    flags = {"requeue": spec.slurm.requeue, "sweep": bool(sweep)}
    for arg in sbatch_args:
        if not arg.startswith("--"):
            raise UserError(f"--sbatch-arg {arg!r}: give an sbatch option such as --mail-type=END")
    fields["spec"] = spec_path.resolve()
    lines, keep = [], []
    for line in template(TEMPLATE).splitlines():
        if line.startswith("#%"):  # a note about the template itself
            continue
        block = re.fullmatch(r"{{([#^/])(\w+)}}", line)
        if block:  # {{#flag}} / {{^flag}} open a block kept where the flag is on / off
            sign, flag = block.groups()
            if sign == "/":
                keep.pop()
            else:
                keep.append(flags[flag] == (sign == "#"))
            continue
        if not all(keep):
            continue
        names = re.findall(r"{{(\w+)}}", line)
        if any(fields[n] is None for n in names):
            continue
        for n in names:
            line = line.replace("{{%s}}" % n, str(fields[n]))
        lines.append(line)
    return "\n".join(lines) + "\n"


JOB_RECORD = "slurm-job.json"  # in the run directory: the job `hvdtrain status` and `logs` look at
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
        "BOOT_FAIL", "DEADLINE")


def submit(script: Path, wait: bool, run_dir: Path | None = None, name: str | None = None,
           sweep: list[SweepRun] = ()) -> int:
    """sbatch the script; with wait, block until the job ends and return its exit status.
    The job id and its log are recorded in run_dir for `hvdtrain status` and `logs`; a
    sweep's array task i in sweep[i]'s run directory as well."""
    sbatch = shutil.which("sbatch")
    if not sbatch:
        raise UserError("sbatch not found: run on a Slurm login node, or render the script "
                        "with `hvdtrain render slurm` and submit it there")
    args = [sbatch, "--parsable", *(["--wait"] if wait else []), str(script)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()  # the job id comes at once, before --wait waits
    job = first.strip().split(";")[0]
    if job and run_dir is not None:
        records = [(run_dir, job, f"slurm-{name}-{job}{'_*' if sweep else ''}.out")] + [
            (Path(run.output), f"{job}_{i}", f"slurm-{name}-{job}_{i}.out") for i, run in enumerate(sweep)]
        for directory, job_id, log in records:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / JOB_RECORD).write_text(json.dumps({"job": job_id, "script": str(script.resolve()),
                                                            "log": str(Path.cwd() / log)}))
    if job:
        print(f"submitted job {job} ({script})", flush=True)
    rest, err = proc.communicate()
    proc = subprocess.CompletedProcess(args, proc.returncode, first + rest, err)
    if proc.returncode != 0 and not (wait and job):
        raise UserError(f"sbatch failed: {proc.stderr.strip() or proc.returncode}")
    if wait:
        print(f"job {job} ended with exit status {proc.returncode}", flush=True)
    return proc.returncode


def job_record(run_dir: Path) -> dict:
    path = Path(run_dir) / JOB_RECORD
    if not path.is_file():
        raise UserError(f"{run_dir}: no Slurm job recorded ({JOB_RECORD}); submit with `hvdtrain submit slurm`")
    return json.loads(path.read_text())


def job_fields(job: str) -> dict[str, str]:
    """`scontrol show job` as a dict; empty once Slurm has forgotten the job."""
    scontrol = shutil.which("scontrol")
    if not scontrol:
        raise UserError("scontrol not found: run on a Slurm login node")
    out = subprocess.run([scontrol, "show", "job", "--oneliner", job], capture_output=True, text=True).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def status(run_dir: Path) -> str:
    """The recorded job's state, restarts, run time and nodes, and the run's last epoch."""
    record = job_record(run_dir)
    fields = job_fields(record["job"])
    if fields:
        line = (f"job {record['job']}: {fields.get('JobState')}  restarts {fields.get('Restarts', '0')}  "
                f"run time {fields.get('RunTime')}  nodes {fields.get('NodeList')}  exit {fields.get('ExitCode')}")
    else:
        sacct = shutil.which("sacct")
        out = subprocess.run([sacct, "-j", record["job"], "-X", "-n", "-P", "-o", "State,Elapsed,ExitCode"],
                             capture_output=True, text=True).stdout.strip() if sacct else ""
        line = f"job {record['job']}: {out or 'no longer known to scontrol or sacct'}"
    metrics = Path(run_dir) / "metrics.jsonl"
    if metrics.is_file() and metrics.read_text().strip():
        last = json.loads(metrics.read_text().strip().splitlines()[-1])
        line += f"\nlast epoch {last['epoch']}: val_loss {last['val_loss']:.4f}"
    return line + f"\nlog: {record['log']}"


def follow(run_dir: Path, forever: bool, out=None, poll: float = 1.0) -> None:
    """The job's log; with forever, what it appends until the job ends (tail -f)."""
    import sys
    import time
    out = out or sys.stdout
    record = job_record(run_dir)
    log, position = Path(record["log"]), 0
    while True:
        if log.is_file():
            with open(log) as handle:
                handle.seek(position)
                out.write(handle.read())
                position = handle.tell()
            out.flush()
        if not forever or job_fields(record["job"]).get("JobState", "COMPLETED") in DONE:
            break
        time.sleep(poll)


def script_arguments(parser, submitting: bool = False) -> None:
    from .common import spec_arguments
    spec_arguments(parser, "override spec values, also passed to every rank")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--tasks-per-node", type=int,
                        help="ranks per node (default: GPUs per node, else resources.workers / nodes)")
    parser.add_argument("--gpus-per-node", type=int,
                        help="GPUs per node (default: resources.gpus_per_worker x tasks per node)")
    parser.add_argument("--cpus-per-task", type=int, help="default: resources.cpus_per_worker")
    parser.add_argument("--time", default="01:00:00", help="time limit (default 01:00:00)")
    parser.add_argument("--partition", help="partition (default: the cluster's default)")
    parser.add_argument("--account", help="account to charge")
    parser.add_argument("--qos", help="quality of service")
    parser.add_argument("--mem", help="memory per node, e.g. 64G")
    parser.add_argument("--constraint", help="node features, e.g. a100")
    parser.add_argument("--exclusive", action="store_true", help="whole nodes")
    parser.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                        help="any other sbatch option, e.g. --sbatch-arg=--mail-type=END (repeatable)")
    parser.add_argument("--container-image", help="run the ranks in this container (Pyxis/enroot)")
    parser.add_argument("--container-mounts", help="srun --container-mounts, e.g. /data:/data")
    parser.add_argument("--mode", choices=list(MODES), default="gloo",
                        help="gloo: ranks from SLURM_* and a rendezvous server (default); "
                             "mpi: srun --mpi=pmix")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="one Slurm job array, a task per value, each run in its own directory under "
                             "the spec's output (repeatable: every combination); `hvdtrain status OUTPUT` "
                             "lists them, best first")
    parser.add_argument("--array-limit", type=int, metavar="N", help="--sweep: at most N tasks at a time")
    parser.add_argument("-o", "--output", help="write the script here")
    if submitting:
        parser.add_argument("--wait", action="store_true", help="wait for the job to end; exit with its status")


def script_of(args) -> tuple[str, JobSpec, list[SweepRun]]:
    from ..spec import load_spec
    from . import sweep
    spec, runs = sweep.plan(args.spec, args.overrides, args.sweep) if args.sweep else \
        (load_spec(args.spec, args.overrides), [])
    return render(spec, Path(args.spec), args.overrides, nodes=args.nodes, tasks_per_node=args.tasks_per_node,
                  gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task, time_limit=args.time,
                  partition=args.partition, mode=args.mode, account=args.account, qos=args.qos,
                  mem=args.mem, constraint=args.constraint, exclusive=args.exclusive,
                  sbatch_args=args.sbatch_arg, container_image=args.container_image,
                  container_mounts=args.container_mounts, sweep=runs, array_limit=args.array_limit), spec, runs


def submit_script(args) -> int:
    from . import sweep
    text, spec, runs = script_of(args)
    script = Path(args.output or spec.run_dir / "hvdtrain.sbatch")
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(text)
    if runs:
        sweep.write_plan(spec, runs, args.spec, args.overrides, "slurm")
    return submit(script, args.wait, spec.run_dir, spec.name, runs)


def array_states(directory: Path) -> dict[str, str]:
    """Each run of a sweep submitted as a job array: its task's state, where Slurm knows it."""
    states = {}
    for run in json.loads((Path(directory) / SWEEP_FILE).read_text())["runs"]:
        found = Path(run["output"]) / JOB_RECORD
        fields = job_fields(json.loads(found.read_text())["job"]) if found.is_file() else {}
        if fields.get("JobState"):
            states[run["name"]] = fields["JobState"]
    return states


def print_status(args) -> int:
    from . import sweep
    directory = Path(args.run_dir)
    print(sweep.table(directory, array_states(directory)) if sweep.is_sweep(directory) else status(directory))
    return 0


def print_logs(args) -> int:
    """One run's log; a sweep's: each run's under a line naming it (following one at a time)."""
    from . import sweep
    directory = Path(args.run_dir)
    if not sweep.is_sweep(directory):
        follow(directory, args.follow)
        return 0
    runs = json.loads((directory / SWEEP_FILE).read_text())["runs"]
    if args.follow:
        raise UserError(f"{directory} is a sweep of {len(runs)} runs: follow one of them, e.g. "
                        f"hvdtrain logs -f {shlex.quote(runs[0]['output'])}")
    for run in runs:
        print(f"== {run['name']} ({run['output']})", flush=True)
        try:
            follow(Path(run["output"]), False)
        except UserError as err:  # a run this sweep did not submit to Slurm
            print(err, flush=True)
    return 0


def logs_arguments(parser) -> None:
    parser.add_argument("run_dir")
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")


LAUNCHER = Launcher(name="slurm", prepare_rank=prepare_rank, verbs=(
    Verb(path=("render", "slurm"), help="an sbatch script (stdout or -o FILE)",
         arguments=script_arguments, call=lambda args: emit(script_of(args)[0], args.output)),
    Verb(path=("submit", "slurm"), help="sbatch the script (written to -o FILE, default <output>/hvdtrain.sbatch)",
         arguments=lambda parser: script_arguments(parser, submitting=True), call=submit_script),
    Verb(path=("status",), help="the Slurm job a run was submitted as (state, restarts, last epoch), or a "
                                "sweep's runs, best first",
         arguments=lambda parser: parser.add_argument("run_dir"), call=print_status),
    Verb(path=("logs",), help="the log of the Slurm job a run was submitted as; a sweep's, run by run",
         arguments=logs_arguments, call=print_logs),
))
