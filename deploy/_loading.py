"""Load back the deployable forms that an export directory holds (:mod:`deploy._export`).

Each form is a file of the directory (:data:`FORMS`) and :func:`load_form` loads any of them by
name; a new form adds its file to :data:`FORMS` and its loader to :func:`load_form`.

Packed quantized layers (:mod:`methods._quant`) are stored in ``model.pt2`` as their integer
codes and one scale, so their bytes shrink with the bit width; the program's graph turns them back
into float weights (casts, and below 8 bits shifts and masks) before each convolution:

- ``torch.export.load(path).module()`` runs that unpacking in every call;
- :func:`load_program`, what trials time and ``slimtune export`` reports, runs it once, at load
  (:func:`fold_weight_computations`), so each call runs only what depends on the input;
- the compiled form (AOTInductor, PyTorch 2.14) does not fold it: the unpacking is compiled into
  kernels that run in every call, fused with the activations' quantization (also with
  ``aot_inductor.use_runtime_constant_folding``, whose constant folder leaves the ``arange`` of
  the shifts, and so the shifts, in the per-call graph; ``freezing`` does not change the AOT
  kernels).

An activation quantizer's clamp and round (``pams``, ``minmax_quant``'s inputs) stay in every
call in all forms: they are the float emulation of integer activations and depend on the input.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from torch.export.passes import move_to_device_pass

from deploy._onnx import load_onnx
from deploy._rewrites import fold_weight_computations

__all__ = [
    "FORMS",
    "DEFAULT_FORM",
    "load_exported",
    "load_program",
    "load_module",
    "load_compiled",
    "load_form",
    "storage_groups_quiet",
]

#: Each deployable form and its file: the default ``program``, the eager ``module`` and the
#: optional ahead-of-time ``compiled`` package, and ``onnx`` for ONNX Runtime (:mod:`deploy._onnx`).
FORMS = {"program": "model.pt2", "module": "model.pt", "compiled": "model_compiled.pt2", "onnx": "model.onnx"}

#: The form ``export_model`` always writes, that trials time and users are told to deploy.
DEFAULT_FORM = "program"


@contextlib.contextmanager
def storage_groups_quiet() -> Iterator[None]:
    """Silence torch.export's save/load warning "No complete tensor found in the group".

    torch.export.save and load look for a contiguous tensor covering each storage and warn when
    there is none. A channels-last weight (:func:`inference_copy`, CPU only) covers its whole
    storage but is not contiguous, so every CPU program warned; the storage is saved and
    restored through that weight itself, whole, which loses nothing.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No complete tensor found in the group")
        yield


def load_exported(out_dir: Path, device: str | torch.device | None = None) -> torch.export.ExportedProgram:
    """The ``torch.export`` program ``model.pt2`` in ``out_dir`` as saved, moved to ``device`` (None: where it was exported).

    Every load of the program goes through here (:func:`load_program`, :func:`compile_program`,
    the MLflow model log), without torch's storage-group warning (:func:`storage_groups_quiet`).
    """
    with storage_groups_quiet():
        program = torch.export.load(Path(out_dir) / FORMS["program"])
    if device is not None:
        program = move_to_device_pass(program, str(torch.device(device)))
    return program


def load_program(out_dir: Path, device: str | torch.device | None = None) -> nn.Module:
    """The exported program as a callable module, moved to ``device`` (None: where it was exported),
    its weight-only computations run once, here.

    Called by a trial to time ``latency_ms`` and by ``slimtune export``. Moving uses
    ``torch.export.passes.move_to_device_pass``, so a program a CPU trial exported runs on a GPU
    too. Then :func:`fold_weight_computations` computes every part of the graph that reads only
    the program's own tensors, never the input: a packed quantized layer's weight is unpacked
    (shifts, masks, casts) and scaled once, at load, where ``torch.export.load(path).module()``
    unpacks it in every call. The file keeps the packed codes; what is computed per call is
    what depends on the input (the convolutions, and an activation quantizer's clamp and round,
    the float emulation of integer activations). A program with nothing to fold (an
    unquantized model) is returned as ``torch.export`` loads it.
    """
    module = load_exported(out_dir, device).module()
    fold_weight_computations(module)
    return module


def load_module(out_dir: Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """The pickled ``nn.Module`` (architecture and weights)."""
    return torch.load(Path(out_dir) / "model.pt", map_location=map_location, weights_only=False)


def load_compiled(out_dir: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """The compiled form (``model_compiled.pt2``, :func:`compile_program`) as a callable, on the device it was compiled for."""
    return torch._inductor.aoti_load_package(str(Path(out_dir) / FORMS["compiled"]))


def load_form(
    out_dir: Path, form: str, device: str | torch.device = "cpu", threads: int | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """One of :data:`FORMS` from ``out_dir``, ready to call on inputs on ``device``.

    ``threads``: the CPU threads of an ONNX Runtime session (``onnx``; None: all cores), set
    when the session is made; the torch forms take theirs from :func:`deploy.latency_ms`.
    """
    if form == "program":
        return load_program(out_dir, device)
    if form == "module":
        return load_module(out_dir, map_location=device).eval()
    if form == "compiled":
        return load_compiled(out_dir)
    if form == "onnx":
        if torch.device(device).type != "cpu":
            raise ValueError(f"the onnx form runs on ONNX Runtime's CPU provider here, but got device {device!r}.")
        return load_onnx(Path(out_dir) / FORMS["onnx"], threads)
    raise ValueError(f"form must be one of {', '.join(FORMS)}, but got {form!r}.")
