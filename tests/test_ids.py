"""Pinned identities: if one of these literals changes, every stored run, checkpoint or result
would silently get a new id and be recomputed. Change them only with a schema version bump."""

from lsdb.ids import checkpoint_id, job_id, params_hash
from lsdb.plan import expand_runs, parse_spec
from lsdb.probes.hessian import Params as HessianParams
from tests.conftest import TINY_SPEC

N_TRAIN = 1437  # the digits training split


def test_run_checkpoint_params_and_job_ids_are_pinned():
    runs = expand_runs(parse_spec(TINY_SPEC), N_TRAIN)
    parent = runs[0]
    child = next(r for r in runs if r.kind == "child")
    assert parent.id == "a0e8ecfc851597ae"
    assert child.id == "049daa75f41b4184" and child.data_seed == 240682355
    assert checkpoint_id(parent.id, 0) == "2358da3439f2b2a8"
    assert params_hash(HessianParams()) == "44136fa355b3678a"  # the hash of {}: defaults are left out
    assert params_hash(HessianParams(top_k=20)) == "176a4381cf64c185"
    assert job_id("hessian", 2, "176a4381cf64c185", ("2358da3439f2b2a8",), "self") == "bf10f3ee7b42d78d6dbe18b4"


def test_run_ids_ignore_the_checkpoint_schedule_and_spawn_times():
    """Saving more often or spawning at more times never changes a trajectory's weights, so it
    must not change any existing run's id (only new children appear)."""
    before = {r.id: r for r in expand_runs(parse_spec(TINY_SPEC), N_TRAIN)}
    edited = TINY_SPEC.replace("times = [1.0]", "times = [1.0, 2.0]").replace("every_epochs = 1", "every_epochs = 0.5")
    edited = edited.replace("log_points = 3", "log_points = 5\nepochs = [0.75]")
    after = {r.id: r for r in expand_runs(parse_spec(edited), N_TRAIN)}
    assert set(before) < set(after)
    new = [r for r in after.values() if r.id not in before]
    assert new and all(r.kind == "child" and r.spawn_epoch == 2.0 for r in new)
    for rid, r in before.items():
        assert set(r.save_steps) <= set(after[rid].save_steps)


def test_run_ids_ignore_the_probe_set_and_data_root():
    base = {r.id for r in expand_runs(parse_spec(TINY_SPEC), N_TRAIN)}
    other = TINY_SPEC.replace("probe_set_size = 32", "probe_set_size = 64\nprobe_set_seed = 3")
    assert {r.id for r in expand_runs(parse_spec(other), N_TRAIN)} == base


def test_a_default_written_out_keeps_the_experiment_identity():
    plain = parse_spec(TINY_SPEC + "\n[probes.hessian]\n")
    written = parse_spec(TINY_SPEC + "\n[probes.hessian]\ntop_k = 0\ncriterion = 'residual'\non_runs = 'all'\n")
    assert plain.identity() == written.identity()
    assert parse_spec(TINY_SPEC + "\n[probes.hessian]\ntop_k = 13\n").identity() != plain.identity()
    variant = "\n[variants.big.optim]\nbatch_size = {}\n"
    # a variant override equal to the base value is no override
    assert parse_spec(TINY_SPEC + variant.format(128)).identity() == \
        parse_spec(TINY_SPEC + "\n[variants.big]\n").identity()
    assert parse_spec(TINY_SPEC + variant.format(256)).identity() != \
        parse_spec(TINY_SPEC + "\n[variants.big]\n").identity()
