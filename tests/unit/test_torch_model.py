import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hvdtrain.backends import get_backend
from hvdtrain.backends.torch import build_model, load_model, save_model
from hvdtrain.data import load_dataset
from hvdtrain.train.lr import lr_schedule
from hvdtrain.spec import DataSpec, validate


def spec_for(model):
    return validate({"name": "t", "backend": "torch", "model": model, "data": {"source": "digits"},
                     "optimizer": {"lr": 0.1, "warmup_epochs": 2}})


def count(net):
    return sum(p.numel() for p in net.parameters())


def test_mlp_and_cnn_parameter_counts():
    mlp = build_model(spec_for({"kind": "mlp", "hidden": [128, 64]}).model, [64], 10)
    assert count(mlp) == (64 * 128 + 128) + (128 * 64 + 64) + (64 * 10 + 10)
    cnn = build_model(spec_for({"kind": "cnn", "channels": [16, 32], "hidden": [64]}).model, [1, 8, 8], 10)
    # conv 1->16 (3x3), pool 8->4, conv 16->32, pool 4->2, dense 128->64, 64->10
    assert count(cnn) == (9 * 16 + 16) + (9 * 16 * 32 + 32) + (128 * 64 + 64) + (64 * 10 + 10)
    assert cnn(torch.zeros(5, 1, 8, 8)).shape == (5, 10)


def test_gradient_buckets_follow_the_backward_order_and_the_caps():
    """horovod.bucket_mb: trainable parameters from the last to the first, each bucket
    closed by the parameter that brings it to its cap (1 MiB for the first), as DDP's; a
    parameter larger than the cap in a bucket of its own."""
    from hvdtrain.backends.torch import buckets
    mib = 2**18  # float32 elements in a MiB
    params = [torch.zeros(n, requires_grad=True) for n in (3 * mib, 3 * mib // 4, mib // 2, mib // 4, 5)]
    params[2].requires_grad_(False)  # frozen: no gradient to reduce
    groups = buckets(params, 2)
    # 5 floats, 1/4 MiB and 3/4 MiB reach the first 1 MiB together; 3 MiB passes 2 MiB alone
    assert [[id(p) for p in g] for g in groups] == [[id(params[4]), id(params[3]), id(params[1])], [id(params[0])]]
    assert [len(g) for g in buckets(params, 0.5)] == [2, 1, 1]  # 3/4 MiB passes 0.5 MiB: alone
    assert [len(g) for g in buckets(params[:2] + params[3:], 0.25)] == [2, 1, 1]
    assert buckets(params, 0) is None


def test_export_round_trip_gives_same_logits(tmp_path):
    spec = spec_for({"kind": "cnn", "channels": [4], "hidden": [8]})
    ds = load_dataset(DataSpec(source="digits"), image=True)
    net = build_model(spec.model, ds.preprocessing.input_shape, ds.num_classes)
    save_model(net, spec, tmp_path)
    ds.preprocessing.save(tmp_path / "preprocessing.json")
    assert json.loads((tmp_path / "model.json").read_text())["backend"] == "torch"
    net.eval()
    with torch.no_grad():
        expected = net(torch.from_numpy(ds.val.x[:16])).numpy()
    assert np.allclose(load_model(tmp_path)(ds.val.x[:16]), expected, atol=1e-6)


def test_warmup_ramps_to_scaled_lr():
    spec = spec_for({"kind": "mlp"})
    first = lr_schedule(spec.optimizer, 0.4, epoch=0, steps=10)
    assert first(0) == pytest.approx(0.1) and first(5) == pytest.approx(0.1 + 0.3 * 0.25)
    assert lr_schedule(spec.optimizer, 0.4, epoch=2, steps=10)(0) == pytest.approx(0.4)


def test_unknown_backend_module_is_a_clear_error():
    from hvdtrain.errors import UserError
    with pytest.raises(UserError, match="unknown backend"):
        get_backend("mxnet")


def test_import_hvdtrain_loads_no_framework():
    import subprocess
    import sys
    code = ("import sys, hvdtrain, hvdtrain.cli, hvdtrain.spec, hvdtrain.train.loop, hvdtrain.data; "
            "print(sorted(m for m in ('torch', 'tensorflow', 'horovod') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_custom_model_without_a_program_is_rebuilt_by_its_builder(tmp_path):
    """Where torch.export cannot take a model, predict rebuilds it from the builder
    and the directories its code came from, recorded in model.json."""
    from hvdtrain import plugins
    examples = str(Path(__file__).resolve().parents[2] / "examples")
    plugins.add_import_paths([examples])
    spec = validate({"name": "c", "backend": "torch", "data": {"source": "digits"},
                     "model": {"kind": "custom", "builder": "user_models.torch_models:residual_mlp",
                               "args": {"width": 16, "blocks": 1}}})
    ds = load_dataset(spec.data, image=True)
    net = plugins.build_model(spec.model, ds.preprocessing.input_shape, ds.outputs)
    save_model(net, spec, tmp_path)  # no example inputs: no program.pt2
    ds.preprocessing.save(tmp_path / "preprocessing.json")
    config = json.loads((tmp_path / "model.json").read_text())
    assert config["program"] is None and examples in config["import_paths"]
    net.eval()
    with torch.no_grad():
        expected = net(torch.from_numpy(ds.val.x[:16])).numpy()
    assert np.allclose(load_model(tmp_path)(ds.val.x[:16]), expected, atol=1e-6)


def test_batches_gathered_in_groups_are_the_index_batches():
    from hvdtrain.backends.torch_input import gathered_on_device
    rng = np.random.default_rng(0)
    x, y = torch.from_numpy(rng.normal(size=(50, 3)).astype(np.float32)), torch.arange(50)
    index_batches = [rng.permutation(50)[:n] for n in (8, 8, 7, 8, 3)]
    for at_once in ((2, 1 << 20), (32, 1), (32, 1 << 20)):  # 2 batches, 1 (by bytes), all
        got = list(gathered_on_device((x, y), index_batches, torch.device("cpu"), at_once))
        assert len(got) == 5
        for (bx, by), indices in zip(got, index_batches):
            assert torch.equal(by, torch.from_numpy(indices)) and torch.equal(bx, x[indices])
    assert list(gathered_on_device((x, y), [], torch.device("cpu"))) == []


def test_threaded_reading_keeps_order_and_raises_the_readers_error():
    from hvdtrain.backends.torch_input import threaded
    from hvdtrain.errors import DataError
    assert list(threaded(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield 1
        raise DataError("images/7.png: truncated")
    got = threaded(failing(), depth=2)
    assert next(got) == 1
    with pytest.raises(DataError, match="truncated"):
        next(got)


def test_threaded_reading_stops_when_the_consumer_stops():
    import threading
    import time

    from hvdtrain.backends.torch_input import threaded
    read = []

    def endless():
        while True:
            read.append(1)
            yield len(read)
    got = threaded(endless(), depth=2)
    assert next(got) == 1
    got.close()
    time.sleep(0.5)
    count = len(read)
    time.sleep(0.3)
    assert len(read) == count <= 5  # the reader stopped, a few batches ahead at most
    assert not any(t.name == "hvdtrain-loader" and t.is_alive() for t in threading.enumerate())


def test_an_optimizer_by_import_path_gets_the_lr_and_its_args_and_is_checked():
    from hvdtrain.backends.torch import make_optimizer
    from hvdtrain.errors import SpecError, UserError
    from hvdtrain.spec import load_spec
    from tests.conftest import ROOT
    base = {"name": "o", "backend": "torch", "model": {"kind": "mlp"}, "data": {"source": "iris"}}
    spec = validate({**base, "optimizer": {"name": "torch.optim:AdamW", "lr": 0.003,
                                           "args": {"betas": [0.8, 0.95], "weight_decay": 0.05}}})
    made = make_optimizer(spec.optimizer, torch.nn.Linear(2, 2).parameters(), lr=0.006)
    group = made.param_groups[0]
    assert type(made) is torch.optim.AdamW and group["lr"] == 0.006 and group["betas"] == (0.8, 0.95)
    assert group["weight_decay"] == 0.05
    wrong = validate({**base, "optimizer": {"name": "torch.optim:AdamW", "args": {"beta": 0.9}}})
    with pytest.raises(UserError, match=r"optimizer.name: torch.optim:AdamW\(lr=0.01, beta=0.9\) raised TypeError"):
        make_optimizer(wrong.optimizer, torch.nn.Linear(2, 2).parameters(), lr=0.01)
    not_one = validate({**base, "optimizer": {"name": "functools:partial"}})
    with pytest.raises(UserError, match="functools:partial gave a partial, not a torch.optim.optimizer.Optimizer"):
        make_optimizer(not_one.optimizer, print, lr=0.01)
    with pytest.raises(SpecError, match="optimizer: momentum is for sgd and adam; give torch.optim:AdamW its "
                                        "options in optimizer.args"):
        validate({**base, "optimizer": {"name": "torch.optim:AdamW", "momentum": 0.5}})
    with pytest.raises(SpecError, match="optimizer: fused is for sgd and adam"):
        validate({**base, "optimizer": {"name": "torch.optim:AdamW", "fused": True}})
    with pytest.raises(SpecError, match="optimizer: args are for an optimizer named by import path, not 'sgd'"):
        validate({**base, "optimizer": {"args": {"nesterov": True}}})
    with pytest.raises(SpecError, match="optimizer.name: module 'torch.optim' .*has no 'AdamX'"):
        load_spec(ROOT / "examples" / "digits-mlp-torch.yaml", ["optimizer={name: torch.optim:AdamX}"])


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_builtin_optimizers_are_fused_on_gpus_unless_the_spec_says(name):
    """optimizer.fused unset: torch's fused kernel where the model trains on a GPU, its
    default (foreach) elsewhere; set, as it says. The fused CPU kernels let this run here."""
    from hvdtrain.backends.torch import make_optimizer
    base = {"name": "o", "backend": "torch", "model": {"kind": "mlp"}, "data": {"source": "iris"}}
    unset = validate({**base, "optimizer": {"name": name}}).optimizer
    params = list(torch.nn.Linear(2, 2).parameters())
    assert make_optimizer(unset, params, lr=0.1, on_gpu=True).defaults["fused"] is True
    assert make_optimizer(unset, params, lr=0.1).defaults["fused"] is None
    off = validate({**base, "optimizer": {"name": name, "fused": False}}).optimizer
    assert make_optimizer(off, params, lr=0.1, on_gpu=True).defaults["fused"] is None
    on = validate({**base, "optimizer": {"name": name, "fused": True}}).optimizer
    fused = make_optimizer(on, params, lr=0.1)
    params[0].grad = torch.ones_like(params[0])
    before = params[0].detach().clone()
    fused.step()
    assert fused.defaults["fused"] is True and not torch.equal(before, params[0])
