"""LeNet: two convolutions with max pooling, then two linear layers (the SSR paper's pruning testbed)."""

from __future__ import annotations

import torch
from torch import nn

from models._registry import register_model

__all__ = ["LeNet", "digits_lenet", "lenet5"]


class LeNet(nn.Module):
    """``conv-relu-pool, conv-relu-pool, fc-relu, fc``, no batch norm, biases everywhere.

    Args:
        num_classes: Number of output logits.
        in_channels: Channels of the input images.
        widths: Output channels of the two convolutions and width of the hidden linear layer.
        kernel: Side of the convolutions' kernels.
        padding: Padding of the convolutions.
        image_size: Side of the square input images (sets the hidden layer's input width).
    """

    def __init__(
        self, num_classes: int, in_channels: int, widths: tuple[int, int, int], kernel: int, padding: int, image_size: int
    ) -> None:
        super().__init__()
        conv1, conv2, hidden = widths
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, conv1, kernel, padding=padding),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(conv1, conv2, kernel, padding=padding),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = image_size
        for _ in range(2):
            side = (side + 2 * padding - kernel + 1) // 2
        self.fc1 = nn.Linear(conv2 * side * side, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.features(x).flatten(1))))


@register_model("digits_lenet")
def digits_lenet(num_classes: int, in_channels: int = 1) -> LeNet:
    """LeNet for 8x8 images: 3x3 convolutions of 16 and 32 channels (padded), a 64-wide hidden layer."""
    return LeNet(num_classes, in_channels, (16, 32, 64), kernel=3, padding=1, image_size=8)


@register_model("lenet5")
def lenet5(num_classes: int, in_channels: int = 1, image_size: int = 28) -> LeNet:
    """Caffe's LeNet-5 for 28x28 MNIST (20-50-500, 5x5 convolutions): 2.29M MACs, 431K parameters."""
    return LeNet(num_classes, in_channels, (20, 50, 500), kernel=5, padding=0, image_size=image_size)
