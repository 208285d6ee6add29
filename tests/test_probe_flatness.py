"""flatness probe: filter normalisation, σ_1D and κ on a quadratic, worst case vs random, brute force."""

from __future__ import annotations

import copy

import pytest
import torch

from lsdb.errors import ProbeSkipped
from lsdb.probes import _directions as D
from lsdb.probes import flatness
from lsdb.train.adversarial import perturb
from tests import tiny_cases as tc

DT = tc.DT
CASE = tc.case("cnn16")  # CNN1d on 50 train / 30 test signals of length 16, 3 classes


def test_filter_normalised_direction():
    torch.manual_seed(0)
    model = tc.ConvBNNet(2, 5, 30, 3).double()
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 2.0)
    state = model.state_dict()
    d = D.filter_normalised_direction(model, state, torch.Generator().manual_seed(1))
    for name in ("conv.weight", "out.weight"):
        torch.testing.assert_close(d[name].flatten(1).norm(dim=1), state[name].flatten(1).norm(dim=1), rtol=1e-12, atol=0)
        assert not torch.equal(d[name], state[name])
    for name in ("conv.bias", "out.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"):
        assert torch.count_nonzero(d[name]) == 0, name
    assert "bn.num_batches_tracked" not in d
    assert D.filter_names(model, state) == ["conv.weight", "out.weight"]
    # same seed, same direction; another seed, another direction
    d2 = D.filter_normalised_direction(model, state, torch.Generator().manual_seed(1))
    assert torch.equal(d["conv.weight"], d2["conv.weight"])


def test_quadratic_gives_known_sigma_and_kappa():
    # L(w) = gᵀw + ½ wᵀAw around w = 0: L(αd) − L(0) = α gᵀd + ½α² dᵀAd
    gen = torch.Generator().manual_seed(0)
    P, m = 12, 6
    B = torch.randn(P, P, generator=gen, dtype=DT)
    A, g = B @ B.T, torch.randn(P, generator=gen, dtype=DT)
    dirs = torch.randn(m, P, generator=gen, dtype=DT)
    curv = torch.einsum("mp,pq,mq->m", dirs, A, dirs)

    def L(a, d):
        return a * (g @ d) + 0.5 * a * a * (d @ A @ d)

    alphas = torch.linspace(-1, 1, 21, dtype=DT)
    losses = torch.stack([torch.stack([L(a, d) for a in alphas]) for d in dirs]) + 3.0
    sigma, _ = flatness.sharpness_1d(losses, 3.0)
    assert sigma == pytest.approx(float(0.5 * (alphas**2).mean() * curv.mean()), rel=1e-12)
    near = torch.linspace(-0.2, 0.2, 9, dtype=DT)
    near_losses = torch.stack([torch.stack([L(a, d) for a in near]) for d in dirs])
    torch.testing.assert_close(flatness.quadratic_curvature(near, near_losses), curv, rtol=1e-9, atol=1e-10)


def test_probe_matches_brute_force(tmp_path):
    model, data = CASE.model(), CASE.data()
    params = flatness.Params(train_subset=40, directions=3, points=5, curvature_points=5, restarts=2,
                             ascent_steps=5, rho=0.1, epsilon=0.2, pgd_steps=4)
    row = flatness.compute(tc.context(model, data, tmp_path), params)["flatness"][0]

    idx = tc.train_subset(50, 40)
    x, y = data.x_train[idx], data.y_train[idx]
    w = tc.clone_state(model)
    gen = torch.Generator().manual_seed(0)
    dirs = [D.filter_normalised_direction(model, w, gen) for _ in range(3)]
    m = copy.deepcopy(model)

    def loss_at(sd):
        m.load_state_dict(sd)
        return tc.loss_and_error(m, x, y)[0]

    L0 = loss_at(w)
    assert row["train_loss"] == pytest.approx(L0, rel=1e-12)
    per_dir = [sum(loss_at({k: w[k] + a * d[k] for k in w}) - L0 for a in torch.linspace(-1, 1, 5, dtype=DT).tolist()) / 5
               for d in dirs]
    assert row["sharpness_1d"] == pytest.approx(sum(per_dir) / 3, rel=1e-10)
    rand_rho = max(loss_at({k: w[k] + s * 0.1 * d[k] for k in w}) for d in dirs for s in (-1, 1)) - L0
    assert row["random_sharpness_at_rho"] == pytest.approx(rand_rho, rel=1e-10)
    assert row["adversarial_sharpness"] >= row["random_sharpness_at_rho"]

    m.load_state_dict(w)
    assert row["clean_error"] == pytest.approx(tc.loss_and_error(m, data.x_test, data.y_test)[1])
    with torch.no_grad():
        x_pgd = perturb(m, data.x_test, data.y_test, "pgd", 0.2, 4)
    assert row["pgd_error"] == pytest.approx(tc.loss_and_error(m, x_pgd, data.y_test)[1])
    assert row["fgsm_error"] >= row["clean_error"] and row["pgd_error"] >= row["clean_error"]


def test_worst_case_stays_in_ball_and_beats_random():
    model, data = CASE.model(), CASE.data()
    w = tc.clone_state(model)
    names = D.filter_names(model, w)
    loss_of = D.loss_function(model, {}, data.x_train, data.y_train)
    gen = torch.Generator().manual_seed(5)
    rho = 0.05
    dirs = [D.filter_normalised_direction(model, w, gen) for _ in range(8)]
    L0 = float(loss_of(w))
    with torch.no_grad():
        random_best = max(float(loss_of({k: w[k] + s * rho * d[k] for k in w})) - L0 for d in dirs for s in (-1, 1))
    starts = [{n: 0.5 * rho * D.filter_normalised_direction(model, w, gen)[n] for n in names} for _ in range(2)]
    value, eps = flatness.worst_case_sharpness(loss_of, w, names, rho, starts, 10)
    assert value >= random_best
    for n in names:
        assert bool((eps[n].flatten(1).norm(dim=1) <= rho * w[n].flatten(1).norm(dim=1) * (1 + 1e-12)).all())
    assert set(eps) == set(names)  # biases never move
    with torch.no_grad():
        assert float(loss_of({**w, **{n: w[n] + eps[n] for n in names}})) - L0 == pytest.approx(value, rel=1e-12)


def test_non_finite_is_skipped(tmp_path):
    model, data = CASE.model(), CASE.data()
    state = tc.clone_state(model)
    state["readout.bias"][0] = float("inf")
    with pytest.raises(ProbeSkipped, match="non-finite"):
        flatness.compute(tc.context(model, data, tmp_path, states=[state]), flatness.Params(directions=1, points=3))
