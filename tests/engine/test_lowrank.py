"""Low-rank factorization in the engine (issue 18): rank 1 is the layer itself, the achieved rank
is the plan's, fine-tuning keeps it, plans of other ranks reuse the compile, bad plans are one
line. The trained LeNet-300-100 on digits of tests/engine/conftest.py (fc1 64x300 factorizes on
its left side, fc2 300x100 and fc3 100x10 on their right), on test_engine.py's engine, so that
in a whole run its functions are already compiled."""
from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from search.compression import lowrank
from search.compression import plan as P
from search.compression.layers import Layer
from search.engine.compiles import count_compiles
from search.errors import UserError


@pytest.fixture(scope="module")
def engine(lenet300_engine):
    return lenet300_engine  # conftest.py: test_engine.py's engine, compiled once per run


@pytest.fixture(autouse=True)
def one_blas_thread():
    """numpy's SVDs on one thread: OpenBLAS's threads spin next to JAX's (0.6 s for a 64x300 SVD)."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _kernels(cm):
    return {n: np.asarray(cm.params[n]["kernel"]) for n in ("fc1", "fc2", "fc3")}


def test_rank_one_is_the_layer_and_the_achieved_rank_is_the_plans(engine):
    base = {n: np.asarray(engine.base_params[n]["kernel"]) for n in ("fc1", "fc2", "fc3")}
    # the projection itself at full rank: Q Q^T = I to float rounding, on either side
    bases = lowrank.bases(engine.layers, engine.base_params)
    for l in engine.layers:
        a, b = lowrank.factors(base[l.name], bases[l.name], P.FLOAT, lowrank.right_side(l), 1.0)
        np.testing.assert_allclose(a @ b, base[l.name], atol=1e-5)
    assert [lowrank.right_side(l) for l in engine.layers] == [False, True, True]
    full, lr = engine.evaluate([P.make_plan(np.zeros(3)),
                                P.make_plan(np.zeros(3), rank=[0.25, 0.5, 1.0])], return_models=True).models
    # a plan at rank 1 computes with the pretrained kernels exactly (the projection is skipped)
    for n, k in _kernels(full).items():
        np.testing.assert_array_equal(k, base[n])
    got = _kernels(lr)
    np.testing.assert_array_equal(got["fc3"], base["fc3"])
    # r = round(rank * min(fan_in, out)): fc1 64x300 -> 16, fc2 300x100 -> 50
    for n, r in (("fc1", 16), ("fc2", 50)):
        assert np.linalg.matrix_rank(got[n]) == r, n
        a, b = lr.factors[n]
        assert a.shape[1] == b.shape[0] == r
        np.testing.assert_allclose(a @ b, got[n], atol=1e-5)
        # the best rank-r approximation (Eckart-Young): the SVD truncated at r
        u, s, vt = np.linalg.svd(base[n], full_matrices=False)
        np.testing.assert_allclose(got[n], (u[:, :r] * s[:r]) @ vt[:r], atol=1e-5)
    assert set(lr.factors) == {"fc1", "fc2"}


def test_fine_tuned_quantized_factors_keep_the_rank_and_the_compile(engine):
    plan = P.make_plan([0.0, 0.5, 0.0], [P.UNSTRUCTURED, P.CHANNEL, P.UNSTRUCTURED], 6, 8, rank=[0.5, 0.75, 1.0])
    engine.run([plan])  # compiled once for every plan of the study
    other = P.make_plan([0.0, 0.25, 0.0], [P.UNSTRUCTURED, P.CHANNEL, P.UNSTRUCTURED], 4, 8, rank=[0.25, 0.25, 1.0])
    with count_compiles() as c:
        res = engine.run([other, P.make_plan(np.zeros(3))], return_models=True)
    assert c.count == 0, c.durations
    cm = res.models[0]
    assert np.all(res.finite)
    ks = _kernels(cm)
    # fine-tuned, the kernels are still rank r: 16 and 25, B's pruned columns 0
    assert np.linalg.matrix_rank(ks["fc1"]) == 16 and np.linalg.matrix_rank(ks["fc2"]) == 25
    assert (np.abs(ks["fc2"]).sum(axis=0) == 0).sum() == 25  # round(0.25 * 100) channels removed
    assert res.metric[0] > 0.5  # still a classifier (10 classes)
    for n in ("fc1", "fc2"):
        a, b = cm.factors[n]
        np.testing.assert_allclose(a @ b, ks[n], atol=1e-5)
        # 4-bit factors: each column of a factor holds at most 15 distinct values
        for f in (a, b):
            assert max(len(np.unique(col)) for col in f.T) <= 15


def test_bad_ranks_are_one_line_errors_naming_the_layer(engine):
    for bad in (0.0, 1.5, np.nan):
        with pytest.raises(ValueError, match=r"plan.rank of layer 1 .*\(0, 1\]"):
            P.validate_plan(P.make_plan(np.zeros(3), rank=[1.0, bad, 1.0]))
        with pytest.raises(UserError, match=r"^plan.rank of layer fc2 is .*; a rank ratio lies in \(0, 1\]"):
            engine.run([P.make_plan(np.zeros(3), rank=[1.0, bad, 1.0])])
    with pytest.raises(UserError, match=r"^plan.rank 0.5 factorizes layer fc2, which its group prunes weight by weight"):
        engine.run([P.make_plan([0.0, 0.5, 0.0], rank=[1.0, 0.5, 1.0])])
    with pytest.raises(UserError, match=r"layer fc1, a codebook layer"):
        engine.run([P.make_plan(np.zeros(3), 0, 4, 32, P.CODEBOOK, rank=[0.5, 1.0, 1.0])])
    dw = Layer(0, "dw", ("dw",), "depthwise", (3, 3, 1, 8), (8, 8, 8), (8, 8, 8), 8, False, 8 * 64 * 9, 72)
    with pytest.raises(ValueError, match=r"layer dw, a depthwise layer with 8 groups; only Dense and ungrouped conv"):
        lowrank.check_plan(P.make_plan(np.zeros(1), rank=0.5), [dw])
