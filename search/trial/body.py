"""The body of one trial: baseline copy -> pipeline of methods -> measured, exported model.

The same code runs in a Ray worker (``run_trial``, called by Tune) and in a plain loop
(``bench/overhead.py``, the tests): Tune only adds reporting and checkpoints through
``on_epoch_end`` and ``report``.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray import tune
from torch import nn

from deploy import (
    FORMS,
    LATENCY_RUNTIMES,
    apply_reported_cost,
    count_flops,
    count_params,
    deployed_latency,
    export_and_load,
    phase,
    record_checksum,
    recording_phases,
    size_bytes,
    torch_threads,
    verify_checksum,
    write_recipe,
)
from errors import UserError, plural
from methods import MethodContext, Phase, Pipeline, TrainingState, train_phase
from search.space.spec import SearchSpace
from search.trial.context import (
    build_context,
    build_model,
    first_batch,
    load_task,
    run_one_batch,
    seed_everything,
    seeded_loader,
    trial_threads,
)
from search.trial.graceful_stop import wait_if_stopping
from search.trial.recipe import changed_imports, recipe_document, space_from_recipe, state_digest
from tasks import Task, task_metrics

__all__ = [
    "TrialSpec",
    "TrialTimeLimitError",
    "TrialOutOfMemoryError",
    "recipe_from_config",
    "measure",
    "train_baseline",
    "run_pipeline",
    "run_trial",
    "replay",
]


class TrialTimeLimitError(RuntimeError):
    """The trial ran past ``budget.time_limit_s``."""


class TrialOutOfMemoryError(RuntimeError):
    """The trial needed more memory than its device has.

    A process that the kernel's OOM killer (or Ray's memory monitor) ends never gets to raise
    this; Tune then reports the dead worker, which fails the trial the same way.
    """


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed allocation (CUDA or host memory) rather than a bug."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


@dataclass(frozen=True)
class TrialSpec:
    """What every trial of a search needs; shipped once to the workers through Ray's object store."""

    space: SearchSpace
    baseline_state: dict[str, torch.Tensor]
    baseline_metrics: dict[str, float]


def recipe_from_config(space: SearchSpace, config: dict[str, Any]) -> list[dict[str, Any]]:
    """Turn Optuna's choice (``{"l1_filter": {"use": True, "ratio": 0.3}, ...}``) into a recipe.

    The recipe is the ordered list of used methods with every hyperparameter the space fixes or
    samples; it is what MLflow stores and what ``Pipeline.from_recipe`` replays.
    """
    recipe = []
    for method in space.methods:
        chosen = dict(config.get(method.name, {}))
        used = chosen.pop("use", True) if method.optional else True
        if not used:
            continue
        recipe.append({"name": method.name, "params": {**method.fixed, **chosen}})
    return recipe


def measure(
    model: nn.Module,
    space: SearchSpace,
    task: Task,
    device: torch.device,
    baseline: dict[str, float] | None,
    reported_cost: dict[str, float] | None = None,
    export_dir: Path | None = None,
) -> dict[str, Any]:
    """Quality on the test split and the cost figures of ``model``, which is exported into ``export_dir``.

    Quality, MACs, FLOPs, parameters and size are measured on ``model`` itself, at the task's
    input shape (``task.example_input``: one sample for MACs and FLOPs). The model is exported
    (:func:`deploy.export_model`, into a temporary folder without ``export_dir``), and
    ``latency_ms`` is timed on the form ``measure.latency_runtime`` runs (``latency_form``: the
    exported program in torch, or ``model.onnx`` in ONNX Runtime, written only then) at
    ``measure.latency_batch_size`` samples (``latency_batch_size``) on ``device``
    (``latency_device``) with :func:`trial_threads` CPU threads (``latency_threads``), the
    baseline's as every trial's: a form that refuses that batch size is refused, never swapped
    for another (:func:`deploy.deployed_latency`). ``artifact_bytes`` is that form's file size,
    ``artifact_bytes_<form>`` each written form's (:func:`artifact_sizes`). With the
    ``baseline``'s metrics, also each quality metric's drop from the baseline (``accuracy_drop =
    baseline accuracy - accuracy``; ``mse_drop = mse - baseline mse`` for a minimised metric).
    ``reported_cost`` (``Pipeline.cost``) replaces measured cost figures, the measured ones staying
    as ``measured_<metric>`` (:func:`deploy.apply_reported_cost`).
    """
    model.eval()
    with phase("close-out: measuring"):
        test = task.evaluate(model, seeded_loader(task.test_set, task.eval_batch_size, False, 0), device)
        example = task.example_input(1).to(device)
        flops = count_flops(model, example)
        metrics: dict[str, Any] = {m: test[m] for m in task.metrics}
        metrics.update(
            {
                "test_loss": test["loss"],
                "macs": float(flops.macs),
                "flops": float(flops.flops),
                "bops": float(flops.bops),
                "params": float(count_params(model)),
                "size_bytes": float(size_bytes(model)),
                "uncounted_ops": ",".join(flops.uncounted_ops),
                # The last bits of training on CPU depend on it; a replay uses it again.
                "torch_threads": float(torch.get_num_threads()),
            }
        )
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(export_dir) if export_dir is not None else Path(tmp)
        form = LATENCY_RUNTIMES[space.latency_runtime]
        sizes, program = export_and_load(model, example, out_dir, onnx=form == "onnx")
        metrics.update(artifact_sizes(sizes, form))
        x = task.example_input(space.latency_batch_size).to(device)
        with phase("close-out: latency"):
            metrics.update(
                deployed_latency(
                    out_dir,
                    x,
                    repeats=space.latency_repeats,
                    threads=trial_threads(space),
                    runtime=space.latency_runtime,
                    loaded=program if form == "program" else None,
                )
            )
    directions = task_metrics(space.task)
    for m in task.metrics:
        metrics[f"{m}_drop"] = 0.0 if baseline is None else quality_drop(metrics[m], baseline[m], directions[m])
    return apply_reported_cost(metrics, reported_cost or {})


def artifact_sizes(sizes: dict[str, int], deployed: str) -> dict[str, float]:
    """``artifact_bytes``, the file size of the ``deployed`` form, and ``artifact_bytes_<form>`` of each form in ``sizes``.

    ``sizes``: :func:`deploy.export_model`'s file sizes, by file name.
    """
    figures = {f"artifact_bytes_{form}": float(sizes[name]) for form, name in FORMS.items() if name in sizes}
    return {"artifact_bytes": figures[f"artifact_bytes_{deployed}"], **figures}


def quality_drop(value: float, baseline: float, direction: str) -> float:
    """How much worse than the baseline: positive when accuracy falls or MSE rises."""
    return baseline - value if direction == "max" else value - baseline


def projected_cost(spec: TrialSpec, recipe: list[dict[str, Any]]) -> dict[str, float]:
    """The cost figures of :data:`search.space.objectives.EPOCH_COSTS` that the trial's final model will have.

    Called by :func:`run_trial` before training when an early-stopping scheduler compares trials
    from their first epoch. The recipe runs as in a pre-flight check (every phase one step on one
    batch, on CPU, :func:`search.trial.context.run_one_batch`) on a copy of the baseline, and the
    result is measured as :func:`measure` does, with the methods' reported cost. Exact for methods
    whose size is set by their hyperparameters (pruning ratios, bit widths); for methods that
    learn what to remove it is the cost before they have learnt anything (an upper bound).
    """
    space = spec.space
    task = load_task(space)
    baseline = build_model(space, task)
    baseline.load_state_dict(spec.baseline_state)
    baseline.eval()
    model, pipeline, ctx = run_one_batch(recipe, space, task, copy.deepcopy(baseline), baseline, first_batch(space, task))
    flops = count_flops(model, task.example_input(1))
    measured = {
        "macs": float(flops.macs),
        "flops": float(flops.flops),
        "params": float(count_params(model)),
        "size_bytes": float(size_bytes(model)),
    }
    reported = {k: v for k, v in pipeline.cost(model, ctx).items() if k in measured}
    figures = apply_reported_cost(measured, reported)
    return {k: figures[k] for k in measured}


def train_baseline(
    space: SearchSpace, device: torch.device | str = "cpu", log: Callable[[str], None] = print
) -> tuple[nn.Module, dict[str, Any]]:
    """Train (or load from ``baseline.checkpoint``) the uncompressed model and measure it."""
    device = torch.device(device)
    seed_everything(space.seed)
    task = load_task(space)
    model = build_model(space, task).to(device)
    if space.baseline_checkpoint:
        model.load_state_dict(torch.load(space.baseline_checkpoint, map_location=device, weights_only=True))
        log(f"baseline loaded from {space.baseline_checkpoint}")
    elif space.baseline_epochs > 0:
        ctx = build_context(space, task, teacher=model, device=device, seed=space.seed, log=log)
        log(f"training the baseline {space.model} on {space.task} for {plural(space.baseline_epochs, 'epoch')}")
        train_phase(model, Phase("baseline", space.baseline_epochs), ctx, loss_terms=[], stage_name="baseline")
    metrics = measure(model, space, task, device, baseline=None)
    chance = chance_accuracy(task)
    if chance is not None:
        # Kept with the baseline: a trial within the margin of chance is marked (trial_quality).
        metrics["chance_accuracy"] = chance
        metrics["chance_margin"] = chance_margin(chance, len(task.test_set))
    for metric, value in task.reference.items():
        # Kept with the baseline: the hypervolume's reference point for a minimised quality metric.
        metrics[f"reference_{metric}"] = float(value)
        log(f"reference: a model that learns nothing scores {metric} {value:.4g} on {task.name} (the baseline: {metrics[metric]:.4g})")
    return model, metrics


#: A trial whose last epoch's training loss is this many times its lowest (and 1 above it) diverged.
DIVERGED_FACTOR = 10.0


def chance_accuracy(task: Task) -> float | None:
    """What a classifier that learns nothing scores on the test split; None where accuracy is not a metric.

    The larger of ``1 / num_classes`` and the share of the test split's most frequent class
    (always predicting it), or the task's own reference (``Task.reference``) where it names one.
    """
    if "accuracy" not in task.metrics:
        return None
    if "accuracy" in task.reference:
        return float(task.reference["accuracy"])
    if task.num_classes < 2:
        return None
    labels = _labels(task.test_set)
    majority = float(np.bincount(labels).max() / len(labels)) if labels is not None and len(labels) else 0.0
    return max(1.0 / task.num_classes, majority)


def _labels(dataset) -> np.ndarray | None:
    """The integer labels of a dataset, where they can be read without loading its inputs."""
    if hasattr(dataset, "tensors") and len(dataset.tensors) == 2 and dataset.tensors[1].dim() == 1:
        return dataset.tensors[1].numpy().astype(np.int64)
    if hasattr(dataset, "targets"):
        return np.asarray(dataset.targets, dtype=np.int64)
    if hasattr(dataset, "indices") and hasattr(dataset, "dataset"):
        inner = _labels(dataset.dataset)
        return None if inner is None else inner[np.asarray(dataset.indices, dtype=np.int64)]
    return None


def chance_margin(chance: float, examples: int) -> float:
    """How far above chance an accuracy must be to count as learnt: 2 standard errors of chance, at least 0.01."""
    return max(0.01, 2.0 * float(np.sqrt(chance * (1.0 - chance) / max(examples, 1))))


def at_chance(metrics: dict[str, Any], baseline: dict[str, Any]) -> bool:
    """Whether ``metrics`` (a trial's or the baseline's) hold an accuracy within the margin of chance."""
    chance = baseline.get("chance_accuracy")
    return chance is not None and "accuracy" in metrics and metrics["accuracy"] <= chance + baseline.get("chance_margin", 0.01)


def refuse_chance_baseline(space: SearchSpace, metrics: dict[str, Any]) -> None:
    """Refuse a baseline that learnt nothing: every trial would compress noise.

    Called by the driver once the baseline is trained, before it is cached or any trial starts.
    """
    if at_chance(metrics, metrics):
        chance, margin = metrics["chance_accuracy"], metrics["chance_margin"]
        how = (
            f"baseline.checkpoint {space.baseline_checkpoint} does not fit this task; point it at weights trained on it"
            if space.baseline_checkpoint
            else f"train it longer (baseline.epochs, now {space.baseline_epochs}), change training.lr (now {space.lr:g}) "
            "or the model's options, or start from baseline.checkpoint"
        )
        raise UserError(
            f"{space.path}: the baseline {space.model} scores accuracy {metrics['accuracy']:.4f} on {space.task}: at chance "
            f"({chance:.4f}, the larger of 1/number of classes and the most frequent class's share, within {margin:.4f}), "
            f"so it learnt nothing to compress; {how}."
        )


def trial_quality(metrics: dict[str, Any], baseline: dict[str, Any], train_losses: list[float]) -> str:
    """``"diverged"``, ``"at chance"`` or ``"ok"``: whether a finished trial's result can be trusted."""
    if len(train_losses) >= 2:
        lowest, last = min(train_losses), train_losses[-1]
        if last > DIVERGED_FACTOR * lowest and last > lowest + 1.0:
            return "diverged"
    return "at chance" if at_chance(metrics, baseline) else "ok"


def train_baseline_task(space: SearchSpace) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[str]]:
    """The baseline as a Ray task on a cluster: weights (on CPU), metrics and the log lines."""
    lines: list[str] = []
    device = "cuda" if space.budget.gpus_per_trial > 0 and torch.cuda.is_available() else "cpu"
    model, metrics = train_baseline(space, device, log=lines.append)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, metrics, lines


def trainable_student(
    space: SearchSpace, task: Task, baseline: nn.Module, device: torch.device, seed: int, log: Callable[[str], None] = lambda message: None
) -> tuple[nn.Module, MethodContext]:
    """A trainable copy of the frozen ``baseline`` (in the baseline's mode) and the context a trial compresses it in."""
    model = copy.deepcopy(baseline)
    for p in model.parameters():
        p.requires_grad_(True)
    return model, build_context(space, task, teacher=baseline, device=device, seed=seed, log=log)


def run_pipeline(
    spec: TrialSpec,
    recipe: list[dict[str, Any]],
    out_dir: Path,
    device: torch.device,
    seed: int,
    on_epoch_end: Callable[[TrainingState, dict[str, float]], None] | None = None,
    resume: TrainingState | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Compress a copy of the baseline with ``recipe``, measure it and export it into ``out_dir``.

    The export's ``recipe.json`` (:mod:`search.trial.recipe`) holds everything in effect and the metrics.

    Returns:
        The final metrics (objectives, cost figures and each method's own figures).
    """
    space = spec.space
    with phase("data loading and setup"):
        seed_everything(seed)
        task = load_task(space)
        baseline = build_model(space, task)
        baseline.load_state_dict(spec.baseline_state)
        baseline.to(device).eval()
        for p in baseline.parameters():
            p.requires_grad_(False)
        model, ctx = trainable_student(space, task, baseline, device, seed, log)
        pipeline = Pipeline.from_recipe(recipe)
    started = time.monotonic()

    def epoch_end(state: TrainingState, metrics: dict[str, float]) -> None:
        if space.budget.time_limit_s is not None and time.monotonic() - started > space.budget.time_limit_s:
            raise TrialTimeLimitError(
                f"the trial ran {time.monotonic() - started:.1f} s, past budget.time_limit_s={space.budget.time_limit_s:g}."
            )
        if "train_loss" in metrics:
            train_losses.append(float(metrics["train_loss"]))
        if on_epoch_end is not None:
            on_epoch_end(state, metrics)

    train_losses: list[float] = []
    with phase("training"):
        model = pipeline.run(model, ctx, on_epoch_end=epoch_end, resume=resume)
    model.eval()
    metrics = measure(
        model, space, task, device, baseline=spec.baseline_metrics, reported_cost=pipeline.cost(model, ctx), export_dir=out_dir
    )
    metrics.update(pipeline.metrics())
    # The word for the progress line and MLflow's tag; the figures for the study (numbers only).
    metrics["quality"] = trial_quality(metrics, spec.baseline_metrics, train_losses)
    metrics["diverged"] = float(metrics["quality"] == "diverged")
    metrics["at_chance"] = float(metrics["quality"] == "at chance")
    with phase("close-out: files"):
        # Reports and plots of the methods (Method.artifacts) travel with the exported model.
        pipeline.artifacts(model, ctx, out_dir / "artifacts")
        write_recipe(out_dir, recipe_document(space, task, pipeline.recipe(), device, spec.baseline_state, spec.baseline_metrics, metrics))
    return metrics


def replay(doc: dict[str, Any], out_dir: Path, log: Callable[[str], None] = print) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """Retrain a recipe's baseline and pipeline as its search did, and export the result into ``out_dir``.

    The baseline is trained by :func:`train_baseline` and the trial run by :func:`run_pipeline`,
    on the recipe's device and with the thread counts each had, so that on the same machine
    and versions the metrics come out the same.

    Args:
        doc: A recipe (:func:`search.trial.recipe.read_recipe`).
        out_dir: Where the replayed model and its own ``recipe.json`` go.
        log: Receives the training log lines.

    Returns:
        The replayed baseline's metrics, the trial's metrics, and whether the retrained baseline's
        weights equal the recorded ones bit for bit.

    Raises:
        UserError: The recipe names a CUDA device this machine does not have.
    """
    space = space_from_recipe(doc)
    for line in changed_imports(doc):
        log(line)
    device = torch.device(doc["run"]["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("the recipe's trial ran on CUDA, but this machine has no CUDA device; replay it on a machine with a GPU.")
    if space.baseline_checkpoint and not Path(space.baseline_checkpoint).is_file():
        raise UserError(
            f"the recipe's baseline is the checkpoint {space.baseline_checkpoint}, which does not exist here; "
            "copy it there (its weights must match baseline.state_sha256) and replay again."
        )
    with torch_threads(doc["baseline"]["torch_threads"]):
        baseline, baseline_metrics = train_baseline(space, device, log=log)
    state = {k: v.detach().cpu() for k, v in baseline.state_dict().items()}
    same_baseline = state_digest(state) == doc["baseline"]["state_sha256"]
    spec = TrialSpec(space=space, baseline_state=state, baseline_metrics=baseline_metrics)
    with torch_threads(doc["run"]["torch_threads"]):
        metrics = run_pipeline(spec, doc["pipeline"], Path(out_dir), device, seed=space.seed, log=log)
    return baseline_metrics, metrics, same_baseline


#: Beside ``state.pt`` in each epoch's checkpoint: the trial's CPU seconds so far, which a retry continues.
CPU_FILE = "cpu.json"

#: An environment variable naming a file: each trial appends to it one JSON line with the wall
#: seconds of its phases (:func:`deploy.phase`), the Tune trial id and when it entered and left
#: :func:`run_trial` (``time.time()``). Read by ``bench/overhead.py --profile``; unset, nothing is timed.
PROFILE_ENV = "SLIMTUNE_PROFILE"


def run_trial(config: dict[str, Any], spec: TrialSpec) -> None:
    """Tune's function trainable: one trial, with a checkpoint every epoch.

    A retried trial continues from its last checkpoint (the model, every method's state and the
    optimizer's) instead of starting over. With :data:`PROFILE_ENV` set, the trial's phases are
    timed and appended to the file it names.
    """
    target = os.environ.get(PROFILE_ENV)
    if not target:
        _run_trial(config, spec)
        return
    entered = time.time()
    with recording_phases() as phases:
        try:
            _run_trial(config, spec)
        finally:
            line = {
                "trial_id": tune.get_context().get_trial_id(),
                "pid": os.getpid(),
                "entered": entered,
                "left": time.time(),
                "phases": phases,
            }
            with open(target, "a") as f:
                f.write(json.dumps(line) + "\n")


def _run_trial(config: dict[str, Any], spec: TrialSpec) -> None:
    space = spec.space
    recipe = recipe_from_config(space, config)
    device = torch.device("cuda" if space.budget.gpus_per_trial > 0 and torch.cuda.is_available() else "cpu")
    torch.set_num_threads(trial_threads(space))
    # CPU seconds of this trial's process (a reused actor's earlier trials are not counted), plus
    # those of its earlier attempts when it is retried from a checkpoint.
    cpu_start = time.process_time()
    cpu_before = 0.0

    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            final_file = Path(directory) / "final.json"
            if final_file.is_file():
                # The trial had finished when the driver died: report its result again, no rerun.
                tune.report(json.loads(final_file.read_text()), checkpoint=checkpoint)
                return
            state_file = Path(directory) / "state.pt"
            if state_file.is_file():
                # The trial's own pickle (methods' state, the optimizer's), written below: loaded only if unchanged.
                verify_checksum(state_file)
                resume = torch.load(state_file, map_location=device, weights_only=False)
                cpu_file = Path(directory) / CPU_FILE
                cpu_before = json.loads(cpu_file.read_text())["cpu_s"] if cpu_file.is_file() else 0.0

    def cpu_s() -> float:
        return cpu_before + time.process_time() - cpu_start

    wait_if_stopping()  # started just after a Ctrl-C: do not train
    # Which node ran each epoch: a trial retried after a node failure shows both.
    node_id = ray.get_runtime_context().get_node_id()

    # An early-stopping scheduler compares trials on each epoch's objective vector: validation
    # quality and the cost the final model will have (run_pipeline reseeds, so this draws
    # nothing from the trial's random streams).
    epoch_cost = projected_cost(spec, recipe) if space.budget.scheduler != "fifo" else {}
    directions = task_metrics(space.task)

    def report_epoch(state: TrainingState, metrics: dict[str, float]) -> None:
        drops = {
            f"val_{m}_drop": quality_drop(metrics[f"val_{m}"], spec.baseline_metrics[m], direction)
            for m, direction in directions.items()
            if f"val_{m}" in metrics and m in spec.baseline_metrics
        }
        epoch = {**metrics, **drops, **epoch_cost, "cpu_s": cpu_s()}
        with phase("epoch reports and checkpoints"), tempfile.TemporaryDirectory() as tmp:
            torch.save(state, Path(tmp) / "state.pt")
            record_checksum(Path(tmp) / "state.pt")
            (Path(tmp) / CPU_FILE).write_text(json.dumps({"cpu_s": epoch["cpu_s"]}))
            tune.report({**epoch, "recipe": json.dumps(recipe), "node_id": node_id}, checkpoint=tune.Checkpoint.from_directory(tmp))
        # After a Ctrl-C the trial stops here, its epoch saved, until the driver stops Tune.
        wait_if_stopping()

    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp) / "model"
        try:
            metrics = run_pipeline(spec, recipe, out_dir, device, seed=space.seed, on_epoch_end=report_epoch, resume=resume)
        except Exception as exc:
            if is_out_of_memory(exc):
                raise TrialOutOfMemoryError(
                    f"the trial ran out of memory on {device}: {str(exc).splitlines()[0][:200]}. "
                    "Lower training.batch_size, or run fewer trials per GPU (budget.gpus_per_trial)."
                ) from exc
            raise
        metrics["cpu_s"] = cpu_s()
        metrics["recipe"] = json.dumps(recipe)
        metrics["node_id"] = node_id
        metrics["final"] = True
        with phase("final report"):
            (Path(tmp) / "final.json").write_text(json.dumps(metrics))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
