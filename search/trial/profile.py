"""``slimtune profile``: a model's costs at a task's input, optionally after one method, without a search.

The model is built as a search builds it (:func:`search.trial.context.build_model`) or, for the
tasks measured by input shape alone, from the shape and class count; ``--method`` prepares and
finalizes the method on the pre-flight's one-batch context without training, so the profile is
the architecture the method deploys. Measuring goes through :mod:`deploy`, as a trial's does.
"""

from __future__ import annotations

import copy
import inspect
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deploy import FORMS, LATENCY_RUNTIMES, count_flops, count_params, deployed_latency, export_model, latency_ms, load_form, size_bytes
from errors import UserError
from errors.user_code import name_from_command_line
from methods import NotApplicable, create_method
from models import create_model, list_models
from search.space.spec import Budget, SearchSpace
from search.trial.context import build_model, first_batch, load_task, one_batch_context
from tasks.sr import SCALES, sr

__all__ = ["profiled_model", "profile"]


def _refuse_task_decided(model_options: dict[str, Any], decided: list[str], task: str) -> None:
    """Refuse a ``--model-option`` that the task sets itself (its classes, input channels, ...)."""
    clash = sorted(set(model_options) & set(decided))
    if clash:
        raise UserError(
            f"--model-option {', '.join(clash)}: task {task} decides {', '.join(sorted(decided))} for the model; drop that option."
        )


def profiled_model(
    model: str,
    task: str | None,
    options: dict[str, dict[str, Any]],
    shapes: dict[str, tuple[tuple[int, int, int], int]],
    scale: int | None = None,
    method: str | None = None,
) -> tuple[str, tuple[int, ...], nn.Module]:
    """The task ``profile`` measures at, the input shape of one sample and the model built for it.

    ``options`` holds the parsed ``--task-option``, ``--model-option`` and ``--method-option``
    pairs under ``"task"``, ``"model"`` and ``"method"``; ``shapes`` the tasks measured by input
    shape alone, each with its input shape and class count.

    Without ``task``: ``digits*`` models at digits, other registered classifiers at CIFAR-10,
    registered super-resolution models at sr, torchvision models at ImageNet. The tasks of
    ``shapes`` and sr are measured by input shape alone, without their data, unless task
    options or a method are given; every other task is built as a search builds it.
    """
    model_options = options["model"]
    # Your own code as `file.py:attr` or `import:REF`, resolved as a space's `import:` is.
    model = name_from_command_line(model, Path.cwd())
    task = None if task is None else name_from_command_line(task, Path.cwd())
    if task is None:
        if model.startswith("digits"):
            task = "digits"
        elif model not in list_models():
            task = "imagenet"
        else:
            try:
                # A classifier is refused before it is built (it needs num_classes).
                create_model(model, num_classes=None)
                task = "sr"
            except UserError:
                task = "cifar10"
    if scale is not None and task != "sr":
        raise UserError(f"--scale applies to super-resolution models (--task sr), but the task is {task}; drop --scale.")
    if task not in [*shapes, "sr"] or options["task"] or method is not None:
        if scale is not None:
            raise UserError(
                "--scale sets the shape-only sr profile, but with --task-option or --method the sr task is built; use --task-option scale=N."
            )
        return _task_model(model, task, options, method)
    if task != "sr":
        shape, classes = shapes[task]
        _refuse_task_decided(model_options, ["num_classes", "in_channels"], task)
        return task, shape, create_model(model, num_classes=classes, in_channels=shape[0], **model_options).eval()
    scale = 2 if scale is None else scale
    if scale not in SCALES:
        raise UserError(f"--scale must be one of {', '.join(map(str, SCALES))}, but got {scale}.")
    # The size a search's trials measure at with the sr task's defaults: the LR side of a training patch.
    lr_side = inspect.signature(sr).parameters["patch_size"].default // scale
    _refuse_task_decided(model_options, ["num_classes", "in_channels", "scale"], task)
    shape = (3, lr_side, lr_side)
    return task, shape, create_model(model, num_classes=None, in_channels=3, scale=scale, **model_options).eval()


def _task_model(
    model_name: str, task_name: str, options: dict[str, dict[str, Any]], method_name: str | None
) -> tuple[str, tuple[int, ...], nn.Module]:
    """The task loaded and the model built as a search builds them, then the method prepared and finalized.

    The method sees the pre-flight's one-batch context (:func:`search.trial.context.one_batch_context`)
    and is not trained: the profile is the architecture the method deploys.
    """
    space = SearchSpace(
        name="profile", task=task_name, task_options=options["task"], model=model_name, model_options=options["model"],
        baseline_epochs=0, baseline_checkpoint=None, methods=(), objectives=(), constraints=(), budget=Budget(),
    )  # fmt: skip
    task = load_task(space)
    _refuse_task_decided(options["model"], list(task.model_kwargs()), task_name)
    model = build_model(space, task).eval()
    if method_name is not None:
        try:
            method = create_method(method_name, options["method"])
        except (UserError, ValueError) as exc:
            raise UserError(f"--method {method_name}: {exc}") from None
        ctx = one_batch_context(space, task, copy.deepcopy(model), first_batch(space, task))
        try:
            model = method.prepare(model, ctx)
        except NotApplicable as exc:
            raise UserError(f"--method {method_name} does not apply to {model_name} on {task_name}: {exc}") from None
        model = method.finalize(model, ctx).eval()
    return task_name, tuple(task.input_shape), model


def profile(
    model_name: str, task: str, shape: tuple[int, ...], model: nn.Module, batch_size: int, threads: int, form: str
) -> dict[str, Any]:
    """Count and time ``model`` at one sample of ``shape``; latency at ``batch_size`` on ``threads``.

    ``form`` ``program`` exports the model (the ONNX form too) and times every form side by side
    (``forms``: each one's ``latency_ms`` and ``artifact_bytes``), the program as a trial times
    it; ``module`` times the module itself, without exporting.

    Raises:
        UserError: The model does not accept the task's input.
    """
    example = torch.zeros(1, *shape)
    try:
        with torch.no_grad():
            model(example)
    except Exception as exc:  # noqa: BLE001  any failure here means the model does not fit the task
        raise UserError(
            f"{model_name} does not accept task '{task}' input of shape {(1, *shape)} ({type(exc).__name__}: {' '.join(str(exc).split())[:300]}). "
            "Choose the task the model is made for with --task (e.g. adding or seq_digits for gru and lstm), or --model-option / --task-option to fit them."
        ) from None
    flops = count_flops(model, example)
    x = torch.zeros(batch_size, *shape)
    if form == "program":  # timed as a trial times it, beside the other forms
        with tempfile.TemporaryDirectory() as tmp:
            sizes = export_model(model, example, Path(tmp), onnx=True)
            # The runtimes' forms as a trial times them (a form refusing the batch is one error line), the module as it is.
            timed = {
                form: deployed_latency(Path(tmp), x, repeats=20, threads=threads, runtime=runtime)["latency_ms"]
                for runtime, form in LATENCY_RUNTIMES.items()
            }
            timed["module"] = latency_ms(load_form(Path(tmp), "module"), x, repeats=20, threads=threads)
            forms = {name: {"latency_ms": timed[name], "artifact_bytes": sizes[FORMS[name]]} for name in ("program", "module", "onnx")}
    else:
        forms = {"module": {"latency_ms": latency_ms(model, x, repeats=20, threads=threads), "artifact_bytes": None}}
    return {
        "params": count_params(model),
        "macs": flops.macs,
        "flops": flops.flops,
        "bops": flops.bops,
        "size_bytes": size_bytes(model),
        "artifact_bytes": forms[form]["artifact_bytes"],
        "latency_ms": forms[form]["latency_ms"],
        "latency_form": form,
        "forms": forms,
        "uncounted_ops": list(flops.uncounted_ops),
    }
