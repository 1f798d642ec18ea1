"""What Horovod's test_tensorflow_process_sets.py checks of the reducescatter gradient
but no longer reaches (its loop stops at its first case, float16, on its own exact
comparison): every dtype and reduction, within the even and the odd ranks' process
sets. Run inside each rank by horovodrun (see test_ranks.py)."""
import itertools

import horovod.tensorflow as hvd
import numpy as np
import pytest
import tensorflow as tf


EVEN = [r for r in range(2) if r % 2 == 0]
ODD = [r for r in range(2) if r % 2 == 1]
EVEN_SET, ODD_SET = hvd.ProcessSet(EVEN), hvd.ProcessSet(ODD)
hvd.init(process_sets=[EVEN_SET, ODD_SET])
TOLERANCE = {tf.float16: 1e-3, tf.float32: 1e-6, tf.float64: 1e-12}


@pytest.fixture(autouse=True)
def barrier():
    """No rank shuts Horovod down while the other still runs a check."""
    yield
    hvd.allreduce(tf.constant([0.0]), name="barrier")


def mine():
    return (EVEN_SET, EVEN) if hvd.rank() in EVEN else (ODD_SET, ODD)


@pytest.mark.parametrize("op, dtype, dim", list(itertools.product(["Sum", "Average"], TOLERANCE, [1, 2, 3])),
                         ids=lambda v: getattr(v, "name", str(v)))
def test_reducescatter_within_a_process_set_and_its_gradient(op, dtype, dim):
    process_set, members = mine()
    size = len(members)
    rng = np.random.default_rng(hvd.rank() * 100 + dim)
    values = rng.uniform(-100, 100, size=[size * 4] * dim)
    tensor = tf.Variable(tf.cast(values, dtype))
    with tf.GradientTape() as tape:
        reduced = hvd.reducescatter(tensor, op=getattr(hvd, op), process_set=process_set,
                                    name=f"rs.{op}.{dtype.name}.{dim}")
    # forward: this rank's block of the sum (or mean) over the set's members
    everyone = [np.random.default_rng(r * 100 + dim).uniform(-100, 100, size=[size * 4] * dim) for r in members]
    total = sum(tf.cast(v, dtype).numpy().astype(np.float64) for v in everyone)
    expected = (total if op == "Sum" else total / size)[4 * members.index(hvd.rank()):][:4]
    np.testing.assert_allclose(reduced.numpy().astype(np.float64), expected,
                               rtol=TOLERANCE[dtype] * 10, atol=TOLERANCE[dtype] * 100)
    grad_ys = tf.ones([4] + [size * 4] * (dim - 1), dtype=dtype)
    grad = tape.gradient(tf.cast(reduced, dtype), tensor, grad_ys)
    wanted = np.ones([size * 4] * dim) * (size if op == "Sum" else 1)
    assert grad.dtype == dtype
    assert np.abs(grad.numpy().astype(np.float64) - wanted).max() <= TOLERANCE[dtype]
