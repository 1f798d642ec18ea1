"""PyTorch backend: models (built-in or from user code), losses, Horovod set-up,
one epoch of training, export."""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import io
import json
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import import_horovod
from .. import plugins
from ..data import ArraySamples, Batch, Dataset, Preprocessing, Samples, loader_failure
from ..errors import DataError, UserError
from ..train.contract import Comm, Steps, Training, horovod_comm, step_seed
from ..train.elastic import run_elastic
from ..train.loop import run_epochs
from ..train.lr import scaled_lr
from ..train.preflight import built_on_every_rank, preflight
from ..train.resume import resume
from ..spec import IMAGE_SOURCES, CNNSpec, CustomModelSpec, DataSpec, JobSpec, MLPSpec, OptimizerSpec, model_from_dict

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}
# (outputs, targets) -> the batch's mean loss. Regression models have one output per sample.
LOSSES = {
    "cross_entropy": F.cross_entropy,
    "mse": lambda out, y: F.mse_loss(out.reshape(-1), y),
    "mae": lambda out, y: F.l1_loss(out.reshape(-1), y),
    "huber": lambda out, y: F.huber_loss(out.reshape(-1), y),
}
PROGRAM = "program.pt2"  # a custom model exported with torch.export


def build_model(model: MLPSpec | CNNSpec, input_shape: list[int], num_classes: int) -> nn.Module:
    """The spec's network. Glorot-uniform weights and zero biases (Keras' defaults,
    so both backends start from the same scheme and parameter counts)."""
    layers: list[nn.Module] = []
    act = ACTIVATIONS[model.activation]
    if isinstance(model, CNNSpec):
        channels, height, width = input_shape
        for out in model.channels:
            layers += [nn.Conv2d(channels, out, model.kernel_size, padding="same"), act()]
            if height >= 2 and width >= 2:
                layers.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            channels = out
        features = channels * height * width
    else:
        features = int(np.prod(input_shape))
    layers.append(nn.Flatten())
    for size in model.hidden:
        layers += [nn.Linear(features, size), act()]
        if model.dropout > 0:
            layers.append(nn.Dropout(model.dropout))
        features = size
    layers.append(nn.Linear(features, num_classes))
    net = nn.Sequential(*layers)
    for module in net.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    return net


def make_model(spec: JobSpec, dataset: Dataset) -> nn.Module:
    """The spec's model: built in, or from the user's builder."""
    shape, outputs = dataset.preprocessing.input_shape, dataset.outputs
    if not isinstance(spec.model, CustomModelSpec):
        return build_model(spec.model, shape, outputs)
    model = plugins.build_model(spec.model, shape, outputs)
    if not isinstance(model, nn.Module):
        raise UserError(f"model.builder: {spec.model.builder} returned a {type(model).__name__}, "
                        "not a torch.nn.Module")
    return model


def make_loss(loss: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return LOSSES[loss] if loss in LOSSES else plugins.load_loss(loss)


def make_optimizer(opt: OptimizerSpec, params, lr: float) -> torch.optim.Optimizer:
    if opt.name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=opt.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=opt.momentum, weight_decay=opt.weight_decay)


def setup(spec: JobSpec, dataset: Dataset) -> Training:
    """Horovod's set-up for training (init, pin, scale, wrap). `fit` goes on from
    here; `hvdtrain bench` times the steps."""
    hvd = import_horovod("torch")

    # Horovod: initialise.
    hvd.init()
    # Horovod: pin the device to the local rank (one GPU per process, or CPU threads).
    use_cuda = spec.resources.gpus_per_worker > 0 and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(hvd.local_rank())
    device = torch.device("cuda", hvd.local_rank()) if use_cuda else torch.device("cpu")
    if spec.train.precision == "fp16" and not use_cuda:
        raise UserError("train.precision fp16 needs a GPU (resources.gpus_per_worker and CUDA); "
                        "on CPU use bf16")
    if use_cuda:
        print(f"rank {hvd.rank()} (local rank {hvd.local_rank()}) trains on {device}: "
              f"{torch.cuda.get_device_name(device)}", flush=True)
    torch.set_num_threads(spec.resources.cpus_per_worker)
    if use_cuda:  # cuDNN picks the fastest convolution for each input shape (a few: batches differ by one)
        torch.backends.cudnn.benchmark = True
    hierarchical = use_cuda and hvd.nccl_built()
    comm = horovod_comm(hvd, torch.from_numpy, hierarchical)

    torch.manual_seed(spec.train.seed)
    # User code may fail on one rank only: every rank learns of it before any other collective.
    model, loss_fn = built_on_every_rank(
        comm, lambda: (placed(make_model(spec, dataset), device, spec.train.channels_last),
                       make_loss(spec.loss)),
        elastic=spec.horovod.elastic is not None)
    # Horovod: scale the learning rate by the number of workers (the loop sets it
    # at every step from the same rule, with warm-up).
    lr = scaled_lr(spec.optimizer, spec.horovod.adasum, comm)
    # Horovod: wrap the optimizer so gradients are allreduced before each step.
    optimizer = hvd.DistributedOptimizer(
        make_optimizer(spec.optimizer, model.parameters(), lr),
        named_parameters=model.named_parameters(),
        compression=hvd.Compression.fp16 if spec.horovod.fp16_compression else hvd.Compression.none,
        backward_passes_per_step=spec.horovod.backward_passes_per_step,
        op=hvd.Adasum if spec.horovod.adasum else hvd.Average)

    prep = dataset.preprocessing
    example = dataset.val.batch(np.arange(min(2, len(dataset.val))))[0]
    example = prep.apply(example) if prep.image_size else example  # image files come as uint8
    steps = make_steps(spec, model, optimizer, loss_fn, device, comm.rank, example, hvd,
                       prep.pixel_affine() if prep.image_size else None)
    return Training(hvd=hvd, comm=comm, model=model, optimizer=optimizer, steps=steps,
                    make_comm=lambda: horovod_comm(hvd, torch.from_numpy, hierarchical))


def placed(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """The model on the rank's device; its 4-d weights in channels-last order if asked."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def in_order(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A batch of images (4-d) in channels-last order if asked; anything else as it is."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x


def fit(spec: JobSpec, dataset: Dataset, expected_size: int | None = None,
        progress: Callable[[str], None] | None = None) -> dict:
    """Train on this rank; expected_size: the ranks the launcher started, where it knows."""
    job = setup(spec, dataset)
    hvd, comm, model, optimizer, steps = job.hvd, job.comm, job.model, job.optimizer, job.steps
    try:
        if spec.horovod.elastic:  # Horovod elastic: resume and broadcast happen in run_elastic
            return run_elastic(spec, dataset, job.make_comm, steps,
                               lambda **attributes: elastic_state(hvd, model, optimizer, **attributes),
                               hvd.elastic.run, progress)
        preflight(spec, dataset, comm, steps, expected_size)  # same parameters and step counts everywhere
        start = resume(spec, comm, steps)  # rank 0 loads the latest valid checkpoint
        # Horovod: broadcast initial (or resumed) model and optimizer state from rank 0.
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        broadcast_optimizer_state(hvd, optimizer, comm)
        # Horovod: checkpoint on rank 0 only -- inside run_epochs.
        return run_epochs(spec, dataset, comm, steps, start, progress)
    finally:
        steps.loader.close()


def elastic_state(hvd, model: nn.Module, optimizer, **attributes):
    """Horovod's TorchState, with the model sent again after each sync.

    TorchState syncs the model, then the optimizer; a worker that joins with an
    empty optimizer takes a zero-gradient step first, which with weight decay
    or momentum moves its weights away from the model just received."""
    class State(hvd.elastic.TorchState):
        def sync(self):
            super().sync()
            hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    return State(model=model, optimizer=optimizer, **attributes)


def broadcast_optimizer_state(hvd, optimizer: torch.optim.Optimizer, comm: Comm) -> None:
    """Rank 0's optimizer state on every rank.

    Horovod's broadcast_optimizer_state takes an optimizer step with zero
    gradients to create missing state; on a resumed run only ranks != 0 take it,
    so the ranks disagree on which collectives to run. Sending the state dict
    as an object has no such step and suits the small states trained here.
    """
    state = hvd.broadcast_object(optimizer.state_dict(), root_rank=0, name="hvdtrain.optimizer")
    if comm.rank != 0:
        optimizer.load_state_dict(state)


def make_steps(spec: JobSpec, model: nn.Module, optimizer, loss_fn, device: torch.device, rank: int,
               example: np.ndarray, hvd, pixel_affine: tuple[np.ndarray, np.ndarray] | None = None) -> Steps:
    """example: a couple of inputs, to trace a custom model for export; pixel_affine:
    image files' per-channel (scale, shift), which normalise uint8 batches on the device."""
    passes = spec.horovod.backward_passes_per_step
    clip = spec.train.grad_clip_norm
    # The step's random numbers (dropout) come from the CPU's generator and this rank's
    # GPU's: seeding these two gives what torch.manual_seed gives, without its cost per
    # step (it also seeds every other backend, recording a stack trace for each one
    # not initialised: about 0.3 ms, as much as a small model's whole step on a GPU).
    generators = [torch.default_generator]
    if device.type == "cuda":
        generators.append(torch.cuda.default_generators[device.index])

    def seed_generators(seed: int) -> None:
        for generator in generators:
            generator.manual_seed(seed)

    # mixed precision: the forward pass under autocast; fp16 also scales the loss, so
    # that small gradients survive in float16 (bf16 has float32's range)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.train.precision)
    autocast = lambda: torch.autocast(device.type, dtype=low, enabled=low is not None)  # noqa: E731
    scaler = torch.amp.GradScaler(device.type) if spec.train.precision == "fp16" else None

    # torch.compile: the steps call the compiled module, which shares the model's
    # parameters; checkpoints, buffers and exports keep using the plain model
    forward = torch.compile(model) if spec.train.compile else model

    affine = None if pixel_affine is None else \
        tuple(torch.from_numpy(a).reshape(1, -1, 1, 1).to(device) for a in pixel_affine)

    def inputs(x) -> torch.Tensor:
        x = to_device(x, device)
        if x.dtype == torch.uint8:  # image files travel as uint8, a quarter of float32's bytes
            x = torch.addcmul(-affine[1], x.float(), affine[0])
        return in_order(x, spec.train.channels_last)

    def loss_of(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = loss_fn(outputs, y)
        if not (isinstance(loss, torch.Tensor) and loss.ndim == 0):
            raise UserError(f"loss: {spec.loss} returned {describe(loss)}; expected the batch's mean "
                            "loss as a 0-dimensional torch tensor")
        return loss

    def train_epoch(epoch: int, batches: Iterable[Batch], lr_at: Callable[[int], float], first: int,
                    count: int) -> tuple[float, int]:
        model.train()
        # the loss is summed on the device and read once: reading it every step would
        # make the CPU wait for the GPU at each step
        total, seen = torch.zeros((), dtype=torch.float64, device=device), 0
        for i, (x, y) in enumerate(batches, start=first):
            seed_generators(step_seed(spec.train.seed, epoch, i, rank))
            if i % passes == 0:
                optimizer.zero_grad()
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(i)
                in_group = min(passes, count - i)
            with autocast():
                loss = loss_of(forward(inputs(x)), to_device(y, device))
            # Gradients of a group's passes add up: each pass carries its share.
            share = loss.float() / in_group if in_group > 1 or loss.dtype != torch.float32 else loss
            (scaler.scale(share) if scaler else share).backward()
            total.add_(loss.detach(), alpha=len(y))  # one kernel, summed in float64
            seen += len(y)
            if (i + 1) % passes == 0 or i + 1 == count:
                step()
        return total.item(), seen

    def step() -> None:
        if not (clip or scaler):
            optimizer.step()  # Horovod: allreduces the gradients, then steps
            return
        # Horovod: allreduce first, so that clipping and unscaling see the averaged gradients
        optimizer.synchronize()
        if scaler:
            scaler.unscale_(optimizer)
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        with optimizer.skip_synchronize():
            if scaler:
                scaler.step(optimizer)  # skipped where the gradients hold inf or NaN
                scaler.update()
            else:
                optimizer.step()

    def state_bytes() -> bytes:
        buffer = io.BytesIO()
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        if scaler:
            state["scaler"] = scaler.state_dict()
        torch.save(state, buffer)
        return buffer.getvalue()

    def load_state_bytes(payload: bytes) -> None:
        state = torch.load(io.BytesIO(payload), map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler and "scaler" in state:
            scaler.load_state_dict(state["scaler"])

    def evaluate_batch(x, y) -> tuple[np.ndarray, float]:
        model.eval()
        with torch.no_grad(), autocast():
            out = forward(inputs(x)).float()
            return out.cpu().numpy(), float(loss_of(out, to_device(y, device))) * len(y)

    def export(directory: Path) -> None:
        save_model(model, spec, directory, example)

    def average_buffers() -> None:
        buffers = [b for b in model.buffers() if b.is_floating_point()]
        if buffers:
            averaged = hvd.grouped_allreduce(buffers, op=hvd.Average, name="hvdtrain.buffers")
            with torch.no_grad():
                for buffer, value in zip(buffers, averaged):
                    buffer.copy_(value)

    return Steps(train_epoch=train_epoch, evaluate_batch=evaluate_batch, loader=make_loader(spec, device),
                 state_bytes=state_bytes, load_state_bytes=load_state_bytes,
                 weights_digest=lambda: weights_digest(model), export=export,
                 parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
                 signature=[(n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters()],
                 average_buffers=average_buffers)


class IndexBatches(torch.utils.data.Sampler):
    """The index batches of the loader's next pass, set by the loop (its sharding
    rule, and the position a resumed epoch starts at)."""

    def __init__(self):
        self.batches: list[np.ndarray] = []
        self.epoch: int | None = None  # a training epoch's batches; None: evaluation

    def __iter__(self):
        return ((batch, self.epoch) for batch in self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class BatchReader(torch.utils.data.Dataset):
    """A DataLoader's data set that reads a whole batch per index (an index batch)."""

    def __init__(self, samples: Samples, encoded: bool = False):
        self.samples, self.encoded = samples, encoded  # encoded: JPEGs left for the GPU to decode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[np.ndarray, int | None]) -> Batch:
        indices, epoch = item
        if self.encoded:
            return self.samples.encoded_batch(np.asarray(indices), epoch)
        return self.samples.batch(np.asarray(indices), epoch)


def make_loader(spec: JobSpec, device: torch.device) -> Callable[..., Iterable[Batch]]:
    """The input pipeline: one torch DataLoader per split, whose `data.workers`
    processes (kept from epoch to epoch) read `data.prefetch` batches each ahead,
    into page-locked memory when training on a GPU. On a GPU, arrays held in memory
    that fit (`data.on_device`) stay on the GPU and each batch is gathered there;
    other batches are read and pinned on a thread and copied to the GPU on a side
    stream one batch ahead, so that the copy overlaps the previous step."""
    loaders: dict[int, torch.utils.data.DataLoader] = {}
    resident: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}
    workers = spec.data.workers if spec.data else 0
    prefetch = spec.data.prefetch if spec.data else DataSpec.model_fields["prefetch"].default
    on_device = spec.data.on_device if spec.data else False
    on_gpu = decode_on_gpu(spec, device)

    def host_batches(samples: Samples, index_batches: list[np.ndarray], epoch: int | None) -> Iterable[Batch]:
        if id(samples) not in loaders:
            loaders[id(samples)] = torch.utils.data.DataLoader(
                BatchReader(samples, on_gpu), sampler=IndexBatches(), batch_size=None, num_workers=workers,
                pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                prefetch_factor=prefetch if workers else None)
        data_loader = loaders[id(samples)]
        data_loader.sampler.batches, data_loader.sampler.epoch = index_batches, epoch
        try:
            yield from data_loader
        except DataError as err:  # raised in a worker: its message, not the worker's traceback
            raise loader_failure(err) from None

    def loader(samples: Samples, index_batches: list[np.ndarray], epoch: int | None = None) -> Iterable[Batch]:
        """The batches at index_batches; epoch: a training epoch's (augmented) batches."""
        if device.type != "cuda":
            return host_batches(samples, index_batches, epoch)
        if id(samples) not in resident:
            resident[id(samples)] = device_arrays(samples, device, on_device)
        arrays = resident[id(samples)]
        if arrays is not None:
            return gathered_on_device(arrays, index_batches, device)
        if on_gpu:
            decoded = gpu_decoded(host_batches(samples, index_batches, epoch), samples, epoch, device)
            return (handed_over(*batch) for batch in threaded(decoded, prefetch))
        return copied_ahead(threaded(host_batches(samples, index_batches, epoch), prefetch), device)

    def close() -> None:
        """End the loader processes now. Kept from epoch to epoch, they would otherwise be
        ended at the interpreter's exit one by one, each join waiting out its timeout:
        144 s after the final line with 14 workers per split on a GPU machine."""
        for data_loader in loaders.values():
            iterator = data_loader._iterator  # torch's: the persistent workers' iterator
            if iterator is not None:
                for worker in getattr(iterator, "_workers", []):
                    worker.terminate()  # they hold nothing to save: training is over
                iterator._shutdown_workers()
                data_loader._iterator = None
        loaders.clear()

    loader.close = close
    return loader


def device_arrays(samples: Samples, device: torch.device, on_device: bool | None):
    """The arrays of in-memory samples on the GPU, where `data.on_device` allows (by
    default: where they need at most a quarter of the GPU's free memory); else None."""
    if on_device is False or not isinstance(samples, ArraySamples):
        return None
    x, y = np.asarray(samples.x), np.asarray(samples.y)
    if on_device is None:
        free, _ = torch.cuda.mem_get_info(device)
        if x.nbytes + y.nbytes > free // 4:
            return None
    return to_device(x, device), to_device(y, device)


GATHER_AT_ONCE = (32, 256 << 20)  # at most this many batches and bytes gathered on the GPU at once


def gathered_on_device(arrays: tuple[torch.Tensor, torch.Tensor], index_batches: list[np.ndarray],
                       device: torch.device, at_once: tuple[int, int] = GATHER_AT_ONCE) -> Iterable[Batch]:
    """Batches gathered on the GPU, several by one gather (their indices go over in
    one copy): each batch is then a slice, with no kernel of its own. A small model's
    step is bound by the CPU launching kernels, and two gathers a step cost 5 % of it;
    a large model's batches are gathered one by one (at_once bounds the memory)."""
    x, y = arrays
    if not index_batches:
        return
    batch_bytes = max(len(b) for b in index_batches) * (x[0].nbytes + y[0].nbytes)
    group = max(1, min(at_once[0], at_once[1] // max(batch_bytes, 1)))
    for first in range(0, len(index_batches), group):
        batches = index_batches[first:first + group]
        order = to_device(np.concatenate(batches).astype(np.int64), device)
        xs, ys = x.index_select(0, order), y.index_select(0, order)
        start = 0
        for batch in batches:
            yield xs[start:start + len(batch)], ys[start:start + len(batch)]
            start += len(batch)


def decode_on_gpu(spec: JobSpec, device: torch.device) -> bool:
    """Whether JPEG files are decoded on the GPU (nvJPEG, through torchvision): where
    data.decode is `gpu` and it can be (else a clear refusal). `auto` decodes on the
    CPU until a committed GPU report shows the GPU path faster."""
    data = spec.data
    if data is None or data.source not in IMAGE_SOURCES or data.decode != "gpu":
        return False
    users = ":" in (data.augment or "")
    if device.type != "cuda" or users or importlib.util.find_spec("torchvision") is None:
        why = "this rank has no GPU" if device.type != "cuda" else \
            "data.augment is your function (numpy, on the CPU)" if users else "torchvision is not installed"
        raise UserError(f"data.decode: gpu decodes JPEG files with torchvision on the GPU, and {why}; "
                        "set data.decode: cpu (or auto)")
    return True


def gpu_decoded(batches: Iterable, samples: Samples, epoch: int | None, device: torch.device) -> Iterable:
    """Batches of JPEG bytes (`EncodedImages.encoded_batch`) decoded by nvJPEG on a side
    stream, cropped, resized (bilinear, antialiased, as PIL resizes) and flipped there:
    (uint8 [n, 3, H, W], labels) on the GPU with the event that marks them ready. A batch
    nvJPEG cannot decode is decoded on the CPU, where data.on_bad_file applies."""
    from torchvision.io import ImageReadMode, decode_jpeg
    stream = torch.cuda.Stream(device)
    size = samples.preprocessing.image_size
    for parts, y in batches:
        with torch.cuda.stream(stream):
            try:
                images = decode_jpeg(list(parts["jpeg"]), mode=ImageReadMode.RGB, device=device) \
                    if len(parts["jpeg"]) else []
            except RuntimeError:
                x, y = samples.batch(parts["indices"].numpy(), epoch)
                yield (to_device(x, device), to_device(y, device)), stream.record_event()
                continue
            x = torch.empty((len(parts["indices"]), 3, *size), dtype=torch.uint8, device=device)
            for image, box, flip, at in zip(images, parts["box"].tolist(), parts["flip"].tolist(),
                                            parts["at"].tolist()):
                x[at] = cropped(image, box, flip, size)
            if len(parts["pixels_at"]):
                x[parts["pixels_at"].to(device)] = parts["pixels"].to(device, non_blocking=True)
            yield (x, to_device(y, device)), stream.record_event()


def cropped(image: torch.Tensor, box: list[float], flip: bool, size: list[int]) -> torch.Tensor:
    """The box of a decoded image [3, h, w], resized to size and flipped if asked."""
    left, top = int(box[0]), int(box[1])
    right, bottom = max(left + 1, round(box[2])), max(top + 1, round(box[3]))
    crop = image[:, top:bottom, left:right]
    if tuple(crop.shape[1:]) != tuple(size):
        crop = torch.nn.functional.interpolate(crop[None].float(), size=tuple(size), mode="bilinear",
                                               antialias=True, align_corners=False)[0]
        crop = crop.round_().clamp_(0, 255).to(torch.uint8)
    return crop.flip(-1) if flip else crop


def threaded(batches: Iterable[Batch], depth: int) -> Iterable[Batch]:
    """Iterate `batches` (reading, and pinning for the GPU) on a thread, `depth` ahead;
    an error there is raised here."""
    import queue
    import threading
    ahead: queue.Queue = queue.Queue(maxsize=max(1, depth))
    end, stop = object(), threading.Event()

    def produce() -> None:
        try:
            for batch in batches:
                while not stop.is_set():
                    try:
                        ahead.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ahead.put(end)
        except BaseException as err:  # noqa: BLE001 -- handed to the consumer
            ahead.put(err)

    thread = threading.Thread(target=produce, name="hvdtrain-loader", daemon=True)
    thread.start()
    try:
        while True:
            item = ahead.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def copied_ahead(batches: Iterable[Batch], device: torch.device) -> Iterable[Batch]:
    """Each batch's copy to the GPU is issued on a side stream while the previous
    batch is being used; a batch is handed over once its copy is done (on the GPU:
    the compute stream waits for the copy, the CPU does not)."""
    stream = torch.cuda.Stream(device)
    pending = None
    for x, y in batches:
        with torch.cuda.stream(stream):
            copied = (to_device(x, device), to_device(y, device))
            done = stream.record_event()
        if pending is not None:
            yield handed_over(*pending)
        pending = (copied, done)
    if pending is not None:
        yield handed_over(*pending)


def handed_over(copied: tuple[torch.Tensor, torch.Tensor], done) -> Batch:
    current = torch.cuda.current_stream()
    current.wait_event(done)
    for tensor in copied:
        tensor.record_stream(current)  # its memory is not reused before the step has used it
    return copied


def to_device(batch, device: torch.device) -> torch.Tensor:
    """A batch (numpy or tensor) on the rank's device. To a GPU it goes from page-locked
    memory without blocking: a copy from pageable memory would make the CPU wait for
    the GPU's previous step at every step, so the GPU would idle while the next one is
    queued."""
    tensor = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(batch))
    if tensor.dtype == torch.float64:
        tensor = tensor.float()
    if device.type != "cuda" or tensor.device == device:
        return tensor
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def describe(value) -> str:
    shape = getattr(value, "shape", None)
    return f"a {type(value).__name__}" + (f" of shape {tuple(shape)}" if shape is not None else "")


def outputs(model: nn.Module, x: np.ndarray, device: torch.device) -> np.ndarray:
    """The model's outputs (logits, or values for regression) in eval mode."""
    model.eval()
    return program_outputs(model, x, device)


def program_outputs(model, x: np.ndarray, device: torch.device) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)).cpu().numpy()


def weights_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_model(model: nn.Module, spec: JobSpec, directory: Path, example: np.ndarray | None = None) -> None:
    """A deployable model, no Horovod needed: weights plus what rebuilds the network
    (the spec's model section; for a custom model its builder and the directories
    its code came from), and for a custom model also a `torch.export` program
    (program.pt2) that loads without the user's code."""
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, directory / "weights.pt")
    # the directories user code came from: a custom model's, or data.augment's (predict)
    config = {"backend": "torch", "task": spec.task, "model": spec.model.model_dump(mode="json"),
              "import_paths": plugins.added_paths()}
    if isinstance(spec.model, CustomModelSpec):
        config["program"] = None if example is None else export_program(model, example, directory / PROGRAM)
    (directory / "model.json").write_text(json.dumps(config))


def export_program(model: nn.Module, example: np.ndarray, path: Path) -> str | None:
    """torch.export of the model in eval mode with a dynamic batch size, on the CPU
    (predict needs no GPU); the file's name, or None where the model cannot be
    exported (then predict rebuilds it)."""
    model = copy.deepcopy(model).cpu().eval()
    inputs = torch.from_numpy(np.ascontiguousarray(example, dtype=np.float32))
    try:
        program = torch.export.export(model, (inputs,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(program, path)
    except Exception as err:  # torch.export cannot take every model; the weights still are
        print(f"model: torch.export failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
              "predict will rebuild it with model.builder", flush=True)
        return None
    return path.name


def load_model(directory: Path) -> Callable[[np.ndarray], np.ndarray]:
    """The exported model as a function from preprocessed inputs to outputs (on CPU)."""
    config = json.loads((directory / "model.json").read_text())
    cpu = torch.device("cpu")
    if config.get("program") and (directory / config["program"]).is_file():
        program = torch.export.load(directory / config["program"]).module()
        return lambda x: program_outputs(program, x, cpu)
    prep = Preprocessing.load(directory / "preprocessing.json")
    section = model_from_dict(config["model"])
    if isinstance(section, CustomModelSpec):
        plugins.add_import_paths(config.get("import_paths", []))
        model = plugins.build_model(section, prep.input_shape, prep.outputs)
    else:
        model = build_model(section, prep.input_shape, prep.outputs)
    model.load_state_dict(torch.load(directory / "weights.pt", map_location="cpu", weights_only=True))
    return lambda x: outputs(model, x, cpu)
