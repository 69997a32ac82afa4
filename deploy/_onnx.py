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

ONNX Runtime runs a layer on an integer kernel (``QLinearConv``, ``QLinearAdd``) only where every
input and the output are quantized, and keeps the NCHW/NHWC ``Transpose`` pairs of the float
islands between. Training quantizes only each layer's input, so :func:`_integer_graph` quantizes
the tensors in between, and records what it changed (in ``metadata_props``) so that
:func:`check_onnx` can undo it:

- a value training quantized for one reader and left in float for another (a residual block's
  output, read by the next block's first convolution and by its shortcut) is read quantized by
  both: the shortcut gets the codes of the next convolution's input, rounding training did not
  have (at most half a step of that grid) and its clip to the quantizer's bound (an activation
  above the running maximum or learned bound is cut there);
- at 8 bits a quantizer of a ReLU's output becomes ``uint8`` with zero point 0 and step
  ``bound / 255`` (same bound, so the same clip): ONNX Runtime then drops the ReLU before it.
  The grid is twice as fine as training's (``bound / 127``), so a value's rounding differs from
  training's by at most 3/4 of a trained step. Below 8 bits the trained codes are kept
  (``int8``, with the clip before each ``QuantizeLinear``), and so are those ReLUs and clips;
- each ``Add`` whose output reaches a quantizer (a residual sum followed by its ReLU) gets its
  float inputs (the second convolution's output, a zero-padded shortcut) quantized on an 8-bit
  grid of that quantizer's bound, step ``bound / 127`` (as ``uint8`` with zero point 128 where
  the quantizer is ``uint8``: ONNX Runtime fuses an ``Add`` or ``Conv`` only with one activation
  type), rounding training did not have of at most half that step, and a clip of the input at
  ``-bound`` (exact where the other input is at most ``bound``, since a ReLU follows);
- such a float input that lies on one activation grid already (a zero-padded shortcut: a slice of
  a quantized value, concatenated with that slice times zero; zero is on every grid, its code the
  zero point) is quantized at that grid instead, and so is each op's output on its way from the
  ``DequantizeLinear`` (the constant zero as ``DequantizeLinear`` of the zero point's code):
  exactly, and ONNX Runtime runs the shortcut on codes (``Slice`` on ``uint8``, ``QLinearMul``,
  ``QLinearConcat``). Where the grid's type differs from the sum's, the rule before holds;
- a quantized layer's output, and such a sum's, gets ``QuantizeLinear``/``DequantizeLinear`` at
  the scale of the quantizer it reaches where ops ONNX Runtime does not fuse stand between:
  exactly, since that path is a ReLU, a clip to the quantizer's bound, a max pool or a reshape
  (each commutes with rounding to the grid).

A value that reaches no quantizer (the last block's sum, which feeds the float classifier) stays
float, and so do the convolution and the sum that write it.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections import Counter
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
#: Ops whose output lies on the grid their data inputs share (they select values, or add zeros:
#: zero is on every grid, its code the zero point) and that ONNX Runtime runs on codes. ``Mul``
#: only by a scalar constant zero (the option-A shortcut's zero channels, ``x * 0``). Not ``Pad``:
#: exact too, but ONNX Runtime (1.32) runs ``DequantizeLinear -> Pad -> QuantizeLinear`` in float.
_GRID_KEEPING_OPS = {"Slice", "Concat", "Mul"}
#: Ops after which a ReLU's output is still non-negative.
_SIGN_KEEPING_OPS = {"MaxPool", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"}


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote.

    Attributes:
        dynamic_batch: Whether the batch dimension is dynamic (else fixed at the example's).
        quantized_layers: Layers written as integer codes with ``DequantizeLinear``.
        activation_quantizers: Activation quantizers written as ``QuantizeLinear``/``DequantizeLinear``.
        quantized_outputs: Layer outputs and sum inputs that got a ``QuantizeLinear`` (:func:`_integer_graph`),
            so that ONNX Runtime fuses them into integer kernels.
        quantized_sums: Sums (``Add``, a residual block's) that run on integer inputs and output.
    """

    dynamic_batch: bool
    quantized_layers: int
    activation_quantizers: int
    quantized_outputs: int
    quantized_sums: int = 0


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
    quantized_outputs, quantized_sums = _integer_graph(proto) if layers else (0, 0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(path))
    return OnnxExport(
        dynamic_batch=dynamic,
        quantized_layers=layers,
        activation_quantizers=quantizers,
        quantized_outputs=quantized_outputs,
        quantized_sums=quantized_sums,
    )


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


class _Graph:
    """An ONNX graph's nodes with who produces and who reads each value, and its constant values."""

    def __init__(self, proto) -> None:
        from onnx import numpy_helper

        self.graph = proto.graph
        self.values = {init.name: numpy_helper.to_array(init) for init in self.graph.initializer}
        for node in self.graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.outputs = {out.name for out in self.graph.output}
        self.added: list[tuple[str, list]] = []  # (value after which, nodes) to insert
        #: What was changed from the trained model, to undo (:func:`_as_trained`).
        self.trained: dict = {"pairs": [], "regrid": {}, "shared": [], "zeros": []}
        self.index()

    def index(self) -> None:
        self.producers = {out: node for node in self.graph.node for out in node.output}
        self.readers: dict[str, list] = {}
        for node in self.graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)

    def constant(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        if name not in self.values:
            self.graph.initializer.append(numpy_helper.from_array(value, name))
            self.values[name] = value
        return name

    def grid(self, scale: float, zero_point: int, dtype: type) -> tuple[str, str]:
        """Initializer names of a scale and a zero point."""
        kind = "u8" if dtype is np.uint8 else "s8"
        scale = np.float32(scale)
        return (
            self.constant(f"deploy_scale_{scale.view(np.uint32):08x}", np.array(scale, np.float32)),
            self.constant(f"deploy_zero_{kind}_{zero_point}", np.array(zero_point, dtype)),
        )

    def quantize(self, value: str, scale_zero: tuple[str, str], readers: list | None = None) -> None:
        """Put ``QuantizeLinear``/``DequantizeLinear`` at ``scale_zero`` between ``value`` and its ``readers`` (all)."""
        from onnx import helper

        q, dq = f"{value}__deploy_q", f"{value}__deploy_dq"
        for reader in self.readers.get(value, []) if readers is None else readers:
            for i, name in enumerate(reader.input):
                if name == value:
                    reader.input[i] = dq
        pair = [
            helper.make_node("QuantizeLinear", [value, *scale_zero], [q], name=q),
            helper.make_node("DequantizeLinear", [q, *scale_zero], [dq], name=dq),
        ]
        self.added.append((value, pair))
        self.trained["pairs"].append(dq)

    def dequantized_zero(self, reader, i: int, scale_zero: tuple[str, str]) -> None:
        """Make ``reader``'s input ``i`` (a constant zero) ``DequantizeLinear`` of the zero point's code at ``scale_zero``: the same zero."""
        from onnx import helper

        zero = scale_zero[1]
        dq = f"{zero}__deploy_zero"
        if dq not in {name for _, pair in self.added for node in pair for name in node.output}:
            self.added.append((zero, [helper.make_node("DequantizeLinear", [zero, *scale_zero], [dq], name=dq)]))
        self.trained["zeros"].append([reader.name, i, reader.input[i]])
        reader.input[i] = dq

    def sorted_nodes(self) -> None:
        """Write the added nodes into the graph, every node after what it reads (original order kept otherwise)."""
        nodes = list(self.graph.node) + [node for _, pair in self.added for node in pair]
        produced = {out: i for i, node in enumerate(nodes) for out in node.output}
        ready = set(self.values) | {i.name for i in self.graph.input} | {""}
        done: list = []
        waiting = list(range(len(nodes)))
        while waiting:
            left = []
            for i in waiting:
                if all(name in ready or name not in produced for name in nodes[i].input):
                    done.append(nodes[i])
                    ready.update(nodes[i].output)
                else:
                    left.append(i)
            if len(left) == len(waiting):
                raise RuntimeError("the integer graph has a cycle")  # a bug here, never a user's model
            waiting = left
        del self.graph.node[:]
        self.graph.node.extend(done)
        self.added = []


@dataclass
class _Quantizer:
    """A trained activation quantizer in the graph: ``[Clip ->] QuantizeLinear -> DequantizeLinear``."""

    quantize: object
    dequantize: object
    clip: object | None
    bound: float

    @property
    def source(self) -> str:
        """The float value it quantizes (before its clip)."""
        return (self.clip or self.quantize).input[0]

    @property
    def scale_zero(self) -> tuple[str, str]:
        return tuple(self.quantize.input[1:3])


def _trained_quantizers(graph: _Graph) -> list[_Quantizer]:
    found = []
    for node in graph.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in graph.values:
            continue
        dequantize = [r for r in graph.readers.get(node.output[0], []) if r.op_type == "DequantizeLinear"]
        if len(dequantize) != 1:
            continue
        clip = graph.producers.get(node.input[0])
        clip = clip if clip is not None and clip.op_type == "Clip" and len(clip.input) == 3 else None
        scale = float(graph.values[node.input[1]])
        bound = float(graph.values[clip.input[2]]) if clip else scale * 127
        found.append(_Quantizer(node, dequantize[0], clip, bound))
    return found


def _nonnegative(graph: _Graph, value: str) -> bool:
    """Whether ``value`` is a ReLU's output, possibly through ops that keep signs."""
    node = graph.producers.get(value)
    while node is not None and node.op_type in _SIGN_KEEPING_OPS:
        node = graph.producers.get(node.input[0])
    return node is not None and node.op_type == "Relu"


def _grid_inputs(graph: _Graph, node) -> list[str] | None:
    """The data inputs of a :data:`_GRID_KEEPING_OPS` node whose output lies on their grid, else None."""
    if node.op_type in ("Slice", "Concat"):
        return list(node.input[:1] if node.op_type == "Slice" else node.input)
    if node.op_type == "Mul" and len(node.input) == 2:
        constant = [name for name in node.input if name in graph.values]
        if len(constant) == 1 and graph.values[constant[0]].size == 1 and not graph.values[constant[0]].any():
            return [name for name in node.input if name not in graph.values]
    return None


def _grid_of(graph: _Graph, value: str) -> tuple[str, str] | None:
    """The ``(scale, zero point)`` of the grid ``value`` lies on exactly, else None.

    ``value`` is on a grid where it is an activation's ``DequantizeLinear`` (one scale) or the
    output of :data:`_GRID_KEEPING_OPS` whose data inputs all lie on one grid (same scale, zero
    point and type).
    """
    node = graph.producers.get(value)
    if node is None or value in graph.values:
        return None
    if node.op_type == "DequantizeLinear":
        activation = node.input[0] not in graph.values and len(node.input) == 3 and all(name in graph.values for name in node.input[1:])
        return (node.input[1], node.input[2]) if activation and graph.values[node.input[1]].size == 1 else None
    if node.op_type not in _GRID_KEEPING_OPS or (data := _grid_inputs(graph, node)) is None:
        return None
    grids = [_grid_of(graph, name) for name in data]
    if not grids or None in grids:
        return None
    kinds = {(float(graph.values[s]), int(graph.values[z]), graph.values[z].dtype.str) for s, z in grids}
    return grids[0] if len(kinds) == 1 else None


def _keep_on_grid(graph: _Graph, value: str, scale_zero: tuple[str, str]) -> int:
    """Quantize each op's output on the way from the ``DequantizeLinear`` to ``value`` (on that grid: :func:`_grid_of`) at ``scale_zero``.

    Exact (the values are codes of that grid already); ONNX Runtime then runs the ops on the codes
    (a multiplication by zero as ``QLinearMul``, a ``Concat`` as ``QLinearConcat``). Each constant
    zero multiplied becomes ``DequantizeLinear`` of the zero point's code. Returns how many outputs
    got a ``QuantizeLinear``.
    """
    path: list = []

    def walk(name: str) -> None:
        node = graph.producers[name]
        if node.op_type == "DequantizeLinear" or node in path:
            return
        for data in _grid_inputs(graph, node):
            walk(data)
        path.append(node)

    walk(value)
    for node in path:
        if node.op_type == "Mul":
            graph.dequantized_zero(node, next(i for i, name in enumerate(node.input) if name in graph.values), scale_zero)
        graph.quantize(node.output[0], scale_zero)
    return len(path)


def _integer_graph(proto) -> tuple[int, int]:
    """Quantize the tensors between an integer model's quantizers, so that ONNX Runtime runs integer kernels throughout.

    Called by :func:`export_onnx` on an integer model (the rules and the rounding they add:
    module docstring). In order: the readers of a quantized value that training left in float
    (a residual block's shortcut) read the quantized value; at 8 bits a quantizer of a ReLU's
    output becomes ``uint8`` (zero point 0, step ``bound / 255``); each ``Add`` whose output
    reaches a quantizer gets its float inputs quantized on ``int8``'s grid of that bound (step
    ``bound / 127``, as ``uint8`` with zero point 128 where the quantizer is ``uint8``; at the grid
    they lie on where they lie on one: :func:`_grid_of`), and its
    output where ops ONNX Runtime does not fuse stand between; each quantized layer's output
    likewise where it reaches a quantizer through ops of :data:`_EXACT_PATH_OPS`.

    Returns:
        ``(quantized layer and sum outputs, sums quantized)``.
    """
    graph = _Graph(proto)
    quantizers = _trained_quantizers(graph)
    by_source: dict[str, list[_Quantizer]] = {}
    for quantizer in quantizers:
        by_source.setdefault(quantizer.source, []).append(quantizer)
    for source, group in by_source.items():
        widest = max(group, key=lambda q: q.bound)
        own = {id(q.clip or q.quantize) for q in group}
        for reader in graph.readers.get(source, []):
            if id(reader) not in own:
                for i, name in enumerate(reader.input):
                    if name == source:
                        reader.input[i] = widest.dequantize.output[0]
                        graph.trained["shared"].append([reader.name, i, source])
    graph.index()

    retyped = set()
    for quantizer in quantizers:
        zero = graph.values[quantizer.quantize.input[2]]
        if quantizer.clip is None and zero.dtype == np.int8 and _nonnegative(graph, quantizer.source):
            scale_zero = graph.grid(quantizer.bound / 255, 0, np.uint8)
            graph.trained["regrid"][quantizer.quantize.name] = list(quantizer.scale_zero)
            quantizer.quantize.input[1:3] = scale_zero
            quantizer.dequantize.input[1:3] = scale_zero
            retyped.add(quantizer.quantize.output[0])
    # The exporter's recorded types of the codes now written as uint8 would contradict them.
    kept = [info for info in graph.graph.value_info if info.name not in retyped]
    del graph.graph.value_info[:]
    graph.graph.value_info.extend(kept)
    by_input = {q.quantize.input[0]: q for q in quantizers}

    def reached(value: str) -> tuple[_Quantizer | None, list]:
        path = []
        while value not in graph.outputs and value in graph.readers and len(graph.readers[value]) == 1:
            if value in by_input and graph.readers[value][0] is by_input[value].quantize:
                return by_input[value], path
            user = graph.readers[value][0]
            if user.op_type not in _EXACT_PATH_OPS:
                break
            path.append(user)
            value = user.output[0]
        if value in by_input:
            return by_input[value], path
        return None, path

    def quantize_output(value: str) -> bool:
        quantizer, path = reached(value)
        if quantizer is None or not path:
            return False
        zero = graph.values[quantizer.quantize.input[2]]
        fused = len(path) == 1 and path[0].op_type == "Relu" and zero.dtype == np.uint8 and int(zero) == 0
        if not fused:  # ONNX Runtime drops a ReLU before a QuantizeLinear whose zero point is the type's minimum
            graph.quantize(value, quantizer.scale_zero)
        return True

    outputs = sums = 0
    for node in list(graph.graph.node):
        if node.op_type != "Add":
            continue
        quantizer, _ = reached(node.output[0])
        if quantizer is None:
            continue
        unsigned = graph.values[quantizer.quantize.input[2]].dtype == np.uint8
        scale_zero = graph.grid(quantizer.bound / 127, 128 if unsigned else 0, np.uint8 if unsigned else np.int8)
        for value in node.input:
            producer = graph.producers.get(value)
            if value in graph.values or (producer is not None and producer.op_type == "DequantizeLinear"):
                continue
            grid = _grid_of(graph, value)
            if grid is not None and graph.values[grid[1]].dtype == graph.values[scale_zero[1]].dtype:
                outputs += _keep_on_grid(graph, value, grid)
            else:
                graph.quantize(value, scale_zero, [node])
                outputs += 1
        quantize_output(node.output[0])
        sums += 1
    graph.sorted_nodes()
    graph.index()
    for node in list(graph.graph.node):
        if _quantized_weight(graph, node) and quantize_output(node.output[0]):
            outputs += 1
    graph.sorted_nodes()
    _record(proto, graph.trained)
    return outputs, sums


#: The ``metadata_props`` key of what :func:`_integer_graph` changed from the trained model.
_TRAINED_KEY = "slimtune.deploy_rounding"


def _record(proto, changes: dict) -> None:
    kept = [p for p in proto.metadata_props if p.key != _TRAINED_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    entry = proto.metadata_props.add()
    entry.key, entry.value = _TRAINED_KEY, json.dumps(changes)


def _as_trained(proto):
    """A copy of an integer model with what :func:`_integer_graph` added undone: the trained model's rounding only.

    Returns None for a model without that record (a float model, or one written before it).
    """
    record = next((p.value for p in proto.metadata_props if p.key == _TRAINED_KEY), None)
    if record is None:
        return None
    changes = json.loads(record)
    proto = copy.deepcopy(proto)
    graph = proto.graph
    nodes = {node.name: node for node in graph.node}
    for name, i, source in changes["shared"]:
        nodes[name].input[i] = source
    for name, i, constant in changes.get("zeros", []):
        nodes[name].input[i] = constant
    zeros = {dq for dq in (node.output[0] for node in graph.node) if dq.endswith("__deploy_zero")}
    pairs = set(changes["pairs"])
    producers = {out: node for node in graph.node for out in node.output}
    bypass = {dq: producers[producers[dq].input[0]].input[0] for dq in pairs}  # the value each pair quantized
    dropped = pairs | zeros | {producers[dq].input[0] for dq in pairs}
    kept = [node for node in graph.node if node.output[0] not in dropped]
    for node in kept:
        node.input[:] = [bypass.get(name, name) for name in node.input]
    for node in kept:
        if node.name in changes["regrid"]:
            node.input[1:3] = changes["regrid"][node.name]
            for reader in kept:
                if reader.op_type == "DequantizeLinear" and reader.input[0] == node.output[0]:
                    reader.input[1:3] = changes["regrid"][node.name]
    del graph.node[:]
    graph.node.extend(kept)
    return proto


def _quantized_weight(graph: _Graph, node) -> bool:
    """Whether ``node`` is a ``Conv``, ``Gemm`` or ``MatMul`` whose weight is a ``DequantizeLinear`` of constant codes."""
    if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
        return False
    source = graph.producers.get(node.input[1])
    while source is not None and source.op_type == "Transpose":
        source = graph.producers.get(source.input[0])
    return source is not None and source.op_type == "DequantizeLinear" and source.input[0] in graph.values


def load_onnx(path: Path | bytes, threads: int | None = None, optimize: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model.onnx`` in an ONNX Runtime CPU session, as a callable from a torch tensor to a torch tensor.

    Args:
        path: The ONNX file (or its serialized bytes).
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
    source = path if isinstance(path, bytes) else str(path)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        out = session.run(None, {name: x.detach().cpu().numpy().astype(np.float32, copy=False)})[0]
        return torch.from_numpy(out)

    run.session = session  # type: ignore[attr-defined]
    return run


def optimized_op_types(path: Path, layout: bool = False) -> Counter[str]:
    """How many nodes of each op type ``path`` has after ONNX Runtime's graph optimisation (which kernels run).

    Args:
        path: The ONNX file.
        layout: Also its layout optimisation (``ORT_ENABLE_ALL``, as :func:`load_onnx` runs it), which
            runs the integer kernels in NHWC and puts a ``Transpose`` at each edge to a float (NCHW) op.
    """
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        level = ort.GraphOptimizationLevel
        options.graph_optimization_level = level.ORT_ENABLE_ALL if layout else level.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)


def check_onnx(model: nn.Module, path: Path, x: torch.Tensor, rtol: float = 1e-4) -> float:
    """The largest output difference of the ONNX file at ``path`` from ``model`` on ``x``.

    The file runs in ONNX Runtime with its graph optimisation off: each node as written, in
    float where the file says float. A float model must equal ``model`` within ``rtol``. An
    integer model is measured against the model's own activation rounding, ``own``: how far
    ``model``'s outputs move when every activation quantizer is removed. With the rounding
    :func:`_integer_graph` added undone (the file records it), the file must be within ``own``:
    it carries the model's codes, scales and bounds, and only a value that float summation
    order puts at a rounding tie may take the neighbouring code (in a deep network such a
    flip propagates, so exact equality holds only for shallow ones). As written, within
    ``3 * own``: per residual block the added rounding moves values by at most 2.25 steps of
    the trained grids (module docstring) where training's moves them by at most 1. Optimised,
    ONNX Runtime fuses the Q/DQ groups into integer kernels, which store each bias as ``int32``
    on the accumulator's grid (step ``input scale * weight scale``); at 8 bits that moves
    outputs by rounding noise, below 8 bits some activations cross a grid boundary (the
    digits tests bound the accuracy change).

    Returns:
        The difference of the file as written.

    Raises:
        AssertionError: A difference is more than its bound plus ``rtol * max(1, max |output|)``.
    """
    import onnx

    name = Path(path).name
    trained = _as_trained(onnx.load(str(path)))
    with eval_mode(model), torch.no_grad():
        if trained is None:
            return output_diff(model, load_onnx(path, optimize=False), x, rtol, f"the exported ONNX model ({name}) against the module")
        expected = model(x)
        own = float((_without_activation_rounding(model)(x) - expected).abs().max())
        floor = rtol * max(1.0, float(expected.abs().max()))
        checks = ((trained.SerializeToString(), 1, " with its deployment rounding undone"), (str(path), 3, ""))
        for source, times, what in checks:
            diff = float((load_onnx(source, optimize=False)(x) - expected).abs().max())
            if not diff <= times * own + floor:
                raise AssertionError(
                    f"the exported ONNX model ({name}){what} changed the outputs by {diff:.3g}, more than {times} x the "
                    f"model's own activation rounding ({own:.3g}) plus rtol {rtol} x max(1, max |output|) ({floor:.3g})."
                )
        return diff


def _without_activation_rounding(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every activation quantizer (``integer_grid()``) replaced by the identity."""
    plain = copy.deepcopy(model)
    for name, module in list(plain.named_modules()):
        if name and callable(getattr(module, "integer_grid", None)):
            plain.set_submodule(name, nn.Identity())
    return plain
