"""Cost metrics measured on a model itself: FLOPs/MACs, parameters, storage size and latency.

FLOPs come from :class:`torch.utils.flop_counter.FlopCounterMode`, which has formulas only for
matrix multiplications, convolutions and attention. Everything else (batch norm, activations,
pooling, additions) counts as zero; :attr:`FlopCount.uncounted_ops` lists those ops so that a
caller can tell when the count leaves out real arithmetic.

Two gaps of the stock counter are closed here, both hit by torchvision's vision transformers
on CPU: the fused ``_native_multi_head_attention`` fast path (no formula) is switched off while
counting, and the CPU flash-attention kernel gets the formula of the other attention kernels.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = ["FlopCount", "count_flops", "count_params", "size_bytes", "latency_ms"]


def _cpu_flash_attention_flop(
    query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size, *args: Any, **kwargs: Any
) -> int:
    # Same attention as the CUDA flash kernel, so the same count (FlopCounterMode passes shapes).
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flop}

# Ops that move, allocate or convert data but do no arithmetic, so a missing FLOP formula for
# them loses nothing. View ops (func.is_view: view, reshape, t, transpose, expand, permute,
# slice, select, squeeze, unsqueeze, detach, alias, as_strided, ...) are skipped separately.
# cat, stack, constant_pad_nd, roll and the gathers are here too: they copy values without
# computing on them.
DATA_MOVEMENT_OPS = frozenset(
    {
        "_to_copy",
        "_unsafe_view",
        "as_strided_",
        "cat",
        "clone",
        "constant_pad_nd",
        "contiguous",
        "copy",
        "copy_",
        "empty",
        "empty_like",
        "empty_strided",
        "fill_",
        "full",
        "full_like",
        "gather",
        "index",
        "index_select",
        "lift_fresh_copy",
        "new_empty",
        "new_full",
        "new_ones",
        "new_zeros",
        "ones",
        "ones_like",
        "repeat",
        "roll",
        "scalar_tensor",
        "stack",
        "zero_",
        "zeros",
        "zeros_like",
    }
)


@dataclass(frozen=True)
class FlopCount:
    """Cost of one forward pass.

    Attributes:
        macs: Multiply-accumulates (``flops // 2``).
        flops: Floating-point operations as FlopCounterMode counts them (2 per MAC).
        uncounted_ops: Sorted names of the ops that ran without a FLOP formula and are not
            pure data movement; aten ops by bare name (``"relu"``), others as ``"ns::name"``.
    """

    macs: int
    flops: int
    uncounted_ops: tuple[str, ...]


class _OpRecorder(TorchDispatchMode):
    """Records the overload packet of every non-view op dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.packets: set[Any] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        # is_view belongs to the overload, not the packet (slice.Tensor is a view, slice.str is not).
        if not func.is_view:
            self.packets.add(func.overloadpacket)
        return func(*args, **(kwargs or {}))


def _op_name(packet: Any) -> str:
    namespace, _, name = packet._qualified_op_name.partition("::")
    return name if namespace == "aten" else f"{namespace}::{name}"


def count_flops(model: nn.Module, example_input: torch.Tensor) -> FlopCount:
    """Count the FLOPs of one inference forward pass.

    Runs in eval mode under ``no_grad`` and restores each module's train/eval mode afterwards.

    Args:
        model: The model.
        example_input: One input with batch size 1, so that the count is per sample.

    Returns:
        MACs, FLOPs and the ops that ran without a FLOP formula.

    Raises:
        ValueError: The input's batch size is not 1.
    """
    if example_input.dim() == 0 or example_input.shape[0] != 1:
        raise ValueError(
            f"count_flops expects one sample (batch size 1), got input shape {tuple(example_input.shape)}."
        )
    recorder = _OpRecorder()
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    # The recorder goes in first so that it sits below the flop counter and sees exactly the
    # ops the counter executes after its own decompositions (e.g. linear -> t + addmm).
    with _eval_mode(model), torch.no_grad(), _mha_fastpath_disabled(), recorder, counter:
        model(example_input)
    flops = int(counter.get_total_flops())
    uncounted = {
        _op_name(packet)
        for packet in recorder.packets
        if packet not in counter.flop_registry and not packet._qualified_op_name.startswith("prim::")
    }
    return FlopCount(macs=flops // 2, flops=flops, uncounted_ops=tuple(sorted(uncounted - DATA_MOVEMENT_OPS)))


def count_params(model: nn.Module) -> int:
    """Number of weights the model stores, each shared tensor counted once.

    Parameters, plus buffers that a module declares as stored weights through
    ``storage_bits()`` (a packed quantized layer keeps its weights as integer codes in a buffer;
    they are still the model's parameters). A module whose buffer packs several weights into one
    element (bit-packed codes) says how many through ``stored_weight_counts() -> {name: count}``.
    """
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        seen.add(id(p))
        total += p.numel()
    for module in model.modules():
        declared = getattr(module, "storage_bits", None)
        if declared is None:
            continue
        counts = module.stored_weight_counts() if callable(getattr(module, "stored_weight_counts", None)) else {}
        for name in declared():
            tensor = getattr(module, name)
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += counts.get(name, tensor.numel())
    return total


def size_bytes(model: nn.Module) -> int:
    """Bytes needed to store the model for inference.

    Counts every parameter and every floating-point buffer (running statistics, but not the
    integer ``num_batches_tracked`` counters), each shared tensor once. A module that stores
    tensors at a lower bit width than their dtype declares it with a method
    ``storage_bits() -> dict[str, int]`` mapping names of its own parameters/buffers to bits;
    such a tensor takes ``ceil(numel * bits / 8)`` bytes, and a buffer named there counts
    whatever its dtype (e.g. integer codes). Other tensors take their dtype's size.

    Args:
        model: The model.

    Returns:
        Total bytes.

    Raises:
        ValueError: ``storage_bits`` names a tensor the module does not own directly, or a
            bit width that is not a positive integer.
    """
    seen: set[int] = set()
    total = 0
    for module_name, module in model.named_modules():
        bits = _storage_bits(module_name, module)
        tensors = [(name, p) for name, p in module.named_parameters(recurse=False)]
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point() or buffer.is_complex() or name in bits:
                tensors.append((name, buffer))
        for name, tensor in tensors:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            if name in bits:
                total += math.ceil(tensor.numel() * bits[name] / 8)
            else:
                total += tensor.numel() * tensor.element_size()
    return total


def _storage_bits(module_name: str, module: nn.Module) -> dict[str, int]:
    method = getattr(module, "storage_bits", None)
    if not callable(method):
        return {}
    bits = dict(method())
    owned = {name for name, _ in module.named_parameters(recurse=False)}
    owned |= {name for name, _ in module.named_buffers(recurse=False)}
    for name, width in bits.items():
        # A typo here would silently fall back to the dtype size, so reject it.
        if name not in owned:
            raise ValueError(
                f"module '{module_name or type(module).__name__}' storage_bits names '{name}', which is not one "
                f"of its own parameters or buffers ({', '.join(sorted(owned)) or 'none'})."
            )
        if not isinstance(width, int) or isinstance(width, bool) or width <= 0:
            raise ValueError(
                f"module '{module_name}' storage_bits['{name}'] must be a positive integer, got {width!r}."
            )
    return bits


def latency_ms(model: nn.Module, example_input: torch.Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of one inference forward pass, in milliseconds.

    Runs on the input's device in eval mode under ``no_grad``; on CUDA each pass is
    synchronised so that the time covers the kernels, not just their launch.

    Args:
        model: The model, already on the input's device.
        example_input: The input to time.
        repeats: Timed passes; the median is returned.
        warmup: Untimed passes first (allocator, cuDNN autotuning, lazy init).

    Returns:
        Median milliseconds per forward pass.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"latency_ms needs repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.")
    on_cuda = example_input.device.type == "cuda"
    times = []
    with _eval_mode(model), torch.no_grad():
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
def _mha_fastpath_disabled() -> Iterator[None]:
    # In eval mode without grad, nn.MultiheadAttention and nn.TransformerEncoderLayer take a
    # fused kernel that FlopCounterMode has no formula for; the regular path gives the same
    # result through countable matmuls and attention.
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    # Remember every module's mode, not just the root's: some callers freeze parts (e.g. BN) in eval.
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.train(training)
