"""Pareto functions on small hand-made sets with known answers."""
import numpy as np
import pytest

from search.report import pareto


def test_to_loss_negates_maximised_objectives():
    loss = pareto.to_loss(np.array([[0.9, 2.0], [0.8, 1.0]]), ["maximize", "minimize"])
    np.testing.assert_array_equal(loss, [[-0.9, 2.0], [-0.8, 1.0]])


def test_dominance_and_front():
    assert pareto.dominates([1, 2], [1, 3])
    assert not pareto.dominates([1, 3], [1, 3])  # equal: no one dominates
    assert not pareto.dominates([1, 3], [2, 2])
    loss = np.array([[1, 5], [2, 3], [3, 4], [4, 1], [2, 3], [np.nan, 0]], float)
    front = pareto.non_dominated(loss)
    # (3, 4) is dominated by (2, 3); duplicates of a front point both stay; NaN rows never count
    np.testing.assert_array_equal(front, [True, True, False, True, True, False])
    # restricted to a mask: without (2, 3) twice, (3, 4) joins the front
    np.testing.assert_array_equal(pareto.non_dominated(loss, [True, False, True, True, False, False]),
                                  [True, False, True, True, False, False])


def test_feasibility_comes_first():
    cons = np.array([[-1.0, 0.0], [0.5, -1.0], [np.nan, -1.0], [2.0, 1.0]])
    np.testing.assert_allclose(pareto.violation(cons), [0.0, 0.5, np.inf, 3.0])
    # the infeasible rows dominate the feasible one, yet the feasible one is the front (rank 0);
    # infeasible rows follow in order of violation
    loss = np.array([[5.0, 5.0], [1.0, 1.0], [0.0, 0.0], [2.0, 2.0]])
    rank = pareto.nondominated_rank(loss, np.all(cons <= 0, axis=1), cons)
    assert rank[0] == 0
    assert rank[1] < rank[3] < rank[2]
    # two feasible fronts
    rank = pareto.nondominated_rank(np.array([[1, 1], [2, 2], [0, 3], [3, 3]], float))
    np.testing.assert_array_equal(rank, [0, 1, 0, 2])


def test_budget_constraints():
    costs = {"latency_ms": np.array([1.0, 3.0]), "memory_kb": np.array([10.0, 5.0]), "size_kb": np.array([1.0, 1.0])}
    cons = pareto.budget_constraints(costs, {"latency_ms": 2.0, "memory_kb": 8.0, "size_kb": None})
    np.testing.assert_array_equal(cons, [[-1.0, 2.0], [1.0, -3.0]])
    assert pareto.budget_constraints(costs, {"latency_ms": None}).shape == (2, 0)


def test_hypervolume_of_known_sets():
    # staircase (1,3), (2,2), (3,1) up to (4,4): 3 + 2 + 1 = 6
    pts = np.array([[1, 3], [2, 2], [3, 1]], float)
    assert pareto.hypervolume(pts, np.array([4.0, 4.0])) == pytest.approx(6.0)
    # a dominated point and one beyond the reference add nothing
    more = np.vstack([pts, [[3, 3], [5, 0]]])
    assert pareto.hypervolume(more, np.array([4.0, 4.0])) == pytest.approx(6.0)
    # normalised to the box [ideal (1, 1), reference (4, 4)]: 6 / 9
    assert pareto.hypervolume(pts, np.array([4.0, 4.0]), np.array([1.0, 1.0])) == pytest.approx(6 / 9)
    # 3-D: boxes of volume 0.5 and 0.25 overlapping in 0.125
    pts3 = np.array([[0, 0, 0.5], [0.5, 0.5, 0]])
    assert pareto.hypervolume(pts3, np.ones(3)) == pytest.approx(0.625)
    assert pareto.hypervolume(np.zeros((0, 2)), np.ones(2)) == 0.0


def test_hypervolume_history_grows_with_the_front():
    loss = np.array([[3, 1], [2, 2], [2.5, 2.5], [1, 3], [0, 0]], float)
    feasible = np.array([True, True, True, True, False])
    hv = pareto.hypervolume_history(loss, feasible, np.array([4.0, 4.0]))
    np.testing.assert_allclose(hv, [3.0, 5.0, 5.0, 6.0, 6.0])  # dominated and infeasible rows add nothing


def test_reference_and_ideal_points():
    loss = np.array([[0.0, 10.0], [1.0, 20.0], [9.0, 0.0]])
    np.testing.assert_allclose(pareto.reference_point(loss, [True, True, False]), [1.1, 21.0])
    np.testing.assert_allclose(pareto.ideal_point(loss), [0.0, 0.0])
