"""Pareto dominance, non-dominated sorting, hypervolume and knee selection.

Every function takes raw objective values plus one direction per objective ("min" or "max"),
so callers never flip signs themselves. Internally everything is turned into minimisation by
negating the "max" objectives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

Direction = Literal["min", "max"]

# Reference value per direction for normalized_hypervolume, in units of the baseline's value.
_NORMALIZED_REFERENCE = {"min": 1.1, "max": 0.0}


def _check_directions(directions: Sequence[str]) -> None:
    if len(directions) == 0:
        raise ValueError("directions must name at least one objective, got none.")
    for i, direction in enumerate(directions):
        if direction not in ("min", "max"):
            raise ValueError(f"directions[{i}] must be 'min' or 'max', got {direction!r}.")


def _signs(directions: Sequence[str]) -> np.ndarray:
    """Return +1 for "min" and -1 for "max", so that ``values * signs`` is always minimised."""
    _check_directions(directions)
    return np.array([1.0 if d == "min" else -1.0 for d in directions])


def _to_minimisation(points: Sequence[Sequence[float]], directions: Sequence[str]) -> np.ndarray:
    """Validate ``points`` and return them as an (n, d) float array in which lower is better.

    Raises:
        ValueError: If a point has the wrong number of objectives or a NaN/infinite value; the
            message names the point's index.
    """
    signs = _signs(directions)
    d = len(directions)
    rows = []
    for i, point in enumerate(points):
        row = np.asarray(point, dtype=float)
        if row.shape != (d,):
            raise ValueError(f"point {i} must have {d} objective values (one per direction), got {list(point)}.")
        if not np.all(np.isfinite(row)):
            raise ValueError(f"point {i} has a NaN or infinite value: {list(point)}.")
        rows.append(row * signs)
    if not rows:
        return np.empty((0, d))
    return np.stack(rows)


def _check_violations(violations: Sequence[float], n: int) -> np.ndarray:
    values = np.asarray(violations, dtype=float)
    if values.shape != (n,):
        raise ValueError(f"violations must have one value per point ({n}), got {len(violations)}.")
    for i, v in enumerate(values):
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"violations[{i}] must be a finite number >= 0 (0 = feasible), got {v}.")
    return values


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    """Return whether ``a`` Pareto-dominates ``b``.

    ``a`` dominates ``b`` when it is no worse in every objective and strictly better in at least
    one. Equal points do not dominate each other.

    Args:
        a: Objective values of the first point.
        b: Objective values of the second point.
        directions: "min" or "max" per objective.

    Returns:
        True if ``a`` dominates ``b``.
    """
    both = _to_minimisation([a, b], directions)
    return bool(np.all(both[0] <= both[1]) and np.any(both[0] < both[1]))


def _nondominated_sort(values: np.ndarray) -> list[int]:
    """Rank minimisation points by repeatedly peeling off the non-dominated layer.

    Args:
        values: (n, d) array, lower is better.

    Returns:
        Rank per row; 0 is the Pareto front of ``values``.
    """
    n = len(values)
    # dominated_by[i] = how many points dominate i; beats[i] = the points that i dominates.
    dominated_by = np.zeros(n, dtype=int)
    beats: list[np.ndarray] = []
    for i in range(n):
        no_worse = np.all(values[i] <= values, axis=1)
        better = np.any(values[i] < values, axis=1)
        mask = no_worse & better
        beats.append(np.flatnonzero(mask))
        dominated_by[mask] += 1

    ranks = [-1] * n
    layer = [i for i in range(n) if dominated_by[i] == 0]
    rank = 0
    while layer:
        next_layer = []
        for i in layer:
            ranks[i] = rank
            for j in beats[i]:
                dominated_by[j] -= 1
                if dominated_by[j] == 0:
                    next_layer.append(int(j))
        layer = next_layer
        rank += 1
    return ranks


def pareto_ranks(
    points: Sequence[Sequence[float]],
    directions: Sequence[str],
    violations: Sequence[float] | None = None,
) -> list[int]:
    """Sort points into non-dominated layers.

    Without ``violations`` this is plain non-dominated sorting: rank 0 is the Pareto front, rank 1
    the front once rank 0 is removed, and so on. Equal points share a rank.

    With ``violations`` (Deb's constrained domination, simplified): feasible points (violation 0)
    are sorted among themselves first; infeasible points come after every feasible one, in order
    of increasing violation, each group of equal violation sorted among itself by objectives and
    starting at the rank after the previous group's last rank.

    Args:
        points: Objective values, one sequence per point.
        directions: "min" or "max" per objective.
        violations: Total constraint violation per point, >= 0; 0 means feasible.

    Returns:
        Rank per point, in the order of ``points``.

    Raises:
        ValueError: If a point has a NaN/infinite value or the wrong length (the message names
            its index), or a violation is negative or not finite.
    """
    values = _to_minimisation(points, directions)
    n = len(values)
    if violations is None:
        return _nondominated_sort(values)

    violation = _check_violations(violations, n)
    ranks = [-1] * n
    next_rank = 0
    # np.unique sorts, so 0 (feasible) comes first, then ever larger violations.
    for level in np.unique(violation):
        group = np.flatnonzero(violation == level)
        group_ranks = _nondominated_sort(values[group])
        for index, rank in zip(group, group_ranks):
            ranks[int(index)] = next_rank + rank
        next_rank += max(group_ranks) + 1
    return ranks


def pareto_front(
    points: Sequence[Sequence[float]],
    directions: Sequence[str],
    violations: Sequence[float] | None = None,
) -> list[int]:
    """Return the indices of the Pareto-optimal points, in increasing order.

    Args:
        points: Objective values, one sequence per point.
        directions: "min" or "max" per objective.
        violations: Total constraint violation per point, >= 0; 0 means feasible. When given,
            only feasible points can be on the front, and no feasible point gives an empty front.

    Returns:
        Indices of the points with rank 0 (and violation 0, if ``violations`` is given).

    Raises:
        ValueError: Same as :func:`pareto_ranks`.
    """
    ranks = pareto_ranks(points, directions, violations)
    front = [i for i, rank in enumerate(ranks) if rank == 0]
    if violations is not None:
        # When nothing is feasible the best infeasible group gets rank 0; it is still not a front.
        front = [i for i in front if violations[i] == 0]
    return front


def _hypervolume_min(values: np.ndarray, reference: np.ndarray) -> float:
    """Exact hypervolume of minimisation points that all strictly dominate ``reference``.

    Uses a sweep for 1 and 2 objectives and hypervolume-by-slicing (HSO) above: slicing along the
    last objective at every distinct value, each slab's volume is its thickness times the
    (d-1)-dimensional hypervolume of the points that reach into it.

    Args:
        values: (n, d) array with n >= 1, every row < ``reference`` in every column.
        reference: (d,) array.

    Returns:
        The hypervolume.
    """
    d = values.shape[1]
    if d == 1:
        return float(reference[0] - values[:, 0].min())
    if d == 2:
        # Sweep left to right in x; between x_i and x_{i+1} the covered height is set by the
        # lowest y seen so far, which also makes dominated points and duplicates harmless.
        order = np.lexsort((values[:, 1], values[:, 0]))
        xs = values[order, 0]
        ys = values[order, 1]
        right_edges = np.append(xs[1:], reference[0])
        best_y = np.minimum.accumulate(ys)
        return float(np.sum((right_edges - xs) * (reference[1] - best_y)))

    values = values[_nondominated_mask(values)]
    order = np.argsort(values[:, -1], kind="stable")
    values = values[order]
    last = values[:, -1]
    upper = np.append(last[1:], reference[-1])
    total = 0.0
    for k in range(len(values)):
        thickness = upper[k] - last[k]
        # Points sharing a last-objective value give zero-thickness slabs; the last of them
        # carries the slab with all of them included.
        if thickness > 0:
            total += thickness * _hypervolume_min(values[: k + 1, :-1], reference[:-1])
    return total


def _nondominated_mask(values: np.ndarray) -> np.ndarray:
    """Return a mask keeping one copy of each non-dominated minimisation point.

    Dropping dominated points and duplicates does not change the hypervolume, but keeps the
    slicing recursion small.
    """
    unique = np.unique(values, axis=0, return_index=True)[1]
    keep = np.zeros(len(values), dtype=bool)
    keep[unique] = True
    for i in np.flatnonzero(keep):
        no_worse = np.all(values <= values[i], axis=1)
        better = np.any(values < values[i], axis=1)
        if np.any(no_worse & better):
            keep[i] = False
    return keep


def hypervolume(
    points: Sequence[Sequence[float]],
    directions: Sequence[str],
    reference: Sequence[float],
) -> float:
    """Exact hypervolume dominated by ``points`` and bounded by ``reference``.

    "max" objectives are negated internally, so ``reference`` is given in the raw units: for a
    "max" objective it is a lower bound, for a "min" objective an upper bound. A point counts only
    if it is strictly better than the reference in every objective. Exact for any number of
    objectives; cost grows quickly past 4 objectives or a few hundred non-dominated points.

    Args:
        points: Objective values, one sequence per point.
        directions: "min" or "max" per objective.
        reference: Reference point, one finite value per objective.

    Returns:
        The hypervolume; 0.0 when no point strictly dominates the reference (or none is given).

    Raises:
        ValueError: If a point or the reference has a NaN/infinite value or the wrong length.
    """
    values = _to_minimisation(points, directions)
    ref = np.asarray(reference, dtype=float)
    if ref.shape != (len(directions),):
        raise ValueError(f"reference must have {len(directions)} values (one per direction), got {list(reference)}.")
    if not np.all(np.isfinite(ref)):
        raise ValueError(f"reference has a NaN or infinite value: {list(reference)}.")
    ref = ref * _signs(directions)
    inside = values[np.all(values < ref, axis=1)]
    if len(inside) == 0:
        return 0.0
    return _hypervolume_min(inside, ref)


def normalized_hypervolume(
    points: Sequence[Sequence[float]],
    directions: Sequence[str],
    baseline: Sequence[float],
) -> float:
    """Hypervolume in units of a baseline model, comparable across searches of that baseline.

    Every objective is divided by the baseline's value for it, so the baseline sits at (1, ..., 1).
    The reference point is then fixed: 0 for "max" objectives (e.g. accuracy may drop to anything
    above zero) and 1.1 for "min" objectives (a model must cost less than 110% of the baseline to
    count). Because the scale and the reference depend only on the baseline, the hypervolumes of
    different searches (methods, budgets, seeds) over the same baseline can be compared directly,
    and the unit does not depend on whether cost is measured in bytes or megabytes.

    Args:
        points: Objective values, one sequence per point, in the same units as ``baseline``.
        directions: "min" or "max" per objective.
        baseline: The uncompressed model's value per objective; each must be finite and > 0.

    Returns:
        The normalised hypervolume.

    Raises:
        ValueError: If a baseline value is not finite and > 0, or for the reasons of
            :func:`hypervolume`.
    """
    _check_directions(directions)
    scale = np.asarray(baseline, dtype=float)
    if scale.shape != (len(directions),):
        raise ValueError(f"baseline must have {len(directions)} values (one per direction), got {list(baseline)}.")
    for i, value in enumerate(scale):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"baseline[{i}] must be a finite number > 0 to normalise by it, got {value}.")
    # Validate before dividing so that the error names the raw point.
    values = _to_minimisation(points, directions) * _signs(directions)
    scaled = (values / scale).tolist()
    reference = [_NORMALIZED_REFERENCE[d] for d in directions]
    return hypervolume(scaled, directions, reference)


def knee_index(points: Sequence[Sequence[float]], directions: Sequence[str]) -> int:
    """Pick the most balanced point of the Pareto front.

    Each objective is min-max normalised over the front to [0, 1] with 0 the best value (an
    objective that is constant on the front becomes 0); the knee is the front point closest in
    Euclidean distance to the ideal point (0, ..., 0).

    Args:
        points: Objective values, one sequence per point.
        directions: "min" or "max" per objective.

    Returns:
        Index into ``points`` of the knee; on ties the lowest index.

    Raises:
        ValueError: If ``points`` is empty, or for the reasons of :func:`pareto_ranks`.
    """
    values = _to_minimisation(points, directions)
    if len(values) == 0:
        raise ValueError("knee_index needs at least one point, got none.")
    front = pareto_front(points, directions)
    on_front = values[front]
    low = on_front.min(axis=0)
    span = on_front.max(axis=0) - low
    # A constant objective cannot tell front points apart; dividing by 1 maps it to all zeros.
    scaled = (on_front - low) / np.where(span > 0, span, 1.0)
    distances = np.sqrt(np.sum(scaled**2, axis=1))
    # front is in increasing index order and argmin returns the first minimum: lowest index wins.
    return front[int(np.argmin(distances))]


def crowding_distances(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[float]:
    """NSGA-II's crowding distance of each point within ``points`` (one front).

    Per objective the points are sorted; the two ends get infinity and every other point the gap
    between its neighbours divided by the objective's span. A point's distance is the sum over
    objectives: a larger distance is a point in a sparser part of the front.

    Args:
        points: Objective values, one sequence per point.
        directions: "min" or "max" per objective.

    Returns:
        Distance per point, in the order of ``points``.
    """
    values = _to_minimisation(points, directions)
    n = len(values)
    distances = np.zeros(n)
    if n <= 2:
        return [math.inf] * n
    for column in values.T:
        order = np.argsort(column, kind="stable")
        span = column[order[-1]] - column[order[0]]
        distances[order[0]] = distances[order[-1]] = math.inf
        if span > 0:
            gaps = (column[order[2:]] - column[order[:-2]]) / span
            distances[order[1:-1]] += gaps
    return distances.tolist()


def best_first(
    points: Sequence[Sequence[float]],
    directions: Sequence[str],
    violations: Sequence[float] | None = None,
) -> list[int]:
    """Indices of ``points`` from best to worst: non-dominated rank, then crowding distance.

    Ranks are those of :func:`pareto_ranks` (with ``violations``, every infeasible point after
    every feasible one); within a rank a point with a larger crowding distance comes first, and
    equal distances keep the order of ``points``.

    Raises:
        ValueError: Same as :func:`pareto_ranks`.
    """
    ranks = pareto_ranks(points, directions, violations)
    crowding = [0.0] * len(ranks)
    for rank in set(ranks):
        members = [i for i, r in enumerate(ranks) if r == rank]
        for i, distance in zip(members, crowding_distances([points[i] for i in members], directions)):
            crowding[i] = distance
    return sorted(range(len(ranks)), key=lambda i: (ranks[i], -crowding[i], i))
