"""Probe settings are checked when the spec loads, like section keys: a bad value of any
``[probes.NAME]`` key is one SpecError naming ``probes.NAME.KEY``, its line and the valid values,
instead of a job that fails three times at run time."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lsdb.errors import SpecError
from lsdb.plan import load_spec, parse_spec
from lsdb.probes import PARAMS, PROBES
from lsdb.spec import MAX_SEED
from tests.conftest import REPO

SEED = f"[0, {MAX_SEED}]"

# probe, key, a bad value (TOML), what the message must show of the valid values.
# Every field that carries a check appears here at least once (test_every_checked_field_is_covered).
BAD = [
    ("hessian", "params", "['']", "non-empty globs on parameter names"),
    ("ntk", "params", "['']", "non-empty globs on parameter names"),
    ("flatness", "params", "['']", "non-empty globs on parameter names"),
    ("kernel_accuracy", "params", "['']", "non-empty globs on parameter names"),
    ("eval", "max_train", "-1", "[0, 1000000000]"),
    ("eval", "max_test", "-5", "[0, 1000000000]"),
    ("eval", "batch_size", "0", "(0, 10000000]"),

    ("barrier", "points", "1", "[2, 10001]"),
    ("barrier", "points", "1000000000", "[2, 10001]"),
    ("barrier", "train_subset", "-1", "[0, 1000000000]"),
    ("barrier", "test_subset", "-1", "[0, 1000000000]"),
    ("barrier", "subset_seed", str(2**62), SEED),
    ("barrier", "batch_size", "0", "(0, 10000000]"),
    ("barrier", "mode", "'fast'", "auto, vmap, fused, loop"),
    ("barrier", "pairs", "['a@1']", "'RUN@STEP RUN@STEP'"),
    ("barrier", "pairs", "['a@x b@final']", "STEP an integer, 'init' or 'final'"),

    ("flatness", "train_subset", "-1", "[0, 1000000000]"),
    ("flatness", "subset_seed", "-1", SEED),
    ("flatness", "directions", "0", "[1, 10000]"),
    ("flatness", "directions", "1000000000", "[1, 10000]"),
    ("flatness", "direction_seed", str(2**62), SEED),
    ("flatness", "points", "1", "[2, 10001]"),
    ("flatness", "curvature_points", "2", "[3, 10001]"),
    ("flatness", "rho", "0.0", "> 0"),
    ("flatness", "restarts", "-1", "[0, 1000]"),
    ("flatness", "ascent_steps", "-1", "[0, 100000]"),
    ("flatness", "epsilon", "-0.1", ">= 0"),
    ("flatness", "pgd_steps", "0", "[1, 10000]"),
    ("flatness", "batch_size", "-3", "(0, 10000000]"),
    ("flatness", "mode", "'vmapp'", "auto, vmap, fused, loop"),

    ("hessian", "batch_size", "-1", "[0, 1000000000]"),
    ("hessian", "batch_seed", "-1", SEED),
    ("hessian", "top_k", "-1", "[0, 1000] (0 = 2C + 2"),
    ("hessian", "top_k", "1001", "[0, 1000]"),
    ("hessian", "sharpness_batches", "-1", "[0, 100000] (0 = no batch sharpness)"),
    ("hessian", "sharpness_batch_size", "-1", "[0, 1000000000] (0 = the run's training batch size)"),
    ("hessian", "tol", "0.0", "(0, 1]"),
    ("hessian", "criterion", "'gapp'", "residual, gap"),
    ("hessian", "max_iter", "1000000000", "[1, 100000]"),
    ("hessian", "trace_method", "'hutch'", "deflated, hutch++, hutchinson"),
    ("hessian", "trace_hvps", "0", "[1, 1000000]"),
    ("hessian", "density_vectors", "-1", "[0, 1000]"),
    ("hessian", "density_iters", "0", "[1, 10000]"),
    ("hessian", "density_points", "0", "[1, 1000000]"),
    ("hessian", "density_sigma", "0.0", "> 0"),
    ("hessian", "hvp", "'fwd'", "double_backward, fwd_rev"),
    ("hessian", "hvp_chunk", "0", "[1, 65536]"),

    ("kernel_accuracy", "methods", "['nngp']", "linearised, kernel_regression"),
    ("kernel_accuracy", "methods", "[]", "linearised, kernel_regression"),
    ("kernel_accuracy", "steps", "-1", "[0, 1000000]"),
    ("kernel_accuracy", "lr_mode", "'adaptive'", "fixed, kernel_scaled"),
    ("kernel_accuracy", "lr_factor", "0.0", "> 0"),
    ("kernel_accuracy", "kernel_lr", "-1.0", "> 0"),
    ("kernel_accuracy", "train_eval_size", "-1", "[0, 1000000000]"),
    ("kernel_accuracy", "ridge", "-0.001", ">= 0"),
    ("kernel_accuracy", "kernel_variant", "'diag'", "trace, full"),
    ("kernel_accuracy", "chunk", "0", "[1, 1000000]"),
    ("kernel_accuracy", "cache_mb", "-1.0", "[0, 1.04858e+06]"),

    ("merge", "points", "1", "[2, 10001]"),
    ("merge", "train_subset", "-1", "[0, 1000000000]"),
    ("merge", "sweeps", "0", "[1, 10000]"),
    ("merge", "seed", "-1", SEED),
    ("merge", "batch_size", "0", "(0, 10000000]"),
    ("soup", "late_from", "1.5", "[0, 1]"),
    ("soup", "sets", "['a@final']", "groups of 2 to 256 checkpoints"),
    ("soup", "sets", "['a@x b@final']", "STEP an integer, 'init'"),
    ("soup", "select_fraction", "0.95", "[0, 0.9]"),
    ("soup", "seed", "-1", SEED),
    ("soup", "train_subset", "-1", "[0, 1000000000]"),
    ("soup", "match_sweeps", "0", "[1, 10000]"),
    ("soup", "batch_size", "0", "(0, 10000000]"),

    ("task_arithmetic", "lambdas", "[0.5, 0.5]", "1 to 1001 distinct values in [-100, 100]"),
    ("task_arithmetic", "ties_keep", "0.0", "(0, 1]"),
    ("task_arithmetic", "batch_size", "0", "(0, 10000000]"),

    ("ntk", "variant", "'fulll'", "full, trace, sum_logits"),
    ("ntk", "dtype", "'float16'", "float32, float64"),
    ("ntk", "implementation", "'fast'", "auto, structured, jacobian, ntvp"),
    ("ntk", "chunk", "0", "[1, 1000000]"),
    ("ntk", "cache_mb", "-1.0", "[0, 1.04858e+06]"),

    ("ntk_distance", "variant", "'diag'", "full, trace, sum_logits"),
    ("ntk_distance", "roles", "['later']", "init, next, siblings, spawn_final"),
    ("ntk_distance", "roles", "[]", "init, next, siblings, spawn_final"),

    ("slice", "which", "'some'", "final, all"),
    ("slice", "dims", "[3]", "1, 2"),
    ("slice", "dims", "[]", "1, 2"),
    ("slice", "points_1d", "1", "[2, 10001]"),
    ("slice", "points_2d", "1000000000", "[2, 1001]"),
    ("slice", "train_subset", "-1", "[0, 1000000000]"),
    ("slice", "test_subset", "-1", "[0, 1000000000]"),
    ("slice", "subset_seed", "-1", SEED),
    ("slice", "direction_seed", str(2**62), SEED),
    ("slice", "batch_size", "0", "(0, 10000000]"),
    ("slice", "mode", "'loops'", "auto, vmap, fused, loop"),
]

# fields without a per-field check, and why
UNCHECKED = {
    ("slice", "range_min"): "cross-checked with range_max (Params.cross_check)",
    ("slice", "range_max"): "cross-checked with range_min (Params.cross_check)",
}


def _spec(probe: str, body: str) -> str:
    # the bad key is on line 4 of the file
    return f"# a spec\n[experiment]\n[probes.{probe}]\n{body}\n"


@pytest.mark.parametrize("probe, key, bad, valid", BAD, ids=[f"{p}.{k}={b}" for p, k, b, _ in BAD])
def test_a_bad_value_names_the_key_its_line_and_the_valid_values(probe, key, bad, valid):
    with pytest.raises(SpecError) as e:
        parse_spec(_spec(probe, f"{key} = {bad}"), source="p.toml")
    msg = str(e.value)
    assert msg.startswith("p.toml:4: "), msg
    assert f"probes.{probe}.{key} = " in msg, msg
    assert valid in msg, msg
    assert "\n" not in msg


def test_every_checked_field_is_covered_and_every_other_field_is_accounted_for():
    covered = {(p, k) for p, k, _, _ in BAD}
    for name in PROBES:
        for f in dataclasses.fields(PARAMS[name]):
            if "check" in f.metadata:
                assert (name, f.name) in covered, f"probes.{name}.{f.name} has a check but no test in BAD"
            elif f.type not in ("bool", bool):
                assert (name, f.name) in UNCHECKED, f"probes.{name}.{f.name} is not checked at load"


@pytest.mark.parametrize("probe, body", [
    ("ntk", "variant = 3"),
    ("hessian", "top_k = 12.5"),
    ("hessian", "verify = 1"),
    ("slice", "dims = [1.0]"),
    ("kernel_accuracy", "methods = 'linearised'"),
    ("barrier", "points = true"),
    ("flatness", "rho = nan"),
    ("flatness", "rho = inf"),
])
def test_wrong_types_are_spec_errors(probe, body):
    key = body.split(" =")[0]
    with pytest.raises(SpecError, match=rf"p\.toml:4: probes\.{probe}\.{key}"):
        parse_spec(_spec(probe, body), source="p.toml")


def test_defaults_load_and_keep_the_identity_of_an_empty_table():
    for name in PROBES:
        cls = PARAMS[name]
        written = "\n".join(f"{f.name} = {_toml(f.default)}" for f in dataclasses.fields(cls))
        plain, full = parse_spec(f"[probes.{name}]\n"), parse_spec(f"[probes.{name}]\n{written}\n")
        assert plain.identity() == full.identity(), name
        assert full.probe_params() == {name: {}}, name
        cls()  # the defaults themselves are a valid Params


def test_the_bounds_themselves_are_accepted():
    from lsdb.probes import barrier, hessian, slice as slice_probe

    spec = parse_spec(f"""
[probes.barrier]
points = {barrier.MAX_POINTS}
[probes.slice]
points_1d = {slice_probe.MAX_POINTS_1D}
points_2d = {slice_probe.MAX_POINTS_2D}
range_min = -2.5
range_max = -2.0
[probes.hessian]
top_k = {hessian.MAX_TOP_K}
max_iter = {hessian.MAX_TOP_K}
batch_seed = {MAX_SEED}
""")
    params = spec.probe_params()
    assert params["barrier"]["points"] == 10_001 and params["slice"]["points_2d"] == 1_001
    assert params["hessian"]["top_k"] == 1_000


@pytest.mark.parametrize("body, key, shows", [
    ("range_min = 1.0\nrange_max = 1.0", "range_max", "must be > range_min = 1.0"),
    ("range_min = 2.0", "range_max", "must be > range_min = 2.0"),
])
def test_slice_range_must_not_be_empty(body, key, shows):
    with pytest.raises(SpecError) as e:
        parse_spec(f"[probes.slice]\n{body}\n", source="s.toml")
    msg = str(e.value)
    assert f"probes.slice.{key} = " in msg and shows in msg and msg.startswith("s.toml:")


def test_a_cross_field_error_points_at_the_key_or_else_the_table():
    with pytest.raises(SpecError) as e:
        parse_spec("[probes.slice]\nrange_min = 0.5\nrange_max = 0.25\n", source="s.toml")
    assert str(e.value).startswith("s.toml:3: probes.slice.range_max = 0.25")
    with pytest.raises(SpecError) as e:  # max_iter left at its default: the table's line
        parse_spec("[experiment]\n[probes.hessian]\ntop_k = 500\n", source="s.toml")
    assert str(e.value).startswith("s.toml:2: probes.hessian.max_iter = 200 must be >= top_k = 500")


def test_selection_keys_are_checked_too():
    with pytest.raises(SpecError, match=r"s\.toml:2: probes\.eval\.on_runs = 'kids' must be one of all, parents"):
        parse_spec("[probes.eval]\non_runs = 'kids'\n", source="s.toml")
    with pytest.raises(SpecError, match=r"probes\.eval\.on_checkpoints = 'first' must be one of all, final"):
        parse_spec("[probes.eval]\non_checkpoints = 'first'\n", source="s.toml")
    with pytest.raises(SpecError) as e:
        parse_spec("[probes.eval]\non_variants = ['bsae']\n[variants.wide.model]\nwidth = 64\n", source="s.toml")
    msg = str(e.value)
    assert msg.startswith("s.toml:2: probes.eval.on_variants = ['bsae'] must name variants of this spec, one of "
                          "base, wide") and "did you mean 'base'" in msg
    assert parse_spec("[probes.eval]\non_variants = ['wide']\n[variants.wide.model]\nwidth = 64\n").probes


def test_barrier_pairs_in_every_form_plan_reads():
    spec = parse_spec("[probes.barrier]\npairs = ['a@10 b@final', 'a@init,b@-1', ' c@0   d@+5 ']\n")
    assert len(spec.probe_params()["barrier"]["pairs"]) == 3


def test_every_choice_accepted_at_load_is_accepted_by_the_probe():
    from lsdb.probes import _ntk_core, hessian, kernel_accuracy, ntk, ntk_distance

    for v in _ntk_core.VARIANTS:
        for impl in _ntk_core.IMPLEMENTATIONS:
            for dtype in ntk.DTYPES:
                body = f"variant = '{v}'\nimplementation = '{impl}'\ndtype = '{dtype}'"
                ntk.validate(ntk.Params(**parse_spec(f"[probes.ntk]\n{body}\n").probe_params()["ntk"]))
        ntk_distance._validate(ntk_distance.Params(variant=v))
    for mode in kernel_accuracy.LR_MODES:
        for kv in kernel_accuracy.KERNEL_VARIANTS:
            kernel_accuracy._validate(kernel_accuracy.Params(lr_mode=mode, kernel_variant=kv))
    for hvp in hessian.HVP_METHODS:  # every one the spec accepts is one make_operator takes
        assert hessian.Params(**parse_spec(f"[probes.hessian]\nhvp = '{hvp}'\n").probe_params()["hessian"]).hvp == hvp
        assert hvp in ("auto", "layers") or hessian.HessianOperator(
            lambda p: (p["w"] ** 2).sum(), {"w": torch.ones(2)}, hvp).method == hvp


def test_examples_and_the_demo_still_load():
    for path in sorted((REPO / "examples").glob("*.toml")):
        spec = load_spec(path)
        assert spec.probes, path.name
    from lsdb.demo import demo_spec

    assert demo_spec(quick=True).probes and demo_spec(quick=False).probes


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, tuple):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return repr(v)
