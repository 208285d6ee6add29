"""Shared NTK maths for the kernel probes (``ntk``, ``ntk_distance``, ``kernel_accuracy``).

Notation (docs/findings.md, "The default setting, and what is measured"): logits f(x; w) ∈ R^C, w = every trainable parameter of
the model (``named_parameters`` with ``requires_grad``; buffers are passed through unchanged), or
only those matching the probe's ``params`` globs (``bind``; the others are held at the
checkpoint's values like buffers), per-input Jacobian J(x) = ∂f(x; w)/∂w ∈ R^{C×P}. For inputs
X = (x_1 … x_n):

- ``full``:       Θ[(i,a),(j,b)] = ⟨∂f_a(x_i)/∂w, ∂f_b(x_j)/∂w⟩, an nC×nC matrix whose row
                  (i, a) is at index i·C + a (input-major, logit-minor);
- ``trace``:      Θ^tr[i,j] = Σ_a Θ[(i,a),(j,a)], n×n;
- ``sum_logits``: Θ^sl[i,j] = ⟨∂Σ_a f_a(x_i)/∂w, ∂Σ_b f_b(x_j)/∂w⟩ = Σ_{a,b} Θ[(i,a),(j,b)], n×n.

Implementations of the same matrices (an enum; tests assert they agree):

- ``jacobian``: per-input Jacobians of a block of inputs by ``vmap(jacrev)`` (any model),
  written into one contiguous (b, C, P) array, then one matrix product per pair of blocks (a
  single GEMM over all parameters instead of one contraction per parameter tensor). Only blocks
  on or above the diagonal are computed; Jacobian blocks are cached up to ``cache_mb`` and
  recomputed beyond it, so memory is bounded by the cache plus two blocks whatever n is.
- ``structured``: the same contraction, with each block's Jacobian in closed form from every
  layer's input and output gradient (Linear, Conv1d, Conv2d; ``structured_jacobian``), about 2×
  faster than ``vmap(jacrev)`` on the MNIST-1D CNN. ``auto`` (the default) picks it when every
  parameter belongs to such a layer, else ``jacobian``. For the ``trace`` variant ``auto`` also
  skips the Jacobian of layers whose kernel is cheaper from their signals (``kernel_by_layer``:
  linear layers and late, small convolutions): their part of Θ^tr[i, j] is
  Σ_{t,t'} (G_i[t]·G_j[t']) (U_i[t]·U_j[t']), with G_i[t] the output gradients at position t over
  (logit, channel) and U_i[t] the input patch there (``trace_features``, ``trace_gram``).
- ``ntvp``: NTK-vector products, Θ e = J_I (J_Jᵀ e): a ``vjp`` through the column inputs followed
  by a ``jvp`` through the row inputs, vmapped over basis cotangents. Never holds a Jacobian of
  more than ``chunk`` cotangents; costs O(n²) network passes, so it is the cross-check, not the
  default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap

from lsdb.errors import ProbeError

from .base import select_params

VARIANTS = ("full", "trace", "sum_logits")
IMPLEMENTATIONS = ("auto", "structured", "jacobian", "ntvp")


# ----------------------------------------------------------------------------- binding a network

@dataclass(frozen=True)
class Network:
    """A model bound to one checkpoint: ``logits(params, x)`` with the differentiated ``params`` as
    an explicit argument (what torch.func differentiates) and ``buffers`` held fixed: the model's
    buffers, and its parameters outside the probe's scope."""

    model: torch.nn.Module
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]

    def logits(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, {**params, **self.buffers}, (x,))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.params, x)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params.values())


def bind(model: torch.nn.Module, state: dict[str, torch.Tensor], device, dtype, scope: tuple[str, ...] = (),
         probe: str = "ntk") -> Network:
    """Bind ``model`` to the tensors of one checkpoint, cast to ``device``/``dtype``, and put it in
    eval mode: every kernel is of the eval-mode network, BatchNorm normalising with the
    checkpoint's running statistics (in train mode a logit would depend on the whole batch, and the
    forward pass would overwrite the statistics in place). ``scope`` (globs, ``select_params``;
    () = all) picks the parameters differentiated; the other parameters join the fixed buffers."""
    model.eval()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n in names if n not in state]
    if missing:
        raise ProbeError(f"checkpoint state lacks parameters {missing[:5]} of model {type(model).__name__}")
    chosen = select_params(names, scope, probe)
    params = {n: state[n].detach().to(device=device, dtype=dtype) for n in chosen}
    buffers = {}
    for n in [*(n for n, _ in model.named_parameters() if n not in params), *(n for n, _ in model.named_buffers())]:
        if n in state:
            b = state[n].detach().to(device=device)
            buffers[n] = b.to(dtype) if b.is_floating_point() else b
    return Network(model, params, buffers)


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ProbeError(f"unknown NTK variant '{variant}'; valid variants: {', '.join(VARIANTS)}")


def check_implementation(implementation: str) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ProbeError(f"unknown NTK implementation '{implementation}'; valid: {', '.join(IMPLEMENTATIONS)}")


def probe_inputs(x_train: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The probe set ``x_train[indices]``; a ProbeError when it asks for more than the data holds."""
    n_data = x_train.shape[0]
    idx = indices.to(device=x_train.device, dtype=torch.long)
    if idx.numel() > n_data:
        raise ProbeError(f"probe set of {idx.numel()} inputs is larger than the training set ({n_data} examples)")
    if idx.numel() == 0:
        raise ProbeError("probe set is empty")
    if int(idx.min()) < 0 or int(idx.max()) >= n_data:
        raise ProbeError(f"probe set index {int(idx.max())} is out of range for a training set of {n_data} examples")
    return x_train[idx]


# ----------------------------------------------------------------------------------- Jacobians

def jacobian(net: Network, x: torch.Tensor, sum_logits: bool = False, structured: bool | None = None) -> torch.Tensor:
    """Per-input Jacobians of a block: (b, C, P), or (b, P) of ∂Σ_a f_a/∂w when ``sum_logits``.

    Parameters are concatenated in ``net.params`` order, each flattened row-major.
    ``structured`` (None = when the model allows it) uses the closed form of ``structured_jacobian``;
    otherwise ``vmap(jacrev)`` over the inputs.
    """
    if structured is None and supports_structured(net):
        try:
            return structured_jacobian(net, x, sum_logits)
        except _NoClosedForm:
            pass
    elif structured:
        return structured_jacobian(net, x, sum_logits)

    def one(params, xi):
        out = net.logits(params, xi.unsqueeze(0)).squeeze(0)
        return out.sum() if sum_logits else out

    per_param = vmap(grad(one) if sum_logits else jacrev(one), in_dims=(None, 0))(net.params, x)
    b = x.shape[0]
    lead = (b,) if sum_logits else (b, per_param[next(iter(per_param))].shape[1])
    return torch.cat([per_param[n].reshape(*lead, -1) for n in net.params], dim=-1)


_STRUCTURED = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)


class _NoClosedForm(ProbeError):
    """A layer applied twice in one forward, or a Linear on more than one axis: its Jacobian is
    not one outer product per input, so ``auto`` falls back to vmap(jacrev)."""


def _owner(net: Network, name: str):
    prefix, _, attr = name.rpartition(".")
    return net.model.get_submodule(prefix), attr


def supports_structured(net: Network) -> bool:
    """True when every trainable parameter is the weight or bias of a Linear, or of a zero-padded,
    ungrouped Conv1d/Conv2d with numeric padding: the layers ``structured_jacobian`` knows."""
    return all(_closed_form(*_owner(net, name)) for name in net.params)


def _closed_form(module, attr: str) -> bool:
    """Whether ``attr`` of ``module`` is a parameter ``structured_jacobian`` knows (see above)."""
    if not isinstance(module, _STRUCTURED) or attr not in ("weight", "bias"):
        return False
    return not isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d)) or (
        module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str))


def _signals(net: Network, x: torch.Tensor, sum_logits: bool):
    """One forward of the block recording every layer's input h, and one backward batched over the
    k = C logit cotangents (k = 1 for ``sum_logits``): per module id, (h, g) with g of shape
    (k, b, out_channels, positions), g[a, i] = ∂f_a(x_i)/∂(layer output)."""
    modules = {}
    for name in net.params:
        module, _ = _owner(net, name)
        modules.setdefault(id(module), module)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(module, inputs, output):
        if id(module) in seen:
            raise _NoClosedForm(f"structured NTK: layer {type(module).__name__} is called twice; "
                                f"use implementation='jacobian'")
        if isinstance(module, torch.nn.Linear) and inputs[0].dim() != 2:
            raise _NoClosedForm("structured NTK: a Linear layer applied to a sequence; use implementation='jacobian'")
        seen[id(module)] = (inputs[0].detach(), output)

    handles = [m.register_forward_hook(record) for m in modules.values()]
    try:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)  # records the graph; parameters stay plain tensors
            out = net.logits(net.params, xg)
            b, c = out.shape
            k = 1 if sum_logits else c
            outputs = [seen[id(m)][1] for m in modules.values()]
            # all k logit cotangents in one batched backward (is_grads_batched vmaps the engine)
            cot = torch.ones(1, b, c, dtype=out.dtype, device=out.device) if sum_logits else \
                torch.eye(c, dtype=out.dtype, device=out.device)[:, None, :].expand(c, b, c)
            grads = torch.autograd.grad(out, outputs, cot, is_grads_batched=True)
    finally:
        for h in handles:
            h.remove()
    return {mid: (seen[mid][0], g.reshape(k, b, g.shape[2], -1)) for mid, g in zip(modules, grads)}


def structured_jacobian(net: Network, x: torch.Tensor, sum_logits: bool = False) -> torch.Tensor:
    """Per-input Jacobians from each layer's input and output gradient (no per-input vmap).

    For a layer y = W ⊛ h + β, ∂f_a(x_i)/∂W = Σ_t g_{ia}[:, t] ⊗ U(h_i)[:, t] and ∂f_a(x_i)/∂β =
    Σ_t g_{ia}[:, t], with g_{ia} = ∂f_a(x_i)/∂y_i and U the im2col unfolding of the layer input
    (identity for Linear, one position t). One forward of the block records every h_i; one
    backward, batched over the C logit cotangents, gives every g_{ia} (inputs do not interact
    without BatchNorm, so the batch backward is per-input). Same layout as ``jacobian``.
    """
    signals = _signals(net, x, sum_logits)
    g0 = next(iter(signals.values()))[1]
    k, b = g0.shape[:2]
    p_total = sum(p.numel() for p in net.params.values())
    jac = torch.empty(b, k, p_total, dtype=g0.dtype, device=g0.device)
    offset = 0
    for name, p in net.params.items():
        module, attr = _owner(net, name)
        h, g = signals[id(module)]
        block = g.sum(-1) if attr == "bias" else torch.einsum("kbot,bit->kboi", g, _unfold(module, h))
        jac[:, :, offset : offset + p.numel()] = block.reshape(k, b, -1).transpose(0, 1)
        offset += p.numel()
    return jac[:, 0] if sum_logits else jac


# ------------------------------------------------------------------- per-layer trace kernels

def kernel_by_layer(module, classes: int, positions: int) -> bool:
    """Whether the trace kernel of ``module``'s weight is cheaper from its signals than from its
    Jacobian: per pair of inputs, T²·(C·out + in·kernel) multiply-adds against C·out·in·kernel
    (T = its output positions). True for linear layers and late, small convolutions."""
    fan_in = module.weight[0].numel()
    out = module.weight.shape[0]
    return positions * positions * (classes * out + fan_in) < classes * out * fan_in


def trace_layout(model: torch.nn.Module, names: list[str], input_shape, classes: int) -> tuple[int, int]:
    """How the ``auto`` trace NTK of ``model`` (differentiating ``names``) holds a block, per input:
    (parameters kept in Jacobian form, floats of per-layer signals G and U), from one forward pass on
    a zero input for the layers' output positions (a model on the meta device works). All
    parameters in Jacobian form when the model is not structured or no layer takes its kernel
    from signals. For ``lsdb.plan.ntk_memory``."""
    params = dict(model.named_parameters())
    total = sum(params[n].numel() for n in names)
    owners: dict[int, tuple[torch.nn.Module, list[str]]] = {}
    for name in names:
        prefix, _, attr = name.rpartition(".")
        module = model.get_submodule(prefix)
        if not _closed_form(module, attr):
            return total, 0
        owners.setdefault(id(module), (module, []))[1].append(attr)
    positions: dict[int, int] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o: positions.__setitem__(id(mod), o[0, 0].numel()))
             for m, _ in owners.values()]
    try:
        with torch.no_grad():
            p0 = next(iter(params.values()))
            model(torch.zeros(1, *input_shape, device=p0.device, dtype=p0.dtype))
    finally:
        for h in hooks:
            h.remove()
    jac, signals = 0, 0
    for mid, (module, attrs) in owners.items():
        t = positions[mid]
        if kernel_by_layer(module, classes, t):
            out = module.weight.shape[0]
            signals += t * (classes * out + (module.weight[0].numel() if "weight" in attrs else 0))
        else:
            jac += sum(getattr(module, a).numel() for a in attrs)
    return (jac, signals) if signals else (total, 0)


@dataclass
class TraceFeatures:
    """What the trace NTK of a block of inputs needs: the Jacobian of the parameters kept in
    Jacobian form (b, C, P_J), and for each layer whose kernel is taken from its signals, its
    output gradients G (b, T, C·out) and input patches U (b, T, in·kernel) (None without a
    differentiated weight) and whether its bias is differentiated."""

    jac: torch.Tensor | None
    layers: list[tuple[torch.Tensor, torch.Tensor | None, bool]]


def trace_features(net: Network, x: torch.Tensor) -> TraceFeatures:
    """``TraceFeatures`` of a block (structured models; see ``trace_gram``)."""
    signals = _signals(net, x, False)
    by_layer: dict[int, tuple[torch.nn.Module, list[str]]] = {}
    jac_parts = []
    for name in net.params:
        module, attr = _owner(net, name)
        h, g = signals[id(module)]
        k, b, out, positions = g.shape
        if kernel_by_layer(module, k, positions):
            by_layer.setdefault(id(module), (module, []))[1].append(attr)
        else:
            block = g.sum(-1) if attr == "bias" else torch.einsum("kbot,bit->kboi", g, _unfold(module, h))
            jac_parts.append(block.reshape(k, b, -1).transpose(0, 1))
    layers = []
    for mid, (module, attrs) in by_layer.items():
        h, g = signals[mid]
        k, b, out, positions = g.shape
        grads = g.permute(1, 3, 0, 2).reshape(b, positions, k * out)  # G[i, t] over (logit, channel)
        patches = _unfold(module, h).transpose(1, 2) if "weight" in attrs else None  # (b, T, in·kernel)
        layers.append((grads, patches, "bias" in attrs))
    jac = torch.cat(jac_parts, dim=-1) if jac_parts else None
    return TraceFeatures(jac, layers)


def trace_gram(fa: TraceFeatures, fb: TraceFeatures) -> torch.Tensor:
    """Θ^tr between two blocks: the Gram of the Jacobian parts, plus per layer
    Σ_{t,t'} (G_i[t]·G_j[t']) (U_i[t]·U_j[t']) for its weight (⟨∂f_a(x_i)/∂W, ∂f_a(x_j)/∂W⟩ summed
    over logits a, with ∂f_a/∂W = Σ_t g_a[:, t] ⊗ U[:, t]) and (Σ_t G_i[t])·(Σ_t' G_j[t']) for its
    bias."""
    out = None if fa.jac is None else _gram(fa.jac, fb.jac, "trace")
    for (ga, ua, bias), (gb, ub, _) in zip(fa.layers, fb.layers):
        na, t = ga.shape[:2]
        nb = gb.shape[0]
        k = None
        if ua is not None:
            a = ga.reshape(na * t, -1) @ gb.reshape(nb * t, -1).T
            a *= ua.reshape(na * t, -1) @ ub.reshape(nb * t, -1).T
            k = a.reshape(na, t, nb, t).sum(dim=(1, 3))
        if bias:
            kb = ga.sum(1) @ gb.sum(1).T
            k = kb if k is None else k + kb
        out = k if out is None else out + k
    return out


def _unfold(module, h: torch.Tensor) -> torch.Tensor:
    """im2col of a layer input: (b, in · kernel, positions), matching the weight's row-major layout."""
    if isinstance(module, torch.nn.Linear):
        return h.reshape(h.shape[0], -1, 1) if h.dim() == 2 else h.reshape(-1, h.shape[-1], 1)
    if isinstance(module, torch.nn.Conv1d) and module.dilation[0] == 1:
        (k,), (pad,), (stride,) = module.kernel_size, module.padding, module.stride
        windows = torch.nn.functional.pad(h, (pad, pad)).unfold(-1, k, stride)  # (b, in, positions, k), a view
        return windows.transpose(2, 3).reshape(h.shape[0], -1, windows.shape[2])
    if isinstance(module, torch.nn.Conv1d):
        return torch.nn.functional.unfold(h.unsqueeze(2), (1, module.kernel_size[0]), dilation=(1, module.dilation[0]),
                                          padding=(0, module.padding[0]), stride=(1, module.stride[0]))
    return torch.nn.functional.unfold(h, module.kernel_size, dilation=module.dilation, padding=module.padding,
                                      stride=module.stride)


def _gram(ja: torch.Tensor, jb: torch.Tensor, variant: str) -> torch.Tensor:
    """The kernel block between two Jacobian blocks (as returned by ``jacobian``)."""
    if variant == "full":
        return ja.reshape(-1, ja.shape[-1]) @ jb.reshape(-1, jb.shape[-1]).T
    if variant == "trace":  # Σ_a ⟨J_a(x_i), J_a(x_j)⟩ is one dot product over (logit, parameter)
        return ja.reshape(ja.shape[0], -1) @ jb.reshape(jb.shape[0], -1).T
    return ja @ jb.T  # sum_logits: rows are already ∂Σf/∂w


def _blocks(n: int, chunk: int) -> list[slice]:
    chunk = max(1, int(chunk))
    return [slice(s, min(s + chunk, n)) for s in range(0, n, chunk)]


class _JacobianCache:
    """Jacobian blocks kept while they fit in ``budget`` bytes, recomputed otherwise."""

    def __init__(self, compute: Callable[[int], torch.Tensor], budget: float):
        self.compute, self.budget, self.held, self.used = compute, budget, {}, 0

    def get(self, k: int) -> torch.Tensor:
        if k in self.held:
            return self.held[k]
        j = self.compute(k)
        size = _nbytes(j)
        if self.used + size <= self.budget:
            self.held[k], self.used = j, self.used + size
        return j

    def drop_before(self, k: int) -> None:
        for key in [key for key in self.held if key < k]:
            self.used -= _nbytes(self.held.pop(key))


def _nbytes(block) -> int:
    """Bytes of a Jacobian block or of a block's ``TraceFeatures``."""
    if isinstance(block, torch.Tensor):
        return block.numel() * block.element_size()
    tensors = [block.jac] + [t for layer in block.layers for t in layer[:2]]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# --------------------------------------------------------------------------------------- kernels

def jacobian_rows(net: Network, x: torch.Tensor, chunk: int = 128, sum_logits: bool = False) -> torch.Tensor:
    """Every input's Jacobian (n, C, P), computed in blocks of ``chunk`` inputs as ``ntk``,
    ``cross_ntk`` and ``trace_ntk_diagonal`` compute theirs, so passing it to them (``jac``,
    ``j_rows``, ``j_cols``) gives the same numbers as letting each compute its own."""
    return torch.cat([jacobian(net, x[b], sum_logits) for b in _blocks(x.shape[0], chunk)])


def ntk(net: Network, x: torch.Tensor, variant: str = "trace", implementation: str = "auto",
        chunk: int = 128, cache_mb: float = 1024.0, jac: torch.Tensor | None = None) -> torch.Tensor:
    """The empirical NTK of ``net`` on inputs ``x`` (see the module docstring for the variants),
    in the dtype and on the device of ``net``'s parameters. Exactly symmetric. ``jac``: the
    inputs' Jacobians from ``jacobian_rows`` with the same ``chunk``, when the caller has them."""
    check_variant(variant)
    check_implementation(implementation)
    if implementation == "structured" and not supports_structured(net):
        raise ProbeError(f"implementation 'structured' supports only Linear/Conv1d/Conv2d parameters; "
                         f"{type(net.model).__name__} has others (use 'jacobian')")
    with torch.no_grad():
        c = net(x[:1]).shape[-1]
    n = x.shape[0]
    per = c if variant == "full" else 1
    p0 = next(iter(net.params.values()))
    out = torch.empty(n * per, n * per, device=p0.device, dtype=p0.dtype)
    blocks = _blocks(n, chunk)

    if jac is not None:
        cache = _JacobianCache(lambda k: jac[blocks[k]], float("inf"))
        block_fn = lambda bi, bj: _gram(cache.get(bi), cache.get(bj), variant)  # noqa: E731
    elif by_layers(net, x, variant, implementation):
        cache = _JacobianCache(lambda k: trace_features(net, x[blocks[k]]), cache_mb * 2**20)
        block_fn = lambda bi, bj: trace_gram(cache.get(bi), cache.get(bj))  # noqa: E731
    elif implementation != "ntvp":
        use = {"auto": None, "structured": True, "jacobian": False}[implementation]
        cache = _JacobianCache(lambda k: jacobian(net, x[blocks[k]], variant == "sum_logits", use), cache_mb * 2**20)
        block_fn = lambda bi, bj: _gram(cache.get(bi), cache.get(bj), variant)  # noqa: E731
    else:
        cache = None
        block_fn = lambda bi, bj: _ntvp_block(net, x[blocks[bi]], x[blocks[bj]], variant, chunk)  # noqa: E731

    for bi, rows in enumerate(blocks):
        if cache is not None:
            cache.drop_before(bi)
        r = slice(rows.start * per, rows.stop * per)
        for bj in range(bi, len(blocks)):
            cols = blocks[bj]
            s = slice(cols.start * per, cols.stop * per)
            block = block_fn(bi, bj)
            if bi == bj:  # GEMM rounding differs between (i,j) and (j,i); store one of them
                block = 0.5 * (block + block.T)
            out[r, s] = block
            if bi != bj:
                out[s, r] = block.T
    return out


def by_layers(net: Network, x: torch.Tensor, variant: str, implementation: str = "auto") -> bool:
    """Whether ``ntk`` takes the trace kernel from per-layer signals (``trace_features``): the
    ``auto`` implementation of the ``trace`` variant on a structured model, when some layer's kernel
    is cheaper that way (``kernel_by_layer``); else the Jacobian contraction."""
    if variant != "trace" or implementation != "auto" or not supports_structured(net):
        return False
    try:
        features = trace_features(net, x[:1])
    except _NoClosedForm:
        return False
    return bool(features.layers)


def cross_ntk(net: Network, x_rows: torch.Tensor, x_cols: torch.Tensor, variant: str = "trace",
              chunk: int = 128, j_rows: torch.Tensor | None = None,
              j_cols: torch.Tensor | None = None) -> torch.Tensor:
    """Θ(x_rows, x_cols): the rectangular kernel between two input sets (jacobian contraction),
    (m·per)×(n·per) with per = C for ``full`` and 1 otherwise. The column Jacobian is held whole;
    the rows are streamed in blocks of ``chunk``. ``j_rows``/``j_cols``: those inputs' Jacobians
    from ``jacobian_rows`` with the same ``chunk``, when the caller has them."""
    check_variant(variant)
    sl = variant == "sum_logits"
    if j_cols is None:
        j_cols = jacobian_rows(net, x_cols, chunk, sl)
    return torch.cat([_gram(jacobian(net, x_rows[b], sl) if j_rows is None else j_rows[b], j_cols, variant)
                      for b in _blocks(x_rows.shape[0], chunk)])


def trace_ntk_diagonal(net: Network, x: torch.Tensor, chunk: int = 128,
                       jac: torch.Tensor | None = None) -> torch.Tensor:
    """diag Θ^tr: Θ^tr[i,i] = ‖J(x_i)‖²_F = Σ_a ‖∂f_a(x_i)/∂w‖², without the off-diagonal.
    ``jac``: the inputs' Jacobians from ``jacobian_rows``, when the caller has them."""
    return torch.cat([(jacobian(net, x[b]) if jac is None else jac[b]).pow(2).sum(dim=(1, 2))
                      for b in _blocks(x.shape[0], chunk)])


def _ntvp_block(net: Network, x_rows: torch.Tensor, x_cols: torch.Tensor, variant: str,
                chunk: int) -> torch.Tensor:
    """One kernel block by NTK-vector products: column e of Θ is J_rows (J_colsᵀ e)."""
    m, b = x_rows.shape[0], x_cols.shape[0]
    _, pull = vjp(lambda p: net.logits(p, x_cols), net.params)
    c = net.logits(net.params, x_cols[:1]).shape[-1]
    p0 = next(iter(net.params.values()))
    if variant == "sum_logits":  # cotangent 1_C on input j: J_colsᵀ e = ∇_w Σ_a f_a(x_j)
        basis = torch.eye(b, device=p0.device, dtype=p0.dtype)[:, :, None].expand(b, b, c)
    else:
        basis = torch.eye(b * c, device=p0.device, dtype=p0.dtype).reshape(b * c, b, c)

    def column(cotangent):
        (tangent,) = pull(cotangent)
        return jvp(lambda p: net.logits(p, x_rows), (net.params,), (tangent,))[1]  # (m, C)

    step = max(1, int(chunk))
    cols = torch.cat([vmap(column)(basis[s : s + step]) for s in range(0, basis.shape[0], step)])
    if variant == "sum_logits":
        return cols.sum(-1).T  # (m, b)
    cols = cols.reshape(b, c, m, c)  # [j, b, i, a] = Θ[(i,a),(j,b)]
    if variant == "full":
        return cols.permute(2, 3, 0, 1).reshape(m * c, b * c)
    return torch.einsum("jaia->ij", cols)


# ------------------------------------------------------------------------------ kernel summaries

def one_hot_targets(labels: torch.Tensor, num_classes: int, variant: str, dtype=torch.float64) -> torch.Tensor:
    """Target kernel T for kernel–target alignment, from one-hot labels Y (n×C).

    ``trace``/``sum_logits``: T = Y Yᵀ (n×n, 1 where two inputs share a class);
    ``full``: T = vec(Y) vec(Y)ᵀ (nC×nC, index i·C + a), so that Σ_a T[(i,a),(j,a)] = (Y Yᵀ)[i,j].
    """
    y = torch.nn.functional.one_hot(labels.long(), num_classes).to(dtype)
    if variant == "full":
        v = y.reshape(-1, 1)
        return v @ v.T
    return y @ y.T


def alignment(k: torch.Tensor, t: torch.Tensor, centred: bool = False) -> float:
    """A(K, T) = ⟨K, T⟩_F / (‖K‖_F ‖T‖_F) (Cristianini et al. 2002). Centred (Cortes et al. 2012):
    the same with K → HKH, T → HTH, H = I − 11ᵀ/m over the matrix's m rows."""
    k, t = k.double(), t.double()
    if centred:
        k, t = _centre(k), _centre(t)
    denom = torch.linalg.matrix_norm(k) * torch.linalg.matrix_norm(t)
    return float((k * t).sum() / denom) if denom > 0 else float("nan")


def _centre(k: torch.Tensor) -> torch.Tensor:
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def top_eigenvalues(k: torch.Tensor, count: int = 3, dense_limit: int = 1536) -> list[float]:
    """The ``count`` largest eigenvalues of symmetric K, descending. Dense ``eigvalsh`` up to
    ``dense_limit`` rows; Lanczos (ARPACK ``eigsh``) above, where a dense solve costs seconds."""
    size = k.shape[0]
    count = min(count, size)
    if size <= dense_limit:
        ev = torch.linalg.eigvalsh(k.double()).flip(0)[:count]
        return [float(v) for v in ev]
    from scipy.sparse.linalg import eigsh

    ev = eigsh(k.double().cpu().numpy(), k=count, which="LA", return_eigenvectors=False)
    return sorted((float(v) for v in ev), reverse=True)


def effective_rank(k: torch.Tensor) -> float:
    """Participation ratio (Σλ)² / Σλ² = tr(K)² / ‖K‖²_F for symmetric K: 1 for rank one, m for a
    multiple of the identity."""
    fro2 = float(k.double().pow(2).sum())
    return float(torch.trace(k.double())) ** 2 / fro2 if fro2 > 0 else float("nan")


def summarise(k: torch.Tensor, labels: torch.Tensor, num_classes: int, variant: str) -> dict[str, float]:
    """Scalars of one kernel: Frobenius norm, trace, mean diagonal, top-3 eigenvalues, effective
    rank, kernel–target alignment plain and centred."""
    kd = k.double()
    t = one_hot_targets(labels, num_classes, variant).to(kd.device)
    top = top_eigenvalues(kd, 3) + [float("nan")] * 3
    return {
        "frobenius_norm": float(torch.linalg.matrix_norm(kd)),
        "trace": float(torch.trace(kd)),
        "mean_diagonal": float(torch.diagonal(kd).mean()),
        "top1": top[0], "top2": top[1], "top3": top[2],
        "effective_rank": effective_rank(kd),
        "alignment": alignment(kd, t),
        "centered_alignment": alignment(kd, t, centred=True),
    }


def kernel_distance(k1, k2) -> tuple[float, float]:
    """S(K, K') = 1 − ⟨K, K'⟩_F / (‖K‖_F ‖K'‖_F) and the angle θ = arccos(1 − S) between them.

    Computed as S = ½‖K̂ − K̂'‖²_F and θ = 2·arcsin(‖K̂ − K̂'‖_F / 2) with K̂ = K/‖K‖_F: the same
    numbers, without the cancellation of 1 − cos for nearly equal kernels. Inputs are numpy arrays
    or tensors; the sums run in float64.
    """
    import numpy as np

    a, b = np.asarray(k1, dtype=np.float64), np.asarray(k2, dtype=np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        raise ProbeError("kernel distance is undefined for a zero kernel")
    d = float(np.linalg.norm(a / na - b / nb))
    return 0.5 * d * d, 2.0 * float(np.arcsin(min(1.0, d / 2.0)))
