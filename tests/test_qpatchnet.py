"""The state-vector simulator and QPatchNet (lsdb.train.quantum): checked against PennyLane's default.qubit,
the parameter-shift rule and torch.func, and trained and probed through lsdb's normal path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, vmap

from lsdb.errors import ProbeError, SpecError
from lsdb.train import quantum as Q
from lsdb.train.quantum import QPatchNet
from tests.conftest import REPO

DT = torch.float64
GATES = ("RX", "RY", "RZ", "CNOT")


def random_circuit(n: int, length: int, rng: np.random.Generator, batch: int) -> list[tuple]:
    """(gate, wires, angles (batch,) or None): rotations on random wires, CNOTs on random ordered pairs."""
    ops = []
    for _ in range(length):
        name = GATES[rng.integers(len(GATES) if n > 1 else 3)]
        if name == "CNOT":
            ops.append((name, tuple(int(w) for w in rng.choice(n, 2, replace=False)), None))
        else:
            ops.append((name, (int(rng.integers(n)),), rng.uniform(-2 * math.pi, 2 * math.pi, batch)))
    return ops


def simulate(ops, n: int, batch: int) -> torch.Tensor:
    state = Q.zero_state(n, (batch,), torch.complex128)
    for name, wires, angles in ops:
        if name == "CNOT":
            state = Q.cnot(state, wires[0], wires[1], n)
        else:
            gate = {"RX": Q.rx, "RY": Q.ry, "RZ": Q.rz}[name](torch.tensor(angles, dtype=DT))
            state = Q.apply_1q(state, gate, wires[0], n)
    return state


def pennylane_reference(ops, n: int, b: int):
    """(state vector, ⟨Z_w⟩ for every wire) of batch element ``b`` on PennyLane's default.qubit."""
    import pennylane as qml

    dev = qml.device("default.qubit", wires=n)

    def circuit():
        for name, wires, angles in ops:
            if name == "CNOT":
                qml.CNOT(wires=list(wires))
            else:
                getattr(qml, name)(float(angles[b]), wires=wires[0])

    state = qml.QNode(lambda: (circuit(), qml.state())[1], dev)()
    z = qml.QNode(lambda: (circuit(), [qml.expval(qml.PauliZ(w)) for w in range(n)])[1], dev)()
    return np.asarray(state), np.asarray(z, dtype=float)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_simulator_agrees_with_pennylane_default_qubit(n):
    rng = np.random.default_rng(100 + n)
    batch = 3  # three angle sets through one batched simulation, each checked alone
    for _ in range(3):
        ops = random_circuit(n, 6 * n + 4, rng, batch)
        state = simulate(ops, n, batch)
        z = Q.expval_z(state, n)
        for b in range(batch):
            want_state, want_z = pennylane_reference(ops, n, b)
            assert np.abs(state[b].reshape(-1).numpy() - want_state).max() < 1e-6
            assert np.abs(z[b].numpy() - want_z).max() < 1e-6


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_state_stays_normalised(dtype):
    n, batch = 5, 4
    ops = random_circuit(n, 60, np.random.default_rng(7), batch)
    state = Q.zero_state(n, (batch,), dtype)
    real = torch.float64 if dtype == torch.complex128 else torch.float32
    for name, wires, angles in ops:
        if name == "CNOT":
            state = Q.cnot(state, *wires, n)
        else:
            state = Q.apply_1q(state, getattr(Q, name.lower())(torch.tensor(angles, dtype=real)), wires[0], n)
        assert state.dtype == dtype
    tol = 1e-12 if dtype == torch.complex128 else 1e-5
    assert torch.allclose(Q.norm(state, n), torch.ones(batch, dtype=real), atol=tol)
    z = Q.expval_z(state, n)
    assert z.dtype == real and bool((z.abs() <= 1 + tol).all())


def test_cnot_on_a_basis_state_and_a_bad_pair():
    n = 3
    state = Q.apply_1q(Q.zero_state(n, (1,), torch.complex128), Q.rx(torch.tensor([math.pi], dtype=DT)), 0, n)
    out = Q.cnot(state, 0, 2, n)  # |100⟩ (up to phase) → |101⟩
    assert Q.expval_z(out, n)[0].tolist() == pytest.approx([-1.0, 1.0, -1.0])
    with pytest.raises(ValueError, match="both qubit 1"):
        Q.cnot(state, 1, 1, n)


def _digits_batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=DT), torch.randint(0, 10, (n,), generator=g)


def test_gradients_match_the_parameter_shift_rule():
    """The logits are linear in the ⟨Z_q⟩, so each rotation angle obeys the shift rule exactly."""
    torch.manual_seed(0)
    model = QPatchNet((1, 8, 8), 10, qubits=3, patches=4, layers=2).double()
    x, _ = _digits_batch(4)
    weights = torch.randn(4, 10, dtype=DT, generator=torch.Generator().manual_seed(1))

    def f(theta):
        return (functional_call(model, {"theta": theta}, (x,)) * weights).sum()

    theta = model.theta.detach().clone()
    auto = grad(f)(theta)
    shift = torch.zeros(theta.numel(), dtype=DT)
    for i in range(theta.numel()):
        e = torch.zeros(theta.numel(), dtype=DT)
        e[i] = math.pi / 2
        shift[i] = (f(theta + e.view_as(theta)) - f(theta - e.view_as(theta))) / 2
    assert torch.allclose(auto.reshape(-1), shift, atol=1e-10)
    # every angle is live: RZ before RY, so no Z rotation sits idle before the Z read-out
    assert bool((auto.abs() > 1e-8).all())


# ------------------------------------------------------------------------------------------------ the model

@pytest.mark.parametrize("patches, window", [(1, ((8, 8), (8, 8))), (4, ((6, 2), (6, 2))), (9, ((4, 2), (4, 2)))])
def test_forward_shapes_and_patches_on_digits(patches, window):
    torch.manual_seed(0)
    model = QPatchNet((1, 8, 8), 10, qubits=4, patches=patches, layers=2)
    x = torch.randn(5, 1, 8, 8)
    assert model(x).shape == (5, 10) and model.window == window
    (p, s), _ = window
    k = math.isqrt(patches)
    want = torch.stack([x[:, :, i * s:i * s + p, j * s:j * s + p].reshape(5, -1)
                        for i in range(k) for j in range(k)], 1)
    assert torch.equal(model.patch_values(x), want)
    assert sum(t.numel() for t in model.parameters()) == patches * (2 * 4 * 2 + (4 + 1) * 10)


@pytest.mark.parametrize("patches, window", [(1, (40, 40)), (4, (16, 8)), (9, (8, 4))])
def test_forward_shapes_and_windows_on_signals(patches, window):
    torch.manual_seed(0)
    flat = QPatchNet((40,), 10, qubits=4, patches=patches, layers=1)
    torch.manual_seed(0)
    channel = QPatchNet((1, 40), 10, qubits=4, patches=patches, layers=1)
    x = torch.randn(3, 40)
    assert flat.window == (window,)
    out = flat(x)
    assert out.shape == (3, 10) and torch.allclose(out, channel(x.unsqueeze(1)))
    p, s = window
    want = torch.stack([x[:, i * s:i * s + p] for i in range(patches)], 1)
    assert torch.equal(flat.patch_values(x), want)


def test_the_encoding_is_an_average_pool_into_ry_angles():
    model = QPatchNet((1, 4), 2, qubits=2, patches=1, layers=1).double()
    a = torch.tensor([[0.3, 0.5, -1.0, 2.0]], dtype=DT)  # qubit 0 reads mean(0.3, 0.5), qubit 1 mean(-1, 2)
    state = Q.zero_state(2, (1,), torch.complex128)
    for q, angle in enumerate((0.4, 0.5)):
        state = Q.apply_1q(state, Q.ry(torch.tensor([angle], dtype=DT)), q, 2)
    assert torch.allclose(model.patch_values(a) @ model.pool, torch.tensor([[[0.4, 0.5]]], dtype=DT))
    # no layers' worth of rotations: with zero angles the circuit is the CNOT alone
    with torch.no_grad():
        model.theta.zero_()
    want = Q.expval_z(Q.cnot(state, 0, 1, 2), 2)
    assert torch.allclose(model.expectations(a)[:, 0], want)


@pytest.mark.parametrize("shape, kw, message", [
    ((1, 8, 8), {"qubits": 9}, r"width = 9 qubits per patch; the state-vector simulator takes 1 to 8"),
    ((1, 8, 8), {"patches": 6}, r"patches must be a square number \(1, 4, 9, …\).*got 6"),
    ((1, 8, 8), {"patches": 64}, r"8 overlapping patches do not fit along an input height of 8"),
    ((40,), {"patches": 40}, r"40 overlapping patches do not fit along an input length of 40"),
    ((8,), {"patches": 4, "qubits": 6}, r"width = 6 qubits but a patch holds only 5 values"),
    ((2, 3, 8, 8), {}, r"needs \(C, H, W\) images or \(L,\) / \(C, L\) signals, got shape \(2, 3, 8, 8\)"),
])
def test_bad_settings_are_spec_errors_naming_the_value(shape, kw, message):
    with pytest.raises(SpecError, match=message):
        QPatchNet(shape, 10, **kw)


def test_a_few_sgd_steps_lower_the_loss():
    torch.manual_seed(0)
    model = QPatchNet((1, 8, 8), 10, qubits=4, patches=4, layers=2)
    x, y = _digits_batch(16)
    x = x.float()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1 and all(b < a for a, b in zip(losses, losses[1:])), losses
    assert all(p.dtype == torch.float32 and not p.is_complex() for p in model.parameters())


def test_forward_over_reverse_hvp_is_symmetric_and_matches_the_hessian_probe():
    from lsdb.probes.hessian import HessianOperator

    torch.manual_seed(0)
    model = QPatchNet((1, 8, 8), 10, qubits=3, patches=4, layers=2).double()
    x, y = _digits_batch(6)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_fn(p):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    assert loss_fn(params).dtype == DT  # real loss out of complex amplitudes
    names = list(params)

    def flat(d):
        return torch.cat([d[n].reshape(-1) for n in names])

    def unflat(v):
        return {n: t.view_as(params[n]) for n, t in zip(names, v.split([params[n].numel() for n in names]))}

    def hvp(v):
        return flat(jvp(grad(loss_fn), (params,), (unflat(v),))[1])

    g = torch.Generator().manual_seed(3)
    u, v = (torch.randn(flat(params).numel(), dtype=DT, generator=g) for _ in range(2))
    hu, hv = hvp(u), hvp(v)
    assert abs(float(v @ hu - u @ hv)) < 1e-10 * max(1.0, float(hu.norm() * v.norm()))
    assert float(hu.norm()) > 1e-3
    batched = vmap(hvp)(torch.stack([u, v]))  # the probe's fwd_rev path vmaps over vectors
    assert torch.allclose(batched, torch.stack([hu, hv]), atol=1e-12)
    for method in ("fwd_rev", "double_backward"):
        op = HessianOperator(loss_fn, params, method)
        assert torch.allclose(op.matvec(u), hu, atol=1e-10), method


TINY_QUANTUM_SPEC = """
[experiment]
name = "tiny-quantum"
seeds = [0]

[data]
name = "digits"
probe_set_size = 16
train_subset = 256

[model]
name = "qpatchnet"
width = 3
depth = 1
patches = 4

[optim]
lr = 0.3
batch_size = 64
epochs = 2
lr_drops = []

[train]
chance_after_epochs = 10  # two epochs leave a quantum patch network near chance: not a divergence

[checkpoints]
log_points = 0
every_epochs = 1

[variants.q1.model]
patches = 1

[probes.hessian]
on_checkpoints = "final"
batch_size = 64
top_k = 2
max_iter = 10
trace_hvps = 4
density_vectors = 0
sharpness_batches = 0
"""


@pytest.mark.slow
def test_a_qpatchnet_spec_trains_and_is_probed_end_to_end(tmp_path):
    import lsdb
    from lsdb import runner
    from lsdb.plan import load_spec
    from lsdb.store import Store

    (tmp_path / "q.toml").write_text(TINY_QUANTUM_SPEC)
    summary = runner.run(load_spec(tmp_path / "q.toml"), Store.init(tmp_path / "store"))
    assert summary.jobs_failed == 0
    db = lsdb.open(tmp_path / "store")
    runs = db.sql("SELECT variant, model, patches, width, depth, num_params, status FROM run ORDER BY variant").rows()
    assert runs == [("base", "qpatchnet", 4, 3, 1, 4 * (2 * 3 + 4 * 10), "finished"),
                    ("q1", "qpatchnet", 1, 3, 1, 2 * 3 + 4 * 10, "finished")]
    lam = db.sql("SELECT value FROM metric_series WHERE metric = 'hessian_top_eigenvalue'")["value"].to_list()
    assert len(lam) == 2 and all(math.isfinite(v) and v > 0 for v in lam)
    loss = db.sql("SELECT run_id, step, train_loss FROM checkpoint ORDER BY run_id, step").rows()
    assert all(a[2] > b[2] for a, b in zip(loss, loss[1:]) if a[0] == b[0] and b[1] > 0 and a[1] == 0)


def test_the_kawase_example_plans_both_families_with_every_probe():
    from lsdb.plan import expand_runs, load_spec, probe_requests, simulated_study

    spec = load_spec(REPO / "examples" / "kawase-qnn.toml")
    runs = expand_runs(spec, 1437)
    grid = {(r.config.model.name, r.config.model.patches, r.config.model.depth) for r in runs}
    assert {("qpatchnet", n, layers) for n in (1, 4, 9) for layers in (1, 2, 4)} <= grid
    assert {("patchnet", n, 1) for n in (1, 4, 9)} <= grid and {r.seed for r in runs} == {0, 1, 2}
    assert {req[0] for req in probe_requests(spec, simulated_study(runs))} == {"hessian", "slice"}


def test_weight_matching_refuses_qpatchnet_by_name():
    from lsdb.probes.merge import layer_chain

    with pytest.raises(ProbeError, match=r"merge: cannot align QPatchNet: it does not list its layers"):
        layer_chain(QPatchNet((1, 8, 8), 10))
