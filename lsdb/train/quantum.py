"""An exact state-vector simulator in torch, and ``QPatchNet``, the distributed quantum patch network of
Kawase et al. 2025 ("The effect of the number of parameters and the number of local feature patches on loss
landscapes in distributed quantum neural networks").

The simulator
-------------
A state of n ≤ 8 qubits is a complex tensor ``(*batch, 2, …, 2)`` with n trailing qubit axes; qubit 0 is the
first axis (the most significant bit of the basis index, PennyLane's wire order), so amplitude
ψ[b, i₀, …, i_{n−1}] = ⟨i₀…i_{n−1}|ψ_b⟩. Gates are 2×2 matrices ``(*g, 2, 2)`` whose leading dims broadcast
against the state's batch dims (one gate for all states, or one per state):

    RX(θ) = [[c, −is], [−is, c]],  RY(θ) = [[c, −s], [s, c]],  RZ(θ) = diag(e^{−iθ/2}, e^{iθ/2}),
    c = cos(θ/2), s = sin(θ/2);

    CNOT(c → t) flips qubit t where qubit c is 1;   ⟨Z_q⟩ = Σ_i |ψ_i|² (1 − 2·bit_q(i)).

Every operation is out of place and free of data-dependent control flow, so ``torch.func`` (``grad``,
``jacrev``, ``jvp``, ``vmap``, and the Hessian probe's forward-over-reverse ``jvp(grad(·))``) goes through it.
The amplitudes are complex64, or complex128 when the angles are float64; parameters and outputs are real.
``|ψ|²`` is taken as Re² + Im² rather than ``abs()**2``, whose derivative is not smooth at a zero amplitude.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lsdb.errors import SpecError

MAX_QUBITS = 8


def complex_dtype(real: torch.dtype) -> torch.dtype:
    """complex128 for float64 angles, complex64 otherwise."""
    return torch.complex128 if real == torch.float64 else torch.complex64


def zero_state(n: int, batch: tuple[int, ...] = (), dtype: torch.dtype = torch.complex64, device=None) -> torch.Tensor:
    """|0…0⟩ for every element of ``batch``: shape ``(*batch, 2, …, 2)``."""
    psi = torch.zeros(2**n, dtype=dtype, device=device)
    psi[0] = 1  # a fresh constant; nothing differentiates through it
    return psi.reshape((2,) * n).expand(*batch, *(2,) * n)


def _gate(re: list[list[torch.Tensor]], im: list[list[torch.Tensor]]) -> torch.Tensor:
    stack = lambda rows: torch.stack([torch.stack(r, -1) for r in rows], -2)  # noqa: E731
    return torch.complex(stack(re), stack(im))


def rx(theta: torch.Tensor) -> torch.Tensor:
    """RX(θ) = exp(−iθX/2), shape ``(*theta.shape, 2, 2)``."""
    c, s, o = torch.cos(theta / 2), torch.sin(theta / 2), torch.zeros_like(theta)
    return _gate([[c, o], [o, c]], [[o, -s], [-s, o]])


def ry(theta: torch.Tensor) -> torch.Tensor:
    """RY(θ) = exp(−iθY/2), shape ``(*theta.shape, 2, 2)``."""
    c, s, o = torch.cos(theta / 2), torch.sin(theta / 2), torch.zeros_like(theta)
    return _gate([[c, -s], [s, c]], [[o, o], [o, o]])


def rz(theta: torch.Tensor) -> torch.Tensor:
    """RZ(θ) = exp(−iθZ/2), shape ``(*theta.shape, 2, 2)``."""
    c, s, o = torch.cos(theta / 2), torch.sin(theta / 2), torch.zeros_like(theta)
    return _gate([[c, o], [o, c]], [[-s, o], [o, s]])


def apply_1q(state: torch.Tensor, gate: torch.Tensor, wire: int, n: int) -> torch.Tensor:
    """``gate`` (``(*g, 2, 2)``, ``*g`` broadcasting against the batch dims) applied to qubit ``wire``:
    ψ'[…, a, i, r] = Σ_j U[i, j] ψ[…, a, j, r], with a the qubits before ``wire`` and r those after."""
    batch = state.shape[: state.dim() - n]
    s = state.reshape(*batch, 2**wire, 2, 2 ** (n - wire - 1))
    u = gate.to(state.dtype).unsqueeze(-3)  # (*g, 1, 2, 2)
    out = u[..., 0:1] * s[..., 0:1, :] + u[..., 1:2] * s[..., 1:2, :]  # column j of U times row j of ψ
    return out.reshape(*out.shape[:-3], *(2,) * n)


def cnot(state: torch.Tensor, control: int, target: int, n: int) -> torch.Tensor:
    """CNOT with ``control`` and ``target`` qubits: the half of the state where the control is 1 has its
    target axis reversed (|…1…0…⟩ ↔ |…1…1…⟩), the other half is left alone."""
    if control == target:
        raise ValueError(f"cnot: control and target are both qubit {control}")
    base = state.dim() - n
    c, t = base + control, base + target
    off, on = state.select(c, 0), state.select(c, 1)
    on = on.flip(t - 1 if t > c else t)  # ``select`` removed the control axis
    return torch.stack([off, on], dim=c)


def expval_z(state: torch.Tensor, n: int) -> torch.Tensor:
    """⟨Z_q⟩ for q = 0…n−1, shape ``(*batch, n)``, real: Σ_i |ψ_i|² (1 − 2·bit_q(i))."""
    batch = state.shape[: state.dim() - n]
    flat = state.reshape(*batch, 2**n)
    probs = flat.real**2 + flat.imag**2
    index = torch.arange(2**n, device=state.device)
    bits = (index[:, None] >> torch.arange(n - 1, -1, -1, device=state.device)) & 1  # column q: bit of qubit q
    return _contract(probs, (1 - 2 * bits).to(probs.dtype))


def _contract(a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """a @ m for a small matrix m, as a broadcast product and sum. At these sizes a BLAS call costs more than
    its arithmetic, and its thread pool stalls when the machine's other cores are busy."""
    return (a.unsqueeze(-1) * m).sum(-2)


def norm(state: torch.Tensor, n: int) -> torch.Tensor:
    """⟨ψ|ψ⟩ per batch element (1 for a valid state)."""
    flat = state.reshape(*state.shape[: state.dim() - n], 2**n)
    return (flat.real**2 + flat.imag**2).sum(-1)


# ------------------------------------------------------------------------------------------------ the model

def patch_geometry(length: int, k: int, what: str = "length") -> tuple[int, int]:
    """(patch size p, stride s) for ``k`` overlapping windows along an axis of ``length``: one window is the
    whole axis; otherwise s = ⌊length / (k + 1)⌋ and p = length − (k − 1)·s, so the windows cover the axis
    end to end and neighbours overlap by p − s ≥ s (half a window when k + 1 divides the length: 8 pixels
    in 3 windows are 4 wide at stride 2; 40 samples in 4 windows are 16 wide at stride 8)."""
    if k == 1:
        return length, length
    stride = length // (k + 1)
    if stride < 1:
        raise SpecError(f"model qpatchnet: {k} overlapping patches do not fit along an input {what} of {length} "
                        f"(at most {length - 1}); lower [model] patches")
    return length - (k - 1) * stride, stride


class QPatchNet(nn.Module):
    """Distributed quantum patch network (Kawase et al. 2025): ``patches`` = N overlapping patches of the
    input, each read by its own ``qubits``-qubit (n ≤ 8) circuit of ``layers`` = L layers; the N patches'
    logits are averaged.

    Patching. An image (C, H, W) is cut into a k×k grid of patches, N = k² (1, 4, 9, …), each p_h×p_w
    (square for square images) at strides s_h, s_w from ``patch_geometry``: on 8×8 digits N = 1 is the
    whole image, N = 4 four 6×6 patches at stride 2, N = 9 nine 4×4 patches at stride 2. A signal (L,) or
    (C, L) is cut into N windows the same way along its length (MNIST-1D's 40 samples: 16 wide at
    stride 8 for N = 4, 8 wide at stride 4 for N = 9).

    Encoding. A patch's d = C·p_h·p_w values x (row-major) are split into n contiguous near-equal groups
    G_j, and qubit j is prepared by RY(a_j) with a_j = mean_{i∈G_j} x_i (angle encoding of an average pool):
    |φ(x)⟩ = ⊗_j RY(a_j)|0⟩. The map is fixed, not trained, so the trainable parameters are the circuit's
    rotation angles and the read-out, as in a quantum neural network; a trained d×n encoder would add
    d·n classical weights per patch (36·n on a 6×6 patch, more than the circuit's 2·n·L) and make
    "parameters per patch" mostly classical. lsdb's inputs are standardised (mean 0, std 1), so the angles
    lie within about ±2 rad without rescaling.

    Circuit. L layers, each RZ(φ_{l,q}) then RY(θ_{l,q}) on every qubit q, then a CNOT ladder
    0→1→…→n−1. RZ comes first because a Z rotation just before a Z-basis read-out (even across the CNOTs,
    which only permute basis states) changes no probability: its angle would be a dead parameter. Each
    patch has its own angles, ``theta`` of shape (N, L, n, 2) ([…, 0] = φ, […, 1] = θ), drawn uniformly
    from [0, 2π).

    Read-out. z = (⟨Z_0⟩, …, ⟨Z_{n−1}⟩) ∈ [−1, 1]ⁿ, logits of patch m = W_m z + b_m (``head_weight``
    (N, C, n), ``head_bias`` (N, C), PyTorch's Linear initialisation); the output is the mean over the N
    patches. Parameters per patch: 2·n·L + (n + 1)·C.

    The simulation is exact (``lsdb.train.quantum`` state vectors, all patches of a batch in one tensor
    of shape (B, N, 2, …, 2)); gradients are exact autograd derivatives, which equal the parameter-shift
    rule's (f(θ + π/2) − f(θ − π/2)) / 2 for these rotations.
    """

    def __init__(self, input_shape, num_classes: int, qubits: int = 4, patches: int = 4, layers: int = 1):
        super().__init__()
        if not 1 <= qubits <= MAX_QUBITS:
            raise SpecError(f"model qpatchnet: width = {qubits} qubits per patch; the state-vector simulator "
                            f"takes 1 to {MAX_QUBITS} (e.g. [model] width = 4)")
        if layers < 1 or patches < 1:
            raise SpecError(f"model qpatchnet: depth = {layers} layers and patches = {patches} must be ≥ 1")
        shape = tuple(input_shape)
        self.n, self.layers, self.patches = qubits, layers, patches
        if len(shape) == 3:  # (C, H, W): a k×k grid
            k = math.isqrt(patches)
            if k * k != patches:
                raise SpecError(f"model qpatchnet: on images (C, H, W) = {shape} patches must be a square number "
                                f"(1, 4, 9, …) for a k×k grid of patches, got {patches}")
            (ph, sh), (pw, sw) = patch_geometry(shape[1], k, "height"), patch_geometry(shape[2], k, "width")
            self.window = ((ph, sh), (pw, sw))
            d = shape[0] * ph * pw
        elif len(shape) in (1, 2):  # (L,) or (C, L): windows along the length
            self.window = (patch_geometry(shape[-1], patches),)
            d = (shape[0] if len(shape) == 2 else 1) * self.window[0][0]
        else:
            raise SpecError(f"model qpatchnet needs (C, H, W) images or (L,) / (C, L) signals, got shape {shape}")
        if qubits > d:
            raise SpecError(f"model qpatchnet: width = {qubits} qubits but a patch holds only {d} values; "
                            f"use at most {d} qubits or fewer patches")
        self.input_shape = shape
        pool = torch.zeros(d, qubits)
        for j, group in enumerate(torch.arange(d).tensor_split(qubits)):
            pool[group, j] = 1.0 / len(group)
        self.register_buffer("pool", pool, persistent=False)  # derived from the shapes: not in checkpoints
        self.theta = nn.Parameter(torch.empty(patches, layers, qubits, 2).uniform_(0, 2 * math.pi))
        bound = 1 / math.sqrt(qubits)
        self.head_weight = nn.Parameter(torch.empty(patches, num_classes, qubits).uniform_(-bound, bound))
        self.head_bias = nn.Parameter(torch.empty(patches, num_classes).uniform_(-bound, bound))

    def patch_values(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, d): every patch of every input, flattened row-major."""
        b = x.shape[0]
        if len(self.window) == 2:
            (ph, sh), (pw, sw) = self.window
            x = x.reshape(b, *self.input_shape).unfold(2, ph, sh).unfold(3, pw, sw)  # (B, C, k, k, ph, pw)
            return x.permute(0, 2, 3, 1, 4, 5).reshape(b, self.patches, -1)
        (p, s), = self.window
        x = x.reshape(b, -1, self.input_shape[-1]).unfold(2, p, s)  # (B, C, N, p)
        return x.permute(0, 2, 1, 3).reshape(b, self.patches, -1)

    def expectations(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, n): ⟨Z_q⟩ of every patch's circuit."""
        real = self.theta.dtype
        angles = _contract(self.patch_values(x.to(real)), self.pool.to(real))  # (B, N, n)
        n = self.n
        state = zero_state(n, angles.shape[:2], complex_dtype(real), x.device)
        encode = ry(angles)  # (B, N, n, 2, 2): every qubit's gate built in one go (fewer small ops)
        for q in range(n):
            state = apply_1q(state, encode[..., q, :, :], q, n)
        for layer in range(self.layers):
            rotate = ry(self.theta[:, layer, :, 1]) @ rz(self.theta[:, layer, :, 0])  # (N, n, 2, 2): RZ, then RY
            for q in range(n):
                state = apply_1q(state, rotate[:, q], q, n)
            for q in range(n - 1):
                state = cnot(state, q, q + 1, n)
        return expval_z(state, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.expectations(x)
        logits = (z.unsqueeze(-2) * self.head_weight).sum(-1) + self.head_bias  # W_m z_m + b_m, (B, N, C)
        return logits.mean(1)
