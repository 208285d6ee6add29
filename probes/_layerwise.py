"""Hand-written layer-wise passes of plain-layer models (convolutions, linear layers, ReLU,
flatten: ``plain_layers``): the linearised model's tangent and its gradient (``CachedLinearisation``,
for ``kernel_accuracy``) and products with the loss Hessian (``LayerHessian``, for ``hessian``).

Everything at the checkpoint w_t is computed once and cached: each layer's input h_l unfolded into
patches (im2col), each ReLU's mask, the logits (and for the Hessian the softmax and the loss
gradients at every layer's output). A pass is then matrix products on the cached patches, with
the backward pass written out (a convolution's input gradient is the patch gradient folded back,
col2im) and no autograd graph: the studies' small layers spend most of a conv call's time outside
the arithmetic (``benchmarks/kernel_accuracy.py``, ``benchmarks/hessian.py``).

Linearised model: f_lin(x_i; w_t + δ) = f(x_i; w_t) + J_t(x_i)δ is linear in δ, and its tangent
follows the layers: t_{l+1} = op_l(h_l; δW_l, δb_l) + op_l(t_l; W_l) at a convolution or linear
layer, m_l ⊙ t_l at a ReLU (m_l its mask at w_t), a reshape at a flatten.

Layout: activations are kept channels-last, (B, *positions, channels), so that a convolution is
one product of (B·positions, kernel·in) patches with a (kernel·in, out) weight. A flatten of a
channels-last activation orders features (position, channel); the linear layer after it reads its
weight's columns in that order (torch orders them (channel, position)).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from lsdb.train.models import plain_layers


class _Layer:
    """One convolution or linear layer: its fixed weight in patch layout and how to (un)fold."""

    def __init__(self, name: str, m: nn.Module, weight: torch.Tensor, columns: torch.Tensor | None):
        self.name, self.linear = name, isinstance(m, nn.Linear)
        if self.linear:
            # after a flatten, inputs come in internal feature order: ``columns`` is the torch
            # column of each (None: the same order)
            self.columns = columns
            self.fixed = self.to_patch(weight)
        else:
            self.d = 1 if isinstance(m, nn.Conv1d) else 2
            self.k, self.stride, self.pad, self.dil = m.kernel_size, m.stride, m.padding, m.dilation
            # weight (out, in, *k) -> patch layout (*k, in, out), flattened to (kernel·in, out)
            self.perm = (*range(2, 2 + self.d), 1, 0)
            self.inverse = tuple(self.perm.index(i) for i in range(2 + self.d))
            self.fixed = self.to_patch(weight)

    def to_patch(self, w: torch.Tensor) -> torch.Tensor:
        """A weight (or its δ) in torch layout -> (in, out) in patch layout."""
        if self.linear:
            return (w if self.columns is None else w[:, self.columns]).T
        return w.permute(self.perm).reshape(-1, w.shape[0])

    def from_patch(self, g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """A gradient (in, out) in patch layout -> torch layout ``shape``."""
        if self.linear:
            if self.columns is None:
                return g.T
            out = g.new_empty(shape)
            out[:, self.columns] = g.T
            return out
        return g.reshape(*(shape[i] for i in self.perm)).permute(self.inverse)

    def unpatch(self, gp: torch.Tensor, b: int) -> torch.Tensor:
        """Gradients of the layer's input patches (B·P, kernel·in) as gradients of its input: a
        reshape for a linear layer, folded back (col2im) for a convolution."""
        if self.linear:
            return gp.reshape(b, -1)
        return self.fold(gp.reshape(b, *self.out_shape, *self.k, -1), self.in_shape)

    def windows(self, h: torch.Tensor) -> torch.Tensor:
        """Channels-last h (B, *S, C) -> its patches (B, *S_out, *k, C), a view where it can be."""
        pad = []
        for p in reversed(self.pad):
            pad += [p, p]
        h = F.pad(h, [0, 0, *pad])
        for i in range(self.d):  # unfold appends each window dimension after the channels
            h = h.unfold(1 + i, self.dil[i] * (self.k[i] - 1) + 1, self.stride[i])
        if any(d != 1 for d in self.dil):
            h = h[(..., *(slice(None, None, d) for d in self.dil))]
        return h.permute(0, *range(1, 1 + self.d), *range(2 + self.d, 2 + 2 * self.d), 1 + self.d)

    def fold(self, g: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        """The adjoint of ``windows`` (col2im): patch gradients (B, *S_out, *k, C) summed back onto
        the input positions (B, *size, C)."""
        out = g.shape[1 : 1 + self.d]
        padded = [s + 2 * p for s, p in zip(size, self.pad)]
        acc = g.new_zeros(g.shape[0], *padded, g.shape[-1])
        for offs in itertools.product(*(range(k) for k in self.k)):
            where = tuple(slice(o * dl, o * dl + st * (n - 1) + 1, st)
                          for o, dl, st, n in zip(offs, self.dil, self.stride, out))
            acc[(slice(None), *where)] += g[(slice(None),) * (1 + self.d) + offs]
        return acc[(slice(None), *(slice(p, p + s) for p, s in zip(self.pad, size)))]


class CachedLinearisation:
    """f_lin(x_i; w_t + δ) for training inputs x_i, by index, from the layers' cached patches.

    ``__call__(delta, idx)`` gives the logits (differentiable, for checks); ``loss_grad(delta,
    idx, y, loss)`` the gradient of the mean loss over the batch with respect to δ, by the
    hand-written backward pass. δ may cover only some layers (a probe's ``params`` scope): a layer
    without one adds no δ term, and before the first such layer the tangent is zero.
    """

    def __init__(self, steps, params: dict[str, torch.Tensor], x: torch.Tensor, scope: set[str],
                 model: nn.Module, chunk: int = 1024):
        blocks = [primal(model, steps, params, x[s : s + chunk], scope) for s in range(0, x.shape[0], chunk)]
        self.plan = blocks[0][0]
        cached = [None if col[0] is None else torch.cat(col) for col in zip(*[b[1] for b in blocks])]
        f0 = torch.cat([b[2] for b in blocks])
        # one row per input holding everything cached for it, so that a step gathers its batch once
        self.slots: list[tuple[int, int, tuple[int, ...]] | None] = []
        parts, offset = [], 0
        for c in [*cached, f0]:
            if c is None:
                self.slots.append(None)
                continue
            width = c[0].numel()
            self.slots.append((offset, offset + width, tuple(c.shape[1:])))
            parts.append(c.reshape(c.shape[0], -1))
            offset += width
        self.table = torch.cat(parts, dim=1)
        self.bytes = self.table.numel() * self.table.element_size()
        self._programs: dict[frozenset, list] = {}

    def _part(self, rows: torch.Tensor, i: int) -> torch.Tensor:
        """Entry ``i`` (of the plan; the last is f0) of the gathered ``rows``, in its cached shape."""
        start, stop, shape = self.slots[i]
        return rows[:, start:stop].unflatten(1, shape)

    def _program(self, keys: frozenset) -> list[tuple]:
        program = self._programs.get(keys)
        if program is None:
            program = self._programs[keys] = _program(self.plan, keys)
        return program

    @classmethod
    def build(cls, model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
              budget_mb: float, buffers: dict[str, torch.Tensor] | None = None) -> "CachedLinearisation | None":
        """The cached linearisation, or None (the caller then takes the jvp) when the model does not
        list supported layers, its listed layers do not compute its forward pass on the first
        inputs (``buffers``: the rest of its state, parameters outside the scope included), or the
        cache would exceed ``budget_mb``."""
        steps = plain_model_steps(model)
        if steps is None or x.shape[0] == 0:
            return None
        scope = set(params)
        full = {**(buffers or {}), **params}
        probe = cls(steps, full, x[:2], scope, model)
        with torch.no_grad():
            plain = torch.func.functional_call(model, full, (x[:2],))
        f0 = probe._part(probe.table, len(probe.plan))
        if not torch.allclose(f0, plain, rtol=1e-5, atol=1e-6):  # a model whose steps() is not its forward
            return None
        if probe.bytes // 2 * x.shape[0] > budget_mb * 2**20:
            return None
        return cls(steps, full, x, scope, model)

    def _forward(self, delta: dict[str, torch.Tensor], idx: torch.Tensor):
        """f_lin on the batch ``idx`` and what the backward pass needs (``_tangent``)."""
        rows = self.table.index_select(0, idx)
        t, keep = _tangent(self._program(frozenset(delta)), lambda i: self._part(rows, i), delta, idx.shape[0])
        f0 = self._part(rows, len(self.plan))
        return (f0 if t is None else f0 + t), keep

    def __call__(self, delta: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
        return self._forward(delta, idx)[0]

    def loss_grad(self, delta: dict[str, torch.Tensor], idx: torch.Tensor, y: torch.Tensor,
                  loss: str = "ce") -> dict[str, torch.Tensor]:
        """∇_δ of the batch's mean loss (``ce``: cross-entropy on class indices; ``mse``: ½ mean
        ‖f − y‖²), by the backward pass written out; a key of ``delta`` per gradient."""
        logits, keep = self._forward(delta, idx)
        grads = _backward(self._program(frozenset(delta)), keep, _logit_grad(logits, y, loss), idx.shape[0],
                          {k: v.shape for k, v in delta.items()})
        return {k: grads[k] for k in delta}


class LayerHessian:
    """Products H v with the Hessian of L(w) = mean_i CE(f(x_i; w), y_i) over a fixed batch, for a
    plain-layer model, by the R-operator (Pearlmutter 1994) written out layer by layer.

    The primal pass and backward pass at w are done once: every layer's input patches, ReLU masks,
    softmax p and the loss gradients g_l with respect to each layer's output are cached (and the
    gradient ∇L comes out of it). A product then takes one tangent pass forward, R{h} (as the
    linearised model's), R{f} = t and R{∂L/∂f} = (diag p − p pᵀ) t / B, and one pass back:
    R{g_l} at each layer, H v for W_l = Σ R{g_l} ⊗ h_l + g_l ⊗ R{h_l} (and Σ R{g_l} for its
    bias), R{∂L/∂h_l} = W_lᵀ R{g_l} + V_lᵀ g_l, masked at each ReLU (its second derivative is zero
    almost everywhere). ``names``: the differentiated parameters, in the operator's order.
    """

    def __init__(self, model: nn.Module, steps, params: dict[str, torch.Tensor], names: list[str],
                 x: torch.Tensor, y: torch.Tensor):
        self.names, self.batch = names, x.shape[0]
        self.plan, self.cached, logits = primal(model, steps, params, x, set(names))
        self.program = _program(self.plan, frozenset(names))
        self.p = torch.softmax(logits, dim=1)
        # the primal backward, from what the primal pass cached (no tangent: no patches of one)
        keep = [self.cached[i] if kind == "relu" else None if kind == "flatten" else
                (None if self.cached[i] is None else self.cached[i].reshape(-1, layer.patch_width), None)
                for kind, layer, i, *_ in self.program]
        self.signal: list[torch.Tensor | None] = [None] * len(self.plan)  # ∂L/∂(layer output), (B·P, out)
        grads = _backward(self.program, keep, _logit_grad(logits, y), self.batch,
                          {n: params[n].shape for n in names}, self.signal)
        self.gradient = {n: grads[n] for n in names}

    def hvp(self, v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """H v, both dicts keyed by ``names``."""
        b = self.batch
        t, keep = _tangent(self.program, lambda i: self.cached[i], v, b)  # R{f} = J v
        p = self.p
        r = (p * t - p * (p * t).sum(1, keepdim=True)) / b  # R{∂L/∂f}: the softmax Hessian applied to R{f}
        out = {}
        for (kind, layer, i, w_key, b_key, has_input), saved in zip(reversed(self.program), reversed(keep)):
            if kind == "relu":
                r = r * saved
            elif kind == "flatten":
                r = r.reshape(b, *layer)
            else:
                (u, tp), r2, g2 = saved, r.reshape(-1, r.shape[-1]), self.signal[i]
                if w_key:
                    out[w_key] = layer.from_patch(u.T @ r2 if tp is None else u.T @ r2 + tp.T @ g2, v[w_key].shape)
                if b_key:
                    out[b_key] = r2.sum(0)
                if not has_input:
                    break
                rh = r2 @ layer.fixed.T
                if w_key:
                    rh = rh + g2 @ layer.to_patch(v[w_key]).T
                r = layer.unpatch(rh, b)
        return {n: out[n] for n in self.names}

    @classmethod
    def build(cls, model: nn.Module, params: dict[str, torch.Tensor], fixed: dict[str, torch.Tensor],
              x: torch.Tensor, y: torch.Tensor) -> "LayerHessian | None":
        """The layer-wise products, or None where they do not apply (the caller then takes autograd):
        a model without plain layers, or whose listed layers do not compute its forward pass."""
        steps = plain_model_steps(model)
        if steps is None or x.shape[0] == 0 or not params:
            return None
        full = {**fixed, **params}
        with torch.no_grad():
            plain = torch.func.functional_call(model, full, (x[:2],))
        _, _, logits = primal(model, steps, full, x[:2], set(params))
        if not torch.allclose(logits, plain, rtol=1e-5, atol=1e-6):
            return None
        return cls(model, steps, full, list(params), x, y)


def _program(plan: list, keys) -> list[tuple]:
    """The plan's steps from the first layer with a key in ``keys`` (its weight or bias
    differentiated) up, each (kind, layer, index in the plan, weight key or None, bias key or None,
    whether a tangent arrives from below), so that a pass does no name lookups."""
    program, live = [], False
    for i, (kind, layer) in enumerate(plan):
        if kind == "layer":
            w_key, b_key = f"{layer.name}.weight", f"{layer.name}.bias"
            w_key, b_key = (w_key if w_key in keys else None), (b_key if b_key in keys else None)
            if live or w_key or b_key:
                program.append((kind, layer, i, w_key, b_key, live))
                live = True
        elif live:
            program.append((kind, layer, i, None, None, True))
    return program


def _tangent(program: list, part, delta: dict[str, torch.Tensor], b: int):
    """The tangent J δ of a batch of ``b`` inputs through ``program`` (``part(i)``: what the primal
    pass cached for plan entry i, for the batch), and per step what a backward pass needs: a ReLU's
    mask; a layer's input patches u (where its weight is in δ) and the tangent's patches tp (where a
    tangent arrives); None at a flatten. None for t when the program is empty."""
    t, keep = None, []
    for kind, layer, i, w_key, b_key, has_input in program:
        saved = None
        if kind == "relu":
            saved = part(i)
            t = t * saved
        elif kind == "flatten":
            t = t.reshape(b, -1)
        else:
            z = tp = u = None
            if has_input:
                tp = (t if layer.linear else layer.windows(t)).reshape(-1, layer.patch_width)
                z = tp @ layer.fixed
            if w_key:
                u = part(i).reshape(-1, layer.patch_width)
                term = u @ layer.to_patch(delta[w_key])
                z = term if z is None else z + term
            if b_key:
                z = delta[b_key].expand(b * layer.positions, -1) if z is None else z + delta[b_key]
            saved = (u, tp)
            t = z.reshape(b, *layer.out_shape, -1)
        keep.append(saved)
    return t, keep


def _backward(program: list, keep: list, g: torch.Tensor, b: int, shapes: dict[str, torch.Size],
              signals: list | None = None) -> dict[str, torch.Tensor]:
    """The gradients of the keys of ``program`` from the gradient ``g`` at the logits, backward
    through the steps with what ``keep`` saved for each (a ``_tangent``'s, or the primal pass's);
    ``signals`` (by plan index), when given, records each layer's output gradient (B·P, out)."""
    grads: dict[str, torch.Tensor] = {}
    for (kind, layer, i, w_key, b_key, has_input), saved in zip(reversed(program), reversed(keep)):
        if kind == "relu":
            g = g * saved
        elif kind == "flatten":
            g = g.reshape(b, *layer)
        else:
            g2 = g.reshape(-1, g.shape[-1])
            if signals is not None:
                signals[i] = g2
            if w_key:
                grads[w_key] = layer.from_patch(saved[0].T @ g2, shapes[w_key])
            if b_key:
                grads[b_key] = g2.sum(0)
            if not has_input:
                break
            g = layer.unpatch(g2 @ layer.fixed.T, b)
    return grads


def _logit_grad(logits: torch.Tensor, y: torch.Tensor, loss: str = "ce") -> torch.Tensor:
    """∂/∂logits of the batch's mean loss: (softmax − one-hot)/B for ``ce`` (y class indices),
    (f − y)/B for ``mse`` (½ mean ‖f − y‖², y of the logits' shape)."""
    if loss == "ce":
        g = torch.softmax(logits, dim=1)
        g.scatter_add_(1, y.long().unsqueeze(1), g.new_full((logits.shape[0], 1), -1.0))
    else:
        g = logits - y.to(logits.dtype)
    return g / logits.shape[0]


def primal(model: nn.Module, steps, params: dict[str, torch.Tensor], x: torch.Tensor, scope: set[str]):
    """The primal pass of a plain-layer model on a block of inputs: its plan (one entry per step:
    ("relu", None), ("flatten", channels-last shape before it) or ("layer", _Layer)), what is cached
    per input (a layer's input patches where ``scope`` differentiates it, a ReLU's mask, None
    otherwise) and the logits f(x; w). It runs the model's own layer functions, so masks and
    logits are exactly the network's."""
    plan, cached, columns = [], [], None
    last = lambda a: a.movedim(1, -1) if a.dim() > 2 else a  # noqa: E731  channels-last
    with torch.no_grad():
        h = model.prepare(x)
        for name, m in steps:
            if isinstance(m, nn.ReLU):
                mask = last(h > 0).to(h.dtype)
                cached.append(mask if columns is None else mask[:, columns])  # a flatten came before
                h = torch.relu(h)
                plan.append(("relu", None))
            elif isinstance(m, nn.Flatten):
                shape = tuple(last(h).shape[1:])
                if h.dim() > 2:  # the torch column of each (position, channel) feature
                    c, positions = h.shape[1], h[0, 0].numel()
                    columns = torch.arange(c * positions, device=h.device).reshape(c, positions).T.reshape(-1)
                h = m(h)
                cached.append(None)
                plan.append(("flatten", shape))
            else:
                layer = _Layer(name, m, params[f"{name}.weight"], columns if isinstance(m, nn.Linear) else None)
                own = f"{name}.weight" in scope or f"{name}.bias" in scope
                patches = (h if columns is None else h[:, columns]) if layer.linear else layer.windows(last(h))
                columns = None
                layer.in_shape = tuple(last(h).shape[1:-1])  # positions in and out (() for a linear layer)
                layer.out_shape = tuple(patches.shape[1 : 1 + (0 if layer.linear else layer.d)])
                layer.patch_width = layer.fixed.shape[0]  # kernel·in (in for a linear layer)
                flat = patches.reshape(h.shape[0], -1, layer.patch_width)
                layer.positions = flat.shape[1]
                cached.append(flat if own else None)
                h = _apply(m, h, params[f"{name}.weight"], params.get(f"{name}.bias"))
                plan.append(("layer", layer))
    return plan, cached, h


def plain_model_steps(model: nn.Module):
    """``plain_layers(model)`` when every convolution is ungrouped (what the patches cover), else None."""
    steps = plain_layers(model)
    if steps is None or any(isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups != 1 for _, m in steps):
        return None
    return steps


def _apply(m: nn.Module, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Layer ``m`` (convolution or linear) applied to ``h`` with the given weight and bias."""
    if isinstance(m, nn.Linear):
        return F.linear(h, weight, bias)
    conv = F.conv1d if isinstance(m, nn.Conv1d) else F.conv2d
    return conv(h, weight, bias, m.stride, m.padding, m.dilation, m.groups)
