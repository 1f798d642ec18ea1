"""horovod.tensorflow.keras on Keras 3, run inside each of 2 ranks by horovodrun
(see test_ranks.py).

The first checks are Horovod's own test_tensorflow2_keras.py tests whose test
code is Keras 2 (``var.ref()``, ``lr=``, an optimizer subclass with Keras 2's
signatures): here in Keras 3 spelling, with the same assertions. The others
check what that suite does not: the gradients model.fit applies are the
ranks' mean, the metric average, the warmup and schedule callbacks' learning
rates, the elastic KerasState with CommitStateCallback, and a saved model that
loads without Horovod.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import horovod.keras as hvd_keras  # noqa: E402
import horovod.tensorflow as hvd_tf  # noqa: E402
import horovod.tensorflow.keras as hvd  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

hvd.init()


def ref(var):
    """The tf.Variable a Keras 3 variable wraps, as a dict key (Keras 2 code used var.ref())."""
    return (var.value if isinstance(var, keras.Variable) else var).ref()


class AddingOptimizer(keras.optimizers.Optimizer):
    """Horovod's test optimizer (adds the gradient), with Keras 3's signatures."""

    def __init__(self, learning_rate=0.1, **kwargs):
        super().__init__(learning_rate=learning_rate, **kwargs)

    def update_step(self, gradient, variable, learning_rate):
        variable.assign_add(gradient)


# -- Horovod's suite, Keras 3 spelling --------------------------------------------------

@pytest.mark.parametrize("average_aggregated_gradients", [True, False])
def test_gradient_aggregation(average_aggregated_gradients):
    backward_passes_per_step = 4
    hvd_optimizer = hvd.DistributedOptimizer(
        optimizer=AddingOptimizer(name="test"), backward_passes_per_step=backward_passes_per_step,
        average_aggregated_gradients=average_aggregated_gradients, sparse_as_dense=True)
    x_0, (y_0, y_1) = 0.0, (1.0, 2.0)
    x = tf.Variable([x_0])
    y = tf.Variable([y_0, y_1])
    variables = [x, y]

    def loss():
        return x - tf.gather(y, [0])  # an IndexedSlices gradient for y

    @tf.function
    def compute_and_apply(var_list):
        hvd_optimizer.apply_gradients(hvd_optimizer._compute_gradients(loss, var_list=var_list))

    for idx in range(10):
        compute_and_apply(variables)
        steps = (idx + 1) // backward_passes_per_step
        grad_x, grad_y0 = steps * 1.0, steps * -1.0
        if not average_aggregated_gradients:
            grad_x, grad_y0 = grad_x * backward_passes_per_step, grad_y0 * backward_passes_per_step
        assert np.isclose(x.numpy(), x_0 + grad_x)
        assert np.isclose(y.numpy(), [y_0 + grad_y0, y_1]).all()
        assert idx + 1 == hvd_optimizer.iterations.numpy()
    assert hvd_optimizer._agg_helper.counter.numpy() == 10 % backward_passes_per_step


@pytest.mark.parametrize("average_aggregated_gradients", [True, False])
def test_gradient_aggregation_with_local_vars(average_aggregated_gradients):
    backward_passes_per_step, size, rank = 4, hvd.size(), hvd.rank()
    hvd_optimizer = hvd.DistributedOptimizer(
        optimizer=AddingOptimizer(name="test"), backward_passes_per_step=backward_passes_per_step,
        average_aggregated_gradients=average_aggregated_gradients, sparse_as_dense=True)
    n, n_local = 8, 4
    xs = [tf.Variable([0.0]) for _ in range(n)]
    ys = [tf.Variable([1.0, 2.0]) for _ in range(n)]
    for i in range(n_local):
        hvd_optimizer.register_local_var(xs[i])
        hvd_optimizer.register_local_var(ys[i])

    def loss():
        return xs - (float(rank + 1) * tf.gather(ys, [0], axis=1))

    @tf.function
    def compute_and_apply(var_list):
        hvd_optimizer.apply_gradients(hvd_optimizer._compute_gradients(loss, var_list=var_list))

    for idx in range(10):
        compute_and_apply(xs + ys)
        steps = (idx + 1) // backward_passes_per_step
        grad_x = steps * 1.0
        multiplier = float(size + 1) / 2  # mean of (rank + 1) over the ranks
        grad_y0 = steps * multiplier * -1.0
        if not average_aggregated_gradients:
            grad_x, grad_y0 = grad_x * backward_passes_per_step, grad_y0 * backward_passes_per_step
        expected_x = [grad_x / size if i < n_local else grad_x for i in range(n)]
        expected_y0 = [1.0 + (grad_y0 / multiplier * (rank + 1)) / size if i < n_local else 1.0 + grad_y0
                       for i in range(n)]
        assert np.isclose(np.array(xs).reshape(-1), expected_x).all()
        assert np.isclose(np.array(ys)[:, 0], expected_y0).all()
        assert np.isclose(np.array(ys)[:, 1], 2.0).all()
        assert idx + 1 == hvd_optimizer.iterations.numpy()
    assert hvd_optimizer._agg_helper.counter.numpy() == 10 % backward_passes_per_step


def test_grad_aggregation_with_inf_grad():
    step_count = tf.Variable(0, trainable=False, dtype=tf.int32)
    opt = hvd.DistributedOptimizer(keras.optimizers.SGD(), backward_passes_per_step=2, sparse_as_dense=True)
    x = tf.Variable(0.)

    def loss():
        step_count.assign_add(1)
        return tf.cond(step_count > 1, lambda: x, lambda: x * float("inf"))

    for _ in range(4):
        grads_and_vars = opt._compute_gradients(loss=loss, var_list=[x])
        opt.apply_gradients(grads_and_vars)
    assert tf.math.is_finite(grads_and_vars[0][0])


@pytest.mark.parametrize("num_local_layers", [0, 1, 2])
def test_partial_distributed_optimizer(num_local_layers):
    initializer = keras.initializers.Constant(hvd.rank())
    model = keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(2, kernel_initializer=initializer, bias_initializer=initializer),
        keras.layers.RepeatVector(3),
        keras.layers.TimeDistributed(keras.layers.Dense(3, kernel_initializer=initializer,
                                                        bias_initializer=initializer))])
    model.compile(loss=keras.losses.MeanSquaredError())
    x, y = np.random.random((1, 3)), np.random.random((1, 3, 3))
    with tf.GradientTape(persistent=True) as tape:
        loss = model.loss(y, model(x, training=True))
    gradients_tape = tape.gradient(loss, model.trainable_weights)
    local_layers = model.layers[:num_local_layers]
    opt = hvd_keras.PartialDistributedOptimizer(keras.optimizers.Adam(), sparse_as_dense=True,
                                               local_layers=local_layers)
    gradients_vars_opt = opt._compute_gradients(loss, model.trainable_weights, tape=tape)
    by_tape = {ref(v): g for v, g in zip(model.trainable_weights, gradients_tape)}
    by_opt = {ref(v): g for g, v in gradients_vars_opt}
    local = {ref(v) for layer in local_layers for v in layer.trainable_weights}
    assert len(local) == (2 if num_local_layers else 0)  # the second layer (RepeatVector) has no weights
    for var in model.trainable_weights:
        if ref(var) in local:
            np.testing.assert_allclose(by_tape[ref(var)], hvd.size() * by_opt[ref(var)], rtol=1e-6)
        else:  # the ranks start from different weights: the mean differs from the local gradient
            assert not np.allclose(by_tape[ref(var)], by_opt[ref(var)])


def test_broadcast_global_variables_callback_with_local_vars():
    root_rank = hvd.size() - 1
    initializer = keras.initializers.Constant(hvd.rank())

    def dense():
        return keras.layers.Dense(3, kernel_initializer=initializer, bias_initializer=initializer,
                                  trainable=False)
    model = keras.Sequential([keras.Input((3,)), dense(), dense(), dense(), dense(),
                              keras.layers.RepeatVector(3), dense()])
    model.compile(loss=keras.losses.MeanSquaredError(), optimizer="sgd")
    local_variables = list(model.layers[0].variables)
    callbacks = [hvd.callbacks.BroadcastGlobalVariablesCallback(root_rank=root_rank,
                                                                local_variables=local_variables)]
    model.fit(np.random.random((1, 3)), np.random.random((1, 3, 3)), callbacks=callbacks, verbose=0)
    local = {ref(v) for v in local_variables}
    checked = 0
    for var in model.variables:
        if var.dtype != "float32":
            continue  # e.g. a seed generator's state
        expected = hvd.rank() if ref(var) in local else root_rank
        np.testing.assert_allclose(var.numpy(), np.full(var.shape, float(expected)))
        checked += 1
    assert checked == 10


@pytest.mark.parametrize("backward_passes_per_step", [1, 2])
def test_sparse_as_dense(backward_passes_per_step):
    opt = hvd.DistributedOptimizer(keras.optimizers.RMSprop(learning_rate=0.0001), sparse_as_dense=True,
                                   backward_passes_per_step=backward_passes_per_step)
    keras.utils.set_random_seed(1)  # the same start on both ranks
    model = keras.Sequential([keras.Input((10,), dtype="int32"), keras.layers.Embedding(1000, 64)])
    model.compile(loss=keras.losses.MeanSquaredError(), optimizer=opt)
    rng = np.random.default_rng(hvd.rank())
    x, y = rng.integers(1000, size=(32, 10)), rng.random((32, 10, 64))
    for _ in range(3):
        model.train_on_batch(x, y)
    if backward_passes_per_step > 1:
        assert opt._agg_helper.counter.numpy() == 3 % backward_passes_per_step
    weights = hvd_tf.allgather_object(model.get_weights()[0])
    np.testing.assert_array_equal(weights[0], weights[1])


def test_train_model_lr_schedule():
    initial_lr = 0.1 * hvd.size()
    seen = []

    class StoreLearningRate(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(float(self.model.optimizer.learning_rate.numpy()))

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.RepeatVector(3)])
    model.compile(loss=keras.losses.MeanSquaredError(), optimizer=hvd.DistributedOptimizer(keras.optimizers.Adam()),
                  metrics=[keras.metrics.CategoricalAccuracy()])
    callbacks = [
        hvd.callbacks.BroadcastGlobalVariablesCallback(0),
        hvd.callbacks.MetricAverageCallback(),
        hvd.callbacks.LearningRateWarmupCallback(initial_lr=initial_lr, warmup_epochs=5),
        hvd.callbacks.LearningRateScheduleCallback(initial_lr=initial_lr, multiplier=1e-1,
                                                   start_epoch=5, end_epoch=10),
        hvd.callbacks.LearningRateScheduleCallback(initial_lr=initial_lr, multiplier=1e-2,
                                                   start_epoch=10, end_epoch=15),
        hvd.callbacks.LearningRateScheduleCallback(initial_lr=initial_lr, multiplier=lambda epoch: epoch,
                                                   start_epoch=15, end_epoch=20),
        StoreLearningRate()]
    rng = np.random.default_rng(hvd.rank())
    history = model.fit(rng.random((10, 3)), rng.random((10, 3, 2)), steps_per_epoch=5, callbacks=callbacks,
                        epochs=20, verbose=0)
    size = hvd.size()
    # warmup: at the end of epoch e the last batch set initial_lr / size * ((e + 1) (size - 1) / 5 + 1)
    np.testing.assert_allclose(seen[:5], [initial_lr / size * ((e + 1) * (size - 1) / 5 + 1) for e in range(5)],
                               rtol=1e-5)
    assert seen[0] < initial_lr and seen[4] == pytest.approx(initial_lr, rel=1e-5)
    np.testing.assert_allclose(seen[5:10], [initial_lr * 0.1 ** (e - 5) for e in range(5, 10)], rtol=1e-5)
    np.testing.assert_allclose(seen[10:15], [initial_lr * 0.01 ** (e - 10) for e in range(10, 15)], rtol=1e-5)
    np.testing.assert_allclose(seen[15:], [initial_lr * e for e in range(15, 20)], rtol=1e-5)
    np.testing.assert_allclose(history.history["lr"], seen, rtol=1e-6)  # the callback's log
    # the averaged loss is the same on every rank, though the ranks' data differ
    losses = hvd_tf.allgather_object(history.history["loss"])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)


# -- what the suite does not check ------------------------------------------------------

def test_fit_applies_the_mean_of_the_ranks_gradients():
    keras.utils.set_random_seed(7)  # the same start on both ranks
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    start = [w.numpy() for w in model.trainable_weights]
    rng = np.random.default_rng(100 + hvd.rank())  # different data on each rank
    x, y = rng.normal(size=(16, 4)).astype(np.float32), rng.normal(size=(16, 3)).astype(np.float32)
    loss_fn = keras.losses.MeanSquaredError()
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x))
    local = [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]
    mean = [np.mean(gs, axis=0) for gs in zip(*hvd_tf.allgather_object(local))]
    assert not np.allclose(local[0], mean[0])
    model.compile(loss=loss_fn, optimizer=hvd.DistributedOptimizer(keras.optimizers.SGD(learning_rate=0.5)))
    model.train_on_batch(x, y)
    for before, after, grad in zip(start, model.trainable_weights, mean):
        np.testing.assert_allclose(after.numpy(), before - 0.5 * grad, rtol=1e-5, atol=1e-6)


def test_metric_average_callback_gives_every_rank_the_mean():
    before, after = {}, {}

    class Record(keras.callbacks.Callback):
        def __init__(self, into):
            super().__init__()
            self.into = into

        def on_epoch_end(self, epoch, logs=None):
            self.into[epoch] = dict(logs)

    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(),
                  optimizer=hvd.DistributedOptimizer(keras.optimizers.SGD(0.1)), metrics=["accuracy"])
    rng = np.random.default_rng(hvd.rank())
    x, y = rng.normal(size=(64, 4)), rng.integers(0, 2, 64)
    model.fit(x, y, epochs=2, batch_size=16, verbose=0,
              callbacks=[Record(before), hvd.callbacks.MetricAverageCallback(), Record(after)])
    ranks_before = hvd_tf.allgather_object(before)
    assert ranks_before[0][1]["loss"] != ranks_before[1][1]["loss"]
    for epoch in (0, 1):
        for name in ("loss", "accuracy"):
            mean = np.mean([r[epoch][name] for r in ranks_before])
            assert after[epoch][name] == pytest.approx(mean, rel=1e-6)


def test_keras_state_and_commit_callback_in_fit():
    keras.utils.set_random_seed(11 + hvd.rank())  # different starts: sync() makes them rank 0's
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    opt = hvd.DistributedOptimizer(keras.optimizers.Adam(0.01))
    model.compile(loss=keras.losses.MeanSquaredError(), optimizer=opt)
    opt.build(model.trainable_variables)
    state = hvd.elastic.KerasState(model, batch=0, epoch=0)
    state.sync()
    commits = []
    state.register_reset_callbacks([])
    original_commit = state.commit

    def counting_commit():
        commits.append(1)
        original_commit()
    state.commit = counting_commit
    rng = np.random.default_rng(hvd.rank())
    callbacks = [hvd.elastic.CommitStateCallback(state, batches_per_commit=2),
                 hvd.elastic.UpdateBatchStateCallback(state), hvd.elastic.UpdateEpochStateCallback(state)]
    model.fit(rng.normal(size=(32, 4)), rng.normal(size=(32, 2)), batch_size=8, epochs=2, verbose=0,
              callbacks=callbacks)
    assert len(commits) == 2 * (4 // 2 + 1)  # every 2 batches, and at each epoch's end
    assert state.epoch == 2 and state.batch == 0
    committed = [w.numpy() for w in model.weights]
    committed_opt = [v.numpy() for v in opt.variables]
    model.set_weights([w + 1.0 for w in committed])
    state.restore()
    for w, c in zip(model.weights, committed):
        np.testing.assert_array_equal(w.numpy(), c)
    for v, c in zip(opt.variables, committed_opt):
        np.testing.assert_array_equal(v.numpy(), c)
    weights = hvd_tf.allgather_object(committed)
    for a, b in zip(weights[0], weights[1]):
        np.testing.assert_array_equal(a, b)


def test_saved_model_loads_without_horovod(tmp_path_factory):
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(loss=keras.losses.MeanSquaredError(),
                  optimizer=hvd.DistributedOptimizer(keras.optimizers.SGD(0.1, momentum=0.5)))
    model.train_on_batch(np.ones((4, 4)), np.zeros((4, 2)))
    path = tmp_path_factory.mktemp(f"rank{hvd.rank()}") / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.optimizer) is keras.optimizers.SGD
    assert loaded.optimizer.iterations.numpy() == 1
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
