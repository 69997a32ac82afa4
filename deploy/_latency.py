"""The one latency timer: what a trial, ``slimtune profile``, the benchmarks and the methods time with.

A method that chooses between computations by speed (KSE's inference path per layer) or reports
the latency of its forms (decouple) times them here too, so that its figures and the trial's are
taken alike. :func:`phase` and :func:`recording_phases` split a trial's wall time into its phases
for ``bench/overhead.py --profile``; off (the default), a phase reads no clock.
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

__all__ = ["latency_ms", "median_is_stable", "MIN_LATENCY_REPEATS", "LATENCY_TOLERANCE", "torch_threads", "phase", "recording_phases"]

#: The fewest timed passes :func:`latency_ms` takes before it may stop on a stable median.
MIN_LATENCY_REPEATS = 5

#: How far (relative) the median may move over the last two timed passes and still count as stable.
LATENCY_TOLERANCE = 0.02


def median_is_stable(times: list[float], min_repeats: int = MIN_LATENCY_REPEATS, tolerance: float = LATENCY_TOLERANCE) -> bool:
    """Whether :func:`latency_ms` may stop after the timed passes ``times``: the rule that sizes the timing to its noise.

    Stable means at least ``min_repeats`` passes, and a median of all of them that differs
    from the median of all but the last two by at most ``tolerance`` x itself: two more passes
    did not move it. A quiet machine stops at ``min_repeats``; a noisy one times on, up to the
    caller's maximum.
    """
    n = len(times)
    if n < max(min_repeats, 3):
        return False
    now = statistics.median(times)
    return abs(now - statistics.median(times[:-2])) <= tolerance * now


def latency_ms(
    model: Callable[[torch.Tensor], Any],
    example_input: torch.Tensor,
    repeats: int = 20,
    warmup: int = 3,
    threads: int | None = None,
    min_repeats: int = MIN_LATENCY_REPEATS,
) -> float:
    """Median wall time of one inference forward pass, in milliseconds, timed until the median is stable.

    Runs on the input's device under ``no_grad``, an ``nn.Module`` in eval mode (an exported
    program, ``torch.export.load(...).module()``, is traced in eval mode and refuses ``.eval()``;
    a compiled package is not a module); on CUDA each pass is synchronised so that the time
    covers the kernels, not just their launch. Packed quantized layers of a module
    unpack their weights once before the timed passes (``cache_inference_weight``).

    Args:
        model: The model, an exported program or a compiled package, on the input's device.
        example_input: The input to time.
        repeats: The most timed passes (``measure.latency_repeats``); the median is returned.
            Timing stops earlier, from ``min_repeats`` passes on, once two more passes move the
            median by at most :data:`LATENCY_TOLERANCE` of it (:func:`median_is_stable`).
        warmup: Untimed passes first (allocator, cuDNN autotuning, lazy init).
        threads: CPU threads torch uses while timing (``torch.set_num_threads``; restored
            afterwards); None: as set. CPU latency depends on it, so a figure that is to be
            compared with another must be timed at the same count.
        min_repeats: The fewest timed passes (at most ``repeats``); ``repeats`` as well: a fixed count.

    Returns:
        Median milliseconds per forward pass.
    """
    if repeats < 1 or warmup < 0 or min_repeats < 1:
        raise ValueError(
            f"latency_ms needs repeats >= 1, min_repeats >= 1 and warmup >= 0, got repeats={repeats}, min_repeats={min_repeats}, warmup={warmup}."
        )
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
                if median_is_stable(times, min(min_repeats, repeats)):
                    break
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


#: While :func:`recording_phases` is on: seconds by phase name, and the stack of open phases' child time.
_phases: dict[str, float] | None = None
_open: list[float] = []


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Add the wall time of the block to the phase ``name`` while :func:`recording_phases` is on.

    Phases nest: a phase inside another counts in the inner one only, so the phases of a trial
    add up to its wall time. Off, the block runs with no clock read.
    """
    if _phases is None:
        yield
        return
    start = time.perf_counter()
    _open.append(0.0)
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        inner = _open.pop()
        if _open:
            _open[-1] += elapsed
        if _phases is not None:
            _phases[name] = _phases.get(name, 0.0) + elapsed - inner


@contextmanager
def recording_phases() -> Iterator[dict[str, float]]:
    """Record :func:`phase` blocks into the dictionary yielded (seconds by phase), then stop recording."""
    global _phases
    previous, _phases = _phases, {}
    try:
        yield _phases
    finally:
        _phases = previous
