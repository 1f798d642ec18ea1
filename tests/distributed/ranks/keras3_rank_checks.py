"""Plain Horovod code on Keras 3 objects, run inside each of 2 ranks by
horovodrun (see test_ranks.py). Each check exercises one of the project's
Keras 3 fixes to Horovod (hvdtrain/horovod_build/fixes.py, KERAS3_FIXES) and
compares the ranks' results with what the collective must give."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import horovod.tensorflow as hvd  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

hvd.init()


def gathered(values, name):
    """Every rank's list of arrays, as numpy."""
    return hvd.allgather_object([np.asarray(v) for v in values], name=name)


def model_on_rank_seed(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="tanh"),
                             keras.layers.Dense(3)])


def batch(seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(8, 6)).astype(np.float32), rng.integers(0, 3, 8)


def loss_fn(model, x, y):
    logits = model(x, training=True)
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))


def local_gradients(model, x, y):
    with tf.GradientTape() as tape:
        loss = loss_fn(model, x, y)
    return [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]


def synced_model():
    """Different initial weights per rank, made equal by broadcast_variables."""
    model = model_on_rank_seed(100 + hvd.rank())
    hvd.broadcast_variables(model.variables, root_rank=0)
    return model


def test_broadcast_variables_of_a_keras3_model():
    model = model_on_rank_seed(100 + hvd.rank())
    before = gathered(model.weights, "bcast.before")
    assert not np.allclose(before[0][0], before[1][0])  # ranks really started apart
    hvd.broadcast_variables(model.variables, root_rank=0)
    after = gathered(model.weights, "bcast.after")
    for rank_values in after:
        for value, root in zip(rank_values, before[0]):
            np.testing.assert_array_equal(value, root)


@pytest.mark.parametrize("in_function", [False, True], ids=["eager", "tf.function"])
def test_distributed_gradient_tape_averages_keras3_gradients(in_function):
    model = synced_model()
    x, y = batch(hvd.rank())
    every_local = hvd.allgather_object(local_gradients(model, x, y), name=f"tape.local.{in_function}")

    def reduced():
        with tf.GradientTape() as tape:
            loss = loss_fn(model, x, y)
        tape = hvd.DistributedGradientTape(tape)
        return tape.gradient(loss, model.trainable_variables)

    grads = tf.function(reduced)() if in_function else reduced()
    for i, grad in enumerate(grads):
        expected = np.mean([local[i] for local in every_local], axis=0)
        np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-5, atol=1e-7)
    assert not np.allclose(every_local[0][0], every_local[1][0])  # the average is not one rank's


def test_tape_groups_given_as_keras3_variables():
    model = synced_model()
    x, y = batch(10 + hvd.rank())
    every_local = hvd.allgather_object(local_gradients(model, x, y), name="groups.local")
    kernel, bias = model.layers[0].kernel, model.layers[0].bias
    with tf.GradientTape() as tape:
        loss = loss_fn(model, x, y)
    tape = hvd.DistributedGradientTape(tape, groups=[[kernel, bias]])
    grads = tape.gradient(loss, model.trainable_variables)
    for i, grad in enumerate(grads):
        np.testing.assert_allclose(grad.numpy(), np.mean([g[i] for g in every_local], axis=0),
                                   rtol=1e-5, atol=1e-7)


def test_partial_tape_keeps_keras3_local_layer_gradients_local():
    model = synced_model()
    x, y = batch(20 + hvd.rank())
    local = local_gradients(model, x, y)
    every_local = hvd.allgather_object(local, name="partial.local")
    head = model.layers[-1]
    with tf.GradientTape() as tape:
        loss = loss_fn(model, x, y)
    tape = hvd.PartialDistributedGradientTape(tape, local_layers=[head])
    local_pairs, global_pairs = tape.get_local_and_global_gradients(loss, model.trainable_variables)
    # the pairs carry the caller's own Keras variables
    assert [v for v, _ in local_pairs] == [head.kernel, head.bias]
    assert [v for v, _ in global_pairs] == [model.layers[0].kernel, model.layers[0].bias]
    for i, (_, grad) in enumerate(global_pairs):
        np.testing.assert_allclose(grad.numpy(), np.mean([g[i] for g in every_local], axis=0),
                                   rtol=1e-5, atol=1e-7)
    for i, (_, grad) in enumerate(local_pairs, start=2):
        # not reduced: this rank's own gradient, scaled by 1/size as upstream does
        np.testing.assert_allclose(grad.numpy(), local[i] / hvd.size(), rtol=1e-5, atol=1e-7)


def test_broadcast_of_keras3_optimizer_variables():
    model = synced_model()
    optimizer = keras.optimizers.Adam(learning_rate=0.01)
    x, y = batch(30 + hvd.rank())
    optimizer.apply_gradients(zip([tf.constant(g) for g in local_gradients(model, x, y)],
                                  model.trainable_variables))
    before = gathered(optimizer.variables, "opt.before")
    assert not all(np.allclose(a, b) for a, b in zip(before[0], before[1]))
    hvd.broadcast_variables(optimizer.variables, root_rank=0)
    for rank_values in gathered(optimizer.variables, "opt.after"):
        for value, root in zip(rank_values, before[0]):
            np.testing.assert_array_equal(value, root)


def test_sync_batch_normalization_uses_the_global_batch():
    layer = hvd.SyncBatchNormalization(momentum=0.0, epsilon=1e-3)
    x = np.random.default_rng(40 + hvd.rank()).normal(hvd.rank() * 3.0, 1.0 + hvd.rank(), (16, 4))
    out = layer(x.astype(np.float32), training=True).numpy()
    everything = np.concatenate(hvd.allgather_object(x, name="bn.x"))
    mean, var = everything.mean(axis=0), everything.var(axis=0)
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out, (x - mean) / np.sqrt(var + 1e-3), rtol=1e-3, atol=1e-4)


def test_elastic_keras_state_saves_restores_and_syncs_keras3_optimizer():
    model = synced_model()
    optimizer = keras.optimizers.SGD(learning_rate=0.1, momentum=0.9)
    optimizer.build(model.trainable_variables)
    state = hvd.elastic.TensorFlowKerasState(model, optimizer, epoch=hvd.rank())
    saved = [v.numpy().copy() for v in optimizer.variables]
    x, y = batch(50 + hvd.rank())
    optimizer.apply_gradients(zip([tf.constant(g) for g in local_gradients(model, x, y)],
                                  model.trainable_variables))
    state.restore()  # back to the committed values
    for variable, value in zip(optimizer.variables, saved):
        np.testing.assert_array_equal(variable.numpy(), value)
    optimizer.apply_gradients(zip([tf.constant(g) for g in local_gradients(model, x, y)],
                                  model.trainable_variables))
    root = gathered(optimizer.variables, "elastic.root")[0]
    state.sync()  # rank 0's model, optimizer and attributes everywhere
    assert state.epoch == 0
    for variable, value in zip(optimizer.variables, root):
        np.testing.assert_array_equal(variable.numpy(), value)
