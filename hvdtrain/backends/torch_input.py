"""The torch backend's input pipeline: one DataLoader per split whose worker
processes read index batches (`data.workers`, `data.prefetch`), pinned and copied
to the GPU a batch ahead on a side stream; data held in memory gathered on the
GPU; JPEG files decoded by nvJPEG on request (`data.decode: gpu`)."""
from __future__ import annotations

import importlib.util
import math
import os
import threading
import time
from typing import Callable, Iterable

import numpy as np
import torch

from ..data import ArraySamples, Batch, Samples, loader_failure
from ..data.image_samples import EncodedImages
from ..errors import DataError, UserError
from ..spec import IMAGE_SOURCES, DataSpec
from ..train.watchdog import register_loader_stacks


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
        if isinstance(self.samples, EncodedImages) and torch.utils.data.get_worker_info() is not None:
            # decoded straight into shared memory, as torch's own collation does in a loader
            # process: the batch then reaches the training process without another copy
            shape = (len(indices), 3, *self.samples.preprocessing.image_size)
            storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))
            out = torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
            _, y = self.samples.batch(np.asarray(indices), epoch, out=out.numpy())
            return out, y
        return self.samples.batch(np.asarray(indices), epoch)


def make_loader(data: DataSpec | None, device: torch.device) -> Callable[..., Iterable[Batch]]:
    """The input pipeline: one torch DataLoader per split, whose `data.workers`
    processes (kept from epoch to epoch) read `data.prefetch` batches each ahead,
    into page-locked memory when training on a GPU. On a GPU, arrays held in memory
    that fit (`data.on_device`) stay on the GPU and each batch is gathered there;
    other batches are read and pinned on a thread and copied to the GPU on a side
    stream one batch ahead, so that the copy overlaps the previous step."""
    loaders: dict[int, torch.utils.data.DataLoader] = {}
    resident: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}
    workers = data.workers if data else 0
    prefetch = data.prefetch if data else DataSpec.model_fields["prefetch"].default
    on_device = data.on_device if data else False
    on_gpu = decode_on_gpu(data, device)

    def host_batches(samples: Samples, index_batches: list[np.ndarray], epoch: int | None) -> Iterable[Batch]:
        if id(samples) not in loaders:
            loaders[id(samples)] = torch.utils.data.DataLoader(
                BatchReader(samples, on_gpu), sampler=IndexBatches(), batch_size=None, num_workers=workers,
                pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                prefetch_factor=prefetch if workers else None, worker_init_fn=ends_with_its_rank)
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


def ends_with_its_rank(worker_id: int) -> None:
    """In a loader process: end it within a second of its rank's end, however the rank
    ended (the watchdog's exit on a hang, SIGKILL). torch's own check runs only between
    batches, so a loader stuck in a read outlived its rank and held the job's output
    open; this one runs on a thread of its own. The loader writes its stacks to stderr
    when the watchdog asks its rank for stacks."""
    register_loader_stacks()
    rank = os.getppid()

    def watch() -> None:
        while os.getppid() == rank:
            time.sleep(1)
        os._exit(1)
    threading.Thread(target=watch, name="hvdtrain-rank-watch", daemon=True).start()


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


def decode_on_gpu(data: DataSpec | None, device: torch.device) -> bool:
    """Whether JPEG files are decoded on the GPU (nvJPEG, through torchvision): where
    data.decode is `gpu` and it can be (else a clear refusal). `auto` decodes on the
    CPU until a committed GPU report shows the GPU path faster."""
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
    stream, cropped, resized (bilinear, antialiased, as PIL resizes) and flipped there
    (`cropped_batch`, a handful of kernels for the batch):
    (uint8 [n, 3, H, W], labels) on the GPU with the event that marks them ready. A batch
    nvJPEG cannot decode is decoded on the CPU, where data.on_bad_file applies."""
    from torchvision.io import ImageReadMode, decode_jpeg
    stream = torch.cuda.Stream(device)
    size = samples.preprocessing.image_size
    for parts, y in batches:
        with torch.cuda.stream(stream):
            try:
                images = decode_jpeg(jpeg_files(parts["jpeg"], parts["ends"]), mode=ImageReadMode.RGB,
                                     device=device) if len(parts["ends"]) else []
            except RuntimeError:
                x, y = samples.batch(parts["indices"].numpy(), epoch)
                yield (to_device(x, device), to_device(y, device)), stream.record_event()
                continue
            x = torch.empty((len(parts["indices"]), 3, *size), dtype=torch.uint8, device=device)
            if len(images):
                x[parts["at"].to(device)] = cropped_batch(images, parts["box"], parts["flip"], size)
            if len(parts["pixels_at"]):
                x[parts["pixels_at"].to(device)] = parts["pixels"].to(device, non_blocking=True)
            yield (x, to_device(y, device)), stream.record_event()


PAD_BYTES = 512 << 20  # at most this much float32 a group of decoded images is padded into at once
MAX_SUBSAMPLES = 4  # per output pixel and axis when shrinking (the antialiasing's samples)


def jpeg_files(packed: torch.Tensor, ends: torch.Tensor) -> list[torch.Tensor]:
    """The files packed one after another in one (pinned) array, as views of it."""
    starts = [0, *ends.tolist()[:-1]]
    return [packed[start:end] for start, end in zip(starts, ends.tolist())]


def cropped_batch(images: list[torch.Tensor], boxes: torch.Tensor, flips: torch.Tensor,
                  size: list[int]) -> torch.Tensor:
    """Decoded images (uint8 [3, h, w], any sizes) cut to their boxes (left, top,
    right, bottom, in their pixels), resized to size and flipped left-right where
    asked: uint8 [n, 3, H, W], in a handful of kernels for a whole group of images
    rather than several an image (a batch of 256 launched one image at a time could
    not keep up with the step it feeds).
    Each output pixel is the mean of k x k bilinear samples spread over its footprint
    in the box (k: the batch's largest shrink factor, rounded up, at most
    MAX_SUBSAMPLES): bilinear where the box is enlarged, antialiased where it is
    shrunk, as PIL's and torchvision's antialiased resizes are; samples are clamped
    to the image's own pixels, as at the image's edges. Images are padded into one
    float tensor a group at a time (groups of similar size, at most PAD_BYTES)."""
    import torch.nn.functional as F
    n, (height, width) = len(images), size
    device = images[0].device if n else boxes.device
    out = torch.empty((n, 3, height, width), dtype=torch.uint8, device=device)
    if n == 0:
        return out
    boxes, flips = torch.as_tensor(boxes), torch.as_tensor(flips)
    shapes = [tuple(image.shape[1:]) for image in images]
    shrink = max(max((b[2] - b[0]) / width, (b[3] - b[1]) / height) for b in boxes.tolist())
    boxes, flips = boxes.to(device, torch.float32), flips.to(device)
    k = max(1, min(MAX_SUBSAMPLES, math.ceil(shrink - 1e-6)))
    order = sorted(range(n), key=lambda i: shapes[i][0] * shapes[i][1])
    group: list[int] = []
    for position, i in enumerate(order):
        group.append(i)
        last = position == n - 1
        if not last:
            h = max(shapes[j][0] for j in group + [order[position + 1]])
            w = max(shapes[j][1] for j in group + [order[position + 1]])
            if (len(group) + 1) * 3 * h * w * 4 <= PAD_BYTES:
                continue
        at = torch.tensor(group, device=device)
        if len({shapes[j] for j in group}) == 1:
            padded = torch.stack([images[j] for j in group]).float()
        else:
            h, w = max(shapes[j][0] for j in group), max(shapes[j][1] for j in group)
            # zeros: a sample at an image's last pixel centre weighs the pixel beyond it by 0,
            # and 0 x whatever uninitialised memory held (NaN) would not be 0
            padded = torch.zeros((len(group), 3, h, w), dtype=torch.float32, device=device)
            for slot, j in enumerate(group):
                padded[slot, :, :shapes[j][0], :shapes[j][1]].copy_(images[j])
        extent = torch.tensor([shapes[j] for j in group], dtype=torch.float32, device=device)  # (h, w)
        box, flip = boxes[at], flips[at]
        fy = (torch.arange(height * k, device=device) + 0.5) / (height * k)
        fx = (torch.arange(width * k, device=device) + 0.5) / (width * k)
        fx = torch.where(flip[:, None], 1 - fx, fx)
        # positions in each image's pixels (pixel i spans [i, i + 1]), kept within its pixel centres
        ys = (box[:, 1:2] + fy * (box[:, 3:4] - box[:, 1:2])).clamp(min=0.5).minimum(extent[:, :1] - 0.5)
        xs = (box[:, 0:1] + fx * (box[:, 2:3] - box[:, 0:1])).clamp(min=0.5).minimum(extent[:, 1:] - 0.5)
        grid = torch.stack(torch.broadcast_tensors(
            (2 * xs / padded.shape[3] - 1)[:, None, :], (2 * ys / padded.shape[2] - 1)[:, :, None]), dim=-1)
        sampled = F.grid_sample(padded, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if k > 1:
            sampled = F.avg_pool2d(sampled, k)
        out[at] = sampled.round_().clamp_(0, 255).to(torch.uint8)
        group = []
    return out


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
