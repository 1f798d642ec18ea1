"""One rank of `hvdtrain bench`: times training steps or allreduces and, on
rank 0, writes what it measured as JSON.

    python -m hvdtrain.bench.worker train IMPL SPEC OUT --windows W --steps K --warmup U [--set K=V]
    python -m hvdtrain.bench.worker allreduce IMPL OUT --sizes 4096,65536

Training IMPLs: hvdtrain (hvdtrain's own backend loop, torch), tensorflow
(hvdtrain's TF backend), horovod (a minimal hand-written Horovod loop as in
Horovod's examples), ddp (PyTorch DistributedDataParallel over gloo, started by
torchrun), local (the same loop with no communication: each rank alone, the
ceiling for scaling on the machine). The hand-written loops follow the spec's
optimizer, precision (bf16), fp16 compression, Adasum (Horovod) and backward
passes per step, as hvdtrain does; `hvdtrain bench` refuses settings a loop
cannot follow. Every window reports the samples, optimizer steps and gradient
allreduces its ranks actually did. Allreduce IMPLs: horovod (under
horovodrun --gloo or --mpi), torch (torch.distributed gloo, under torchrun).
Each process uses one thread.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .counts import Counts, count_torch_optimizer, median_ms

THREADS = 1


def batches_for(spec, rank: int, size: int) -> list:
    from ..data import image_input, load_dataset, shard_batches
    dataset = load_dataset(spec.data, image=image_input(spec.model, spec.data), task=spec.task)
    order = shard_batches(len(dataset.train), rank, size, spec.train.batch_size, spec.train.seed, 0,
                          last_batch=spec.train.last_batch)
    # the hand-written loops take float inputs: image files' uint8 pixels normalised here
    prep = dataset.preprocessing
    return dataset, [(prep.apply(x) if prep.image_size else x, y) for x, y in map(dataset.train.batch, order)]


def cycle(batches: list, count: int, start: int) -> list:
    return [batches[(start + i) % len(batches)] for i in range(count)]


def train_hvdtrain(spec, backend_name: str):
    """hvdtrain's own loop: the backend's setup and its train_epoch."""
    from ..backends import get_backend
    from ..data import image_input, load_dataset, shard_batches
    from ..train.lr import scaled_lr
    backend = get_backend(backend_name)
    dataset = load_dataset(spec.data, image=image_input(spec.model, spec.data), task=spec.task)
    job = backend.setup(spec, dataset)
    comm = job.comm
    order = shard_batches(len(dataset.train), comm.rank, comm.size, spec.train.batch_size, spec.train.seed, 0,
                          last_batch=spec.train.last_batch)
    lr = scaled_lr(spec.optimizer, spec.horovod.adasum, comm)
    counts = Counts()
    if backend_name == "torch":
        count_torch_optimizer(job.optimizer, counts, horovod=True)

    def run(count: int, start: int) -> None:  # fed by hvdtrain's own input pipeline, as in `fit`
        batches = job.steps.loader(dataset.train, cycle(order, count, start))
        job.steps.train_epoch(0, batches, lambda i: lr, 0, count)

    def done() -> dict:
        if backend_name == "tensorflow":  # Keras counts its own applied steps
            counts.optimizer_steps = int(job.optimizer.iterations.numpy())
            counts.allreduces = None
        return vars(counts).copy()

    def total(value: float) -> float:
        if backend_name == "torch":
            import torch
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        return float(comm.allreduce_sum(np.array([value]), "bench.sum")[0])
    return comm.rank, comm.size, run, total, [len(b) for b in order], done


def device_for(spec, local_rank: int):
    """One GPU per rank by local rank when the spec asks for GPUs and there are any."""
    import torch
    if spec.resources.gpus_per_worker > 0 and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        torch.backends.cudnn.benchmark = True  # as hvdtrain sets it, and as tuning guides advise
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def synchronize(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hand_lr(spec, size: int) -> float:
    """The learning rate hvdtrain would use (scaled_lr), for the hand-written loops."""
    from types import SimpleNamespace

    from ..train.lr import scaled_lr
    return scaled_lr(spec.optimizer, spec.horovod.adasum,
                     SimpleNamespace(size=size, local_size=size, hierarchical=False))


def train_horovod(spec, placement: str):
    """The loop of Horovod's PyTorch examples, written out by hand, with the
    spec's optimizer, compression, Adasum and backward passes per step."""
    import horovod.torch as hvd
    import torch

    from ..backends.torch import make_loss, make_model, make_optimizer, placed
    hvd.init()
    torch.set_num_threads(THREADS)
    device = device_for(spec, hvd.local_rank())
    dataset, batches = batches_for(spec, hvd.rank(), hvd.size())
    torch.manual_seed(spec.train.seed)
    model = placed(make_model(spec.model, dataset), device, spec.train.channels_last)
    optimizer = make_optimizer(spec.optimizer, model.parameters(), hand_lr(spec, hvd.size()), device.type == "cuda")
    h = spec.horovod
    optimizer = hvd.DistributedOptimizer(
        optimizer, named_parameters=model.named_parameters(),
        compression=hvd.Compression.fp16 if h.fp16_compression else hvd.Compression.none,
        backward_passes_per_step=h.backward_passes_per_step, op=hvd.Adasum if h.adasum else hvd.Average)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    counts = Counts()
    count_torch_optimizer(optimizer, counts, horovod=True)

    def total(value: float) -> float:
        synchronize(device)
        return float(hvd.allreduce(torch.tensor([value], dtype=torch.float64), op=hvd.Sum, name="bench.sum")[0])
    run = plain_steps(spec, model, optimizer, batches, device, placement,
                      loss_fn=make_loss(spec.loss, dataset.preprocessing))
    return hvd.rank(), hvd.size(), run, total, [len(y) for _, y in batches], lambda: vars(counts).copy()


def plain_steps(spec, model, optimizer, batches: list, device, placement: str, no_sync=None,
                whole_step: bool = False, loss_fn=None):
    """The step loop of Horovod's and PyTorch's examples. placement "resident": every
    batch on the device before timing; "host": each batch copied from (pinned) host
    memory inside the step, the way a DataLoader feeds a loop. Backward passes per
    step as hvdtrain runs them: each pass carries 1/N of the loss, one step per group
    (DDP: no_sync for all but the group's last pass). train.compile: the steps call
    torch.compile's module (for DDP, the compiled DDP module), or, with `whole_step`
    and one pass per step, torch.compile's version of the whole step as users write it
    (zero_grad, forward, loss, backward, optimizer step; dynamo compiles the forward and
    loss with their backward as one graph and the optimizer's update as another);
    train.channels_last: images in channels-last order; loss_fn: the task's (next tokens'), as users write it."""
    import contextlib

    import torch
    import torch.nn.functional as F
    passes = spec.horovod.backward_passes_per_step
    low = {"bf16": torch.bfloat16}.get(spec.train.precision)
    pin = device.type == "cuda"
    loss_fn = loss_fn or F.cross_entropy
    from ..backends.torch import compiled, in_order
    forward = compiled(model, spec.train) if spec.train.compile and not whole_step else model

    def images(x):
        return in_order(x, spec.train.channels_last)
    if placement == "resident":
        tensors = [(images(torch.from_numpy(x).to(device)), torch.from_numpy(y).to(device)) for x, y in batches]
    else:
        tensors = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in batches]
        if pin:
            tensors = [(x.pin_memory(), y.pin_memory()) for x, y in tensors]

    if spec.train.compile and whole_step and passes == 1:
        def step(x, y):
            optimizer.zero_grad()
            with torch.autocast(device.type, dtype=low, enabled=low is not None):
                loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
        step = compiled(step, spec.train)

        def run(count: int, start: int) -> None:
            model.train()
            for x, y in cycle(tensors, count, start):
                if placement == "host":
                    x, y = images(x.to(device, non_blocking=pin)), y.to(device, non_blocking=pin)
                step(x, y)
        return run

    def run(count: int, start: int) -> None:
        model.train()
        for i, (x, y) in enumerate(cycle(tensors, count, start)):
            if placement == "host":
                x, y = images(x.to(device, non_blocking=pin)), y.to(device, non_blocking=pin)
            if i % passes == 0:
                optimizer.zero_grad()
            last = (i + 1) % passes == 0 or i + 1 == count
            with no_sync() if (no_sync is not None and not last) else contextlib.nullcontext():
                with torch.autocast(device.type, dtype=low, enabled=low is not None):
                    loss = loss_fn(forward(x), y)
                (loss.float() / min(passes, count - i // passes * passes)).backward()
            if last:
                optimizer.step()
    return run


def train_ddp(spec, placement: str, communicate: bool = True):
    """PyTorch DDP over gloo (NCCL on GPUs), as torchrun starts it, with the spec's
    optimizer, fp16 compression (DDP's fp16 comm hook) and backward passes per step
    (no_sync). Without `communicate`, every rank trains on its own and the process
    group serves only the timing barriers: the machine's ceiling for running N ranks
    at once."""
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    from ..backends.torch import make_loss, make_model, make_optimizer, placed
    torch.set_num_threads(THREADS)
    device = device_for(spec, int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    dataset, batches = batches_for(spec, rank, size)
    torch.manual_seed(spec.train.seed)
    model = placed(make_model(spec.model, dataset), device, spec.train.channels_last)
    counts = Counts()
    no_sync = None
    if communicate:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        hook = default_hooks.fp16_compress_hook if spec.horovod.fp16_compression else default_hooks.allreduce_hook

        def counted_hook(state, bucket):  # one call per gradient bucket allreduced
            counts.allreduces += 1
            return hook(state, bucket)
        model.register_comm_hook(None, counted_hook)
        no_sync = model.no_sync
    optimizer = make_optimizer(spec.optimizer, model.parameters(), hand_lr(spec, size), device.type == "cuda")
    count_torch_optimizer(optimizer, counts, horovod=False)

    def total(value: float) -> float:
        synchronize(device)
        summed = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(summed)
        return float(summed[0])
    # without communication, the plain PyTorch reference: with train.compile its whole step compiled
    run = plain_steps(spec, model, optimizer, batches, device, placement, no_sync, whole_step=not communicate,
                      loss_fn=make_loss(spec.loss, dataset.preprocessing))
    return rank, size, run, total, [len(y) for _, y in batches], lambda: vars(counts).copy()


def time_training(args) -> dict:
    from ..train import startup
    from ..plugins import add_import_paths, import_paths
    from ..rank import apply_horovod_environment
    from ..spec import load_spec
    spec = load_spec(args.spec, [*args.overrides, f"resources.cpus_per_worker={THREADS}"])
    add_import_paths(import_paths(args.spec, spec.code))  # a custom model's builder
    apply_horovod_environment(spec.horovod)  # fusion, cycle time, autotune, timeline as the spec says
    makers = {"hvdtrain": lambda: train_hvdtrain(spec, "torch"),
              "tensorflow": lambda: train_hvdtrain(spec.model_copy(update={"backend": "tensorflow"}),
                                                   "tensorflow"),
              "horovod": lambda: train_horovod(spec, args.placement),
              "ddp": lambda: train_ddp(spec, args.placement),
              "local": lambda: train_ddp(spec, args.placement, communicate=False)}
    # total(x): x summed over the ranks; every implementation starts and ends its windows with it.
    # counts(): this rank's optimizer steps and gradient allreduces so far.
    rank, size, run, total, sizes, counts = makers[args.impl]()
    startup.mark("set-up")
    before_warmup = compiled_graphs()
    run(args.warmup, 0)
    startup.mark("warm-up")
    graphs = compiled_graphs()
    seconds, samples, steps, allreduces = [], [], [], []
    tails_from = len(counts()["tails"])
    for window in range(args.windows):
        first = args.warmup + window * args.steps
        total(0.0)
        before = counts()
        profiler = profiling(args.profile, rank, window == args.windows - 1)
        began = time.perf_counter()
        with profiler:
            run(args.steps, first)
        # what each rank processed in the window (its batches differ by a sample), summed
        samples.append(total(float(sum(sizes[(first + i) % len(sizes)] for i in range(args.steps)))))
        seconds.append(time.perf_counter() - began)
        after = counts()
        steps.append(after["optimizer_steps"] - before["optimizer_steps"])
        allreduces.append(None if after["allreduces"] is None else after["allreduces"] - before["allreduces"])
    if args.profile and rank == 0:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        name = f"{args.impl}-{args.placement}"
        (Path(args.profile) / f"{name}.txt").write_text(profiler.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
        profiler.export_chrome_trace(str(Path(args.profile) / f"{name}.json"))
    return {"rank": rank, "ranks": size, "impl": args.impl, "placement": args.placement,
            "optimizer": counts()["optimizer"], "window_seconds": seconds, "window_samples": samples, "window_optimizer_steps": steps,
            "window_allreduces": allreduces, "startup_phases": startup.phases(),
            "after_last_gradient_ms": median_ms(counts()["tails"][tails_from:]),
            "graphs_compiled_in_warmup": None if graphs is None else graphs - (before_warmup or 0),
            "graphs_compiled_after_warmup": None if graphs is None else compiled_graphs() - graphs}


def compiled_graphs() -> int | None:
    """Graphs torch.compile has compiled in this process so far (a recompile adds one);
    None where torch is not in use."""
    if "torch" not in sys.modules:
        return None
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def profiling(directory: str | None, rank: int, last: bool):
    """torch.profiler over the last window on rank 0 (--profile DIR), else nothing."""
    import contextlib
    if not (directory and last and rank == 0):
        return contextlib.nullcontext()
    import torch
    from torch.profiler import ProfilerActivity, profile
    return profile(activities=[ProfilerActivity.CPU]
                   + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else []))


def time_allreduce(args) -> dict:
    sizes = [int(s) for s in args.sizes.split(",")]
    import torch
    on_gpu = args.gpu and torch.cuda.is_available()
    if args.impl == "torch":
        import torch.distributed as dist
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if on_gpu else "gloo")
        rank, size = dist.get_rank(), dist.get_world_size()

        def reduce(tensor):
            dist.all_reduce(tensor)
        barrier = dist.barrier
    else:
        import horovod.torch as hvd
        hvd.init()
        if on_gpu:
            torch.cuda.set_device(hvd.local_rank())
        rank, size = hvd.rank(), hvd.size()

        def reduce(tensor):
            hvd.allreduce_(tensor, op=hvd.Sum, name=f"bench.{tensor.numel()}")

        def barrier():
            hvd.allreduce(torch.zeros(1), name="bench.barrier")
    torch.set_num_threads(THREADS)
    results = []
    for nbytes in sizes:
        tensor = torch.ones(nbytes // 4, dtype=torch.float32, device="cuda" if on_gpu else "cpu")
        reduce(tensor)  # warm-up (and connection set-up)
        times = []
        for _ in range(repeats(nbytes)):  # the same count on every rank, or they would hang
            barrier()
            began = time.perf_counter()
            reduce(tensor)
            if on_gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - began)
        results.append({"bytes": nbytes, "seconds": float(np.median(times)), "repeats": len(times)})
    return {"rank": rank, "ranks": size, "impl": args.impl, "gpu": bool(on_gpu), "allreduce": results}


def repeats(nbytes: int) -> int:
    """Many repetitions of small messages, a few of large ones (about 256 MiB moved in all)."""
    return max(5, min(100, (256 << 20) // max(nbytes, 1)))


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    top = argparse.ArgumentParser()
    sub = top.add_subparsers(dest="what", required=True)
    train = sub.add_parser("train")
    train.add_argument("impl", choices=["hvdtrain", "tensorflow", "horovod", "ddp", "local"])
    train.add_argument("spec")
    train.add_argument("out")
    train.add_argument("--windows", type=int, default=1)
    train.add_argument("--steps", type=int, default=10)
    train.add_argument("--warmup", type=int, default=3)
    train.add_argument("--placement", choices=["host", "resident"], default="host",
                       help="resident: the hand-written loops keep every batch on the GPU")
    train.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                       help="override a spec value (as hvdtrain bench was given)")
    train.add_argument("--profile", help="write torch.profiler's table and trace of the last window here")
    reduce = sub.add_parser("allreduce")
    reduce.add_argument("impl", choices=["horovod", "torch"])
    reduce.add_argument("out")
    reduce.add_argument("--sizes", required=True)
    reduce.add_argument("--gpu", action="store_true", help="reduce GPU tensors (NCCL)")
    args = top.parse_args()
    result = time_training(args) if args.what == "train" else time_allreduce(args)
    if result["rank"] == 0:
        Path(args.out).write_text(json.dumps(result))
    leave()
    # Skip the interpreter's teardown: gloo's threads can still be joinable when C++
    # static destructors run and abort the process ("terminate called without an
    # active exception") after everything was measured and written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def leave() -> None:
    """Take down torch.distributed's process group together: a rank leaving with
    it still up can abort in gloo's threads ("terminate called without an active
    exception"), which torchrun reports as a failure. Shut Horovod down, which
    finalises MPI where Horovod started it (mpirun counts a rank that exits
    without MPI_Finalize as failed)."""
    for name in ("horovod.torch", "horovod.tensorflow"):
        hvd = sys.modules.get(name)
        if hvd is not None and hvd.is_initialized():
            hvd.shutdown()
    try:
        import torch.distributed as dist
    except ImportError:  # a TensorFlow-only environment
        return
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
