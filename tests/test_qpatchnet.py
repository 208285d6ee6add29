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
