"""Predictions from an exported model: no Horovod, no launcher, CPU is enough."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

from .. import plugins
from ..backends import get_backend
from ..data import Preprocessing, csv_features, read_csv_rows, read_npz
from ..data.tables import features
from ..data.text import encode, padded, table_rows
from ..data.transforms import read_image
from ..errors import DataError, UserError
from ..spec import IMAGE_KINDS, IMAGE_SUFFIXES, TEXT_SUFFIXES


def image_files(path: Path) -> list[Path]:
    """An image file, or the image files in a folder (and its subfolders), sorted."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{path}: no {IMAGE_KINDS} images in the folder")
    return files


def read_inputs(path: Path, prep: Preprocessing) -> np.ndarray:
    """Raw features from .npz (array x), .csv or .parquet (the training feature columns,
    by name; other columns such as the label are ignored); for a model trained on image files,
    images (a file, or a folder of them) resized as in training."""
    if prep.text:
        return text_inputs(path, prep)
    if prep.image_size:
        if not path.exists() or (path.is_file() and path.suffix.lower() not in IMAGE_SUFFIXES):
            raise DataError(f"{path}: expected an image file ({', '.join(IMAGE_SUFFIXES)}) or a folder of them")
        return np.stack([read_image(p, prep.image_size, prep.augment) for p in image_files(path)])
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix.lower() == ".npz":
        return read_npz(path, need_labels=False)[0]
    columns = prep.columns or prep.feature_names
    if path.suffix.lower() == ".parquet":
        return parquet_features(path, columns, prep.categories)
    if path.suffix.lower() != ".csv":
        raise DataError(f"{path}: expected a .npz, .csv or .parquet file")
    header, rows = read_csv_rows(path)
    missing = [n for n in columns if n not in header]
    if missing:
        raise DataError(f"{path}: missing feature columns {', '.join(missing[:5])}")
    return csv_features(path, header, rows, columns, prep.categories)[0]


def texts_of(path: Path, prep: Preprocessing) -> list[str]:
    """The texts to classify: the training text column of a .csv, .jsonl or .parquet
    file, or a .txt file's lines (one text each)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix.lower() == ".txt":
        try:
            texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: cannot read as UTF-8 text ({err})") from None
    elif path.suffix.lower() in TEXT_SUFFIXES:
        rows = table_rows(path, path.suffix.lower())
        if rows and prep.text_column not in rows[0][1]:
            raise DataError(f"{path}: no text column {prep.text_column!r} (the one the model trained on)")
        texts = []
        for where, row in rows:
            value = row.get(prep.text_column)
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{path}:{where}: no text in column {prep.text_column!r}")
            texts.append(value)
    else:
        raise DataError(f"{path}: expected a .csv, .jsonl, .parquet or .txt file of texts")
    if not texts:
        raise DataError(f"{path}: holds no text")
    return texts


def text_inputs(path: Path, prep: Preprocessing) -> np.ndarray:
    """Texts as token ids, as in training (the model's tokenizer, cut and padded alike)."""
    if prep.task == "language_modeling":
        raise UserError("a language model continues text: hvdtrain generate RUN_DIR PROMPT")
    from tokenizers import Tokenizer
    return padded(encode(Tokenizer.from_str(prep.tokenizer), texts_of(path, prep), prep), prep)


def generate(run_dir: Path, prompt: str, tokens: int) -> str:
    """An exported language model's greedy continuation of prompt (torch, CPU)."""
    if tokens < 1:
        raise UserError(f"--tokens must be at least 1, got {tokens}")
    from ..backends.text_models import generate as continued
    return continued(model_dir_of(run_dir), prompt, tokens)


def parquet_features(path: Path, columns: list[str], categories: dict[str, list[str]]) -> np.ndarray:
    """The training feature columns of a Parquet file, as a parquet source reads them."""
    try:
        import pyarrow.parquet as pq
        table = pq.read_table(path)
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install 'hvdtrain[parquet]'") from None
    except Exception as err:  # noqa: BLE001 -- pyarrow raises several kinds
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    missing = [n for n in columns if n not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing feature columns {', '.join(missing[:5])}")
    return features(table, columns, categories)


def model_dir_of(run_dir: Path) -> Path:
    """The exported model of a run directory (or the model/ folder given itself)."""
    model_dir = run_dir / "model" if (run_dir / "model").is_dir() else run_dir
    if not (model_dir / "model.json").is_file():
        raise UserError(f"{run_dir}: no exported model (expected {model_dir / 'model.json'}); "
                        "train with `hvdtrain run` first")
    return model_dir


def predict(run_dir: Path, input_path: Path, output: Path | None) -> list[str]:
    model_dir = model_dir_of(run_dir)
    config = json.loads((model_dir / "model.json").read_text())
    prep = Preprocessing.load(model_dir / "preprocessing.json")
    if ":" in prep.augment:  # the user's transform, from where training found it
        plugins.add_import_paths(config.get("import_paths", []))
    model = get_backend(config["backend"]).load_model(model_dir)
    outputs = np.asarray(model(prep.apply(read_inputs(input_path, prep))), dtype=np.float64)
    if prep.task == "regression":
        labels = [f"{v:.6g}" for v in prep.targets(outputs)]  # in the targets' own units
        header, rows = ["prediction"], [[label] for label in labels]
    else:
        probs = np.exp(outputs - outputs.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        labels = [prep.classes[i] for i in probs.argmax(axis=1)]
        header = ["prediction", *[f"p_{c}" for c in prep.classes]]
        rows = [[label, *[f"{p:.6f}" for p in row]] for label, row in zip(labels, probs)]
    if prep.text:  # each row with its text
        header, rows = [*header, prep.text_column], [[*row, text] for row, text in zip(rows, texts_of(input_path, prep))]
    if prep.image_size:  # each row names its image
        header, rows = ["file", *header], [[str(f), *row] for f, row in zip(image_files(input_path), rows)]
    if output is not None:
        with open(output, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)
    else:
        sys.stdout.write("".join(f"{label}\n" for label in labels))
    return labels
