"""Small networks for 1x8x8 images (scikit-learn's digits), for quick end-to-end runs."""

from __future__ import annotations

import torch
from torch import nn

from models._registry import register_model
from models.cifar_resnet import CifarResNet

__all__ = ["DigitsCNN", "digits_cnn", "digits_resnet"]


class DigitsCNN(nn.Module):
    """Three conv-BN-ReLU layers (16, 32, 64 channels) with one max pool, then global pooling and a linear layer.

    Args:
        num_classes: Number of output logits.
        in_channels: Channels of the input images.
    """

    def __init__(self, num_classes: int, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register_model("digits_cnn")
def digits_cnn(num_classes: int, in_channels: int = 1) -> DigitsCNN:
    """Three-layer CNN for 8x8 images."""
    return DigitsCNN(num_classes, in_channels)


@register_model("digits_resnet")
def digits_resnet(num_classes: int, in_channels: int = 1, shortcut: str = "A") -> CifarResNet:
    """ResNet with one block per stage (16/32/64 channels, strides 1/2/2) for 8x8 images."""
    return CifarResNet((1, 1, 1), (16, 32, 64), (1, 2, 2), num_classes, in_channels, shortcut)
