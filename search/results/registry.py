"""A trial's exported model as an MLflow logged model, and in the MLflow Model Registry.

The logged model is the exported program (``model.pt2``: folded and rewritten exactly as
``slimtune export`` writes it) in MLflow's ``pytorch`` flavour with ``serialization_format="pt2"``,
an input example (zeros of the traced input's shape, batch 2 so the batch dimension stays
dynamic) and the signature inferred from it. It is linked to the trial's run, so the MLflow UI
shows it on the run and can register it. ``mlflow.pytorch.load_model`` gives the program back as
a module, without slimtune and without unpickling.

:func:`log_trial_model` is called at the end of a search (and of each resume) for every Pareto
trial, and by ``slimtune export --register`` for a picked trial that has none yet; a trial is
logged once: a trial whose run already has a logged model named ``program`` is not logged again.

Where the trial's export folder holds ``model.onnx`` (a search timed on ONNX Runtime,
``measure.latency_runtime: onnxruntime``, writes it for every trial; ``slimtune export`` writes it
for the pick), the ONNX model is logged beside the program as a second logged model of the run,
named ``onnx``, in MLflow's ``onnx`` flavour (``mlflow.onnx``: same input example and signature;
``mlflow.pyfunc.load_model`` runs it in ONNX Runtime, ``mlflow.onnx.load_model`` gives the
``onnx.ModelProto``). With the default ``program`` runtime a trial writes no ONNX (the exporter
takes seconds per model), so a Pareto trial's ONNX is logged when ``slimtune export --register``
hands it off.
The name is not ``model``: MLflow 3 resolves ``runs:/RUN/NAME`` to a run's logged model of that
name, which would shadow the exported files the run keeps under its artifact folder ``model/``.

MLflow and ONNX are imported inside the functions that use them: 0.7 s for MLflow and 0.5 s more
for ONNX, which every search's driver would pay as it starts (it imports this module) for models
it logs only at its end.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from deploy import FORMS, load_exported, storage_groups_quiet
from errors import UserError

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

    from search.results.record import SearchRecord, TrialRecord

__all__ = ["MODEL_NAME", "ONNX_MODEL_NAME", "logged_model_ids", "log_trial_model", "register_trial", "load_registered"]

#: Name of a trial's logged model (one per trial run).
MODEL_NAME = "program"
#: Name of a trial's logged ONNX model, beside the program, when its export folder holds one.
ONNX_MODEL_NAME = "onnx"


@contextlib.contextmanager
def _tracking(tracking_uri: str) -> Iterator[None]:
    """MLflow's fluent API (``log_model``, ``load_model``) pointed at ``tracking_uri`` for the block."""
    # MLflow and ONNX are imported where used (module docstring)
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


@contextlib.contextmanager
def _logger_at(name: str, level: int) -> Iterator[None]:
    """The logger ``name`` at ``level`` for the block."""
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _logged_models(record: SearchRecord, filter_string: str):
    """Every logged model of the search's experiment that ``filter_string`` selects, page by page."""
    tracker = record.tracker()
    token = None
    while True:
        page = tracker.client.search_logged_models([tracker.experiment_id], filter_string=filter_string, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def logged_model_ids(record: SearchRecord, name: str = MODEL_NAME) -> dict[str, str]:
    """Run id -> id of the logged model called ``name`` of every trial run of the search that has one.

    Only models MLflow finished writing count (``READY``): one a killed driver left half written
    (``PENDING``) is deleted, so that the close-out logs the model again.
    """
    ids: dict[str, str] = {}
    for model in _logged_models(record, f"name = '{name}'"):
        if model.source_run_id and _ready(record, model):
            ids.setdefault(model.source_run_id, model.model_id)
    return ids


def _run_logged_models(record: SearchRecord, run_id: str) -> dict[str, str]:
    """Name -> id of the logged models of the run ``run_id`` (its program, its ONNX model), in one search; ``READY`` ones only."""
    found: dict[str, str] = {}
    for model in _logged_models(record, f"source_run_id = '{run_id}'"):
        if _ready(record, model):
            found.setdefault(model.name, model.model_id)
    return found


def _ready(record: SearchRecord, model) -> bool:
    """Whether MLflow finished writing ``model``; one it did not (its writer was killed) is deleted."""
    from mlflow.entities import LoggedModelStatus  # MLflow takes 1.5 s to import; pareto and report read runs.json without it

    if model.status == LoggedModelStatus.READY:
        return True
    record.tracker().client.delete_logged_model(model.model_id)
    return False


def log_trial_model(record: SearchRecord, trial: TrialRecord, model_dir: Path, with_program: bool = True) -> str | None:
    """Log the exported program in ``model_dir`` as the logged model of ``trial``'s run, and its
    ``model.onnx`` beside it when the folder has one; return the program's logged model id.

    Called for each Pareto trial when a search finishes, and by ``export --register``
    (``with_program=False`` when the run has its program logged already: then only the ONNX model
    is logged, and None returned). The run's status and end time are kept as they were (MLflow
    reopens the run to attach the model).
    """
    # MLflow and ONNX are imported where used (module docstring)
    import mlflow
    import mlflow.onnx  # as mlflow
    import onnx  # as mlflow
    import onnxruntime  # as mlflow
    from mlflow.models import infer_signature  # as mlflow

    if not trial.run_id:
        raise UserError(f"{trial.name} of '{record.name}' has no MLflow run in {record.folder / 'runs.json'}; its model cannot be logged.")

    program = load_exported(model_dir)
    traced, _ = program.example_inputs
    example = torch.zeros_like(traced[0]).numpy()  # the traced input's shape and dtype (batch 2 when dynamic)
    module = program.module()
    with torch.no_grad():
        output = module(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, output)
    tags = {"slimtune.search": record.name, "slimtune.trial": trial.name, "slimtune.pipeline": trial.pipeline}
    onnx_file = model_dir / FORMS["onnx"]
    client = record.tracker().client
    ended = client.get_run(trial.run_id).info
    model_id = None
    # Logging reopens the run; it ends as it was, also when the logging fails or is interrupted
    # (MLflow's block would end it FAILED). MLflow saves the program (pt2) and loads it back to
    # check it: the same warning as our own save and load.
    try:
        with _tracking(record.tracking_uri), mlflow.start_run(run_id=trial.run_id, log_system_metrics=False), storage_groups_quiet():
            if with_program:
                model_id = mlflow.pytorch.log_model(
                    module,
                    name=MODEL_NAME,
                    serialization_format="pt2",
                    input_example=example,
                    signature=signature,
                    # The program needs torch alone; inferring requirements would load it in a subprocess.
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                    tags=tags,
                ).model_id
            if onnx_file.exists():
                # mlflow.onnx declares CUDA then CPU as the execution providers (a GPU server uses
                # CUDA); checking the input example here on a CPU build warns that CUDA is missing.
                with _logger_at("mlflow.onnx", logging.ERROR):
                    mlflow.onnx.log_model(
                        onnx.load(str(onnx_file)),
                        name=ONNX_MODEL_NAME,
                        input_example=example,
                        signature=signature,
                        pip_requirements=[f"onnxruntime=={onnxruntime.__version__}", f"onnx=={onnx.__version__}"],
                        tags=tags,
                    )
    finally:
        client.set_terminated(trial.run_id, status=ended.status, end_time=ended.end_time)
    return model_id


def register_trial(record: SearchRecord, trial: TrialRecord, model_dir: Path, name: str, alias: str | None) -> ModelVersion:
    """Register ``trial``'s logged model (logged now from ``model_dir`` if it has none) as a new version of ``name``.

    ``alias`` (when given) is moved to the new version: ``export --pick PICK`` passes the pick
    (``knee``, ``max-accuracy``, ``min-macs``: valid aliases as they are), so ``models:/NAME@knee``
    is the latest knee registered; ``export --run`` passes none, as a run id says which trial but
    not why it was chosen (load its version by number, ``models:/NAME/3``). The version carries the tags
    ``slimtune.search``, ``slimtune.trial`` and ``slimtune.pick`` and a description with the
    trial's pipeline and objectives.

    Raises:
        UserError: When the tracking store has no model registry or refuses the name or alias.
    """
    # MLflow and ONNX are imported where used (module docstring)
    from mlflow.exceptions import MlflowException

    client = record.tracker().client
    logged = _run_logged_models(record, trial.run_id) if trial.run_id else {}
    model_id = logged.get(MODEL_NAME)
    if model_id is None:
        model_id = log_trial_model(record, trial, model_dir)
    elif ONNX_MODEL_NAME not in logged and (model_dir / FORMS["onnx"]).exists():
        log_trial_model(record, trial, model_dir, with_program=False)  # the program was logged at the end of the search
    metrics = ", ".join(f"{m} {trial.metrics[m]:.6g}" for m in record.metric_names)
    # create_model_version resolves the models:/ source through MLflow's global tracking URI.
    with _tracking(record.tracking_uri):
        try:
            try:
                client.get_registered_model(name)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                client.create_registered_model(
                    name, description=f"Compressed models picked from slimtune searches (first: '{record.name}')."
                )
            version = client.create_model_version(
                name,
                source=f"models:/{model_id}",
                run_id=trial.run_id,
                model_id=model_id,
                tags={"slimtune.search": record.name, "slimtune.trial": trial.name, "slimtune.pick": alias or "run"},
                description=f"{trial.name} of '{record.name}': {trial.pipeline}; {metrics}",
            )
            if alias:
                client.set_registered_model_alias(name, alias, version.version)
        except MlflowException as exc:
            message = " ".join(str(exc.message).split())[:300]
            raise UserError(
                f"--register {name}: the MLflow store {record.tracking_uri} refused it ({exc.error_code}: {message}). "
                "The registry needs a database store (sqlite:///mlflow.db) or a server started with one; the export itself is written."
            ) from None
    return version


def load_registered(tracking_uri: str, uri: str):
    """``mlflow.pytorch.load_model(uri)`` against ``tracking_uri`` (``models:/NAME@alias``)."""
    # MLflow and ONNX are imported where used (module docstring)
    import mlflow

    with _tracking(tracking_uri):
        return mlflow.pytorch.load_model(uri)
