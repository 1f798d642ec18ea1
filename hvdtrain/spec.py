"""The job spec: YAML -> typed, validated `JobSpec`. One place.

Relative paths in a spec (data file, output, checkpoint dir) are taken from
the current working directory, the same for every launcher.
"""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator,
                      model_validator)

from .errors import SpecError
from .plugins import IMPORT_PATH, import_paths, missing_module, module_file, reference_problem

NonNegativeInt = Annotated[int, Field(ge=0)]
Activation = Literal["relu", "tanh", "gelu"]
SKLEARN_DATASETS = ("digits", "iris", "wine", "breast_cancer", "diabetes")
REGRESSION_DATASETS = ("diabetes",)
ImportPath = Annotated[str, Field(pattern=IMPORT_PATH, description="package.module:function")]
# Built-in losses by task; a loss may also be user code (an import path).
LOSSES = {"classification": ("cross_entropy",), "regression": ("mse", "mae", "huber")}
DEFAULT_LOSS = {"classification": "cross_entropy", "regression": "mse"}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


Width = Annotated[int, Field(ge=1, le=65_536)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


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

    @model_validator(mode="after")
    def _one(self) -> "EntrySpec":
        if (self.script is None) == (self.module is None):
            raise ValueError("give exactly one of entry.script and entry.module")
        return self


class SyntheticSpec(Section):
    samples: Annotated[int, Field(ge=2, le=10_000_000)] = 4096
    shape: list[Annotated[int, Field(ge=1, le=4096)]] = Field(default=[64], min_length=1, max_length=3,
                                     description="per-sample shape: [features] or [C, H, W]")
    classes: Annotated[int, Field(ge=2, le=100_000)] = 10


class CleanSpec(Section):
    missing: Literal["drop", "impute"] = Field(
        default="drop", description="rows with NaN/inf features: drop them, or fill with the column mean")
    duplicates: Literal["keep", "drop"] = Field(
        default="keep", description="rows whose features and label repeat an earlier row: keep or drop")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_KINDS = "/".join(s[1:].upper() for s in IMAGE_SUFFIXES)  # PNG/JPG/JPEG, for messages
IMAGE_SOURCES = ("image_folder", "webdataset")  # encoded images, decoded by the loader
LAZY_SOURCES = (*IMAGE_SOURCES, "custom")  # read by the loader's workers, batch by batch


class DataSpec(Section):
    source: Literal["digits", "iris", "wine", "breast_cancer", "diabetes", "file", "synthetic",
                    "image_folder", "webdataset", "custom"]
    path: Path | None = Field(default=None, description=(
        "file: .npz (arrays x, y), .csv, or .npy (x, memory-mapped; labels in y.npy beside it); "
        "image_folder: a directory with one folder of PNG/JPEG files per class, or train/ and val/ "
        "folders of such; webdataset: uncompressed tar shards of (image, .cls) samples: a directory "
        "(train-*.tar and val-*.tar as `hvdtrain shards` writes, else its *.tar), a brace pattern "
        "(train-{000000..000099}.tar) or a comma list"))
    labels: Path | None = Field(default=None, description=".npy labels for a .npy data.path "
                                                          "(default: y.npy in its directory)")
    label_column: str = Field(default="label", description="csv column holding the label (class or target)")
    image_shape: list[Annotated[int, Field(ge=1, le=4096)]] | None = Field(
        default=None, min_length=3, max_length=3,
        description="[C, H, W] of each sample for a cnn on file data")
    image_size: list[Annotated[int, Field(ge=1, le=8192)]] | None = Field(
        default=None, min_length=2, max_length=2, description=(
            "image_folder: [H, W] every image is resized to (an integer: square); default: the "
            "size of the first training image"))
    augment: Literal["standard", "none"] | ImportPath | None = Field(default=None, description=(
        "image_folder: `standard` (training: a random crop of 8-100 % of the area, aspect 3:4 to "
        "4:3, resized to image_size, flipped left-right half the time; validation, evaluate and "
        "predict: resized to image_size / 0.875 and the centre cut out), `none` (every image "
        "resized to image_size), or your function by import path, called as f(image, size, "
        "training, rng) with an RGB uint8 array [H, W, 3], (H, W) and a numpy Generator, returning "
        "[H, W, 3] of that size; default: standard"))
    on_bad_file: Literal["fail", "skip"] = Field(default="fail", description=(
        "image_folder: a file that cannot be decoded when a batch reads it (found by then: the "
        "index reads each file's header, not its pixels) stops the job with exit 2 (`fail`), or "
        "is replaced by another image of its batch, named once on stderr and counted in "
        "metrics.jsonl's skipped_files (`skip`); the path, rank and epoch are named either way"))
    decode: Literal["auto", "cpu", "gpu"] = Field(default="auto", description=(
        "image files, torch: where JPEG files are decoded: `cpu` (the loader's processes, "
        "libjpeg-turbo through Pillow), `gpu` (nvJPEG through torchvision; the crop, resize and flip "
        "on the GPU too; other formats on the CPU), `auto` (cpu, until a GPU report shows the gpu "
        "path faster)"))
    loader: ImportPath | None = Field(default=None, description=(
        "custom: returns (train, validation): map-style torch Datasets of (x, y) (torch), or "
        "arrays (x, y) / tf.data.Datasets (tensorflow); called with args, plus seed where its "
        "signature takes it"))
    args: dict[str, Any] = Field(default_factory=dict, description="custom: keyword arguments for the loader")
    synthetic: SyntheticSpec | None = None
    standardize: bool = Field(default=True, description="zero mean, unit variance from the training split")
    categorical: list[str] = Field(default_factory=list, max_length=10_000, description=(
        "csv columns of text categories, one-hot encoded (one feature per category)"))
    clean: CleanSpec = Field(default_factory=CleanSpec, description=(
        "what to do with bad rows; `drop` or `impute` alone set `missing`"))
    workers: Annotated[int, Field(ge=0, le=64)] | None = Field(default=None, description=(
        "loader processes (torch DataLoader) or parallel reads (tf.data) per rank; default: 2 for "
        "image_folder, custom and .npy, 0 (read in the training process) for data held in memory"))
    prefetch: Annotated[int, Field(ge=1, le=1024)] = Field(
        default=2, description="batches read ahead (per loader process with torch)")
    on_device: bool | None = Field(default=None, description=(
        "torch on a GPU: keep data held in memory on the GPU and take each batch there; "
        "default: where the arrays need at most a quarter of the GPU's free memory"))

    @field_validator("clean", mode="before")
    @classmethod
    def _clean_shorthand(cls, value):
        return {"missing": value} if isinstance(value, str) else value

    @field_validator("image_size", mode="before")
    @classmethod
    def _square(cls, value):
        return [value, value] if isinstance(value, int) else value
    validation_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    test_fraction: float = Field(default=0.0, ge=0.0, lt=1.0, description=(
        "held out before the validation split; only the final summary and `hvdtrain evaluate` see it"))
    seed: Seed = 0

    @property
    def memory_mapped(self) -> bool:
        return self.source == "file" and self.path is not None and self.path.suffix.lower() == ".npy"

    @model_validator(mode="after")
    def _source_fields(self) -> "DataSpec":
        if self.source in ("file", *IMAGE_SOURCES) and self.path is None:
            kind = {"file": "an .npz, .csv or .npy file", "image_folder": "a directory of class folders",
                    "webdataset": "tar shards: a directory, a brace pattern or a list"}[self.source]
            raise ValueError(f"source {self.source!r} needs data.path ({kind})")
        if self.source == "file" and self.path.suffix.lower() not in (".npz", ".csv", ".npy"):
            raise ValueError(f"data.path must end in .npz, .csv or .npy, got {str(self.path)!r}")
        if self.categorical and (self.source != "file" or self.path.suffix.lower() != ".csv"):
            raise ValueError("data.categorical names columns of a .csv file (source 'file')")
        if self.source not in ("file", *IMAGE_SOURCES) and self.path is not None:
            raise ValueError(f"data.path is only read with source 'file', 'image_folder' or 'webdataset', "
                             f"not {self.source!r}")
        if self.labels is not None and not self.memory_mapped:
            raise ValueError("data.labels names the labels of a .npy data.path")
        if self.image_size is not None and self.source not in IMAGE_SOURCES:
            raise ValueError("data.image_size applies to image files (source 'image_folder' or 'webdataset')")
        if (self.source == "custom") != (self.loader is not None):
            raise ValueError("source 'custom' needs data.loader (package.module:function), and "
                             "data.loader needs source 'custom'")
        if self.args and self.source != "custom":
            raise ValueError("data.args are the custom loader's arguments (source 'custom')")
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise ValueError("validation_fraction + test_fraction must leave samples to train on (< 1)")
        if self.test_fraction and self.source == "custom":
            raise ValueError("data.test_fraction: a custom loader makes its own split (it may return "
                             "(train, validation, test))")
        if self.source == "synthetic" and self.synthetic is None:
            self.synthetic = SyntheticSpec()
        if self.workers is None:
            self.workers = 2 if self.source in LAZY_SOURCES or self.memory_mapped else 0
        if self.augment is not None and self.source not in IMAGE_SOURCES:
            raise ValueError("data.augment applies to image files (source 'image_folder' or 'webdataset')")
        if self.on_bad_file != "fail" and self.source not in IMAGE_SOURCES:
            raise ValueError("data.on_bad_file applies to image files (source 'image_folder' or 'webdataset')")
        if self.decode != "auto" and self.source not in IMAGE_SOURCES:
            raise ValueError("data.decode applies to image files (source 'image_folder' or 'webdataset')")
        if self.augment is None and self.source in IMAGE_SOURCES:
            self.augment = "standard"
        return self


class OptimizerSpec(Section):
    name: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(default=0.01, gt=0.0, le=10.0, description="learning rate for one worker")
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0, description="sgd only")
    weight_decay: float = Field(default=0.0, ge=0.0, lt=1.0)
    lr_scaling: Literal["linear", "none"] = Field(
        default="linear", description="linear: lr x number of workers (Horovod's rule)")
    warmup_epochs: Annotated[float, Field(ge=0.0, le=1000)] = Field(
        default=0.0, description="ramp from lr to the scaled lr over this many epochs")
    schedule: Literal["constant", "cosine", "step", "plateau"] = Field(default="constant", description=(
        "after warm-up: constant; cosine (to 0 at the last epoch); step (x decay every "
        "decay_every_epochs); plateau (x decay when val_loss has not improved for patience epochs)"))
    decay: float = Field(default=0.1, gt=0.0, lt=1.0, description="step and plateau: the lr's factor")
    decay_every_epochs: Annotated[int, Field(ge=1, le=100_000)] = Field(default=30, description="step")
    patience: Annotated[int, Field(ge=1, le=100_000)] = Field(default=2, description="plateau")


# Validation metrics by task, and whether larger is better.
METRICS = {"classification": {"val_loss": False, "val_accuracy": True, "val_precision": True,
                              "val_recall": True, "val_f1": True, "train_loss": False},
           "regression": {"val_loss": False, "val_mae": False, "val_rmse": False, "val_r2": True,
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
    batch_size: Annotated[int, Field(gt=0, le=1_000_000)] = Field(default=32, description="per worker")
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


class LogSpec(Section):
    level: Literal["quiet", "normal", "verbose"] = Field(default="normal", description=(
        "quiet: the final line only; verbose: also rank and pipeline details"))
    every_seconds: float = Field(default=30.0, gt=0.0, le=86_400.0, description=(
        "without a terminal (launchers pipe output): a progress line this often"))
    tensorboard: bool = Field(default=False, description="event files in <output>/tensorboard")
    every_steps: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        default=20, description="tensorboard: the training loss and lr every this many steps")


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
    elastic: ElasticSpec | None = Field(
        default=None, description="elastic training (hvdtrain run / horovodrun): workers may leave and join")
    fusion_threshold_mb: Annotated[float, Field(ge=0, le=4096)] = Field(
        default=64, description="tensor fusion buffer (Horovod's default 64 MiB; 0 turns fusion off)")
    cycle_time_ms: Annotated[float, Field(gt=0, le=10_000)] = Field(
        default=1.0, description="how often Horovod's background thread batches tensors (ms)")
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
    dir: Path | None = Field(default=None, description="default: <output>/checkpoints")
    every_epochs: Annotated[int, Field(gt=0, le=100_000)] = 1
    every_steps: Annotated[int, Field(gt=0, le=100_000_000)] | None = Field(default=None, description=(
        "also checkpoint every this many steps within an epoch (with the loader's position: "
        "a resumed run goes on from that step)"))
    keep_last: Annotated[int, Field(gt=0, le=1000)] = 3


class ResourcesSpec(Section):
    workers: Annotated[int, Field(gt=0, le=100_000)] = Field(default=2, description="ranks in all")
    cpus_per_worker: Annotated[int, Field(gt=0, le=1024)] = Field(
        default=1, description="intra-op threads per rank")
    gpus_per_worker: Annotated[int, Field(ge=0, le=16)] = 0


class JobSpec(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
                      description="job name: letters, digits, '.', '_', '-'")
    backend: Literal["torch", "tensorflow"]
    model: ModelSpec | None = None
    data: DataSpec | None = None
    entry: EntrySpec | None = Field(
        default=None, description="run your own Horovod script in each rank; model, data, "
                                  "optimizer, train and checkpoint are then not used")
    code: list[Path] = Field(default_factory=list, max_length=64, description=(
        "directories to import user code from, besides the spec file's directory and the "
        "working directory"))
    task: Literal["classification", "regression"] = "classification"
    loss: str | None = Field(default=None, description=(
        "cross_entropy (classification); mse, mae, huber (regression); or package.module:function "
        "taking (outputs, targets) and returning the batch's mean loss as a framework tensor. "
        "Default: cross_entropy, or mse for regression"))
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    horovod: HorovodSpec = Field(default_factory=HorovodSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    log: LogSpec = Field(default_factory=LogSpec)
    slurm: SlurmSpec = Field(default_factory=SlurmSpec)
    output: Path | None = Field(default=None, description="run directory; default runs/<name>")

    @model_validator(mode="after")
    def _consistent(self) -> "JobSpec":
        if self.entry is None:
            missing = [k for k in ("model", "data") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"{' and '.join(missing)} required (or `entry` to run your own script)")
            self._task_rules()
        for key, section in (("train.early_stopping", self.train.early_stopping),
                             ("train.target", self.train.target)):
            if section is not None and section.metric not in METRICS[self.task]:
                raise ValueError(f"{key}.metric {section.metric!r} is not a {self.task} metric: use one "
                                 f"of {', '.join(METRICS[self.task])}")
        steered = [k for k, on in (("train.early_stopping", self.train.early_stopping is not None),
                                   ("train.target", self.train.target is not None),
                                   ("optimizer.schedule plateau", self.optimizer.schedule == "plateau"))
                   if on]
        if steered and self.horovod.elastic is not None:
            raise ValueError(f"{', '.join(steered)}: not with elastic training (its state would not "
                             "reach workers that join)")
        torch_only = [k for k, on in (("train.compile", self.train.compile),
                                      ("train.channels_last", self.train.channels_last)) if on]
        if torch_only and self.backend != "torch":
            raise ValueError(f"{' and '.join(torch_only)}: torch backend settings (TensorFlow's steps are "
                             "already compiled graphs, with images in channels-last order)")
        every = self.checkpoint.every_steps
        if every is not None and self.horovod.elastic is not None:
            raise ValueError("checkpoint.every_steps does not apply to elastic training: it commits "
                             "every horovod.elastic.commit_every_steps steps and checkpoints at epoch ends")
        if every is not None and every % self.horovod.backward_passes_per_step:
            raise ValueError(f"checkpoint.every_steps ({every}) must be a multiple of "
                             f"horovod.backward_passes_per_step ({self.horovod.backward_passes_per_step})")
        if self.output is None:
            self.output = Path("runs") / self.name
        if self.checkpoint.dir is None:
            self.checkpoint.dir = self.output / "checkpoints"
        return self

    def _task_rules(self) -> None:
        if self.loss is None:
            self.loss = DEFAULT_LOSS[self.task]
        if ":" not in self.loss and self.loss not in LOSSES[self.task]:
            other = next(t for t in LOSSES if self.loss in LOSSES[t]) if any(
                self.loss in v for v in LOSSES.values()) else None
            hint = f" (a {other} loss)" if other else ""
            raise ValueError(f"loss {self.loss!r}{hint} does not fit task {self.task!r}: use one of "
                             f"{', '.join(LOSSES[self.task])} or package.module:function")
        if ":" in self.loss and not re.match(IMPORT_PATH, self.loss):
            raise ValueError(f"loss {self.loss!r} is not an import path of the form package.module:function")
        if self.task == "regression" and self.data.source in SKLEARN_DATASETS and \
                self.data.source not in REGRESSION_DATASETS:
            raise ValueError(f"data.source {self.data.source!r} is a classification set; for "
                             f"regression use {', '.join(REGRESSION_DATASETS)}, file or synthetic")
        if self.task == "classification" and self.data.source in REGRESSION_DATASETS:
            raise ValueError(f"data.source {self.data.source!r} has numeric targets: set task: regression")
        if isinstance(self.model, CNNSpec):
            image = self.data.source in ("digits", *IMAGE_SOURCES, "custom") or \
                self.data.image_shape is not None or self.data.memory_mapped or (
                    self.data.synthetic is not None and len(self.data.synthetic.shape) == 3)
            if not image:
                raise ValueError(f"model.kind 'cnn' needs image data: digits, image_folder, webdataset, "
                                 f"data.image_shape, or data.synthetic.shape [C, H, W]; data.source "
                                 f"{self.data.source!r} is tabular")
        if self.backend == "tensorflow" and self.data.decode == "gpu":
            raise ValueError("data.decode: gpu decodes with torchvision (backend torch); the tensorflow "
                             "backend decodes on the CPU: set data.decode: cpu or auto")
        if self.task == "regression" and self.data.source in IMAGE_SOURCES:
            raise ValueError(f"data.source {self.data.source!r} holds classes: task classification")


def load_spec(path: str | Path, overrides: list[str] = (), check_paths: bool = True) -> JobSpec:
    """Read, override and validate a spec file; raise SpecError with every problem.
    check_paths: the data file and output dirs must be usable here (not so when
    rendering for another machine, such as a Kubernetes image)."""
    source = str(path)
    raw = read_yaml(Path(path))
    for item in overrides:
        apply_override(raw, item)
    spec = validate(raw, source)
    problems = path_problems(spec) + reference_problems(spec, path) if check_paths else []
    if problems:
        raise SpecError(source, problems)
    return spec


def reference_problems(spec: JobSpec, spec_path: str | Path) -> list[str]:
    """User code the spec names (model builder, loss), found without importing it."""
    paths = import_paths(spec_path, spec.code)
    named = [("loss", spec.loss)] if spec.loss and ":" in spec.loss else []
    if isinstance(spec.model, CustomModelSpec):
        named.append(("model.builder", spec.model.builder))
    if spec.data is not None and spec.data.loader:
        named.append(("data.loader", spec.data.loader))
    if spec.data is not None and spec.data.augment and ":" in spec.data.augment:
        named.append(("data.augment", spec.data.augment))
    problems = [f"{key}: {problem}" for key, reference in named
                if (problem := reference_problem(reference, paths))]
    if spec.entry is not None and spec.entry.module and not module_file(spec.entry.module, paths)[0]:
        problems.append(f"entry.module: {missing_module(spec.entry.module)}")
    return problems


def path_problems(spec: JobSpec) -> list[str]:
    problems = []
    for i, directory in enumerate(spec.code):
        if not directory.is_dir():
            problems.append(f"code.{i}: {str(directory)!r} is not a directory")
    if spec.entry is not None and spec.entry.script is not None and not spec.entry.script.is_file():
        problems.append(f"entry.script: {str(spec.entry.script)!r} is not a file")
    data = spec.data.path if spec.data else None
    folder = spec.data is not None and spec.data.source == "image_folder"
    labels = spec.data.labels if spec.data else None
    if labels is not None and not labels.is_file():
        problems.append(f"data.labels: {str(labels)!r} is not a file")
    if data is not None and spec.data.source == "webdataset":
        pass  # a directory, a brace pattern or a list of shards: the reader names a missing one
    elif data is not None:
        if not data.exists():
            problems.append(f"data.path: {str(data)!r} does not exist")
        elif folder and not data.is_dir():
            problems.append(f"data.path: {str(data)!r} is not a directory (image_folder)")
        elif folder:
            pass
        elif not data.is_file():
            problems.append(f"data.path: {str(data)!r} is not a regular file")
        elif not os.access(data, os.R_OK):
            problems.append(f"data.path: {str(data)!r} is not readable")
    for key, directory in (("output", spec.output), ("checkpoint.dir", spec.checkpoint.dir)):
        existing = next((p for p in (directory, *directory.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            problems.append(f"{key}: {str(existing)!r} exists and is not a directory")
    return problems


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise SpecError(str(path), ["no such file"]) from None
    except IsADirectoryError:
        raise SpecError(str(path), ["is a directory, not a spec file"]) from None
    except UnicodeDecodeError as err:
        raise SpecError(str(path), [f"not UTF-8 text (byte {err.start})"]) from None
    except OSError as err:
        raise SpecError(str(path), [err.strerror or str(err)]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpecError(str(path), [f"YAML syntax error at {where}{problem}"]) from None
    if not isinstance(raw, dict):
        raise SpecError(str(path), [f"must be a YAML mapping of sections, got {type(raw).__name__}"])
    return raw


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply `a.b.c=value`; the value is parsed as YAML (3 -> int, [64, 32] -> list)."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise SpecError("overrides", [f"{item!r}: expected key.path=value, e.g. train.epochs=3"])
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError("overrides", [f"{item!r}: {'.'.join(parts[:depth + 1])} is not a section"])
        node = child
    node[parts[-1]] = value


def validate(raw: dict[str, Any], source: str = "spec") -> JobSpec:
    # model and data are required unless the ranks run the user's own script; said
    # here so that they are listed with every other problem
    missing = [f"{key}: required key is missing (or give `entry` to run your own script)"
               for key in ("model", "data") if raw.get(key) is None and raw.get("entry") is None]
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(source, missing + [describe(e) for e in err.errors()]) from None
    if missing:
        raise SpecError(source, missing)
    return spec


def describe(error: dict[str, Any]) -> str:
    """One line per problem: `optimizer.lr: must be > 0, got -1`."""
    raw = [str(p) for p in error["loc"]]
    loc = user_path(raw)
    path = ".".join(loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        keys = valid_keys(raw[:-1])
        close = difflib.get_close_matches(raw[-1], keys, n=1, cutoff=0.5)
        hint = f" (did you mean '{'.'.join(loc[:-1] + close)}'?)" if close else \
            f" (valid keys: {', '.join(keys)})"
        return f"{path}: unknown key{hint}"
    if error["type"] == "missing":
        return f"{path}: required key is missing"
    msg = error["msg"].removeprefix("Value error, ")
    msg = msg[0].lower() + msg[1:] if msg else msg
    if error["type"] == "literal_error" or error["type"] == "union_tag_invalid":
        return f"{path}: {msg}, got {error.get('input')!r}"
    shown = error.get("input")
    if isinstance(shown, (dict, list)) or error["type"] == "value_error":
        return f"{path}: {msg}"
    return f"{path}: {msg}, got {shown!r}"


def user_path(loc: list[str]) -> list[str]:
    """The location as the user wrote it: without pydantic's union tags (model.mlp.x -> model.x)."""
    model: Any = JobSpec
    shown = []
    for part in loc:
        if _union_member(model, part) is None:
            shown.append(part)
        model = _section_at(model, part)
    return shown


def valid_keys(loc: list[str]) -> list[str]:
    """The keys allowed at a location, for 'did you mean' hints."""
    model: Any = JobSpec
    for part in loc:
        model = _section_at(model, part)
        if model is None:
            return []
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _section_at(model: Any, part: str) -> Any:
    if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
        return _union_member(model, part)
    return _unwrap(model.model_fields[part].annotation)


def _union_member(model: Any, tag: str) -> Any:
    # pydantic puts a discriminated union's tag in the location: model.mlp.hidden
    for member in get_args(model) if get_origin(model) is Union else ():
        kind = getattr(member, "model_fields", {}).get("kind")
        if kind is not None and tag in get_args(kind.annotation):
            return member
    return None


def _unwrap(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is Union and len(args) == 1:
        return _unwrap(args[0])
    return annotation


def model_from_dict(raw: dict[str, Any]) -> MLPSpec | CNNSpec | CustomModelSpec:
    """A `model` section on its own, as saved with an exported model."""
    return TypeAdapter(ModelSpec).validate_python(raw)


def dump(spec: JobSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
