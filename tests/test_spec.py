"""Spec parsing, validation messages and pinned identity hashes."""

import pytest

from lsdb.errors import SpecError
from lsdb.plan import load_spec, parse_spec


def test_defaults_match_the_papers_setting():
    spec = parse_spec("")
    assert spec.data.name == "mnist1d" and spec.data.probe_set_size == 256
    assert spec.model.name == "cnn1d" and spec.model.width == 32 and spec.model.kernels == (5, 3, 3)
    assert spec.optim.lr == 0.1 and spec.optim.momentum == 0.9 and spec.optim.batch_size == 64
    assert spec.optim.epochs == 40 and spec.optim.lr_drops == (30.0,)


def test_identity_leaves_defaults_out_and_is_pinned():
    # Pinned literals: if one changes, every stored experiment would silently change identity.
    empty = parse_spec("")
    assert empty.identity() == "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    assert parse_spec("[optim]\nlr = 0.1\n").identity() == empty.identity()  # a default written out
    assert parse_spec("[optim]\nlr = 0.2\n").identity() == "98f65a8a482239de493480a8ea370a6dd29b7f7563b3b061876c5797acf9403b"
    from tests.conftest import TINY_SPEC

    assert parse_spec(TINY_SPEC).identity() == "8d588cec354ab70c29e3c8a93ca1351dda5e8b9faf98b5b31f4b59d29ad7e9da"


def test_unknown_key_suggests_nearest_and_names_line():
    with pytest.raises(SpecError) as e:
        parse_spec("[optim]\nlr = 0.1\nmomentun = 0.9\n", source="s.toml")
    msg = str(e.value)
    assert "s.toml:3" in msg and "optim.momentun" in msg and "did you mean 'momentum'" in msg


def test_unknown_section_and_probe():
    with pytest.raises(SpecError, match="did you mean 'optim'"):
        parse_spec("[optimiser]\nlr = 1\n")
    with pytest.raises(SpecError, match="unknown probe 'hesian'; did you mean 'hessian'"):
        parse_spec("[probes.hesian]\n")


@pytest.mark.parametrize("text, key", [
    ("[optim]\nlr = -0.1\n", "optim.lr"),
    ("[model]\nname = 'resnet'\n", "model.name"),
    ("[optim]\nbatch_size = 'big'\n", "optim.batch_size"),
    ("[optim]\nepochs = 5\n[spawn]\ntimes = [1, 7]\n", "spawn time 7.0"),
])
def test_bad_values_name_the_key_and_line(text, key):
    with pytest.raises(SpecError) as e:
        parse_spec(text, source="bad.toml")
    assert key in str(e.value) and "bad.toml:" in str(e.value)


def test_malformed_toml_is_one_clear_error():
    with pytest.raises(SpecError, match="malformed TOML"):
        parse_spec("[optim\nlr = 1", source="x.toml")


def test_missing_file():
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec("/nonexistent/spec.toml")


def test_variants_override_sections():
    spec = parse_spec("[optim]\nepochs = 4\nlr_drops = [3]\n[variants.large_batch.optim]\nbatch_size = 512\n")
    base, large = spec.run_configs()
    assert base.variant == "base" and large.variant == "large_batch"
    assert large.optim.batch_size == 512 and large.optim.epochs == 4


def test_examples_parse():
    from tests.conftest import REPO

    specs = {path.name: load_spec(path) for path in (REPO / "examples").glob("*.toml")}
    assert {"quick.toml", "fort2020-mnist1d.toml", "fort2020-mnist1d-quick.toml"} <= set(specs)
    assert all(s.probes for s in specs.values())  # every example measures something
    assert len({s.identity() for s in specs.values()}) == len(specs)


def test_a_params_cross_check_hook_is_called_with_every_value():
    """The hook documented in lsdb.spec: ``Params.cross_check(values) -> (key, message) | None``."""
    from dataclasses import dataclass, field

    from lsdb import spec as specmod

    seen = []

    @dataclass(frozen=True)
    class Params:
        lo: int = 0
        hi: int = field(default=10, metadata=specmod.between(0, 100))

        @staticmethod
        def cross_check(values):
            seen.append(dict(values))
            return None if values["lo"] < values["hi"] else ("lo", f"must be < hi = {values['hi']}")

    catalog = specmod.Catalog(datasets=("mnist1d",), models=("cnn1d",), probes={"toy": Params})
    spec = specmod.parse_spec("[probes.toy]\nlo = 3\n", "t.toml", catalog=catalog)
    assert seen[-1] == {"lo": 3, "hi": 10} and spec.probe_params() == {"toy": {"lo": 3}}
    with pytest.raises(SpecError, match=r"^t\.toml:3: probes\.toy\.lo = 12 must be < hi = 10$"):
        specmod.parse_spec("[probes.toy]\n# the low end\nlo = 12\n", "t.toml", catalog=catalog)
    with pytest.raises(SpecError, match=r"^t\.toml:2: probes\.toy\.hi = 101 must be in \[0, 100\]$"):
        specmod.parse_spec("[probes.toy]\nhi = 101\n", "t.toml", catalog=catalog)


@pytest.mark.parametrize("text, says", [
    ("[experiment]\nseeds = [2147483648]\n", "experiment.seeds = [2147483648] must be in [0, 2147483647]"),
    ("[experiment]\nname = ''\n", "experiment.name '' must be 1 to 200 printable characters"),
    ("[variants.'']\noptim.lr = 0.2\n", "variant name '' must be 1 to 200 printable characters"),
    ('[data]\nroot = "a\\u0000b"\n', "data.root = 'a\\x00b' must be a path of printable characters"),
    ("[data]\ntrain_subset = -1\n", "data.train_subset = -1 must be in [0, 1000000000] (0 = all)"),
    ("[experiment]\nseeds = [0, 1, 2, 3, 4, 5]\n[spawn]\ntimes = [1.0, 2.0]\nchildren = 10000\n",
     "the spec declares 120,006 runs (variants × seeds × (1 + spawn times × children)); lsdb plans at most 100,000"),
])
def test_spec_level_limits(text, says):
    with pytest.raises(SpecError) as e:
        parse_spec(text, source="l.toml")
    assert says in str(e.value) and str(e.value).startswith("l.toml")


def test_the_planner_refuses_what_the_data_cannot_give_or_no_machine_could_hold():
    from lsdb.plan import expand_runs

    with pytest.raises(SpecError, match=r"probe_set_size = 5000 is more than the 1437 training examples"):
        expand_runs(parse_spec("[data]\nname = 'digits'\nprobe_set_size = 5000\n"), 1437)
    many = ("[experiment]\nseeds = [" + ", ".join(map(str, range(5000))) + "]\n"
            "[checkpoints]\nevery_steps = 1\n[optim]\nepochs = 100\nlr_drops = []\n")
    with pytest.raises(SpecError, match=r"would hold up to .* checkpoints \(5000 seeds"):
        expand_runs(parse_spec(many), 1437)
