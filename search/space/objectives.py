"""What a search optimises: objectives, constraints and the cost metrics (no torch, no Ray).

Kept apart from ``space.py`` (which reads YAML against the method registry) so the search
record and the ranking can be read without importing any method, model or task.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["COST_METRICS", "EPOCH_COSTS", "Objective", "Constraint", "constraint_values", "epoch_key"]

#: Cost metrics every trial reports (all lower-is-better), measured on the compressed model.
COST_METRICS: dict[str, str] = {
    "macs": "min",
    "bops": "min",
    "flops": "min",
    "params": "min",
    "size_bytes": "min",
    "artifact_bytes": "min",
    "latency_ms": "min",
}

#: The cost metrics a trial knows from its first epoch: the pipeline's methods prepared and
#: finalized on a copy of the baseline, untrained (``search.trial.body.projected_cost``). Artifact
#: size and latency need the exported, final model.
EPOCH_COSTS = ("macs", "flops", "params", "size_bytes")


def epoch_key(metric: str, quality: tuple[str, ...] | list[str]) -> str | None:
    """The key of a per-epoch result that stands for ``metric`` while a trial trains.

    A quality metric of the task (one of ``quality``, e.g. ``accuracy``) and its drop are
    measured on the validation split each epoch (``val_accuracy``, ``val_accuracy_drop``); a cost
    metric of :data:`EPOCH_COSTS` is reported under its own name. None: not known before the end.
    """
    if metric in EPOCH_COSTS:
        return metric
    if metric in quality or (metric.endswith("_drop") and metric[: -len("_drop")] in quality):
        return f"val_{metric}"
    return None


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str  # "min" or "max"


@dataclass(frozen=True)
class Constraint:
    """``metric <= bound`` or ``metric >= bound``; a trial that breaks it is never Pareto-optimal."""

    metric: str
    op: str  # "<=" or ">="
    bound: float

    def violation(self, metrics: dict[str, float]) -> float:
        """How far ``metrics`` are outside the constraint (0 when it holds)."""
        value = metrics[self.metric]
        return max(0.0, value - self.bound) if self.op == "<=" else max(0.0, self.bound - value)

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.bound:g}"


def constraint_values(constraints: tuple[Constraint, ...], metrics: dict[str, float]) -> list[float]:
    """Optuna's convention: one value per constraint, <= 0 when it holds."""
    values = []
    for c in constraints:
        value = metrics[c.metric]
        values.append(value - c.bound if c.op == "<=" else c.bound - value)
    return values
