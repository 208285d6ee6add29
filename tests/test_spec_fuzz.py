"""Fuzzing the spec loader: every input ends in a Spec (and a plan) or in one single-line
SpecError, quickly; never in another exception, a hang or a plan of absurd size.

(a) Hypothesis documents built from the real schema (sections, probes and their params, variants)
    with values of every TOML type, extreme numbers and unicode, plus raw text and bytes;
(b) regression cases for what was reproduced by hand and what the fuzzing found;
(c) the installed ``lsdb plan`` on nasty files: exit code 1 and one ``error:`` line on stderr.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("hypothesis", reason="the test extra: pip install -e '.[test]'")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lsdb.errors import SpecError  # noqa: E402
from lsdb.plan import expand_runs, load_spec, parse_spec  # noqa: E402
from lsdb.probes import PARAMS, PROBES  # noqa: E402
from lsdb.spec import SECTIONS, SELECTOR_KEYS, VARIANT_SECTIONS  # noqa: E402
from tests.conftest import lsdb_cmd  # noqa: E402
from tests.timeouts import hang_timeout  # noqa: E402

N_TRAIN = (1437, 4000, 60000, 1)
DEADLINE_MS = 5000  # per example; the loader itself takes milliseconds
HARD_LIMIT_S = 30  # a hang fails the test instead of stalling the suite

EXAMPLES = int(os.environ.get("LSDB_FUZZ_EXAMPLES", "200"))  # raise it for a longer hunt
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=DEADLINE_MS,
    database=None,  # no example database (.hypothesis/ keeps only caches, and ignores itself in git)
    derandomize=bool(os.environ.get("CI")),  # CI replays the same examples every run
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


@pytest.fixture(autouse=True, scope="module")
def _warm():
    parse_spec("[probes.eval]\n")  # import torch and every probe once, outside the deadlines
    for name in PROBES:
        PARAMS[name]


@contextmanager
def hard_limit(seconds: float):
    def fail(*_):
        raise TimeoutError(f"no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def one_line(e: SpecError) -> str:
    msg = str(e)
    assert msg and msg.strip() == msg and len(msg.splitlines()) == 1, repr(msg)
    return msg


def outcome(text: str, n_train: int = 1437):
    """Load ``text`` and plan its runs: the runs, or the SpecError's message (checked one line)."""
    with hard_limit(HARD_LIMIT_S):
        try:
            spec = parse_spec(text, source="fuzz.toml")
            return expand_runs(spec, n_train)
        except SpecError as e:
            return one_line(e)


# ------------------------------------------------------------------------------ TOML writing

class Raw(str):
    """A TOML literal written as is (dates, times, special floats)."""


def toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else toml_string(k)


def toml_string(s: str) -> str:
    # JSON's escapes are TOML's; TOML also forbids a raw DEL in a basic string
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_value(v) -> str:
    if isinstance(v, Raw):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else "inf" if v == math.inf else "-inf" if v == -math.inf else repr(v)
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def toml_document(doc: dict) -> str:
    """Tables as [headers] (dotted for nested tables), everything else as values."""
    lines: list[str] = []

    def table(prefix: tuple[str, ...], d: dict):
        plain = {k: v for k, v in d.items() if not isinstance(v, dict)}
        nested = {k: v for k, v in d.items() if isinstance(v, dict)}
        if prefix and (plain or not nested):
            lines.append("[" + ".".join(toml_key(k) for k in prefix) + "]")
        lines.extend(f"{toml_key(k)} = {toml_value(v)}" for k, v in plain.items())
        for k, v in nested.items():
            table(prefix + (k,), v)

    table((), doc)
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- strategies

WORDS = ["auto", "vmap", "fused", "loop", "final", "all", "trace", "full", "sum_logits", "residual", "gap",
         "deflated", "hutch++", "hutchinson", "double_backward", "fwd_rev", "float32", "float64", "structured",
         "jacobian", "ntvp", "linearised", "kernel_regression", "fixed", "kernel_scaled", "init", "next",
         "siblings", "spawn_final", "parents", "children", "lowlr_children", "init_final", "spawn", "schedule",
         "none", "fgsm", "pgd", "mnist1d", "digits", "cifar10", "cnn1d", "cnn2d", "mlp", "patchnet", "qpatchnet", "base",
         "a@1 b@final", "", " ", "fulll", "hutch", "gapp"]
EDGE_INTS = [0, 1, 2, 3, -1, 10, 21, 1000, 1001, 1002, 10_000, 10_001, 10_002, 100_000, 10**6, 10**9, 2**31 - 1,
             2**31, 2**53, 2**62, 2**63 - 1, -(2**63), 10**30, -(10**30)]
EDGE_FLOATS = [0.0, -0.0, 1e-9, 1e-300, 5e-324, 0.5, 1.0, 2.0, 40.0, 1e6, 1e9, 1e308, 1.79e308, -1.0, -1e308,
               math.inf, -math.inf]

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
keys = st.one_of(st.sampled_from(WORDS), text)
ints = st.one_of(st.sampled_from(EDGE_INTS), st.integers(-100, 100_000), st.integers(-(10**40), 10**40))
floats = st.one_of(st.sampled_from(EDGE_FLOATS), st.floats(allow_nan=False), st.floats(-100, 1000))
raws = st.sampled_from([Raw("1979-05-27"), Raw("07:32:00"), Raw("1979-05-27T07:32:00Z"),
                        Raw("1979-05-27T00:32:00.999999-07:00"), Raw("0x7fffffff"), Raw("0o777"), Raw("0b101"),
                        Raw("+inf"), Raw("1_000"), Raw("'literal'"), Raw("'''multi\nline'''")])
scalars = st.one_of(st.booleans(), ints, floats, st.sampled_from(WORDS), text, raws)
anything = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(keys, inner, max_size=3)),
                        max_leaves=8)


def typed_values(f: dataclasses.Field):
    """Values of the field's type, edge cases included."""
    default = f.default
    hint = str(f.type)
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.one_of(st.just(default), ints)
    if isinstance(default, float):
        return st.one_of(st.just(default), floats, ints)
    if isinstance(default, str):
        return st.one_of(st.just(default), st.sampled_from(WORDS), text)
    if isinstance(default, tuple):
        item = floats if "float" in hint else ints if "int" in hint else st.sampled_from(WORDS)
        return st.one_of(st.just(list(default)), st.lists(item, max_size=5))
    return anything


def valid_values(f: dataclasses.Field):
    """Values the field's own check accepts (else its default), so documents get past the loader
    to the cross-field checks and the planner."""
    ok = f.metadata.get("check", lambda v: True)
    default = f.default

    def fix(v):
        t = tuple(v) if isinstance(v, list) else float(v) if isinstance(default, float) and isinstance(v, int) else v
        try:
            good = type(t) is type(default) and (not isinstance(t, float) or math.isfinite(t)) and ok(t)
        except Exception:
            good = False
        return v if good else (list(default) if isinstance(default, tuple) else default)

    return typed_values(f).map(fix)


def wild_values(f: dataclasses.Field | None):
    """Anything at all, often of the right type but out of range."""
    return anything if f is None else st.one_of(typed_values(f), anything)


@st.composite
def table_for(draw, cls, extra: tuple[str, ...] = ()):
    known = [f for f in dataclasses.fields(cls)]
    chosen = draw(st.lists(st.sampled_from(known), unique_by=lambda f: f.name, max_size=6)) if known else []
    out = {f.name: draw(valid_values(f)) for f in chosen}
    if extra and draw(st.booleans()):
        out[draw(st.sampled_from(extra))] = draw(st.one_of(st.sampled_from(WORDS), st.lists(st.sampled_from(WORDS),
                                                                                              max_size=3)))
    return out


@st.composite
def spec_documents(draw):
    """A document of the real schema with valid-looking values, then a few wild mutations."""
    doc: dict = {}
    tables: list[tuple[dict, type | None]] = []  # (table, its dataclass) for the mutations
    for section, cls in SECTIONS.items():
        if draw(st.booleans()):
            doc[section] = draw(table_for(cls))
            tables.append((doc[section], cls))
    if draw(st.booleans()):
        names = draw(st.lists(st.sampled_from(list(PROBES)), unique=True, max_size=4))
        doc["probes"] = {n: draw(table_for(PARAMS[n], SELECTOR_KEYS)) for n in names}
        tables += [(doc["probes"][n], PARAMS[n]) for n in names]
    if draw(st.integers(0, 3)) == 0:
        doc["variants"] = {}
        for vname in draw(st.lists(st.one_of(st.sampled_from(["wide", "v-2", "base", "ünï"]), keys), unique=True,
                                   max_size=3)):
            sections = draw(st.lists(st.sampled_from(VARIANT_SECTIONS), unique=True, max_size=3))
            doc["variants"][vname] = {s: draw(table_for(SECTIONS[s])) for s in sections}
            tables += [(doc["variants"][vname][s], SECTIONS[s]) for s in sections]
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 3]))):
        kind = draw(st.integers(0, 9))
        if kind == 0:  # a stray top-level key, or a section of the wrong type
            doc[draw(st.one_of(st.sampled_from(list(SECTIONS) + ["probes", "variants"]), keys))] = draw(scalars)
        elif kind == 1 and doc.get("probes"):  # a probe table of the wrong type, or an unknown probe
            doc["probes"][draw(st.one_of(st.sampled_from(list(PROBES)), keys))] = draw(anything)
        elif tables:
            table, cls = draw(st.sampled_from(tables))
            fields = {f.name: f for f in dataclasses.fields(cls)} if cls else {}
            key = draw(st.one_of(st.sampled_from(sorted(fields)), keys)) if fields else draw(keys)
            table[key] = draw(wild_values(fields.get(key)))
    return doc


LINES = st.one_of(
    st.sampled_from(["[optim]", "[probes.slice]", "[probes.hessian]", "[[experiment]]", "[variants.v.optim]",
                     "[checkpoints", "]]", "[", "epochs = ", "a = [", "]", "a = {", "}", '"""', "'''", "#", "=",
                     "[probes]", "probes.ntk.variant = 'full'", "optim.epochs = 1e9", "spawn.times = [1, 2]"]),
    st.builds(lambda k, v: f"{toml_key(k)} = {toml_value(v)}", st.one_of(st.sampled_from(WORDS), text), anything),
    text,
)


# ------------------------------------------------------------------------------ (a) fuzzing

@FUZZ
@given(doc=spec_documents(), n_train=st.sampled_from(N_TRAIN))
def test_schema_documents_load_and_plan_or_fail_with_one_line(doc, n_train):
    outcome(toml_document(doc), n_train)


@FUZZ
@given(lines=st.lists(LINES, max_size=12))
def test_toml_like_text_loads_or_fails_with_one_line(lines):
    outcome("\n".join(lines))


@FUZZ
@given(raw=st.text(max_size=200))
def test_random_text_loads_or_fails_with_one_line(raw):
    outcome(raw)


@settings(FUZZ, max_examples=max(1, EXAMPLES * 3 // 4))
@given(data=st.one_of(st.binary(max_size=300),
                      st.builds(lambda t, enc: t.encode(enc, errors="replace"),
                                st.lists(LINES, max_size=6).map("\n".join),
                                st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-32", "latin-1"]))))
def test_random_files_load_or_fail_with_one_line(data):
    with tempfile.TemporaryDirectory() as tmp, hard_limit(HARD_LIMIT_S):
        path = Path(tmp) / "spec.toml"
        path.write_bytes(data)
        try:
            expand_runs(load_spec(path), 1437)
        except SpecError as e:
            one_line(e)


@st.composite
def finetune_documents(draw):
    """Digits (whose labels load fast) with [finetunes.NAME] tables of the real keys, valid-looking
    values, a "base" of any kind, then wild keys and values, and now and then no table at all."""
    from lsdb.spec import FINETUNE_KEYS, _FinetuneTable

    doc: dict = {"data": {"name": "digits", "probe_set_size": 8}, "optim": {"epochs": 2.0, "lr_drops": [1.0]}}
    if draw(st.booleans()):
        doc["variants"] = {"wide": {"model": {"width": 8}}}
    doc["finetunes"] = {}
    for name in draw(st.lists(st.one_of(st.sampled_from(["a", "b-2", "ünï", "base"]), keys), unique=True, max_size=3)):
        table = draw(table_for(_FinetuneTable))
        if draw(st.integers(0, 3)) > 0:  # mostly what a fine-tune needs, so that many get planned
            table.setdefault("steps", 3)
            table.setdefault("lr", 0.05)
            table["classes"] = draw(st.lists(st.integers(0, 9), unique=True, max_size=4))
        if draw(st.booleans()):
            table["base"] = draw(st.one_of(st.sampled_from(["final", 0, 1, 1.5, 2, 2.0]), floats, ints,
                                           st.sampled_from(WORDS)))
        if draw(st.integers(0, 3)) == 3:
            table[draw(st.one_of(st.sampled_from(FINETUNE_KEYS), keys))] = draw(anything)
        doc["finetunes"][name] = table
    if draw(st.integers(0, 9)) == 9:
        doc["finetunes"] = draw(anything)
    return doc


@FUZZ
@given(doc=finetune_documents())
def test_finetune_documents_load_and_plan_or_fail_with_one_line(doc):
    outcome(toml_document(doc), 1437)


# ------------------------------------------------------------------------------ (b) regressions

def refused(text: str, *fragments: str, n_train: int = 1437) -> str:
    t0 = time.perf_counter()
    got = outcome(text, n_train)
    assert isinstance(got, str), f"planned {len(got)} runs; expected a SpecError"
    assert time.perf_counter() - t0 < 5, "took too long"
    for f in fragments:
        assert f in got, got
    return got


@pytest.mark.parametrize("text, fragments", [
    # reproduced by hand (issue): each loaded, then looped, hung or crashed
    ("[checkpoints]\nevery_epochs = 1e-9\n", ["checkpoints per run", "at most 100,000"]),
    ("[optim]\nepochs = 1e9\n", ["optim.epochs = 1000000000.0 must be in (0, 1e+06]"]),
    ("[checkpoints]\nlog_points = 1e9\n", ["checkpoints.log_points must be int"]),
    ("[checkpoints]\nlog_points = 1000000000\n", ["checkpoints.log_points = 1000000000 must be in [0, 10000]"]),
    ("[optim]\nepochs = 1.79e308\n", ["optim.epochs = 1.79e+308 must be in"]),
    ("[optim]\nepochs = 179769313486231570000000000000000000000000000000000000000000000000000000000000000000"
     "00000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
     "00000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
     "0000000000000000000000000000000000000000000000000\n", ["optim.epochs = ", "too large"]),
    ("[probes.ntk]\nvariant = 3\n", ["probes.ntk.variant must be str, got 3"]),
    ("[variants.v.optim]\nlr = 'fast'\n", ["variants.v.optim.lr must be float"]),
    ("a = " + "[" * 5000 + "]" * 5000 + "\n", ["malformed TOML: nested too deeply"]),
    ("a = " + "{b = " * 3000 + "1" + "}" * 3000 + "\n", ["malformed TOML: nested too deeply"]),
    ("[optim]\nlr = " + "[" * 50 + "]" * 50 + "\n", ["optim.lr must be float"]),
    ("[experiment]\nseeds = [4611686018427387904]\n", ["experiment.seeds", "[0, 2147483647]"]),
    ("[probes.slice]\nsubset_seed = 4611686018427387904\n", ["probes.slice.subset_seed", "[0, 2147483647]"]),
    ("[probes.slice]\npoints_2d = 1000000000\n", ["probes.slice.points_2d = 1000000000 must be in [2, 1001]"]),
    ("[probes.hessian]\nmax_iter = 1000000000\n", ["probes.hessian.max_iter", "[1, 100000]"]),
    ("[probes.flatness]\ndirections = 1000000000\n", ["probes.flatness.directions", "[1, 10000]"]),
    # found by the fuzzing, or by reading the loader
    ("[optim]\nepochs = " + "9" * 5000 + "\n", ["malformed TOML", "4300 digits"]),
    ("[optim]\nepochs = 1e-9\nlr_drops = []\n", ["training steps, which rounds to none"]),
    ("[optim]\nlr = nan\n", ["optim.lr must be finite, got nan"]),
    ("[optim]\nlr = -inf\n", ["optim.lr must be finite, got -inf"]),
    ("[optim]\nepochs = 2024-01-01\n", ["optim.epochs must be float, got datetime.date(2024, 1, 1)"]),
    ('["a\\nb"]\nx = 1\n', ["unknown key 'a\\nb'"]),
    ('[optim]\n"lr\\r\\u2028" = 1\n', ["unknown key 'optim.lr\\r\\u2028'"]),
    ('[experiment]\nname = "two\\nlines"\n', ["experiment.name 'two\\nlines' must be 1 to 200 printable"]),
    ('[variants."v\\n"]\noptim.lr = 1.0\n', ["variant name 'v\\n'"]),
    ("[data]\ntrain_subset = " + str(10**30) + "\n", ["data.train_subset", "[0, 1000000000]"]),
    ("[checkpoints]\nevery_steps = " + str(10**30) + "\n", ["checkpoints.every_steps", "[0, 1000000000]"]),
    ("[spawn]\ntimes = [1, 2, 3, 4, 5]\nchildren = 9000\n[experiment]\nseeds = [1, 2, 3]\n",
     ["declares 135,003 runs", "at most 100,000"]),
    ("[experiment]\nseeds = [" + ", ".join(map(str, range(10_001))) + "]\n", ["10001 seeds; at most 10000"]),
    ("[probes.barrier]\npairs = ['x@1 y@z']\n", ["probes.barrier.pairs", "RUN@STEP RUN@STEP"]),
    ("[probes.eval]\non_variants = ['nope']\n", ["probes.eval.on_variants", "one of base"]),
])
def test_regressions(text, fragments):
    refused(text, *fragments)


def test_a_long_line_inside_a_string_does_not_slow_the_error_down():
    # the header pattern of the line locator once backtracked quadratically on such lines
    for line in ("[" * 200_000, "[a" + " " * 200_000, "[" + " " * 200_000 + "x"):
        msg = refused(f'[experiment]\nname = """\n{line}\n"""\n[optim]\nlr = -1\n', "optim.lr = -1 must be > 0")
        assert msg.startswith("fuzz.toml:6: ")


def test_a_huge_key_or_value_gives_a_short_message():
    msg = refused(f'[optim]\n"{"k" * 100_000}" = 1\n', "unknown key 'optim.kkk")
    assert len(msg) < 400
    msg = refused(f'[optim]\nlr = "{"x" * 100_000}"\n', "optim.lr must be float, got 'xxx")
    assert len(msg) < 400


def test_a_byte_order_mark_is_not_an_error(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes("[optim]\nlr = 0.2\n".encode("utf-8-sig"))
    assert load_spec(path).optim.lr == 0.2


@pytest.mark.parametrize("make, says", [
    (lambda d: d, "is a directory"),
    (lambda d: d / "missing.toml", "no such spec file"),
    (lambda d: _write(d / "bin.toml", bytes(range(256)) * 4), "not a text file"),
    (lambda d: _write(d / "u16.toml", "[optim]\nlr = 0.2\n".encode("utf-16")), "not a UTF-8 text file"),
    (lambda d: _write(d / "big.toml", b"# " + b"x" * (16 * 2**20)), "larger than 16 MiB"),
    (lambda d: Path("/dev/zero"), "larger than 16 MiB"),
    (lambda d: d / ("x" * 5000), "spec"),
    (lambda d: d / "nul\x00.toml", "spec"),
])
def test_files_that_are_not_specs(tmp_path, make, says):
    path = make(tmp_path)
    if str(path) == "/dev/zero" and not path.exists():
        pytest.skip("no /dev/zero")
    with hard_limit(HARD_LIMIT_S), pytest.raises(SpecError) as e:
        load_spec(path)
    assert says in one_line(e.value)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_the_planner_schedule_is_bounded_before_it_is_built():
    from lsdb import plan

    text = "[optim]\nepochs = 1000\nlr_drops = []\n[checkpoints]\nevery_steps = 1\n"
    refused(text, f"at most {plan.MAX_CHECKPOINTS_PER_RUN:,}", n_train=60000)
    refused("[optim]\nepochs = 1000000\nlr_drops = []\n", f"at most {plan.MAX_STEPS_PER_RUN:,}", n_train=60000)
    # each run is within limits, but a seed's children together are not (it once planned 2e8 checkpoints)
    dense = ("[experiment]\nseeds = [0, 1, 2, 3, 4]\n[spawn]\ntimes = [0.0, 1.0, 2.0, 3.0, 4.0]\nchildren = 3999\n"
             "[checkpoints]\nevery_steps = 1\n[optim]\nbatch_size = 1000\n")
    refused(dense, "19,995 children would hold up to 4.91e+07 checkpoints", "at most 1,000,000 per seed",
            n_train=60000)
    final = dense.replace("every_steps = 1", "every_steps = 0")
    final = final.replace("[spawn]", "[spawn]\nchild_checkpoints = 'final'")
    assert len(outcome(final, 60000)) == 99_980  # as the message suggests


# ------------------------------------------------------------------------------ (c) the CLI

NASTY = {
    "binary": lambda d: _write(d / "binary.toml", os.urandom(64) + b"\x00\xff"),
    "utf16": lambda d: _write(d / "utf16.toml", "[optim]\nepochs = 5\n".encode("utf-16")),
    "directory": lambda d: d,
    "absurd_epochs": lambda d: _write(d / "epochs.toml", b"[optim]\nepochs = 1e9\n"),
    "overflowing_epochs": lambda d: _write(d / "overflow.toml", b"[optim]\nepochs = 1.79e308\n"),
    "billion_point_slice": lambda d: _write(d / "slice.toml", b"[probes.slice]\npoints_1d = 1000000000\n"),
    "seed_2_62": lambda d: _write(d / "seed.toml", b"[experiment]\nseeds = [4611686018427387904]\n"),
    "deep_nesting": lambda d: _write(d / "deep.toml", b"a = " + b"[" * 10_000 + b"]" * 10_000 + b"\n"),
    "newline_key": lambda d: _write(d / "key.toml", b'[optim]\n"a\\nb" = 1\n'),
    # loads, then the planner refuses its schedule (digits: data shipped with scikit-learn)
    "endless_schedule": lambda d: _write(d / "schedule.toml", b"[data]\nname = 'digits'\n[model]\nname = 'mlp'\n"
                                                              b"[checkpoints]\nevery_epochs = 1e-9\n"),
}


def test_lsdb_plan_refuses_nasty_specs_with_one_error_line(tmp_path, cli_env):
    procs = {}
    for name, make in NASTY.items():  # all at once: each process imports torch
        case = tmp_path / name
        case.mkdir()
        spec = make(case)
        procs[name] = subprocess.Popen(lsdb_cmd() + ["plan", str(spec), "--store", str(tmp_path / "store")],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env,
                                       errors="replace")
    wrong = []
    for name, p in procs.items():
        try:
            _out, err = p.communicate(timeout=hang_timeout(240))
        except subprocess.TimeoutExpired:
            p.kill()
            wrong.append(f"{name}: no answer after {hang_timeout(240):.0f} s")
            continue
        lines = [line for line in err.splitlines() if line.strip()]
        if p.returncode != 1 or len(lines) != 1 or not lines[0].startswith("error:") or "Traceback" in err:
            wrong.append(f"{name}: exit {p.returncode}, stderr {err[-1500:]!r}")
    assert not wrong, "\n".join(wrong)
    assert not (tmp_path / "store").exists()  # planning creates nothing
