"""The one latency timer: what a trial, ``slimtune profile``, the benchmarks and the methods time with.

A method that chooses between computations by speed (KSE's inference path per layer) or reports
the latency of its forms (decouple) times them here too, so that its figures and the trial's are
taken alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from deploy._modes import eval_mode, inference_weights

__all__ = ["latency_ms", "torch_threads"]


def latency_ms(
    model: Callable[[torch.Tensor], Any], example_input: torch.Tensor, repeats: int = 20, warmup: int = 3, threads: int | None = None
) -> float:
    """Median wall time of one inference forward pass, in milliseconds.

    Runs on the input's device under ``no_grad``, an ``nn.Module`` in eval mode (an exported
    program, ``torch.export.load(...).module()``, is traced in eval mode and refuses ``.eval()``;
    a compiled package is not a module); on CUDA each pass is synchronised so that the time
    covers the kernels, not just their launch. Packed quantized layers of a module
    unpack their weights once before the timed passes (``cache_inference_weight``).

    Args:
        model: The model, an exported program or a compiled package, on the input's device.
        example_input: The input to time.
        repeats: Timed passes; the median is returned.
        warmup: Untimed passes first (allocator, cuDNN autotuning, lazy init).
        threads: CPU threads torch uses while timing (``torch.set_num_threads``; restored
            afterwards); None: as set. CPU latency depends on it, so a figure that is to be
            compared with another must be timed at the same count.

    Returns:
        Median milliseconds per forward pass.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"latency_ms needs repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.")
    if threads is not None and threads < 1:
        raise ValueError(f"latency_ms needs threads >= 1 (or None), got threads={threads}.")
    on_cuda = example_input.device.type == "cuda"
    times = []
    switchable = isinstance(model, nn.Module) and "train" not in vars(model)  # torch.export's module replaces train()
    with eval_mode(model) if switchable else nullcontext(), torch.no_grad(), torch_threads(threads), inference_weights(model):
        for i in range(warmup + repeats):
            if on_cuda:
                torch.cuda.synchronize(example_input.device)
            start = time.perf_counter()
            model(example_input)
            if on_cuda:
                torch.cuda.synchronize(example_input.device)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000.0)
    return float(statistics.median(times))


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run with ``count`` torch intra-op threads (None: as set), then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count or previous)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
