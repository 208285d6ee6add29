"""lsdb.train.adversarial.perturb: stays in the L∞ ball, raises the loss, FGSM is the sign step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lsdb.errors import SpecError
from lsdb.train.adversarial import perturb
from tests import tiny_cases as tc

DT = tc.DT


@pytest.fixture
def setup():
    """The flatness probe's tiny CNN (seed 0) on 32 signals of its own."""
    model = tc.case("cnn16").model()
    data = tc.random_data(32, 0, (1, 16), 3, seed=1)
    return model, data.x_train, data.y_train


@pytest.mark.parametrize("method,steps", [("fgsm", 1), ("pgd", 7)])
def test_in_ball_and_raises_loss(setup, method, steps):
    model, x, y = setup
    eps = 0.2
    x_adv = perturb(model, x, y, method, eps, steps)
    assert (x_adv - x).abs().max() <= eps + 1e-12
    assert not x_adv.requires_grad
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)


def test_pgd_random_start_in_ball_and_at_least_fgsm(setup):
    model, x, y = setup
    eps = 0.3
    g = torch.Generator().manual_seed(3)
    x_pgd = perturb(model, x, y, "pgd", eps, 20, random_start=True, generator=g)
    x_fgsm = perturb(model, x, y, "fgsm", eps)
    assert (x_pgd - x).abs().max() <= eps + 1e-12
    with torch.no_grad():
        assert F.cross_entropy(model(x_pgd), y) >= F.cross_entropy(model(x_fgsm), y) - 1e-9


def test_fgsm_is_sign_of_input_gradient():
    # linear logits f(x) = W x: ∇ₓ Σ CE = Wᵀ(softmax − onehot) per example
    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 5, generator=g, dtype=DT)
    x = torch.randn(8, 5, generator=g, dtype=DT)
    y = torch.randint(0, 3, (8,), generator=g)
    grad = (torch.softmax(x @ W.T, 1) - F.one_hot(y, 3).to(DT)) @ W
    x_adv = perturb(lambda v: v @ W.T, x, y, "fgsm", 0.1)
    torch.testing.assert_close(x_adv, x + 0.1 * grad.sign())


def test_params_grads_untouched_and_errors(setup):
    model, x, y = setup
    perturb(model, x, y, "pgd", 0.1, 3)
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(perturb(model, x, y, "fgsm", 0.0), x)
    with pytest.raises(SpecError, match="valid: fgsm, pgd"):
        perturb(model, x, y, "cw", 0.1)
