"""The inference-only rewrites of a model before it is exported, and the output check of a form.

:func:`inference_copy` folds each batch norm into the convolution before it and drops dropout
on a copy in eval mode, checked on a probe input; :func:`output_diff` is the one comparison every
form (program, compiled, ONNX) is checked with against the module.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from deploy._modes import eval_mode

__all__ = [
    "InferenceRewrites",
    "inference_copy",
    "output_diff",
    "probe_input",
    "trace_program",
    "conv_batch_norm_pairs",
    "fold_weight_computations",
]


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


_CONV_OPS = {torch.ops.aten.conv1d, torch.ops.aten.conv2d, torch.ops.aten.conv3d, torch.ops.aten.convolution}


_BATCH_NORM_OPS = {torch.ops.aten.batch_norm, torch.ops.aten._native_batch_norm_legit_no_training}


#: The same operations as Python calls, as an eager forward pass makes them (:func:`_eager_ops`).
_CONV_CALLS = {torch.conv1d, torch.conv2d, torch.conv3d, torch.nn.functional.conv1d, torch.nn.functional.conv2d}
_CONV_CALLS |= {torch.nn.functional.conv3d, torch.convolution}
_BATCH_NORM_CALLS = {torch.batch_norm, torch.nn.functional.batch_norm}


@dataclass(frozen=True)
class InferenceRewrites:
    """What :func:`inference_copy` changed and how far the copy's outputs moved.

    Attributes:
        folded_batch_norms: Batch norms folded into the convolution before them.
        removed_dropouts: Dropout layers replaced by the identity.
        channels_last: Whether the convolutions' weights are stored channels-last.
        max_abs_diff: Largest output difference between the copy and the model on a random batch.
    """

    folded_batch_norms: int
    removed_dropouts: int
    channels_last: bool
    max_abs_diff: float


def inference_copy(
    model: nn.Module, example_input: torch.Tensor, rtol: float = 1e-4, channels_last: bool = True
) -> tuple[nn.Module, InferenceRewrites]:
    """An eval-mode copy of ``model`` rewritten for inference, and what was rewritten.

    Called by :func:`export_model` before exporting. ``model`` itself is not changed. Rewrites:

    - every ``nn.Dropout*`` becomes ``nn.Identity`` (a dropout in eval mode still costs a call);
    - a ``BatchNorm1d/2d/3d`` whose input is the output of a plain ``Conv1d/2d/3d`` and nothing
      else reads that output is folded into the convolution's weight and bias
      (``torch.nn.utils.fusion.fuse_conv_bn_eval``) and becomes ``nn.Identity``. The pairs are
      read from one eager forward pass of the model on ``example_input``
      (:func:`conv_batch_norm_pairs`), not a trace: the export's own trace, of the rewritten
      copy, is then the only one; a convolution or batch norm that runs more
      than once per forward, or whose weight another layer shares, is left alone, as are
      subclasses (quantized or clustered layers compute their own weights);
    - on CPU, every plain ``Conv2d`` keeps its weight channels-last, so that its output, and
      the activations after it, are channels-last too: oneDNN then runs the convolutions without
      reordering each activation (as programs, ResNet-56 and its 2x and 4x ``l1_filter``-pruned
      copies took 1.3x to 1.6x less CPU time at batch 64 on one thread). A model that cannot run
      so (a ``.view`` of such an activation), or whose outputs it moves beyond ``rtol`` (an
      activation quantizer's rounding turns the layout's different summation order into a whole
      quantization step), keeps the default layout. The inputs and outputs are as before (an
      output may be channels-last strided; its values are the same).

    Args:
        model: The model (any mode; the copy is in eval mode).
        example_input: An input of the model's shape; a batch of random values of its shape
            (the example itself when it is not floating point) checks the copy.
        rtol: The copy's outputs must stay within ``rtol * max(1, max |output|)`` of the model's.
        channels_last: Whether to try the channels-last layout (on CPU).

    Raises:
        AssertionError: The rewritten copy's outputs differ from the model's by more than that
            (a slimtune bug: please report it with the model).
    """
    rewritten = copy.deepcopy(model).eval()
    removed = 0
    for name, module in list(rewritten.named_modules()):
        if isinstance(module, nn.modules.dropout._DropoutNd):
            rewritten.set_submodule(name, nn.Identity())
            removed += 1
    types = {type(m) for m in rewritten.modules()}
    foldable = types & set(_CONVS) and types & set(_BATCH_NORMS)
    pairs = conv_batch_norm_pairs(rewritten, example_input) if foldable else []
    for conv_name, bn_name in pairs:
        rewritten.set_submodule(conv_name, fuse_conv_bn_eval(rewritten.get_submodule(conv_name), rewritten.get_submodule(bn_name)))
        rewritten.set_submodule(bn_name, nn.Identity())
    probe = probe_input(example_input)
    channels_last = channels_last and example_input.device.type == "cpu" and _channels_last(rewritten, True) > 0
    what = "the inference rewrites (batch norms folded, dropout removed{})"
    with eval_mode(model), torch.no_grad():
        if channels_last:
            try:
                diff = output_diff(model, rewritten, probe, rtol, what.format(", channels last"))
            except (RuntimeError, AssertionError):  # a .view() of a channels-last activation, or rounding flipped by it
                _channels_last(rewritten, False)
                channels_last = False
        if not channels_last:
            diff = output_diff(model, rewritten, probe, rtol, what.format(""))
    return rewritten, InferenceRewrites(
        folded_batch_norms=len(pairs), removed_dropouts=removed, channels_last=channels_last, max_abs_diff=diff
    )


def _channels_last(model: nn.Module, on: bool) -> int:
    """Store every plain ``Conv2d``'s weight channels-last (``on``) or contiguous; returns how many."""
    convs = [m for m in model.modules() if type(m) is nn.Conv2d]
    layout = torch.channels_last if on else torch.contiguous_format
    for conv in convs:
        conv.weight.data = conv.weight.data.contiguous(memory_format=layout)
    return len(convs)


def trace_program(model: nn.Module, example_input: torch.Tensor) -> torch.export.ExportedProgram:
    """The model's ``torch.export`` program: with a dynamic batch dimension when the model allows it.

    A batch of 1 would specialise the batch dimension, so the trace uses 2.
    """
    traced_input = example_input if example_input.shape[0] > 1 else torch.cat([example_input, example_input])
    with torch.no_grad():
        try:
            program = torch.export.export(model, (traced_input,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
        except Exception:  # noqa: BLE001  some models (e.g. with data-dependent shapes) only export statically
            program = torch.export.export(model, (example_input,))
    # Each node's Python stack trace (slimtune's source lines and this checkout's paths) is saved
    # with the program, about half a kilobyte a node; a deployment has no use for it, and it made
    # a quantized layer's few unpacking ops outweigh the bytes its packed codes save.
    for node in program.graph.nodes:
        node.meta.pop("stack_trace", None)
    return program


def _module_path(node: torch.fx.Node) -> tuple[str, str] | None:
    """The innermost module whose own forward ran ``node``: (path, qualified class name)."""
    stack = node.meta.get("nn_module_stack")
    return tuple(list(stack.values())[-1]) if stack else None


@dataclass(frozen=True)
class _Op:
    """One operation of a forward pass, as :func:`conv_batch_norm_pairs` reads it.

    Attributes:
        kind: ``"conv"``, ``"bn"`` or ``""`` (any other operation).
        module: The path of the innermost module whose own forward ran it (None: the top level).
        first: The value it reads first (its data input), as a key of ``readers``; None: none.
        output: Its output, as a key of ``readers``.
    """

    kind: str
    module: str | None
    first: object
    output: object


def conv_batch_norm_pairs(
    model: nn.Module, source: torch.export.ExportedProgram | torch.Tensor, convs: tuple[type, ...] = _CONVS
) -> list[tuple[str, str]]:
    """``(conv, batch norm)`` module paths of ``model`` that fold exactly (see :func:`inference_copy`).

    ``source``: a ``torch.export`` program of ``model``, or an example input, which one eager
    forward pass of ``model`` in its mode under ``no_grad`` reads instead (:func:`_eager_ops`:
    milliseconds, where a trace costs as much as the export); both give the same pairs.
    ``convs``: the module types (exactly) that a batch norm may fold into.
    """
    ops, readers = _program_ops(source) if isinstance(source, torch.export.ExportedProgram) else _eager_ops(model, source)
    calls = Counter(op.module for op in ops if op.kind and op.module is not None)  # conv or bn ops each module runs
    # A weight shared by two layers would change both when folded into one.
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    made = {op.output: op for op in ops}
    pairs = []
    for op in ops:
        conv_op = made.get(op.first) if op.kind == "bn" else None
        if conv_op is None or conv_op.kind != "conv" or readers[conv_op.output] != 1:
            continue
        if conv_op.module is None or op.module is None or calls[conv_op.module] != 1 or calls[op.module] != 1:
            continue
        conv, bn = model.get_submodule(conv_op.module), model.get_submodule(op.module)
        if type(conv) not in convs or type(bn) not in _BATCH_NORMS or bn.running_mean is None:
            continue
        if any(uses[id(p)] > 1 for p in (*conv.parameters(), *bn.parameters())):
            continue
        pairs.append((conv_op.module, op.module))
    return pairs


def _program_ops(program: torch.export.ExportedProgram) -> tuple[list[_Op], Counter]:
    """The operations of ``program``'s graph and how many nodes read each node."""
    ops = []
    readers: Counter = Counter()
    for node in program.graph.nodes:
        readers[node] = len(node.users)
        if node.op != "call_function":
            continue
        packet = getattr(node.target, "overloadpacket", None)
        kind = "conv" if packet in _CONV_OPS else "bn" if packet in _BATCH_NORM_OPS else ""
        where = _module_path(node)
        first = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
        ops.append(_Op(kind, where[0] if where else None, first, node))
    return ops, readers


class _Recorder(TorchFunctionMode):
    """Records every torch call of an eager forward pass that returns a tensor as an :class:`_Op`, keyed by tensor ids."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[_Op] = []
        self.readers: Counter = Counter()
        self.modules: list[str] = []
        self.alive: list[Any] = []  # every value seen stays alive, so that no id is reused during the pass

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not any(isinstance(x, torch.Tensor) for x in tree_flatten(out)[0]):
            # A shape or dtype query (a batch norm's input.dim() check): no node of a static trace.
            return out
        inputs = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        for x in {id(x): x for x in inputs}.values():
            self.readers[id(x)] += 1
        kind = "conv" if func in _CONV_CALLS else "bn" if func in _BATCH_NORM_CALLS else ""
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        self.alive += [args, kwargs, out]
        self.ops.append(_Op(kind, self.modules[-1] if self.modules else None, id(first) if first is not None else None, id(out)))
        return out


def _eager_ops(model: nn.Module, example_input: torch.Tensor) -> tuple[list[_Op], Counter]:
    """The operations of one forward pass of ``model`` on ``example_input`` and how many read each value."""
    recorder = _Recorder()
    names = {module: name for name, module in model.named_modules(remove_duplicate=False)}

    def enter(name: str) -> Callable[..., None]:
        return lambda module, args: recorder.modules.append(name)

    def leave(module: nn.Module, args: Any, out: Any) -> None:  # returns None: a hook's return value replaces the output
        recorder.modules.pop()

    hooks = []
    for module, name in names.items():
        hooks += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]
    try:
        with torch.no_grad(), recorder:
            out = model(example_input)
    finally:
        for hook in hooks:
            hook.remove()
    for x in {id(x): x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)}.values():
        recorder.readers[id(x)] += 1  # the program's output node reads what the model returns
    return recorder.ops, recorder.readers


def probe_input(example_input: torch.Tensor) -> torch.Tensor:
    """Random values of the example's shape (the example itself when it is not floating point)."""
    if not example_input.is_floating_point():
        return example_input
    generator = torch.Generator(device=example_input.device).manual_seed(0)
    return torch.randn(example_input.shape, generator=generator, device=example_input.device, dtype=example_input.dtype)


def output_diff(
    reference: Callable[[torch.Tensor], torch.Tensor],
    other: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    rtol: float,
    what: str,
) -> float:
    """The largest output difference of ``other`` from ``reference`` on ``x``.

    Raises:
        AssertionError: It is more than ``rtol * max(1, max |reference output|)``; ``what`` names
            the two in the message.
    """
    expected, got = reference(x), other(x)
    if not expected.numel():
        return 0.0
    diff = float((expected - got).abs().max())
    bound = rtol * max(1.0, float(expected.abs().max()))
    if not diff <= bound:
        raise AssertionError(f"{what} changed the outputs by {diff:.3g}, more than {bound:.3g} (rtol {rtol} x max(1, max |output|)).")
    return diff


def fold_weight_computations(module: torch.fx.GraphModule) -> int:
    """Replace every computation of ``module``'s graph that reads only its own tensors by its result.

    Called by :func:`load_program` on the module ``torch.export`` unlifts from a program. A node
    is computed here when it is an operator call whose inputs are all the module's parameters,
    buffers or constants that no call changes, or such computed nodes, and it is pure: no
    mutation, no side effect and no random draw (``Node.is_impure`` with random ops counted
    impure). Nodes that read the input, its shape (a dynamic batch size), a tensor the graph
    mutates (a buffer updated in every call) or a random generator stay in the graph. Each
    computed tensor that a remaining node (or the output) reads becomes a buffer of ``module``,
    read by a ``get_attr`` node; computations that only fed computed ones are dropped. ``torch.export``'s
    metadata assertion (``aten._assert_tensor_metadata``) on a computed tensor is checked here,
    once, since its answer cannot change between calls. The graph is edited in place, so the
    module keeps its calling convention (inputs and outputs as exported).

    ``torch.fx.experimental.const_fold.split_const_subgraphs`` does the same split but rebuilds
    the module with ``split_module``, which loses that convention (a single output comes back as
    a tuple); inductor's ``constant_fold`` (``torch._export.passes``, private) leaves constructors
    such as the ``arange`` of the shifts in the graph, and with them the unpacking.

    Returns:
        How many tensors were computed and stored (0: the graph is unchanged).
    """
    graph = module.graph
    check_metadata = torch.ops.aten._assert_tensor_metadata.default
    # A tensor a call may change (an in-place op, a module call) is no constant.
    changing = {
        node.target
        for node in graph.find_nodes(op="get_attr")
        for user in node.users
        if user.op == "call_module"
        or (user.op == "call_function" and user.target is not check_metadata and user.is_impure(impure_random=False))
    }
    values: dict[torch.fx.Node, Any] = {}
    checks = []
    with torch.no_grad():
        for node in graph.nodes:
            if node.op == "get_attr":
                value = _attribute(module, node.target)
                if isinstance(value, torch.Tensor) and node.target not in changing:
                    values[node] = value
                continue
            if node.op != "call_function" or not all(n in values for n in node.all_input_nodes):
                continue
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), values.__getitem__)
            if node.target is check_metadata:
                node.target(*args, **kwargs)
                checks.append(node)
            elif not node.is_impure(impure_random=True):
                values[node] = node.target(*args, **kwargs)
    for check in checks:
        graph.erase_node(check)
    stored = 0
    for node, value in values.items():
        if node.op == "get_attr" or not isinstance(value, torch.Tensor) or all(user in values for user in node.users):
            continue
        name = f"_folded_weight_{stored}"
        while hasattr(module, name):
            name += "_"
        module.register_buffer(name, value)
        with graph.inserting_before(node):
            read = graph.get_attr(name)
        read.meta = dict(node.meta)
        node.replace_all_uses_with(read)
        stored += 1
    if stored or checks:
        graph.eliminate_dead_code()
        graph.lint()
        module.recompile()
    return stored


def _attribute(module: nn.Module, target: str) -> Any:
    """What a ``get_attr`` node of ``module``'s graph reads (None where the path does not resolve)."""
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part, None)
    return value
