"""Run a search: baseline once, trials through Ray Tune + Optuna, MLflow from the driver, Pareto.

Layout of a search's results folder (``<results_dir>/<name>/``):

- ``search.json``: the manifest (space text, tracking URI, Optuna storage, parent run, baseline);
- ``baseline.pt``: the uncompressed model's weights, trained once, shared by every trial;
- ``runs.json``: Tune trial id -> MLflow run id, status and final checkpoint;
- ``tune/``: Tune's experiment (trial checkpoints; the final one holds the exported model).

The Optuna study (SQLite beside the MLflow store by default) is the source of truth for which
configurations ran and what they scored.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from search import pareto
from errors import UserError
from search.space import COST_METRICS, SearchSpace, load_space, parse_space, metrics_of_task
from tasks import task_metrics
from search.tracking import SearchTracker
from search.trial import TrialSpec, run_trial, train_baseline

__all__ = [
    "run_search",
    "resume_search",
    "SearchRecord",
    "load_search",
    "TrialRecord",
    "pareto_table",
    "format_table",
]


# ----------------------------------------------------------------------------------------------
# Where things are.
# ----------------------------------------------------------------------------------------------


def default_optuna_storage(tracking_uri: str, results_dir: Path) -> str:
    """A SQLite file beside the MLflow store (or in the results folder for a remote MLflow)."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        return f"sqlite:///{db.parent / 'optuna.db'}"
    return f"sqlite:///{results_dir / 'optuna.db'}"


@dataclass
class SearchRecord:
    """A search as stored in its manifest."""

    name: str
    folder: Path
    space: SearchSpace
    tracking_uri: str
    optuna_storage: str
    parent_run_id: str | None
    baseline_metrics: dict[str, Any]

    @property
    def manifest(self) -> Path:
        return self.folder / "search.json"

    def save(self) -> None:
        data = {
            "name": self.name,
            "space_path": self.space.path,
            "space_yaml": self.space.source,
            "trials": self.space.budget.trials,
            "tracking_uri": self.tracking_uri,
            "optuna_storage": self.optuna_storage,
            "parent_run_id": self.parent_run_id,
            "baseline_metrics": self.baseline_metrics,
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        self.manifest.write_text(json.dumps(data, indent=1, default=str))

    def tracker(self) -> SearchTracker:
        return SearchTracker(self.tracking_uri, self.name, self.folder)

    @property
    def checkpoint_storage(self) -> str:
        """Tune's storage: ``<output.checkpoint_storage>/<name>`` (shared path or URI) or the results folder."""
        if self.space.checkpoint_storage:
            return f"{self.space.checkpoint_storage.rstrip('/')}/{self.name}"
        return str(self.folder)


def load_search(name: str, results_dir: str | Path = "slimtune_results") -> SearchRecord:
    """Read a search's manifest; UserError naming the folders searched when it is missing."""
    folder = Path(results_dir).resolve() / name
    manifest = folder / "search.json"
    if not manifest.is_file():
        existing = sorted(p.parent.name for p in Path(results_dir).glob("*/search.json")) if Path(results_dir).is_dir() else []
        from errors import did_you_mean

        known = f" Searches in {results_dir}: {', '.join(existing)}." if existing else f" There are no searches in {results_dir!s}."
        raise UserError(f"no search named '{name}' ({manifest} does not exist).{did_you_mean(name, existing)}{known} Use --results-dir to look elsewhere.")
    data = json.loads(manifest.read_text())
    import yaml

    space = parse_space(yaml.safe_load(data["space_yaml"]), data.get("space_path") or "<stored space>", data["space_yaml"])
    space = space.with_overrides(budget=_budget_with_trials(space, data.get("trials", space.budget.trials)))
    return SearchRecord(
        name=data["name"],
        folder=folder,
        space=space,
        tracking_uri=data["tracking_uri"],
        optuna_storage=data["optuna_storage"],
        parent_run_id=data.get("parent_run_id"),
        baseline_metrics=data.get("baseline_metrics", {}),
    )


def _budget_with_trials(space: SearchSpace, trials: int):
    import dataclasses

    return dataclasses.replace(space.budget, trials=trials)


def _free_name(base: str, results_dir: Path) -> str:
    if not (results_dir / base / "search.json").exists():
        return base
    n = 2
    while (results_dir / f"{base}-{n}" / "search.json").exists():
        n += 1
    return f"{base}-{n}"


# ----------------------------------------------------------------------------------------------
# Records of completed trials, Pareto front, table.
# ----------------------------------------------------------------------------------------------


@dataclass
class TrialRecord:
    number: int
    trial_id: str
    run_id: str | None
    recipe: list[dict[str, Any]]
    metrics: dict[str, float]
    checkpoint: str | None
    rank: int = -1
    feasible: bool = True

    @property
    def name(self) -> str:
        return f"trial_{self.number:03d}"

    @property
    def pipeline(self) -> str:
        if not self.recipe:
            return "(baseline)"
        parts = []
        for step in self.recipe:
            params = ",".join(f"{k}={_short(v)}" for k, v in step["params"].items())
            parts.append(f"{step['name']}({params})")
        return " > ".join(parts)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def completed_records(record: SearchRecord) -> list[TrialRecord]:
    """Every completed trial of the search, from the Optuna study joined with the run map."""
    import optuna

    try:
        study = optuna.load_study(study_name=record.name, storage=record.optuna_storage)
    except KeyError:
        return []
    runs = record.tracker().runs()
    out = []
    for t in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE]):
        trial_id = t.user_attrs.get("tune_trial_id", "")
        run = runs.get(trial_id, {})
        out.append(
            TrialRecord(
                number=t.number,
                trial_id=trial_id,
                run_id=run.get("run_id"),
                recipe=json.loads(t.user_attrs.get("recipe", "[]")),
                metrics=dict(t.user_attrs.get("metrics", {})),
                checkpoint=run.get("checkpoint"),
            )
        )
    return out


def rank_records(space: SearchSpace, records: list[TrialRecord]) -> None:
    """Set ``rank`` and ``feasible`` on every record (rank 0 = Pareto-optimal and feasible)."""
    if not records:
        return
    points = [[r.metrics[m] for m in space.metric_names] for r in records]
    violations = [sum(c.violation(r.metrics) for c in space.constraints) for r in records]
    ranks = pareto.pareto_ranks(points, space.modes, violations if space.constraints else None)
    for r, rank, v in zip(records, ranks, violations):
        r.rank = rank
        r.feasible = v == 0
        if not r.feasible:
            r.rank = max(rank, 1)


def search_hypervolume(space: SearchSpace, records: list[TrialRecord], baseline: dict[str, float]) -> float:
    """Hypervolume of the feasible front with every objective divided by the baseline's value.

    Reference point: 0 for maximised metrics, 1.1 x the baseline for minimised ones (a model
    must cost less than 110% of the baseline to count); for a minimised metric whose baseline is
    0 (``accuracy_drop``) the reference is 1 in its own units. A minimised quality metric with a
    known score of a model that learns nothing (``reference_mse`` in the baseline's metrics:
    :attr:`tasks.Task.reference`) uses that score, as accuracy's reference is its worst value.
    """
    front = [r for r in records if r.rank == 0 and r.feasible]
    if not front:
        return 0.0
    scales, reference = [], []
    for objective in space.objectives:
        base = float(baseline.get(objective.metric, 0.0))
        scale = base if base > 0 else 1.0
        scales.append(scale)
        if objective.direction == "max":
            reference.append(0.0)
        elif f"reference_{objective.metric}" in baseline:
            reference.append(float(baseline[f"reference_{objective.metric}"]) / scale)
        else:
            reference.append(1.1 if base > 0 else 1.0)
    points = [[r.metrics[m] / s for m, s in zip(space.metric_names, scales)] for r in front]
    return pareto.hypervolume(points, space.modes, reference)


def pick_record(space: SearchSpace, records: list[TrialRecord], pick: str) -> TrialRecord:
    """Choose a Pareto trial: ``knee``, ``max-<metric>`` (``max-accuracy``) or ``min-<metric>``."""
    front = [r for r in records if r.rank == 0 and r.feasible]
    if not front:
        raise UserError("the search has no feasible Pareto-optimal trial yet; nothing to pick.")
    if pick == "knee":
        index = pareto.knee_index([[r.metrics[m] for m in space.metric_names] for r in front], space.modes)
        return front[index]
    match = re.fullmatch(r"(min|max)-([a-z_]+)", pick)
    if not match:
        raise UserError(f"--pick must be knee, max-accuracy or min-<objective> (e.g. min-macs), but got '{pick}'.")
    direction, metric = match.groups()
    if metric not in front[0].metrics:
        from errors import did_you_mean

        raise UserError(f"--pick {pick}: no metric '{metric}'.{did_you_mean(metric, front[0].metrics)}")
    key = (lambda r: r.metrics[metric]) if direction == "min" else (lambda r: -r.metrics[metric])
    return min(front, key=key)


def _fmt(metric: str, value: float) -> str:
    if metric in COST_METRICS and metric != "latency_ms":
        if abs(value) >= 1e6:
            return f"{value / 1e6:.3f}M"
        if abs(value) >= 1e3:
            return f"{value / 1e3:.1f}k"
        return f"{value:g}"
    if abs(value) <= 1.0:
        return f"{value:.4f}"
    return f"{value:.3f}"


def pareto_table(space: SearchSpace, records: list[TrialRecord], only_front: bool = True) -> list[dict[str, Any]]:
    rows = []
    for r in sorted(records, key=lambda r: (r.rank, r.number)):
        if only_front and not (r.rank == 0 and r.feasible):
            continue
        row = {"trial": r.name, "run_id": r.run_id, "rank": r.rank, "feasible": r.feasible, "pipeline": r.pipeline}
        for metric in metrics_of_task(space.task):
            if metric in r.metrics:
                row[metric] = r.metrics[metric]
        rows.append(row)
    return rows


def format_table(space: SearchSpace, rows: list[dict[str, Any]], baseline: dict[str, float] | None = None) -> str:
    headline = next(iter(metrics_of_task(space.task)))
    metrics = list(dict.fromkeys(space.metric_names + [headline, "macs", "params", "size_bytes"]))
    header = ["trial", "rank"] + metrics + ["run_id", "pipeline"]
    lines = []
    if baseline:
        lines.append(["baseline", "-"] + [_fmt(m, baseline[m]) if m in baseline else "-" for m in metrics] + ["-", "(uncompressed)"])
    for row in rows:
        lines.append(
            [row["trial"], str(row["rank"]) + ("" if row["feasible"] else "*")]
            + [_fmt(m, row[m]) if m in row else "-" for m in metrics]
            + [(row["run_id"] or "-")[:12], row["pipeline"]]
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    return "\n".join(out)


def print_progress(record: SearchRecord, name: str, result: dict[str, Any], finished: int) -> None:
    """One line per finished trial: its pipeline, objectives, and the front so far."""
    space = record.space
    records = completed_records(record)
    rank_records(space, records)
    front = [r for r in records if r.rank == 0 and r.feasible]
    hv = search_hypervolume(space, records, record.baseline_metrics)
    recipe = json.loads(result.get("recipe", "[]"))
    pipeline = TrialRecord(0, "", None, recipe, {}, None).pipeline
    shown = "  ".join(f"{m} {_fmt(m, result[m])}" for m in space.metric_names if m in result)
    print(
        f"[slimtune] {name} done ({finished}/{space.budget.trials})  {pipeline}  |  {shown}  |  front {len(front)}, hypervolume {hv:.4f}",
        flush=True,
    )


# ----------------------------------------------------------------------------------------------
# The search.
# ----------------------------------------------------------------------------------------------


def _init_ray(address: str | None) -> None:
    """Start a local Ray on 127.0.0.1, or connect to the cluster at ``address``."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = dict(
        include_dashboard=False,
        logging_level=logging.ERROR,
        log_to_driver=False,
        configure_logging=True,
    )
    # The trial code (this repository's packages) travels to every worker of a cluster.
    root = Path(__file__).resolve().parent.parent
    # Ray swaps a loopback address for the machine's network address unless its cluster mode is
    # off (the constant, for this already-imported driver). A local Ray and a cluster reached at a
    # loopback address (a multi-node cluster on one machine) must stay on 127.0.0.1.
    import ray._private.ray_constants as ray_constants

    if address:
        if address.split("://")[-1].split(":")[0] in ("127.0.0.1", "localhost"):
            ray_constants.ENABLE_RAY_CLUSTER = False
        kwargs["runtime_env"] = {"py_modules": [str(root / package) for package in ("errors", "models", "tasks", "methods", "search")]}
        ray.init(address=address, **kwargs)
    else:
        # The environment variable does the same for the workers and agents Ray starts.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
        ray.init(address="local", _node_ip_address="127.0.0.1", **kwargs)


def _quiet_logging() -> None:
    """Ray, Tune, MLflow and Optuna speak only on errors; slimtune prints its own progress."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Objectives arrive only with a trial's final result; per-epoch results carry val_* metrics.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "100000")
    for name in ("ray", "ray.tune", "ray.train", "ray.air", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def run_search(
    space_path: str | Path,
    name: str | None = None,
    trials: int | None = None,
    tracking_uri: str | None = None,
    address: str | None = None,
    results_dir: str | Path | None = None,
    log=print,
) -> SearchRecord:
    """Train the baseline, run every trial, write MLflow, print and return the search's record."""
    _quiet_logging()
    space = load_space(space_path)
    if trials is not None:
        space = space.with_overrides(budget=_budget_with_trials(space, trials))
    if tracking_uri is not None:
        space = space.with_overrides(tracking_uri=tracking_uri)
    root = Path(results_dir or space.results_dir).resolve()
    if name is None:
        name = _free_name(space.name, root)
    elif (root / name / "search.json").exists():
        raise UserError(f"a search named '{name}' already exists in {root}. Continue it with `slimtune resume {name}` or choose another --name.")
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    tracking = _absolute_sqlite(space.tracking_uri)
    record = SearchRecord(
        name=name,
        folder=folder,
        space=space,
        tracking_uri=tracking,
        optuna_storage=space.optuna_storage or default_optuna_storage(tracking, folder),
        parent_run_id=None,
        baseline_metrics={},
    )
    log(f"[slimtune] search '{name}': {space.task} / {space.model}, {space.budget.trials} trials, objectives {', '.join(f'{o.metric} ({o.direction})' for o in space.objectives)}")
    log(f"[slimtune] results in {folder}; MLflow at {tracking}")
    _init_ray(address)
    try:
        baseline_state, baseline_metrics = _baseline(space, address, log)
        torch.save(baseline_state, folder / "baseline.pt")
        record.baseline_metrics = baseline_metrics
        shown = [*task_metrics(space.task), "macs", "params", "size_bytes", "latency_ms"]
        log("[slimtune] baseline: " + "  ".join(f"{m} {_fmt(m, baseline_metrics[m])}" for m in shown if m in baseline_metrics))
        tracker = record.tracker()
        record.parent_run_id = tracker.start_parent(space.source, space.name, baseline_metrics, {"space": space.path, "task": space.task, "model": space.model, "trials": str(space.budget.trials), "sampler": space.sampler})
        record.save()
        _tune(record, restore=False)
    finally:
        _shutdown_ray()
    return finish_search(record, log)


def _baseline(space: SearchSpace, address: str | None, log) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train the baseline here (local Ray) or as one Ray task with a trial's resources (cluster)."""
    if address is None:
        model, metrics = train_baseline(space, _driver_device(space), log=lambda m: log(f"[slimtune] {m}"))
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}, metrics
    import ray

    from search.trial import train_baseline_task

    log(f"[slimtune] training the baseline on the cluster ({space.baseline_epochs} epochs, {space.budget.gpus_per_trial:g} GPU)")
    task = ray.remote(num_cpus=space.budget.cpus_per_trial, num_gpus=space.budget.gpus_per_trial)(train_baseline_task)
    state, metrics, lines = ray.get(task.remote(space))
    for line in lines:
        log(f"[slimtune] {line}")
    return state, metrics


def _shutdown_ray() -> None:
    """Stop the local Ray, or disconnect from the cluster (which keeps running)."""
    import ray

    ray.shutdown()


def resume_search(name: str, results_dir: str | Path = "slimtune_results", address: str | None = None, log=print) -> SearchRecord:
    """Continue a search from Tune's experiment state and the persistent Optuna study."""
    _quiet_logging()
    record = load_search(name, results_dir)
    if not (record.folder / "baseline.pt").is_file() or record.parent_run_id is None:
        raise UserError(f"search '{name}' stopped before its baseline was saved; start it again with `slimtune search`.")
    log(f"[slimtune] resuming search '{name}' from {record.folder}")
    _init_ray(address)
    try:
        _tune(record, restore=True)
    finally:
        _shutdown_ray()
    return finish_search(record, log)


def _absolute_sqlite(uri: str) -> str:
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri


def _driver_device(space: SearchSpace) -> str:
    return "cuda" if space.budget.gpus_per_trial > 0 and torch.cuda.is_available() else "cpu"


def _tune(record: SearchRecord, restore: bool) -> None:
    """Run (or, with ``restore``, continue) the trials on the Ray that ``_init_ray`` reached."""
    from ray import tune

    from search._tune import TrialTracker, make_searcher, trial_name

    space = record.space
    # Tune logs each failed trial's traceback; slimtune prints one line with the reason and the
    # full traceback stays in the trial's error.txt and in MLflow.
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    baseline_state = torch.load(record.folder / "baseline.pt", weights_only=True)
    spec = TrialSpec(space=space, baseline_state=baseline_state, baseline_metrics=record.baseline_metrics)
    resources = {"cpu": space.budget.cpus_per_trial, "gpu": space.budget.gpus_per_trial}
    trainable = tune.with_resources(tune.with_parameters(run_trial, spec=spec), resources)
    storage = record.checkpoint_storage
    experiment = f"{storage.rstrip('/')}/tune"
    if restore and tune.Tuner.can_restore(experiment):
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=make_searcher(space, record.name, record.optuna_storage),
                num_samples=space.budget.trials,
                max_concurrent_trials=space.budget.concurrent,
                reuse_actors=True,
                trial_name_creator=trial_name,
                trial_dirname_creator=trial_name,
            ),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=storage,
                verbose=0,
                log_to_file=True,
                callbacks=[TrialTracker(record)],
                failure_config=tune.FailureConfig(max_failures=space.budget.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            ),
        )
    tuner.fit()
    close_interrupted(record)


INTERRUPTED = "interrupted: the driver stopped while the trial ran and Tune's saved state did not include it; its slot was given to a new trial"


def close_interrupted(record: SearchRecord) -> None:
    """After Tune is done, nothing may stay RUNNING: trials a dead driver left behind end FAILED.

    Tune saves its experiment state every few seconds; a trial started after the last save and
    cut off by the driver's death is unknown to the resumed Tune, which fills its slot with a new
    trial. The study and MLflow record the lost one as failed, with the reason.
    """
    import optuna

    study = optuna.load_study(study_name=record.name, storage=record.optuna_storage)
    for trial in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING]):
        study._storage.set_trial_user_attr(trial._trial_id, "failure_reason", INTERRUPTED)
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    tracker = record.tracker()
    for trial_id, run in tracker.runs().items():
        if run.get("status") == "RUNNING" and run.get("run_id"):
            tracker.fail_trial(trial_id, run["run_id"], INTERRUPTED)


@contextlib.contextmanager
def exported_model_dir(checkpoint: str | None):
    """The folder of a trial's exported model, fetched first when the checkpoint is remote."""
    if not checkpoint:
        yield None
        return
    if "://" not in checkpoint:
        folder = Path(checkpoint) / "model"
        yield folder if folder.is_dir() else None
        return
    import tempfile

    import pyarrow.fs

    filesystem, path = pyarrow.fs.FileSystem.from_uri(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            pyarrow.fs.copy_files(f"{path}/model", tmp, source_filesystem=filesystem)
        except (OSError, FileNotFoundError):
            yield None
            return
        yield Path(tmp)


def finish_search(record: SearchRecord, log=print) -> SearchRecord:
    """Rank the trials, tag MLflow, log the Pareto table, plot, hypervolume and Pareto models."""
    space = record.space
    tracker = record.tracker()
    records = completed_records(record)
    rank_records(space, records)
    hv = search_hypervolume(space, records, record.baseline_metrics)
    for r in records:
        if r.run_id:
            tracker.client.set_tag(r.run_id, "pareto_rank", str(r.rank))
            tracker.client.set_tag(r.run_id, "is_pareto", str(r.rank == 0 and r.feasible).lower())
    front = [r for r in records if r.rank == 0 and r.feasible]
    for r in front:
        # The driver fetches each Pareto model from wherever the trial stored it.
        with exported_model_dir(r.checkpoint) as model_dir:
            if r.run_id and model_dir is not None:
                tracker.client.log_artifacts(r.run_id, str(model_dir), "model")
    rows = pareto_table(space, records, only_front=False)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "pareto.csv"
        _write_csv(rows, csv_path)
        png_path = Path(tmp) / "pareto.png"
        plot_front(space, records, record.baseline_metrics, png_path)
        tracker.client.log_artifact(record.parent_run_id, str(csv_path))
        tracker.client.log_artifact(record.parent_run_id, str(png_path))
    tracker.client.log_batch(record.parent_run_id, metrics=tracker._metric_entities({"hypervolume": hv, "front_size": float(len(front)), "completed_trials": float(len(records))}, step=0))
    tracker.client.set_terminated(record.parent_run_id, status="FINISHED")
    log(f"\n[slimtune] search '{record.name}' finished: {len(records)} completed trials, {len(front)} on the Pareto front, hypervolume {hv:.4f}")
    log(format_table(space, pareto_table(space, records), record.baseline_metrics))
    log(f"\nBrowse: mlflow ui --backend-store-uri {record.tracking_uri} --host 127.0.0.1 --port 5000")
    # MLflow 3.x decides GenAI vs model-training pages by a UI-wide switch, not by the
    # experiment's tag; this URL opens the runs table of this search directly.
    log(f"        then open http://127.0.0.1:5000/#/experiments/{tracker.experiment_id}?workflowType=machine_learning")
    log(f"Export: slimtune export {record.name} --pick knee --out exports/{record.name}")
    return record


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    import csv

    keys = list(dict.fromkeys(k for row in rows for k in row)) or ["trial"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def plot_front(space: SearchSpace, records: list[TrialRecord], baseline: dict[str, float], path: Path) -> None:
    """Scatter of the first objective against each other one; the front is joined and labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first, others = space.objectives[0], space.objectives[1:]
    fig, axes = plt.subplots(1, len(others), figsize=(5.5 * len(others), 4.5), squeeze=False)
    for ax, other in zip(axes[0], others):
        xs = [r.metrics[other.metric] for r in records]
        ys = [r.metrics[first.metric] for r in records]
        ax.scatter(xs, ys, c="lightgray", edgecolors="gray", label="trials")
        front = sorted((r for r in records if r.rank == 0 and r.feasible), key=lambda r: r.metrics[other.metric])
        ax.plot([r.metrics[other.metric] for r in front], [r.metrics[first.metric] for r in front], "o-", c="tab:red", label="Pareto front")
        for r in front:
            ax.annotate(r.name.replace("trial_", "#"), (r.metrics[other.metric], r.metrics[first.metric]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if other.metric in baseline and first.metric in baseline:
            ax.scatter([baseline[other.metric]], [baseline[first.metric]], marker="*", s=200, c="tab:blue", label="baseline")
        ax.set_xlabel(f"{other.metric} ({other.direction})")
        ax.set_ylabel(f"{first.metric} ({first.direction})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{space.name}: {len(records)} trials")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
