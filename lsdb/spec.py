"""The declarative experiment spec: TOML in, frozen dataclasses out.

A spec names the data, model, optimiser, seeds, checkpoint schedule, spawns, fine-tunes and probes
of an experiment. Unknown keys are errors that suggest the nearest valid key; bad values are errors that
name the key and its line. Identity is the sha256 of the canonical JSON with defaults left out, so
adding a default-valued key never changes an experiment's identity (pinned in tests/test_spec.py).

Every input ends in a ``Spec`` or in one ``SpecError`` whose message is a single line (keys and
values are escaped and shortened), never in another exception (fuzzed in tests/test_spec_fuzz.py).

How a probe's ``[probes.NAME]`` table is checked (its module's ``Params`` dataclass):

- each key must be a field of ``Params`` (or a ``ProbeSelection`` key), with the field's type;
- per-field rules are the field's metadata, built with ``check``, ``one_of``, ``between`` and
  ``positive`` below, e.g. ``points: int = field(default=21, metadata=between(2, MAX_POINTS))``;
  the error names ``probes.NAME.KEY``, its line and the valid values;
- rules across fields go in an optional hook on the class,
  ``Params.cross_check(values: dict) -> tuple[str, str] | None`` (a staticmethod or classmethod):
  it gets every field's value (the table's, defaults for the rest) and returns ``None`` when they
  fit together, else ``(key, message)``, reported as ``probes.NAME.KEY = VALUE MESSAGE`` at the
  key's line (the table's line when the key was left at its default). It must not raise.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lsdb.errors import SpecError
from lsdb.ids import non_default, sha256_json

# Limits on what one spec may ask for, checked at load (values beyond them overflow the
# arithmetic or could never finish). The planner adds limits on total work (lsdb.plan).
MAX_SEED = 2**31 - 1  # seeds are DuckDB INTEGER columns and torch generator seeds
MAX_EPOCHS = 1e6
MAX_WIDTH = 65536
MAX_DEPTH = 1000
MAX_COUNT = 10_000  # log-spaced checkpoints, spawn times, children per spawn time, PGD steps, seeds
MAX_EXAMPLES = 10**9  # subset sizes (beyond any data set lsdb loads; 0 usually means all)
MAX_BATCH = 10_000_000  # examples per mini-batch
MAX_STEPS = 10**9  # a step count or interval (the planner allows far fewer steps per run)
MAX_RUNS = 100_000  # runs one spec declares: variants × seeds × (1 + spawn times × children)
# checkpoints one seed's runs of one configuration hold, a parent and its children together
# (checked by lsdb.plan.check_work, which knows the steps per epoch)
MAX_CHECKPOINTS_PER_SEED = 1_000_000


def _num(x) -> str:
    """A bound as written in a message: integers in full, floats compactly."""
    return str(x) if isinstance(x, int) else f"{x:g}"


def check(predicate, message: str) -> dict:
    """Field metadata: ``predicate(value)`` must hold, else the error says ``key = value {message}``."""
    return {"check": predicate, "message": message}


def one_of(*values) -> dict:
    """Field metadata: the value (each item, for a tuple field) is one of ``values``."""
    allowed = ", ".join(map(str, values))

    def ok(v):
        return all(x in values for x in v) if isinstance(v, tuple) else v in values

    return check(ok, f"must be one of {allowed}")


def between(lo, hi, note: str = "") -> dict:
    """Field metadata: ``lo <= value <= hi`` (each item, for a tuple field)."""

    def ok(v):
        return all(lo <= x <= hi for x in v) if isinstance(v, tuple) else lo <= v <= hi

    return check(ok, f"must be in [{_num(lo)}, {_num(hi)}]{note}")


def positive(hi=None, note: str = "") -> dict:
    """Field metadata: ``0 < value`` (and ``<= hi`` when given)."""
    if hi is None:
        return check(lambda v: all(x > 0 for x in v) if isinstance(v, tuple) else v > 0, f"must be > 0{note}")

    def ok(v):
        return all(0 < x <= hi for x in v) if isinstance(v, tuple) else 0 < v <= hi

    return check(ok, f"must be in (0, {_num(hi)}]{note}")


def non_negative(hi=None, note: str = "") -> dict:
    """Field metadata: ``0 <= value`` (and ``<= hi`` when given)."""
    if hi is None:
        return check(lambda v: all(x >= 0 for x in v) if isinstance(v, tuple) else v >= 0, f"must be >= 0{note}")
    return between(0, hi, note)


FACTORY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
FACTORY_MESSAGE = "must be 'package.module:function' (the module importable where lsdb runs; see lsdb run --path)"
MAX_KWARGS = 64


def _factory_ok(v: str) -> bool:
    return v == "" or (len(v) <= 4 * MAX_PATH_PART and FACTORY.fullmatch(v) is not None)


def table_field() -> dict:
    """Field metadata: a TOML table of keyword arguments (scalars or lists of scalars), kept as
    sorted ``(key, value)`` pairs so the spec stays hashable and its identity stable."""
    return {"table": True}


MAX_PATH = 4095  # bytes of a path the OS takes (PATH_MAX less the terminating NUL)
MAX_PATH_PART = 255  # bytes of one folder or file name


def _path_ok(v: str) -> bool:
    try:
        b = v.encode()
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return v.isprintable() and len(b) <= MAX_PATH and all(len(p) <= MAX_PATH_PART for p in b.split(b"/"))


@dataclass(frozen=True)
class DataSpec:
    """Which data set, and the fixed probe set drawn from its training split."""

    name: str = "mnist1d"  # checked against the catalog of data sets at load
    probe_set_size: int = field(default=256, metadata=positive(1_000_000))
    probe_set_seed: int = field(default=0, metadata=between(0, MAX_SEED))
    train_subset: int = field(default=0, metadata=between(0, MAX_EXAMPLES, " (0 = all)"))
    root: str = field(default="", metadata=check(  # user-owned data on disk (cifar10)
        _path_ok, f"must be a path of printable characters, at most {MAX_PATH} bytes "
                               f"and {MAX_PATH_PART} per folder name"))
    # the researcher's own data: function(**kwargs) -> (x_train, y_train, x_test, y_test) or two
    # Datasets of (x, y); ``name`` is then ignored
    factory: str = field(default="", metadata=check(_factory_ok, FACTORY_MESSAGE))
    kwargs: tuple[tuple[str, Any], ...] = field(default=(), metadata=table_field())

    @property
    def label(self) -> str:
        """What rows call this data set: its name, or its factory."""
        return self.factory or self.name


@dataclass(frozen=True)
class ModelSpec:
    """Architecture. ``width`` is channels (CNN) or hidden units (MLP); ``depth`` counts hidden layers."""

    name: str = "cnn1d"  # checked against the catalog of models at load
    width: int = field(default=32, metadata=positive(MAX_WIDTH))
    depth: int = field(default=3, metadata=positive(MAX_DEPTH))
    kernels: tuple[int, ...] = field(default=(5, 3, 3), metadata=between(1, 1024))
    patches: int = field(default=1, metadata=positive(MAX_WIDTH))
    # the researcher's own network: function(input_shape, num_classes, **kwargs) -> nn.Module;
    # ``name``, ``width``, ``depth``, ``kernels`` and ``patches`` are then ignored
    factory: str = field(default="", metadata=check(_factory_ok, FACTORY_MESSAGE))
    kwargs: tuple[tuple[str, Any], ...] = field(default=(), metadata=table_field())

    @property
    def label(self) -> str:
        """What rows call this model: its name, or its factory."""
        return self.factory or self.name


@dataclass(frozen=True)
class OptimSpec:
    """SGD with momentum and a step learning-rate schedule (times in epochs)."""

    lr: float = field(default=0.1, metadata=positive())
    momentum: float = field(default=0.9, metadata=check(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    weight_decay: float = field(default=0.0, metadata=non_negative())
    batch_size: int = field(default=64, metadata=positive(MAX_BATCH))
    epochs: float = field(default=40.0, metadata=positive(MAX_EPOCHS))
    lr_drops: tuple[float, ...] = (30.0,)
    lr_drop_factor: float = field(default=0.1, metadata=positive())


@dataclass(frozen=True)
class TrainSpec:
    """Training options beyond the optimiser: adversarial augmentation and divergence detection."""

    adversarial: str = field(default="none", metadata=check(lambda v: v in ("none", "fgsm", "pgd"), "must be none, fgsm or pgd"))
    adv_epsilon: float = field(default=0.1, metadata=non_negative())
    adv_steps: int = field(default=5, metadata=positive(MAX_COUNT))
    adv_mix: float = field(default=0.5, metadata=check(lambda v: 0 <= v <= 1, "must be in [0, 1]"))
    chance_after_epochs: float = field(default=2.0, metadata=non_negative())


@dataclass(frozen=True)
class CheckpointSpec:
    """When to save. Log-spaced early (``log_points`` between step 1 and ``log_until`` epochs),
    then every ``every_epochs`` epochs and/or ``every_steps`` steps, plus any listed ``epochs``.
    Step 0, the final step and every spawn time are always saved."""

    log_points: int = field(default=8, metadata=between(0, MAX_COUNT))
    log_until: float = field(default=1.0, metadata=between(0, MAX_EPOCHS))
    every_epochs: float = field(default=1.0, metadata=non_negative(note=" (0 = off)"))
    every_steps: int = field(default=0, metadata=between(0, MAX_STEPS, " (0 = off)"))
    epochs: tuple[float, ...] = field(default=(), metadata=between(0, MAX_EPOCHS))


@dataclass(frozen=True)
class SpawnSpec:
    """Parent–child spawning (Frankle et al. 2020): at each time (epochs), ``children`` copies of the
    parent continue with different data order; ``lowlr_children`` continue at ``lr × lowlr_factor``."""

    times: tuple[float, ...] = ()
    children: int = field(default=2, metadata=between(0, MAX_COUNT))
    lowlr_children: int = field(default=0, metadata=between(0, MAX_COUNT))
    lowlr_factor: float = field(default=0.1, metadata=positive())
    child_checkpoints: str = field(default="schedule", metadata=check(
        lambda v: v in ("schedule", "final"), "must be 'schedule' (the parent's schedule after the spawn) or 'final'"))


RUN_SELECTIONS = ("all", "parents", "children", "lowlr_children", "finetunes")
CHECKPOINT_SELECTIONS = ("all", "final", "init_final", "spawn")


@dataclass(frozen=True)
class ProbeSelection:
    """Keys every ``[probes.NAME]`` table accepts besides the probe's own params: which runs and
    checkpoints the probe measures. A pair job is kept when all its checkpoints qualify."""

    on_runs: str = field(default="all", metadata=check(lambda v: v in RUN_SELECTIONS,
                                                        f"must be one of {', '.join(RUN_SELECTIONS)}"))
    on_checkpoints: str = field(default="all", metadata=check(lambda v: v in CHECKPOINT_SELECTIONS,
                                                               f"must be one of {', '.join(CHECKPOINT_SELECTIONS)}"))
    on_variants: tuple[str, ...] = ()  # empty = every variant


SELECTOR_KEYS = tuple(f.name for f in fields(ProbeSelection))


@dataclass(frozen=True)
class FinetuneSpec:
    """A fine-tune, ``[finetunes.NAME]``: one run per parent run of ``variant``, starting from its
    checkpoint at ``base`` (None = its final checkpoint, else an epoch of its training) with a fresh
    optimiser, ``steps`` SGD steps at the constant rate ``lr`` on a task: the training examples of
    ``classes`` (empty = every class), of which a fixed ``train_fraction`` drawn with
    ``fraction_seed``. ``momentum`` and ``batch_size`` None = the parent's. Task vectors and their
    arithmetic (``lsdb.probes.task_arithmetic``) compare these runs with their base."""

    name: str
    steps: int
    lr: float
    variant: str = "base"
    base: float | None = None
    classes: tuple[int, ...] = ()
    train_fraction: float = 1.0
    fraction_seed: int = 0
    momentum: float | None = None
    batch_size: int | None = None


@dataclass(frozen=True)
class _FinetuneTable:
    """The keys of a ``[finetunes.NAME]`` table and their rules, for ``build_dataclass`` (``base``
    is checked by hand: "final" or a number). Defaults here only give each key its type: ``steps``
    and ``lr`` are required, and ``momentum``, ``batch_size`` left out mean the parent's."""

    variant: str = "base"
    classes: tuple[int, ...] = field(default=(), metadata=between(0, MAX_SEED))
    train_fraction: float = field(default=1.0, metadata=check(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    fraction_seed: int = field(default=0, metadata=between(0, MAX_SEED))
    steps: int = field(default=1, metadata=positive(MAX_STEPS))
    lr: float = field(default=0.1, metadata=positive())
    momentum: float = field(default=0.9, metadata=check(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    batch_size: int = field(default=64, metadata=positive(MAX_BATCH))


FINETUNE_KEYS = ("variant", "base") + tuple(f.name for f in fields(_FinetuneTable) if f.name != "variant")


@dataclass(frozen=True)
class ExperimentSpec:
    name: str = "experiment"
    seeds: tuple[int, ...] = field(default=(0,), metadata=between(0, MAX_SEED))


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a parent run's trajectory, except the seed."""

    variant: str
    data: DataSpec
    model: ModelSpec
    optim: OptimSpec
    train: TrainSpec
    checkpoints: CheckpointSpec
    spawn: SpawnSpec


SECTIONS: dict[str, type] = {
    "experiment": ExperimentSpec,
    "data": DataSpec,
    "model": ModelSpec,
    "optim": OptimSpec,
    "train": TrainSpec,
    "checkpoints": CheckpointSpec,
    "spawn": SpawnSpec,
}
VARIANT_SECTIONS = ("model", "optim", "train", "checkpoints", "spawn")


@dataclass(frozen=True)
class Spec:
    experiment: ExperimentSpec = ExperimentSpec()
    data: DataSpec = DataSpec()
    model: ModelSpec = ModelSpec()
    optim: OptimSpec = OptimSpec()
    train: TrainSpec = TrainSpec()
    checkpoints: CheckpointSpec = CheckpointSpec()
    spawn: SpawnSpec = SpawnSpec()
    # probe name -> its params as given (validated against the probe's Params at load time)
    probes: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    # variant name -> section -> overrides
    variants: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    finetunes: tuple[FinetuneSpec, ...] = ()
    source: str = field(default="", compare=False)

    @property
    def name(self) -> str:
        return self.experiment.name

    def probe_params(self) -> dict[str, dict[str, Any]]:
        return {name: dict(items) for name, items in self.probes}

    def run_configs(self) -> list[RunConfig]:
        """The base configuration and one per variant (variants override whole keys of sections)."""
        base = {s: getattr(self, s) for s in VARIANT_SECTIONS}
        configs = [RunConfig("base", self.data, **base)]
        for vname, overrides in self.variants:
            sections = dict(base)
            for section, items in overrides:
                sections[section] = dataclasses.replace(base[section], **dict(items))
            configs.append(RunConfig(vname, self.data, **sections))
        return configs

    def canonical(self) -> dict[str, Any]:
        """The spec as plain data with every default left out (the input of ``identity``)."""
        out: dict[str, Any] = {}
        for section in SECTIONS:
            d = non_default(getattr(self, section))
            if d:
                out[section] = d
        if self.probes:
            out["probes"] = {name: dict(items) for name, items in self.probes}
        if self.variants:
            out["variants"] = {v: {s: dict(i) for s, i in items} for v, items in self.variants}
        if self.finetunes:
            out["finetunes"] = {f.name: {k: v for k, v in non_default(f).items() if k != "name"}
                                for f in self.finetunes}
        return out

    def identity(self) -> str:
        return sha256_json(self.canonical())


# ----------------------------------------------------------------------------------- parsing

@dataclass(frozen=True)
class Catalog:
    """What a spec may name: data sets, models, and probes with their ``Params`` dataclasses.

    The registries live above this module (``lsdb.train``, ``lsdb.probes``); ``lsdb.plan.load_spec``
    passes them in, so the spec module imports no part of lsdb that imports it back."""

    datasets: tuple[str, ...]
    models: tuple[str, ...]
    probes: Mapping[str, type]
    # classes of each built-in data set, to check a fine-tune's classes at load (a factory's data
    # are checked when the runs are planned)
    num_classes: Mapping[str, int] = field(default_factory=dict)


MAX_SPEC_BYTES = 16 * 2**20  # a spec is a page of TOML; a file beyond this is not one
MAX_NAME = 200  # characters of an experiment or variant name


def _show(text: str, limit: int = 80) -> str:
    """``text`` fit for a one-line message: control and line-breaking characters escaped, and
    shortened to ``limit`` characters."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _value(value: Any, limit: int = 120) -> str:
    """A value as a message shows it: its repr (one line: repr escapes line breaks), shortened."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        text = f"<{type(value).__name__}>"
    return _show(text, limit)


def _label(path: tuple[str, ...], key: str) -> str:
    return _show(".".join(path + (key,)), 120)


def load_spec(path: str | Path, catalog: Catalog | None) -> Spec:
    """Read and validate a spec file. ``catalog=None`` checks structure only (names of data sets,
    models and probe keys unchecked); ``lsdb.plan.load_spec`` checks everything."""
    path = Path(path)
    shown = _show(str(path), 200)
    try:
        if not path.exists():
            raise SpecError(f"{shown}: no such spec file")
        if path.is_dir():
            raise SpecError(f"{shown}: is a directory; give the spec's .toml file")
        with path.open("rb") as f:  # bounded: a device or pipe that never ends is refused, not read
            data = f.read(MAX_SPEC_BYTES + 1)
    except OSError as e:
        raise SpecError(f"{shown}: cannot read the spec ({_show(e.strerror or str(e))})") from None
    except ValueError as e:  # a path the OS cannot take (e.g. a NUL character)
        raise SpecError(f"{shown}: not a usable path ({_show(str(e))})") from None
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(f"{shown}: larger than {MAX_SPEC_BYTES // 2**20} MiB; a spec is a short TOML text file")
    if b"\x00" in data and not data.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 gets its own message
        raise SpecError(f"{shown}: not a text file (it contains NUL bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{shown}: not a UTF-8 text file (byte {e.start}); save the spec as UTF-8 TOML") from None
    return parse_spec(text, source=str(path), catalog=catalog)


def parse_spec(text: str, source: str = "<spec>", *, catalog: Catalog | None) -> Spec:
    """Validate TOML ``text`` into a ``Spec`` (see ``load_spec`` for ``catalog``)."""
    shown = _show(str(source), 200)
    if not isinstance(text, str):
        raise SpecError(f"{shown}: a spec is TOML text, not {type(text).__name__}")
    if "\x00" in text:
        raise SpecError(f"{shown}: not a text file (it contains NUL bytes)")
    text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark, as some editors write
    try:
        raw = tomllib.loads(text)
    except RecursionError:
        raise SpecError(f"{shown}: malformed TOML: nested too deeply") from None
    except ValueError as e:  # TOMLDecodeError, or an integer literal of more than 4300 digits
        raise SpecError(f"{shown}: malformed TOML: {_show(str(e), 200)}") from None
    where = _Locator(text, shown)
    _reject_unknown(raw, list(SECTIONS) + ["probes", "variants", "finetunes"], where, ())
    kwargs: dict[str, Any] = {"source": source}
    for section, cls in SECTIONS.items():
        table = raw.get(section, {})
        if not isinstance(table, dict):
            raise SpecError(f"{where.at((), section)}: [{section}] must be a table")
        kwargs[section] = build_dataclass(cls, table, where, (section,))
    kwargs["probes"] = _parse_probes(raw.get("probes", {}), where, catalog)
    kwargs["variants"] = _parse_variants(raw.get("variants", {}), kwargs, where)
    kwargs["finetunes"] = _parse_finetunes(raw.get("finetunes", {}), where)
    spec = Spec(**kwargs)
    _check_cross_fields(spec, where, catalog)
    return spec


def build_dataclass(cls, table: dict, where: "_Locator", path: tuple[str, ...], partial: bool = False,
                    extra_valid: tuple[str, ...] = ()):
    """Validate ``table`` against dataclass ``cls``: names, types and per-field checks."""
    known = {f.name: f for f in fields(cls)}
    _reject_unknown(table, list(known) + list(extra_valid), where, path)
    values = {}
    for key, value in table.items():
        if key not in known:  # one of extra_valid: checked by the caller
            continue
        f = known[key]
        values[key] = _coerce(value, f, where, path)
        check = f.metadata.get("check")
        if check and not check(values[key]):
            raise SpecError(f"{where.at(path, key)}: {_label(path, key)} = {_value(value)} {f.metadata['message']}")
    return values if partial else cls(**values)


def _coerce(value, f, where, path):
    default = f.default
    name = _label(path, f.name)
    want = type(default)
    if f.metadata.get("table"):
        return _coerce_table(value, name, where, path, f.name)
    if isinstance(default, tuple):
        if not isinstance(value, list):
            raise SpecError(f"{where.at(path, f.name)}: {name} must be a list, got {_value(value)}")
        hint = str(f.type)
        item = float if "float" in hint else int if "int" in hint else str
        return tuple(_coerce_scalar(v, item, name, where, path, f.name) for v in value)
    return _coerce_scalar(value, want, name, where, path, f.name)


def _coerce_table(value, name, where, path, key) -> tuple:
    if not isinstance(value, dict):
        raise SpecError(f"{where.at(path, key)}: {name} must be a table, e.g. {{ width = 64 }}, got {_value(value)}")
    if len(value) > MAX_KWARGS:
        raise SpecError(f"{where.at(path, key)}: {name} has {len(value)} entries; at most {MAX_KWARGS}")
    out = []
    for k, v in value.items():
        if not (isinstance(k, str) and k.isidentifier()):
            raise SpecError(f"{where.at(path, key)}: {name} key {_value(k)} is not a Python identifier")
        items = v if isinstance(v, list) else [v]
        if not all(isinstance(x, (str, int, float, bool)) for x in items) or len(items) > MAX_COUNT:
            raise SpecError(f"{where.at(path, key)}: {name}.{k} must be a number, string, boolean or a list of "
                            f"them, got {_value(v)}")
        if any(isinstance(x, float) and not math.isfinite(x) for x in items):
            raise SpecError(f"{where.at(path, key)}: {name}.{k} must be finite, got {_value(v)}")
        out.append((k, tuple(v) if isinstance(v, list) else v))
    return tuple(sorted(out))


def _coerce_scalar(value, want, name, where, path, key):
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            raise SpecError(f"{where.at(path, key)}: {name} = {_value(value)} is too large") from None
    if want is bool or isinstance(value, bool):
        if not isinstance(value, bool) or want is not bool:
            raise SpecError(f"{where.at(path, key)}: {name} must be {want.__name__}, got {_value(value)}")
    if not isinstance(value, want):
        raise SpecError(f"{where.at(path, key)}: {name} must be {want.__name__}, got {_value(value)}")
    if want is float and not math.isfinite(value):
        raise SpecError(f"{where.at(path, key)}: {name} must be finite, got {_value(value)}")
    return value


def _reject_unknown(table: dict, valid: list[str], where, path):
    for key in table:
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=1) if len(key) <= 4 * MAX_NAME else []
            hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(valid)}"
            raise SpecError(f"{where.at(path, key)}: unknown key '{_label(path, key)}'{hint}")


def _parse_probes(table, where, catalog: Catalog | None) -> tuple:
    """Each probe's table, checked against its Params and kept with defaults left out (so writing a
    default never changes the experiment's identity)."""
    if not isinstance(table, dict):
        raise SpecError(f"{where.at((), 'probes')}: [probes] must be a table of probe names")
    out = []
    for name, params in table.items():
        if catalog is not None and name not in catalog.probes:
            known = list(catalog.probes)
            near = difflib.get_close_matches(name, known, n=1) if len(name) <= 4 * MAX_NAME else []
            hint = f"did you mean '{near[0]}'?" if near else f"valid probes: {', '.join(known)}"
            raise SpecError(f"{where.at(('probes',), name)}: unknown probe '{_show(name)}'; {hint}")
        if not isinstance(params, dict):
            raise SpecError(f"{where.at(('probes',), name)}: [probes.{_show(name)}] must be a table")
        path = ("probes", name)
        selection = {k: v for k, v in params.items() if k in SELECTOR_KEYS}
        kept = _without_defaults(ProbeSelection, build_dataclass(ProbeSelection, selection, where, path,
                                                                 partial=True))
        rest = {k: v for k, v in params.items() if k not in SELECTOR_KEYS}
        if catalog is not None:
            cls = catalog.probes[name]
            values = build_dataclass(cls, rest, where, path, partial=True, extra_valid=SELECTOR_KEYS)
            _cross_check(cls, values, where, path)
            kept.update(_without_defaults(cls, values))
        else:
            kept.update(rest)
        out.append((name, tuple(sorted(kept.items(), key=lambda kv: kv[0]))))
    return tuple(out)


def _cross_check(cls, values: dict[str, Any], where, path: tuple[str, ...]) -> None:
    """Run ``cls.cross_check`` (module docstring) on the table's values, defaults filled in."""
    hook = getattr(cls, "cross_check", None)
    if hook is None:
        return
    full = {f.name: f.default for f in fields(cls) if f.default is not dataclasses.MISSING}
    full.update(values)
    found = hook(full)
    if found is None:
        return
    key, message = found
    at = where.at(path, key) if key in values else where.at(path[:-1], path[-1])
    raise SpecError(f"{at}: {_label(path, key)} = {_value(full.get(key))} {message}")


def _without_defaults(cls, values: dict[str, Any]) -> dict[str, Any]:
    defaults = {f.name: f.default for f in fields(cls)}
    return {k: v for k, v in values.items() if v != defaults.get(k, dataclasses.MISSING)}


def _check_name(name: str, what: str, at: str) -> None:
    """Experiment and variant names end up in tables, charts and messages: one printable line."""
    if not name or not name.isprintable() or len(name) > MAX_NAME:
        raise SpecError(f"{at}: {what} {_value(name)} must be 1 to {MAX_NAME} printable characters "
                        f"(no control characters or line breaks)")


def _parse_variants(table, sections, where) -> tuple:
    """Each variant's overrides, kept only where they differ from the base configuration."""
    if not isinstance(table, dict):
        raise SpecError(f"{where.at((), 'variants')}: [variants] must be a table of variant names")
    out = []
    for vname, body in table.items():
        at = where.at(("variants",), vname)
        if vname == "base":
            raise SpecError(f"{at}: 'base' is reserved for the unmodified configuration")
        _check_name(vname, "variant name", at)
        if not isinstance(body, dict):
            raise SpecError(f"{at}: [variants.{vname}] must be a table of sections, e.g. [variants.{vname}.optim]")
        _reject_unknown(body, list(VARIANT_SECTIONS), where, ("variants", vname))
        items = []
        for section, overrides in body.items():
            if not isinstance(overrides, dict):
                raise SpecError(f"{where.at(('variants', vname), section)}: [variants.{vname}.{section}] "
                                f"must be a table")
            values = build_dataclass(SECTIONS[section], overrides, where, ("variants", vname, section), partial=True)
            base = sections[section]
            values = {k: v for k, v in values.items() if v != getattr(base, k)}
            if values:
                items.append((section, tuple(sorted(values.items()))))
        out.append((vname, tuple(sorted(items))))
    return tuple(out)


def _parse_finetunes(table, where) -> tuple[FinetuneSpec, ...]:
    """Each ``[finetunes.NAME]`` table: known keys of the right types and ranges, ``steps`` and
    ``lr`` given, and a task (``classes`` and/or ``train_fraction`` < 1). What needs the rest of the
    spec (the variant, its epochs, the data set's classes) is checked in ``_check_finetunes``."""
    if not isinstance(table, dict):
        raise SpecError(f"{where.at((), 'finetunes')}: [finetunes] must be a table of fine-tune names, "
                        f"e.g. [finetunes.digits012]")
    if len(table) > MAX_COUNT:
        raise SpecError(f"{where.at((), 'finetunes')}: [finetunes] declares {len(table)} fine-tunes; "
                        f"at most {MAX_COUNT}")
    out = []
    for name, body in table.items():
        at = where.at(("finetunes",), name)
        _check_name(name, "fine-tune name", at)
        if not isinstance(body, dict):
            raise SpecError(f"{at}: [finetunes.{name}] must be a table, e.g. steps = 100, lr = 0.01, classes = [0, 1]")
        path = ("finetunes", name)
        _reject_unknown(body, list(FINETUNE_KEYS), where, path)
        values = build_dataclass(_FinetuneTable, body, where, path, partial=True, extra_valid=("base",))
        for key, what in (("steps", "steps = N, the fine-tune's optimiser steps"), ("lr", "lr = X, its learning rate")):
            if key not in values:
                raise SpecError(f"{at}: finetunes.{_show(name)} needs {what}")
        classes = values.get("classes", ())
        if len(set(classes)) != len(classes):
            twice = next(c for c in classes if classes.count(c) > 1)
            raise SpecError(f"{where.at(path, 'classes')}: {_label(path, 'classes')} lists class {twice} twice")
        if not classes and values.get("train_fraction", 1.0) == 1.0:
            raise SpecError(f"{at}: finetunes.{_show(name)} needs a task: classes = [...] (train on these classes' "
                            f"examples) and/or train_fraction < 1 (a fixed part of the training split)")
        values["classes"] = tuple(sorted(classes))  # a set of classes: [2, 0] is the task [0, 2]
        out.append(FinetuneSpec(name=name, base=_finetune_base(body.get("base", "final"), where, path), **values))
    return tuple(out)


def _finetune_base(value, where, path) -> float | None:
    """``base``: "final" (None) or an epoch of the parent's training, as a float."""
    if value == "final":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            epoch = float(value)
        except OverflowError:
            epoch = math.inf
        if math.isfinite(epoch) and 0 <= epoch <= MAX_EPOCHS:
            return epoch
    raise SpecError(f"{where.at(path, 'base')}: {_label(path, 'base')} = {_value(value)} must be 'final' or an epoch "
                    f"of the parent's training (a number >= 0)")


def _check_finetunes(spec: Spec, where, catalog: Catalog | None) -> int:
    """A fine-tune's variant exists, its base lies within that variant's training, and its classes
    are classes of a built-in data set; returns the runs the fine-tunes add (one per seed each)."""
    configs = {cfg.variant: cfg for cfg in spec.run_configs()}
    classes = None
    if catalog is not None and not spec.data.factory:
        classes = catalog.num_classes.get(spec.data.name)
    for ft in spec.finetunes:
        path = ("finetunes", ft.name)
        cfg = configs.get(ft.variant)
        if cfg is None:
            near = difflib.get_close_matches(ft.variant, list(configs), n=1) if len(ft.variant) <= MAX_NAME else []
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise SpecError(f"{where.at(path, 'variant')}: {_label(path, 'variant')} = {_value(ft.variant)} must name "
                            f"a variant of this spec, one of {_show(', '.join(configs), 400)}{hint}")
        if ft.base is not None and ft.base > cfg.optim.epochs:
            raise SpecError(f"{where.at(path, 'base')}: {_label(path, 'base')} = {ft.base:g} must be in "
                            f"[0, epochs = {cfg.optim.epochs:g}] (an epoch of the parent's training), or 'final'")
        bad = [c for c in ft.classes if classes is not None and c >= classes]
        if bad:
            raise SpecError(f"{where.at(path, 'classes')}: {_label(path, 'classes')} = {_value(list(ft.classes))} must "
                            f"name classes of {spec.data.name}, 0 to {classes - 1} (no class {bad[0]})")
    return len(spec.finetunes) * len(spec.experiment.seeds)


def _check_factory_keys(section, name: str, keys: tuple[str, ...], at: str) -> None:
    """With a factory, the built-in model's (data set's) keys would change the run id and nothing
    else: refuse them."""
    if not section.factory:
        return
    for key in keys:
        if getattr(section, key) != getattr(type(section)(), key):
            raise SpecError(f"{at}: {name}.{key} has no effect with {name}.factory; pass it in {name}.kwargs "
                            f"(the factory's keyword arguments)")


def _check_cross_fields(spec: Spec, where, catalog: Catalog | None):
    _check_name(spec.experiment.name, "experiment.name", where.at(("experiment",), "name"))
    if catalog is not None and not spec.data.factory and spec.data.name not in catalog.datasets:
        raise SpecError(f"{where.at(('data',), 'name')}: data.name = {_value(spec.data.name)} must be one of "
                        f"{', '.join(catalog.datasets)}")
    _check_factory_keys(spec.data, "data", ("name", "root"), where.at(("data",), "factory"))
    seeds = spec.experiment.seeds
    if not seeds:
        raise SpecError(f"{where.at(('experiment',), 'seeds')}: experiment.seeds must list at least one seed")
    if len(set(seeds)) != len(seeds):
        raise SpecError(f"{where.at(('experiment',), 'seeds')}: experiment.seeds lists a seed twice")
    if len(seeds) > MAX_COUNT:
        raise SpecError(f"{where.at(('experiment',), 'seeds')}: experiment.seeds lists {len(seeds)} seeds; "
                        f"at most {MAX_COUNT}")
    runs = 0
    for cfg in spec.run_configs():
        prefix = () if cfg.variant == "base" else ("variants", cfg.variant)
        if catalog is not None and not cfg.model.factory and cfg.model.name not in catalog.models:
            raise SpecError(f"{where.at(prefix + ('model',), 'name')}: model.name = {_value(cfg.model.name)} must be "
                            f"one of {', '.join(catalog.models)}")
        _check_factory_keys(cfg.model, "model", ("name", "width", "depth", "kernels", "patches"),
                            where.at(prefix + ("model",), "factory"))
        for t in cfg.spawn.times:
            if t < 0 or t >= cfg.optim.epochs:
                raise SpecError(f"{where.at(prefix + ('spawn',), 'times')}: spawn time {t} must be in "
                                f"[0, epochs = {cfg.optim.epochs})")
        times = len(set(cfg.spawn.times))
        if times > MAX_COUNT:
            raise SpecError(f"{where.at(prefix + ('spawn',), 'times')}: {times} spawn times; at most {MAX_COUNT}")
        for t in cfg.optim.lr_drops:
            if t <= 0 or t >= cfg.optim.epochs:
                raise SpecError(f"{where.at(prefix + ('optim',), 'lr_drops')}: lr drop at {t} must be in "
                                f"(0, epochs = {cfg.optim.epochs})")
        if not cfg.model.factory and cfg.model.name == "cnn1d" and len(cfg.model.kernels) != cfg.model.depth:
            raise SpecError(
                f"{where.at(prefix + ('model',), 'kernels')}: model.kernels has {len(cfg.model.kernels)} entries "
                f"but model.depth = {cfg.model.depth}; give one kernel size per conv layer"
            )
        # a spawn time without children still costs the planner a pass, so it counts as one
        runs += len(seeds) * (1 + times * max(1, cfg.spawn.children + cfg.spawn.lowlr_children))
    finetunes = _check_finetunes(spec, where, catalog)
    if runs + finetunes > MAX_RUNS:
        raise SpecError(f"{where.source}: the spec declares {runs + finetunes:,} runs (variants × seeds × (1 + spawn "
                        f"times × children){', and fine-tunes × seeds' if finetunes else ''}); lsdb plans at most "
                        f"{MAX_RUNS:,}")
    variants = ["base"] + [v for v, _ in spec.variants]
    for name, params in spec.probes:
        chosen = dict(params).get("on_variants", ())
        unknown = [v for v in chosen if v not in variants]
        if unknown:
            near = difflib.get_close_matches(unknown[0], variants, n=1) if len(unknown[0]) <= MAX_NAME else []
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise SpecError(f"{where.at(('probes', name), 'on_variants')}: {_label(('probes', name), 'on_variants')} = "
                            f"{_value(list(chosen))} must name variants of this spec, one of "
                            f"{_show(', '.join(variants), 400)} (no variant {_value(unknown[0])}{hint})")


class _Locator:
    """Finds the line of ``key`` inside table ``path`` of the TOML text, for error messages."""

    # a table header, [a.b] or [[a.b]]; written so that matching is linear in the line's length
    # (lines inside multi-line strings are scanned too)
    _HEADER = re.compile(r"\s*\[\[?([^\[\]]*)\]")

    def __init__(self, text: str, source: str):
        self.lines = text.splitlines()
        self.source = source

    def at(self, path: tuple[str, ...], key: str) -> str:
        table: tuple[str, ...] = ()
        assign = re.compile(r"^\s*(" + re.escape(key) + r'|"' + re.escape(key) + r'")\s*=')
        for number, line in enumerate(self.lines, 1):
            m = self._HEADER.match(line)
            if m:
                table = tuple(p.strip().strip('"') for p in m.group(1).split("."))
                if table == path + (key,):
                    return f"{self.source}:{number}"
                continue
            if table == path and assign.match(line):
                return f"{self.source}:{number}"
            dotted = ".".join(path[len(table):] + (key,)) if path[: len(table)] == table else None
            if dotted and re.match(r"^\s*" + re.escape(dotted) + r"\s*=", line):
                return f"{self.source}:{number}"
        return self.source
