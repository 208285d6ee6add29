"""``ntk_distance`` — how far the NTK moves, from kernels the ``ntk`` probe stored.

Kernel distance (Fort et al. 2020; docs/findings.md, "The default setting, and what is measured"):

    S(K, K') = 1 − ⟨K, K'⟩_F / (‖K‖_F ‖K'‖_F),   θ(K, K') = arccos(1 − S)

S ∈ [0, 1] for PSD kernels, S(K, cK) = 0 for c > 0; θ is the angle between the kernels as
vectors. Nothing is recomputed: both kernels are read from ``artifacts/`` by the hashes the
planner passes in ``inputs`` (a missing or altered file raises ArtifactCorrupt), and two kernels
of different variants are never compared (ProbeError).

Pairs (``role``; the row lands in ``metric_series`` at the anchor):

- ``init``:        each checkpoint of a parent run and the run's step-0 checkpoint (anchor: the
                   checkpoint);
- ``next``:        each checkpoint and the next one of its run (anchor: the earlier); the row
                   also holds Δ = epoch difference, velocity S/Δ and angular velocity θ/Δ;
- ``siblings``:    the final kernels of two children spawned from the same parent checkpoint
                   (anchor: the parent's spawn checkpoint);
- ``spawn_final``: the parent's kernel at the spawn checkpoint and each child's final kernel
                   (anchor: the spawn checkpoint);
- ``cross_init``:  the final kernels of two parents of one variant with different seeds (anchor:
                   the lower seed's final checkpoint): how far apart different initialisations
                   end, next to ``siblings`` (different data order from one start).

BatchNorm (``BATCHNORM`` = "running", the ``batchnorm`` column of ``probe_job``): no network is
evaluated here; the kernels compared are the ``ntk`` probe's, of the network in eval mode with
each checkpoint's running statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lsdb.errors import ProbeError
from lsdb.spec import check, one_of

from . import _ntk_core as core
from .base import JobRequest, ProbeContext, cross_init_pairs, sibling_final_pairs, to_init_pairs, to_next_pairs

VERSION = 1
TABLES = ("ntk_distance",)
BATCHNORM = "running"  # of the stored kernels
ROLES = ("init", "next", "siblings", "spawn_final", "cross_init")


@dataclass(frozen=True)
class Params:
    variant: str = field(default="trace", metadata=one_of(*core.VARIANTS))  # which stored ntk kernels to compare
    roles: tuple[str, ...] = field(default=ROLES, metadata=check(
        lambda v: len(v) > 0 and all(r in ROLES for r in v), f"must list one or more of {', '.join(ROLES)}"))


def _validate(params: Params) -> None:
    core.check_variant(params.variant)
    bad = [r for r in params.roles if r not in ROLES]
    if bad:
        raise ProbeError(f"ntk_distance.roles: unknown role(s) {bad}; valid roles: {', '.join(ROLES)}")


# ------------------------------------------------------------------------------------ planning

def spawn_final_pairs(study) -> list[JobRequest]:
    """Each finished child's final checkpoint paired with the parent checkpoint it was spawned
    from (role ``spawn_final``; the parent's checkpoint first, anchored at it)."""
    return [JobRequest((r.parent_checkpoint_id, r.final.id), r.parent_checkpoint_id, "spawn_final")
            for r in study.runs
            if r.kind == "child" and r.parent_checkpoint_id and r.status == "finished" and r.checkpoints]


def stored_kernels(study, variant: str) -> dict[str, dict[tuple, str]]:
    """checkpoint id → {(ntk version, params hash): artifact sha} of the finished ``ntk`` jobs of
    ``variant``."""
    df = study.results("ntk")
    if df is None or len(df) == 0:
        return {}
    out: dict[str, dict[tuple, str]] = {}
    for row in df.iter_rows(named=True):
        if row.get("state", "done") != "done" or row.get("variant") != variant or not row.get("artifact"):
            continue
        key = (int(row.get("version") or 0), str(row.get("params_hash") or ""))
        out.setdefault(row["checkpoint_id"], {})[key] = row["artifact"]
    return out


def _common_kernel(kernels: dict[str, dict[tuple, str]], a: str, b: str) -> tuple[str, str] | None:
    """Artifacts of one ntk parameter set that both checkpoints have (newest version first), so
    that two kernels computed with different settings are never compared."""
    shared = set(kernels.get(a, {})) & set(kernels.get(b, {}))
    if not shared:
        return None
    key = max(shared, key=lambda k: (k[0], k[1]))
    return kernels[a][key], kernels[b][key]


def plan(study, params: Params) -> list[JobRequest]:
    """Pairs whose two kernels are stored now; ``plan`` is called again as ``ntk`` jobs finish."""
    _validate(params)
    kernels = stored_kernels(study, params.variant)
    if not kernels:
        return []
    makers = {"init": to_init_pairs, "next": to_next_pairs, "siblings": sibling_final_pairs,
              "spawn_final": spawn_final_pairs, "cross_init": cross_init_pairs}
    jobs = []
    for role in params.roles:
        for req in makers[role](study):
            a, b = req.checkpoint_ids
            if a == b:  # a run's init paired with itself: S = 0 by definition, no job
                continue
            found = _common_kernel(kernels, a, b)
            if found is None:
                continue
            jobs.append(JobRequest(req.checkpoint_ids, req.anchor_checkpoint_id, req.role,
                                   {"kernels": list(found), "variants": [params.variant, params.variant]}))
    return jobs


# ------------------------------------------------------------------------------------- compute

def compute(ctx: ProbeContext, params: Params) -> dict[str, list[dict]]:
    shas = list(ctx.inputs.get("kernels", ()))
    if len(shas) != 2:
        raise ProbeError(f"ntk_distance needs two kernel artifacts in the job inputs, got {shas}")
    variants = list(ctx.inputs.get("variants", (params.variant, params.variant)))
    if variants[0] != variants[1]:
        raise ProbeError(
            f"kernel variants differ: {shas[0][:12]}… is '{variants[0]}' and {shas[1][:12]}… is "
            f"'{variants[1]}'; distances across variants are not comparable"
        )
    k1, k2 = ctx.artifacts.get(shas[0]), ctx.artifacts.get(shas[1])
    if k1.shape != k2.shape:
        raise ProbeError(
            f"kernel shapes differ: {shas[0][:12]}… is {k1.shape} and {shas[1][:12]}… is {k2.shape} "
            f"(variant or probe set mismatch)"
        )
    s, angle = core.kernel_distance(k1, k2)
    delta = velocity = angular = None
    if ctx.role not in ("siblings", "cross_init") and len(ctx.checkpoints) == 2:
        delta = abs(float(ctx.checkpoints[1].epoch) - float(ctx.checkpoints[0].epoch))
        if ctx.role == "next" and delta > 0:
            velocity, angular = s / delta, angle / delta
    return {"ntk_distance": [{
        "variant": variants[0], "distance": s, "angle": angle, "delta_epoch": delta,
        "velocity": velocity, "angular_velocity": angular,
    }]}
