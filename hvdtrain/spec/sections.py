"""The spec's sections: what each key of a job spec is, its type, default and
checks, as pydantic models (the job as a whole, and loading it, are `job`; the
data section is `data_section`, over the shared types in `base`)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from .. import storage
from .base import ImportPath, Section, Seed, Width

Activation = Literal["relu", "tanh", "gelu"]
SKLEARN_DATASETS = ("digits", "iris", "wine", "breast_cancer", "diabetes")
REGRESSION_DATASETS = ("diabetes",)
# Built-in losses by task; a loss may also be user code (an import path).
# language_modeling's cross_entropy: of each position's next token, padding ignored
LOSSES = {"classification": ("cross_entropy",), "regression": ("mse", "mae", "huber"),
          "language_modeling": ("cross_entropy",)}
DEFAULT_LOSS = {"classification": "cross_entropy", "regression": "mse", "language_modeling": "cross_entropy"}



class MLPSpec(Section):
    kind: Literal["mlp"]
    hidden: list[Width] = Field(default=[128, 64], max_length=64, description="sizes of the hidden layers")
    activation: Activation = "relu"
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="dropout after each hidden layer")


class CNNSpec(Section):
    kind: Literal["cnn"]
    channels: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        default=[16, 32], min_length=1, max_length=32, description="output channels of each conv block")
    kernel_size: Annotated[int, Field(ge=1, le=7)] = 3
    hidden: list[Width] = Field(default=[64], max_length=64, description="dense layers after the convs")
    activation: Activation = "relu"
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


class CustomModelSpec(Section):
    kind: Literal["custom"]
    builder: ImportPath = Field(description="returns a torch.nn.Module (torch) or a keras.Model "
                                            "(tensorflow); called with args, plus input_shape and "
                                            "num_classes (outputs) where its signature takes them")
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the builder")


ModelSpec = Annotated[Union[MLPSpec, CNNSpec, CustomModelSpec], Field(discriminator="kind")]


class EntrySpec(Section):
    """The user's own Horovod script, run in each rank instead of hvdtrain's loop."""
    script: Path | None = Field(default=None, description="a Python file, run as __main__")
    module: Annotated[str, Field(pattern=r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")] | None = Field(
        default=None, description="a module, run as `python -m MODULE`")
    args: list[str] = Field(default_factory=list, max_length=1000, description="its sys.argv[1:]")
    keras: Literal[2, 3] = Field(default=3, description=(
        "the Keras a TensorFlow script gets as tf.keras: 3 (TensorFlow 2.21's own) or 2 (the tf-keras "
        "package, TF_USE_LEGACY_KERAS=1: Horovod scripts written for TensorFlow <= 2.15, unchanged)"))

    @model_validator(mode="after")
    def _one(self) -> "EntrySpec":
        if (self.script is None) == (self.module is None):
            raise ValueError("give exactly one of entry.script and entry.module")
        return self


class OptimizerSpec(Section):
    name: Literal["sgd", "adam"] | ImportPath = Field(default="sgd", description=(
        "sgd, adam, or an optimizer class by import path (torch.optim:AdamW, "
        "keras.optimizers:AdamW, or your own), called with the parameters (torch) and the "
        "learning rate, plus args"))
    args: dict[str, Any] = Field(default_factory=dict, description=(
        "an optimizer by import path: its other keyword arguments (betas, weight_decay, ...)"))
    lr: float = Field(default=0.01, gt=0.0, le=10.0, description="learning rate for one worker")
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0, description="sgd only")
    weight_decay: float = Field(default=0.0, ge=0.0, lt=1.0, description=(
        "sgd and adam: L2 penalty added to the gradients (an optimizer by import path takes its "
        "own in args)"))
    fused: bool | None = Field(default=None, description=(
        "torch sgd and adam: update every parameter in one fused kernel; unset: fused where the "
        "model trains on a GPU, torch's foreach kernels on CPU"))

    @model_validator(mode="after")
    def _builtin_or_import_path(self) -> "OptimizerSpec":
        own = ":" in self.name
        if self.args and not own:
            raise ValueError(f"args are for an optimizer named by import path, not {self.name!r}")
        builtin_only = sorted({"momentum", "weight_decay", "fused"} & self.model_fields_set)
        if own and builtin_only:
            raise ValueError(f"{builtin_only[0]} is for sgd and adam; give {self.name} its options in "
                             "optimizer.args")
        return self
    lr_scaling: Literal["linear", "none"] = Field(
        default="linear", description="linear: lr x number of workers (Horovod's rule)")
    warmup_epochs: Annotated[float, Field(ge=0.0, le=1000)] = Field(
        default=0.0, description="ramp from lr to the scaled lr over this many epochs")
    schedule: Literal["constant", "cosine", "step", "plateau"] | ImportPath = Field(default="constant", description=(
        "after warm-up: constant; cosine (to 0 at the last epoch); step (x decay every "
        "decay_every_epochs); plateau (x decay when val_loss has not improved for patience epochs); "
        "or your function by import path, f(progress, epochs) -> the scaled lr's factor, progress "
        "in epochs since warm-up ended (a float), epochs the run's after warm-up"))
    decay: float = Field(default=0.1, gt=0.0, lt=1.0, description="step and plateau: the lr's factor")
    decay_every_epochs: Annotated[int, Field(ge=1, le=100_000)] = Field(default=30, description="step")
    patience: Annotated[int, Field(ge=1, le=100_000)] = Field(default=2, description="plateau")


# Validation metrics by task, and whether larger is better.
METRICS = {"classification": {"val_loss": False, "val_accuracy": True, "val_precision": True,
                              "val_recall": True, "val_f1": True, "train_loss": False},
           "regression": {"val_loss": False, "val_mae": False, "val_rmse": False, "val_r2": True,
                          "train_loss": False},
           "language_modeling": {"val_loss": False, "val_perplexity": False, "val_token_accuracy": True,
                                 "train_loss": False}}


class EarlyStoppingSpec(Section):
    metric: str = Field(default="val_loss", description="an epoch metric (metrics.jsonl)")
    patience: Annotated[int, Field(ge=1, le=100_000)] = Field(
        default=5, description="stop after this many epochs without improvement")
    min_delta: float = Field(default=0.0, ge=0.0, description="a smaller change is no improvement")


class TargetSpec(Section):
    metric: str = Field(default="val_accuracy", description="an epoch metric (metrics.jsonl)")
    value: float = Field(description="stop once the metric reaches it (at most, for a loss or error)")


class TrainSpec(Section):
    epochs: Annotated[int, Field(gt=0, le=100_000)] = 10
    batch_size: Annotated[int, Field(gt=0, le=1_000_000)] = Field(default=32, description=(
        "per worker: every training batch of every rank holds exactly this many samples"))
    last_batch: Literal["pad", "drop"] = Field(default="pad", description=(
        "when the training samples do not fill the last step: pad (repeat samples from the "
        "epoch's start, so that every sample is trained at least once an epoch) or drop (leave "
        "out the remainder, a different one each epoch)"))
    seed: Seed = 0
    early_stopping: EarlyStoppingSpec | None = Field(default=None, description=(
        "stop when the metric stops improving; the best epoch's weights are exported"))
    target: TargetSpec | None = Field(default=None, description="stop when the metric reaches a value")
    grad_clip_norm: float | None = Field(default=None, gt=0.0, description=(
        "clip the averaged gradients to this global L2 norm"))
    precision: Literal["fp32", "bf16", "fp16"] = Field(default="fp32", description=(
        "bf16/fp16: mixed precision (torch autocast, with loss scaling for fp16; Keras' mixed "
        "policy); fp16 needs a GPU"))
    compile: bool = Field(default=False, description=(
        "torch: train through torch.compile (the first steps of each run, and of evaluation, "
        "take longer while it compiles); checkpoints and exports keep the plain model"))
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = Field(default="default", description=(
        "torch.compile's mode with train.compile: default, or max-autotune-no-cudagraphs (tries "
        "kernel variants on the GPU for the fastest: a first compile of minutes)"))
    channels_last: bool = Field(default=False, description=(
        "torch: images and the model's 4-d weights in channels-last memory order (faster "
        "convolutions on GPUs, with bf16/fp16 most)"))


class SlurmSpec(Section):
    requeue: bool = Field(default=True, description=(
        "on preemption or near the time limit (Slurm's USR1), checkpoint where training is and requeue the job"))
    signal_seconds: Annotated[int, Field(ge=10, le=86_400)] = Field(
        default=120, description="USR1 this long before the time limit (sbatch --signal)")
    max_restarts: Annotated[int, Field(ge=0, le=1000)] = Field(
        default=3, description="requeue at most this many times (SLURM_RESTART_COUNT)")
    check_every_steps: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        default=10, description="how often the ranks agree on whether a stop was asked for (one small allreduce)")


class MlflowSpec(Section):
    tracking_uri: str = Field(min_length=1, description=(
        "the MLflow tracking server (http://host:5000, or a file: / sqlite: store)"))
    experiment: str | None = Field(default=None, min_length=1, description="default: the spec's name")
    run_name: str | None = Field(default=None, min_length=1, description="default: the spec's name")


class LogSpec(Section):
    level: Literal["quiet", "normal", "verbose"] = Field(default="normal", description=(
        "quiet: the final line only; verbose: also rank and pipeline details"))
    every_seconds: float = Field(default=30.0, gt=0.0, le=86_400.0, description=(
        "without a terminal (launchers pipe output): a progress line this often"))
    tensorboard: bool = Field(default=False, description="event files in <output>/tensorboard")
    every_steps: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        default=20, description="tensorboard: the training loss and lr every this many steps")
    mlflow: MlflowSpec | None = Field(default=None, description=(
        "MLflow tracking from rank 0: the resolved spec as parameters, every epoch's record as "
        "metrics, curves.png, summary.json and the model as artifacts; a resumed run goes on in "
        "the same MLflow run"))


class ElasticSpec(Section):
    min_workers: Annotated[int, Field(ge=1, le=100_000)] = Field(
        default=1, description="keep training while at least this many workers are alive")
    max_workers: Annotated[int, Field(ge=1, le=100_000)] = Field(
        description="never more workers than this")
    discovery: Path = Field(description="executable printing the available hosts, one 'host:slots' "
                                        "per line (horovodrun --host-discovery-script)")
    commit_every_steps: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        default=10, description="commit the training state in memory every N steps; a reset "
                                "goes back to the last commit")

    @model_validator(mode="after")
    def _range(self) -> "ElasticSpec":
        if self.max_workers < self.min_workers:
            raise ValueError("max_workers must be at least min_workers")
        return self


class HorovodSpec(Section):
    fp16_compression: bool = Field(default=False, description="send gradients as float16")
    backward_passes_per_step: Annotated[int, Field(gt=0, le=1024)] = 1
    adasum: bool = Field(default=False, description="Adasum reduction instead of averaging")
    stall_check_seconds: Annotated[int, Field(ge=0, le=86_400)] = Field(
        default=60, description="warn when ranks wait on a tensor this long (0: no stall check)")
    stall_shutdown_seconds: Annotated[int, Field(ge=0, le=86_400)] = Field(
        default=300, description="stop the job when ranks stall this long (0: never)")
    gloo_timeout_seconds: Annotated[int, Field(ge=1, le=86_400)] = Field(
        default=60, description="Gloo's timeout for connections and collectives")
    start_timeout_seconds: Annotated[int, Field(ge=1, le=86_400)] = Field(
        default=120, description="how long ranks may take to start and meet")
    hang_seconds: Annotated[int, Field(ge=0, le=86_400)] = Field(
        default=300, description=("end the job, naming the rank and with every rank's stack, when a rank "
                                  "makes no progress (a step, validation, a checkpoint) this long (0: never); "
                                  "more than the slowest step, validation or checkpoint"))
    elastic: ElasticSpec | None = Field(
        default=None, description="elastic training (hvdtrain run / horovodrun): workers may leave and join")
    fusion_threshold_mb: Annotated[float, Field(ge=0, le=4096)] = Field(
        default=64, description="tensor fusion buffer (Horovod's default 64 MiB; 0 turns fusion off)")
    cycle_time_ms: Annotated[float, Field(gt=0, le=10_000)] = Field(
        default=1.0, description="how often Horovod's background thread batches tensors (ms)")
    bucket_mb: Annotated[float, Field(ge=0, le=4096)] = Field(
        default=25, description=("gradients allreduced in buckets of about this many MiB, each one "
                                 "grouped allreduce (DDP's rule: in reverse order of the model's "
                                 "parameters, each closed by the parameter that brings it to the cap, "
                                 "the first one's 1 MiB; a parameter larger than the open bucket's cap "
                                 "starts the next; torch starts each from "
                                 "the backward pass once its gradients are computed); 0: one allreduce "
                                 "per gradient, as Horovod's optimizer and tape do by default, and as "
                                 "elastic training and Adasum do"))
    autotune: bool = Field(default=False, description="let Horovod tune fusion and cycle time")
    autotune_log: Path | None = Field(default=None, description="CSV of autotune's trials")
    timeline: Path | None = Field(default=None, description="write Horovod's Chrome-trace timeline here")

    @model_validator(mode="after")
    def _stall(self) -> "HorovodSpec":
        if self.stall_check_seconds and self.stall_shutdown_seconds and \
                self.stall_shutdown_seconds <= self.stall_check_seconds:
            raise ValueError("stall_shutdown_seconds must exceed stall_check_seconds")
        return self


class CheckpointSpec(Section):
    dir: Path | str | None = Field(default=None, description=(
        "a directory or a URL (s3://bucket/prefix...: each checkpoint one object, then its commit marker); "
        "default: <output>/checkpoints"))
    every_epochs: Annotated[int, Field(gt=0, le=100_000)] = 1
    every_steps: Annotated[int, Field(gt=0, le=100_000_000)] | None = Field(default=None, description=(
        "also checkpoint every this many steps within an epoch (with the loader's position: "
        "a resumed run goes on from that step)"))
    keep_last: Annotated[int, Field(gt=0, le=1000)] = 3

    _location = field_validator("dir")(lambda value: None if value is None else storage.location(value))


class ResourcesSpec(Section):
    workers: Annotated[int, Field(gt=0, le=100_000)] = Field(default=2, description="ranks in all")
    cpus_per_worker: Annotated[int, Field(gt=0, le=1024)] = Field(
        default=1, description="intra-op threads per rank")
    gpus_per_worker: Annotated[int, Field(ge=0, le=16)] = 0


