"""The `hvdtrain` command: one small function per verb; the launchers' verbs come
from their table (`hvdtrain.launch.LAUNCHERS`)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import (EXIT_FAILED, EXIT_PEER, EXIT_USAGE, EXIT_WRITE, WRITE_ERRNOS, TrainingError, UserError,
                     WriteError)


def cmd_validate(args) -> int:
    from .spec import dump, load_spec
    spec = load_spec(args.spec, args.overrides)
    print(dump(spec), end="")
    if spec.entry is not None:
        target = spec.entry.script or f"-m {spec.entry.module}"
        print(f"entry: each rank runs {target} with Horovod's environment from this spec; "
              "model, data, task, loss, optimizer, train and checkpoint are not used", file=sys.stderr)
    return 0


def cmd_train(args) -> int:
    from .rank import main as train_rank
    return train_rank(args.spec, args.overrides)


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
    output = Path(args.output) if args.output else spec.run_dir / "bench"
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
                   overrides=args.overrides, profile=args.profile))
    return 0


def cmd_predict(args) -> int:
    from .results.predict import predict
    predict(Path(args.run_dir), Path(args.input), Path(args.output) if args.output else None)
    return 0


def cmd_generate(args) -> int:
    from .results.predict import generate
    print(generate(Path(args.run_dir), args.prompt, args.tokens))
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


ABOUT = """Horovod training jobs from one YAML spec: the same job on this machine
(hvdtrain run), on other hosts through ssh, on Slurm (hvdtrain submit slurm) and on
Kubernetes (hvdtrain render k8s | trainjob), with PyTorch or TensorFlow. Start with
`hvdtrain validate SPEC`, then `hvdtrain run SPEC -np 2`; the examples/ specs are
headed by the command that runs them."""


def parser() -> argparse.ArgumentParser:
    from .launch import LAUNCHERS
    top = argparse.ArgumentParser(prog="hvdtrain", description=ABOUT,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = top.add_subparsers(dest="verb", required=True)

    def verb(name, func, help_text, spec=True):
        p = verbs.add_parser(name, help=help_text, description=help_text)
        if spec:
            p.add_argument("spec", help="job spec (YAML)")
            p.add_argument("overrides", nargs="*", metavar="key.path=value",
                           help="override spec values, e.g. train.epochs=3")
        p.set_defaults(func=func)
        return p

    groups = {"render": "write a cluster job for a spec", "submit": "render a cluster job and submit it"}
    targets: dict[str, argparse._SubParsersAction] = {}
    for launcher in LAUNCHERS.values():  # each launcher's own verbs (hvdtrain/launch/)
        for command in launcher.verbs:
            if len(command.path) == 1:
                sub = verbs.add_parser(command.path[0], help=command.help, description=command.help)
            else:
                group, name = command.path
                if group not in targets:
                    targets[group] = verbs.add_parser(group, help=groups[group], description=groups[group]) \
                        .add_subparsers(dest="target", required=True)
                sub = targets[group].add_parser(name, help=command.help, description=command.help)
            command.arguments(sub)
            sub.set_defaults(func=command.call)

    verb("train", cmd_train, "per-rank entry point (run by horovodrun, srun, mpirun)")
    verb("validate", cmd_validate, "check a spec and print it resolved")
    predict = verb("predict", cmd_predict, "predict with an exported model", spec=False)
    predict.add_argument("run_dir", help="run directory (or its model/ folder)")
    predict.add_argument("input", help=".npz (array x), .csv with the feature columns, or (a model trained "
                         "on an image folder) an image file or a folder of them, or (on text) a .csv, .jsonl or "
                         ".parquet file with the text column, or a .txt file of one text per line")
    predict.add_argument("-o", "--output", help="write predictions and probabilities as CSV")
    generate = verb("generate", cmd_generate, "continue a prompt with an exported language model "
                    "(the most likely token each time)", spec=False)
    generate.add_argument("run_dir", help="run directory (or its model/ folder)")
    generate.add_argument("prompt", help="the text to continue")
    generate.add_argument("-n", "--tokens", type=int, default=50, help="how many tokens to add (default 50)")
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
    bench.add_argument("--profile", action="store_true", help=(
        "torch implementations: torch.profiler over each launch's last window on rank 0, a table "
        "by self CPU time, and a Chrome trace, in profile/IMPL-RANKS-ROUND/ beside the report"))
    bench.add_argument("-o", "--output", help="report directory (default <output>/bench)")

    return top


def main(argv: list[str] | None = None) -> None:
    top = parser()
    args, extra = top.parse_known_args(argv)
    # overrides may also follow options: hvdtrain run SPEC -np 2 train.epochs=3
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        top.error(f"unrecognized arguments: {' '.join(extra)}")
    failed = True  # an error ended the verb (not a status it returned: a user's script's, a requeue's)
    try:
        code = args.func(args)
        failed = False
    except UserError as err:
        print(f"hvdtrain: error: {err}", file=sys.stderr)
        code = EXIT_USAGE
    except WriteError as err:
        print(f"hvdtrain: error: {err}", file=sys.stderr)
        code = EXIT_WRITE
    except OSError as err:
        print(f"hvdtrain: error: {err}", file=sys.stderr)
        code = EXIT_WRITE if err.errno in WRITE_ERRNOS else EXIT_FAILED
    except TrainingError as err:
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
    if failed and getattr(args, "func", None) is cmd_train:
        # A rank that failed ends now, with its status: tearing down (the loader's processes,
        # Horovod's threads) could outlast the launcher's patience, which then kills it and
        # reports another rank's status instead.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
