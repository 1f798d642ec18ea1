"""The spec's data section: where the data is and how it is read (`DataSpec`), with its
sub-sections (generated data, cleaning, the text tokenizer)."""
from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from .. import storage
from .base import ImportPath, Section, Seed


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
TABLE_SOURCES = ("parquet", "hf_dataset")  # columnar files, read a group of rows at a time
TEXT_SUFFIXES = (".csv", ".jsonl", ".parquet", ".txt")  # data.source text
LAZY_SOURCES = (*IMAGE_SOURCES, *TABLE_SOURCES, "custom")  # read by the loader's workers, batch by batch


class TokenizerSpec(Section):
    """How text becomes token ids (data.source text), with Hugging Face's tokenizers."""
    file: Path | None = Field(default=None, description=(
        "a tokenizer.json (tokenizers' format, as Tokenizer.save and save_pretrained write it); "
        "default: one trained on the training split's texts (by one process per node, cached) "
        "and saved with the model"))
    kind: Literal["bpe", "wordpiece"] = Field(default="bpe", description=(
        "the tokenizer trained when no file is given: bpe (byte-level, as GPT-2's: any text, "
        "decodes back exactly) or wordpiece (as BERT's)"))
    vocab_size: Annotated[int, Field(ge=100, le=1_000_000)] = Field(
        default=8000, description="the trained tokenizer's vocabulary, special tokens included")
    lowercase: bool = Field(default=False, description="the trained tokenizer lower-cases text first")
    max_length: Annotated[int, Field(ge=2, le=1_000_000)] = Field(default=128, description=(
        "classification: each text's tokens cut to this many; language_modeling: the length of "
        "each block the token stream is cut into (at most the model's positions)"))
    padding: Literal["longest", "max_length"] = Field(default="longest", description=(
        "classification: a batch padded to its longest text, or always to max_length (fixed "
        "shapes, for train.compile)"))

    @model_validator(mode="after")
    def _trained_or_file(self) -> "TokenizerSpec":
        trained = sorted({"kind", "vocab_size", "lowercase"} & self.model_fields_set)
        if self.file is not None and trained:
            raise ValueError(f"{trained[0]} describes a tokenizer trained here; tokenizer.file is one "
                             "already made")
        return self


class DataSpec(Section):
    source: Literal["digits", "iris", "wine", "breast_cancer", "diabetes", "file", "synthetic",
                    "image_folder", "webdataset", "parquet", "hf_dataset", "text", "custom"]
    path: Path | str | None = Field(default=None, description=(
        "a local path, or a URL (s3://bucket/key, any filesystem fsspec knows: fetched once per node into "
        "data.cache_dir); "
        "file: .npz (arrays x, y), .csv, or .npy (x, memory-mapped; labels in y.npy beside it); "
        "image_folder: a directory with one folder of PNG/JPEG files per class, or train/ and val/ "
        "folders of such; webdataset: uncompressed tar shards of (image, .cls) samples: a directory "
        "(train-*.tar and val-*.tar as `hvdtrain shards` writes, else its *.tar), a brace pattern "
        "(train-{000000..000099}.tar) or a comma list; parquet: a .parquet file or a directory of them; "
        "hf_dataset: a directory a Hugging Face dataset was saved to (save_to_disk); text: a .csv, "
        ".jsonl or .parquet file with a text column (data.text_column), or a .txt file (its "
        "paragraphs, separated by blank lines, each one text; language_modeling only)"))
    labels: Path | str | None = Field(default=None, description=".npy labels for a .npy data.path "
                                                                "(default: y.npy in its directory)")
    cache_dir: Path | None = Field(default=None, description=(
        "where data at a URL is kept on each node (fetched once, by one rank, again only where the "
        "objects changed); default: <cache directory>/data (HVDTRAIN_CACHE, else ~/.cache/hvdtrain)"))
    cache_max_gb: Annotated[float, Field(gt=0, le=1_000_000)] = Field(
        default=100.0, description="the most data at a URL fetched into data.cache_dir")
    label_column: str = Field(default="label", description="csv column holding the label (class or target)")
    text_column: str = Field(default="text", description="text: the column (or JSON key) holding each text")
    tokenizer: TokenizerSpec | None = Field(default=None, description=(
        "text: how texts become token ids (default: a byte-level BPE tokenizer of 8,000 tokens trained "
        "on the training split)"))
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
    columns: list[str] | None = Field(default=None, max_length=100_000, description=(
        "parquet, hf_dataset: the feature columns (default: every column but label_column); lists of "
        "numbers give one feature per element"))
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

    _location = field_validator("path", "labels")(lambda value: None if value is None else storage.location(value))

    @property
    def suffix(self) -> str:
        """data.path's extension, lower case (of a URL too)."""
        return PurePosixPath(str(self.path)).suffix.lower() if self.path is not None else ""

    @property
    def memory_mapped(self) -> bool:
        return self.source == "file" and self.suffix == ".npy"

    @model_validator(mode="after")
    def _source_fields(self) -> "DataSpec":
        if self.source in ("file", *IMAGE_SOURCES, *TABLE_SOURCES, "text") and self.path is None:
            kind = {"file": "an .npz, .csv or .npy file", "image_folder": "a directory of class folders",
                    "text": "a .csv, .jsonl, .parquet or .txt file",
                    "webdataset": "tar shards: a directory, a brace pattern or a list",
                    "parquet": "a .parquet file or a directory of them",
                    "hf_dataset": "a directory written by save_to_disk"}[self.source]
            raise ValueError(f"source {self.source!r} needs data.path ({kind})")
        if self.source == "file" and self.suffix not in (".npz", ".csv", ".npy"):
            raise ValueError(f"data.path must end in .npz, .csv or .npy, got {str(self.path)!r}")
        csv = self.source == "file" and self.suffix == ".csv"
        if self.categorical and self.source not in TABLE_SOURCES and not csv:
            raise ValueError("data.categorical names columns of a .csv file (source 'file'), or of a parquet "
                             "or hf_dataset source")
        if self.columns is not None and self.source not in TABLE_SOURCES:
            raise ValueError("data.columns names the feature columns of a parquet or hf_dataset source")
        if self.source not in ("file", *IMAGE_SOURCES, *TABLE_SOURCES, "text") and self.path is not None:
            raise ValueError(f"data.path is only read with source 'file', 'image_folder', 'webdataset', "
                             f"'parquet', 'hf_dataset' or 'text', not {self.source!r}")
        if self.source == "text" and self.suffix not in TEXT_SUFFIXES:
            raise ValueError(f"source 'text' reads {', '.join(TEXT_SUFFIXES)} files, got {str(self.path)!r}")
        # (the default text_column is no setting: a spec written out in full holds it)
        if self.source != "text" and (self.tokenizer is not None or self.text_column != "text"):
            key = "data.tokenizer" if self.tokenizer is not None else "data.text_column"
            raise ValueError(f"{key} applies to source 'text'")
        if self.source == "text" and self.tokenizer is None:
            self.tokenizer = TokenizerSpec()
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
