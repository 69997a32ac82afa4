"""Tests for search.results.pareto: hand-computed cases, Monte Carlo estimates and Optuna as a reference."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pytest
from optuna._hypervolume import compute_hypervolume

from search.results.pareto import (
    dominates,
    hypervolume,
    knee_index,
    normalized_hypervolume,
    pareto_front,
    pareto_ranks,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

_OPTUNA_DIRECTION = {"min": "minimize", "max": "maximize"}


# --- dominance ---------------------------------------------------------------------------------


def test_dominates_min_objectives() -> None:
    assert dominates([1, 2], [2, 3], ["min", "min"])
    assert dominates([1, 3], [2, 3], ["min", "min"])  # equal in one, better in the other
    assert not dominates([2, 3], [1, 2], ["min", "min"])
    assert not dominates([1, 4], [2, 3], ["min", "min"])  # trade-off
    assert not dominates([1, 2], [1, 2], ["min", "min"])  # equal points do not dominate


def test_dominates_mixed_directions() -> None:
    # (accuracy max, size min)
    assert dominates([0.9, 10], [0.8, 20], ["max", "min"])
    assert not dominates([0.8, 10], [0.9, 20], ["max", "min"])
    assert dominates([0.9, 10], [0.9, 20], ["max", "min"])
    assert dominates([5.0], [4.0], ["max"])
    assert not dominates([4.0], [5.0], ["max"])


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError, match="point 2"):
        pareto_ranks([[1, 2], [2, 1], [math.nan, 0]], ["min", "min"])
    with pytest.raises(ValueError, match="point 1"):
        hypervolume([[1, 2], [math.inf, 1]], ["min", "min"], [3, 3])
    with pytest.raises(ValueError, match="point 0"):
        pareto_front([[1, 2, 3]], ["min", "min"])
    with pytest.raises(ValueError, match="directions"):
        pareto_ranks([[1, 2]], ["min", "minimize"])
    with pytest.raises(ValueError, match="violations"):
        pareto_ranks([[1, 2]], ["min", "min"], violations=[-1.0])


# --- non-dominated sorting ---------------------------------------------------------------------

# Both objectives minimised. Worked out by hand:
#   rank 0: (1,5) (2,3) (4,1) and the duplicate (2,3) - nothing dominates them, duplicates tie
#   rank 1: (3,4) [by (2,3)] and (5,2) [by (4,1)]
#   rank 2: (4,5) [by (3,4)]
#   rank 3: (6,6) [by (4,5)]
HAND_POINTS = [(1, 5), (2, 3), (4, 1), (3, 4), (5, 2), (4, 5), (2, 3), (6, 6)]
HAND_RANKS = [0, 0, 0, 1, 1, 2, 0, 3]


def test_pareto_ranks_hand_set() -> None:
    assert pareto_ranks(HAND_POINTS, ["min", "min"]) == HAND_RANKS
    assert pareto_front(HAND_POINTS, ["min", "min"]) == [0, 1, 2, 6]


def test_pareto_ranks_max_is_mirror_of_min() -> None:
    negated = [(-x, -y) for x, y in HAND_POINTS]
    assert pareto_ranks(negated, ["max", "max"]) == HAND_RANKS


def test_pareto_ranks_empty() -> None:
    assert pareto_ranks([], ["min", "max"]) == []
    assert pareto_front([], ["min", "max"]) == []


def test_constrained_ranks() -> None:
    # (size min, accuracy max)
    points = [
        (1, 1),  # feasible, front
        (2, 3),  # feasible, front
        (3, 2),  # feasible, dominated by (2,3)
        (0, 10),  # violation 0.5: dominates everything by objectives, still after the feasible
        (0, 9),  # violation 0.5: dominated by (0,10)
        (0, 100),  # violation 2: worst violation comes last whatever its objectives
    ]
    violations = [0, 0, 0, 0.5, 0.5, 2.0]
    directions = ["min", "max"]
    assert pareto_ranks(points, directions, violations) == [0, 0, 1, 2, 3, 4]
    assert pareto_front(points, directions, violations) == [0, 1]
    # Without constraints the infeasible (0,100) would be the only front point.
    assert pareto_front(points, directions) == [5]


def test_constrained_nothing_feasible() -> None:
    points = [(1, 1), (2, 2), (0, 0)]
    violations = [0.1, 0.1, 3.0]
    assert pareto_ranks(points, ["min", "min"], violations) == [0, 1, 2]
    assert pareto_front(points, ["min", "min"], violations) == []


def _optuna_front(values: np.ndarray, directions: list[str], constraints: np.ndarray | None = None) -> list[int]:
    study = optuna.create_study(directions=[_OPTUNA_DIRECTION[d] for d in directions])
    for i, row in enumerate(values):
        study.add_trial(
            optuna.trial.create_trial(
                values=row.tolist(),
                params={},
                distributions={},
                constraints=None if constraints is None else {"c": float(constraints[i])},
            )
        )
    return sorted(t.number for t in study.best_trials)


@pytest.mark.parametrize("decimals", [None, 1])
def test_front_matches_optuna_best_trials(decimals: int | None) -> None:
    rng = np.random.default_rng(0)
    values = rng.random((200, 3))
    if decimals is not None:
        # Coarse values create ties, and repeating rows creates exact duplicates: the cases where
        # weak vs strict dominance matters (duplicates of a front point are all on the front).
        values = values.round(decimals)
        values = np.vstack([values, values[:50]])
    directions = ["min", "max", "min"]
    ours = pareto_front(values.tolist(), directions)
    assert len(ours) > 3
    assert ours == _optuna_front(values, directions)


def test_constrained_front_matches_optuna_best_trials() -> None:
    rng = np.random.default_rng(1)
    values = rng.random((200, 3))
    directions = ["max", "min", "max"]
    # Optuna: feasible iff constraint <= 0; our violation is the positive part.
    constraints = rng.normal(size=200)
    violations = np.maximum(constraints, 0.0).tolist()
    ours = pareto_front(values.tolist(), directions, violations)
    assert len(ours) > 3
    assert ours == _optuna_front(values, directions, constraints)


# --- hypervolume -------------------------------------------------------------------------------


def test_hypervolume_2d_staircase() -> None:
    # Steps of width 1 under the reference (4,4): heights 1, 2, 3 -> 6.
    staircase = [(1, 3), (2, 2), (3, 1)]
    assert hypervolume(staircase, ["min", "min"], [4, 4]) == pytest.approx(6.0)
    # A dominated point and a duplicate change nothing.
    assert hypervolume(staircase + [(3, 3), (2, 2)], ["min", "min"], [4, 4]) == pytest.approx(6.0)
    # Same staircase with the second objective maximised and reference 0.
    assert hypervolume([(1, 1), (2, 2), (3, 3)], ["min", "max"], [4, 0]) == pytest.approx(6.0)


def test_hypervolume_3d_inclusion_exclusion() -> None:
    ref = [4, 4, 4]
    a, b, c = (1, 2, 3), (2, 1, 2), (3, 3, 1)
    # |A| = 3*2*1 = 6, |B| = 2*3*2 = 12, |A^B| = box from (2,2,3) = 2*2*1 = 4.
    assert hypervolume([a, b], ["min"] * 3, ref) == pytest.approx(6 + 12 - 4)
    # |C| = 1*1*3 = 3, |A^C| = from (3,3,3) = 1, |B^C| = from (3,3,2) = 2, |A^B^C| = 1.
    assert hypervolume([a, b, c], ["min"] * 3, ref) == pytest.approx(6 + 12 + 3 - 4 - 1 - 2 + 1)
    # Duplicates and a point tying on one objective with another.
    assert hypervolume([a, b, c, b, (1, 2, 3)], ["min"] * 3, ref) == pytest.approx(15.0)


def test_hypervolume_1d() -> None:
    assert hypervolume([[3], [1], [5]], ["min"], [4]) == pytest.approx(3.0)
    assert hypervolume([[3], [1]], ["max"], [0]) == pytest.approx(3.0)


def test_hypervolume_empty_and_outside() -> None:
    assert hypervolume([], ["min", "min"], [1, 1]) == 0.0
    assert hypervolume([(5, 1)], ["min", "min"], [4, 4]) == 0.0
    # On the reference boundary: not strictly better, so no volume.
    assert hypervolume([(4, 1), (1, 4)], ["min", "min"], [4, 4]) == 0.0
    # Only the point inside counts.
    assert hypervolume([(5, 0), (3, 3)], ["min", "min"], [4, 4]) == pytest.approx(1.0)


def test_hypervolume_duplicates_only() -> None:
    assert hypervolume([(1, 1, 1)] * 5, ["min"] * 3, [2, 3, 4]) == pytest.approx(6.0)


def _random_front_like(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Points spread near a curved front, so many are non-dominated (harder than a uniform cloud)."""
    directions = rng.random((n, d)) + 0.05
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return directions * rng.uniform(0.8, 1.0, size=(n, 1))


def _monte_carlo_hv(values: np.ndarray, ref: np.ndarray, samples: int, seed: int) -> float:
    """Estimate the minimisation hypervolume by sampling the box between the points' minimum and ref."""
    rng = np.random.default_rng(seed)
    low = values.min(axis=0)
    sample = rng.uniform(low, ref, size=(samples, len(ref)))
    covered = np.zeros(samples, dtype=bool)
    for point in values:
        covered |= np.all(sample >= point, axis=1)
    return float(covered.mean() * np.prod(ref - low))


@pytest.mark.parametrize(("d", "n"), [(2, 60), (3, 60), (4, 40)])
def test_hypervolume_random_vs_monte_carlo_and_optuna(d: int, n: int) -> None:
    rng = np.random.default_rng(d)
    values = _random_front_like(rng, n, d)
    # Mixed directions: maximise every other objective by negating it in the input.
    directions = ["min" if j % 2 == 0 else "max" for j in range(d)]
    signs = np.array([1.0 if x == "min" else -1.0 for x in directions])
    ref = np.full(d, 1.0)
    # Some points lie beyond the reference in one objective and must be ignored.
    values[:5, 0] = 1.2
    raw = values * signs
    ours = hypervolume(raw.tolist(), directions, (ref * signs).tolist())

    inside = values[np.all(values < ref, axis=1)]
    assert ours == pytest.approx(compute_hypervolume(inside, ref), rel=1e-9, abs=1e-12)
    assert ours == pytest.approx(_monte_carlo_hv(inside, ref, 200_000, seed=d), rel=0.02)


# --- normalised hypervolume --------------------------------------------------------------------


def test_normalized_hypervolume_hand_case() -> None:
    directions = ["max", "min"]  # (accuracy, size)
    baseline = [0.8, 100.0]
    # Scaled: (1.0, 0.5) and (0.5, 0.1); reference (0, 1.1).
    # Sweep over accuracy from 1.0 down: [0.5,1.0] x (1.1-0.5) = 0.3, [0,0.5] x (1.1-0.1) = 0.5.
    points = [(0.8, 50.0), (0.4, 10.0), (0.9, 120.0)]  # the last is above 110% of the size
    assert normalized_hypervolume(points, directions, baseline) == pytest.approx(0.8)
    # The unit of an objective does not matter once normalised.
    in_kb = [(a, s * 1000) for a, s in points]
    assert normalized_hypervolume(in_kb, directions, [0.8, 100_000.0]) == pytest.approx(0.8)
    # The baseline itself: 1 x (1.1 - 1) = 0.1.
    assert normalized_hypervolume([baseline], directions, baseline) == pytest.approx(0.1)


def test_normalized_hypervolume_rejects_bad_baseline() -> None:
    with pytest.raises(ValueError, match="baseline"):
        normalized_hypervolume([(0.5, 1.0)], ["max", "min"], [0.8, 0.0])
    with pytest.raises(ValueError, match="baseline"):
        normalized_hypervolume([(0.5, 1.0)], ["max", "min"], [-0.8, 1.0])


# --- knee ---------------------------------------------------------------------------------------


def test_knee_index_hand_case() -> None:
    # Front (0,10) (1,3) (4,2) (10,0); normalised: (0,1) (.1,.3) (.4,.2) (1,0);
    # distances 1, 0.316, 0.447, 1 -> (1,3), which is index 3. (5,5) is dominated.
    points = [(5, 5), (0, 10), (4, 2), (1, 3), (10, 0)]
    assert knee_index(points, ["min", "min"]) == 3
    # Maximising the second objective after negating it gives the same knee.
    assert knee_index([(x, -y) for x, y in points], ["min", "max"]) == 3


def test_knee_index_ties_and_single() -> None:
    assert knee_index([(0, 1), (1, 0)], ["min", "min"]) == 0
    assert knee_index([(7, 7)], ["min", "max"]) == 0
    # A dominated point never wins, even if it comes first.
    assert knee_index([(2, 2), (1, 1)], ["min", "min"]) == 1
    with pytest.raises(ValueError):
        knee_index([], ["min"])
