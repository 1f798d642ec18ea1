"""Validation metrics from sums that ranks can allreduce. numpy only.

Classification: ranks each count a confusion matrix over their part of the
validation set; regression: each sums its errors and targets. The allreduced
sum is that of the whole set, so every rank derives the same metrics as one
process would (never an average of per-rank metrics).
"""
from __future__ import annotations

import numpy as np


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[t, p]: samples of true class t predicted as p."""
    flat = np.asarray(y_true, dtype=np.int64) * num_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores(counts: np.ndarray) -> dict[str, float]:
    """Accuracy and macro precision, recall and F1.

    As in scikit-learn, the macro average runs over the classes that occur in
    the labels or the predictions, and a ratio with a zero denominator is 0.
    """
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    tp = np.diag(counts)
    predicted, actual = counts.sum(axis=0), counts.sum(axis=1)
    present = (predicted + actual) > 0
    precision = _ratio(tp, predicted)
    recall = _ratio(tp, actual)
    f1 = _ratio(2 * precision * recall, precision + recall)
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "precision": float(precision[present].mean()) if present.any() else 0.0,
        "recall": float(recall[present].mean()) if present.any() else 0.0,
        "f1": float(f1[present].mean()) if present.any() else 0.0,
    }


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


def regression_sums(predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """[n, sum |e|, sum e^2, sum y, sum y^2] with e = predicted - actual."""
    e = np.asarray(predicted, dtype=np.float64) - np.asarray(actual, dtype=np.float64)
    y = np.asarray(actual, dtype=np.float64)
    return np.array([len(y), np.abs(e).sum(), (e * e).sum(), y.sum(), (y * y).sum()])


def regression_scores(sums: np.ndarray) -> dict[str, float]:
    """MAE, RMSE and R^2 (1 - SSE / total sum of squares around the mean) from summed sums."""
    n, abs_err, sq_err, y_sum, y_sq = (float(v) for v in sums)
    if n == 0:
        return {"mae": 0.0, "rmse": 0.0, "r2": 0.0}
    total = y_sq - y_sum * y_sum / n
    return {"mae": abs_err / n, "rmse": (sq_err / n) ** 0.5,
            "r2": 1.0 - sq_err / total if total > 0 else 0.0}


def token_sums(predicted: np.ndarray, ids: np.ndarray, pad: int | None) -> np.ndarray:
    """Language modelling: [tokens, correct] over each position's next token (the model's
    most likely at each position, [n, length], against the block's own ids), padding
    (pad) not counted."""
    guess, target = np.asarray(predicted)[:, :-1], np.asarray(ids)[:, 1:]
    counted = target != pad if pad is not None else np.ones(target.shape, dtype=bool)
    return np.array([counted.sum(), ((guess == target) & counted).sum()], dtype=np.float64)


def token_scores(sums: np.ndarray, loss: float) -> dict[str, float]:
    """Perplexity (exp of the mean next-token loss) and the share of next tokens predicted."""
    tokens, correct = (float(v) for v in sums)
    return {"perplexity": float(np.exp(min(loss, 700.0))), "token_accuracy": correct / tokens if tokens else 0.0}


# The validation metrics an epoch's line shows, by task (short name, record key).
HEADLINE = {"classification": (("val_acc", "val_accuracy"), ("val_f1", "val_f1")),
            "regression": (("val_mae", "val_mae"), ("val_r2", "val_r2")),
            "language_modeling": (("val_ppl", "val_perplexity"), ("val_token_acc", "val_token_accuracy"))}


def epoch_metrics(task: str, record: dict) -> str:
    return "  ".join(f"{short} {record[key]:.4f}" for short, key in HEADLINE[task])


def final_metrics(task: str, record: dict) -> str:
    """The final validation metrics in words, for the last line of a run."""
    if task == "language_modeling":
        return (f"validation perplexity {record['val_perplexity']:.2f}, next-token accuracy "
                f"{record['val_token_accuracy']:.4f}")
    if task == "regression":
        return (f"validation MAE {record['val_mae']:.4f}, RMSE {record['val_rmse']:.4f}, "
                f"R2 {record['val_r2']:.4f}")
    return f"validation accuracy {record['val_accuracy']:.4f}, macro F1 {record['val_f1']:.4f}"
