"""The job spec as a whole: its sections checked together (`JobSpec`), and YAML ->
typed, validated `JobSpec` with every problem reported by its key path.

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
from pydantic import BaseModel, Field, TypeAdapter, ValidationError, field_validator, model_validator

from .. import storage
from ..errors import SpecError
from ..plugins import IMPORT_PATH, import_paths, missing_module, module_file, reference_problem
from .base import Section
from .data_section import IMAGE_SOURCES, DataSpec
from .sections import (SKLEARN_DATASETS, REGRESSION_DATASETS, LOSSES, DEFAULT_LOSS, MLPSpec, CNNSpec,
                       CustomModelSpec, ModelSpec, EntrySpec, OptimizerSpec, METRICS,
                       TrainSpec, SlurmSpec, LogSpec, HorovodSpec, CheckpointSpec, ResourcesSpec)

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
    task: Literal["classification", "regression", "language_modeling"] = Field(default="classification", description=(
        "classification (a class per sample: per image, row or text; `sequence_classification` is "
        "the same), regression (a value per sample), or language_modeling (text: each position's "
        "next token)"))
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
    output: Path | str | None = Field(default=None, description=(
        "run directory, or a URL (s3://bucket/prefix, gs://..., any filesystem fsspec knows) that the run "
        "directory is copied to at each epoch's end and at the end (written on rank 0's node under the "
        "cache directory meanwhile); default runs/<name>"))

    _location = field_validator("output")(lambda value: None if value is None else storage.location(value))

    @field_validator("task", mode="before")
    @classmethod
    def _sequence_classification(cls, value):
        return "classification" if value == "sequence_classification" else value

    @property
    def run_dir(self) -> Path:
        """Where rank 0 writes the run directory on its node: output itself, or for a URL
        the staging directory copied to it."""
        return storage.staging_dir(self.output) if storage.is_url(self.output) else Path(self.output)

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
        if self.log.mlflow is not None and self.horovod.elastic is not None:
            raise ValueError("log.mlflow: not with elastic training (its workers, rank 0 among them, "
                             "change on a reset)")
        torch_only = [k for k, on in (("train.compile", self.train.compile),
                                      ("train.compile_mode", self.train.compile_mode != "default"),
                                      ("train.channels_last", self.train.channels_last),
                                      ("optimizer.fused", self.optimizer.fused is not None)) if on]
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
            self.checkpoint.dir = storage.join(self.output, "checkpoints")
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
        self._text_rules()

    def _text_rules(self) -> None:
        text, transformers = self.data.source == "text", is_transformers(self.model)
        if self.task == "language_modeling" and not text:
            raise ValueError(f"task language_modeling trains on text (data.source text), not {self.data.source!r}")
        if text and self.task == "regression":
            raise ValueError("data.source text: task classification (a label per text) or language_modeling")
        if text and not isinstance(self.model, CustomModelSpec):
            raise ValueError(f"data.source text gives token ids: model.kind custom (a transformers builder such as "
                             f"transformers:AutoModelForCausalLM.from_config, or yours), not {self.model.kind!r}")
        if transformers and not text:
            raise ValueError(f"model.builder {self.model.builder}: a Hugging Face model trains on text (data.source text)")
        if self.backend == "tensorflow" and transformers:
            raise ValueError(f"model.builder {self.model.builder}: Hugging Face models train with backend torch; "
                             "with tensorflow give a Keras model of your own on token ids")
        if self.backend == "tensorflow" and self.task == "language_modeling":
            raise ValueError("task language_modeling: backend torch only (the tensorflow backend trains a Keras "
                             "model of yours on text with task classification)")


def is_transformers(model) -> bool:
    """A model section built by a Hugging Face class (transformers:AutoModel...from_config)."""
    return isinstance(model, CustomModelSpec) and model.builder.split(":")[0].split(".")[0] == "transformers"


def load_spec(path: str | Path, overrides: list[str] = (), check_paths: bool = True,
              writes: bool = True) -> JobSpec:
    """Read, override and validate a spec file; raise SpecError with every problem.
    check_paths: the data file and output dirs must be usable here (not so when
    rendering for another machine, such as a Kubernetes image). writes: an output or
    checkpoint.dir URL is probed with a write (rank 0 writes there; the other ranks
    only read, and hundreds of them need not each write a probe)."""
    source = str(path)
    raw = read_yaml(Path(path))
    for item in overrides:
        apply_override(raw, item)
    spec = validate(raw, source)
    problems = path_problems(spec, writes) + reference_problems(spec, path) if check_paths else []
    if problems:
        raise SpecError(source, problems)
    return spec


def reference_problems(spec: JobSpec, spec_path: str | Path) -> list[str]:
    """User code the spec names (model builder, loss), found without importing it."""
    paths = import_paths(spec_path, spec.code)
    named = [("loss", spec.loss)] if spec.loss and ":" in spec.loss else []
    if isinstance(spec.model, CustomModelSpec):
        named.append(("model.builder", spec.model.builder))
    named += [(f"optimizer.{key}", value) for key in ("name", "schedule")
              if ":" in (value := getattr(spec.optimizer, key))]
    if spec.data is not None and spec.data.loader:
        named.append(("data.loader", spec.data.loader))
    if spec.data is not None and spec.data.augment and ":" in spec.data.augment:
        named.append(("data.augment", spec.data.augment))
    problems = [f"{key}: {problem}" for key, reference in named
                if (problem := reference_problem(reference, paths))]
    if spec.entry is not None and spec.entry.module and not module_file(spec.entry.module, paths)[0]:
        problems.append(f"entry.module: {missing_module(spec.entry.module)}")
    return problems


def path_problems(spec: JobSpec, writes: bool = True) -> list[str]:
    problems = []
    for i, directory in enumerate(spec.code):
        if not directory.is_dir():
            problems.append(f"code.{i}: {str(directory)!r} is not a directory")
    if spec.entry is not None and spec.entry.script is not None and not spec.entry.script.is_file():
        problems.append(f"entry.script: {str(spec.entry.script)!r} is not a file")
    data = spec.data.path if spec.data else None
    folder = spec.data is not None and spec.data.source in ("image_folder", "hf_dataset")
    file_or_folder = spec.data is not None and spec.data.source == "parquet"
    labels = spec.data.labels if spec.data else None
    tokenizer = spec.data.tokenizer.file if spec.data is not None and spec.data.tokenizer else None
    if tokenizer is not None and not tokenizer.is_file():
        problems.append(f"data.tokenizer.file: {str(tokenizer)!r} is not a file")
    for key, url in (("data.path", data), ("data.labels", labels)):
        if storage.is_url(url) and key == "data.path" and spec.data.source == "webdataset" and \
                ("{" in str(url) or "," in str(url)):
            url = re.split(r"[{,]", str(url))[0].rsplit("/", 1)[0]  # shards: their prefix here, each when fetched
        if storage.is_url(url):
            problem = storage.read_problem(url)
            if problem:
                problems.append(f"{key}: {problem}")
    if labels is not None and not storage.is_url(labels) and not labels.is_file():
        problems.append(f"data.labels: {str(labels)!r} is not a file")
    if data is None or storage.is_url(data) or spec.data.source == "webdataset":
        pass  # a URL: checked above; shards (a brace pattern, a list): the reader names a missing one
    elif not data.exists():
        problems.append(f"data.path: {str(data)!r} does not exist")
    elif folder and not data.is_dir():
        problems.append(f"data.path: {str(data)!r} is not a directory ({spec.data.source})")
    elif folder or (file_or_folder and data.is_dir()):
        pass
    elif not data.is_file():
        problems.append(f"data.path: {str(data)!r} is not a regular file")
    elif not os.access(data, os.R_OK):
        problems.append(f"data.path: {str(data)!r} is not readable")
    for key, directory in (("output", spec.output), ("checkpoint.dir", spec.checkpoint.dir)):
        if storage.is_url(directory):
            problem = storage.access_problem(directory) if writes else None
            if problem:
                problems.append(f"{key}: {problem}")
            continue
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
