"""`hvdtrain evaluate`: an exported model on labelled data, without Horovod: the
run's held-out test split (data.test_fraction, an image folder's test/, a
loader's third set) or a labelled file or folder. Loss, accuracy, macro
precision/recall/F1, a per-class table and a confusion-matrix picture (or
MAE, RMSE, R2 for regression). A text classifier: its test split or a labelled
.csv, .jsonl or .parquet file of texts.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .. import plugins
from ..backends import get_backend
from ..data import Preprocessing, image_input, load_dataset, read_csv_rows, read_npz
from ..data.transforms import read_image
from ..errors import DataError, UserError
from ..spec import IMAGE_KINDS, DataSpec, load_spec
from ..train.metrics import confusion, regression_scores, regression_sums, scores
from ..data.text import table_rows
from .predict import image_files, model_dir_of, read_inputs

BATCH = 1024


def labelled_data(path: Path, prep: Preprocessing, data: DataSpec) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed inputs and labels (class indices, or standardised targets) of a
    labelled file: .npz (x, y), .csv or .parquet (the training columns and data.label_column),
    .npy (with y.npy beside it), or for an image model a folder of class folders."""
    if prep.image_size:
        if not path.is_dir():
            raise DataError(f"{path}: expected a folder with one folder of images per class")
        folders = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
        unknown = [d.name for d in folders if d.name not in prep.classes]
        if unknown:
            raise DataError(f"{path / unknown[0]}: class {unknown[0]!r} is not one the model was trained on "
                            f"({', '.join(prep.classes)})")
        files = [(f, d.name) for d in folders for f in image_files(d)]
        if not files:
            raise DataError(f"{path}: no {IMAGE_KINDS} images in its class folders")
        pixels = np.stack([read_image(f, prep.image_size, prep.augment) for f, _ in files])
        return prep.apply(pixels), encode([c for _, c in files], prep, path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if prep.text:  # texts and labels: a .csv, .jsonl or .parquet file's text and label columns
        rows = table_rows(path, suffix) if suffix in (".csv", ".jsonl", ".parquet") else []
        if not rows or data.label_column not in rows[0][1]:
            raise DataError(f"{path}: expected a .csv, .jsonl or .parquet file with the text column "
                            f"{prep.text_column!r} and the label column {data.label_column!r}")
        return read_inputs(path, prep), encode([str(r.get(data.label_column, "")).strip() for _, r in rows], prep, path)
    if suffix == ".npz":
        x, labels, _ = read_npz(path)
    elif suffix == ".npy":
        labels_path = path.with_name("y.npy")
        if not labels_path.is_file():
            raise DataError(f"{path}: no labels: expected {labels_path} beside it")
        x, labels = np.load(path, mmap_mode="r"), np.load(labels_path)
    elif suffix == ".csv":
        header, rows = read_csv_rows(path)
        column = data.label_column
        if column not in header:
            raise DataError(f"{path}: no label column {column!r} (columns: {', '.join(header)})")
        x = read_inputs(path, prep)
        labels = np.asarray([row[header.index(column)].strip() for _, row in rows])
    elif suffix == ".parquet":  # the training feature columns and data.label_column, as a parquet source reads them
        x = read_inputs(path, prep)
        labels = parquet_labels(path, data.label_column)
    else:
        raise DataError(f"{path}: expected .npz, .npy, .csv or .parquet (or a folder of class folders)")
    if len(x) != len(labels):
        raise DataError(f"{path}: {len(x)} samples but {len(labels)} labels")
    return prep.apply(np.asarray(x)), encode(labels, prep, path)


def parquet_labels(path: Path, column: str) -> np.ndarray:
    """A Parquet file's label column, as the parquet source reads it (classes as text)."""
    import pyarrow.parquet as pq  # read_inputs has read the file: pyarrow is there
    names = pq.ParquetFile(path).schema_arrow.names
    if column not in names:
        raise DataError(f"{path}: no label column {column!r} (columns: {', '.join(names)})")
    values = pq.read_table(path, columns=[column]).column(column).to_pylist()
    return np.asarray(["" if v is None else v for v in values], dtype=object)  # encode makes classes text


def encode(labels, prep: Preprocessing, path: Path) -> np.ndarray:
    if prep.task == "regression":
        try:
            values = np.asarray(labels, dtype=np.float64)
        except ValueError:
            raise DataError(f"{path}: regression needs numeric targets") from None
        return ((values - prep.target_mean) / prep.target_std).astype(np.float32)
    index = {c: i for i, c in enumerate(prep.classes)}
    unknown = sorted({str(v) for v in labels} - set(index))
    if unknown:
        raise DataError(f"{path}: label {unknown[0]!r} is not a class the model was trained on "
                        f"({', '.join(prep.classes[:20])})")
    return np.asarray([index[str(v)] for v in labels], dtype=np.int64)


def loss_of(outputs: np.ndarray, y: np.ndarray, loss: str) -> float | None:
    """The built-in losses in numpy (as the backends compute them); None for a loss of the user's."""
    if loss == "cross_entropy":
        shifted = outputs - outputs.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return float(-log_probs[np.arange(len(y)), y].mean())
    error = outputs.reshape(-1) - y
    if loss == "mse":
        return float((error ** 2).mean())
    if loss == "mae":
        return float(np.abs(error).mean())
    if loss == "huber":
        a = np.abs(error)
        return float(np.where(a <= 1.0, 0.5 * a ** 2, a - 0.5).mean())
    return None


def evaluate_run(run_dir: Path, data: Path | None, output: Path | None, log=print) -> dict[str, Any]:
    model_dir = model_dir_of(run_dir)
    config = json.loads((model_dir / "model.json").read_text())
    prep = Preprocessing.load(model_dir / "preprocessing.json")
    if prep.task == "language_modeling":
        raise UserError(f"{run_dir}: a language model: its validation (and test) perplexity is in "
                        "metrics.jsonl and summary.json; `hvdtrain generate` continues a prompt")
    if ":" in prep.augment:  # the user's transform, from where training found it
        plugins.add_import_paths(config.get("import_paths", []))
    spec_file = model_dir / "spec.yaml"
    if data is None:
        spec = load_spec(spec_file)
        dataset = load_dataset(spec.data, image=image_input(spec.model, spec.data), task=spec.task)
        if dataset.test is None:
            raise UserError(f"{run_dir}: the run held out no test split (data.test_fraction, an image "
                            "folder's test/, or a loader's third set): give labelled DATA")
        parts = [dataset.test.batch(np.arange(i, min(i + BATCH, len(dataset.test))))
                 for i in range(0, len(dataset.test), BATCH)]
        if prep.text:  # each part padded to its longest text: all to the longest
            width = max(p[0].shape[1] for p in parts)
            parts = [(np.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=prep.pad_id), y) for x, y in parts]
        x, y = np.concatenate([p[0] for p in parts]), np.concatenate([np.asarray(p[1]) for p in parts])
        x = prep.apply(x) if prep.image_size else x  # image files come as uint8 pixels
        source = "the run's test split"
    else:
        spec = load_spec(spec_file, check_paths=False)  # the data it trained on need not be here
        x, y = labelled_data(data, prep, spec.data)
        source = str(data)
    model = get_backend(config["backend"]).load_model(model_dir)
    outputs = np.concatenate([np.asarray(model(x[i:i + BATCH]), dtype=np.float64)
                              for i in range(0, len(x), BATCH)])
    result: dict[str, Any] = {"run": str(run_dir), "data": source, "samples": int(len(y)),
                              "loss": loss_of(outputs, y, spec.loss)}
    out_dir = output or run_dir / "evaluation"
    out_dir.mkdir(parents=True, exist_ok=True)
    if prep.task == "regression":
        result.update(regression_scores(regression_sums(prep.targets(outputs), prep.targets(y))))
        log(f"{source}: {len(y)} samples, loss {fmt(result['loss'])}, MAE {result['mae']:.4f}, "
            f"RMSE {result['rmse']:.4f}, R2 {result['r2']:.4f}")
    else:
        counts = confusion(y, outputs.argmax(axis=1), len(prep.classes))
        result.update(scores(counts))
        result["per_class"] = per_class(counts, prep.classes)
        result["confusion"] = counts.tolist()
        plot_confusion(counts, prep.classes, out_dir / "confusion.png")
        log(f"{source}: {len(y)} samples, loss {fmt(result['loss'])}, accuracy {result['accuracy']:.4f}, "
            f"macro precision {result['precision']:.4f}, recall {result['recall']:.4f}, F1 {result['f1']:.4f}")
        width = max(5, *(len(c) for c in prep.classes))
        log(f"{'class':{width}s}  precision  recall      f1  support")
        for row in result["per_class"]:
            log(f"{row['class']:{width}s}  {row['precision']:9.4f}  {row['recall']:6.4f}  {row['f1']:6.4f}  "
                f"{row['support']:7d}")
    (out_dir / "evaluation.json").write_text(json.dumps(result, indent=2))
    log(f"wrote {out_dir / 'evaluation.json'}" + ("" if prep.task == "regression" else
                                                   f" and {out_dir / 'confusion.png'}"))
    return result


def fmt(value: float | None) -> str:
    return "n/a (a loss of your own)" if value is None else f"{value:.4f}"


def per_class(counts: np.ndarray, classes: list[str]) -> list[dict[str, Any]]:
    counts = np.asarray(counts, dtype=np.float64)
    tp, predicted, actual = np.diag(counts), counts.sum(axis=0), counts.sum(axis=1)
    rows = []
    for k, name in enumerate(classes):
        precision = tp[k] / predicted[k] if predicted[k] else 0.0
        recall = tp[k] / actual[k] if actual[k] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"class": name, "precision": precision, "recall": recall, "f1": f1,
                     "support": int(actual[k])})
    return rows


def plot_confusion(counts: np.ndarray, classes: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    k = len(classes)
    fig, ax = plt.subplots(figsize=(min(2 + 0.5 * k, 16), min(1.6 + 0.5 * k, 15)))
    image = ax.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_xticks(range(k), classes, rotation=45 if k > 6 else 0, ha="right" if k > 6 else "center")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 30:
        high = counts.max() or 1
        for (t, p), n in np.ndenumerate(counts):
            ax.text(p, t, str(n), ha="center", va="center", fontsize=8,
                    color="white" if n > high / 2 else "black")
    ax.set_title("confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
