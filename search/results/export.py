"""``slimtune export``: one trial of a finished search copied out, checked, timed and optionally registered.

The trial's exported model (its checkpoint's ``model`` folder: :mod:`deploy`'s export
directory) is copied into the output folder; every deployable form found there is checked
against the module and timed at the trial's batch and threads, and the recipe records where it
came from and what each form costs (``export_latency``, ``export_bytes``). The ONNX form is
written here from the trial's module when the trial did not write it (only trials timed with
``measure.latency_runtime: onnxruntime`` write it), unless a method of its pipeline
declares that its models cannot be exported to ONNX (``Method.onnx_unsupported``).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from deploy import (
    FORMS,
    LATENCY_RUNTIMES,
    check_round_trip,
    compile_program,
    export_onnx,
    latency_ms,
    load_form,
    load_module,
    load_program,
    write_recipe,
)
from errors import UserError
from errors.user_code import is_object, user_object
from methods import get_method
from search.results.ranking import pick_record
from search.results.record import SearchRecord, TrialRecord, exported_model_dir
from search.results.registry import load_registered, register_trial
from search.trial.context import import_user_code, load_task, trial_threads

__all__ = ["chosen_trial", "write_export", "register_export"]


def chosen_trial(record: SearchRecord, records: list[TrialRecord], run: str | None, pick: str | None) -> TrialRecord:
    """The trial whose MLflow run id starts with ``run``, or else the one ``pick`` picks (:func:`search.results.ranking.pick_record`)."""
    if not run:
        return pick_record(record, records, pick)
    matches = [r for r in records if r.run_id and r.run_id.startswith(run)]
    if len(matches) != 1:
        known = ", ".join(r.run_id[:12] for r in records if r.run_id)
        raise UserError(
            f"--run {run}: {'no' if not matches else 'more than one'} completed trial of '{record.name}' has that run id. Run ids: {known}."
        )
    return matches[0]


def write_export(
    record: SearchRecord,
    chosen: TrialRecord,
    out: Path,
    device: torch.device,
    batch_size: int | None = None,
    threads: int | None = None,
    compile: bool = False,
    log: Callable[[str], None] = print,
    forms: tuple[str, ...] | None = None,
) -> torch.Tensor:
    """Copy ``chosen``'s exported model into ``out``, check and time its forms, and say so through ``log``.

    ``batch_size`` and ``threads`` default to those the trial's ``latency_ms`` was timed at;
    ``compile`` adds the ahead-of-time compiled form (a failure to compile is a warning).
    ``forms`` limits the checked and timed forms to some of ``program``, ``module``, ``onnx``
    (default: all three); ``program`` alone needs none of the user's code, so it exports a
    search whose model or task was a Python object that this process does not have.

    Returns:
        An example input of the task (batch 2), for checks of the exported model.
    """
    with exported_model_dir(chosen.checkpoint) as source:
        if source is None:
            raise UserError(
                f"the exported model of {chosen.name} is missing (checkpoint {chosen.checkpoint}); it was deleted or its storage is not reachable from here."
            )
        shutil.copytree(source, out, dirs_exist_ok=True)
    space = record.space
    wanted = set(forms or ("program", "module", "onnx"))
    example_input = _example_input(space, out)
    if "module" in wanted or ("onnx" in wanted and not (out / FORMS["onnx"]).exists()):
        # The pickled module (model.pt) loads only with the model's code.
        import_user_code(space)
    forms = [form for form in ("program", "module") if form in wanted]
    onnx_refused = [
        f"{step['name']}: {get_method(step['name']).onnx_unsupported}"
        for step in chosen.recipe
        if get_method(step["name"]).onnx_unsupported
    ]
    if "onnx" not in wanted:
        pass
    elif onnx_refused:
        print(f"slimtune: warning: no ONNX form ({'; '.join(onnx_refused)})", file=sys.stderr)
    else:
        # A trial writes model.onnx only when timed on it (measure.latency_runtime: onnxruntime); else it is written here.
        if not (out / FORMS["onnx"]).exists():
            export_onnx(load_module(out), example_input(1), out / FORMS["onnx"])
        forms.append("onnx")
    if compile:
        log(f"compiling the program ahead of time for {device} (AOTInductor; this takes a while) ...")
        try:
            compile_program(out, device)
            forms.append("compiled")
        except UserError as exc:
            print(f"slimtune: warning: {exc}", file=sys.stderr)
    # The module (and so the model's code) is loaded only for a form that needs it; the trial
    # checked its program against the module when it exported it.
    uses_module = "module" in forms or "onnx" in forms
    diff = check_round_trip(out, example_input(2).to(device), forms=tuple(f for f in forms if f != "module")) if uses_module else None
    # The same batch and threads as the trial's latency_ms, unless asked otherwise.
    batch = batch_size or int(chosen.metrics.get("latency_batch_size", space.latency_batch_size))
    threads = threads or int(chosen.metrics.get("latency_threads", trial_threads(space)))
    x = example_input(batch).to(device)
    latency = {
        form: latency_ms(load_form(out, form, device, threads=threads), x, repeats=space.latency_repeats, threads=threads) for form in forms
    }
    # The trial wrote its own recipe and metrics; say where it came from and what the forms cost.
    recipe = json.loads((out / "recipe.json").read_text())
    recipe.update({
        "search": record.name, "trial": chosen.name, "mlflow_run_id": chosen.run_id,
        "export_latency": {"device": device.type, "threads": threads, "batch_size": batch, "repeats": space.latency_repeats, "ms": latency},
        "export_bytes": {form: (out / FORMS[form]).stat().st_size for form in forms},
    })  # fmt: skip
    write_recipe(out, recipe)
    log(f"exported {chosen.name} ({chosen.pipeline}) of '{record.name}' to {out}")
    log("  " + "  ".join(f"{m} {chosen.metrics[m]:.6g}" for m in space.metric_names))
    checked = [f for f in forms if f != "module"]
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    if diff is None:
        log(f"  files: {files}; the program was checked against the module when the trial exported it")
    else:
        log(
            f"  files: {files}; reloaded {' and '.join(checked)} {'matches' if len(checked) == 1 else 'match'} the module (max diff {diff:.2g})"
        )
    log(
        f"  latency, median of up to {space.latency_repeats} (until stable) at batch {batch}, {threads} CPU thread{'s' if threads != 1 else ''}, {device.type}:"
    )
    # The form the trial's latency_ms timed (measure.latency_runtime), at the same batch and threads.
    timed = chosen.metrics.get("latency_form", LATENCY_RUNTIMES[space.latency_runtime])
    for form in forms:
        note = f" (what the trial's latency_ms timed, measure.latency_runtime: {space.latency_runtime})" if form == timed else ""
        log(f"    {form:<9} {FORMS[form]:<19} {latency[form]:9.3f} ms {(out / FORMS[form]).stat().st_size:>12,} bytes{note}")
    log(f"  run with: torch.export.load('{out / FORMS['program']}').module()(x)  (already in eval mode; it has no .eval())")
    if "compiled" in forms:
        log(f"        or: torch._inductor.aoti_load_package('{out / FORMS['compiled']}')(x)  (compiled for {device.type})")
    return example_input(2)


def _example_input(space, out: Path) -> Callable[[int], torch.Tensor]:
    """The task's example input by batch size; for a task object this process lacks, zeros of the shape the trial recorded (as ``Task.example_input``)."""
    if is_object(space.task) and user_object(space.task).payload is None:
        shape = json.loads((out / "recipe.json").read_text())["task"]["input_shape"]
        return lambda batch: torch.zeros(batch, *shape)
    return load_task(space).example_input


def register_export(
    record: SearchRecord,
    chosen: TrialRecord,
    out: Path,
    name: str,
    alias: str | None,
    example: torch.Tensor,
    log: Callable[[str], None] = print,
) -> None:
    """A new registry version ``name`` of the exported trial (with ``alias``), checked by loading it back."""
    version = register_trial(record, chosen, out, name, alias)
    uri = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version.version}"
    with torch.no_grad():
        diff = (load_registered(record.tracking_uri, uri)(example) - load_program(out)(example)).abs().max().item()
    if diff > 1e-5:
        raise AssertionError(f"{uri} differs from the exported program by {diff:.3g} (> 1e-5).")
    log(f"registered as {name} version {version.version}" + (f" with alias @{alias}" if alias else " (no alias: picked by --run)"))
    log(
        f"  load with: mlflow.pytorch.load_model('{uri}')  (tracking URI {record.tracking_uri}); it matches the export (max diff {diff:.2g})"
    )
