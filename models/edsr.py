"""EDSR (Lim et al., "Enhanced Deep Residual Networks for Single Image Super-Resolution", 2017).

``head`` (3x3 conv) -> ``body`` (residual blocks, then a 3x3 conv) plus a global skip ->
``tail`` (sub-pixel upsampler, 3x3 conv). Inputs and outputs are RGB in ``[0, rgb_range]``;
the DIV2K mean is subtracted at the start and added back at the end (``MeanShift``).

The features after the body and the global skip pass through ``body_out`` (an identity), so a
method can read them (PAMS's structured knowledge transfer) with a forward hook by name.
EDSR-baseline (16 blocks, 64 channels, residual scale 1) has 1,369,859 parameters at x2,
1,554,499 at x3 and 1,517,571 at x4.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from models._registry import register_model

__all__ = ["MeanShift", "ResBlock", "Upsampler", "EDSR", "edsr", "edsr_small", "DIV2K_RGB_MEAN", "SCALES"]

#: Mean of the DIV2K training images per RGB channel, in [0, 1] (the EDSR convention).
DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)
SCALES = (2, 3, 4)


def check_scale(scale: int) -> int:
    if scale not in SCALES:
        raise ValueError(f"`scale` must be one of {SCALES}, but got {scale!r}.")
    return int(scale)


class MeanShift(nn.Module):
    """Adds ``sign * rgb_range * mean`` per channel (a fixed buffer, not a trained parameter).

    For other than 3 channels every channel uses the mean of the three DIV2K channel means.
    """

    def __init__(self, channels: int, rgb_range: float, sign: float) -> None:
        super().__init__()
        mean = DIV2K_RGB_MEAN if channels == 3 else (sum(DIV2K_RGB_MEAN) / 3,) * channels
        self.register_buffer("shift", sign * rgb_range * torch.tensor(mean).reshape(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shift


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1)


class ResBlock(nn.Module):
    """EDSR's block without batch norm: ``x + res_scale * conv2(act(conv1(x)))``."""

    def __init__(self, channels: int, res_scale: float = 1.0) -> None:
        super().__init__()
        self.conv1 = conv3x3(channels, channels)
        self.act = nn.ReLU()
        self.conv2 = conv3x3(channels, channels)
        self.res_scale = res_scale

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """The scaled residual branch alone, before the addition."""
        return self.conv2(self.act(self.conv1(x))) * self.res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + x


class Upsampler(nn.Sequential):
    """Sub-pixel convolution: ``conv3x3(C, r^2 C) -> PixelShuffle(r)``, once for x3, twice (r=2) for x4."""

    def __init__(self, scale: int, channels: int) -> None:
        layers: list[nn.Module] = []
        if scale == 3:
            layers += [conv3x3(channels, 9 * channels), nn.PixelShuffle(3)]
        else:
            for _ in range(int(math.log2(scale))):
                layers += [conv3x3(channels, 4 * channels), nn.PixelShuffle(2)]
        super().__init__(*layers)


class EDSR(nn.Module):
    """EDSR for one upscaling factor.

    Args:
        scale: Upscaling factor, 2, 3 or 4.
        in_channels: Channels of the input and output images.
        n_resblocks: Residual blocks in the body.
        n_feats: Channels of the features.
        res_scale: Factor on each block's residual branch (0.1 in the large EDSR).
        rgb_range: Pixel values run from 0 to this (255 as in EDSR).
    """

    def __init__(
        self,
        scale: int,
        in_channels: int = 3,
        n_resblocks: int = 16,
        n_feats: int = 64,
        res_scale: float = 1.0,
        rgb_range: float = 255.0,
    ) -> None:
        super().__init__()
        self.scale = check_scale(scale)
        self.sub_mean = MeanShift(in_channels, rgb_range, -1.0)
        self.head = conv3x3(in_channels, n_feats)
        self.body = nn.Sequential(*[ResBlock(n_feats, res_scale) for _ in range(n_resblocks)], conv3x3(n_feats, n_feats))
        self.body_out = nn.Identity()
        self.tail = nn.Sequential(Upsampler(scale, n_feats), conv3x3(n_feats, in_channels))
        self.add_mean = MeanShift(in_channels, rgb_range, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.sub_mean(x))
        features = self.body_out(self.body(x) + x)
        return self.add_mean(self.tail(features))


@register_model("edsr")
def edsr(
    scale: int = 2,
    in_channels: int = 3,
    n_resblocks: int = 16,
    n_feats: int = 64,
    res_scale: float = 1.0,
    rgb_range: float = 255.0,
) -> EDSR:
    """EDSR-baseline: 16 blocks of 64 channels, residual scale 1 (1.37M parameters at x2)."""
    return EDSR(scale, in_channels, n_resblocks, n_feats, res_scale, rgb_range)


@register_model("edsr_small")
def edsr_small(
    scale: int = 2,
    in_channels: int = 3,
    n_resblocks: int = 4,
    n_feats: int = 32,
    res_scale: float = 1.0,
    rgb_range: float = 255.0,
) -> EDSR:
    """A CPU-sized EDSR: 4 blocks of 32 channels (0.12M parameters at x2)."""
    return EDSR(scale, in_channels, n_resblocks, n_feats, res_scale, rgb_range)
