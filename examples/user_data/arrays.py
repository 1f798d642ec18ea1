"""A data loader of one's own that returns arrays, named in a spec as
`data.loader: user_data.arrays:digits`.

A loader returns (training set, validation set): here (x, y) arrays, which
either backend takes (TensorFlow also takes finite tf.data.Datasets of (x, y)
samples). hvdtrain shards them across the ranks, batches them and reads them
through its input pipeline; the split is the loader's own.
"""
import numpy as np
from sklearn.datasets import load_digits


def digits(seed: int = 0, validation_fraction: float = 0.2):
    """The handwritten digits as [1, 8, 8] images in [0, 1], split by seed."""
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(len(x) * (1 - validation_fraction))
    return (x[order[:cut]], data.target[order[:cut]]), (x[order[cut:]], data.target[order[cut:]])
