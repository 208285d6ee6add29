"""Input-space adversarial examples in an L∞ ball (FGSM, PGD-k), for adversarial training
(``train.adversarial``, finding F11, Prabhu et al. 2019) and the ``flatness`` probe's robust error.

Inputs are standardised, so the ball is not clipped to [0, 1]: the only constraint is
‖x_adv − x‖_∞ ≤ ε.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from lsdb.errors import SpecError

METHODS = ("fgsm", "pgd")


def perturb(model_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
            method: str, epsilon: float, steps: int = 1, step_size: float | None = None,
            random_start: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """Adversarial inputs that raise the cross-entropy of ``model_fn`` within ‖δ‖_∞ ≤ ε.

    - "fgsm" (Goodfellow et al. 2015): x + ε·sign(∇ₓ L(x, y)); ``steps`` is ignored.
    - "pgd" (Madry et al. 2018): ``steps`` iterations of x ← Π_ball(x + η·sign(∇ₓ L)), with
      η = ``step_size`` (default 2.5·ε/steps) and Π the clamp to [x₀ − ε, x₀ + ε]; starts at x₀,
      or at a uniform point of the ball when ``random_start`` (drawn from ``generator``).

    L is the summed cross-entropy (the sign of its gradient equals that of the mean's). Returns
    a detached tensor; the gradients of the model's parameters are left untouched.
    """
    if method not in METHODS:
        raise SpecError(f"unknown adversarial method '{method}'; valid: {', '.join(METHODS)}")
    if epsilon < 0:
        raise SpecError(f"adversarial epsilon = {epsilon} must be >= 0")
    x0 = x.detach()
    if epsilon == 0:
        return x0.clone()
    if method == "fgsm":
        return (x0 + epsilon * _grad_sign(model_fn, x0, y)).detach()
    if steps < 1:
        raise SpecError(f"adversarial steps = {steps} must be >= 1 for pgd")
    eta = 2.5 * epsilon / steps if step_size is None else step_size
    if random_start:
        u = torch.rand(x0.shape, generator=generator, dtype=torch.float64).to(x0)
        x_adv = x0 + epsilon * (2 * u - 1)
    else:
        x_adv = x0.clone()
    for _ in range(steps):
        x_adv = x_adv + eta * _grad_sign(model_fn, x_adv, y)
        x_adv = torch.max(torch.min(x_adv, x0 + epsilon), x0 - epsilon)
    return x_adv.detach()


def _grad_sign(model_fn, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model_fn(xg), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, xg)
    return g.sign()
