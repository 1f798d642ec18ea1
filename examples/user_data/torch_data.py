"""A data loader of one's own for torch, named in a spec as
`data.loader: user_data.torch_data:digits`: it returns map-style
`torch.utils.data.Dataset`s whose items are (x, y). hvdtrain's DataLoader
reads them in its worker processes, with its sharding sampler."""
import torch
from torch.utils.data import Dataset

from .arrays import digits as digit_arrays


class DigitImages(Dataset):
    classes = [str(d) for d in range(10)]  # class names, as torchvision's data sets give them

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return torch.from_numpy(self.x[i]), int(self.y[i])


def digits(seed: int = 0, validation_fraction: float = 0.2):
    train, val = digit_arrays(seed, validation_fraction)
    return DigitImages(*train), DigitImages(*val)
