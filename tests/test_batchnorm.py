"""Each probe's stated BatchNorm semantics (docs/batchnorm.md), checked against a brute-force
reference on the tiny Conv1d + BatchNorm1d net of ``tiny_cases`` in float64; the semantics stored
in ``probe_job.batchnorm``; and every fast path falling back to the general one for a model it
does not understand.

The references are written the plain way: a copy of the model holding a state dict, in eval mode,
and BatchNorm statistics recomputed by hand (mean and unbiased variance of the convolution's
output over examples and positions), not through the probes' own helpers.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lsdb.errors import ProbeError
from lsdb.probes import PROBES, _directions as D, _ntk_core as core, probe_module
from lsdb.probes import barrier, eval as eval_probe, flatness, hessian, kernel_accuracy, merge, ntk, slice as slice_probe
from lsdb.probes import weights
from lsdb.probes._fused import fused_forward
from lsdb.probes.base import BATCHNORM_MODES
from lsdb.probes.worker import batchnorm_mode
from lsdb.train.models import CNN1d, plain_layers
from tests import tiny_cases as tc

DT = tc.DT
BN = tc.case("bn12")  # Conv1d(1→3, k 3) → BatchNorm1d → ReLU → Linear; 60 train / 40 test signals, 4 classes


def trained_like(seed: int) -> tuple[nn.Module, dict]:
    """The BN net with running statistics far from a fresh one's and a non-trivial BatchNorm affine
    map, as a trained checkpoint would have."""
    model = BN.model(seed)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        model.bn.weight.copy_(0.5 + torch.rand(3, generator=g, dtype=DT))
        model.bn.bias.copy_(torch.randn(3, generator=g, dtype=DT))
        model.bn.running_mean.copy_(torch.randn(3, generator=g, dtype=DT))
        model.bn.running_var.copy_(0.5 + torch.rand(3, generator=g, dtype=DT))
        model.bn.num_batches_tracked.fill_(7)
    return model, tc.clone_state(model)


def with_stats_of(model, state: dict, x: torch.Tensor) -> dict:
    """``state`` with the BatchNorm statistics computed by hand on ``x``: the mean and the unbiased
    variance of the convolution's output over examples and positions (what one train-mode pass
    with a cumulative average stores, for a pass in one batch)."""
    h = F.conv1d(x, state["conv.weight"], state["conv.bias"])
    return {**state, "bn.running_mean": h.mean(dim=(0, 2)), "bn.running_var": h.var(dim=(0, 2), unbiased=True)}


def eval_loss(model, state: dict, x, y) -> tuple[float, float]:
    """Mean cross-entropy and error of a copy of ``model`` holding ``state``, in eval mode."""
    m = copy.deepcopy(model)
    m.load_state_dict(state)
    m.eval()
    return tc.loss_and_error(m, x, y)


def combine(*terms) -> dict:
    """Σ c·state over (c, state) pairs; integer buffers from the first state."""
    first = terms[0][1]
    return {k: sum(c * s[k] for c, s in terms) if v.is_floating_point() else v for k, v in first.items()}


# ------------------------------------------------------------------- recomputed statistics


def test_barrier_recomputes_statistics_on_the_train_subset_at_the_midpoint(tmp_path):
    (model, s1), (_, s2) = trained_like(0), trained_like(1)
    data = BN.data()
    params = barrier.Params(points=3, train_subset=30)
    out = barrier.compute(tc.context(model, data, tmp_path, states=[s1, s2]), params)
    mid = next(r for r in out["barrier_curve"] if r["alpha"] == 0.5)
    x_stats = data.x_train[tc.train_subset(60, 30)]
    ref = with_stats_of(model, combine((0.5, s1), (0.5, s2)), x_stats)
    assert mid["test_loss"] == pytest.approx(eval_loss(model, ref, data.x_test, data.y_test)[0], rel=1e-10)
    assert mid["train_loss"] == pytest.approx(eval_loss(model, ref, x_stats, data.y_train[tc.train_subset(60, 30)])[0],
                                              rel=1e-10)
    # the endpoints too: the checkpoint's own statistics are replaced
    start = out["barrier_curve"][0]
    assert start["test_loss"] == pytest.approx(eval_loss(model, with_stats_of(model, s1, x_stats),
                                                         data.x_test, data.y_test)[0], rel=1e-10)
    assert start["test_loss"] != pytest.approx(eval_loss(model, s1, data.x_test, data.y_test)[0], rel=1e-3)


def test_slice_recomputes_statistics_at_every_point(tmp_path):
    model, state = trained_like(0)
    data = BN.data()
    params = slice_probe.Params(dims=(1,), points_1d=3, train_subset=30, test_subset=20)
    rows = slice_probe.compute(tc.context(model, data, tmp_path, states=[state]), params)["slice"]
    d1 = D.filter_normalised_direction(model, state, torch.Generator().manual_seed(0))
    x_stats = data.x_train[tc.train_subset(60, 30)]
    for row in (r for r in rows if r["split"] == "test"):
        point = combine((1.0, state), (row["a"], {**state, **d1}))
        ref = eval_loss(model, with_stats_of(model, point, x_stats), data.x_test[:20], data.y_test[:20])
        assert row["loss"] == pytest.approx(ref[0], rel=1e-10) and row["error"] == pytest.approx(ref[1])
    # bn_recompute = false keeps the checkpoint's statistics (directions are zero on them)
    off = slice_probe.compute(tc.context(model, data, tmp_path, states=[state]),
                              slice_probe.Params(dims=(1,), points_1d=3, train_subset=30, test_subset=20,
                                                 bn_recompute=False))["slice"]
    centre = next(r for r in off if r["split"] == "test" and r["a"] == 0.0)
    assert centre["loss"] == pytest.approx(eval_loss(model, state, data.x_test[:20], data.y_test[:20])[0], rel=1e-10)


def test_flatness_recomputes_statistics_at_w_along_directions_and_in_the_ascent(tmp_path):
    model, state = trained_like(0)
    data = BN.data()
    params = flatness.Params(train_subset=30, directions=1, points=3, curvature_points=3, restarts=0, pgd_steps=1)
    row = flatness.compute(tc.context(model, data, tmp_path, states=[state]), params)["flatness"][0]
    idx = tc.train_subset(60, 30)
    x, y = data.x_train[idx], data.y_train[idx]
    L0 = eval_loss(model, with_stats_of(model, state, x), x, y)[0]
    assert row["train_loss"] == pytest.approx(L0, rel=1e-10)
    # the adversarial errors start from the statistics recomputed at w: the clean error is theirs
    clean = eval_loss(model, with_stats_of(model, state, x), data.x_test, data.y_test)[1]
    assert row["clean_error"] == pytest.approx(clean)
    d = D.filter_normalised_direction(model, state, torch.Generator().manual_seed(0))
    losses = [eval_loss(model, with_stats_of(model, combine((1.0, state), (a, {**state, **d})), x), x, y)[0]
              for a in (-1.0, 0.0, 1.0)]
    assert row["sharpness_1d"] == pytest.approx(sum(losses) / 3 - L0, rel=1e-9)

    # the worst-case ascent: its value is the recomputed loss at its best point
    floats, fixed = D.split_float(state)
    names = D.filter_names(model, floats)
    start = {n: 0.5 * 0.05 * d[n] for n in names}
    model.eval()
    value, eps = flatness.worst_case_sharpness(D.loss_function(model, fixed, x, y), floats, names, 0.05, [start], 3,
                                               lambda p: D.recompute_bn_stats(model, p, fixed, x, 1000))
    best = {**state, **{n: floats[n] + eps[n] for n in names}}
    assert value == pytest.approx(eval_loss(model, with_stats_of(model, best, x), x, y)[0] - L0, rel=1e-9)


# ----------------------------------------------------------------------------- eval mode


def test_hessian_is_the_eval_mode_hessian(tmp_path):
    model, state = trained_like(0)
    data = BN.data()
    params = hessian.Params(batch_size=24, top_k=1, tol=1e-9, max_iter=200, trace_hvps=2, density_vectors=0)
    out = hessian.compute(tc.context(model, data, tmp_path, states=[state]), params)
    idx = tc.train_subset(60, 24)
    x, y = data.x_train[idx], data.y_train[idx]
    names = [n for n, _ in model.named_parameters()]
    shapes, sizes = [state[n].shape for n in names], [state[n].numel() for n in names]
    buffers = {k: v for k, v in state.items() if k not in names}

    def dense(mode: str) -> torch.Tensor:
        m = copy.deepcopy(model).train(mode == "train")

        def loss(w):
            p = {n: t.view(s) for n, t, s in zip(names, w.split(sizes), shapes)}
            return F.cross_entropy(functional_call(m, {**p, **{k: v.clone() for k, v in buffers.items()}}, (x,)), y)

        w0 = torch.cat([state[n].reshape(-1) for n in names])
        return torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, w0))[-1]

    top = out["hessian"][0]["top_eigenvalue"]
    assert top == pytest.approx(float(dense("eval")), rel=1e-7)
    assert top != pytest.approx(float(dense("train")), rel=1e-2)  # the semantics matters on this net
    assert torch.equal(state["bn.running_mean"], trained_like(0)[1]["bn.running_mean"])  # not updated in place


def test_ntk_is_the_eval_mode_kernel(tmp_path):
    model, state = trained_like(0)
    data = BN.data()
    k, _ = ntk.probe_kernel(tc.context(model, data, tmp_path, states=[state]), ntk.Params(variant="full"))
    x = data.x_train[: tc.N_PROBE]
    j = tc.per_sample_jacobian(copy.deepcopy(model).eval(), state, x)
    torch.testing.assert_close(k, j @ j.T, rtol=1e-10, atol=1e-12)
    j_train = tc.per_sample_jacobian(copy.deepcopy(model).train(), tc.clone_state(state), x)
    assert not torch.allclose(k, j_train @ j_train.T, rtol=1e-3)
    # the closed-form Jacobian does not cover BatchNorm; the other implementations agree
    net = core.bind(model, state, "cpu", DT)
    assert not core.supports_structured(net)
    torch.testing.assert_close(core.ntk(net, x, "full", "ntvp"), k, rtol=1e-9, atol=1e-11)


def test_kernel_accuracy_linearises_the_eval_mode_network(tmp_path):
    model, state = trained_like(0)
    data = BN.data()
    net = core.bind(model, state, "cpu", DT)
    g = torch.Generator().manual_seed(3)
    delta = {n: 0.1 * torch.randn(p.shape, generator=g, dtype=DT) for n, p in net.params.items()}
    x = data.x_test[:6]
    ref_model = copy.deepcopy(model).eval()
    j = tc.per_sample_jacobian(ref_model, state, x).reshape(6, 4, -1)
    with torch.no_grad():
        f0 = ref_model(x)
    flat = torch.cat([delta[n].reshape(-1) for n, _ in model.named_parameters()])
    torch.testing.assert_close(kernel_accuracy.linearised_logits(net, delta, x), f0 + j @ flat, rtol=1e-10, atol=1e-12)
    assert kernel_accuracy.CachedLinearisation.build(model, net.params, data.x_train, 64.0, net.buffers) is None

    # kernel regression on the probe set against the dense trace kernel of the eval-mode network
    params = kernel_accuracy.Params(methods=("kernel_regression",), ridge=1e-3)
    row = kernel_accuracy.compute(tc.context(model, data, tmp_path, states=[state]), params)["kernel_accuracy"][0]
    xp, yp = data.x_train[: tc.N_PROBE], data.y_train[: tc.N_PROBE]
    jp = tc.per_sample_jacobian(ref_model, state, xp).reshape(tc.N_PROBE, 4, -1)
    jt = tc.per_sample_jacobian(ref_model, state, data.x_test).reshape(40, 4, -1)
    kxx, ktx = torch.einsum("iap,jap->ij", jp, jp), torch.einsum("iap,jap->ij", jt, jp)
    lam = 1e-3 * float(torch.diagonal(kxx).mean())
    with torch.no_grad():
        fx, ft = ref_model(xp), ref_model(data.x_test)
    pred = ft + ktx @ torch.linalg.solve(kxx + lam * torch.eye(tc.N_PROBE, dtype=DT), F.one_hot(yp, 4).to(DT) - fx)
    assert row["test_loss"] == pytest.approx(float(F.cross_entropy(pred, data.y_test)), rel=1e-8)


def test_eval_uses_the_running_statistics(tmp_path):
    model, state = trained_like(0)
    model.train()  # as a user's module arrives; the probe must not use batch statistics
    data = BN.data()
    row = eval_probe.compute(tc.context(model, data, tmp_path, states=[state]), eval_probe.Params())["eval"][0]
    assert row["test_loss"] == pytest.approx(eval_loss(model, state, data.x_test, data.y_test)[0], rel=1e-10)
    assert torch.equal(state["bn.running_var"], trained_like(0)[1]["bn.running_var"])
    assert model.training  # left as it was


def test_weights_count_batchnorm_scale_not_statistics(tmp_path):
    model, state = trained_like(0)
    row = weights.compute(tc.context(model, BN.data(), tmp_path, states=[state]), weights.Params())["weights"][0]
    params = [n for n, _ in model.named_parameters()]
    assert "bn.weight" in params and "bn.running_mean" not in params
    assert row["norm"] == pytest.approx(float(torch.sqrt(sum((state[n] ** 2).sum() for n in params))), rel=1e-12)


def test_merge_refuses_batchnorm_naming_the_model(tmp_path):
    (model, s1), (_, s2) = trained_like(0), trained_like(1)
    with pytest.raises(ProbeError, match=r"merge: cannot align ConvBNNet: it has BatchNorm") as e:
        merge.compute(tc.context(model, BN.data(), tmp_path, states=[s1, s2]), merge.Params(points=3))
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------- stated and stored


@pytest.mark.parametrize("name", list(PROBES))
def test_every_probe_states_its_batchnorm_semantics(name):
    module = probe_module(name)
    assert module.BATCHNORM in BATCHNORM_MODES and module.BATCHNORM != "none"
    assert f'BatchNorm (``BATCHNORM`` = "{module.BATCHNORM}"' in module.__doc__
    assert batchnorm_mode(module, module.Params(), BN.model()) == module.BATCHNORM
    assert batchnorm_mode(module, module.Params(), tc.case("cnn12").model()) == "none"
    if hasattr(module.Params(), "bn_recompute"):
        assert batchnorm_mode(module, module.Params(bn_recompute=False), BN.model()) == "running"


def test_the_docs_table_is_the_probes_own():
    import re

    from tests.conftest import REPO

    text = (REPO / "docs" / "batchnorm.md").read_text()
    table = dict(re.findall(r"^\| `(\w+)` \| `(\w+)` \|", text, re.M))
    assert table == {name: probe_module(name).BATCHNORM for name in PROBES}


# ------------------------------------------------------------------------------ fast paths


class TanhChain(nn.Module):
    """A user's network that lists its layers like lsdb's own, with a layer kind the fast paths do
    not know (Tanh)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(1, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(40, 4))

    def prepare(self, x):
        return x

    def steps(self):
        return [(f"net.{i}", m) for i, m in enumerate(self.net)]

    def forward(self, x):
        return self.net(x)


class SecretResidual(CNN1d):
    """A chain by its ``steps()``, but its forward adds a shortcut around the second convolution."""

    def forward(self, x):
        h1 = self.features[1](self.features[0](self.prepare(x)))
        h2 = self.features[3](self.features[2](h1))
        return self.readout(self.flatten(h2 + h1[..., ::2]))


def secret_residual(seed: int, dtype=torch.float32) -> SecretResidual:
    torch.manual_seed(seed)
    return SecretResidual((1, 12), 4, width=4, kernels=(3, 3)).to(dtype)


def test_the_fused_evaluator_falls_back_for_a_model_it_does_not_understand():
    data = BN.data(dtype=torch.float32)
    x, y = data.x_train, data.y_train
    for make in (TanhChain, lambda: secret_residual(0)):
        torch.manual_seed(0)
        model = make().eval()
        floats, fixed = D.split_float(tc.clone_state(model))
        assert fused_forward(model, floats, x) is None  # unknown layer, or fails its self-check
        got = D.evaluate_combinations(model, [floats], torch.ones(1, 1, dtype=DT), fixed, x, y, mode="auto")
        assert float(got.loss[0]) == pytest.approx(tc.loss_and_error(model, x, y)[0], rel=1e-5)
    # where both apply they agree
    torch.manual_seed(0)
    cnn = CNN1d((1, 12), 4, width=4, kernels=(3, 3)).eval()
    floats, fixed = D.split_float(tc.clone_state(cnn))
    assert fused_forward(cnn, floats, x) is not None
    coeffs = torch.tensor([[1.0], [0.5]], dtype=DT)
    fast = D.evaluate_combinations(cnn, [floats], coeffs, fixed, x, y, mode="fused")
    slow = D.evaluate_combinations(cnn, [floats], coeffs, fixed, x, y, mode="loop")
    torch.testing.assert_close(fast.loss, slow.loss, rtol=1e-5, atol=1e-6)


def test_the_cached_linearisation_falls_back_for_a_model_it_does_not_understand():
    data = BN.data()

    def train(model, cached: bool):
        net = core.bind(model, tc.clone_state(model), "cpu", DT)
        cache = kernel_accuracy.CachedLinearisation.build(model, net.params, data.x_train, 64.0, net.buffers)
        assert (cache is not None) == cached
        delta = kernel_accuracy.train_linearised(net, data.x_train, data.y_train, lr=0.1, steps=4, batch_size=16,
                                                 momentum=0.9, seed=0, cached=cache)
        return net, delta

    for model in (TanhChain().double(), secret_residual(0, DT)):
        train(model, cached=False)  # the jvp path runs where the cache does not apply
    torch.manual_seed(0)
    cnn = CNN1d((1, 12), 4, width=4, kernels=(3, 3)).double()
    net, fast = train(cnn, cached=True)
    delta_jvp = kernel_accuracy.train_linearised(net, data.x_train, data.y_train, lr=0.1, steps=4, batch_size=16,
                                                 momentum=0.9, seed=0)
    for n in fast:
        torch.testing.assert_close(fast[n], delta_jvp[n], rtol=1e-9, atol=1e-12)


def test_weight_matching_refuses_what_it_cannot_align(tmp_path):
    data = BN.data()
    tanh = [TanhChain().double() for _ in range(2)]
    assert plain_layers(tanh[0]) is None
    with pytest.raises(ProbeError, match="merge: cannot align TanhChain: its layers include Tanh"):
        merge.compute(tc.context(tanh[0], data, tmp_path, states=[tc.clone_state(m) for m in tanh]),
                      merge.Params(points=3))
    lying = [secret_residual(0, DT), secret_residual(1, DT)]
    assert plain_layers(lying[0]) is not None  # its steps() claim a chain: the guard must catch it
    with pytest.raises(ProbeError, match="changed its outputs"):
        merge.compute(tc.context(lying[0], data, tmp_path, states=[tc.clone_state(m) for m in lying]),
                      merge.Params(points=3))


# ------------------------------------------------------------------------------ the store


def test_a_schema_2_store_gains_the_column(tmp_path):
    import sqlalchemy as sa

    from lsdb.store import Store

    store = Store.init(tmp_path / "store")
    with store.write() as conn:  # make it look like a store written before the column existed
        for view in [r[0] for r in conn.execute(sa.text("SELECT view_name FROM duckdb_views() WHERE NOT internal"))]:
            conn.execute(sa.text(f'DROP VIEW "{view}"'))
        for index in ("ix_probe_job_probe", "ix_probe_job_checkpoint_id"):  # DuckDB drops no indexed column
            conn.execute(sa.text(f"DROP INDEX {index}"))
        conn.execute(sa.text("ALTER TABLE probe_job DROP COLUMN batchnorm"))
        conn.execute(sa.text("UPDATE schema_version SET version = 2"))
    store.migrate()
    with store.read() as con:
        columns = [r[0] for r in con.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = 'probe_job'")
                   .fetchall()]
    assert "batchnorm" in columns


@pytest.mark.slow
def test_jobs_store_their_batchnorm_and_older_logs_replay(tmp_path):
    """Jobs of a BatchNorm-free model say "none"; a logged job without the key (written before it
    existed) replays with a null; an unknown value is refused."""
    import json

    import lsdb
    from lsdb import runner
    from lsdb.integrity import rebuild
    from lsdb.plan import parse_spec
    from lsdb.store import Store
    from tests.conftest import TINY_SPEC

    store = Store.init(tmp_path / "store")
    assert runner.run(parse_spec(TINY_SPEC.replace("seeds = [0, 1]", "seeds = [0]")), store).ok
    db = lsdb.open(store.root)
    assert set(db.sql("SELECT DISTINCT batchnorm FROM probe_job")["batchnorm"].to_list()) == {"none"}
    old, bad = sorted(p for p in store.ingested.iterdir() if (p / "eval.parquet").exists())[:2]
    for shard, edit in ((old, lambda job: job.pop("batchnorm")), (bad, lambda job: job.update(batchnorm="sometimes"))):
        meta = json.loads((shard / "meta.json").read_text())
        edit(meta["job"])
        (shard / "meta.json").write_text(json.dumps(meta))
    report = rebuild(store)
    assert len(report.ingest.rejected) == 1 and "batchnorm 'sometimes'" in report.ingest.rejected[0]
    db = lsdb.open(store.root)
    old_id = json.loads((old / "meta.json").read_text())["job"]["id"]
    assert db.sql(f"SELECT batchnorm FROM probe_job WHERE id = '{old_id}'")["batchnorm"].to_list() == [None]
