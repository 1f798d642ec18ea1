"""PyTorch backend: models (built-in or from user code), losses, Horovod set-up,
one epoch of training, export; the input pipeline is `torch_input`."""
from __future__ import annotations

import copy
import hashlib
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
from ..data import Batch, Dataset, Preprocessing
from ..errors import UserError
from ..spec import CNNSpec, CustomModelSpec, JobSpec, MLPSpec, OptimizerSpec, TrainSpec, is_transformers, model_from_dict
from ..train import startup
from ..train.contract import Comm, Steps, Training, bucket_indices, horovod_comm, step_seed
from ..train.elastic import run_elastic
from ..train.loop import run_epochs
from ..train.lr import scaled_lr
from ..train.preflight import built_on_every_rank, preflight
from ..train.resume import resume
from . import text_models
from .torch_input import make_loader, to_device

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


def make_model(section: MLPSpec | CNNSpec | CustomModelSpec, dataset: Dataset) -> nn.Module:
    """The model section's: built in, from the user's builder, or a Hugging Face class
    built from its config (on text, taking token ids: `text_models`)."""
    prep = dataset.preprocessing
    shape, outputs = prep.input_shape, dataset.outputs
    if not isinstance(section, CustomModelSpec):
        return build_model(section, shape, outputs)
    if is_transformers(section):
        return text_models.build(section, prep)
    model = plugins.build_model(section, shape, outputs)
    if not isinstance(model, nn.Module):
        raise UserError(f"model.builder: {section.builder} returned a {type(model).__name__}, "
                        "not a torch.nn.Module")
    return text_models.wrapped(model, prep) if prep.text else model


def make_loss(loss: str, prep: Preprocessing) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if prep.task == "language_modeling" and loss == "cross_entropy":
        return text_models.next_token_loss(prep.pad_id if prep.ignore_pad else None)
    return LOSSES[loss] if loss in LOSSES else plugins.load_loss(loss)


def make_optimizer(opt: OptimizerSpec, params, lr: float, on_gpu: bool = False) -> torch.optim.Optimizer:
    """The optimizer section's: sgd, adam, or a class by import path called as
    cls(params, lr=lr, **args). sgd and adam on a GPU: one fused kernel updates every
    parameter (optimizer.fused), where the foreach kernels launch several per group."""
    if ":" in opt.name:
        return plugins.checked(plugins.load(opt.name, "optimizer.name"), (params,), {"lr": lr, **opt.args},
                               torch.optim.Optimizer, "optimizer.name", opt.name)
    fused = on_gpu if opt.fused is None else opt.fused
    if opt.name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=opt.weight_decay, fused=fused or None)
    return torch.optim.SGD(params, lr=lr, momentum=opt.momentum, weight_decay=opt.weight_decay,
                           fused=fused or None)


def setup(spec: JobSpec, dataset: Dataset) -> Training:
    """Horovod's set-up for training (init, pin, scale, wrap). `fit` goes on from
    here; `hvdtrain bench` times the steps."""
    hvd = import_horovod("torch")

    # Horovod: initialise.
    hvd.init()
    startup.mark("horovod")
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
        comm, lambda: (placed(make_model(spec.model, dataset), device, spec.train.channels_last),
                       make_loss(spec.loss, dataset.preprocessing)),
        elastic=spec.horovod.elastic is not None)
    # Horovod's grouped allreduce takes dense tensors: sparse gradients go one at a time
    sparse = [n or "model" for n, m in model.named_modules()
              if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]
    if sparse and spec.horovod.bucket_mb and comm.rank == 0:
        print(f"hvdtrain: sparse gradients ({', '.join(sparse)}): Horovod allreduces them one at a time, "
              "so horovod.bucket_mb does not apply to this model", flush=True)
    # Horovod: scale the learning rate by the number of workers (the loop sets it
    # at every step from the same rule, with warm-up).
    lr = scaled_lr(spec.optimizer, spec.horovod.adasum, comm)
    # Horovod: wrap the optimizer so gradients are allreduced before each step.
    optimizer = hvd.DistributedOptimizer(
        make_optimizer(spec.optimizer, model.parameters(), lr, on_gpu=use_cuda),
        named_parameters=model.named_parameters(),
        # buckets agreed by a broadcast when the optimizer is built, which a worker joining a
        # running elastic job would call alone: elastic training reduces gradient by gradient
        groups=None if spec.horovod.adasum or spec.horovod.elastic or sparse else buckets(
            list(model.parameters()), spec.horovod.bucket_mb),
        compression=hvd.Compression.fp16 if spec.horovod.fp16_compression else hvd.Compression.none,
        backward_passes_per_step=spec.horovod.backward_passes_per_step,
        op=hvd.Adasum if spec.horovod.adasum else hvd.Average)

    prep = dataset.preprocessing
    example = dataset.val.batch(np.arange(min(2, len(dataset.val))))[0]
    example = prep.apply(example) if prep.image_size else example  # image files come as uint8
    steps = make_steps(spec, model, optimizer, loss_fn, device, comm.rank, example, hvd,
                       prep.pixel_affine() if prep.image_size else None)
    startup.mark("model")
    return Training(hvd=hvd, comm=comm, model=model, optimizer=optimizer, steps=steps,
                    make_comm=lambda: horovod_comm(hvd, torch.from_numpy, hierarchical))


def buckets(params: list[torch.Tensor], bucket_mb: float) -> list[list[torch.Tensor]] | None:
    """The trainable parameters in buckets for Horovod's grouped allreduces (`bucket_indices`)."""
    trainable = [p for p in params if p.requires_grad]
    found = bucket_indices([p.numel() * p.element_size() for p in trainable], bucket_mb)
    return None if found is None else [[trainable[i] for i in group] for group in found]


def placed(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """The model on the rank's device; its 4-d weights in channels-last order if asked."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def compiled(model: torch.nn.Module | Callable, train: TrainSpec) -> Callable:
    """torch.compile's version of a module or function in train.compile_mode, with static shapes: a batch of
    another size (validation's last) gets a graph of its own instead of turning the
    batch dimension dynamic, a slower graph, for the rest of the run."""
    return torch.compile(model, dynamic=False, mode=train.compile_mode)


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
        preflight(spec.train, dataset, comm, steps, expected_size)  # same parameters and step counts everywhere
        start = resume(spec, comm, steps)  # rank 0 loads the latest valid checkpoint
        # Horovod: broadcast initial (or resumed) model and optimizer state from rank 0.
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        broadcast_optimizer_state(hvd, optimizer, comm)
        startup.mark("sync")
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
    # parameters; checkpoints, buffers and exports keep using the plain model.
    forward = compiled(model, spec.train) if spec.train.compile else model

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
            loss = float(loss_of(out, to_device(y, device))) * len(y)
            # a language model's outputs at every position: its most likely tokens (not [n, length, vocab])
            return (out.argmax(-1) if out.ndim == 3 else out).cpu().numpy(), loss

    def export(directory: Path) -> None:
        save_model(model, spec, directory, example)

    def average_buffers() -> None:
        buffers = [b for b in model.buffers() if b.is_floating_point()]
        if buffers:
            averaged = hvd.grouped_allreduce(buffers, op=hvd.Average, name="hvdtrain.buffers")
            with torch.no_grad():
                for buffer, value in zip(buffers, averaged):
                    buffer.copy_(value)

    return Steps(train_epoch=train_epoch, evaluate_batch=evaluate_batch, loader=make_loader(spec.data, device),
                 state_bytes=state_bytes, load_state_bytes=load_state_bytes,
                 weights_digest=lambda: weights_digest(model), export=export,
                 parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
                 signature=[(n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters()],
                 average_buffers=average_buffers)


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
    (program.pt2) that loads without the user's code. A Hugging Face model: its
    save_pretrained files and tokenizer instead (`text_models.save`)."""
    if not isinstance(model, text_models.TextModel):
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, directory / "weights.pt")
    # the directories user code came from: a custom model's, or data.augment's (predict)
    config = {"backend": "torch", "task": spec.task, "model": spec.model.model_dump(mode="json"),
              "import_paths": plugins.added_paths()}
    if isinstance(model, text_models.TextModel):  # save_pretrained's files and the tokenizer
        config.update(text_models.save(model, directory))
    elif isinstance(spec.model, CustomModelSpec):
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
    if config.get("transformers"):
        return text_models.load_model(directory, config["transformers"])
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
