"""hvd.load_model (horovod.tensorflow.keras) inside each of 2 ranks, on Keras 3 and,
with TF_USE_LEGACY_KERAS=1, on Keras 2 (tf-keras): a model saved with a
DistributedOptimizer comes back with one, its state kept, and training it on
different data per rank moves every rank's weights alike (see test_ranks.py)."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import horovod.tensorflow as hvd_tf  # noqa: E402
import horovod.tensorflow.keras as hvd  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

keras = tf.keras  # Keras 3, or tf-keras's Keras 2 under TF_USE_LEGACY_KERAS=1
hvd.init()


def test_mode_is_what_the_environment_asks():
    legacy = os.environ.get("TF_USE_LEGACY_KERAS") == "1"
    assert hasattr(keras, "__version__") is not legacy


def test_load_model_gives_a_distributed_optimizer_with_the_saved_state(tmp_path_factory):
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(loss="mse", optimizer=hvd.DistributedOptimizer(keras.optimizers.SGD(0.1, momentum=0.5)))
    model.train_on_batch(np.ones((4, 4)), np.zeros((4, 2)))
    suffix = ".keras" if hasattr(keras, "__version__") else ".h5"
    path = tmp_path_factory.mktemp(f"rank{hvd.rank()}") / f"model{suffix}"
    model.save(path)

    loaded = hvd.load_model(path)
    optimizer = loaded.optimizer
    assert type(optimizer).__name__ == "SGD"
    assert hasattr(optimizer, "_allreduce_grads"), type(optimizer).__mro__  # Horovod's wrapper
    assert int(optimizer.iterations.numpy()) == 1
    assert float(np.asarray(optimizer.momentum)) == 0.5
    saved = [np.asarray(v) for v in model.optimizer.variables]
    restored = [np.asarray(v) for v in optimizer.variables]
    assert len(saved) == len(restored) and len(saved) >= 3  # iterations (+ lr), one momentum per weight
    for a, b in zip(saved, restored):
        np.testing.assert_array_equal(a, b)

    # different data on each rank: equal weights afterwards only if the gradients were averaged
    x = np.random.default_rng(hvd.rank()).normal(size=(8, 4))
    loaded.train_on_batch(x, np.full((8, 2), float(hvd.rank())))
    assert int(optimizer.iterations.numpy()) == 2
    weights = hvd_tf.allgather_object([w.numpy() for w in loaded.weights])
    for a, b in zip(weights[0], weights[1]):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert not np.allclose(weights[0][0], model.weights[0].numpy())
