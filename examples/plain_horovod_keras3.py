"""Plain Horovod with Keras 3, as Horovod's documentation writes it -- no hvdtrain.

Runs on hvdtrain's Horovod build (scripts/setup.sh), whose Keras 3 fixes let
Horovod's tapes and broadcasts take Keras 3 variables:

    horovodrun -np 2 -H localhost:2 --gloo python examples/plain_horovod_keras3.py
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import horovod.tensorflow as hvd  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

hvd.init()
digits = load_digits()
x = (digits.data / 16.0).astype(np.float32)[hvd.rank()::hvd.size()]  # this rank's shard
y = digits.target[hvd.rank()::hvd.size()]

model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64, activation="relu"),
                          keras.layers.Dense(10)])
optimizer = keras.optimizers.SGD(learning_rate=0.05 * hvd.size(), momentum=0.9)
optimizer.build(model.trainable_variables)
hvd.broadcast_variables(model.variables, root_rank=0)
hvd.broadcast_variables(optimizer.variables, root_rank=0)


@tf.function
def train_step(images, labels):
    with tf.GradientTape() as tape:
        logits = model(images, training=True)
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
    tape = hvd.DistributedGradientTape(tape)
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return loss


for epoch in range(5):
    for start in range(0, len(x) - 31, 32):
        loss = train_step(x[start:start + 32], y[start:start + 32])
    accuracy = np.mean(np.argmax(model(x), axis=1) == y)
    mean_accuracy = hvd.allreduce(tf.constant(accuracy), op=hvd.Average).numpy()
    if hvd.rank() == 0:
        print(f"epoch {epoch + 1}: loss {float(loss):.4f}, training accuracy {mean_accuracy:.4f}")

weights = hvd.allgather_object([w.numpy() for w in model.weights])
same = all(np.array_equal(a, b) for a, b in zip(weights[0], weights[-1]))
if hvd.rank() == 0:
    print(f"weights identical on all {hvd.size()} ranks: {same}")
