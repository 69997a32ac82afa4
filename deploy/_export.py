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
  (:mod:`search.trial.recipe`);
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

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deploy._latency import latency_ms, phase
from deploy._loading import CHECKSUMS, FORMS, load_exported, load_form, load_program, record_checksum, storage_groups_quiet
from deploy._modes import eval_mode
from deploy._onnx import check_onnx, export_onnx
from deploy._rewrites import InferenceRewrites, inference_copy, output_diff, probe_input, trace_program
from errors import UserError

__all__ = [
    "EXPORT_FILES",
    "export_program",
    "export_model",
    "export_and_load",
    "write_recipe",
    "check_round_trip",
    "cpp_compiler",
    "compile_program",
    "deployed_latency",
    "LATENCY_RUNTIMES",
    "DEFAULT_LATENCY_RUNTIME",
]

EXPORT_FILES = ("model.pt2", "model.pt", "state_dict.pt", "recipe.json", CHECKSUMS)


def export_program(
    model: nn.Module, example_input: torch.Tensor, channels_last: bool = True
) -> tuple[torch.export.ExportedProgram, InferenceRewrites]:
    """The default deployable form of ``model``: its :func:`inference_copy`, exported.

    The program has a dynamic batch dimension when the model allows it, and the example's fixed
    shape otherwise.
    """
    rewritten, rewrites = inference_copy(model, example_input, channels_last=channels_last)
    return trace_program(rewritten, example_input), rewrites


def export_model(
    model: nn.Module, example_input: torch.Tensor, out_dir: Path, recipe: dict[str, Any] | None = None, onnx: bool = False
) -> dict[str, int]:
    """Write the export files into ``out_dir`` and return each file's size in bytes (:func:`export_and_load`)."""
    return export_and_load(model, example_input, out_dir, recipe, onnx)[0]


def export_and_load(
    model: nn.Module, example_input: torch.Tensor, out_dir: Path, recipe: dict[str, Any] | None = None, onnx: bool = False
) -> tuple[dict[str, int], nn.Module]:
    """Write the export files into ``out_dir``; return each file's size in bytes and the program as loaded back.

    Called by the trial (and the baseline's measurement) once the model is final, which times
    the returned program (:func:`deployed_latency`): the close-out traces the model once, saves
    the program once and loads it once. ``model.pt2``
    is :func:`export_program`'s program, reloaded from the file (:func:`load_program`) and checked against ``model``
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
        with phase("close-out: export"):
            rewritten, rewrites = inference_copy(model, example_input, channels_last=channels_last)
            program = trace_program(rewritten, example_input)
            with storage_groups_quiet():
                torch.export.save(program, out_dir / FORMS["program"])
        layout = ", channels last" if rewrites.channels_last else ""
        try:
            with phase("close-out: round-trip check"), eval_mode(model), torch.no_grad():
                loaded = load_program(out_dir)
                output_diff(
                    model,
                    loaded,
                    probe_input(example_input),
                    1e-4,
                    f"the reloaded program (batch norms folded, dropout removed{layout})",
                )
            break
        except AssertionError:
            if not rewrites.channels_last:
                raise
    files = list(EXPORT_FILES)
    if onnx:
        with phase("close-out: onnx"):
            export_onnx(model, example_input, out_dir / FORMS["onnx"], rewritten)
            check_onnx(model, out_dir / FORMS["onnx"], probe_input(example_input))
        files.append(FORMS["onnx"])
    with phase("close-out: files"):
        torch.save(model, out_dir / "model.pt")
        record_checksum(out_dir / "model.pt")
        torch.save(model.state_dict(), out_dir / "state_dict.pt")
        write_recipe(out_dir, recipe or {})
    return {name: (out_dir / name).stat().st_size for name in files}, loaded


def write_recipe(out_dir: Path, recipe: dict[str, Any]) -> None:
    """Write ``recipe`` as ``out_dir/recipe.json`` (see :mod:`search.trial.recipe` for a trial's)."""
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
            check_onnx(module, Path(out_dir) / FORMS[form], example_input, rtol)
            if form == "onnx"
            else output_diff(
                module,
                load_form(out_dir, form, example_input.device),
                example_input,
                rtol,
                f"the exported {form} ({FORMS[form]}) against the saved module",
            )
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


#: What ``measure.latency_runtime`` may name, and the form of :data:`FORMS` each times:
#: ``program``, the ``torch.export`` program in torch (:func:`load_program`); ``onnxruntime``,
#: ``model.onnx`` in an ONNX Runtime CPU session at the trial's threads (:func:`deploy.load_onnx`).
#: The ``compiled`` form is not offered: AOTInductor takes tens of seconds to minutes per model
#: (:func:`compile_program`), more than most trials train.
LATENCY_RUNTIMES = {"program": "program", "onnxruntime": "onnx"}

#: The default runtime. On this 2-core machine ONNX Runtime ran digits_cnn 7x and ResNet-20
#: 3.7x faster than the program at batch 1 (1 thread, ``bench/deploy_speed.py``), but writing
#: ``model.onnx`` (the dynamo exporter) adds 2 to 15 s to every trial and baseline, so the program
#: stays the default and ``onnxruntime`` is asked for where it is deployed.
DEFAULT_LATENCY_RUNTIME = "program"


def deployed_latency(
    out_dir: Path,
    example_input: torch.Tensor,
    repeats: int,
    threads: int,
    runtime: str = DEFAULT_LATENCY_RUNTIME,
    loaded: Callable[[torch.Tensor], Any] | None = None,
) -> dict[str, Any]:
    """``latency_ms`` of the form ``runtime`` runs (:data:`LATENCY_RUNTIMES`) in ``out_dir``, and what it was measured on.

    Called by the trial (and the baseline's measurement) after :func:`export_model` (with
    ``onnx=True`` for ``onnxruntime``), and by ``slimtune profile``. Times the form loaded as a
    deployment loads it, on ``example_input``'s device at ``threads`` CPU threads (torch's, or
    the ONNX Runtime session's). A form is never swapped for another: a baseline and a trial
    timed on different forms would not compare. ``loaded``: that form already loaded from
    ``out_dir`` (the program :func:`export_and_load` returns), timed instead of loading it again.
    ``repeats`` is :func:`deploy.latency_ms`'s most timed passes (``measure.latency_repeats``).

    Raises:
        UserError: The form refuses the input's batch size (a model with data-dependent shapes
            exports at a fixed batch size only); the message names ``measure.latency_batch_size``.
    """
    if runtime not in LATENCY_RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(LATENCY_RUNTIMES)}, but got {runtime!r}.")
    form = LATENCY_RUNTIMES[runtime]
    deployed = loaded if loaded is not None else load_form(out_dir, form, example_input.device, threads=threads)
    batch = example_input.shape[0]
    try:
        with torch.no_grad():
            deployed(example_input)
    except Exception as exc:  # noqa: BLE001  a form exported at a fixed batch size refuses others
        raise UserError(
            f"measure.latency_batch_size: the exported {form} ({FORMS[form]}) runs only at the batch size it was exported at "
            f"(the model's shapes depend on the data), not at {batch} ({type(exc).__name__}); set measure.latency_batch_size: 1 "
            "so that the baseline and every trial are timed on the same form."
        ) from None
    return {
        "latency_ms": latency_ms(deployed, example_input, repeats=repeats, threads=threads),
        "latency_form": form,
        "latency_threads": float(threads),
        "latency_batch_size": float(batch),
        "latency_device": example_input.device.type,
    }
