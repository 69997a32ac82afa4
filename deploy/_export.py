"""Export a compressed model so it can be deployed and loaded back.

An export directory holds:

- ``model.pt2``: the **program**, the default deployable form: a ``torch.export`` program of the
  model after the inference-only rewrites of :func:`inference_copy` (batch norms folded into the
  convolutions before them, dropout removed), deployable without slimtune:
  ``torch.export.load(path).module()``; its byte size is the ``artifact_bytes`` metric, and a
  trial's ``latency_ms`` is timed on it (``latency_form`` ``program``) as :func:`load_program`
  loads it;
- ``model.pt``: the **module**, the ``nn.Module`` itself, architecture plus state dict (pruned
  shapes, swapped layers), unfolded, loadable with slimtune installed:
  ``torch.load(path, weights_only=False)``;
- ``state_dict.pt``: the module's weights alone, for users who rebuild the architecture themselves;
- ``recipe.json``: the ``recipe`` the caller passes (:func:`write_recipe`); a trial's holds
  everything in effect when it ran (task, data, model, baseline, training, pipeline with every
  hyperparameter, versions) and its metrics; ``slimtune replay`` retrains from it
  (:mod:`search.recipe`);
- ``model.onnx``, when asked for (``onnx=True``: trials, ``slimtune check``, ``export`` and
  ``profile``): the **onnx** form for ONNX Runtime and ONNX serving stacks, a QDQ model on integer
  kernels where the model is quantized (:mod:`deploy._onnx`);
- ``model_compiled.pt2``, only from ``slimtune export --compile``: the **compiled** form, the
  program compiled ahead of time by AOTInductor into native code for one device, loadable
  without slimtune: ``torch._inductor.aoti_load_package(path)`` (:func:`compile_program`).
  Compiling takes tens of seconds to minutes and needs a C++ compiler, so trials do not do it.

Loading the forms back, and what each does with packed quantized weights: :mod:`deploy._loading`.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from deploy._latency import latency_ms
from deploy._loading import DEFAULT_FORM, FORMS, load_exported, load_form, load_program, storage_groups_quiet
from deploy._modes import eval_mode
from deploy._onnx import check_onnx, export_onnx
from errors import UserError

__all__ = [
    "EXPORT_FILES",
    "InferenceRewrites",
    "inference_copy",
    "export_program",
    "export_model",
    "write_recipe",
    "check_round_trip",
    "cpp_compiler",
    "compile_program",
    "output_diff",
    "deployed_latency",
]

EXPORT_FILES = ("model.pt2", "model.pt", "state_dict.pt", "recipe.json")

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV_OPS = {torch.ops.aten.conv1d, torch.ops.aten.conv2d, torch.ops.aten.conv3d, torch.ops.aten.convolution}
_BATCH_NORM_OPS = {torch.ops.aten.batch_norm, torch.ops.aten._native_batch_norm_legit_no_training}


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
      read from a ``torch.export`` trace of the model; a convolution or batch norm that runs more
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
    # The trace that finds the pairs costs as much as the export: only when there can be one.
    foldable = types & set(_CONVS) and types & set(_BATCH_NORMS)
    pairs = _conv_batch_norm_pairs(rewritten, _trace(rewritten, example_input)) if foldable else []
    for conv_name, bn_name in pairs:
        rewritten.set_submodule(conv_name, fuse_conv_bn_eval(rewritten.get_submodule(conv_name), rewritten.get_submodule(bn_name)))
        rewritten.set_submodule(bn_name, nn.Identity())
    probe = _probe(example_input)
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
    return rewritten, InferenceRewrites(folded_batch_norms=len(pairs), removed_dropouts=removed, channels_last=channels_last, max_abs_diff=diff)


def _channels_last(model: nn.Module, on: bool) -> int:
    """Store every plain ``Conv2d``'s weight channels-last (``on``) or contiguous; returns how many."""
    convs = [m for m in model.modules() if type(m) is nn.Conv2d]
    layout = torch.channels_last if on else torch.contiguous_format
    for conv in convs:
        conv.weight.data = conv.weight.data.contiguous(memory_format=layout)
    return len(convs)


def _trace(model: nn.Module, example_input: torch.Tensor) -> torch.export.ExportedProgram:
    """The model's ``torch.export`` program: with a dynamic batch dimension when the model allows it.

    A batch of 1 would specialise the batch dimension, so the trace uses 2.
    """
    traced_input = example_input if example_input.shape[0] > 1 else torch.cat([example_input, example_input])
    with torch.no_grad():
        try:
            return torch.export.export(model, (traced_input,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
        except Exception:  # noqa: BLE001  some models (e.g. with data-dependent shapes) only export statically
            return torch.export.export(model, (example_input,))


def _module_path(node: torch.fx.Node) -> tuple[str, str] | None:
    """The innermost module whose own forward ran ``node``: (path, qualified class name)."""
    stack = node.meta.get("nn_module_stack")
    return tuple(list(stack.values())[-1]) if stack else None


def _conv_batch_norm_pairs(model: nn.Module, program: torch.export.ExportedProgram, convs: tuple[type, ...] = _CONVS) -> list[tuple[str, str]]:
    """``(conv, batch norm)`` module paths of ``model`` that fold exactly (see :func:`inference_copy`).

    ``convs``: the module types (exactly) that a batch norm may fold into.
    """
    calls: Counter[str] = Counter()
    for node in program.graph.nodes:  # how often each module runs a convolution or batch norm
        counted = node.op == "call_function" and getattr(node.target, "overloadpacket", None) in _CONV_OPS | _BATCH_NORM_OPS
        where = _module_path(node) if counted else None
        if where is not None:
            calls[where[0]] += 1
    # A weight shared by two layers would change both when folded into one.
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    pairs = []
    for node in program.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "overloadpacket", None) not in _BATCH_NORM_OPS:
            continue
        source = node.args[0]
        if not isinstance(source, torch.fx.Node) or getattr(source.target, "overloadpacket", None) not in _CONV_OPS or len(source.users) != 1:
            continue
        conv_at, bn_at = _module_path(source), _module_path(node)
        if conv_at is None or bn_at is None or calls[conv_at[0]] != 1 or calls[bn_at[0]] != 1:
            continue
        conv, bn = model.get_submodule(conv_at[0]), model.get_submodule(bn_at[0])
        if type(conv) not in convs or type(bn) not in _BATCH_NORMS or bn.running_mean is None:
            continue
        if any(uses[id(p)] > 1 for p in (*conv.parameters(), *bn.parameters())):
            continue
        pairs.append((conv_at[0], bn_at[0]))
    return pairs


def _probe(example_input: torch.Tensor) -> torch.Tensor:
    """Random values of the example's shape (the example itself when it is not floating point)."""
    if not example_input.is_floating_point():
        return example_input
    generator = torch.Generator(device=example_input.device).manual_seed(0)
    return torch.randn(example_input.shape, generator=generator, device=example_input.device, dtype=example_input.dtype)


def output_diff(reference: Callable[[torch.Tensor], torch.Tensor], other: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, rtol: float, what: str) -> float:
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


def export_program(model: nn.Module, example_input: torch.Tensor, channels_last: bool = True) -> tuple[torch.export.ExportedProgram, InferenceRewrites]:
    """The default deployable form of ``model``: its :func:`inference_copy`, exported.

    The program has a dynamic batch dimension when the model allows it, and the example's fixed
    shape otherwise.
    """
    rewritten, rewrites = inference_copy(model, example_input, channels_last=channels_last)
    return _trace(rewritten, example_input), rewrites


def export_model(
    model: nn.Module, example_input: torch.Tensor, out_dir: Path, recipe: dict[str, Any] | None = None, onnx: bool = False
) -> dict[str, int]:
    """Write the export files into ``out_dir`` and return each file's size in bytes.

    Called by the trial (and the baseline's measurement) once the model is final. ``model.pt2``
    is :func:`export_program`'s program, reloaded from the file and checked against ``model``
    as :func:`inference_copy` checks the copy; should the channels-last program fail that check,
    it is exported in the default layout. ``model.pt`` and ``state_dict.pt`` hold ``model`` as it is. ``recipe.json``
    holds ``recipe`` (``{}`` without one); a trial writes its full recipe once its metrics are
    known (:func:`write_recipe`). ``model``'s modes are left as they were.

    With ``onnx``, ``model.onnx`` too (:func:`deploy._onnx.export_onnx`: an integer QDQ model
    where ``model`` is quantized), run in ONNX Runtime and checked against ``model`` as the
    program is (:func:`check_onnx`). Off by default because the dynamo exporter takes seconds per
    model; the trial, ``slimtune check``, ``export`` and ``profile`` ask for it, except for a
    pipeline with a method that declares it cannot export (``Method.onnx_unsupported``).

    Raises:
        AssertionError: The reloaded program's (or ONNX model's) outputs differ from the model's (a slimtune bug).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for channels_last in (True, False):
        rewritten, rewrites = inference_copy(model, example_input, channels_last=channels_last)
        program = _trace(rewritten, example_input)
        with storage_groups_quiet():
            torch.export.save(program, out_dir / FORMS["program"])
        layout = ", channels last" if rewrites.channels_last else ""
        try:
            with eval_mode(model), torch.no_grad():
                output_diff(model, load_program(out_dir), _probe(example_input), 1e-4, f"the reloaded program (batch norms folded, dropout removed{layout})")
            break
        except AssertionError:
            if not rewrites.channels_last:
                raise
    files = list(EXPORT_FILES)
    if onnx:
        export_onnx(model, example_input, out_dir / FORMS["onnx"], rewritten)
        check_onnx(model, out_dir / FORMS["onnx"], _probe(example_input))
        files.append(FORMS["onnx"])
    torch.save(model, out_dir / "model.pt")
    torch.save(model.state_dict(), out_dir / "state_dict.pt")
    write_recipe(out_dir, recipe or {})
    return {name: (out_dir / name).stat().st_size for name in files}


def write_recipe(out_dir: Path, recipe: dict[str, Any]) -> None:
    """Write ``recipe`` as ``out_dir/recipe.json`` (see :mod:`search.recipe` for a trial's)."""
    (Path(out_dir) / "recipe.json").write_text(json.dumps(recipe, indent=2, default=str))


def check_round_trip(out_dir: Path, example_input: torch.Tensor, rtol: float = 1e-4, forms: tuple[str, ...] = ("program",)) -> float:
    """Reload the module and each of ``forms`` and return their largest output difference.

    The program is the module after the inference rewrites, so the two agree up to rounding;
    so does the ONNX model, run with ONNX Runtime's graph optimisation off (:func:`deploy._onnx.check_onnx`).

    Raises:
        AssertionError: A reloaded form differs from the module by more than
            ``rtol * max(1, max |output|)``.
    """
    module = load_form(out_dir, "module", example_input.device)
    with torch.no_grad():
        return max(
            check_onnx(module, Path(out_dir) / FORMS[form], example_input, rtol) if form == "onnx"
            else output_diff(module, load_form(out_dir, form, example_input.device), example_input, rtol, f"the exported {form} ({FORMS[form]}) against the saved module")
            for form in forms
        )


def cpp_compiler() -> str | None:
    """The C++ compiler AOTInductor would use (``$CXX``, else ``g++``, ``c++`` or ``clang++``), or None."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def compile_program(out_dir: Path, device: str | torch.device = "cpu") -> Path:
    """Compile the program of ``out_dir`` ahead of time for ``device`` into ``model_compiled.pt2``.

    Called by ``slimtune export --compile``. AOTInductor
    (``torch._inductor.aoti_compile_and_package``) compiles the default program (``model.pt2``,
    moved to ``device``) into native code for that device, batch dimension still dynamic where
    the program's is; on CPU this takes tens of seconds to minutes and needs a C++ compiler.
    Load the package with :func:`load_compiled`. Packed quantized weights are unpacked by
    compiled kernels in every call (see :mod:`deploy._loading`), not folded as
    :func:`load_program` folds them.

    Raises:
        UserError: No C++ compiler is installed, or AOTInductor failed; the message says so and
            that the plain program ``model.pt2`` stays the deployable form.
    """
    out_dir = Path(out_dir)
    if cpp_compiler() is None:
        raise UserError(
            "compiling ahead of time needs a C++ compiler (AOTInductor builds native code), and none was found "
            "($CXX, g++, c++, clang++); install one (Debian: apt-get install g++) or deploy the plain program model.pt2."
        )
    device = torch.device(device)
    program = load_exported(out_dir, device)
    target = out_dir / FORMS["compiled"]
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=str(target))
    except Exception as exc:  # noqa: BLE001  a compiler or AOTInductor failure is reported, the plain program kept
        target.unlink(missing_ok=True)
        raise UserError(
            f"AOTInductor could not compile the program for {device}: {str(exc).strip().splitlines()[0][:300]}; "
            "the plain program model.pt2 is the deployable form."
        ) from None
    return target


def deployed_latency(model: nn.Module, out_dir: Path, example_input: torch.Tensor, repeats: int, threads: int) -> dict[str, Any]:
    """``latency_ms`` of the default form exported in ``out_dir``, and what it was measured on.

    Called by the trial (and the baseline's measurement) after :func:`export_model`, and by
    ``slimtune profile``. Times :data:`DEFAULT_FORM` loaded as a deployment loads it, on
    ``example_input``'s device at ``threads`` CPU threads. A program that refuses the input's
    batch size (exported at a fixed one because of data-dependent shapes) is replaced by
    ``model`` itself, and ``latency_form`` says ``module``.
    """
    form, deployed = DEFAULT_FORM, load_form(out_dir, DEFAULT_FORM, example_input.device)
    try:
        with torch.no_grad():
            deployed(example_input)
    except Exception:  # noqa: BLE001  a program exported at a fixed batch size refuses others
        form, deployed = "module", model
    return {
        "latency_ms": latency_ms(deployed, example_input, repeats=repeats, threads=threads),
        "latency_form": form,
        "latency_threads": float(threads),
        "latency_batch_size": float(example_input.shape[0]),
        "latency_device": example_input.device.type,
    }
