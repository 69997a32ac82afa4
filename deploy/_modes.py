"""Context managers that put a model in the state it is measured, exported or deployed in.

Each one changes a setting for the duration of a ``with`` block and restores it afterwards, also
when the block raises: :func:`eval_mode` (every module's train/eval mode), :func:`inference_weights`
(packed quantized layers unpack their weights once) and :func:`mha_fastpath_disabled` (the fused
attention kernel that the FLOP counter cannot see).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["eval_mode", "inference_weights", "mha_fastpath_disabled"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block with ``model`` in eval mode, then give every module back its own mode.

    Called wherever a model is run for inference in the middle of something else (counting,
    timing, exporting, a method's probe or surgery). Every module's mode is remembered, not just
    the root's: some callers freeze parts (e.g. batch norms) in eval mode while the rest trains.
    A module that joins the model inside the block (a surgery's replacement) takes the mode the
    root had before the block, as ``model.train(mode)`` would have given it.

    Yields:
        ``model``, in eval mode.
    """
    modes = {module: module.training for module in model.modules()}
    root = model.training
    model.eval()
    try:
        yield model
    finally:
        present = list(model.modules())
        kept = set(present)
        for module, training in modes.items():  # modules the block took out of the model, first:
            if module not in kept:  # their children may be back in it
                module.train(training)
        for module in present:  # parents before children, so each ends with its own mode
            module.train(modes.get(module, root))


@contextmanager
def mha_fastpath_disabled() -> Iterator[None]:
    """Run the block with PyTorch's fused multi-head attention fast path off.

    In eval mode without grad, ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` take a
    fused kernel that ``FlopCounterMode`` has no formula for; the regular path gives the same
    result through countable matmuls and attention.
    """
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


@contextmanager
def inference_weights(model: nn.Module) -> Iterator[None]:
    """Run the block with packed layers' weights unpacked once, as a deployed model does at load time.

    Layers that store weights packed (quantized codes) and declare
    ``cache_inference_weight(bool)`` unpack them before the block instead of in every forward,
    and drop the unpacked copy afterwards. A compiled package (not a module) has none.
    """
    modules = model.modules() if isinstance(model, nn.Module) else ()
    layers = [m for m in modules if callable(getattr(m, "cache_inference_weight", None))]
    for layer in layers:
        layer.cache_inference_weight(True)
    try:
        yield
    finally:
        for layer in layers:
            layer.cache_inference_weight(False)
