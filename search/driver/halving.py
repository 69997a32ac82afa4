"""Successive halving on objective vectors: which trials go on training (no torch, no Ray).

A trial reaches a rung when it has trained ``grace * reduction_factor**k`` epochs. There its
per-epoch objective vector is compared with every vector recorded at that rung so far (ASHA's
asynchronous rule: no waiting for a full rung), ordered by :func:`search.results.pareto.best_first`
(constrained non-dominated rank, then crowding distance). It stops when it breaks a constraint on
a cost metric; otherwise it goes on when no other vector recorded there lies in its region of
the known cost (:func:`near`), when it is among the best ``ceil(n / reduction_factor)`` of the
``n`` recorded, or when no vector recorded there dominates it, and stops otherwise. The first
trial at a rung always goes on (unless it breaks a cost constraint). Without the last rule a
trade-off point that dominates nothing would stop whenever the rung's earlier points fill the
quota (between equal ranks and crowding distances, arrival decides).

At a rung the two halves of a vector are not known equally well. The cost (:data:`EPOCH_COSTS`)
is the one the final model will have, measured before training (an upper bound for methods
that learn what to remove); quality is the epoch's
validation figure, below what the trial ends with while its phase's learning rate has not
annealed and a freshly pruned or quantized model is still recovering. In the quickstart an
``l1_filter(ratio=0.575) > minmax_quant(bits=8)`` trial validated at 0.706 after 1 epoch, a drop of
0.289 against ``accuracy_drop <= 0.10``; it finishes at 0.969, a drop of 0.025. So only a
constraint on a cost metric makes a vector infeasible at a rung: a quality constraint is held on
the final result alone (a margin would have to cover gaps of 0.3 that depend on the schedule),
and mid-phase quality only ranks a trial among the others through the objectives. And since
that ranking is least trustworthy between trials of very different cost (a pruned model against
an unpruned one), a trial whose cost no other trial at the rung comes near goes on: stopping it
would leave its part of the front unexplored on the strength of a mid-phase figure.
``search.driver._tune.MultiObjectiveASHA`` is the Ray Tune scheduler that uses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from search.results import pareto
from search.space.objectives import EPOCH_COSTS, Constraint, Objective, epoch_key

__all__ = ["NEAR", "Rungs", "milestones", "near"]

#: Two costs are near when the larger is at most this many times the smaller: pruning and bit
#: widths move MACs and bytes by factors, so the regions of the front are ratios, not differences.
NEAR = 2.0


def milestones(grace_epochs: int, reduction_factor: int, max_epochs: int) -> tuple[int, ...]:
    """The rungs, in epochs: ``grace_epochs * reduction_factor**k`` below ``max_epochs``."""
    out = []
    epoch = grace_epochs
    while epoch < max_epochs:
        out.append(epoch)
        epoch *= reduction_factor
    return tuple(out)


def near(a: list[float], b: list[float]) -> bool:
    """Whether two cost vectors lie within a factor :data:`NEAR` of each other on every cost."""
    return all(x == y or (min(x, y) > 0 and max(x, y) <= NEAR * min(x, y)) for x, y in zip(a, b))


@dataclass
class Rungs:
    """The rungs of one search and the vectors recorded at each.

    Attributes:
        objectives: The search's objectives (their per-epoch keys: :func:`search.space.objectives.epoch_key`).
        constraints: The search's constraints; at a rung only those on a cost metric
            (:data:`EPOCH_COSTS`) are held, and a vector that breaks one stops.
        quality: The task's quality metrics (``accuracy``), for the per-epoch keys.
        milestones: Epochs at which trials are compared (:func:`milestones`).
        reduction_factor: One in this many trials recorded at a rung goes on.
        recorded: Milestone -> trial id -> (objective vector, total cost-constraint violation).
    """

    objectives: tuple[Objective, ...]
    constraints: tuple[Constraint, ...]
    quality: tuple[str, ...]
    milestones: tuple[int, ...]
    reduction_factor: int
    recorded: dict[int, dict[str, tuple[list[float], float]]] = field(default_factory=dict)

    def vector(self, result: dict) -> tuple[list[float], float] | None:
        """The objective vector and cost-constraint violation of a per-epoch result (None: incomplete)."""
        held = [c for c in self.constraints if c.metric in EPOCH_COSTS]
        values = {}
        for metric in {o.metric for o in self.objectives} | {c.metric for c in held}:
            value = result.get(epoch_key(metric, self.quality) or "")
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                return None
            values[metric] = float(value)
        return [values[o.metric] for o in self.objectives], sum(c.violation(values) for c in held)

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
        vector, violation = measured
        if violation > 0:
            return False
        costs = [i for i, o in enumerate(self.objectives) if o.metric in EPOCH_COSTS]
        if costs and not any(near([vector[i] for i in costs], [rung[o][0][i] for i in costs]) for o in rung if o != trial_id):
            return True
        ids = list(rung)
        points = [rung[i][0] for i in ids]
        directions = [o.direction for o in self.objectives]
        violations = [rung[i][1] for i in ids] if self.constraints else None
        order = pareto.best_first(points, directions, violations)
        if trial_id in {ids[i] for i in order[: math.ceil(len(ids) / self.reduction_factor)]}:
            return True
        return not any(pareto.dominates(other, vector, directions) for other in points)
