"""TensorFlow backend (Keras 3): models, Horovod set-up, one epoch of training, export.

Same functions as the torch backend. Keras 3 variables work with Horovod's
tapes and broadcasts through the project's Horovod build (see
hvdtrain/horovod_build/fixes.py, KERAS3_FIXES).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .quiet import start_up_notices_hidden

# TensorFlow's C++ start-up chatter (CPU features, oneDNN notices) stays out of
# the user's terminal unless they set TF_CPP_MIN_LOG_LEVEL themselves.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

with start_up_notices_hidden():
    import tensorflow as tf  # (first: a missing TensorFlow is named as such)
    import keras

from . import import_horovod  # noqa: E402
from .tf_input import make_loader  # noqa: E402
from .. import plugins  # noqa: E402
from ..data import Batch, Dataset, Preprocessing  # noqa: E402
from ..errors import UserError  # noqa: E402
from ..train import startup
from ..train.contract import Steps, Training, bucket_indices, horovod_comm, step_seed  # noqa: E402
from ..train.elastic import run_elastic  # noqa: E402
from ..train.loop import run_epochs  # noqa: E402
from ..train.lr import scaled_lr  # noqa: E402
from ..train.preflight import built_on_every_rank, preflight  # noqa: E402
from ..train.resume import resume  # noqa: E402
from ..spec import (CNNSpec, CustomModelSpec, JobSpec, MLPSpec, OptimizerSpec,  # noqa: E402
                    ResourcesSpec, model_from_dict)

MODEL_FILE = "model.keras"
WEIGHTS_FILE = "model.weights.h5"  # a custom model Keras could not save whole


def _regression_error(out, y):
    return tf.reshape(out, [-1]) - y


def _huber(out, y):
    """torch's huber_loss with delta 1: 0.5 e^2 within 1, |e| - 0.5 beyond."""
    error = tf.abs(_regression_error(out, y))
    return tf.reduce_mean(tf.where(error <= 1.0, 0.5 * tf.square(error), error - 0.5))


# (outputs, targets) -> the batch's mean loss, the same formulas as the torch backend's.
LOSSES = {
    "cross_entropy": lambda out, y: tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=out)),
    "mse": lambda out, y: tf.reduce_mean(tf.square(_regression_error(out, y))),
    "mae": lambda out, y: tf.reduce_mean(tf.abs(_regression_error(out, y))),
    "huber": _huber,
}


def build_model(model: MLPSpec | CNNSpec, input_shape: list[int], num_classes: int) -> keras.Model:
    """The spec's network, layer for layer the torch backend's: Glorot-uniform
    weights and zero biases (Keras' defaults), so parameter counts match.
    Images arrive channels-first as in torch and are transposed to the
    channels-last layout that TensorFlow's CPU convolutions need."""
    layers: list[keras.layers.Layer] = [keras.Input(shape=tuple(input_shape))]
    if isinstance(model, CNNSpec):
        _, height, width = input_shape
        layers.append(keras.layers.Permute((2, 3, 1)))
        for out in model.channels:
            layers.append(keras.layers.Conv2D(out, model.kernel_size, padding="same",
                                              activation=model.activation))
            if height >= 2 and width >= 2:
                layers.append(keras.layers.MaxPooling2D(2))
                height, width = height // 2, width // 2
    layers.append(keras.layers.Flatten())
    for size in model.hidden:
        layers.append(keras.layers.Dense(size, activation=model.activation))
        if model.dropout > 0:
            layers.append(keras.layers.Dropout(model.dropout))
    layers.append(keras.layers.Dense(num_classes))
    return keras.Sequential(layers)


def make_model(model: MLPSpec | CNNSpec | CustomModelSpec, input_shape: list[int], outputs: int) -> keras.Model:
    """The spec's model: built in, or from the user's builder. Images arrive
    channels-first; a custom model gets them channels-last (Keras' layout, the one
    keras.applications expect), through a Permute in front of it, and is offered
    input_shape as [H, W, C]."""
    if not isinstance(model, CustomModelSpec):
        return build_model(model, input_shape, outputs)
    image = len(input_shape) == 3
    offered = [*input_shape[1:], input_shape[0]] if image else list(input_shape)
    net = plugins.build_model(model, offered, outputs)
    if not isinstance(net, keras.Model):
        raise UserError(f"model.builder: {model.builder} returned a {type(net).__name__}, not a keras.Model")
    if not image:
        return net
    return keras.Sequential([keras.Input(shape=tuple(input_shape)), keras.layers.Permute((2, 3, 1)), net])


def make_loss(loss: str):
    return LOSSES[loss] if loss in LOSSES else plugins.load_loss(loss)


def make_optimizer(opt: OptimizerSpec, lr: float) -> keras.optimizers.Optimizer:
    """Weight decay is not given to Keras (whose decay is decoupled): it is added
    to the gradients in the train step, as torch's SGD and Adam do. An optimizer by
    import path is called as cls(learning_rate=lr, **args)."""
    if ":" in opt.name:
        return plugins.checked(plugins.load(opt.name, "optimizer.name"), (), {"learning_rate": lr, **opt.args},
                               keras.optimizers.Optimizer, "optimizer.name", opt.name)
    if opt.name == "adam":
        return keras.optimizers.Adam(learning_rate=lr)
    return keras.optimizers.SGD(learning_rate=lr, momentum=opt.momentum)


def configure_tensorflow(resources: ResourcesSpec, local_rank: int) -> bool:
    """Pin this rank's GPU (by local rank) or its CPU threads; True if on a GPU."""
    gpus = tf.config.list_physical_devices("GPU") if resources.gpus_per_worker > 0 else []
    if gpus:
        gpu = gpus[local_rank % len(gpus)]
        tf.config.experimental.set_memory_growth(gpu, True)
        tf.config.set_visible_devices(gpu, "GPU")
    else:
        tf.config.set_visible_devices([], "GPU")
        # Same numbers for the same inputs, so a resumed run matches an uninterrupted one.
        tf.config.experimental.enable_op_determinism()
    tf.config.threading.set_intra_op_parallelism_threads(resources.cpus_per_worker)
    tf.config.threading.set_inter_op_parallelism_threads(resources.cpus_per_worker)
    return bool(gpus)


def setup(spec: JobSpec, dataset: Dataset) -> Training:
    """Horovod's set-up for training (init, pin, scale, wrap). `fit` goes on from
    here; `hvdtrain bench` times the steps."""
    hvd = import_horovod("tensorflow")

    # Horovod: initialise.
    hvd.init()
    startup.mark("horovod")
    # Horovod: pin the device to the local rank (one GPU per process, or CPU threads).
    on_gpu = configure_tensorflow(spec.resources, hvd.local_rank())
    hierarchical = on_gpu and hvd.nccl_built()
    comm = horovod_comm(hvd, tf.constant, hierarchical)

    keras.utils.set_random_seed(spec.train.seed)
    if spec.train.precision == "fp16":
        raise UserError("train.precision fp16: not with the TensorFlow backend (its loss scaling "
                        "and Horovod's tape are not combined here); use bf16")
    # Keras' mixed policy: layers compute in bfloat16 and keep float32 variables
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if spec.train.precision == "bf16" else "float32")
    # User code may fail on one rank only: every rank learns of it before any other collective.
    model, loss_fn = built_on_every_rank(
        comm, lambda: (make_model(spec.model, dataset.preprocessing.input_shape, dataset.outputs),
                       make_loss(spec.loss)), elastic=spec.horovod.elastic is not None)
    # creates the variables of a subclassed model
    model(dataset.preprocessing.apply(dataset.val.batch(np.arange(1))[0]), training=False)
    # Horovod: scale the learning rate by the number of workers (the loop sets it
    # at every step from the same rule, with warm-up).
    lr = scaled_lr(spec.optimizer, spec.horovod.adasum, comm)
    optimizer = make_optimizer(spec.optimizer, lr)
    # Keras 3 creates the optimizer's slots here, so rank 0 can load a checkpoint
    # into them and broadcast them before the first step.
    optimizer.build(model.trainable_variables)

    # Horovod: the gradient tape is wrapped so gradients are allreduced (in make_steps).
    steps = make_steps(spec, model, optimizer, loss_fn, hvd, comm.rank, dataset)
    startup.mark("model")
    return Training(hvd=hvd, comm=comm, model=model, optimizer=optimizer, steps=steps,
                    make_comm=lambda: horovod_comm(hvd, tf.constant, hierarchical))


def fit(spec: JobSpec, dataset: Dataset, expected_size: int | None = None,
        progress: Callable[[str], None] | None = None) -> dict:
    """Train on this rank; expected_size: the ranks the launcher started, where it knows."""
    job = setup(spec, dataset)
    hvd, comm, model, optimizer, steps = job.hvd, job.comm, job.model, job.optimizer, job.steps
    if spec.horovod.elastic:  # Horovod elastic: resume and broadcast happen in run_elastic
        return run_elastic(spec, dataset, job.make_comm, steps,
                           lambda **attributes: hvd.elastic.TensorFlowKerasState(model, optimizer, **attributes),
                           hvd.elastic.run, progress)
    preflight(spec.train, dataset, comm, steps, expected_size)  # same parameters and step counts everywhere
    start = resume(spec, comm, steps)  # rank 0 loads the latest valid checkpoint
    # Horovod: broadcast model and optimizer variables from rank 0. Upstream's
    # examples broadcast after the first step because older Keras optimizers
    # created their slots then; here they exist already, and broadcasting first
    # keeps a resumed run exactly on rank 0's checkpoint.
    hvd.broadcast_variables(model.weights, root_rank=0)
    hvd.broadcast_variables(optimizer.variables, root_rank=0)
    startup.mark("sync")
    # Horovod: checkpoint on rank 0 only -- inside run_epochs.
    return run_epochs(spec, dataset, comm, steps, start, progress)


def make_steps(spec: JobSpec, model: keras.Model, optimizer: keras.optimizers.Optimizer,
               loss_fn, hvd, rank: int, dataset: Dataset) -> Steps:
    passes = spec.horovod.backward_passes_per_step
    weight_decay = spec.optimizer.weight_decay
    clip = spec.train.grad_clip_norm
    params = model.trainable_variables
    compression = hvd.Compression.fp16 if spec.horovod.fp16_compression else hvd.Compression.none
    op = hvd.Adasum if spec.horovod.adasum else hvd.Average
    # Horovod's tape allreduces the gradients in buckets, one grouped allreduce each (as the torch backend)
    found = None if spec.horovod.adasum or spec.horovod.elastic else bucket_indices(
        [int(np.prod(p.shape)) * tf.as_dtype(p.dtype).size for p in params], spec.horovod.bucket_mb)
    groups = None if found is None else [[params[i] for i in group] for group in found]
    # (inputs, labels, a float scalar: the lr or a pass's share of its group)
    label_type = tf.int64 if dataset.preprocessing.task == "classification" else tf.float32
    prep = dataset.preprocessing
    affine = [tf.constant(a.reshape(1, -1, 1, 1)) for a in prep.pixel_affine()] if prep.image_size else None

    def inputs(x) -> tf.Tensor:
        """Model inputs; image files travel as uint8 and are normalised here."""
        if tf.as_dtype(x.dtype) == tf.uint8:
            return tf.cast(x, tf.float32) * affine[0] - affine[1]
        return tf.cast(x, tf.float32)

    signature = [tf.TensorSpec([None, *dataset.preprocessing.input_shape], tf.float32),
                 tf.TensorSpec([None], label_type), tf.TensorSpec([], tf.float32)]

    def loss_of(x, y, training: bool):
        loss = loss_fn(tf.cast(model(x, training=training), tf.float32), y)
        if getattr(getattr(loss, "shape", None), "rank", None) != 0:
            raise UserError(f"loss: {spec.loss} returned {type(loss).__name__} of shape "
                            f"{getattr(loss, 'shape', None)}; expected the batch's mean loss as a scalar tensor")
        return loss

    @tf.function(input_signature=signature[:2])
    def evaluate_step(x, y):
        out = tf.cast(model(x, training=False), tf.float32)
        return out, loss_fn(out, y)

    def apply(grads, lr) -> None:
        """grads: averaged over the ranks (Horovod's tape or the grouped allreduce)."""
        if clip:
            grads, _ = tf.clip_by_global_norm(grads, clip)
        if weight_decay:
            grads = [g + weight_decay * p.value for g, p in zip(grads, params)]
        optimizer.learning_rate.assign(lr)
        optimizer.apply_gradients(zip(grads, params))

    @tf.function(input_signature=signature)
    def step(x, y, lr):
        """One batch: Horovod's tape allreduces the gradients, then the update."""
        with tf.GradientTape() as tape:
            loss = loss_of(x, y, True)
        # sparse_as_dense: an Embedding's gradient (IndexedSlices) allreduced as a dense tensor, as DDP
        # does; Horovod's grouped allreduce of IndexedSlices inside a tf.function fails (no dense_shape)
        tape = hvd.DistributedGradientTape(tape, compression=compression, op=op, groups=groups,
                                           sparse_as_dense=True)
        apply(tape.gradient(loss, params), lr)
        return loss

    # backward_passes_per_step > 1: Horovod's tape has no such option, so each
    # pass adds its share of the local gradient here and the group's sum is
    # allreduced once, as Horovod's DistributedOptimizer does.
    sums = [tf.Variable(tf.zeros_like(p.value), trainable=False) for p in params] if passes > 1 else []

    @tf.function(input_signature=signature)
    def accumulate(x, y, share):
        with tf.GradientTape() as tape:
            loss = loss_of(x, y, True)
        for total, grad in zip(sums, tape.gradient(loss, params)):
            total.assign_add(grad * share)
        return loss

    @tf.function(input_signature=[*signature, tf.TensorSpec([], tf.float32)])
    def accumulate_and_apply(x, y, lr, share):
        loss = accumulate(x, y, share)
        grads = hvd.grouped_allreduce([s.value() for s in sums], op=op, compression=compression)
        apply(grads, lr)
        for total in sums:
            total.assign(tf.zeros_like(total))
        return loss

    generators = seed_generators(model)

    def train_epoch(epoch: int, batches: Iterable[Batch], lr_at: Callable[[int], float], first: int,
                    count: int) -> tuple[float, int]:
        total, seen = 0.0, 0
        for i, (x, y) in enumerate(batches, start=first):
            seed_dropout(generators, step_seed(spec.train.seed, epoch, i, rank))
            if i % passes == 0:
                in_group = min(passes, count - i)
            share = tf.constant(1.0 / in_group)
            last = (i + 1) % passes == 0 or i + 1 == count
            args = (inputs(x), tf.cast(y, label_type))
            if passes == 1:
                loss = step(*args, tf.constant(lr_at(i), tf.float32))
            elif last:
                loss = accumulate_and_apply(*args, tf.constant(lr_at(i - i % passes), tf.float32), share)
            else:
                loss = accumulate(*args, share)
            total += tf.cast(loss, tf.float64) * len(y)  # read once, after the epoch
            seen += len(y)
        return float(total), seen

    def state_bytes() -> bytes:
        return variables_to_bytes({"model": model.weights, "optimizer": optimizer.variables})

    def load_state_bytes(payload: bytes) -> None:
        bytes_to_variables(payload, {"model": model.weights, "optimizer": optimizer.variables})

    def evaluate_batch(x, y) -> tuple[np.ndarray, float]:
        out, loss = evaluate_step(inputs(x), tf.cast(y, label_type))
        return np.asarray(out), float(loss) * len(y)

    def export(directory: Path) -> None:
        save_model(model, spec, directory)

    buffers = [v for v in model.non_trainable_variables if tf.as_dtype(v.dtype).is_floating]

    def average_buffers() -> None:
        if buffers:
            averaged = hvd.grouped_allreduce([v.value for v in buffers], op=hvd.Average,
                                             name="hvdtrain.buffers")
            for variable, value in zip(buffers, averaged):
                variable.assign(value)

    return Steps(train_epoch=train_epoch, evaluate_batch=evaluate_batch,
                 loader=make_loader(spec.data, dataset, label_type), state_bytes=state_bytes,
                 load_state_bytes=load_state_bytes, weights_digest=lambda: weights_digest(model),
                 export=export, parameters=sum(int(np.prod(v.shape)) for v in model.trainable_variables),
                 signature=[(v.path, tuple(v.shape), str(v.dtype)) for v in model.weights],
                 average_buffers=average_buffers)


def seed_generators(model: keras.Model) -> list:
    """The random seed generators of the model's layers (dropout), nested ones too
    (a custom model's own layers sit inside it)."""
    layers = model._flatten_layers() if hasattr(model, "_flatten_layers") else model.layers
    return [g for g in (getattr(layer, "seed_generator", None) for layer in layers) if g is not None]


def seed_dropout(generators: list, seed: int) -> None:
    """Per-rank, per-step dropout masks (as the torch backend's manual_seed): a run
    resumed at any step draws the same masks as an uninterrupted one."""
    for generator in generators:
        generator.state.assign(np.array([seed, 0], dtype=generator.state.dtype))


def variables_to_bytes(groups: dict[str, list]) -> bytes:
    """Values by group and position: Keras numbers layer names per process
    (dense, dense_1 ...), so names would not survive a restart."""
    arrays = {f"{group}/{i}": np.asarray(v.numpy())
              for group, variables in groups.items() for i, v in enumerate(variables)}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def bytes_to_variables(payload: bytes, groups: dict[str, list]) -> None:
    """Assign saved values; any mismatch of names or shapes is an error, never a partial load."""
    with np.load(io.BytesIO(payload), allow_pickle=False) as saved:
        wanted = [(f"{group}/{i}", v) for group, variables in groups.items()
                  for i, v in enumerate(variables)]
        if sorted(saved.files) != sorted(name for name, _ in wanted):
            raise ValueError("checkpoint variables do not match this model and optimizer")
        values = [(v, saved[name]) for name, v in wanted]
    for variable, value in values:
        if tuple(variable.shape) != value.shape:
            raise ValueError(f"checkpoint shape {value.shape} does not fit {variable.path}")
    for variable, value in values:
        variable.assign(value)


def outputs(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """The model's outputs (logits, or values for regression) in inference mode."""
    out = model(np.ascontiguousarray(x, dtype=np.float32), training=False)
    return np.asarray(tf.cast(out, tf.float32))


def weights_digest(model: keras.Model) -> str:
    digest = hashlib.sha256()
    for variable in model.weights:
        digest.update(str(tuple(variable.shape)).encode())
        digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
    return digest.hexdigest()


def save_model(model: keras.Model, spec: JobSpec, directory: Path) -> None:
    """A deployable model: Keras' own .keras file (loads with plain Keras, no Horovod;
    a custom model's own layers must be registered with
    keras.saving.register_keras_serializable, and their module is imported first).
    A custom model Keras cannot save whole is saved as weights, rebuilt by its builder."""
    # the directories user code came from: a custom model's, or data.augment's (predict)
    config = {"backend": "tensorflow", "task": spec.task, "model": spec.model.model_dump(mode="json"),
              "import_paths": plugins.added_paths()}
    try:
        model.save(directory / MODEL_FILE)
    except Exception as err:
        if not isinstance(spec.model, CustomModelSpec):
            raise
        print(f"model: Keras could not save {spec.model.builder}'s model whole ({type(err).__name__}: "
              f"{str(err).splitlines()[0][:200]}); saved its weights, rebuilt by the builder on load",
              flush=True)
        model.save_weights(directory / WEIGHTS_FILE)
    (directory / "model.json").write_text(json.dumps(config))


def load_model(directory: Path) -> Callable[[np.ndarray], np.ndarray]:
    """The exported model as a function from preprocessed inputs to outputs (on CPU)."""
    config = json.loads((directory / "model.json").read_text())
    prep = Preprocessing.load(directory / "preprocessing.json")
    section = model_from_dict(config["model"])
    if isinstance(section, CustomModelSpec):
        plugins.add_import_paths(config.get("import_paths", []))
        plugins.load(section.builder, "model.builder")  # its module registers its layers
        if not (directory / MODEL_FILE).is_file():
            model = make_model(section, prep.input_shape, prep.outputs)
            model.load_weights(directory / WEIGHTS_FILE)
            return lambda x: outputs(model, x)
    model = keras.saving.load_model(directory / MODEL_FILE, compile=False)
    if not isinstance(section, CustomModelSpec):
        expected = build_model(section, prep.input_shape, prep.outputs)
        if model.count_params() != expected.count_params():
            raise ValueError(f"{directory / MODEL_FILE} does not match model.json")
    return lambda x: outputs(model, x)
