"""User code by import path: found without importing, called with what it names."""
import sys

import pytest

from hvdtrain import plugins
from hvdtrain.errors import UserError


def test_references_are_checked_without_importing(tmp_path):
    package = tmp_path / "lib" / "mine"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("import does_not_exist_anywhere\nfrom .models import *\n")
    (package / "models.py").write_text("import torch\n\ndef build(input_shape):\n    pass\n\nNET = 1\n")
    paths = [str(tmp_path / "lib")]
    assert plugins.reference_problem("mine.models:build", paths) is None
    assert plugins.reference_problem("mine:build", paths) is None  # through the star import
    assert "has no 'nope'" in plugins.reference_problem("mine.models:nope", paths)
    assert "module 'mine.other' not found" in plugins.reference_problem("mine.other:x", paths)
    assert "not an import path" in plugins.reference_problem("mine.models.build", paths)
    assert plugins.reference_problem("math:sqrt", []) is None  # a built-in module
    assert "mine" not in sys.modules and "does_not_exist_anywhere" not in sys.modules


def test_offered_values_go_only_to_parameters_the_function_names():
    def named(width, input_shape, num_classes=2):
        return width, input_shape, num_classes

    def catch_all(**kwargs):  # like torchvision.models.resnet18(*, weights=None, **kwargs)
        return kwargs

    offered = {"input_shape": (3, 8, 8), "num_classes": 10}
    assert plugins.call(named, {"width": 4}, offered, "model.builder", "m:named") == (4, (3, 8, 8), 10)
    assert plugins.call(catch_all, {"num_classes": 5}, offered, "model.builder", "m:c") == {"num_classes": 5}
    with pytest.raises(UserError, match=r"model.builder: m:named raised TypeError"):
        plugins.call(named, {}, {}, "model.builder", "m:named")
