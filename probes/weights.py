"""``weights``: parameter norms and distances in weight space.

Role ``self``: norm ‖w‖₂ over all trainable parameters. Roles ``init`` (to the run's step-0
checkpoint), ``parent`` (a child to the parent checkpoint it was spawned from) and ``siblings``
(final checkpoints of two children spawned together, anchored at the spawn time):
distance ‖w − w'‖₂ and relative distance ‖w − w'‖₂ / ‖w'‖₂ (for siblings: / ‖w₁‖₂ of the first).

BatchNorm (``BATCHNORM`` = "unused", the ``batchnorm`` column of ``probe_job``): no forward pass;
BatchNorm's scale and shift count among the parameters w, its running statistics (buffers) do not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lsdb.probes.base import each_checkpoint, sibling_final_pairs, to_init_pairs, to_parent_pairs

VERSION = 1
TABLES = ("weights",)
BATCHNORM = "unused"


@dataclass(frozen=True)
class Params:
    pass


def plan(study, params: Params):
    return each_checkpoint(study) + to_init_pairs(study) + to_parent_pairs(study) + sibling_final_pairs(study)


def flat_params(model, state) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    return torch.cat([state[n].reshape(-1).double() for n in names])


def compute(ctx, params: Params) -> dict[str, list[dict]]:
    w = flat_params(ctx.model, ctx.states[0])
    row = {"norm": w.norm().item(), "distance": None, "relative_distance": None}
    if len(ctx.states) > 1:
        other = flat_params(ctx.model, ctx.states[1])
        dist = (w - other).norm().item()
        ref = w.norm().item() if ctx.role == "siblings" else other.norm().item()
        row.update(distance=dist, relative_distance=dist / ref if ref > 0 else None)
    return {"weights": [row]}
