"""The ``ntk_distance`` probe: S(K, K') from stored artifacts, its pairs, and its bad inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lsdb.errors import ArtifactCorrupt, ProbeError
from lsdb.probes import _ntk_core as core
from lsdb.probes import ntk_distance
from tests import tiny_cases as tc


def psd(seed: int, m: int = 6, rank: int = 4) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((m, rank))
    return a @ a.T


def direct_s(k1, k2) -> float:
    return 1.0 - float((k1 * k2).sum()) / (np.linalg.norm(k1) * np.linalg.norm(k2))


def test_distance_properties():
    k = psd(0)
    assert core.kernel_distance(k, k) == (0.0, 0.0)
    s, angle = core.kernel_distance(k, 3.5 * k)
    assert s < 1e-15 and angle < 1e-7
    for seed in range(1, 20):
        k1, k2 = psd(seed), psd(seed + 100)
        s, angle = core.kernel_distance(k1, k2)
        assert 0.0 <= s <= 1.0
        assert s == pytest.approx(direct_s(k1, k2), rel=1e-10, abs=1e-14)
        assert angle == pytest.approx(math.acos(1.0 - s), rel=1e-10)
    # orthogonal PSD kernels are at the far end of [0, 1]
    e1, e2 = np.diag([1.0, 0.0]), np.diag([0.0, 1.0])
    assert core.kernel_distance(e1, e2) == pytest.approx((1.0, math.pi / 2))
    with pytest.raises(ProbeError, match="zero kernel"):
        core.kernel_distance(np.zeros((2, 2)), e1)


# ------------------------------------------------------------------------------ compute

def ctx_for(tmp_path, shas, role, epochs=(0.5, 2.0), variants=("trace", "trace")):
    """A context of two stored kernels (no model, no data) at checkpoints of the given epochs."""
    cks = [tc.checkpoint_ref(f"c{i}", int(10 * e), e) for i, e in enumerate(epochs)]
    return tc.context(None, None, tmp_path, checkpoints=cks, role=role,
                      inputs={"kernels": list(shas), "variants": list(variants)})


def stored_pair(tmp_path):
    arts = tc.artifacts(tmp_path)
    k1, k2 = psd(1).astype(np.float32), psd(2).astype(np.float32)
    return arts.put(k1), arts.put(k2), k1, k2


def test_next_rows_carry_delta_and_velocities(tmp_path):
    a, b, k1, k2 = stored_pair(tmp_path)
    (row,) = ntk_distance.compute(ctx_for(tmp_path, (a, b), "next"), ntk_distance.Params())["ntk_distance"]
    s = direct_s(k1.astype(np.float64), k2.astype(np.float64))
    assert row["distance"] == pytest.approx(s, rel=1e-10)
    assert row["delta_epoch"] == pytest.approx(1.5)
    assert row["velocity"] == pytest.approx(s / 1.5, rel=1e-10)
    assert row["angular_velocity"] == pytest.approx(math.acos(1 - s) / 1.5, rel=1e-10)
    assert row["variant"] == "trace"


def test_other_roles_have_no_velocity(tmp_path):
    a, b, _, _ = stored_pair(tmp_path)
    (init,) = ntk_distance.compute(ctx_for(tmp_path, (b, a), "init", (2.0, 0.0)), ntk_distance.Params())["ntk_distance"]
    assert init["delta_epoch"] == pytest.approx(2.0) and init["velocity"] is None and init["angular_velocity"] is None
    (sib,) = ntk_distance.compute(ctx_for(tmp_path, (a, b), "siblings", (4.0, 4.0)), ntk_distance.Params())["ntk_distance"]
    assert sib["delta_epoch"] is None and sib["velocity"] is None
    (same,) = ntk_distance.compute(ctx_for(tmp_path, (a, a), "next"), ntk_distance.Params())["ntk_distance"]
    assert same["distance"] == 0.0 and same["velocity"] == 0.0


def test_altered_or_missing_artifact_is_corrupt(tmp_path):
    a, b, _, _ = stored_pair(tmp_path)
    path = tc.artifacts(tmp_path).path(b)
    arr = np.load(path)
    arr[0, 0] += 1.0
    np.save(path, arr)
    with pytest.raises(ArtifactCorrupt, match=b[:12]):
        ntk_distance.compute(ctx_for(tmp_path, (a, b), "next"), ntk_distance.Params())
    path.unlink()
    with pytest.raises(ArtifactCorrupt, match="missing"):
        ntk_distance.compute(ctx_for(tmp_path, (a, b), "next"), ntk_distance.Params())


def test_variant_or_shape_mismatch_is_a_probe_error(tmp_path):
    a, b, _, _ = stored_pair(tmp_path)
    with pytest.raises(ProbeError, match=r"'trace'.*'sum_logits'"):
        ntk_distance.compute(ctx_for(tmp_path, (a, b), "next", variants=("trace", "sum_logits")), ntk_distance.Params())
    c = tc.artifacts(tmp_path).put(psd(3, m=9).astype(np.float32))
    with pytest.raises(ProbeError, match="shapes differ"):
        ntk_distance.compute(ctx_for(tmp_path, (a, c), "next"), ntk_distance.Params())


# ------------------------------------------------------------------------------ planning

def run_ref(rid, cks, **fields):
    """A run whose checkpoints are (id, epoch) pairs, at steps 0, 10, 20, …"""
    refs = [tc.checkpoint_ref(c, i * 10, float(e), rid) for i, (c, e) in enumerate(cks)]
    return tc.run_ref(rid, checkpoints=refs, **fields)


def study_with(kernels_for: set[str], variant: str = "trace") -> tc.FakeStudy:
    parent = run_ref("p", [("p0", 0), ("p1", 1), ("p2", 4)])
    kids = [run_ref(f"k{i}", [(f"k{i}a", 2), (f"k{i}b", 4)], kind="child", parent="p", parent_checkpoint="p1",
                    child_index=i) for i in range(2)]
    rows = [dict(job_id=f"j{c}", idx=0, checkpoint_id=c, variant=variant, artifact=f"sha-{c}", probe="ntk",
                 version=1, params_hash="h", role="self", state="done") for c in sorted(kernels_for)]
    rows.append(dict(job_id="jx", idx=0, checkpoint_id="p0", variant=variant, artifact="sha-failed", probe="ntk",
                     version=1, params_hash="other", role="self", state="failed"))
    return tc.FakeStudy([parent, *kids], {"ntk": rows})


def test_plan_asks_only_for_pairs_whose_kernels_exist():
    assert ntk_distance.plan(study_with(set()), ntk_distance.Params()) == []
    jobs = ntk_distance.plan(study_with({"p0", "p1"}), ntk_distance.Params())
    # init: (p1, p0); next: (p0, p1). p0 paired with itself is no job.
    assert {(j.role, j.checkpoint_ids) for j in jobs} == {("init", ("p1", "p0")), ("next", ("p0", "p1"))}
    nxt = next(j for j in jobs if j.role == "next")
    assert nxt.anchor_checkpoint_id == "p0"
    assert nxt.inputs == {"kernels": ["sha-p0", "sha-p1"], "variants": ["trace", "trace"]}


def test_plan_all_roles_once_every_kernel_is_stored():
    everything = {"p0", "p1", "p2", "k0a", "k0b", "k1a", "k1b"}
    jobs = ntk_distance.plan(study_with(everything), ntk_distance.Params())
    by_role: dict[str, set] = {}
    for j in jobs:
        by_role.setdefault(j.role, set()).add((j.checkpoint_ids, j.anchor_checkpoint_id))
    # children measure from the init of the trajectory they continue (the parent's step 0)
    assert by_role["init"] == {(("p1", "p0"), "p1"), (("p2", "p0"), "p2"), (("k0a", "p0"), "k0a"),
                               (("k0b", "p0"), "k0b"), (("k1a", "p0"), "k1a"), (("k1b", "p0"), "k1b")}
    assert by_role["next"] == {(("p0", "p1"), "p0"), (("p1", "p2"), "p1"),
                               (("k0a", "k0b"), "k0a"), (("k1a", "k1b"), "k1a")}
    assert by_role["siblings"] == {(("k0b", "k1b"), "p1")}
    assert by_role["spawn_final"] == {(("p1", "k0b"), "p1"), (("p1", "k1b"), "p1")}
    only = ntk_distance.plan(study_with(everything), ntk_distance.Params(roles=("siblings",)))
    assert [j.role for j in only] == ["siblings"]


def test_plan_reads_only_the_requested_variant():
    everything = {"p0", "p1", "p2"}
    assert ntk_distance.plan(study_with(everything, variant="full"), ntk_distance.Params()) == []
    assert ntk_distance.plan(study_with(everything, variant="full"), ntk_distance.Params(variant="full"))
    with pytest.raises(ProbeError, match="unknown role"):
        ntk_distance.plan(study_with(everything), ntk_distance.Params(roles=("later",)))
