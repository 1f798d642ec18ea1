"""Model builders and losses that fail the ways user code does, for the tests."""
import os

import torch
from torch import nn


def tiny(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), num_classes))


def fails_on_rank_1(input_shape, num_classes):
    if os.environ.get("HOROVOD_RANK") == "1":
        raise RuntimeError("CUDA out of memory on this rank")
    return tiny(input_shape, num_classes)


def not_a_module(input_shape, num_classes):
    return {"layers": 3}


def per_sample_loss(outputs, targets):
    return nn.functional.cross_entropy(outputs, targets, reduction="none")


def squared_log_error(outputs, targets):
    """A regression loss of the user's own: mean squared error of log-cosh."""
    return torch.log(torch.cosh(outputs.reshape(-1) - targets)).mean()
