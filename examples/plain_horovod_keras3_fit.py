"""Plain horovod.tensorflow.keras with Keras 3's model.fit -- no hvdtrain.

Written as Horovod's examples/tensorflow2/tensorflow2_keras_mnist.py is, on the
digits data that scikit-learn ships (no download). It runs on hvdtrain's
Horovod build (scripts/setup.sh), whose Keras 3 fixes give
hvd.DistributedOptimizer and Horovod's Keras callbacks Keras 3 support:

    horovodrun -np 2 -H localhost:2 --gloo python examples/plain_horovod_keras3_fit.py
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import horovod.tensorflow as hvd_tf  # noqa: E402
import horovod.tensorflow.keras as hvd  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

hvd.init()

digits = load_digits()
x = (digits.data / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
y = digits.target.astype(np.int64)
dataset = (tf.data.Dataset.from_tensor_slices((x, y))
           .shard(hvd.size(), hvd.rank())  # this rank's part
           .repeat().shuffle(1000, seed=hvd.rank()).batch(32))

model = keras.Sequential([
    keras.Input((8, 8, 1)),
    keras.layers.Conv2D(16, 3, activation="relu"),
    keras.layers.Flatten(),
    keras.layers.Dropout(0.1),
    keras.layers.Dense(64, activation="relu"),
    keras.layers.Dense(10, activation="softmax"),
])

# Horovod: scale the learning rate by the number of workers, and wrap the optimizer.
scaled_lr = 0.002 * hvd.size()
opt = hvd.DistributedOptimizer(keras.optimizers.Adam(scaled_lr))

model.compile(loss=keras.losses.SparseCategoricalCrossentropy(), optimizer=opt,
              metrics=["accuracy"])

callbacks = [
    # Horovod: start every rank from rank 0's weights.
    hvd.callbacks.BroadcastGlobalVariablesCallback(0),
    # Horovod: average the metrics over the ranks at the end of every epoch.
    hvd.callbacks.MetricAverageCallback(),
    # Horovod: warm the learning rate up over the first epochs.
    hvd.callbacks.LearningRateWarmupCallback(initial_lr=scaled_lr, warmup_epochs=2, verbose=1),
]

steps = len(x) // (32 * hvd.size())
history = model.fit(dataset, steps_per_epoch=steps, callbacks=callbacks, epochs=6,
                    verbose=2 if hvd.rank() == 0 else 0)

weights = hvd_tf.allgather_object([w.numpy() for w in model.weights])
same = all(np.array_equal(a, b) for a, b in zip(weights[0], weights[-1]))
if hvd.rank() == 0:
    print(f"final accuracy (averaged over ranks) {history.history['accuracy'][-1]:.4f}, "
          f"learning rate {history.history['lr'][-1]:.4g}")
    print(f"weights identical on all {hvd.size()} ranks: {same}")
