"""A faster CPU forward pass for the geometry probes' point-by-point evaluation.

The barrier, slice and flatness probes evaluate the same small network at many parameter points.
On the CPU a plain forward pass spends most of its time outside the arithmetic: every convolution
converts its input to oneDNN's blocked layout and its output back, and every ReLU writes another
full-size activation. This evaluator keeps activations in oneDNN's blocked layout from the first
convolution to the flatten (``Tensor.to_mkldnn``) and runs each convolution with its ReLU as one
fused oneDNN call (``torch.ops.mkldnn._convolution_pointwise``, the kernel TorchInductor emits for
conv + ReLU on the CPU). The arithmetic is the same oneDNN convolution, so results agree with the
plain forward pass to float32 rounding (bit for bit in our tests).

It applies to models whose layers ``lsdb.train.models.plain_layers`` lists (convolutions with zero
padding, ReLU, flatten, linear layers), on the CPU in float32 with oneDNN available, and that pass
a self-check against ``functional_call``. ``fused_forward`` returns None otherwise, and callers
fall back to ``torch.func.functional_call``. ``benchmarks/barrier.py`` measures the gain.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lsdb.train.models import plain_layers

Forward = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


def fused_forward(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> Forward | None:
    """``forward(params, x) -> logits`` with fused oneDNN kernels, or None where it does not apply.

    ``params`` (a full state, e.g. the first point to evaluate) and ``x`` (inputs of the right
    shape) serve a self-check: the fused pass on two examples must run and match
    ``functional_call`` to float32 rounding, so a torch build whose oneDNN lacks a kernel falls
    back instead of failing the job."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or not _onednn_available():
        return None
    steps = plain_layers(model)
    if steps is None:
        return None
    plan = _plan(steps)

    def forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        h = model.prepare(x)
        for op in plan:
            h = op(params, h)
        return h.to_dense() if h.is_mkldnn else h

    try:
        with torch.no_grad():
            got, want = forward(params, x[:2]), functional_call(model, params, (x[:2],))
    except RuntimeError:
        return None
    return forward if torch.allclose(got, want, rtol=1e-4, atol=1e-5) else None


def _onednn_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    except (AttributeError, RuntimeError):
        return False


def _plan(steps: list[tuple[str, nn.Module]]) -> list:
    """One callable per layer of ``plain_layers``, a ReLU folded into the layer before it."""
    plan, i = [], 0
    while i < len(steps):
        name, m = steps[i]
        relu_next = i + 1 < len(steps) and type(steps[i + 1][1]) is nn.ReLU
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            plan.append(_conv(name, m, "relu" if relu_next else "none"))
            i += 2 if relu_next else 1
        elif isinstance(m, nn.Linear):
            plan.append(_linear(name, m, relu_next))
            i += 2 if relu_next else 1
        elif isinstance(m, nn.ReLU):
            plan.append(lambda p, h: torch.relu(h.to_dense() if h.is_mkldnn else h))
            i += 1
        else:  # nn.Flatten
            plan.append(lambda p, h, m=m: (h.to_dense() if h.is_mkldnn else h).flatten(m.start_dim, m.end_dim))
            i += 1
    return plan


def _conv(name: str, m: nn.Module, attr: str):
    padding, stride, dilation, groups = list(m.padding), list(m.stride), list(m.dilation), m.groups
    weight, bias = f"{name}.weight", f"{name}.bias" if m.bias is not None else None

    def conv(params, h):
        if not h.is_mkldnn:
            h = h.contiguous().to_mkldnn()
        b = params[bias] if bias else None
        return torch.ops.mkldnn._convolution_pointwise(h, params[weight], b, padding, stride, dilation, groups,
                                                       attr, [None], "")

    return conv


def _linear(name: str, m: nn.Linear, relu: bool):
    weight, bias = f"{name}.weight", f"{name}.bias" if m.bias is not None else None

    def linear(params, h):
        h = F.linear(h.to_dense() if h.is_mkldnn else h, params[weight], params[bias] if bias else None)
        return h.relu_() if relu else h

    return linear
