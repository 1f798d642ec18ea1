"""Validation over all ranks: each rank scores its shard; the sums are allreduced
by the caller."""
from __future__ import annotations

import numpy as np

from ..data import Dataset, Samples, eval_shard
from .contract import Comm, Steps
from .metrics import confusion, regression_scores, regression_sums, scores, token_scores, token_sums


def evaluate(dataset: Dataset, comm: Comm, steps: Steps, batch_size: int,
             samples: Samples | None = None) -> tuple[np.ndarray, float]:
    """This rank's metric sums (confusion counts, regression sums in the targets' units,
    or next-token counts) and summed loss on its shard of the validation set (or of samples)."""
    prep, k = dataset.preprocessing, dataset.num_classes
    regression, tokens = prep.task == "regression", prep.task == "language_modeling"
    stats, loss = np.zeros(5 if regression else 2 if tokens else k * k), 0.0
    samples = dataset.val if samples is None else samples
    for x, y in steps.loader(samples, eval_shard(len(samples), comm.rank, comm.size, batch_size)):
        outputs, batch_loss = steps.evaluate_batch(x, y)
        loss += batch_loss
        labels = host_labels(y)
        if tokens:  # outputs: each position's most likely token
            stats += token_sums(outputs, labels, prep.pad_id if prep.ignore_pad else None)
            continue
        stats += regression_sums(prep.targets(outputs), prep.targets(labels)) if regression else \
            confusion(labels, np.asarray(outputs).argmax(axis=1), k).ravel()
    return stats, loss


def batch_size(spec) -> int:
    """Validation's batches: at least 256 samples, or a language model's training batch
    (its logits, [batch, length, vocabulary], are the memory that bounds it)."""
    return spec.train.batch_size if spec.task == "language_modeling" else max(spec.train.batch_size, 256)


def host_labels(labels) -> np.ndarray:
    """A batch's labels as numpy, wherever the loader put them: the torch loader keeps
    them on the GPU when training there."""
    if getattr(labels, "is_cuda", False):
        labels = labels.cpu()
    return np.asarray(labels)


def task_scores(dataset: Dataset, stats: np.ndarray, loss: float) -> dict[str, float]:
    """The task's metrics from the allreduced sums; loss: the mean validation loss."""
    if dataset.preprocessing.task == "language_modeling":
        return token_scores(stats, loss)
    if dataset.preprocessing.task == "regression":
        return regression_scores(stats)
    k = dataset.num_classes
    return scores(stats.reshape(k, k))
