"""A residual MLP as a torch.nn.Module, and its builder."""
import math

from torch import nn


class ResidualBlock(nn.Module):
    """x + Linear(ReLU(Linear(x))): a block whose output has its input's width."""

    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(width, width))

    def forward(self, x):
        return x + self.body(x)


class ResidualMLP(nn.Module):
    def __init__(self, features: int, num_classes: int, width: int, blocks: int, dropout: float):
        super().__init__()
        self.stem = nn.Sequential(nn.Flatten(), nn.Linear(features, width), nn.ReLU())
        self.blocks = nn.Sequential(*[ResidualBlock(width, dropout) for _ in range(blocks)])
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def residual_mlp(input_shape, num_classes, width=64, blocks=2, dropout=0.1):
    """hvdtrain passes input_shape (one sample's shape) and num_classes (the outputs)."""
    return ResidualMLP(math.prod(input_shape), num_classes, width, blocks, dropout)
