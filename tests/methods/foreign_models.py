"""Networks nobody here wrote: plain ``nn.Module`` classes as a user brings them, outside the model registry.

Each is tiny, classifies 1x8x8 digits into 10 classes, and is a different kind of trouble for a
method that changes layers: depthwise-separable blocks with squeeze-and-excitation and hardswish
(:class:`TinyMobileNet`), branches joined by ``torch.cat`` through functional ops
(:class:`ConcatBranches`), attention (:class:`TinyAttention`) and one layer called twice
(:class:`SharedWeights`). ``tests/methods/test_foreign.py`` runs every registered method on each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FOREIGN_MODELS", "TinyMobileNet", "ConcatBranches", "TinyAttention", "SharedWeights"]


class SqueezeExcite(nn.Module):
    """Channel gates from the pooled features (MobileNetV3's block)."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.adaptive_avg_pool2d(x, 1)
        gate = F.hardsigmoid(self.expand(F.relu(self.reduce(gate))))
        return x * gate


class SeparableBlock(nn.Module):
    """Depthwise 3x3, squeeze-and-excitation, pointwise 1x1, each with hardswish."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.se = SqueezeExcite(cin, max(cin // 4, 2))
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.hardswish(self.bn1(self.depthwise(x)))
        return F.hardswish(self.bn2(self.pointwise(self.se(x))))


class TinyMobileNet(nn.Module):
    """Stem, two depthwise-separable blocks with squeeze-and-excitation, pooled linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Hardswish())
        self.blocks = nn.Sequential(SeparableBlock(8, 16, 1), SeparableBlock(16, 24, 2))
        self.head = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ConcatBranches(nn.Module):
    """A full-resolution and a pooled-then-upsampled branch joined by ``torch.cat``; tokens mixed by a linear layer."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.fine = nn.Conv2d(8, 8, 3, padding=1)
        self.coarse = nn.Conv2d(8, 8, 3, padding=1)
        self.merge = nn.Conv2d(16, 16, 1)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        fine = F.relu(self.fine(x))
        coarse = F.interpolate(F.relu(self.coarse(F.avg_pool2d(x, 2))), scale_factor=2.0, mode="nearest")
        x = F.relu(self.merge(torch.cat([fine, coarse], dim=1)))
        n, c, h, w = x.shape
        tokens = x.view(n, c, h * w).permute(0, 2, 1)  # (batch, positions, channels)
        return self.head(F.relu(self.mix(tokens)).mean(dim=1))


class TinyAttention(nn.Module):
    """A one-layer vision transformer: 2x2 patches, learnt positions, multi-head attention, an MLP."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.patch = nn.Conv2d(in_channels, dim, 2, stride=2)
        self.position = nn.Parameter(torch.zeros(1, 16, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.position
        normed = self.norm1(tokens)
        tokens = tokens + self.attention(normed, normed, normed, need_weights=False)[0]
        tokens = tokens + self.mlp(self.norm2(tokens))
        return self.head(tokens.mean(dim=1))


class SharedWeights(nn.Module):
    """One convolution applied twice and one linear layer applied twice: two calls, one weight each."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.shared_conv = nn.Conv2d(8, 8, 3, padding=1)
        self.shared_fc = nn.Linear(32, 32)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.shared_conv(x))
        x = F.max_pool2d(F.relu(self.shared_conv(x)), 4)  # (batch, 8, 2, 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.shared_fc(x))
        x = F.relu(self.shared_fc(x))
        return self.head(x)


#: Name -> class, each built as ``cls(num_classes=10, in_channels=1)``.
FOREIGN_MODELS: dict[str, type[nn.Module]] = {
    "mobilenet_se": TinyMobileNet,
    "concat_branches": ConcatBranches,
    "attention": TinyAttention,
    "shared_weights": SharedWeights,
}
