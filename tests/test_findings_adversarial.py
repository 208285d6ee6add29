"""F11 compares each adversarial variant with the standard runs on its own, and only at matched clean
accuracy: a variant whose clean error is off by more than the margin leaves the finding inconclusive
and names its gap, whatever its flatness."""

from __future__ import annotations

import pytest

from lsdb.query import thresholds as T
from lsdb.query.findings import FAILS, HOLDS, INCONCLUSIVE, evaluate

from .conftest_query import SEEDS, Study


def _with_variant(name: str, clean_error: float, sharpness: float, holds: bool = True) -> Study:
    study = Study(holds=holds)
    for seed in SEEDS:
        rid = study.run(f"{name}-s{seed}", seed, variant=name, adversarial="pgd")
        study.ckpt(rid, 0, test_error=0.9, train_loss=2.3)
        c = study.ckpt(rid, 40, test_error=clean_error, train_loss=0.05)
        study.metric("sharpness_1d", c, sharpness * (1 + 0.05 * seed))
    return study


def test_each_adversarial_variant_is_a_part_of_its_own():
    f = evaluate(_with_variant("pgd_small", 0.1, 1.0).evidence(), ["F11"])[0]
    assert f.verdict == HOLDS, f.detail
    assert "adversarial (pgd)" in f.measured and "pgd_small (pgd)" in f.measured
    assert set(f.numbers) >= {"adversarial", "pgd_small", "standard_clean_error"}


def test_an_unmatched_variant_is_inconclusive_with_its_gap():
    gap = T.F11_MATCH_ERROR + 0.08
    f = evaluate(_with_variant("pgd_strong", 0.1 + gap, 1.0).evidence(), ["F11"])[0]
    assert f.verdict == INCONCLUSIVE, f.detail
    assert f"pgd_strong: the clean test errors differ by {gap:.3g}" in f.detail
    assert f.numbers["pgd_strong"]["clean_error_gap"] == pytest.approx(gap)


def test_a_flatter_matched_variant_fails():
    study = _with_variant("pgd_flat", 0.1, 0.5)
    f = evaluate(study.evidence(), ["F11"])[0]
    assert f.verdict == FAILS and "pgd_flat" in f.detail
