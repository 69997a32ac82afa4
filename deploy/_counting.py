"""Cost metrics counted on a model itself: FLOPs/MACs, bit operations, parameters and storage size.

Latency is timed by :mod:`deploy._latency`.

FLOPs come from :class:`torch.utils.flop_counter.FlopCounterMode`, which has formulas only for
matrix multiplications, convolutions and attention. Everything else (batch norm, activations,
pooling, additions) counts as zero; :attr:`FlopCount.uncounted_ops` lists those ops so that a
caller can tell when the count leaves out real arithmetic.

Two gaps of the stock counter are closed here, both hit by torchvision's vision transformers
on CPU: the fused ``_native_multi_head_attention`` fast path (no formula) is switched off while
counting, and the CPU flash-attention kernel gets the formula of the other attention kernels.

Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) and cells (``nn.LSTMCell``, ``nn.GRUCell``,
``nn.RNNCell``) are counted by formula, whatever kernel runs them (oneDNN's fused
``mkldnn_rnn_layer`` has no formula; other back-ends decompose into matmuls): see
:func:`recurrent_macs`. Like linear and convolution layers, only the multiply-accumulates of the
matrix products count; the bias adds and the gates' elementwise work (sigmoid, tanh, the
products of the cell update) do not, and are not listed in ``uncounted_ops`` either.

A method may know a cost that nothing measured on the model shows (a clustered convolution's real
MACs, a gated network's expected MACs on validation data). It reports it through
``Method.cost``; :func:`apply_reported_cost` puts the reported figure in place of the measured one
and keeps the measured one as ``measured_<metric>`` (``measured_macs``), so objectives and
constraints on ``macs`` rank trials by what the method says the model really costs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from deploy._modes import eval_mode, mha_fastpath_disabled

__all__ = [
    "FlopCount",
    "count_flops",
    "recurrent_macs",
    "count_params",
    "size_bytes",
    "REPORTABLE_COSTS",
    "apply_reported_cost",
]


def _cpu_flash_attention_flop(query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size, *args: Any, **kwargs: Any) -> int:
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
        bops: Bit operations: every MAC weighted by the bits of its two operands, summed.
            A layer that declares ``operand_bits() -> (weight_bits, input_bits)`` (a quantized
            convolution or linear layer) counts ``its MACs x weight_bits x input_bits``;
            every other MAC counts 32 x 32.
    """

    macs: int
    flops: int
    uncounted_ops: tuple[str, ...]
    bops: int = 0


class _OpRecorder(TorchDispatchMode):
    """Records the overload packet of every non-view op dispatched while active.

    Ops run while ``paused`` is above 0 (inside a recurrent layer counted by formula) are not recorded.
    """

    def __init__(self) -> None:
        super().__init__()
        self.packets: set[Any] = set()
        self.paused = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        # is_view belongs to the overload, not the packet (slice.Tensor is a view, slice.str is not).
        if not func.is_view and not self.paused:
            self.packets.add(func.overloadpacket)
        return func(*args, **(kwargs or {}))


#: Gate count of each ``nn.RNNBase.mode``: the input and hidden products are this many hidden-sized blocks.
_RNN_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
_CELL_GATES = {nn.LSTMCell: 4, nn.GRUCell: 3, nn.RNNCell: 1}


def recurrent_macs(module: nn.Module, inputs: Any) -> int:
    """Multiply-accumulates of one call of a recurrent layer or cell on ``inputs``.

    With ``G`` gates (LSTM 4, GRU 3, RNN 1), input size ``I``, hidden size ``H`` and output size
    ``P`` (``proj_size`` of an LSTM with projections, else ``H``), one time step of one direction
    of one layer costs ``G*H*(I_l + P)`` for the input and recurrent products, plus ``H*P`` for the
    projection when there is one; ``I_l`` is ``I`` for the first layer and ``P`` times the number
    of directions for the others. A layer multiplies that by time steps x batch (the rows of a
    ``PackedSequence``), directions and layers; a cell is one time step of one layer. Bias adds
    and the gates' elementwise work are not counted (as for ``nn.Linear``).

    Args:
        module: An ``nn.RNNBase`` (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) or a cell
            (``nn.LSTMCell``, ``nn.GRUCell``, ``nn.RNNCell``).
        inputs: Its input: ``(T, B, I)``, ``(B, T, I)`` with ``batch_first``, unbatched ``(T, I)``
            or a ``PackedSequence`` for a layer; ``(B, I)`` or ``(I,)`` for a cell.

    Raises:
        TypeError: ``module`` is neither a recurrent layer nor a cell.
    """
    if isinstance(module, nn.RNNBase):
        if isinstance(inputs, nn.utils.rnn.PackedSequence):
            rows = inputs.data.shape[0]
        else:
            rows = inputs.shape[0] if inputs.dim() == 2 else inputs.shape[0] * inputs.shape[1]
        gates, hidden = _RNN_GATES[module.mode], module.hidden_size
        out = module.proj_size or hidden
        directions = 2 if module.bidirectional else 1
        per_row = 0
        for layer in range(module.num_layers):
            layer_input = module.input_size if layer == 0 else out * directions
            per_direction = gates * hidden * (layer_input + out) + (hidden * out if module.proj_size else 0)
            per_row += directions * per_direction
        return rows * per_row
    gates = next((g for cls, g in _CELL_GATES.items() if isinstance(module, cls)), None)
    if gates is None:
        raise TypeError(f"recurrent_macs counts nn.RNNBase layers and LSTM/GRU/RNN cells, but got {type(module).__name__}.")
    batch = inputs.shape[0] if inputs.dim() == 2 else 1
    return batch * gates * module.hidden_size * (module.input_size + module.hidden_size)


def _is_recurrent(module: nn.Module) -> bool:
    return isinstance(module, (nn.RNNBase, *_CELL_GATES))


@contextmanager
def _recurrent_by_formula(model: nn.Module, counter: FlopCounterMode, recorder: _OpRecorder) -> Iterator[list[int]]:
    """Count each recurrent layer's call by :func:`recurrent_macs` instead of by its kernels.

    Yields a list that collects, per call, the FLOPs to add to the counter's total: the formula's
    figure less whatever the counter saw inside the call (0 for oneDNN's fused kernel, the
    matmuls of a decomposed one), so the total is the same on every back-end.
    """
    corrections: list[int] = []
    started: list[int] = []

    def before(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        recorder.paused += 1
        started.append(int(counter.get_total_flops()))

    def after(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        recorder.paused -= 1
        seen = int(counter.get_total_flops()) - started.pop()
        if not started:  # an outer recurrent module already counts this call
            inputs = args[0] if args else kwargs["input"]
            corrections.append(2 * recurrent_macs(module, inputs) - seen)

    handles = []
    for module in model.modules():
        if _is_recurrent(module):
            handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(module.register_forward_hook(after, with_kwargs=True))
    try:
        yield corrections
    finally:
        for handle in handles:
            handle.remove()


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
        raise ValueError(f"count_flops expects one sample (batch size 1), got input shape {tuple(example_input.shape)}.")
    recorder = _OpRecorder()
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    # The recorder goes in first so that it sits below the flop counter and sees exactly the
    # ops the counter executes after its own decompositions (e.g. linear -> t + addmm).
    with eval_mode(model), torch.no_grad(), mha_fastpath_disabled(), recorder, counter:
        with _recurrent_by_formula(model, counter, recorder) as corrections:
            model(example_input)
    flops = int(counter.get_total_flops()) + sum(corrections)
    bops = _bit_operations(model, counter, flops // 2)
    uncounted = {
        _op_name(packet)
        for packet in recorder.packets
        if packet not in counter.flop_registry and not packet._qualified_op_name.startswith("prim::")
    }
    return FlopCount(macs=flops // 2, flops=flops, uncounted_ops=tuple(sorted(uncounted - DATA_MOVEMENT_OPS)), bops=bops)


def _bit_operations(model: nn.Module, counter: FlopCounterMode, macs: int) -> int:
    """``bops`` of :class:`FlopCount`: the MACs of layers with ``operand_bits`` at their bits, the rest at 32 x 32."""
    per_module = counter.get_flop_counts()  # keyed "<root class>.<qualified name>"
    root = type(model).__name__
    low_macs = low_bops = 0
    for name, module in model.named_modules():
        operand_bits = getattr(module, "operand_bits", None)
        if not callable(operand_bits):
            continue
        weight_bits, input_bits = operand_bits()
        layer_macs = sum(per_module.get(f"{root}.{name}" if name else root, {}).values()) // 2
        low_macs += layer_macs
        low_bops += layer_macs * weight_bits * input_bits
    return (macs - low_macs) * 32 * 32 + low_bops


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
            raise ValueError(f"module '{module_name}' storage_bits['{name}'] must be a positive integer, got {width!r}.")
    return bits


#: Cost metrics a method may report through ``Method.cost``: the figures measured on the model
#: (``artifact_bytes`` is the exported file's size, which nothing can know better than the file).
REPORTABLE_COSTS = ("macs", "flops", "params", "size_bytes", "latency_ms")


def apply_reported_cost(measured: dict[str, Any], reported: dict[str, float]) -> dict[str, Any]:
    """Put the cost figures the methods report (``Pipeline.cost``) in place of the measured ones.

    Called by the trial once the pipeline has run, after measuring the final model. A reported
    figure replaces the metric of the same name, and the measured figure stays in the result as
    ``measured_<metric>``. MACs and FLOPs keep their ratio of 2: reporting only ``macs`` sets
    ``flops`` to twice it (and ``measured_flops`` keeps the counter's), reporting only ``flops``
    sets ``macs`` to half of it.

    Args:
        measured: The trial's metrics as measured on the model, holding every cost metric.
        reported: ``{metric: value}`` from the methods; empty for most pipelines.

    Returns:
        A new dict: ``measured`` with the reported figures in place and the ``measured_*`` keys.

    Raises:
        ValueError: A reported key is not one of :data:`REPORTABLE_COSTS`, or a value is not a
            finite number >= 0.
    """
    figures: dict[str, float] = {}
    for key, value in reported.items():
        if key not in REPORTABLE_COSTS:
            raise ValueError(
                f"Method.cost may report {', '.join(REPORTABLE_COSTS)}, but the pipeline reported '{key}'. "
                "Report one of those, or log the figure through Method.metrics instead."
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"Method.cost must report finite numbers >= 0, but reported {key}={value!r}.")
        figures[key] = float(value)
    if "macs" in figures and "flops" not in figures:
        figures["flops"] = 2.0 * figures["macs"]
    elif "flops" in figures and "macs" not in figures:
        figures["macs"] = figures["flops"] / 2.0
    out = dict(measured)
    for key, value in figures.items():
        out[f"measured_{key}"] = measured[key]
        out[key] = value
    return out
