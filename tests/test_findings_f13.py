"""F13 with both patch-network families: the classical ``patchnet`` and the quantum ``qpatchnet``, each judged on
its own, on hand-built studies where the answer is known (tests/test_findings.py covers the classical family
alone)."""

from __future__ import annotations

import polars as pl
import pytest

from lsdb.query.findings import FAILS, HOLDS, INCONCLUSIVE, NOT_MEASURED, evaluate, findings
from lsdb.query.session import Session

from .conftest_query import Frames

SEEDS = (0, 1, 2)
LAYERS = (1, 2, 4)


def _loss(layers: int) -> float:
    return 1.5 - 0.2 * layers  # more layers, lower final train loss


def patch_study(quantum: dict | None = None, classical: dict | None = None, seeds=SEEDS,
                still_falling: bool = False) -> Frames:
    """Parents of the quantum family (``quantum``: (patches, layers) → top eigenvalue at the end; 4 qubits,
    10 classes: 2·4·L + 50 parameters per patch) and of the classical one (``classical``: patches → top
    eigenvalue). Train loss 2.3 at t = 0, then its final value from t/T = 0.9 on (converged) unless
    ``still_falling``. Seeds scale the eigenvalues by 1 + 0.05·seed."""
    fr = Frames()
    for seed in seeds:
        j = 1 + 0.05 * seed
        runs = [(f"q{n}x{layers}", {"model": "qpatchnet", "patches": n, "num_params": n * (8 * layers + 50)},
                 lam, _loss(layers)) for (n, layers), lam in (quantum or {}).items()]
        runs += [(f"p{n}", {"model": "patchnet", "patches": n, "num_params": n * 600}, lam, 0.05)
                 for n, lam in (classical or {}).items()]
        for variant, kw, lam, loss in runs:
            rid = fr.run(f"{variant}-s{seed}", seed, variant=variant, **kw)
            fr.ckpt(rid, 0, train_loss=2.3, test_error=0.9)
            fr.ckpt(rid, 36, train_loss=2 * loss if still_falling else 1.01 * loss, test_error=0.3)
            fr.metric("hessian_top_eigenvalue", fr.ckpt(rid, 40, train_loss=loss, test_error=0.3), lam * j)
    return fr


def quantum(ratio: float = 0.5, per_layer: float = 2.0) -> dict:
    """λ(N, L) = 10 · ratio^(position of N among 1, 4, 9) · per_layer^log2(L)."""
    return {(n, layers): 10 * ratio ** k * per_layer ** (layers.bit_length() - 1)
            for k, n in enumerate((1, 4, 9)) for layers in LAYERS}


def f13(frames: Frames):
    return evaluate(frames.evidence(), ["F13"])[0]


def test_the_quantum_family_alone_holds():
    f = f13(patch_study(quantum()))
    assert f.verdict == HOLDS and f.label == HOLDS, (f.measured, f.detail)
    assert f.measured.startswith("quantum (qpatchnet): λ(9)/λ(1) 0.25 ± 0 (3 seeds) (per seed)")
    assert "params vs λ: Spearman 0.949 ± 0 (3 seeds), vs final loss -1 ± 0 (3 seeds)" in f.measured
    assert "classical" not in f.measured and "ratio" not in f.numbers
    assert f.numbers["quantum_ratio"]["mean"] == pytest.approx(0.25) and f.numbers["quantum_patches"] == [1, 4, 9]


def test_the_quantum_family_fails_on_patches_and_on_parameters():
    flat = f13(patch_study(quantum(ratio=1.0)))
    assert flat.verdict == FAILS and "fails on: quantum patches" in flat.detail
    assert "quantum parameters per patch" not in flat.detail
    sharper_when_smaller = f13(patch_study(quantum(per_layer=0.5)))
    assert sharper_when_smaller.verdict == FAILS
    assert "fails on: quantum parameters per patch" in sharper_when_smaller.detail


def test_each_family_gets_its_own_parts_and_numbers():
    study = patch_study(quantum(ratio=1.0), classical={1: 10.0, 4: 7.0, 9: 5.0})
    f = f13(study)
    assert f.verdict == FAILS and "fails on: quantum patches" in f.detail and "fails on: classical patches" not in f.detail
    classical, quantum_text = f.measured.split(" | ")
    assert classical.startswith("classical (patchnet): λ(9)/λ(1) 0.5 ± 0 (3 seeds) (per seed)")
    assert quantum_text.startswith("quantum (qpatchnet): λ(9)/λ(1) 1 ± 0 (3 seeds) (per seed)")
    assert f.numbers["ratio"]["mean"] == pytest.approx(0.5) and f.numbers["quantum_ratio"]["mean"] == pytest.approx(1)
    # the classical family has no size sweep: its second part is not measured, named with what to add
    both = f13(patch_study(quantum(), classical={1: 10.0, 4: 7.0, 9: 5.0}))
    assert both.verdict == HOLDS and both.unmeasured == ["classical parameters per patch"]
    assert "model.width" in both.detail


def test_the_quantum_family_not_at_a_minimum_is_inconclusive():
    f = f13(patch_study(quantum(), still_falling=True))
    assert f.verdict == INCONCLUSIVE
    assert "quantum patches would hold but not at a minimum" in f.detail
    assert "q1x1 (3 runs): −50% from t/T 0.9" in f.detail


def test_a_family_at_one_patch_count_is_not_measured_beside_a_judged_one():
    study = patch_study({(4, layers): 5.0 for layers in LAYERS}, classical={1: 10.0, 4: 7.0, 9: 5.0})
    f = f13(study)
    assert f.verdict == HOLDS and "quantum patches" in f.unmeasured
    assert "runs at one patch count (4) only" in f.detail
    alone = f13(patch_study({(4, 1): 5.0}))
    assert alone.verdict == NOT_MEASURED and "qpatchnet" in alone.detail


def test_too_few_quantum_seeds_are_inconclusive():
    f = f13(patch_study(quantum(), seeds=(0,)))
    assert f.verdict == INCONCLUSIVE and "only 1 seed measured" in f.detail


def test_a_real_store_gives_the_same_f13_as_the_frames(tmp_path):
    study = patch_study(quantum(), classical={1: 10.0, 4: 7.0, 9: 5.0})
    store, skipped = study.write(tmp_path / "store")
    assert not skipped
    got = findings(Session.open(store)).filter(pl.col("id") == "F13")
    want = f13(study)
    assert got["verdict"][0] == want.label and got["measured"][0] == want.measured
