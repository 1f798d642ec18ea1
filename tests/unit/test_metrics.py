import numpy as np
from hypothesis import given, settings, strategies as st
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from hvdtrain.train.metrics import confusion, scores


@settings(max_examples=300, deadline=None)
@given(k=st.integers(2, 8), n=st.integers(1, 200), seed=st.integers(0, 2**31 - 1))
def test_scores_match_scikit_learn(k, n, seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, k, n)
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.integers(0, k, n))
    got = scores(confusion(y_true, y_pred, k))
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    assert np.isclose(got["accuracy"], accuracy_score(y_true, y_pred))
    assert np.isclose(got["precision"], p) and np.isclose(got["recall"], r) and np.isclose(got["f1"], f)


def test_confusion_of_shards_sums_to_confusion_of_whole():
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 5, 101), rng.integers(0, 5, 101)
    parts = sum(confusion(y_true[r::3], y_pred[r::3], 5) for r in range(3))
    assert np.array_equal(parts, confusion(y_true, y_pred, 5))


def test_perfect_and_empty():
    assert scores(confusion(np.arange(4), np.arange(4), 4)) == \
        {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert scores(np.zeros((3, 3)))["accuracy"] == 0.0
