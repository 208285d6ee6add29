"""The ``kernel_accuracy`` probe: the linearised model and kernel regression, in float64 on tiny
nets, against materialised Jacobians and explicit formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import jacrev

from lsdb.errors import ProbeError
from lsdb.probes import _ntk_core as core
from lsdb.probes import kernel_accuracy as ka
from lsdb.train.models import MLP
from tests import tiny_cases as tc

C = 3
RUN = tc.run_ref(epochs=1.0, lr=0.2, batch_size=4, weight_decay=0.01)  # the hyperparameters the probe reads


def make_ctx(model, state, data, tmp_path, indices=None, seed=0):
    return tc.context(model, data, tmp_path, states=[state], runs=[RUN], probe_indices=indices, seed=seed)


def flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in d.values()])


def random_delta(net, seed=7):
    g = torch.Generator().manual_seed(seed)
    return {k: 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in net.params.items()}


@pytest.fixture(scope="module", params=tc.cases("cnn", "mlp"))
def case(request):
    return request.param.build()


# ------------------------------------------------------------------------ the linearised model

def test_linearised_model_at_w_t_reproduces_logits(case):
    model, state, data = case
    net = core.bind(model, state, "cpu", torch.float64)
    zero = {k: torch.zeros_like(v) for k, v in net.params.items()}
    model.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(ka.linearised_logits(net, zero, data.x_train), model(data.x_train))


def test_linearised_model_is_the_first_order_taylor_expansion(case):
    model, state, data = case
    net = core.bind(model, state, "cpu", torch.float64)
    delta = random_delta(net)
    j = tc.per_sample_jacobian(model, state, data.x_test)
    with torch.no_grad():
        f0 = net(data.x_test)
        lin = ka.linearised_logits(net, delta, data.x_test)
    assert torch.allclose(lin, f0 + (j @ flat(delta)).reshape(f0.shape), rtol=1e-12, atol=1e-12)


def test_tangent_kernel_of_linearised_model_is_the_network_ntk(case):
    model, state, data = case
    net = core.bind(model, state, "cpu", torch.float64)
    x = data.x_train[:4]
    j_net = tc.per_sample_jacobian(model, state, x)
    # the linearised model's own Jacobian in w, taken at a point w_t + δ away from the expansion point
    jac = jacrev(lambda d: ka.linearised_logits(net, d, x))(random_delta(net))
    j_lin = torch.cat([jac[k].reshape(x.shape[0] * C, -1) for k in net.params], dim=1)
    theta_lin, theta_net = j_lin @ j_lin.T, j_net @ j_net.T
    assert float((theta_lin - theta_net).norm() / theta_net.norm()) < 1e-10


def test_cached_linearisation_equals_the_jvp(case):
    """The layer-wise tangent with cached activations gives f_lin and its gradient as the jvp does."""
    model, state, data = case
    net = core.bind(model, state, "cpu", torch.float64)
    cached = ka.CachedLinearisation.build(model, net.params, data.x_train, budget_mb=16)
    assert cached is not None
    delta = random_delta(net)
    idx = torch.tensor([4, 0, 7, 7, 2])
    torch.testing.assert_close(cached(delta, idx), ka.linearised_logits(net, delta, data.x_train[idx]),
                               rtol=1e-12, atol=1e-12)
    d1 = {k: v.clone().requires_grad_(True) for k, v in delta.items()}
    d2 = {k: v.clone().requires_grad_(True) for k, v in delta.items()}
    y = data.y_train[idx]
    g1 = torch.autograd.grad(torch.nn.functional.cross_entropy(cached(d1, idx), y), list(d1.values()))
    g2 = torch.autograd.grad(torch.nn.functional.cross_entropy(ka.linearised_logits(net, d2, data.x_train[idx]), y),
                             list(d2.values()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # and whole training runs agree
    kw = dict(lr=0.3, steps=9, batch_size=4, momentum=0.9, weight_decay=0.01, seed=3)
    fast = ka.train_linearised(net, data.x_train, data.y_train, cached=cached, **kw)
    slow = ka.train_linearised(net, data.x_train, data.y_train, **kw)
    for k in fast:
        torch.testing.assert_close(fast[k], slow[k], rtol=1e-10, atol=1e-12)


def test_cached_linearisation_only_where_it_applies():
    model, state, data = tc.case("cnn").build()
    net = core.bind(model, state, "cpu", torch.float64)
    assert ka.CachedLinearisation.build(model, net.params, data.x_train, budget_mb=0) is None  # over budget
    from lsdb.train.models import PatchNet

    patch = PatchNet((1, 12), C).double()
    pnet = core.bind(patch, patch.state_dict(), "cpu", torch.float64)
    assert ka.CachedLinearisation.build(patch, pnet.params, data.x_train, budget_mb=16) is None  # lists no layers


def test_sgd_matches_a_materialised_linear_model():
    """train_linearised (jvp, momentum, weight decay, seeded minibatches) against torch.optim.SGD on
    the explicit linear model f0 + J δ with J materialised."""
    model, state, data = tc.case("mlp").build()
    net = core.bind(model, state, "cpu", torch.float64)
    x, y = data.x_train, data.y_train
    lr, steps, batch, mom, wd, seed = 0.3, 7, 4, 0.9, 0.01, 11
    delta = ka.train_linearised(net, x, y, lr=lr, steps=steps, batch_size=batch, momentum=mom,
                                weight_decay=wd, loss="ce", seed=seed)

    j = tc.per_sample_jacobian(model, state, x).reshape(x.shape[0], C, -1)
    with torch.no_grad():
        f0 = net(x)
    w_t = flat(net.params)
    d = torch.zeros_like(w_t, requires_grad=True)
    opt = torch.optim.SGD([d], lr=lr, momentum=mom)
    gen = torch.Generator().manual_seed(seed)
    order, pos = None, x.shape[0]
    for _ in range(steps):
        if pos >= x.shape[0]:
            order, pos = torch.randperm(x.shape[0], generator=gen), 0
        idx = order[pos : pos + batch]
        pos += batch
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(f0[idx] + j[idx] @ d, y[idx])
        loss.backward()
        d.grad += wd * (w_t + d.detach())  # weight decay on w = w_t + δ, as the run applies it to w
        opt.step()
    assert torch.allclose(flat(delta), d.detach(), rtol=1e-10, atol=1e-12)


def mse_case():
    """A one-hidden-layer MLP with n·C = 9 < P = 323, so the full kernel on the 3 training inputs is
    invertible (and well conditioned, κ ≈ 6, so gradient descent converges in a few hundred steps)."""
    torch.manual_seed(0)
    model = MLP((6,), C, width=32, depth=1).double()
    net = core.bind(model, model.state_dict(), "cpu", torch.float64)
    g = torch.Generator().manual_seed(4)
    x, xs = torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    targets = torch.nn.functional.one_hot(torch.tensor([0, 2, 1]), C).double()
    return net, x, xs, targets


def test_full_batch_mse_gd_follows_the_kernel_dynamics_exactly():
    """For L = ½ mean_i ‖f(x_i) − y_i‖² and full-batch GD with rate η on the linearised model,
    r_{k+1} = (I − (η/n)Θ) r_k on the training points (r = f − y, Θ the full kernel), and at any x*
    f_k(x*) = f_0(x*) − (η/n) Θ(x*, X) Σ_{j<k} r_j: no approximation."""
    net, x, xs, targets = mse_case()
    n, steps = x.shape[0], 25
    theta = core.ntk(net, x, "full")
    eta = 0.5 * n / float(torch.linalg.eigvalsh(theta).max())
    delta = ka.train_linearised(net, x, targets, lr=eta, steps=steps, batch_size=n, loss="mse")

    with torch.no_grad():
        r = (net(x) - targets).reshape(-1)
        f_star = net(xs).reshape(-1)
    cross = core.cross_ntk(net, xs, x, "full")
    step = torch.eye(theta.shape[0], dtype=torch.float64) - (eta / n) * theta
    summed = torch.zeros_like(r)
    for _ in range(steps):
        summed, r = summed + r, step @ r
    with torch.no_grad():
        assert torch.allclose(ka.linearised_logits(net, delta, x).reshape(-1) - targets.reshape(-1), r,
                              rtol=1e-9, atol=1e-11)
        assert torch.allclose(ka.linearised_logits(net, delta, xs).reshape(-1), f_star - (eta / n) * cross @ summed,
                              rtol=1e-9, atol=1e-11)


def test_gradient_flow_limit_is_kernel_regression_without_ridge():
    """Trained to convergence (small rate, many full-batch steps), the linearised model's
    predictions match kernel regression with λ → 0: on the training points (both interpolate y) and
    at new points (the minimum-norm interpolant)."""
    net, x, xs, targets = mse_case()
    n = x.shape[0]
    ev = torch.linalg.eigvalsh(core.ntk(net, x, "full"))
    eta = n / float(ev.max())  # half the stability limit 2n/λ_max
    steps = int(math.ceil(35 * float(ev.max() / ev.min())))  # (1 − λ_min/λ_max)^steps < e^-35
    assert steps < 20000, "test case too ill-conditioned to converge quickly"
    delta = ka.train_linearised(net, x, targets, lr=eta, steps=steps, batch_size=n, loss="mse")
    with torch.no_grad():
        for pts in (x, xs):
            lin = ka.linearised_logits(net, delta, pts)
            krr = ka.kernel_regression(net, x, targets, pts, lam=1e-13 * float(ev.max()), variant="full")
            assert torch.allclose(lin, krr, rtol=1e-7, atol=1e-8)
        assert torch.allclose(ka.linearised_logits(net, delta, x), targets, atol=1e-8)


# ------------------------------------------------------------------------- kernel regression

@pytest.mark.parametrize("variant", ["trace", "full"])
def test_kernel_regression_matches_explicit_formula(case, variant):
    model, state, data = case
    net = core.bind(model, state, "cpu", torch.float64)
    x, xs = data.x_train[:5], data.x_test
    targets = torch.nn.functional.one_hot(data.y_train[:5], C).double()
    j, js = tc.per_sample_jacobian(model, state, x), tc.per_sample_jacobian(model, state, xs)
    with torch.no_grad():
        f, fs = net(x), net(xs)
    lam = 0.3
    if variant == "full":
        k, ks = j @ j.T, js @ j.T
        expect = fs.reshape(-1) + ks @ torch.linalg.inv(k + lam * torch.eye(15, dtype=torch.float64)) @ (targets - f).reshape(-1)
        expect = expect.reshape(fs.shape)
    else:  # Θ^tr[i,j] = Σ_a ⟨J_a(x_i), J_a(x_j)⟩, the same kernel for every logit
        k = torch.einsum("iap,jap->ij", j.reshape(5, C, -1), j.reshape(5, C, -1))
        ks = torch.einsum("iap,jap->ij", js.reshape(-1, C, j.shape[1]), j.reshape(5, C, -1))
        expect = fs + ks @ torch.linalg.inv(k + lam * torch.eye(5, dtype=torch.float64)) @ (targets - f)
    got = ka.kernel_regression(net, x, targets, xs, lam, variant, chunk=2)
    assert torch.allclose(got, expect, rtol=1e-9, atol=1e-10)


# ----------------------------------------------------------------------------- the probe rows

def test_compute_rows(tmp_path):
    model, state, data = tc.case("cnn").build()
    ctx = make_ctx(model, state, data, tmp_path)
    params = ka.Params(steps=5, lr_mode="kernel_scaled", kernel_lr=2.0, ridge=0.01)
    rows = {r["method"]: r for r in ka.compute(ctx, params)["kernel_accuracy"]}
    assert set(rows) == {"linearised", "kernel_regression"}

    lin = rows["linearised"]
    j = tc.per_sample_jacobian(model, state, data.x_train[:5])
    mean_diag = float((j**2).sum()) / 5  # mean_i Θ^tr[i,i] = mean_i ‖J(x_i)‖²_F
    assert lin["lr"] == pytest.approx(2.0 / mean_diag, rel=1e-10)
    assert (lin["lr_mode"], lin["steps"], lin["n_train"], lin["lambda"]) == ("kernel_scaled", 5, 9, None)
    for key in ("train_error", "test_error"):
        assert 0.0 <= lin[key] <= 1.0
    # the row's test numbers are those of the linearised model trained as the probe says
    net = core.bind(model, state, "cpu", torch.float64)
    delta = ka.train_linearised(net, data.x_train, data.y_train, lr=lin["lr"], steps=5, batch_size=RUN.batch_size,
                                momentum=RUN.momentum, weight_decay=RUN.weight_decay, seed=ctx.seed)
    with torch.no_grad():
        logits = ka.linearised_logits(net, delta, data.x_test)
    assert lin["test_loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, data.y_test)), rel=1e-10)
    assert lin["test_error"] == pytest.approx(float((logits.argmax(-1) != data.y_test).double().mean()))

    kr = rows["kernel_regression"]
    assert kr["lambda"] == pytest.approx(0.01 * mean_diag, rel=1e-10)
    assert (kr["kernel_variant"], kr["n_train"], kr["lr"]) == ("trace", 5, None)
    onehot = torch.nn.functional.one_hot(data.y_train[:5], C).double()
    pred = ka.kernel_regression(net, data.x_train[:5], onehot, data.x_test, kr["lambda"], "trace")
    assert kr["test_error"] == pytest.approx(float((pred.argmax(-1) != data.y_test).double().mean()))

    again = ka.compute(ctx, params)["kernel_accuracy"]
    assert again[0] == lin  # minibatch order comes from the job's seed


@pytest.mark.parametrize("variant", ["trace", "full"])
def test_one_probe_jacobian_gives_the_rows_of_one_per_use(tmp_path, monkeypatch, variant):
    """The job computes the probe set's Jacobian once and reuses it for the learning rate, Θ(X, X)
    and the kernel machine; with it over budget every use computes its own blocks: the same rows
    (to rounding: Θ(X, X) then comes from per-layer signals where cheaper, not the Jacobian)."""
    model, state, data = tc.case("cnn").build()
    ctx = make_ctx(model, state, data, tmp_path)
    params = ka.Params(steps=5, kernel_variant=variant, chunk=2)
    net = core.bind(model, state, "cpu", torch.float64)
    assert ka._probe_jacobian(net, data.x_train[:5], params) is not None
    shared = ka.compute(ctx, params)["kernel_accuracy"]
    monkeypatch.setattr(ka, "KERNEL_CACHE_MB", 0.0)
    assert ka._probe_jacobian(net, data.x_train[:5], params) is None
    alone = ka.compute(ctx, params)["kernel_accuracy"]
    assert [r["method"] for r in alone] == [r["method"] for r in shared]
    for a, b in zip(alone, shared):
        assert a.keys() == b.keys()
        for key, value in b.items():
            assert a[key] == (pytest.approx(value, rel=1e-12) if isinstance(value, float) else value), key


def test_fixed_lr_and_method_selection(tmp_path):
    model, state, data = tc.case("mlp").build()
    ctx = make_ctx(model, state, data, tmp_path)
    (row,) = ka.compute(ctx, ka.Params(methods=("linearised",), steps=3, lr_mode="fixed", lr_factor=0.5,
                                       train_eval_size=4))["kernel_accuracy"]
    assert (row["method"], row["lr_mode"], row["n_train"]) == ("linearised", "fixed", 4)
    assert row["lr"] == pytest.approx(RUN.lr * 0.5)
    (kr,) = ka.compute(ctx, ka.Params(methods=("kernel_regression",), kernel_variant="full"))["kernel_accuracy"]
    assert kr["method"] == "kernel_regression" and kr["kernel_variant"] == "full"


def test_bad_input(tmp_path):
    model, state, data = tc.case("mlp").build()
    with pytest.raises(ProbeError, match="larger than the training set"):
        ka.compute(make_ctx(model, state, data, tmp_path, torch.arange(12)), ka.Params(steps=1))
    with pytest.raises(ProbeError, match="unknown method"):
        ka.compute(make_ctx(model, state, data, tmp_path), ka.Params(methods=("nngp",)))
    with pytest.raises(ProbeError, match="lr_mode"):
        ka.compute(make_ctx(model, state, data, tmp_path), ka.Params(lr_mode="adaptive"))


def test_metric_names_are_the_agreed_ones():
    from lsdb.schema import kernel

    names = lambda t: {m.name for m in t.__table__.info["metrics"]}  # noqa: E731
    assert names(kernel.KernelAccuracyResult) == {"linearised_test_error", "linearised_train_error",
                                                  "linearised_test_loss", "kernel_regression_test_error"}
    assert names(kernel.NtkResult) == {"ntk_norm", "ntk_trace", "ntk_top_eigenvalue", "ntk_effective_rank",
                                       "ntk_alignment", "ntk_centered_alignment"}
    assert names(kernel.NtkDistanceResult) == {"kernel_distance_to_init", "kernel_distance_next", "kernel_velocity",
                                               "kernel_angular_velocity", "sibling_kernel_distance",
                                               "kernel_distance_spawn_to_final", "cross_init_kernel_distance"}
    cols = set(kernel.KernelAccuracyResult.__table__.c.keys())
    assert {"method", "lr_mode", "lr", "steps", "train_loss", "train_error", "test_loss", "test_error",
            "lambda"} <= cols


def test_until_end_trains_as_long_as_a_child(tmp_path):
    """With until_end the linearised model trains total_steps − step steps, as a child would."""
    import dataclasses

    model, state, data = tc.case("mlp").build()
    ctx = make_ctx(model, state, data, tmp_path)
    ctx.runs = [dataclasses.replace(RUN, total_steps=7, steps_per_epoch=2)]
    ctx.checkpoints = [tc.checkpoint_ref("c0", 3, 1.5)]
    (row,) = ka.compute(ctx, ka.Params(methods=("linearised",), until_end=True))["kernel_accuracy"]
    assert row["steps"] == 4
    ctx.runs = [RUN]  # a run without its length cannot say where the end is
    with pytest.raises(ProbeError, match="until_end"):
        ka.compute(ctx, ka.Params(methods=("linearised",), until_end=True))
