"""The ONNX form: ``model.onnx``, for ONNX Runtime and the serving stacks that take ONNX.

:func:`export_onnx` exports :func:`~deploy._export.inference_copy` of a model with
``torch.onnx.export(..., dynamo=True)``, batch dimension dynamic where the model allows it.
:func:`load_onnx` runs it in ONNX Runtime (CPU) as a callable on torch tensors.

**Integer models.** A quantized trial's model becomes a QDQ model that carries the trial's own
quantization, not a fresh calibration, so ONNX Runtime runs it on integer kernels
(``QLinearConv``, ``QLinearMatMul``, after its graph optimisation). Deploy reads two duck-typed
declarations, so that it needs nothing from ``methods``:

- a quantized layer (a ``Conv2d`` or ``Linear`` subclass) declares ``integer_weight() -> (codes,
  scale)``: its weight's integer codes (``int8``, the weight's shape) and their scale (one, or
  one per output channel), and its forward is the convolution of ``input_quantizer(x)`` (where
  it has one) with ``codes * scale``, plus its bias;
- an activation quantizer declares ``integer_grid() -> (bound, bits)`` (None while it passes its
  input through): it clamps to ``[-bound, bound]`` and rounds to the grid of step
  ``bound / (2^(bits-1) - 1)`` (symmetric, zero point 0), as ``methods._quant``'s running-maximum
  quantizer and PAMS's learned clipping bound do.

Each such layer is written as ``DequantizeLinear`` of its codes (per output channel) feeding the
convolution, each activation quantizer as ``QuantizeLinear``/``DequantizeLinear`` at its own
scale. A batch norm that follows a quantized convolution is folded into the per-channel scale and
the bias, never into the codes (``scale * gamma / sigma``; a channel with a negative factor has
its codes negated, which the symmetric grid allows). Widths below 8 bits run as ``int8`` kernels
with the trained codes: their codes lie in ``-qmax..qmax`` of their width, and a ``Clip`` to
``[-bound, bound]`` before each activation's ``QuantizeLinear`` keeps them there (ONNX Runtime's
CPU kernels have no narrower integer convolution, and it fuses no ``Clip`` placed between
``QuantizeLinear`` and ``DequantizeLinear``). At 8 bits that clip is left out: ``QuantizeLinear``
saturates at -128, one step below training's -127, which only an activation more than half a step
below ``-bound`` reaches.

ONNX Runtime fuses ``DequantizeLinear -> Conv -> QuantizeLinear`` into ``QLinearConv`` only where
the convolution's output is quantized; training never quantizes it (the next layer quantizes what
reaches it). :func:`_quantize_layer_outputs` adds that ``QuantizeLinear``/``DequantizeLinear``
pair at the scale of the quantizer the output reaches: exactly where the path between them is a
ReLU, a clip to the quantizer's bound, a max pool or a reshape (each commutes with rounding to
the grid), and with one rounding of
at most half a step that training did not have where the output is added to another path (a
residual block's sum) first. A layer whose output reaches no quantizer keeps a float convolution
of its dequantized codes.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deploy._modes import eval_mode
from deploy._rewrites import conv_batch_norm_pairs, fold_weight_computations, inference_copy, output_diff, trace_program

__all__ = ["ONNX_FILE", "OnnxExport", "export_onnx", "load_onnx", "check_onnx", "integer_copy", "optimized_op_types"]

ONNX_FILE = "model.onnx"

#: Ops through which a layer's output may reach the next quantizer and be rounded to its grid
#: before them without changing a value: each commutes with rounding to a grid through zero.
_EXACT_PATH_OPS = {"Relu", "Clip", "MaxPool", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"}
#: Ops where rounding first changes the value by at most half a step (a sum with another path).
_SUM_OPS = {"Add"}


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote.

    Attributes:
        dynamic_batch: Whether the batch dimension is dynamic (else fixed at the example's).
        quantized_layers: Layers written as integer codes with ``DequantizeLinear``.
        activation_quantizers: Activation quantizers written as ``QuantizeLinear``/``DequantizeLinear``.
        quantized_outputs: Layers whose outputs got a ``QuantizeLinear`` (:func:`_quantize_layer_outputs`),
            so that ONNX Runtime fuses them into integer kernels.
    """

    dynamic_batch: bool
    quantized_layers: int
    activation_quantizers: int
    quantized_outputs: int


def _quant_ops() -> None:
    # Registers torch.ops.quantized_decomposed, which the ONNX exporter maps to Q/DQ.
    import torch.ao.quantization.fx._decomposed  # noqa: F401


class _IntegerActivation(nn.Module):
    """An activation quantizer as ``QuantizeLinear``/``DequantizeLinear`` (symmetric, int8, zero point 0)."""

    def __init__(self, bound: torch.Tensor, bits: int) -> None:
        super().__init__()
        self.qmax = 2 ** (bits - 1) - 1
        self.bound = float(bound.detach().clamp_min(1e-8))
        self.scale = self.bound / self.qmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.quantized_decomposed
        if self.qmax < 127:  # before QuantizeLinear: ONNX Runtime fuses no Clip between Q and DQ
            x = x.clamp(-self.bound, self.bound)
        codes = ops.quantize_per_tensor(x, self.scale, 0, -128, 127, torch.int8)
        return ops.dequantize_per_tensor(codes, self.scale, 0, -128, 127, torch.int8)


class _IntegerLayer(nn.Module):
    """A quantized convolution or linear layer as its codes, dequantized per output channel."""

    def __init__(self, layer: nn.Module, codes: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        out = codes.shape[0]
        self.register_buffer("codes", codes.detach().to(torch.int8).clone())
        self.register_buffer("scales", scale.detach().to(torch.float32).reshape(-1).expand(out).clone())
        self.register_buffer("zero_points", torch.zeros(out, dtype=torch.int64))
        bias = layer.bias.detach().clone() if layer.bias is not None else torch.zeros(out)
        self.register_buffer("bias", bias.to(torch.float32))
        grid = _grid(getattr(layer, "input_quantizer", None))
        self.input_quantizer = _IntegerActivation(*grid) if grid else nn.Identity()
        self.conv = isinstance(layer, nn.Conv2d)
        if self.conv:
            self.stride, self.padding, self.dilation, self.groups = layer.stride, layer.padding, layer.dilation, layer.groups

    def fold_batch_norm(self, bn: nn.BatchNorm2d) -> None:
        """Fold ``bn`` (applied to this layer's output) into the scales and bias, not the codes."""
        factor = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias.detach() if bn.affine else torch.zeros_like(factor)
        self.bias = (self.bias - bn.running_mean) * factor + shift
        sign = torch.where(factor < 0, -1, 1)
        self.codes = self.codes * sign.to(torch.int8).reshape(-1, *[1] * (self.codes.dim() - 1))
        self.scales = self.scales * factor.abs()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch.ops.quantized_decomposed.dequantize_per_channel(self.codes, self.scales, self.zero_points, 0, -127, 127, torch.int8)
        x = self.input_quantizer(x)
        if self.conv:
            return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return F.linear(x, weight, self.bias)


def _grid(quantizer: nn.Module | None) -> tuple[torch.Tensor, int] | None:
    declared = getattr(quantizer, "integer_grid", None)
    return declared() if callable(declared) else None


def integer_copy(model: nn.Module, example_input: torch.Tensor) -> tuple[nn.Module, int, int]:
    """An eval-mode copy of ``model`` whose quantized layers and activation quantizers compute through Q/DQ ops.

    Called by :func:`export_onnx`. Layers declaring ``integer_weight()`` and activation
    quantizers declaring ``integer_grid()`` (module docstring) are replaced, and batch norms
    after quantized convolutions folded into them. The copy computes what ``model`` computes, up
    to the rounding of the scale's division; a model without such layers comes back unchanged.

    Returns:
        ``(copy, quantized layers, activation quantizers)``.
    """
    _quant_ops()
    rewritten = copy.deepcopy(model).eval()
    layers = quantizers = 0
    for name, module in list(rewritten.named_modules()):
        declared = getattr(module, "integer_weight", None)
        if callable(declared) and isinstance(module, (nn.Conv2d, nn.Linear)) and getattr(module, "padding_mode", "zeros") == "zeros":
            rewritten.set_submodule(name, _IntegerLayer(module, *declared()))
            layers += 1
            quantizers += not isinstance(rewritten.get_submodule(name).input_quantizer, nn.Identity)
    for name, module in list(rewritten.named_modules()):
        if isinstance(module, _IntegerLayer):
            continue
        grid = _grid(module)
        if grid is not None and not name.endswith(".input_quantizer"):
            rewritten.set_submodule(name, _IntegerActivation(*grid))
            quantizers += 1
    if layers:
        for conv_name, bn_name in conv_batch_norm_pairs(rewritten, trace_program(rewritten, example_input), convs=(_IntegerLayer,)):
            conv = rewritten.get_submodule(conv_name)
            if conv.conv:
                conv.fold_batch_norm(rewritten.get_submodule(bn_name))
                rewritten.set_submodule(bn_name, nn.Identity())
    return rewritten, layers, quantizers


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: Path, rewritten: nn.Module | None = None) -> OnnxExport:
    """Write ``model`` (its inference copy, and :func:`integer_copy` of that) as an ONNX file at ``path``.

    Called by :func:`deploy.export_model`. The batch dimension is dynamic where the model
    allows it; a model that exports only at a fixed shape is exported at the example's.
    ``rewritten``: the model's inference copy when the caller has one (the program's, checked
    already); otherwise one is made. Where
    an op has no ONNX function and only computes weights (the bit shifts that unpack a clustered
    convolution's packed indices), the model's ``torch.export`` program with its weight
    computations run once (as :func:`deploy.load_program` runs them) is exported instead.

    Raises:
        Exception: Whatever ``torch.onnx.export`` raises for a model it cannot export.
    """
    import onnx

    if rewritten is None:
        rewritten, _ = inference_copy(model, example_input, channels_last=False)
    rewritten, layers, quantizers = integer_copy(rewritten, example_input)
    try:
        proto, dynamic = _to_onnx(rewritten, example_input)
    except Exception:  # noqa: BLE001  an op without an ONNX function: is it only in weight computations?
        folded = trace_program(rewritten, example_input).module()
        if not fold_weight_computations(folded):
            raise
        proto, dynamic = _to_onnx(folded, example_input)
    quantized_outputs = _quantize_layer_outputs(proto) if layers else 0
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(path))
    return OnnxExport(dynamic_batch=dynamic, quantized_layers=layers, activation_quantizers=quantizers, quantized_outputs=quantized_outputs)


def _to_onnx(model: nn.Module, example_input: torch.Tensor):
    """``(ONNX model proto, dynamic batch)`` of ``model`` from the dynamo exporter."""
    traced = example_input if example_input.shape[0] > 1 else torch.cat([example_input, example_input])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        names = {"input_names": ["input"], "output_names": ["output"], "verbose": False, "dynamo": True}
        try:
            return torch.onnx.export(model, (traced,), dynamic_shapes=({0: torch.export.Dim.AUTO},), **names).model_proto, True
        except Exception:  # noqa: BLE001  data-dependent shapes: only a fixed batch exports
            return torch.onnx.export(model, (example_input,), **names).model_proto, False


def _quantize_layer_outputs(proto) -> int:
    """Add ``QuantizeLinear``/``DequantizeLinear`` after each quantized layer whose output reaches a quantizer.

    Called by :func:`export_onnx` on an integer model (rule and exactness: module docstring).
    A quantized layer is a ``Conv``, ``Gemm`` or ``MatMul`` whose weight input is a
    ``DequantizeLinear`` of an initializer. Its output is followed through ops of
    :data:`_EXACT_PATH_OPS` and :data:`_SUM_OPS`, each the sole reader of what it reads, to a
    ``QuantizeLinear``; the pair takes that node's scale and zero point.

    Returns:
        How many outputs were quantized.
    """
    from onnx import helper

    graph = proto.graph
    producers = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    initializers = {init.name for init in graph.initializer}
    constants = {node.output[0] for node in graph.node if node.op_type == "Constant"}
    graph_outputs = {out.name for out in graph.output}

    def quantized_weight(node) -> bool:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            return False
        source = producers.get(node.input[1])
        while source is not None and source.op_type == "Transpose":
            source = producers.get(source.input[0])
        return source is not None and source.op_type == "DequantizeLinear" and source.input[0] in initializers | constants

    def next_quantizer(value: str):
        while value not in graph_outputs:
            users = readers.get(value, [])
            if len(users) != 1:
                return None
            user = users[0]
            if user.op_type == "QuantizeLinear":
                return user
            if user.op_type not in _EXACT_PATH_OPS | _SUM_OPS:
                return None
            value = user.output[0]
        return None

    added = []
    for node in graph.node:
        if not quantized_weight(node):
            continue
        quantizer = next_quantizer(node.output[0])
        if quantizer is None:
            continue
        out = node.output[0]
        q, dq = f"{out}__q", f"{out}__dq"
        scale_zero = list(quantizer.input[1:3])
        added.append(
            (
                node,
                [
                    helper.make_node("QuantizeLinear", [out, *scale_zero], [q], name=f"{node.name}_output_quantize"),
                    helper.make_node("DequantizeLinear", [q, *scale_zero], [dq], name=f"{node.name}_output_dequantize"),
                ],
                out,
            )
        )
    if not added:
        return 0
    for node, pair, out in added:
        for user in readers.get(out, []):
            for i, name in enumerate(user.input):
                if name == out:
                    user.input[i] = pair[1].output[0]
    nodes = list(graph.node)
    inserted = {id(node): pair for node, pair, _ in added}
    ordered = []
    for node in nodes:
        ordered.append(node)
        ordered.extend(inserted.get(id(node), []))
    # The pair reads the scale of a quantizer further on: move every constant node first.
    constant_nodes = [n for n in ordered if n.op_type == "Constant"]
    rest = [n for n in ordered if n.op_type != "Constant"]
    del graph.node[:]
    graph.node.extend(constant_nodes + rest)
    return len(added)


def load_onnx(path: Path, threads: int | None = None, optimize: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model.onnx`` in an ONNX Runtime CPU session, as a callable from a torch tensor to a torch tensor.

    Args:
        path: The ONNX file.
        threads: ONNX Runtime's intra-op threads (None: its default, every core).
        optimize: ONNX Runtime's graph optimisation (fusions into integer kernels); off, each
            node runs as written (:func:`check_onnx`).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        out = session.run(None, {name: x.detach().cpu().numpy().astype(np.float32, copy=False)})[0]
        return torch.from_numpy(out)

    run.session = session  # type: ignore[attr-defined]
    return run


def optimized_op_types(path: Path) -> set[str]:
    """The op types of ``path`` after ONNX Runtime's graph optimisation (which kernels run)."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return {node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node}


def check_onnx(model: nn.Module, path: Path, x: torch.Tensor, rtol: float = 1e-4) -> float:
    """The largest output difference of the ONNX file at ``path`` from ``model`` on ``x``.

    The file runs in ONNX Runtime with its graph optimisation off: each node as written, in
    float where the file says float, so an integer model is checked for carrying exactly the
    model's codes, scales and bounds. Optimised, ONNX Runtime fuses the Q/DQ groups into
    integer kernels, which store each bias as ``int32`` on the accumulator's grid (step
    ``input scale * weight scale``); at 8 bits that moves outputs by rounding noise, below 8
    bits some activations cross a grid boundary (the digits test bounds the accuracy change).

    Raises:
        AssertionError: The difference is more than ``rtol * max(1, max |output|)``.
    """
    with eval_mode(model), torch.no_grad():
        return output_diff(
            model, load_onnx(path, optimize=False), x, rtol, f"the exported ONNX model ({Path(path).name}) against the module"
        )
