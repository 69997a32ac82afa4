"""Rank a search's trials, measure its front and pick a trial from it (no torch, no Ray)."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from errors import UserError, did_you_mean
from search.results import pareto
from search.results.record import SearchRecord, TrialRecord, search_progress

__all__ = [
    "rank_records",
    "front",
    "search_hypervolume",
    "hypervolume_reference",
    "describe_reference",
    "hypervolume_history",
    "pick_record",
    "pareto_table",
    "pareto_document",
]


def rank_records(record: SearchRecord, records: list[TrialRecord]) -> None:
    """Set ``rank`` and ``feasible`` on every trial (rank 0 = Pareto-optimal and feasible)."""
    if not records:
        return
    points = [[r.metrics[m] for m in record.metric_names] for r in records]
    # A diverged trial or one at chance (search.trial.body.trial_quality) counts as infeasible.
    violations = [sum(c.violation(r.metrics) for c in record.constraints) + (0.0 if untrusted(r) is None else 1.0) for r in records]
    ranks = pareto.pareto_ranks(points, record.modes, violations if any(violations) or record.constraints else None)
    for r, rank, v in zip(records, ranks, violations):
        r.rank = rank
        r.feasible = v == 0
        if not r.feasible:
            r.rank = max(rank, 1)


def untrusted(r: TrialRecord) -> str | None:
    """Why a completed trial's result cannot be trusted (``"diverged"``, ``"at chance"``), or None."""
    if r.metrics.get("diverged"):
        return "diverged"
    return "at chance" if r.metrics.get("at_chance") else None


def front(records: list[TrialRecord]) -> list[TrialRecord]:
    """The ranked trials that are Pareto-optimal and feasible."""
    return [r for r in records if r.rank == 0 and r.feasible]


def hypervolume_reference(record: SearchRecord, records: list[TrialRecord]) -> dict[str, float]:
    """The reference point of :func:`search_hypervolume`, in each objective's own units.

    From the baseline: 0 for a maximised metric; for a minimised one the score of a model that
    learns nothing where the task knows it (``reference_mse`` in the baseline's metrics:
    ``tasks.Task.reference``), else 1.1 x the baseline (a model must cost less than 110% of the
    baseline to count), or 1 where the baseline is 0 (``accuracy_drop``). Where a trial of the
    feasible front of ``records`` is worse than that in an objective (an 8-bit model slower than
    the baseline), the reference moves past it by a tenth of the baseline's value (1 where that
    is 0), so that every front point adds volume: a front never reads 0.
    """
    baseline = record.baseline_metrics
    best = front(records)
    reference: dict[str, float] = {}
    for objective in record.objectives:
        metric = objective.metric
        base = float(baseline.get(metric, 0.0))
        margin = 0.1 * abs(base) if base != 0 else 1.0
        values = [float(r.metrics[metric]) for r in best]
        if objective.direction == "max":
            own = 0.0
            reference[metric] = min(values) - margin if values and min(values) <= own else own
        else:
            own = float(baseline[f"reference_{metric}"]) if f"reference_{metric}" in baseline else base + margin
            reference[metric] = max(values) + margin if values and max(values) >= own else own
    return reference


def describe_reference(reference: dict[str, float]) -> str:
    """What a hypervolume is relative to, for the line that prints it: ``reference point psnr 0, ...``."""
    point = ", ".join(f"{metric} {value:.4g}" for metric, value in reference.items())
    return f"reference point {point}, each objective divided by the baseline's"


def search_hypervolume(record: SearchRecord, records: list[TrialRecord], reference: dict[str, float] | None = None) -> float:
    """Hypervolume of the feasible front with every objective divided by the baseline's value.

    The volume is bounded by ``reference`` (objective units; :func:`hypervolume_reference` of
    ``records`` when None). Dividing by the baseline (by 1 where the baseline's value is 0 or
    negative) makes objectives of different units comparable; the figure is still relative to
    the reference point, which is printed beside it (:func:`describe_reference`).
    """
    best = front(records)
    if not best:
        return 0.0
    reference = reference if reference is not None else hypervolume_reference(record, records)
    baseline = record.baseline_metrics
    scales = []
    for objective in record.objectives:
        base = float(baseline.get(objective.metric, 0.0))
        scales.append(base if base > 0 else 1.0)
    points = [[r.metrics[m] / s for m, s in zip(record.metric_names, scales)] for r in best]
    return pareto.hypervolume(points, record.modes, [reference[m] / s for m, s in zip(record.metric_names, scales)])


def hypervolume_history(record: SearchRecord, records: list[TrialRecord]) -> list[dict[str, Any]]:
    """The search's hypervolume after each completed trial, in the order the trials completed.

    One entry per trial of ``records``: ``{"completed": k, "trial": name, "hypervolume": hv}``, where
    ``hv`` is :func:`search_hypervolume` of the first ``k`` trials to complete (so the last entry
    is the search's hypervolume). ``records`` are not modified.
    """
    # One reference point for every entry (the whole search's), so that the history never falls.
    ranked = [dataclasses.replace(r) for r in records]
    rank_records(record, ranked)
    reference = hypervolume_reference(record, ranked)
    history: list[dict[str, Any]] = []
    best: list[TrialRecord] = []
    for k, trial in enumerate(sorted(records, key=lambda r: (r.completed_at or 0.0, r.number)), start=1):
        # The front of the first k trials is the front of the previous front plus the new trial.
        best = [dataclasses.replace(r) for r in [*best, trial]]
        rank_records(record, best)
        best = front(best)
        history.append({"completed": k, "trial": trial.name, "hypervolume": search_hypervolume(record, best, reference)})
    return history


def pick_record(record: SearchRecord, records: list[TrialRecord], pick: str) -> TrialRecord:
    """Choose a Pareto trial: ``knee``, ``max-<metric>`` (``max-accuracy``) or ``min-<metric>``."""
    best = front(records)
    if not best:
        raise UserError("the search has no feasible Pareto-optimal trial yet; nothing to pick.")
    if pick == "knee":
        index = pareto.knee_index([[r.metrics[m] for m in record.metric_names] for r in best], record.modes)
        return best[index]
    # Metric names hold capitals and digits too (mAP, rank1).
    match = re.fullmatch(r"(min|max)-(\w+)", pick)
    if not match:
        raise UserError(f"--pick must be knee, max-<metric> (e.g. max-accuracy) or min-<metric> (e.g. min-macs), but got '{pick}'.")
    direction, metric = match.groups()
    if metric not in best[0].metrics:
        raise UserError(f"--pick {pick}: no metric '{metric}'.{did_you_mean(metric, best[0].metrics)}")
    key = (lambda r: r.metrics[metric]) if direction == "min" else (lambda r: -r.metrics[metric])
    return min(best, key=key)


def pareto_table(record: SearchRecord, records: list[TrialRecord], only_front: bool = True) -> list[dict[str, Any]]:
    """One row per ranked trial (the front only, by default), best rank first."""
    rows = []
    for r in sorted(records, key=lambda r: (r.rank, r.number)):
        if only_front and not (r.rank == 0 and r.feasible):
            continue
        row = {"trial": r.name, "run_id": r.run_id, "rank": r.rank, "feasible": r.feasible, "pipeline": r.pipeline}
        if untrusted(r) is not None:
            row["quality"] = untrusted(r)
        for metric in record.task_metrics:
            if metric in r.metrics:
                row[metric] = r.metrics[metric]
        rows.append(row)
    return rows


def pareto_document(record: SearchRecord, records: list[TrialRecord], only_front: bool = True) -> dict[str, Any]:
    """What ``slimtune pareto --json`` prints: objectives, hypervolume, baseline, the table of ``records`` (ranked)
    and ``unfinished``: how many trials failed (``failed``, and ``failure_reasons``: reason -> count) and how many
    the scheduler stopped early (``stopped``)."""
    baseline = {k: v for k, v in record.baseline_metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    progress = search_progress(record)
    return {
        "search": record.name,
        "objectives": {o.metric: o.direction for o in record.objectives},
        "hypervolume": search_hypervolume(record, records),
        "hypervolume_reference": hypervolume_reference(record, records),
        "baseline": baseline,
        "trials": pareto_table(record, records, only_front=only_front),
        "unfinished": {"failed": progress.failed, "failure_reasons": progress.reasons, "stopped": progress.stopped},
    }
