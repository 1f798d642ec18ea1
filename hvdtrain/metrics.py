"""Classification metrics from a confusion matrix. numpy only.

Ranks each count a confusion matrix over their part of the validation set;
the allreduced sum is the matrix of the whole set, so every rank derives the
same metrics as one process would.
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
