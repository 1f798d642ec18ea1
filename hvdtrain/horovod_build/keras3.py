"""horovod.tensorflow.keras's DistributedOptimizer for Keras 3 optimizers.

The build copies this file into Horovod as ``horovod/_keras/keras3.py`` (see
fixes.py, KERAS3_FIXES); it imports only TensorFlow, Keras and Horovod.

Keras 2's optimizers computed gradients themselves (``_compute_gradients``,
``get_gradients``), and Horovod allreduced them there. Keras 3's ``model.fit``
takes the gradients from its own tape and hands them to
``optimizer.apply(grads, variables)``, and Keras 3 variables wrap a
``tf.Variable`` instead of being one. So here the allreduce happens in
``apply``; ``_compute_gradients`` / ``compute_gradients`` / ``minimize`` are
kept for code written against Keras 2 (their gradients are allreduced once:
``apply`` recognises the very tensors they returned). With
``backward_passes_per_step`` > 1, Horovod's eager aggregation helper sums the
gradients and allreduces every N-th call; the wrapped optimizer updates the
weights on that call only, and ``iterations`` counts every call, as it did on
Keras 2.
"""
import os
import types

import keras
import tensorflow as tf

import horovod.tensorflow as hvd
from horovod.tensorflow.gradient_aggregation_eager import LocalGradientAggregationHelperEager
from horovod.tensorflow.mpi_ops import size_op
from horovod.tensorflow.util import _tf_variable, _tf_variables


def is_keras3_optimizer(optimizer):
    """True for a Keras 3 optimizer (TF_USE_LEGACY_KERAS's tf_keras ones are Keras 2)."""
    return int(keras.__version__.split(".")[0]) >= 3 and isinstance(optimizer, keras.optimizers.Optimizer)


def is_keras3(module):
    """True for Keras 3 as `module` (tf.keras or keras); tf_keras, Keras 2, has no __version__."""
    return int(getattr(module, "__version__", "2").split(".")[0]) >= 3


def load_model(module, wrap_optimizer, filepath, custom_objects):
    """hvd.load_model on Keras 3: Keras 3 restores an optimizer by its registered class,
    not by the lowercase names Horovod maps to wrapped classes, so the model is loaded as
    saved and its restored optimizer (iterations, slots) handed to a DistributedOptimizer
    of the same class and config. A model saved uncompiled comes back as it was."""
    model = module.models.load_model(filepath, custom_objects=custom_objects)
    restored = getattr(model, "optimizer", None)
    if not is_keras3_optimizer(restored):
        return model
    distributed = wrap_optimizer(lambda: restored)()
    if restored.built:
        distributed.build(model.trainable_variables)
        if len(distributed.variables) != len(restored.variables):
            raise ValueError("hvd.load_model: the restored optimizer holds %d variables, its "
                             "DistributedOptimizer %d" % (len(restored.variables), len(distributed.variables)))
        for mine, saved in zip(distributed.variables, restored.variables):
            mine.assign(saved)
    model.optimizer = distributed
    return model


def create_distributed_optimizer(optimizer, name, device_dense, device_sparse, compression,
                                 sparse_as_dense, gradient_predivide_factor, op,
                                 backward_passes_per_step=1, average_aggregated_gradients=False,
                                 groups=None, process_set=hvd.global_process_set,
                                 scale_local_gradients=True):
    base = type(optimizer)

    class _DistributedOptimizer(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            hvd_name = name or "Distributed%s" % base.__name__
            self._allreduce_grads = hvd._make_allreduce_grads_fn(
                hvd_name, device_dense, device_sparse, compression, sparse_as_dense, op,
                gradient_predivide_factor, groups, process_set=process_set)
            self.process_set = process_set
            self.scale_local_gradients = scale_local_gradients
            # refs of the tf.Variables whose gradients stay local, and the gradients
            # _compute_gradients returned already allreduced (kept out of Keras' tracking)
            self._hvd = types.SimpleNamespace(local=set(), reduced=None)
            self._agg_helper = None
            if backward_passes_per_step > 1:
                self._agg_helper = LocalGradientAggregationHelperEager(
                    backward_passes_per_step=backward_passes_per_step,
                    allreduce_func=self._allreduce_grads,
                    sparse_as_dense=sparse_as_dense,
                    average_aggregated_gradients=average_aggregated_gradients,
                    process_set=process_set,
                    scale_local_gradients=scale_local_gradients)

        def register_local_var(self, var):
            """Registers a variable as worker local: its gradient is not allreduced."""
            if self._agg_helper:
                self._agg_helper.register_local_var(_tf_variable(var))
            else:
                self._hvd.local.add(_tf_variable(var).ref())

        def _allreduce(self, grads, variables):
            variables = _tf_variables(list(variables))
            if self._agg_helper:
                return list(self._agg_helper.compute_gradients(tuple(grads), tuple(variables)))
            local = self._hvd.local
            shared = [i for i, v in enumerate(variables) if v.ref() not in local]
            reduced = self._allreduce_grads([grads[i] for i in shared], [variables[i] for i in shared])
            out = list(grads)
            for i, grad in zip(shared, reduced):
                out[i] = grad
            if self.scale_local_gradients and local:
                # as Horovod does on Keras 2: local gradients are divided by the size
                if int(os.environ.get("HOROVOD_ELASTIC", 0)):
                    size = size_op(process_set_id=self.process_set.process_set_id)
                else:
                    size = self.process_set.size()
                for i, v in enumerate(variables):
                    if v.ref() in local and out[i] is not None:
                        out[i] = _divide(out[i], size)
            return out

        def _compute_gradients(self, loss, var_list, grad_loss=None, tape=None):
            """Keras 2's gradient computation, allreduced: a list of (gradient, variable)."""
            if not callable(loss) and tape is None:
                raise ValueError("`tape` is required when a `Tensor` loss is passed.")
            tape = tape if tape is not None else tf.GradientTape()
            if callable(loss):
                with tape:
                    if not callable(var_list):
                        tape.watch(_tf_variables(list(var_list)))
                    loss = loss()
            if callable(var_list):
                var_list = var_list()
            variables = list(var_list)
            grads = tape.gradient(loss, _tf_variables(variables), grad_loss)
            grads = self._allreduce(list(grads), variables)
            self._hvd.reduced = list(grads)
            return list(zip(grads, variables))

        def compute_gradients(self, loss, var_list, tape=None):
            return self._compute_gradients(loss, var_list, None, tape)

        def minimize(self, loss, var_list, tape=None):
            self.apply_gradients(self._compute_gradients(loss, var_list, tape=tape))
            return self.iterations

        def apply_gradients(self, grads_and_vars, **kwargs):
            # Keras 2 callers pass name= / experimental_aggregate_gradients=; the
            # allreduce does not depend on them.
            return super().apply_gradients(grads_and_vars)

        def _already_reduced(self, grads):
            reduced, self._hvd.reduced = self._hvd.reduced, None
            return reduced is not None and len(reduced) == len(grads) and all(
                a is b for a, b in zip(reduced, grads))

        def apply(self, grads, trainable_variables=None):
            if trainable_variables is None:
                trainable_variables = self._trainable_variables
            grads, variables = list(grads), list(trainable_variables)
            if not grads:
                return
            if not self._already_reduced(grads):
                grads = self._allreduce(grads, variables)
            if self._agg_helper is None:
                return super().apply(grads, variables)
            if not self.built:
                # outside the tf.cond below: a branch may not create variables
                with keras.name_scope(self.name, caller=self):
                    self.build(variables)
                self.built = True
            distributed = super(_DistributedOptimizer, self)

            def update():
                distributed.apply(grads, variables)
                return tf.constant(True)

            def count_only():
                self._iterations.assign_add(1)
                return tf.constant(False)

            # the helper's counter is back at 0 on the call that allreduced
            tf.cond(tf.equal(self._agg_helper.counter, 0), update, count_only)

    # Named like the wrapped optimizer, so that a saved model restores without Horovod.
    _DistributedOptimizer.__name__ = base.__name__
    _DistributedOptimizer.__qualname__ = base.__qualname__
    _DistributedOptimizer.__module__ = base.__module__
    return _DistributedOptimizer.from_config(optimizer.get_config())


def _divide(grad, size):
    if isinstance(grad, tf.IndexedSlices):
        return tf.IndexedSlices(grad.values / tf.cast(size, grad.values.dtype), grad.indices,
                                grad.dense_shape)
    return grad / tf.cast(size, grad.dtype)
