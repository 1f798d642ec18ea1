#!/usr/bin/env python3
"""Where a training step's time goes: hvdtrain's step loop (fed by its own input
pipeline, as `fit` feeds it) against the hand-written Horovod loop of `hvdtrain
bench`, one process each in turn, timed and then under torch.profiler.

    python scripts/profile_step.py SPEC [--steps 200] [--profile-steps 30] [--out DIR]

Prints steps/s of each and the operators that take the most CPU time (a step
loop bound by the CPU shows there); with --out, writes each profile as a Chrome
trace.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("spec")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--profile-steps", type=int, default=30)
    parser.add_argument("--out")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import torch
    from torch.profiler import ProfilerActivity, profile

    from hvdtrain.backends import get_backend
    from hvdtrain.bench.worker import cycle, train_horovod
    from hvdtrain.data import image_input, load_dataset, shard_batches
    from hvdtrain.train.lr import scaled_lr
    from hvdtrain.spec import load_spec

    spec = load_spec(args.spec)
    dataset = load_dataset(spec.data, image=image_input(spec.model, spec.data), task=spec.task)
    job = get_backend("torch").setup(spec, dataset)
    order = shard_batches(len(dataset.train), 0, 1, spec.train.batch_size, spec.train.seed, 0)
    lr = scaled_lr(spec.optimizer, spec.horovod.adasum, job.comm)

    def hvdtrain_run(count: int, start: int) -> None:
        job.steps.train_epoch(0, job.steps.loader(dataset.train, cycle(order, count, start)), lambda i: lr, 0,
                              count)

    _, _, hand_run, _, _, _ = train_horovod(spec, "resident")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    for name, run in (("hvdtrain", hvdtrain_run), ("horovod-gpu-resident", hand_run)):
        run(20, 0)  # warm-up
        sync()
        began = time.perf_counter()
        run(args.steps, 20)
        sync()
        seconds = time.perf_counter() - began
        print(f"\n== {name}: {args.steps / seconds:.1f} steps/s, "
              f"{args.steps * spec.train.batch_size / seconds:.0f} samples/s")
        with profile(activities=activities) as prof:
            run(args.profile_steps, 0)
            sync()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=48))
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(Path(args.out) / f"{name}.json"))


def sync() -> None:
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
