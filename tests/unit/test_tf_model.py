"""TensorFlow backend models: the same shapes and parameter counts as torch's."""
import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import require_module  # noqa: E402

require_module("tensorflow")
import torch  # noqa: E402

from hvdtrain.backends import tensorflow as tfb  # noqa: E402
from hvdtrain.backends import torch as torchb  # noqa: E402
from hvdtrain.data import load_dataset  # noqa: E402
from hvdtrain.spec import validate  # noqa: E402
from tests.conftest import EXAMPLES  # noqa: E402


def model_spec(model):
    return validate({"name": "t", "backend": "tensorflow", "model": model,
                     "data": {"source": "digits"}}).model


def torch_count(net):
    return sum(p.numel() for p in net.parameters())


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["mlp", "cnn"]),
       hidden=st.lists(st.integers(1, 40), max_size=3),
       channels=st.lists(st.integers(1, 12), min_size=1, max_size=3),
       kernel=st.sampled_from([1, 3, 5]),
       height=st.integers(1, 9), width=st.integers(1, 9), depth=st.integers(1, 3),
       classes=st.integers(2, 7), dropout=st.sampled_from([0.0, 0.3]),
       activation=st.sampled_from(["relu", "tanh", "gelu"]))
def test_parameter_counts_and_output_shapes_match_torch(kind, hidden, channels, kernel, height,
                                                         width, depth, classes, dropout, activation):
    fields = {"kind": kind, "hidden": hidden, "dropout": dropout, "activation": activation}
    if kind == "cnn":
        fields.update(channels=channels, kernel_size=kernel)
        shape = [depth, height, width]
    else:
        shape = [height * width]
    spec = model_spec(fields)
    keras_net = tfb.build_model(spec, shape, classes)
    torch_net = torchb.build_model(spec, shape, classes)
    assert keras_net.count_params() == torch_count(torch_net)
    assert len(keras_net.trainable_variables) == len(list(torch_net.parameters()))
    x = np.random.default_rng(0).normal(size=(3, *shape)).astype(np.float32)
    assert tfb.outputs(keras_net, x).shape == (3, classes) == tuple(torch_net(torch.from_numpy(x)).shape)


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.name.endswith("-tf.yaml")],
                         ids=lambda p: p.name)
def test_each_tf_example_is_its_torch_twin_but_for_the_backend(example):
    twin = example.with_name(example.name.replace("-tf.yaml", "-torch.yaml"))
    import yaml
    tf_spec, torch_spec = (yaml.safe_load(p.read_text()) for p in (example, twin))
    assert tf_spec.pop("backend") == "tensorflow" and torch_spec.pop("backend") == "torch"
    assert tf_spec.pop("name").replace("-tf", "") == torch_spec.pop("name").replace("-torch", "")
    tf_spec.pop("output", None), torch_spec.pop("output", None)
    if tf_spec["model"]["kind"] == "custom":  # the same network, written for each framework
        builders = tf_spec["model"].pop("builder"), torch_spec["model"].pop("builder")
        assert builders[0].replace("keras_models", "torch_models") == builders[1]
    if tf_spec["data"]["source"] == "custom":  # the same samples, as each framework takes them
        loaders = tf_spec["data"].pop("loader"), torch_spec["data"].pop("loader")
        assert loaders == ("user_data.arrays:digits", "user_data.torch_data:digits")
    assert tf_spec == torch_spec


def test_export_round_trip_gives_same_logits(tmp_path):
    spec = validate({"name": "t", "backend": "tensorflow", "data": {"source": "digits"},
                     "model": {"kind": "cnn", "channels": [4], "hidden": [8], "dropout": 0.2}})
    ds = load_dataset(spec.data, image=True)
    net = tfb.build_model(spec.model, ds.preprocessing.input_shape, ds.num_classes)
    tfb.save_model(net, spec, tmp_path)
    ds.preprocessing.save(tmp_path / "preprocessing.json")
    assert json.loads((tmp_path / "model.json").read_text())["backend"] == "tensorflow"
    expected = tfb.outputs(net, ds.val.x[:16])
    assert np.allclose(tfb.load_model(tmp_path)(ds.val.x[:16]), expected, atol=1e-6)


def test_checkpoint_state_round_trip_and_mismatch():
    spec = model_spec({"kind": "mlp", "hidden": [5]})
    a, b = tfb.build_model(spec, [4], 3), tfb.build_model(spec, [4], 3)
    payload = tfb.variables_to_bytes({"model": a.weights})
    tfb.bytes_to_variables(payload, {"model": b.weights})
    assert tfb.weights_digest(a) == tfb.weights_digest(b)
    other = tfb.build_model(model_spec({"kind": "mlp", "hidden": [6]}), [4], 3)
    before = tfb.weights_digest(other)
    with pytest.raises(ValueError):
        tfb.bytes_to_variables(payload, {"model": other.weights})
    assert tfb.weights_digest(other) == before  # nothing half-loaded


def test_torch_job_does_not_import_tensorflow():
    code = ("import sys; import hvdtrain.backends.torch; "
            "print('tensorflow' in sys.modules, 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_a_keras_optimizer_by_import_path_gets_the_lr_and_its_args():
    import keras

    from hvdtrain.spec import validate
    spec = validate({"name": "o", "backend": "tensorflow", "model": {"kind": "mlp"}, "data": {"source": "iris"},
                     "optimizer": {"name": "keras.optimizers:AdamW", "args": {"weight_decay": 0.05, "beta_2": 0.95}}})
    made = tfb.make_optimizer(spec.optimizer, lr=0.004)
    assert isinstance(made, keras.optimizers.AdamW) and made.weight_decay == 0.05 and made.beta_2 == 0.95
    assert float(made.learning_rate) == pytest.approx(0.004)
