"""Successive halving on objective vectors: which trials go on training (no torch, no Ray).

A trial reaches a rung when it has trained ``grace * reduction_factor**k`` epochs. There its
per-epoch objective vector is compared with every vector recorded at that rung so far (ASHA's
asynchronous rule: no waiting for a full rung), ordered by :func:`search.results.pareto.best_first`
(constrained non-dominated rank, then crowding distance); it goes on when it is among the best
``ceil(n / reduction_factor)`` of the ``n`` recorded, or when no vector recorded there dominates
it and it meets the constraints, and stops otherwise. The first trial at a rung always goes on.
Without the second rule a trade-off point that dominates nothing would stop whenever the rung's
earlier points fill the quota (between equal ranks and crowding distances, arrival decides). ``search.driver._tune.MultiObjectiveASHA`` is the Ray Tune scheduler that uses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from search.results import pareto
from search.space.objectives import Constraint, Objective, epoch_key

__all__ = ["Rungs", "milestones"]


def milestones(grace_epochs: int, reduction_factor: int, max_epochs: int) -> tuple[int, ...]:
    """The rungs, in epochs: ``grace_epochs * reduction_factor**k`` below ``max_epochs``."""
    out = []
    epoch = grace_epochs
    while epoch < max_epochs:
        out.append(epoch)
        epoch *= reduction_factor
    return tuple(out)


@dataclass
class Rungs:
    """The rungs of one search and the vectors recorded at each.

    Attributes:
        objectives: The search's objectives (their per-epoch keys: :func:`search.space.objectives.epoch_key`).
        constraints: The search's constraints; a vector that breaks one ranks after every feasible one.
        quality: The task's quality metrics (``accuracy``), for the per-epoch keys.
        milestones: Epochs at which trials are compared (:func:`milestones`).
        reduction_factor: One in this many trials recorded at a rung goes on.
        recorded: Milestone -> trial id -> (objective vector, total constraint violation).
    """

    objectives: tuple[Objective, ...]
    constraints: tuple[Constraint, ...]
    quality: tuple[str, ...]
    milestones: tuple[int, ...]
    reduction_factor: int
    recorded: dict[int, dict[str, tuple[list[float], float]]] = field(default_factory=dict)

    def vector(self, result: dict) -> tuple[list[float], float] | None:
        """The objective vector and constraint violation of a per-epoch result (None: incomplete)."""
        values = {}
        for metric in {o.metric for o in self.objectives} | {c.metric for c in self.constraints}:
            value = result.get(epoch_key(metric, self.quality) or "")
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                return None
            values[metric] = float(value)
        return [values[o.metric] for o in self.objectives], sum(c.violation(values) for c in self.constraints)

    def goes_on(self, trial_id: str, epoch: int, result: dict) -> bool:
        """Called with each per-epoch result of a trial; False when the trial should stop here.

        A result between rungs, one without the objectives, and a rung the trial was already
        recorded at (an epoch replayed after a restore) change nothing and go on.
        """
        if epoch not in self.milestones:
            return True
        rung = self.recorded.setdefault(epoch, {})
        if trial_id in rung:
            return True
        measured = self.vector(result)
        if measured is None:
            return True
        rung[trial_id] = measured
        ids = list(rung)
        points = [rung[i][0] for i in ids]
        directions = [o.direction for o in self.objectives]
        violations = [rung[i][1] for i in ids] if self.constraints else None
        order = pareto.best_first(points, directions, violations)
        if trial_id in {ids[i] for i in order[: math.ceil(len(ids) / self.reduction_factor)]}:
            return True
        vector, violation = rung[trial_id]
        return violation == 0 and not any(pareto.dominates(other, vector, directions) for other in points)
