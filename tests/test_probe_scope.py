"""``params`` scope of the probes that differentiate or perturb the weights (hessian, ntk, flatness,
kernel_accuracy): each restricted measurement against a brute-force reference over only the
matching parameters, on the shared tiny cases in float64."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from lsdb.errors import ProbeError, SpecError
from lsdb.ids import params_hash
from lsdb.probes import _directions as D
from lsdb.probes import _ntk_core as core
from lsdb.probes import flatness
from lsdb.probes import hessian as H
from lsdb.probes import kernel_accuracy as ka
from lsdb.probes import ntk
from lsdb.probes.base import MAX_PARAM_GLOBS, select_params
from tests import tiny_cases as tc

DT = tc.DT
SCOPED = (H, ntk, flatness, ka)


def _sub_jacobian(model, state, x, names):
    """The columns of the brute-force Jacobian (n·C × P) that belong to ``names``."""
    j = tc.per_sample_jacobian(model, state, x)
    keep, offset = [], 0
    for n, p in model.named_parameters():
        if n in names:
            keep.append(torch.arange(offset, offset + p.numel()))
        offset += p.numel()
    return j[:, torch.cat(keep)]


# ---------------------------------------------------------------------------- selecting names

def test_globs_select_in_model_order_and_empty_means_all():
    names = ["layer1.0.weight", "layer3.0.conv1.weight", "layer3.1.bn.bias", "fc.weight", "fc.bias"]
    assert select_params(names, (), "ntk") == names
    assert select_params(names, ("fc.*", "layer3.*"), "ntk") == names[1:]  # model order, not glob order
    assert select_params(names, ("*.weight",), "ntk") == ["layer1.0.weight", "layer3.0.conv1.weight", "fc.weight"]
    with pytest.raises(ProbeError, match=r"probes.ntk.params: 'FC.\*' matches no parameter.*fc.weight"):
        select_params(names, ("fc.*", "FC.*"), "ntk")  # case-sensitive, on every platform


@pytest.mark.parametrize("probe", SCOPED, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_an_unmatched_glob_fails_the_job_naming_it_and_real_names(probe, tmp_path):
    model, state, data = tc.case("cnn16").build()
    params = probe.Params(params=("readout.*", "layer9.*"))
    with pytest.raises(ProbeError) as err:
        probe.compute(tc.context(model, data, tmp_path, states=[state]), params)
    name = probe.__name__.rsplit(".", 1)[-1]
    assert str(err.value).startswith(f"probes.{name}.params: 'layer9.*' matches no parameter of the model; "
                                     f"its parameters are features.0.weight, features.0.bias")


def test_default_scope_keeps_every_params_hash_and_the_spec_checks_values():
    from lsdb.plan import parse_spec
    from tests.conftest import TINY_SPEC

    for probe in SCOPED:
        assert params_hash(probe.Params(params=())) == params_hash(probe.Params())
        assert params_hash(probe.Params(params=("fc.*",))) != params_hash(probe.Params())
    plain = parse_spec(TINY_SPEC + "\n[probes.hessian]\n")
    written = parse_spec(TINY_SPEC + "\n[probes.hessian]\nparams = []\n")
    assert written.identity() == plain.identity()
    assert dict(written.probe_params()["hessian"]) == {}
    scoped = parse_spec(TINY_SPEC + '\n[probes.ntk]\nparams = ["net.2.*"]\n')
    assert dict(scoped.probe_params()["ntk"])["params"] == ("net.2.*",)
    for bad in ('"fc.*"', "[1]", '[""]', "[" + ", ".join(['"a"'] * (MAX_PARAM_GLOBS + 1)) + "]"):
        with pytest.raises(SpecError, match="probes.flatness.params"):
            parse_spec(TINY_SPEC + f"\n[probes.flatness]\nparams = {bad}\n")


# ------------------------------------------------------------------------------------ hessian

def _hessian_data():
    data = tc.case("tanh16").data()
    return dataclasses.replace(data, x_test=data.x_train[:8], y_test=data.y_train[:8])


@pytest.mark.parametrize("globs", [("4.*",), ("0.bias", "2.weight")], ids=["last_layer", "two_tensors"])
def test_hessian_of_a_block_is_the_dense_hessian_in_those_parameters(globs, tmp_path):
    """Lanczos on the scoped HVPs gives the top eigenvalues of the dense Hessian of the loss in the
    matching parameters alone (torch.autograd.functional.hessian, the rest held fixed)."""
    model, data = tc.case("tanh16").model(), _hessian_data()
    batch = tc.train_subset(96, 64)
    x, y = data.x_train[batch], data.y_train[batch]
    state = tc.clone_state(model)
    names = select_params([n for n, _ in model.named_parameters()], globs, "hessian")
    sizes, shapes = [state[n].numel() for n in names], [state[n].shape for n in names]

    def loss(w):
        block = {n: t.view(s) for n, t, s in zip(names, w.split(sizes), shapes)}
        return F.cross_entropy(functional_call(model, {**state, **block}, (x,)), y)

    w0 = torch.cat([state[n].reshape(-1) for n in names])
    dense = torch.autograd.functional.hessian(loss, w0)
    eig = torch.linalg.eigvalsh(dense).flip(0)

    params = H.Params(batch_size=64, top_k=3, tol=1e-9, max_iter=sum(sizes), trace_hvps=20, density_vectors=0,
                      params=globs)
    out = H.compute(tc.context(model, data, tmp_path), params)
    got = torch.tensor([r["value"] for r in out["hessian_eigenvalue"]], dtype=DT)
    torch.testing.assert_close(got, eig[:3], rtol=1e-7, atol=1e-12)
    assert out["hessian"][0]["top_eigenvalue"] == pytest.approx(float(eig[0]), rel=1e-7)
    # the block is the dense Hessian's diagonal block: the whole-network top eigenvalue differs
    whole = H.compute(tc.context(model, data, tmp_path), dataclasses.replace(params, params=(), max_iter=400))
    assert whole["hessian"][0]["top_eigenvalue"] != pytest.approx(float(eig[0]), rel=1e-3)


# ---------------------------------------------------------------------------------------- ntk

@pytest.mark.parametrize("implementation", ["structured", "jacobian", "ntvp"])
@pytest.mark.parametrize("variant", core.VARIANTS)
def test_ntk_of_a_block_is_the_gram_of_the_restricted_jacobian(variant, implementation, tmp_path):
    model, state, data = tc.case("cnn").build()
    x = data.x_train[:tc.N_PROBE]
    names = ["features.2.weight", "readout.bias"]
    j = _sub_jacobian(model, state, x, names)  # (n·C, P_S)
    full = j @ j.T
    c = full.shape[0] // x.shape[0]
    blocks = full.reshape(x.shape[0], c, x.shape[0], c)
    want = {"full": full, "trace": torch.einsum("iaja->ij", blocks), "sum_logits": blocks.sum((1, 3))}[variant]

    params = ntk.Params(variant=variant, implementation=implementation, chunk=2, params=("features.2.w*", "readout.b*"))
    row = ntk.compute(tc.context(model, data, tmp_path, states=[state]), params)["ntk"][0]
    assert row["trace"] == pytest.approx(float(torch.trace(want)), rel=1e-10)
    assert row["frobenius_norm"] == pytest.approx(float(want.norm()), rel=1e-10)
    net = core.bind(model, state, "cpu", DT, ("features.2.weight", "readout.bias"))
    assert list(net.params) == names
    torch.testing.assert_close(core.ntk(net, x, variant, implementation, chunk=2), want, rtol=1e-10, atol=1e-12)


def test_ntk_of_disjoint_blocks_adds_up_to_the_whole_network():
    model, state, data = tc.case("mlp").build()
    x = data.x_train[:6]
    parts = [core.ntk(core.bind(model, state, "cpu", DT, globs), x, "full")
             for globs in (("net.0.*",), ("net.[24].*",))]
    whole = core.ntk(core.bind(model, state, "cpu", DT), x, "full")
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- kernel accuracy

@pytest.mark.parametrize("globs", [("features.2.*",), ("readout.bias",), ("features.0.weight", "readout.*")])
def test_cached_linearisation_of_a_block_equals_the_jvp(globs):
    """The layer-wise tangent with δ on some layers only (a bias alone included) is the jvp's."""
    model, state, data = tc.case("cnn").build()
    net = core.bind(model, state, "cpu", DT, globs)
    cached = ka.CachedLinearisation.build(model, net.params, data.x_train, 16, net.buffers)
    assert cached is not None
    g = torch.Generator().manual_seed(4)
    delta = {k: 0.1 * torch.randn(v.shape, generator=g, dtype=DT) for k, v in net.params.items()}
    idx = torch.tensor([3, 1, 8, 1])
    torch.testing.assert_close(cached(delta, idx), ka.linearised_logits(net, delta, data.x_train[idx]),
                               rtol=1e-12, atol=1e-12)
    kw = dict(lr=0.3, steps=6, batch_size=4, momentum=0.9, weight_decay=0.01, seed=3)
    fast = ka.train_linearised(net, data.x_train, data.y_train, cached=cached, **kw)
    slow = ka.train_linearised(net, data.x_train, data.y_train, **kw)
    assert set(fast) == set(net.params)
    for k in fast:
        torch.testing.assert_close(fast[k], slow[k], rtol=1e-10, atol=1e-12)


def test_kernel_accuracy_of_a_block_uses_that_blocks_kernel(tmp_path):
    model, state, data = tc.case("cnn").build()
    run = tc.run_ref("r", [0])
    ctx = tc.context(model, data, tmp_path, states=[state], runs=[run])
    params = ka.Params(steps=3, kernel_lr=2.0, params=("readout.*",))
    rows = {r["method"]: r for r in ka.compute(ctx, params)["kernel_accuracy"]}
    j = _sub_jacobian(model, state, data.x_train[:tc.N_PROBE], {"readout.weight", "readout.bias"})
    mean_diag = float((j**2).sum()) / tc.N_PROBE
    assert rows["linearised"]["lr"] == pytest.approx(2.0 / mean_diag, rel=1e-10)
    assert rows["kernel_regression"]["lambda"] == pytest.approx(1e-3 * mean_diag, rel=1e-10)


# ----------------------------------------------------------------------------------- flatness

def test_scoped_directions_are_zero_outside_the_scope():
    model, state, _ = tc.case("cnn16").build()
    d = D.filter_normalised_direction(model, state, torch.Generator().manual_seed(0), ["features.2.weight"])
    assert [n for n, t in d.items() if bool(t.abs().sum() > 0)] == ["features.2.weight"]
    ratio = d["features.2.weight"].flatten(1).norm(dim=1) / state["features.2.weight"].flatten(1).norm(dim=1)
    torch.testing.assert_close(ratio, torch.ones_like(ratio))
    assert D.filter_names(model, state, ["features.2.weight", "features.2.bias"]) == ["features.2.weight"]


def test_flatness_of_a_block_perturbs_only_that_block(tmp_path, monkeypatch):
    """Every point the probe evaluates (random directions and ascent iterates) equals the
    checkpoint outside the scope, and σ_1D is the brute-force one along scoped directions."""
    model, state, data = tc.case("cnn16").build()
    scope = ["readout.weight"]
    seen = []
    evaluate_points, loss_function = D.evaluate_points, D.loss_function

    def spy_points(model_, basis, coeffs, *a, **kw):
        for k in range(coeffs.shape[0]):
            seen.append({n: sum(float(coeffs[k, b]) * basis[b][n] for b in range(len(basis))) for n in basis[0]})
        return evaluate_points(model_, basis, coeffs, *a, **kw)

    def spy_loss(*a, **kw):
        inner = loss_function(*a, **kw)

        def loss(p):
            seen.append({n: t.detach() for n, t in p.items()})
            return inner(p)

        return loss

    monkeypatch.setattr(D, "evaluate_points", spy_points)
    monkeypatch.setattr(D, "loss_function", spy_loss)
    params = flatness.Params(train_subset=40, directions=3, points=5, curvature_points=5, restarts=2,
                             ascent_steps=3, rho=0.1, epsilon=0.2, pgd_steps=2, params=("readout.w*",))
    row = flatness.compute(tc.context(model, data, tmp_path, states=[state]), params)["flatness"][0]
    assert len(seen) > 3 * (5 + 5 + 2)
    moved = set()
    for point in seen:
        for n, t in point.items():
            if n in state and state[n].is_floating_point() and not torch.equal(t, state[n]):
                moved.add(n)
                assert n in scope, f"{n} was perturbed"
    assert moved == set(scope)

    idx = tc.train_subset(50, 40)
    x, y = data.x_train[idx], data.y_train[idx]
    gen = torch.Generator().manual_seed(0)
    dirs = [D.filter_normalised_direction(model, state, gen, scope) for _ in range(3)]

    def loss_at(sd):
        with torch.no_grad():
            return float(F.cross_entropy(functional_call(model, sd, (x,)), y))

    L0 = loss_at(state)
    alphas = torch.linspace(-1, 1, 5, dtype=DT).tolist()
    per_dir = [sum(loss_at({k: state[k] + a * d[k] if k in d else state[k] for k in state}) - L0 for a in alphas) / 5
               for d in dirs]
    assert row["sharpness_1d"] == pytest.approx(sum(per_dir) / 3, rel=1e-10)


def test_flatness_refuses_a_scope_it_cannot_perturb(tmp_path):
    model, state, data = tc.case("cnn16").build()
    with pytest.raises(ProbeError, match=r"selects no tensor that filter normalisation perturbs"):
        flatness.compute(tc.context(model, data, tmp_path, states=[state]), flatness.Params(params=("*.bias",)))
