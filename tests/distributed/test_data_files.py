"""Tabular files as users have them: a text column one-hot encoded for training
and for predict, or named in a clear error."""
import numpy as np
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.distributed
SPEC = ROOT / "examples" / "digits-mlp-torch.yaml"


def write_shop_csv(path, n=600, seed=0):
    """The label follows the colour and the size: learnable only through the text column."""
    rng = np.random.default_rng(seed)
    colours = rng.choice(["red", "green", "blue"], size=n)
    size = rng.normal(size=n)
    label = np.where(colours == "red", "return", np.where(size > 0, "keep", "return"))
    path.write_text("size,colour,label\n" + "".join(f"{s:.4f},{c},{y}\n" for s, c, y in zip(size, colours, label)))
    return label


def test_text_column_trains_one_hot_and_predicts_from_csv(cli, tmp_path):
    data = tmp_path / "shop.csv"
    labels = write_shop_csv(data)
    out = tmp_path / "run"
    args = ["-np", "2", f"output={out}", "data.source=file", f"data.path={data}", "data.categorical=[colour]",
            "train.epochs=15"]
    result = cli("run", SPEC, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "validation accuracy" in result.stdout
    predicted = cli("predict", out, data)  # the csv's columns by name; colour one-hot as in training
    assert predicted.returncode == 0, predicted.stderr
    assert (np.array(predicted.stdout.split()) == labels).mean() >= 0.9


def test_text_column_not_declared_is_named(cli, tmp_path):
    data = tmp_path / "shop.csv"
    write_shop_csv(data)
    result = cli("run", SPEC, "-np", "2", f"output={tmp_path / 'run'}", "data.source=file", f"data.path={data}")
    assert result.returncode == 2
    assert "column 'colour' holds text ('" in result.stderr and "list it in data.categorical" in result.stderr
    assert "Traceback" not in result.stderr
