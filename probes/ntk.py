"""``ntk`` — the empirical neural tangent kernel of a checkpoint on the experiment's probe set.

For the fixed probe set X = x_train[probe_indices] (n inputs drawn once per experiment) and the
checkpoint's weights w_t, computes (Fort et al. 2020; docs/findings.md, "The default setting, and what is measured"):

- ``full``:       Θ[(i,a),(j,b)] = ⟨∂f_a(x_i)/∂w, ∂f_b(x_j)/∂w⟩, nC×nC, row index i·C + a;
- ``trace``:      Θ^tr[i,j] = Σ_a Θ[(i,a),(j,a)], n×n (the default);
- ``sum_logits``: Θ^sl[i,j] = ⟨∂Σ_a f_a(x_i)/∂w, ∂Σ_b f_b(x_j)/∂w⟩, n×n;

with w every trainable parameter of the model, or with ``params`` (fnmatch globs on the names of
``model.named_parameters()``, e.g. ["layer3.*"]) only the matching ones, the others held at the
checkpoint's values: Θ is then the kernel of that block's Jacobian, and the Θ of the whole network
is the sum of the Θ of disjoint blocks covering it. A glob matching no parameter fails the job,
naming it. The kernel goes to ``artifacts/`` by content hash
(``dtype``, float32 by default); the row holds scalars computed from the kernel in the worker's
dtype before that cast:

- ``frobenius_norm`` ‖Θ‖_F, ``trace`` tr Θ, ``mean_diagonal`` tr Θ / rows;
- ``top1..top3``: the largest eigenvalues;
- ``effective_rank``: the participation ratio (Σλ)² / Σλ² = tr(Θ)² / ‖Θ‖²_F (1 … rows);
- ``alignment``: kernel–target alignment ⟨Θ, T⟩_F / (‖Θ‖_F ‖T‖_F) with T = Y Yᵀ for the n×n
  variants and T = vec(Y) vec(Y)ᵀ for ``full`` (Y the probe set's one-hot labels, n×C);
  ``centered_alignment`` the same after centring both, K → HKH with H = I − 11ᵀ/rows.

Implementations (Jacobian contraction with ``structured`` closed-form or ``jacobian``
vmap(jacrev) Jacobians, ``ntvp`` NTK-vector products; ``auto`` picks ``structured`` when the model
allows) agree to rounding; see ``lsdb.probes._ntk_core``.

BatchNorm (``BATCHNORM`` = "running", the ``batchnorm`` column of ``probe_job``): f is the network
in eval mode, BatchNorm normalising with the checkpoint's running statistics, so f(x_i) depends on
x_i alone and Θ is a kernel between single inputs; BatchNorm's scale and shift are among the
parameters w, its statistics are not. (In train mode each logit would depend on the whole batch.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lsdb.errors import ProbeError, ProbeSkipped
from lsdb.spec import between, one_of

from . import _ntk_core as core
from .base import ProbeContext, each_checkpoint, scope_field

VERSION = 1
TABLES = ("ntk",)
BATCHNORM = "running"
DTYPES = {"float32": torch.float32, "float64": torch.float64}


MAX_CHUNK = 1_000_000  # inputs per Jacobian block
MAX_CACHE_MB = 1_048_576.0  # 1 TiB


@dataclass(frozen=True)
class Params:
    variant: str = field(default="trace", metadata=one_of(*core.VARIANTS))  # full | trace | sum_logits
    dtype: str = field(default="float32", metadata=one_of(*DTYPES))  # of the stored artifact
    # auto | structured | jacobian | ntvp
    implementation: str = field(default="auto", metadata=one_of(*core.IMPLEMENTATIONS))
    chunk: int = field(default=128, metadata=between(1, MAX_CHUNK))  # inputs per Jacobian block
    # Jacobian blocks kept in memory; beyond it they are recomputed
    cache_mb: float = field(default=1024.0, metadata=between(0.0, MAX_CACHE_MB))
    params: tuple[str, ...] = scope_field()  # globs on parameter names; () = all (module docstring)


def plan(study, params: Params):
    return each_checkpoint(study)


def validate(params: Params) -> None:
    core.check_variant(params.variant)
    core.check_implementation(params.implementation)
    if params.dtype not in DTYPES:
        raise ProbeError(f"ntk.dtype '{params.dtype}' is not one of {', '.join(DTYPES)}")
    if params.chunk < 1:
        raise ProbeError(f"ntk.chunk must be a positive integer, got {params.chunk}")


def probe_kernel(ctx: ProbeContext, params: Params, state_index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(Θ, probe labels) of checkpoint ``state_index`` of ``ctx`` in ``ctx.dtype``.

    Raises ProbeSkipped when the checkpoint's loss on the probe set is not finite.
    """
    validate(params)
    x = core.probe_inputs(ctx.data.x_train, ctx.probe_indices)
    labels = ctx.data.y_train[ctx.probe_indices.to(ctx.data.y_train.device).long()]
    net = core.bind(ctx.model, ctx.states[state_index], ctx.device, ctx.dtype, params.params, "ntk")
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(net(x), labels)
    if not math.isfinite(float(loss)):
        raise ProbeSkipped("non-finite loss")
    k = core.ntk(net, x, params.variant, params.implementation, params.chunk, params.cache_mb)
    if not bool(torch.isfinite(k).all()):
        raise ProbeSkipped("non-finite kernel")
    return k, labels


def compute(ctx: ProbeContext, params: Params) -> dict[str, list[dict]]:
    k, labels = probe_kernel(ctx, params)
    sha = ctx.artifacts.put(k.detach().to(DTYPES[params.dtype]).cpu().numpy())
    row = {
        "variant": params.variant,
        "n": int(labels.shape[0]),
        "rows": int(k.shape[0]),
        "dtype": params.dtype,
        "artifact": sha,
        **core.summarise(k, labels, ctx.data.num_classes, params.variant),
    }
    return {"ntk": [row]}
