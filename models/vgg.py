"""CIFAR VGG-16: the 13 convolutions of Simonyan & Zisserman with batch norm and one linear layer.

This is the variant common in the pruning literature (e.g. Li et al. 2017, "Pruning Filters
for Efficient ConvNets"): at 32x32 the last stage sees 2x2 maps, so the ImageNet 4096-wide
classifier is replaced by global pooling and ``Linear(512, num_classes)``. With 10 classes it
has 14,724,042 parameters (convolutions carry no bias; batch norm follows) and 313.2M MACs at 32x32.
"""

from __future__ import annotations

import torch
from torch import nn

from models._registry import register_model

__all__ = ["VGG", "VGG16_CONFIG", "vgg16"]

# Output channels of each 3x3 convolution; "M" is a 2x2 max pool.
VGG16_CONFIG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512,
)  # fmt: skip


class VGG(nn.Module):
    """Plain stack of conv-BN-ReLU layers and max pools, then global average pooling and a linear layer.

    Args:
        config: Channels per convolution, ``"M"`` for a 2x2 max pool.
        num_classes: Number of output logits.
        in_channels: Channels of the input images.
    """

    def __init__(self, config: tuple[int | str, ...], num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                assert isinstance(item, int)
                layers += [nn.Conv2d(channels, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU()]
                channels = item
        self.features = nn.Sequential(*layers)
        # Adaptive pooling (not the fixed 5th max pool) so inputs other than 32x32 also work.
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(x)


@register_model("vgg16")
def vgg16(num_classes: int, in_channels: int = 3) -> VGG:
    """CIFAR VGG-16 with batch norm (14.7M parameters, 313M MACs at 32x32)."""
    return VGG(VGG16_CONFIG, num_classes, in_channels)
