"""The TensorFlow backend's input pipeline: tf.data reads index batches through
`data.workers` parallel reads, in order, and keeps `data.prefetch` batches ready;
image files travel as uint8 and are normalised on the device."""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import tensorflow as tf

from ..data import Batch, Dataset, Samples, loader_failure
from ..errors import DataError
from ..spec import DataSpec


def make_loader(data: DataSpec | None, dataset: Dataset, label_type) -> Callable[..., Iterable[Batch]]:
    """The input pipeline: tf.data reads each index batch with `data.workers` reads in
    parallel (in order) and keeps `data.prefetch` batches ready; image files as uint8."""
    workers = data.workers if data else 0
    x_type = tf.uint8 if dataset.preprocessing.image_size else tf.float32
    x_spec = tf.TensorSpec([None, *dataset.preprocessing.input_shape], x_type)
    label_dtype = label_type.as_numpy_dtype

    def loader(samples: Samples, index_batches: list[np.ndarray], epoch: int | None = None) -> Iterable[Batch]:
        """The batches at index_batches; epoch: a training epoch's (augmented) batches."""
        failures: list[Exception] = []

        def read(indices: np.ndarray):
            try:
                x, y = samples.batch(indices, epoch)
            except DataError as err:
                failures.append(err)
                raise
            return np.asarray(x, x_type.as_numpy_dtype), np.asarray(y, label_dtype)

        def read_batch(indices):
            x, y = tf.numpy_function(read, [indices], [x_type, label_type], stateful=False)
            return tf.ensure_shape(x, x_spec.shape), tf.ensure_shape(y, [None])

        pipeline = tf.data.Dataset.from_generator(lambda: iter(index_batches),
                                                  output_signature=tf.TensorSpec([None], tf.int64))
        pipeline = pipeline.map(read_batch, num_parallel_calls=workers, deterministic=True) if workers else \
            pipeline.map(read_batch)
        try:
            yield from pipeline.prefetch(data.prefetch if data else 1)
        except tf.errors.OpError:
            if failures:
                raise loader_failure(failures[0]) from None
            raise
    return loader
