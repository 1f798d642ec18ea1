"""The `hvdtrain` command: one small function per verb."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .errors import EXIT_FAILED, EXIT_PEER, EXIT_USAGE, TrainingError, UserError


def cmd_validate(args) -> int:
    from .spec import dump, load_spec
    spec = load_spec(args.spec, args.overrides)
    print(dump(spec), end="")
    if spec.entry is not None:
        target = spec.entry.script or f"-m {spec.entry.module}"
        print(f"entry: each rank runs {target} with Horovod's environment from this spec; "
              "model, data, task, loss, optimizer, train and checkpoint are not used", file=sys.stderr)
    return 0


def cmd_run(args) -> int:
    import json

    from .backends import require_framework
    from .launch.local import Hosts, launch
    from .train.metrics import final_metrics
    from .spec import load_spec
    os.environ["HVDTRAIN_LAUNCHED_AT"] = str(time.time())  # the ranks' start-up is timed from here
    if args.quiet or args.verbose:  # an override, so that every rank gets it
        args.overrides = [*args.overrides, f"log.level={'quiet' if args.quiet else 'verbose'}"]
    spec = load_spec(args.spec, args.overrides)  # invalid specs stop here, before any launch
    require_framework(spec.backend)
    if args.hosts and args.hostfile:
        raise UserError("give -H or --hostfile, not both")
    hosts = Hosts(args.hosts, Path(args.hostfile) if args.hostfile else None, args.mpi, args.ssh_port,
                  Path(args.ssh_identity_file) if args.ssh_identity_file else None, args.network_interfaces)
    ranks = args.np or hosts.slots() or spec.resources.workers
    code = launch(spec, args.spec, args.overrides, ranks, hosts)
    if code == 0 and spec.entry is not None:
        print(f"{spec.name}: {spec.entry.script or spec.entry.module} finished on {ranks} ranks")
    summary = Path(spec.output) / "summary.json"
    if code == 0 and spec.entry is None and summary.exists():
        final = json.loads(summary.read_text())["final"]
        print(f"{spec.name}: {final_metrics(spec.task, final)} after {final['epoch']} epochs; "
              f"run dir {spec.output}")
    return code


def cmd_train(args) -> int:
    from .rank import main as train_rank
    return train_rank(args.spec, args.overrides)


def slurm_script(args) -> tuple[str, object]:
    from .launch.slurm import render
    from .spec import load_spec
    spec = load_spec(args.spec, args.overrides)
    return render(spec, Path(args.spec), args.overrides, nodes=args.nodes,
                  tasks_per_node=args.tasks_per_node, gpus_per_node=args.gpus_per_node,
                  cpus_per_task=args.cpus_per_task, time_limit=args.time,
                  partition=args.partition, mode=args.mode, account=args.account, qos=args.qos,
                  mem=args.mem, constraint=args.constraint, exclusive=args.exclusive,
                  sbatch_args=args.sbatch_arg, container_image=args.container_image,
                  container_mounts=args.container_mounts), spec


def emit(text: str, output: str | None) -> int:
    """A rendered file to OUTPUT, or to stdout."""
    if output:
        Path(output).write_text(text)
        print(f"wrote {output}", file=sys.stderr)
    else:
        print(text, end="")
    return 0


def cmd_render_slurm(args) -> int:
    return emit(slurm_script(args)[0], args.output)


def cmd_submit_slurm(args) -> int:
    from .launch.slurm import submit
    text, spec = slurm_script(args)
    script = Path(args.output or Path(spec.output) / "hvdtrain.sbatch")
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(text)
    return submit(script, args.wait, Path(spec.output), spec.name)


def cmd_status(args) -> int:
    from .launch.slurm import status
    print(status(Path(args.run_dir)))
    return 0


def cmd_logs(args) -> int:
    from .launch.slurm import follow
    follow(Path(args.run_dir), args.follow)
    return 0


def elastic_range(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    low, sep, high = text.partition(":")
    if not (sep and low.isdigit() and high.isdigit()):
        raise UserError(f"--elastic {text!r}: expected MIN_RANKS:MAX_WORKERS, e.g. 2:8")
    return int(low), int(high)


def cmd_render_trainjob(args) -> int:
    from .launch.trainjob import render
    return emit(render(Path(args.spec), args.overrides, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                       image=args.image, namespace=args.namespace, procs_per_node=args.procs_per_node,
                       memory=args.memory, with_runtime=args.runtime, shm=args.shm), args.output)


def cmd_render_runtime(args) -> int:
    from .launch.trainjob import render_runtime
    return emit(render_runtime(args.image, shm=args.shm), args.output)


def cmd_render_k8s(args) -> int:
    from .launch.k8s import render
    text = render(Path(args.spec), args.overrides, workers=args.workers,
                  gpus_per_worker=args.gpus_per_worker, image=args.image, namespace=args.namespace,
                  slots_per_worker=args.slots_per_worker, memory=args.memory, shm=args.shm,
                  elastic=elastic_range(args.elastic))
    return emit(text, args.output)


def cmd_bench(args) -> int:
    from .bench import DEFAULT_SIZES, TRAIN_IMPLS, Settings, bench, parse_size
    from .spec import load_spec
    spec = load_spec(args.spec, args.overrides)
    try:
        ranks = [int(r) for r in args.ranks.split(",")]
        data_sizes = [float(g) for g in args.data_sizes.split(",")] if args.data_sizes != "none" else []
    except ValueError:
        raise UserError(f"--ranks {args.ranks!r} / --data-sizes {args.data_sizes!r}: expected numbers "
                        "such as 1,2") from None
    output = Path(args.output) if args.output else Path(spec.output) / "bench"
    if args.input:
        if args.overrides:
            raise UserError("--input benches the spec file as it is: give it no key.path=value overrides")
        from .bench.input import bench_input
        bench_input(Path(args.spec), output, max(ranks), args.rounds or 2, args.epochs, data_sizes,
                    startup_files=args.startup_files)
        return 0
    sizes = [] if args.sizes == "none" else \
        [parse_size(x) for x in args.sizes.split(",")] if args.sizes else DEFAULT_SIZES
    impls = args.impls.split(",") if args.impls else list(TRAIN_IMPLS)
    bench(Settings(spec=Path(args.spec), ranks=ranks, rounds=args.rounds or 5, windows=args.windows,
                   steps=args.steps, warmup=args.warmup, impls=impls, sizes=sizes, output=output,
                   overrides=args.overrides))
    return 0


def cmd_predict(args) -> int:
    from .results.predict import predict
    predict(Path(args.run_dir), Path(args.input), Path(args.output) if args.output else None)
    return 0


def cmd_evaluate(args) -> int:
    from .results.evaluation import evaluate_run
    evaluate_run(Path(args.run_dir), Path(args.data) if args.data else None,
                 Path(args.output) if args.output else None)
    return 0


def cmd_index(args) -> int:
    from .data import folder_index
    from .data.images import check_images
    folder = Path(args.folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a directory")
    count = folder_index.write_beside(folder, lambda paths: check_images(paths, decode=args.decode))
    checked = "decoded" if args.decode else "checked the headers of"
    print(f"indexed and {checked} {count} image files: {folder / folder_index.BESIDE}")
    return 0


def cmd_shards(args) -> int:
    from .data.write_shards import write_shards
    folder, out = Path(args.folder), Path(args.out)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a directory")
    if args.per_shard < 1:
        raise UserError(f"--per-shard {args.per_shard}: must be 1 or more")
    counts = write_shards(folder, out, args.per_shard, args.seed)
    shards = sorted(p.name for p in out.glob("*.tar"))
    print(f"wrote {len(shards)} shards ({', '.join(f'{n} {part}' for part, n in counts.items())} samples): "
          f"{out}/{shards[0]} .. {shards[-1]}; train with data.source: webdataset, data.path: {out}")
    return 0


def cmd_plot(args) -> int:
    from .train.curves import plot_runs
    output = Path(args.output or (Path(args.run_dirs[0]) / "curves.png" if len(args.run_dirs) == 1 else "curves.png"))
    print(f"wrote {plot_runs([Path(d) for d in args.run_dirs], output)}")
    return 0


def cmd_doctor(args) -> int:
    from .doctor import report
    lines, fixes = report()
    print("\n".join(lines))
    print("\nTo do:" if fixes else "\nEverything needed for Gloo training is in place.")
    for fix in fixes:
        print(f"  - {fix}")
    return 1 if any("missing" in f for f in fixes) else 0


def cmd_build_horovod(args) -> int:
    from .horovod_build import BuildError, ensure_horovod
    try:
        wheel = ensure_horovod(force=args.force)
    except BuildError as err:
        print(f"hvdtrain: Horovod build failed: {err}", file=sys.stderr)
        return EXIT_FAILED
    if args.wheel_out:
        import shutil
        target = Path(args.wheel_out)
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(wheel, target / wheel.name)
        print(f"wrote {target / wheel.name}: `pip install {wheel.name}` on nodes with the same "
              "Python, torch, TensorFlow and MPI (no compiler needed)")
    return 0


def kubernetes_options(sub: argparse.ArgumentParser, pod: str, kind: str) -> None:
    """What the MPIJob and the TrainJob both take: the spec, overrides, image, namespace,
    GPUs, memory and /dev/shm per pod, and the output file."""
    sub.add_argument("spec", help="job spec (YAML)")
    sub.add_argument("overrides", nargs="*", metavar="key.path=value",
                     help="override spec values (baked into the ConfigMap)")
    sub.add_argument(f"--gpus-per-{pod}", type=int, help="default: resources.gpus_per_worker")
    sub.add_argument("--image", required=True, help="image with hvdtrain (k8s/Dockerfile)")
    sub.add_argument("--namespace", help=f"namespace of the ConfigMap and {kind}")
    sub.add_argument("--memory", default="4Gi", help=f"memory per {pod} (default 4Gi)")
    sub.add_argument("--shm", default="1Gi", help=f"/dev/shm size per {pod} (default 1Gi)")
    sub.add_argument("-o", "--output", help="write the manifests here")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="hvdtrain", description=__doc__)
    verbs = top.add_subparsers(dest="verb", required=True)

    def verb(name, func, help_text, spec=True):
        p = verbs.add_parser(name, help=help_text, description=help_text)
        if spec:
            p.add_argument("spec", help="job spec (YAML)")
            p.add_argument("overrides", nargs="*", metavar="key.path=value",
                           help="override spec values, e.g. train.epochs=3")
        p.set_defaults(func=func)
        return p

    run = verb("run", cmd_run, "train through horovodrun: N ranks here, or on the -H hosts (Gloo, or --mpi)")
    run.add_argument("-np", type=int, metavar="N", help="ranks (default: resources.workers)")
    run.add_argument("-H", "--hosts", metavar="HOST:SLOTS,...",
                     help="run the ranks on these hosts through ssh, as horovodrun does (default: "
                          "localhost); -np defaults to the slots in all")
    run.add_argument("--hostfile", help="hosts from a file, one 'HOST slots=N' per line")
    run.add_argument("--mpi", action="store_true", help="Open MPI's mpirun instead of Gloo")
    run.add_argument("--ssh-port", type=int, help="ssh port of the hosts")
    run.add_argument("--ssh-identity-file", help="ssh key for the hosts")
    run.add_argument("--network-interfaces", metavar="NIC,...", help="interfaces for the ranks' traffic")
    loudness = run.add_mutually_exclusive_group()
    loudness.add_argument("-q", "--quiet", action="store_true", help="only the final line (log.level=quiet)")
    loudness.add_argument("-v", "--verbose", action="store_true", help="also data and checkpoint details "
                                                                        "(log.level=verbose)")
    verb("train", cmd_train, "per-rank entry point (run by horovodrun, srun, mpirun)")
    verb("validate", cmd_validate, "check a spec and print it resolved")
    predict = verb("predict", cmd_predict, "predict with an exported model", spec=False)
    predict.add_argument("run_dir", help="run directory (or its model/ folder)")
    predict.add_argument("input", help=".npz (array x), .csv with the feature columns, or (a model trained "
                         "on an image folder) an image file or a folder of them")
    predict.add_argument("-o", "--output", help="write predictions and probabilities as CSV")
    evaluate = verb("evaluate", cmd_evaluate, "an exported model on the run's held-out test split or on "
                    "labelled data: metrics, a per-class table and confusion.png", spec=False)
    evaluate.add_argument("run_dir", help="run directory (or its model/ folder)")
    evaluate.add_argument("data", nargs="?", help=".npz (x, y), .npy (y.npy beside it), .csv with the label "
                          "column, or a folder of class folders of images; default: the run's test split")
    evaluate.add_argument("-o", "--output", help="directory for evaluation.json and confusion.png "
                                                 "(default RUN_DIR/evaluation)")
    index = verb("index", cmd_index, "list and check an image folder once, into an index beside it that "
                 "every rank and node reuses while the folder is unchanged", spec=False)
    index.add_argument("folder", help="the image_folder's data.path")
    index.add_argument("--decode", action="store_true", help="decode every file as well, to find a "
                       "truncated or corrupt one now rather than when training reads it")
    shards = verb("shards", cmd_shards, "write an image folder as WebDataset tar shards (train-*.tar, "
                  "val-*.tar, classes.txt) for data.source webdataset", spec=False)
    shards.add_argument("folder", help="an image_folder's data.path")
    shards.add_argument("out", help="the directory to write the shards into (new or empty)")
    shards.add_argument("--per-shard", type=int, default=1000, help="samples per shard (default 1000)")
    shards.add_argument("--seed", type=int, default=0, help="the order of the samples in the shards")
    plot = verb("plot", cmd_plot, "loss, metric and lr curves of one or more runs on one figure", spec=False)
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    plot.add_argument("-o", "--output", help="PNG to write (default RUN_DIR/curves.png for one run, "
                                             "else ./curves.png)")
    status = verb("status", cmd_status, "the Slurm job a run was submitted as: state, restarts, last epoch",
                  spec=False)
    status.add_argument("run_dir")
    logs = verb("logs", cmd_logs, "the log of the Slurm job a run was submitted as", spec=False)
    logs.add_argument("run_dir")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    verb("doctor", cmd_doctor, "show what is installed and what is missing", spec=False)
    build = verb("build-horovod", cmd_build_horovod,
                 "build (or take from cache) and install Horovod for this environment", spec=False)
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.add_argument("--wheel-out", metavar="DIR", help="also copy the wheel here, for nodes without compilers")

    bench = verb("bench", cmd_bench, "training throughput against hand-written Horovod, DDP and the "
                 "TF backend, and allreduce bandwidth; writes bench.json and bench.png", spec=False)
    bench.add_argument("spec", help="job spec (YAML) giving model, data and batch size")
    bench.add_argument("overrides", nargs="*", metavar="key.path=value",
                       help="override spec values for every implementation, e.g. train.precision=bf16")
    bench.add_argument("--ranks", default="1,2", help="rank counts (default 1,2)")
    bench.add_argument("--rounds", type=int, help="alternating launches per implementation or data "
                                                   "source (default 5; 2 with --input)")
    bench.add_argument("--windows", type=int, default=1, help="timed windows per launch")
    bench.add_argument("--steps", type=int, default=20, help="steps per window")
    bench.add_argument("--warmup", type=int, default=5, help="untimed steps per launch")
    bench.add_argument("--impls", help="comma list of hvdtrain,horovod,ddp,tensorflow,local "
                       "(local: no communication, the machine's scaling ceiling; default all)")
    bench.add_argument("--sizes", help="allreduce message sizes, e.g. 4K,1M,256M; 'none' skips "
                                       "(default 4K..256M)")
    bench.add_argument("--input", action="store_true", help=(
        "the input pipeline instead: samples/s training from memory, an image folder and a "
        "memory-mapped .npy (the spec's synthetic images), and peak RSS per rank on .npy files "
        "of --data-sizes; writes input.json and input.png"))
    bench.add_argument("--epochs", type=int, default=3, help="--input: epochs per run (the first is left out)")
    bench.add_argument("--data-sizes", default="2,4", help="--input: GiB of each memory-mapped "
                                                          ".npy for peak RSS; 'none' skips (default 2,4)")
    bench.add_argument("--startup-files", type=int, default=0, metavar="N", help=(
        "--input: also time launch to first step on a folder of N small JPEG files (200000 for "
        "ImageNet's order of files per node), without and with its cached index"))
    bench.add_argument("-o", "--output", help="report directory (default <output>/bench)")

    render = verbs.add_parser("render", help="write a cluster job for a spec",
                              description="write a cluster job for a spec").add_subparsers(
        dest="target", required=True)
    submit = verbs.add_parser("submit", help="render a cluster job and submit it",
                              description="render a cluster job and submit it").add_subparsers(
        dest="target", required=True)
    for targets, func, help_text in ((render, cmd_render_slurm, "an sbatch script (stdout or -o FILE)"),
                                     (submit, cmd_submit_slurm, "sbatch the script (written to -o "
                                      "FILE, default <output>/hvdtrain.sbatch)")):
        slurm = targets.add_parser("slurm", help=help_text, description=help_text)
        slurm.add_argument("spec", help="job spec (YAML)")
        slurm.add_argument("overrides", nargs="*", metavar="key.path=value",
                           help="override spec values, also passed to every rank")
        slurm.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
        slurm.add_argument("--tasks-per-node", type=int,
                           help="ranks per node (default: GPUs per node, else resources.workers / nodes)")
        slurm.add_argument("--gpus-per-node", type=int,
                           help="GPUs per node (default: resources.gpus_per_worker x tasks per node)")
        slurm.add_argument("--cpus-per-task", type=int, help="default: resources.cpus_per_worker")
        slurm.add_argument("--time", default="01:00:00", help="time limit (default 01:00:00)")
        slurm.add_argument("--partition", help="partition (default: the cluster's default)")
        slurm.add_argument("--account", help="account to charge")
        slurm.add_argument("--qos", help="quality of service")
        slurm.add_argument("--mem", help="memory per node, e.g. 64G")
        slurm.add_argument("--constraint", help="node features, e.g. a100")
        slurm.add_argument("--exclusive", action="store_true", help="whole nodes")
        slurm.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                           help="any other sbatch option, e.g. --sbatch-arg=--mail-type=END (repeatable)")
        slurm.add_argument("--container-image", help="run the ranks in this container (Pyxis/enroot)")
        slurm.add_argument("--container-mounts", help="srun --container-mounts, e.g. /data:/data")
        slurm.add_argument("--mode", choices=["gloo", "mpi"], default="gloo",
                           help="gloo: ranks from SLURM_* and a rendezvous server (default); "
                                "mpi: srun --mpi=pmix")
        slurm.add_argument("-o", "--output", help="write the script here")
        if func is cmd_submit_slurm:
            slurm.add_argument("--wait", action="store_true",
                               help="wait for the job to end; exit with its status")
        slurm.set_defaults(func=func)

    k8s = render.add_parser("k8s", help="a Kubeflow MPIJob (v2beta1) and its spec ConfigMap",
                            description="a Kubeflow MPIJob (v2beta1) and its spec ConfigMap, as "
                                        "multi-document YAML for kubectl apply -f -")
    kubernetes_options(k8s, "worker", "MPIJob")
    k8s.add_argument("--workers", type=int, required=True, help="worker pods")
    k8s.add_argument("--slots-per-worker", type=int, help="ranks per worker (default: GPUs, or 1)")
    k8s.add_argument("--elastic", metavar="MIN_RANKS:MAX_WORKERS",
                     help="elastic job: horovodrun with the operator's discover_hosts.sh; "
                          "Worker replicas = MAX_WORKERS")
    k8s.set_defaults(func=cmd_render_k8s)

    job = render.add_parser("trainjob", help="a Kubeflow Trainer v2 TrainJob and its spec ConfigMap",
                            description="a Kubeflow Trainer v2 TrainJob (trainer.kubeflow.org/v1alpha1) on "
                                        "the Horovod ClusterTrainingRuntime, and its spec ConfigMap")
    kubernetes_options(job, "node", "TrainJob")
    job.add_argument("--nodes", type=int, required=True, help="training nodes (pods), the launcher's included")
    job.add_argument("--procs-per-node", type=int, help="ranks per node (default: GPUs, or 1)")
    job.add_argument("--runtime", action="store_true", help="also the Horovod ClusterTrainingRuntime")
    job.set_defaults(func=cmd_render_trainjob)

    runtime = render.add_parser("runtime", help="the Horovod ClusterTrainingRuntime for Kubeflow Trainer v2",
                                description="the Horovod ClusterTrainingRuntime that TrainJobs from "
                                            "`render trainjob` run on; apply once per cluster")
    runtime.add_argument("--image", required=True, help="image with hvdtrain (k8s/Dockerfile)")
    runtime.add_argument("--shm", default="1Gi", help="/dev/shm size per node (default 1Gi)")
    runtime.add_argument("-o", "--output", help="write the manifest here")
    runtime.set_defaults(func=cmd_render_runtime)
    return top


def main(argv: list[str] | None = None) -> None:
    top = parser()
    args, extra = top.parse_known_args(argv)
    # overrides may also follow options: hvdtrain run SPEC -np 2 train.epochs=3
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        top.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "np", None) is not None and args.np < 1:
        print("hvdtrain: -np must be at least 1", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    try:
        code = args.func(args)
    except UserError as err:
        print(f"hvdtrain: error: {err}", file=sys.stderr)
        code = EXIT_USAGE
    except (OSError, TrainingError) as err:
        print(f"hvdtrain: error: {err}", file=sys.stderr)
        code = EXIT_FAILED
    except Exception as err:
        if type(err).__name__ != "HorovodInternalError":
            raise
        # Another rank failed first; its own error is the one to read.
        print("hvdtrain: stopped because another rank failed", file=sys.stderr)
        code = EXIT_PEER
    except KeyboardInterrupt:
        code = 130
    if code and getattr(args, "func", None) is cmd_train:
        # A rank that failed ends now, with its status: tearing down (the loader's processes,
        # Horovod's threads) could outlast the launcher's patience, which then kills it and
        # reports another rank's status instead.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
