"""Torchvision classification models, built untrained and adapted to the input channels."""

from __future__ import annotations

import functools
from typing import Any

import torchvision
from torch import nn

__all__ = ["torchvision_model_names", "create_torchvision_model"]


@functools.cache
def _names() -> tuple[str, ...]:
    # module=torchvision.models keeps only the classification builders, not detection/segmentation/video.
    return tuple(torchvision.models.list_models(module=torchvision.models))


def torchvision_model_names() -> list[str]:
    """Names of torchvision's classification models, sorted."""
    return sorted(_names())


def create_torchvision_model(name: str, num_classes: int, in_channels: int = 3, **options: Any) -> nn.Module:
    """Build torchvision model ``name`` with random weights.

    Args:
        name: A name from :func:`torchvision_model_names`.
        num_classes: Number of output logits.
        in_channels: Input channels; when not 3 the first convolution is replaced by one
            with the same geometry and ``in_channels`` inputs.
        **options: Passed on to ``torchvision.models.get_model``.

    Returns:
        The model.
    """
    # weights=None always: nothing may be downloaded, and a search starts from random init.
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **options)
    if in_channels != 3:
        _replace_first_conv(model, name, in_channels)
    return model


def _replace_first_conv(model: nn.Module, name: str, in_channels: int) -> None:
    # Torchvision registers the stem before anything else, so the first Conv2d in module
    # order is the one that sees the image.
    for module_name, module in model.named_modules():  # noqa: B007  the loop stops at the first Conv2d
        if isinstance(module, nn.Conv2d):
            break
    else:
        raise ValueError(f"torchvision model '{name}' has no Conv2d whose input channels could be changed.")
    if module.in_channels != 3 or module.groups != 1:
        raise ValueError(
            f"torchvision model '{name}': first Conv2d '{module_name}' has {module.in_channels} input channels "
            f"and {module.groups} groups; expected an ordinary 3-channel stem."
        )
    new_conv = nn.Conv2d(
        in_channels,
        module.out_channels,
        kernel_size=module.kernel_size,
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
        bias=module.bias is not None,
        padding_mode=module.padding_mode,
    )
    parent_name, _, attr = module_name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, new_conv)
