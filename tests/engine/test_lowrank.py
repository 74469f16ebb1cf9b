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
        a, b = lowrank.factors(base[l.name], bases[l.name], P.FLOAT, l, P.SVD, 1.0)
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
        form, a, b = lr.factors[n]
        assert form == P.SVD and a.shape[1] == b.shape[0] == r
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
        _, a, b = cm.factors[n]
        np.testing.assert_allclose(a @ b, ks[n], atol=1e-5)
        # 4-bit factors: each column of a factor holds at most 15 distinct values
        for f in (a, b):
            assert max(len(np.unique(col)) for col in f.T) <= 15


def test_kronecker_form_is_the_best_sum_of_r_kronecker_products_and_reuses_the_compile(engine):
    """fc1 64 x 300 as sum_i A_i (x) B_i, A_i [8, 15], B_i [8, 20]: its rearrangement R(W)
    [120, 160] (Van Loan and Pitsianis) has rank r, truncated from the pretrained SVD of R(W); a
    plan switching forms and ranks does not compile again, and fine-tuning keeps the rank."""
    fc1 = engine.layers[0]
    assert lowrank.kron_split(64) == (8, 8) and lowrank.kron_split(300) == (15, 20)
    assert lowrank.matrix_shape(fc1, P.KRONECKER) == (120, 160) and lowrank.forms_of(fc1) == (P.SVD, P.KRONECKER)
    base = np.asarray(engine.base_params["fc1"]["kernel"])
    q = lowrank.bases(engine.layers, engine.base_params)[lowrank.basis_key("fc1", P.KRONECKER)]
    a, b = lowrank.factors(base, q, P.FLOAT, fc1, P.KRONECKER, 1.0)  # full rank: W itself
    np.testing.assert_allclose(lowrank.from_matrix(a @ b, fc1, P.KRONECKER), base, atol=1e-5)
    engine.run([P.make_plan(np.zeros(3), rank=[0.25, 1.0, 1.0])])  # the factorizing functions, compiled once
    plans = [P.make_plan(np.zeros(3), rank=[0.05, 1.0, 1.0], form=P.KRONECKER),
             P.make_plan(np.zeros(3), P.UNSTRUCTURED, 8, 8, rank=[0.1, 0.5, 1.0], form=[P.KRONECKER, P.SVD, P.SVD])]
    with count_compiles() as c:
        ev = engine.evaluate(plans[:1], return_models=True).models[0]
        res = engine.run(plans[1:], return_models=True)
    assert c.count == 0, c.durations
    k = np.asarray(ev.params["fc1"]["kernel"])
    r = lowrank.to_matrix(base, fc1, P.KRONECKER)
    u, s_, vt = np.linalg.svd(r, full_matrices=False)
    np.testing.assert_allclose(lowrank.to_matrix(k, fc1, P.KRONECKER), (u[:, :6] * s_[:6]) @ vt[:6], atol=1e-5)
    form, a, b = ev.factors["fc1"]
    assert form == P.KRONECKER and a.shape == (120, 6) and b.shape == (6, 160)
    # the same kernel as the sum of the six Kronecker products the export writes
    np.testing.assert_allclose(sum(np.kron(a[:, i].reshape(8, 15), b[i].reshape(8, 20)) for i in range(6)), k, atol=1e-5)
    cm = res.models[0]
    assert np.all(res.finite) and res.metric[0] > 0.5
    k = np.asarray(cm.params["fc1"]["kernel"])
    assert np.linalg.matrix_rank(lowrank.to_matrix(k, fc1, P.KRONECKER)) == 12  # round(0.1 * 120)
    assert np.linalg.matrix_rank(np.asarray(cm.params["fc2"]["kernel"])) == 50


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
    # a form the layer's shape does not take: the layer, why, and the forms it takes
    with pytest.raises(UserError, match=r"^plan.rank 0.5 factorizes layer fc2 in form spatial, but the spatial form needs "
                                        r"a conv .*; its forms: svd, kronecker$"):
        engine.run([P.make_plan(np.zeros(3), rank=[1.0, 0.5, 1.0], form=P.SPATIAL)])
    prime = Layer(0, "head", ("head",), "dense", (7, 10), (7,), (10,), 1, True, 70, 80)
    with pytest.raises(ValueError, match=r"layer head in form kronecker, but the Kronecker form needs fan-in and width "
                                         r"that split into two factors >= 2, and 7 x 10 does not; its forms: svd$"):
        lowrank.check_plan(P.make_plan(np.zeros(1), rank=0.5, form=P.KRONECKER), [prime])
    # forms, granularities and quantization modes by name, alone or per layer, as by code
    named = P.make_plan([0.5, 0.0, 0.0], "channel", rank=[1.0, 0.5, 0.5], form=["svd", "svd", "kronecker"],
                        quant_mode="codebook")
    assert list(named.form) == [P.SVD, P.SVD, P.KRONECKER] and np.all(named.granularity == P.CHANNEL)
    assert np.all(named.quant_mode == P.CODEBOOK)
    with pytest.raises(ValueError, match=r"^form 'kron' is not one of \['svd', 'spatial', 'kronecker'\]"):
        P.make_plan(np.zeros(3), rank=0.5, form="kron")
    # a Kronecker layer keeps its channels: fc2 pruned by channel, or reading fc1's pruned channels
    for ratio in ([0.0, 0.5, 0.0], [0.5, 0.0, 0.0]):
        with pytest.raises(UserError, match=r"layer fc2 in form kronecker, but its own or its input channels are pruned"):
            engine.run([P.make_plan(ratio, P.CHANNEL, rank=[1.0, 0.5, 1.0], form=P.KRONECKER)])
    dw = Layer(0, "dw", ("dw",), "depthwise", (3, 3, 1, 8), (8, 8, 8), (8, 8, 8), 8, False, 8 * 64 * 9, 72)
    with pytest.raises(ValueError, match=r"layer dw in form svd, but it is a depthwise layer with 8 groups; only Dense and ungrouped conv"):
        lowrank.check_plan(P.make_plan(np.zeros(1), rank=0.5), [dw])
