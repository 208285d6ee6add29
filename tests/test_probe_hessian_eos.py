"""hessian probe, version 3: batch sharpness and the top-subspace gradient fraction against dense
references in float64 (``torch.autograd.functional.hessian`` and ``eigh`` of the explicit Hessian).

A tanh MLP small enough for dense Hessians of every batch (123 parameters, 3 classes, 40 inputs).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lsdb.errors import ProbeError
from lsdb.probes import hessian as H
from tests import tiny_cases as tc

DT = tc.DT
N, C = 40, 3


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 10), nn.Tanh(), nn.Linear(10, C)).to(DT)


def _data():
    return tc.random_data(N, 4, (8,), C, seed=3)


def _dense(model, x, y):
    """(loss gradient g, explicit Hessian H) of the mean cross-entropy on (x, y), flattened in
    ``named_parameters`` order, by ``torch.autograd.functional.hessian``."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(w):
        params = {n: t.view(s) for n, t, s in zip(names, w.split(sizes), shapes)}
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    g = torch.autograd.functional.jacobian(loss, w0)
    return g, torch.autograd.functional.hessian(loss, w0, vectorize=True)


def _ctx(tmp_path, batch_size=None, seed=7):
    runs = [tc.run_ref(batch_size=batch_size)] if batch_size else []
    return tc.context(_model(), _data(), tmp_path, runs=runs, seed=seed)


# every test below: the probe's fixed batch is the whole split (batch_size = 0), trace and density cheap
BASE = dict(batch_size=0, tol=1e-10, max_iter=123, trace_hvps=2, density_vectors=0)


@pytest.mark.parametrize("method", ["double_backward", "fwd_rev"])
def test_batch_sharpness_matches_explicit_hessians_of_the_same_batches(tmp_path, method):
    m, bs, seed = 5, 12, 7
    row = H.compute(_ctx(tmp_path, batch_size=bs, seed=seed),
                    H.Params(**BASE, sharpness_batches=m, hvp=method))["hessian"][0]
    model, data = _model(), _data()
    gen = torch.Generator().manual_seed(seed)  # the recipe of the module docstring, with the stored seed
    quotients = []
    for _ in range(m):
        idx = torch.randperm(N, generator=gen)[:bs]
        g, Hb = _dense(model, data.x_train[idx], data.y_train[idx])
        quotients.append(float(g @ Hb @ g / (g @ g)))
    q = torch.tensor(quotients, dtype=DT)
    assert row["sharpness_seed"] == seed and row["sharpness_batches"] == m and row["sharpness_batch_size"] == bs
    assert row["sharpness_hvps"] == m
    assert row["batch_sharpness"] == pytest.approx(float(q.mean()), rel=1e-9)
    assert row["batch_sharpness_stderr"] == pytest.approx(float(q.std() / math.sqrt(m)), rel=1e-7)
    # the fixed batch's HVP count is unchanged by the sharpness batches
    assert row["hvps"] == row["lanczos_iters"] + 2


def test_a_full_batch_run_measures_one_batch_the_rayleigh_quotient_of_the_full_hessian(tmp_path):
    row = H.compute(_ctx(tmp_path, batch_size=10 * N), H.Params(**BASE, sharpness_batches=4))["hessian"][0]
    data = _data()
    g, Hf = _dense(_model(), data.x_train, data.y_train)
    assert row["sharpness_batches"] == 1 and row["sharpness_batch_size"] == N and row["sharpness_hvps"] == 1
    assert row["batch_sharpness_stderr"] == 0.0
    assert row["batch_sharpness"] == pytest.approx(float(g @ Hf @ g / (g @ g)), rel=1e-9)
    assert row["batch_sharpness"] <= float(torch.linalg.eigvalsh(Hf)[-1]) * (1 + 1e-9)


@pytest.mark.parametrize("method", ["double_backward", "fwd_rev"])
def test_gradient_fractions_match_the_eigenvectors_of_the_explicit_hessian(tmp_path, method):
    out = H.compute(_ctx(tmp_path, seed=1), H.Params(**BASE, hvp=method))
    row = out["hessian"][0]
    data = _data()
    g, Hf = _dense(_model(), data.x_train, data.y_train)
    evals, evecs = torch.linalg.eigh(Hf)
    V = evecs.flip(1)  # largest first
    k = 2 * C + 2  # the default top_k = 0 resolves to 2C + 2
    assert row["k"] == k and row["converged"] is True and row["top_subspace_dim"] == C
    assert float(evals.flip(0)[C - 1] - evals.flip(0)[C]) > 1e-3  # eigenvectors well defined at the cut
    assert row["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-9)
    want_c = float((V[:, :C].T @ g).norm() / g.norm())
    want_k = float((V[:, :k].T @ g).norm() / g.norm())
    assert row["top_subspace_grad_fraction"] == pytest.approx(want_c, abs=1e-6)
    assert row["top_k_grad_fraction"] == pytest.approx(want_k, abs=1e-6)
    assert 0 < want_c < want_k < 1
    assert row["batch_sharpness"] is None and row["sharpness_seed"] is None  # no run: no batch size


def test_subspace_fractions_of_nested_spans():
    """Non-orthogonal rows: the projector is on their span, and the first d rows' span for each d."""
    Y = torch.tensor([[1.0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0]], dtype=DT)
    g = torch.tensor([0.0, 3, 0, 4], dtype=DT)
    assert H.subspace_fractions(Y, g, [1, 2, 3, 4]) == [pytest.approx(0.0, abs=1e-15), pytest.approx(0.6),
                                                          pytest.approx(0.6), None]
    assert H.subspace_fractions(Y, torch.zeros(4, dtype=DT), [1]) == [None]


def test_fewer_eigenpairs_than_classes_leave_the_top_c_fraction_empty(tmp_path):
    row = H.compute(_ctx(tmp_path), H.Params(**{**BASE, "top_k": 2}))["hessian"][0]
    assert row["k"] == 2 and row["top_subspace_grad_fraction"] is None and row["top_subspace_dim"] is None
    assert 0 <= row["top_k_grad_fraction"] <= 1


def test_sharpness_off_and_a_batch_size_without_a_run(tmp_path):
    off = H.compute(_ctx(tmp_path, batch_size=8), H.Params(**BASE, sharpness_batches=0))["hessian"][0]
    assert off["batch_sharpness"] is None and off["sharpness_hvps"] is None
    given = H.compute(_ctx(tmp_path), H.Params(**BASE, sharpness_batches=3, sharpness_batch_size=8))["hessian"][0]
    assert given["sharpness_batches"] == 3 and given["sharpness_batch_size"] == 8
    assert math.isfinite(given["batch_sharpness"]) and given["batch_sharpness_stderr"] > 0


def test_the_default_k_needs_enough_lanczos_steps(tmp_path):
    with pytest.raises(ProbeError, match=r"max_iter = 5 is below top_k = 8 \(the default 2C \+ 2 for C = 3"):
        H.compute(_ctx(tmp_path), H.Params(**{**BASE, "max_iter": 5}))
    assert H.Params.cross_check({"top_k": 0, "max_iter": 5}) is None  # k is known only with the data
    assert H.Params.cross_check({"top_k": 9, "max_iter": 5})[0] == "max_iter"
