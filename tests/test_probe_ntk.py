"""The ``ntk`` probe against a per-sample autograd loop (J Jᵀ), in float64 on tiny nets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lsdb.errors import ProbeError, ProbeSkipped
from lsdb.probes import _ntk_core as core
from lsdb.probes import ntk
from tests import tiny_cases as tc

C = 3
N_PROBE = tc.N_PROBE  # the context's probe set: the first five training inputs


def make_ctx(model, state, data, tmp_path, indices=None):
    return tc.context(model, data, tmp_path, states=[state], probe_indices=indices)


def brute_full_ntk(model, state, x) -> torch.Tensor:
    """Θ[(i,a),(j,b)] = J Jᵀ with J (nC × P) from one autograd.grad call per (input, logit)."""
    j = tc.per_sample_jacobian(model, state, x)
    return j @ j.T


def from_full(full: torch.Tensor, variant: str, n: int) -> torch.Tensor:
    if variant == "full":
        return full
    blocks = full.reshape(n, C, n, C)
    if variant == "trace":
        return blocks.diagonal(dim1=1, dim2=3).sum(-1)
    return blocks.sum(dim=(1, 3))


def rel_err(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module", params=tc.cases("cnn", "mlp"))
def case(request):
    model, state, data = request.param.build()
    x = data.x_train[:N_PROBE]
    return model, state, data, brute_full_ntk(model, state, x)


@pytest.mark.parametrize("implementation", core.IMPLEMENTATIONS)
@pytest.mark.parametrize("variant", core.VARIANTS)
def test_ntk_equals_autograd_loop(case, variant, implementation):
    model, state, data, full = case
    net = core.bind(model, state, "cpu", torch.float64)
    # chunk 2 does not divide n = 5: exercises off-diagonal blocks and a ragged last block
    k = core.ntk(net, data.x_train[:N_PROBE], variant, implementation, chunk=2)
    assert rel_err(k, from_full(full, variant, N_PROBE)) < 1e-10


@pytest.mark.parametrize("variant", core.VARIANTS)
def test_ntk_symmetric_psd_and_implementations_agree(case, variant):
    model, state, data, _ = case
    net = core.bind(model, state, "cpu", torch.float64)
    x = data.x_train[:N_PROBE]
    k = core.ntk(net, x, variant, "jacobian", chunk=3)
    assert torch.equal(k, k.T)
    ev = torch.linalg.eigvalsh(k)
    assert ev.min() > -1e-10 * ev.max()
    for other in (core.ntk(net, x, variant, "ntvp", chunk=2), core.ntk(net, x, variant, "ntvp", chunk=7),
                  core.ntk(net, x, variant, "structured", chunk=1, cache_mb=0),
                  core.ntk(net, x, variant, "auto", chunk=4)):
        assert rel_err(other, k) < 1e-12


def test_trace_and_sum_logits_consistent_with_full(case):
    model, state, data, _ = case
    net = core.bind(model, state, "cpu", torch.float64)
    x = data.x_train[:N_PROBE]
    full = core.ntk(net, x, "full").reshape(N_PROBE, C, N_PROBE, C)
    assert rel_err(core.ntk(net, x, "trace"), torch.einsum("iaja->ij", full)) < 1e-12
    assert rel_err(core.ntk(net, x, "sum_logits"), full.sum(dim=(1, 3))) < 1e-12
    assert torch.allclose(core.trace_ntk_diagonal(net, x), torch.diagonal(core.ntk(net, x, "trace")), rtol=1e-12)


@pytest.mark.parametrize("sum_logits", [False, True])
def test_structured_jacobian_equals_vmap_jacrev(case, sum_logits):
    model, state, data, _ = case
    net = core.bind(model, state, "cpu", torch.float64)
    assert core.supports_structured(net)
    x = data.x_train
    a = core.jacobian(net, x, sum_logits, structured=False)
    assert rel_err(core.jacobian(net, x, sum_logits, structured=True), a) < 1e-13


def test_structured_falls_back_or_refuses_for_other_layers(tmp_path):
    class Scaled(torch.nn.Module):  # a parameter outside Linear/Conv: no closed form
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, C)
            self.scale = torch.nn.Parameter(torch.tensor(1.5))

        def forward(self, x):
            return self.scale * self.lin(x.flatten(1))

    class Twice(torch.nn.Module):  # one layer applied twice
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(C, C)

        def forward(self, x):
            return self.lin(torch.tanh(self.lin(x.flatten(1)[:, :C])))

    class OverSequence(torch.nn.Module):  # a Linear applied at every position of a sequence
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, C)

        def forward(self, x):
            return self.lin(x.reshape(x.shape[0], 3, 2)).sum(1)

    x = torch.randn(4, 6, dtype=torch.float64)
    for model in (Scaled().double(), Twice().double(), OverSequence().double()):
        net = core.bind(model, model.state_dict(), "cpu", torch.float64)
        ref = brute_full_ntk(model, model.state_dict(), x)
        assert rel_err(core.ntk(net, x, "full", "auto"), ref) < 1e-10
    with pytest.raises(ProbeError, match="structured"):
        net = core.bind(Scaled().double(), Scaled().double().state_dict(), "cpu", torch.float64)
        core.ntk(net, x, "trace", "structured")


def test_cross_ntk_is_a_block_of_the_joint_kernel(case):
    model, state, data, _ = case
    net = core.bind(model, state, "cpu", torch.float64)
    x = data.x_train[:7]
    for variant in core.VARIANTS:
        per = C if variant == "full" else 1
        joint = core.ntk(net, x, variant)
        cross = core.cross_ntk(net, x[5:], x[:5], variant, chunk=1)
        assert rel_err(cross, joint[5 * per :, : 5 * per]) < 1e-12


@pytest.mark.parametrize("variant", core.VARIANTS)
def test_compute_row_matches_brute_force(case, variant, tmp_path):
    model, state, data, full = case
    ctx = make_ctx(model, state, data, tmp_path)
    (row,) = ntk.compute(ctx, ntk.Params(variant=variant, dtype="float64", chunk=2))["ntk"]
    k = from_full(full, variant, N_PROBE)
    stored = ctx.artifacts.get(row["artifact"])
    assert stored.dtype == np.float64
    assert rel_err(torch.from_numpy(stored), k) < 1e-10

    ev = torch.linalg.eigvalsh(k).flip(0)
    m = k.shape[0]
    assert row["variant"] == variant and row["n"] == N_PROBE and row["rows"] == m
    assert row["frobenius_norm"] == pytest.approx(float(torch.sqrt((k**2).sum())), rel=1e-10)
    assert row["trace"] == pytest.approx(float(ev.sum()), rel=1e-10)
    assert row["mean_diagonal"] == pytest.approx(float(ev.sum()) / m, rel=1e-10)
    assert [row["top1"], row["top2"], row["top3"]] == pytest.approx(ev[:3].tolist(), rel=1e-9)
    assert row["effective_rank"] == pytest.approx(float(ev.sum() ** 2 / (ev**2).sum()), rel=1e-10)

    # target kernel by a loop over (input, logit) pairs; centring by explicit H matrices
    y = data.y_train[:N_PROBE]
    if variant == "full":
        t = torch.tensor([[float(y[i] == a and y[j] == b) for j in range(N_PROBE) for b in range(C)]
                          for i in range(N_PROBE) for a in range(C)], dtype=torch.float64)
    else:
        t = torch.tensor([[float(y[i] == y[j]) for j in range(N_PROBE)] for i in range(N_PROBE)], dtype=torch.float64)
    h = torch.eye(m, dtype=torch.float64) - 1.0 / m
    cos = lambda a, b: float((a * b).sum() / (a.norm() * b.norm()))  # noqa: E731
    assert row["alignment"] == pytest.approx(cos(k, t), rel=1e-10)
    assert row["centered_alignment"] == pytest.approx(cos(h @ k @ h, h @ t @ h), rel=1e-9)


def test_default_artifact_is_float32_and_content_addressed(tmp_path):
    model, state, data = tc.case("mlp").build()
    ctx = make_ctx(model, state, data, tmp_path)
    (row,) = ntk.compute(ctx, ntk.Params())["ntk"]
    stored = ctx.artifacts.get(row["artifact"])
    assert stored.dtype == np.float32 and stored.shape == (N_PROBE, N_PROBE) and row["dtype"] == "float32"
    (again,) = ntk.compute(ctx, ntk.Params())["ntk"]
    assert again["artifact"] == row["artifact"]


def test_lanczos_top_eigenvalues_match_dense():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(40, 12, generator=g, dtype=torch.float64)
    k = a @ a.T
    dense = core.top_eigenvalues(k, 3)
    assert core.top_eigenvalues(k, 3, dense_limit=0) == pytest.approx(dense, rel=1e-9)


def test_probe_set_larger_than_data_is_a_probe_error(tmp_path):
    model, state, data = tc.case("mlp").build()
    with pytest.raises(ProbeError, match="larger than the training set"):
        ntk.compute(make_ctx(model, state, data, tmp_path, torch.arange(20)), ntk.Params())
    with pytest.raises(ProbeError, match="out of range"):
        ntk.compute(make_ctx(model, state, data, tmp_path, torch.tensor([0, 42])), ntk.Params())


def test_bad_params_and_diverged_checkpoint(tmp_path):
    model, state, data = tc.case("mlp").build()
    with pytest.raises(ProbeError, match="unknown NTK variant"):
        ntk.compute(make_ctx(model, state, data, tmp_path), ntk.Params(variant="diag"))
    with pytest.raises(ProbeError, match="implementation"):
        ntk.compute(make_ctx(model, state, data, tmp_path), ntk.Params(implementation="fast"))
    broken = tc.clone_state(state)
    broken["net.0.weight"][0, 0] = float("nan")
    with pytest.raises(ProbeSkipped, match="non-finite"):
        ntk.compute(make_ctx(model, broken, data, tmp_path), ntk.Params())


def test_kernel_scalars_are_scale_aware():
    """Scaling Θ by c scales norm/trace/eigenvalues by c and leaves rank and alignment alone."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(6, 4, generator=g, dtype=torch.float64)
    k, y = a @ a.T, torch.tensor([0, 1, 2, 0, 1, 2])
    s1, s2 = core.summarise(k, y, 3, "trace"), core.summarise(7.0 * k, y, 3, "trace")
    for key in ("frobenius_norm", "trace", "top1", "mean_diagonal"):
        assert s2[key] == pytest.approx(7.0 * s1[key], rel=1e-12)
    for key in ("effective_rank", "alignment", "centered_alignment"):
        assert s2[key] == pytest.approx(s1[key], rel=1e-12)
    assert core.effective_rank(torch.eye(6, dtype=torch.float64)) == pytest.approx(6.0)


@pytest.mark.parametrize("choice", ["default", "every layer", "no layer"])
@pytest.mark.parametrize("name", ["cnn1d", "cnn2d", "mlp", "odd"])
def test_trace_kernel_from_layer_signals_is_the_jacobian_gram(name, choice, monkeypatch):
    """The trace NTK from per-layer output gradients and input patches (Σ_{t,t'} (G_i[t]·G_j[t'])
    (U_i[t]·U_j[t']) per weight) equals the Gram of the per-input Jacobians, whichever layers take it."""
    from tests.test_layerwise import setup

    model, net, x, _, _ = setup(name)
    if choice != "default":
        monkeypatch.setattr(core, "kernel_by_layer", lambda *a: choice == "every layer")
    assert core.by_layers(net, x, "trace") == (choice != "no layer")
    want = core.ntk(net, x, "trace", implementation="structured", chunk=4)
    got = core.ntk(net, x, "trace", chunk=4)  # auto
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, torch.cat([core.jacobian(net, x)]).reshape(len(x), -1)
                               @ core.jacobian(net, x).reshape(len(x), -1).T, rtol=1e-10, atol=1e-12)


def test_which_layers_take_their_kernel_from_signals():
    from lsdb.train.models import CNN1d

    model = CNN1d((1, 40), 10)  # the full study's CNN: 40 → 20 → 10 → 5 positions
    picks = [core.kernel_by_layer(m, 10, t) for m, t in zip([*model.features[::2], model.readout], (20, 10, 5, 1))]
    assert picks == [False, False, True, True]
