"""The MNIST CNN of the wavelet-compression paper (Wolter, Lin, Yao 2020), with a wide first fc layer.

For 1x28x28 images: conv 5x5 to 20 channels, max pool 2, conv 5x5 to 64 channels, max pool 2
(64 x 4 x 4 = 1024 features), ``fc1`` 1024 -> ``fc_width``, ReLU, ``fc2`` to the classes. As in
the paper's code there is no ReLU after the convolutions. With ``fc_width=500`` it has 550,094
parameters; ``fc_width=1024`` makes ``fc1`` square, the layer the ``wavelet`` method replaces
(the paper's compressed net: 45,955 parameters with a 6-level wavelet ``fc1``).
"""

from __future__ import annotations

import torch
from torch import nn

from errors import UserError
from models._registry import register_model

__all__ = ["MnistCNN", "mnist_cnn"]


class MnistCNN(nn.Module):
    """See the module docstring."""

    def __init__(self, num_classes: int, in_channels: int = 1, fc_width: int = 500) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, 20, 5), nn.MaxPool2d(2), nn.Conv2d(20, 64, 5), nn.MaxPool2d(2))
        self.fc1 = nn.Linear(64 * 4 * 4, fc_width)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(fc_width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(self.features(x).flatten(1))))


@register_model("mnist_cnn")
def mnist_cnn(num_classes: int, in_channels: int = 1, fc_width: int = 500) -> MnistCNN:
    """The paper's MNIST CNN for 28x28 images; ``fc_width=1024`` gives the square fc1 the wavelet method replaces."""
    if isinstance(fc_width, bool) or not isinstance(fc_width, int) or fc_width < 1:
        raise UserError(f"model option fc_width must be a whole number >= 1, got {fc_width!r}. Set model.options.fc_width.")
    return MnistCNN(num_classes, in_channels, fc_width)
