"""hessian probe against a dense torch.func.hessian + eigvalsh on a tiny net (float64)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lsdb.errors import ProbeSkipped
from lsdb.probes import _directions as D
from lsdb.probes import hessian as H
from lsdb.probes.base import JobRequest
from tests import tiny_cases as tc

DT = tc.DT
CASE = tc.case("tanh16")  # a tanh MLP (about 1.1k parameters) on 96 inputs of dimension 16, 4 classes
BATCH = tc.train_subset(96, 64)  # the probe's fixed batch: batch_size=64 of the 96 training inputs


def _data():
    """The case's data with the first 8 training inputs as its test split."""
    data = CASE.data()
    return dataclasses.replace(data, x_test=data.x_train[:8], y_test=data.y_train[:8])


@pytest.fixture(scope="module")
def dense():
    """Dense Hessian of the probe's loss (mean CE on its fixed batch) and its eigenvalues."""
    model, data = CASE.model(), _data()
    Hd = tc.dense_hessian(model, data.x_train[BATCH], data.y_train[BATCH])
    return {"H": Hd, "eig": torch.linalg.eigvalsh(Hd).flip(0), "model": model, "data": data, "P": Hd.shape[0]}


def _ctx(model, data, tmp_path, inputs=None, seed=0):
    return tc.context(model, data, tmp_path, inputs=inputs, seed=seed)


def _operator(dense, method="double_backward"):
    model, data = dense["model"], dense["data"]
    params = {n: p.detach() for n, p in model.named_parameters()}
    return H.HessianOperator(D.loss_function(model, {}, data.x_train[BATCH], data.y_train[BATCH]), params, method, 8)


def _quadratic(A, w):
    """The operator of L(w) = ½ wᵀAw (Hessian A) by double backward, at ``w``."""
    return H.HessianOperator(lambda p: 0.5 * p["w"] @ A @ p["w"], {"w": w}, "double_backward")


@pytest.mark.parametrize("method", ["double_backward", "fwd_rev"])
def test_hvp_matches_dense(dense, method):
    op = _operator(dense, method)
    V = torch.randn(5, op.P, generator=torch.Generator().manual_seed(1), dtype=DT)
    torch.testing.assert_close(op.matmat(V), V @ dense["H"], rtol=1e-10, atol=1e-12)
    assert op.hvps == 5


def test_residuals_from_stored_products_equal_explicit_ones(dense):
    """The verified residuals reuse the Lanczos products H q_j; recomputing H y directly agrees."""
    op = _operator(dense)
    top = H.lanczos_top(op, 3, 1e-4, 200, generator=torch.Generator().manual_seed(0))
    assert op.hvps == top.iters  # no HVP beyond the Lanczos steps
    explicit = (op.matmat(top.vectors) - top.values[:, None] * top.vectors).norm(dim=1)
    torch.testing.assert_close(top.residuals, explicit, rtol=1e-6, atol=1e-12)
    assert float(top.residuals.max()) <= 1e-4 * float(dense["eig"].abs().max())


def test_top5_and_trace_match_dense(dense, tmp_path):
    assert 1000 < dense["P"] < 3000
    params = H.Params(batch_size=64, top_k=5, tol=1e-9, max_iter=400, trace_hvps=150, density_vectors=3,
                      density_iters=40)
    out = H.compute(_ctx(dense["model"], dense["data"], tmp_path), params)
    row = out["hessian"][0]
    assert row["converged"] is True
    got = torch.tensor([r["value"] for r in out["hessian_eigenvalue"]], dtype=DT)
    torch.testing.assert_close(got, dense["eig"][:5], rtol=1e-6, atol=0)
    assert row["max_residual"] <= 1e-9 * float(dense["eig"].abs().max())
    assert row["top_eigenvalue"] == pytest.approx(float(dense["eig"][0]), rel=1e-6)
    true_trace = float(torch.trace(dense["H"]))
    assert row["trace_method"] == "deflated" and row["trace_hvps"] == 150
    assert abs(row["trace"] - true_trace) <= 3 * row["trace_stderr"]
    assert row["density_hvps"] == 3 * 40
    assert row["hvps"] == row["lanczos_iters"] + 150 + 120  # residuals from stored products: no extra HVP

    # density: unit mass, mean ≈ trace / P
    grid = torch.tensor([r["grid"] for r in out["hessian_density"]], dtype=DT)
    dens = torch.tensor([r["density"] for r in out["hessian_density"]], dtype=DT)
    assert float(torch.trapezoid(dens, grid)) == pytest.approx(1.0, abs=1e-6)
    mean = float(torch.trapezoid(grid * dens, grid))
    # SLQ's mean is a Hutchinson estimate of trace/P from unit Rademacher vectors, whose variance
    # is 2(‖H‖²_F − Σ H_ii²)/P² per vector
    Hd = dense["H"]
    se = math.sqrt(2 * float((Hd**2).sum() - (torch.diagonal(Hd) ** 2).sum()) / 3) / dense["P"]
    assert abs(mean - true_trace / dense["P"]) <= 3 * se


def test_density_mean_is_average_rayleigh_quotient(dense):
    op = _operator(dense)
    nodes = H.slq_nodes(op, 3, 30, torch.Generator().manual_seed(5))
    grid, dens = H.slq_density(nodes, 400, 0.01)
    # Σ_j τ_j θ_j = e₁ᵀ T e₁ = vᵀHv for each unit start vector v: the quadrature's mean, exactly
    V = (torch.randint(0, 2, (3, op.P), generator=torch.Generator().manual_seed(5)) * 2 - 1).to(DT) / math.sqrt(op.P)
    rq = float(((V @ dense["H"]) * V).sum(1).mean())
    assert float(torch.trapezoid(grid * dens, grid)) == pytest.approx(rq, rel=1e-6)
    assert sum(float(t.sum()) for _, t in nodes) == pytest.approx(3.0, rel=1e-12)


def test_hutchinson_and_hutchpp_within_three_se(dense):
    true_trace = float(torch.trace(dense["H"]))
    for fn in (H.hutchinson, H.hutch_pp):
        op = _operator(dense)
        est, se = fn(op, 150, torch.Generator().manual_seed(3))
        assert op.hvps == 150
        assert abs(est - true_trace) <= 3 * se, fn.__name__


def test_deflated_trace_within_three_se_and_sharper_than_hutchpp(dense):
    """Deflation by the Lanczos basis of a top-5 run: unbiased (within 3 SE of the dense trace) and,
    at the same number of extra HVPs, a smaller standard error than Hutch++ on this spectrum."""
    true = float(torch.trace(dense["H"]))
    op = _operator(dense)
    top = H.lanczos_top(op, 5, 1e-6, 200, generator=torch.Generator().manual_seed(0))
    before = op.hvps
    est, se = H.deflated_hutchinson(op, top.basis, top.products, 30, torch.Generator().manual_seed(1))
    assert op.hvps - before == 30
    assert abs(est - true) <= 3 * se
    _, se_pp = H.hutch_pp(_operator(dense), 30, torch.Generator().manual_seed(1))
    assert se < se_pp


def test_deflated_trace_exact_when_basis_spans_space():
    """A Lanczos run to the full dimension leaves nothing to sample: the estimate is exact."""
    torch.manual_seed(0)
    A = torch.randn(40, 40, dtype=DT)
    A = A + A.T
    w = torch.zeros(40, dtype=DT)
    op = _quadratic(A, w)
    top = H.lanczos_top(op, 3, 1e-12, 40, generator=torch.Generator().manual_seed(0))
    assert top.basis.shape[0] == 40
    est, se = H.deflated_hutchinson(op, top.basis, top.products, 4, torch.Generator().manual_seed(1))
    assert est == pytest.approx(float(torch.trace(A)), abs=1e-9)
    assert se == pytest.approx(0.0, abs=1e-9)


def test_hutchpp_exact_when_sketch_spans_space():
    # L(w) = ½ wᵀAw has Hessian A; with a sketch of P vectors Q spans R^P and Hutch++ is exact
    g = torch.Generator().manual_seed(0)
    B = torch.randn(30, 30, generator=g, dtype=DT)
    A = B @ B.T
    op = _quadratic(A, torch.randn(30, dtype=DT))
    est, _ = H.hutch_pp(op, 90, g)
    assert est == pytest.approx(float(torch.trace(A)), rel=1e-10)
    top = H.lanczos_top(op, 3, 1e-10, 30, generator=g)
    torch.testing.assert_close(top.values, torch.linalg.eigvalsh(A).flip(0)[:3], rtol=1e-10, atol=0)


def test_not_converged_is_reported(dense, tmp_path):
    params = H.Params(batch_size=64, top_k=5, tol=1e-9, max_iter=6, trace_hvps=6, density_vectors=1, density_iters=4)
    row = H.compute(_ctx(dense["model"], dense["data"], tmp_path), params)["hessian"][0]
    assert row["converged"] is False
    assert row["lanczos_iters"] == 6
    assert row["max_residual"] > 1e-9 * abs(row["top_eigenvalue"])
    # and the explicit residuals are what the rows hold
    op = _operator(dense)
    top = H.lanczos_top(op, 5, 1e-9, 6, generator=torch.Generator().manual_seed(0))
    res = (top.vectors @ dense["H"] - top.values[:, None] * top.vectors).norm(dim=1)
    torch.testing.assert_close(top.residuals, res, rtol=1e-8, atol=1e-12)
    assert top.converged is False


def test_gap_criterion_needs_fewer_steps(dense):
    res = H.lanczos_top(_operator(dense), 1, 1e-6, 400, generator=torch.Generator().manual_seed(0))
    gap = H.lanczos_top(_operator(dense), 1, 1e-6, 400, generator=torch.Generator().manual_seed(0), criterion="gap")
    assert res.converged and gap.converged and gap.iters <= res.iters
    assert float(gap.values[0]) == pytest.approx(float(dense["eig"][0]), rel=1e-6)


def test_warm_start_from_artifact(dense, tmp_path):
    params = H.Params(batch_size=64, top_k=3, tol=1e-6, max_iter=300, trace_hvps=3, density_vectors=0)
    cold = H.compute(_ctx(dense["model"], dense["data"], tmp_path), params)["hessian"][0]
    assert cold["warm_started"] is False and cold["subspace_overlap"] is None
    warm = H.compute(_ctx(dense["model"], dense["data"], tmp_path, {"warm_start": cold["ritz_artifact"]}, seed=1),
                     params)["hessian"][0]
    assert warm["warm_started"] is True and warm["converged"] is True
    assert warm["lanczos_iters"] < cold["lanczos_iters"]
    assert warm["subspace_overlap"] == pytest.approx(1.0, abs=1e-4)
    assert warm["top_eigenvalue"] == pytest.approx(cold["top_eigenvalue"], rel=1e-6)


def test_non_finite_is_skipped(dense, tmp_path):
    model = CASE.model()
    with torch.no_grad():
        model[0].weight.fill_(float("inf"))
    with pytest.raises(ProbeSkipped, match="non-finite"):
        H.compute(_ctx(model, dense["data"], tmp_path), H.Params(batch_size=64))


def test_count_outliers_rule():
    assert H.count_outliers(torch.tensor([50.0, 40, 30, 1, 0.9])) == 3
    assert H.count_outliers(torch.tensor([50.0, 5, 4, 3])) == 1
    assert H.count_outliers(torch.tensor([5.0, 4, -1, -2])) == 2
    assert H.count_outliers(torch.tensor([-1.0, -2])) == 0


def test_plan_warm_start_names_previous_checkpoint():
    study = tc.FakeStudy([tc.run_ref(checkpoints=tc.checkpoint_refs(3), epochs=2.0)])
    assert H.plan(study, H.Params(warm_start=True)) == [
        JobRequest(("c0",), "c0"), JobRequest(("c1",), "c1", "self", {"previous_checkpoint": "c0"}),
        JobRequest(("c2",), "c2", "self", {"previous_checkpoint": "c1"})]
    assert H.plan(study, H.Params()) == [JobRequest((f"c{i}",), f"c{i}") for i in range(3)]


def test_warm_start_through_previous_checkpoint_note(dense, tmp_path):
    params = H.Params(batch_size=64, top_k=2, tol=1e-6, max_iter=300, trace_hvps=3, density_vectors=0,
                      warm_start=True)
    # the previous checkpoint's job has not run: a cold start, not an error
    early = H.compute(_ctx(dense["model"], dense["data"], tmp_path, {"previous_checkpoint": "c0"}), params)
    assert early["hessian"][0]["warm_started"] is False
    H.compute(_ctx(dense["model"], dense["data"], tmp_path), params)  # checkpoint c0 leaves its note
    row = H.compute(_ctx(dense["model"], dense["data"], tmp_path, {"previous_checkpoint": "c0"}, seed=2),
                    params)["hessian"][0]
    assert row["warm_started"] is True and row["converged"] is True
    assert row["subspace_overlap"] == pytest.approx(1.0, abs=1e-4)


def test_layer_wise_products_give_the_double_backward_rows(tmp_path):
    """hvp = "auto" takes the layer-wise products on a plain-layer CNN (the row says so); every
    stored number is double backward's to float64 rounding."""
    model, state, data = tc.case("cnn40").build()
    run = tc.run_ref("r", [0], batch_size=16)
    rows = {}
    for hvp in ("auto", "double_backward"):
        ctx = tc.context(model, data, tmp_path / hvp, states=[state], runs=[run])
        rows[hvp] = H.compute(ctx, H.Params(batch_size=64, top_k=4, trace_hvps=12, density_vectors=1,
                                            density_iters=10, sharpness_batches=3, hvp=hvp))
    fast, slow = rows["auto"]["hessian"][0], rows["double_backward"]["hessian"][0]
    assert (fast["hvp"], slow["hvp"]) == ("layers", "double_backward")
    assert fast["lanczos_iters"] == slow["lanczos_iters"] and fast["hvps"] == slow["hvps"]
    for key, value in slow.items():
        if isinstance(value, float):
            assert fast[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    for table in ("hessian_eigenvalue", "hessian_density"):
        for a, b in zip(rows["auto"][table], rows["double_backward"][table]):
            assert a == pytest.approx(b, rel=1e-8, abs=1e-10)


def test_layer_wise_products_need_plain_layers(dense, tmp_path):
    from lsdb.errors import ProbeError

    with pytest.raises(ProbeError, match="hvp = 'layers' needs a model that lists plain layers"):
        H.compute(_ctx(dense["model"], dense["data"], tmp_path), H.Params(batch_size=64, top_k=2, hvp="layers"))
    row = H.compute(_ctx(dense["model"], dense["data"], tmp_path / "auto"), H.Params(batch_size=64, top_k=2))
    assert row["hessian"][0]["hvp"] == "double_backward"  # "auto" on a tanh MLP
