"""The declarative experiment spec: TOML in, frozen dataclasses out.

A spec names the data, model, optimiser, seeds, checkpoint schedule, spawns and probes of an
experiment. Unknown keys are errors that suggest the nearest valid key; bad values are errors that
name the key and its line. Identity is the sha256 of the canonical JSON with defaults left out, so
adding a default-valued key never changes an experiment's identity (pinned in tests/test_spec.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lsdb.errors import SpecError

DATASETS = ("mnist1d", "digits", "cifar10")
MODELS = ("cnn1d", "cnn2d", "mlp", "patchnet")


def _positive(v):
    return v > 0


def _non_negative(v):
    return v >= 0


def _check(predicate, message):
    return {"check": predicate, "message": message}


@dataclass(frozen=True)
class DataSpec:
    """Which data set, and the fixed probe set drawn from its training split."""

    name: str = field(default="mnist1d", metadata=_check(lambda v: v in DATASETS, f"must be one of {', '.join(DATASETS)}"))
    probe_set_size: int = field(default=256, metadata=_check(_positive, "must be a positive integer"))
    probe_set_seed: int = 0
    train_subset: int = field(default=0, metadata=_check(_non_negative, "must be >= 0 (0 = all)"))
    root: str = ""  # user-owned data on disk (cifar10)


@dataclass(frozen=True)
class ModelSpec:
    """Architecture. ``width`` is channels (CNN) or hidden units (MLP); ``depth`` counts hidden layers."""

    name: str = field(default="cnn1d", metadata=_check(lambda v: v in MODELS, f"must be one of {', '.join(MODELS)}"))
    width: int = field(default=32, metadata=_check(_positive, "must be a positive integer"))
    depth: int = field(default=3, metadata=_check(_positive, "must be a positive integer"))
    kernels: tuple[int, ...] = (5, 3, 3)
    patches: int = field(default=1, metadata=_check(_positive, "must be a positive integer"))


@dataclass(frozen=True)
class OptimSpec:
    """SGD with momentum and a step learning-rate schedule (times in epochs)."""

    lr: float = field(default=0.1, metadata=_check(_positive, "must be > 0"))
    momentum: float = field(default=0.9, metadata=_check(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    weight_decay: float = field(default=0.0, metadata=_check(_non_negative, "must be >= 0"))
    batch_size: int = field(default=64, metadata=_check(_positive, "must be a positive integer"))
    epochs: float = field(default=40.0, metadata=_check(_positive, "must be > 0"))
    lr_drops: tuple[float, ...] = (30.0,)
    lr_drop_factor: float = field(default=0.1, metadata=_check(_positive, "must be > 0"))


@dataclass(frozen=True)
class TrainSpec:
    """Training options beyond the optimiser: adversarial augmentation and divergence detection."""

    adversarial: str = field(default="none", metadata=_check(lambda v: v in ("none", "fgsm", "pgd"), "must be none, fgsm or pgd"))
    adv_epsilon: float = field(default=0.1, metadata=_check(_non_negative, "must be >= 0"))
    adv_steps: int = field(default=5, metadata=_check(_positive, "must be a positive integer"))
    adv_mix: float = field(default=0.5, metadata=_check(lambda v: 0 <= v <= 1, "must be in [0, 1]"))
    chance_after_epochs: float = field(default=2.0, metadata=_check(_non_negative, "must be >= 0"))


@dataclass(frozen=True)
class CheckpointSpec:
    """When to save. Log-spaced early (``log_points`` between step 1 and ``log_until`` epochs),
    then every ``every_epochs`` epochs and/or ``every_steps`` steps, plus any listed ``epochs``.
    Step 0, the final step and every spawn time are always saved."""

    log_points: int = field(default=8, metadata=_check(_non_negative, "must be >= 0"))
    log_until: float = field(default=1.0, metadata=_check(_non_negative, "must be >= 0"))
    every_epochs: float = field(default=1.0, metadata=_check(_non_negative, "must be >= 0 (0 = off)"))
    every_steps: int = field(default=0, metadata=_check(_non_negative, "must be >= 0 (0 = off)"))
    epochs: tuple[float, ...] = ()


@dataclass(frozen=True)
class SpawnSpec:
    """Parent–child spawning (Frankle et al. 2020): at each time (epochs), ``children`` copies of the
    parent continue with different data order; ``lowlr_children`` continue at ``lr × lowlr_factor``."""

    times: tuple[float, ...] = ()
    children: int = field(default=2, metadata=_check(_non_negative, "must be >= 0"))
    lowlr_children: int = field(default=0, metadata=_check(_non_negative, "must be >= 0"))
    lowlr_factor: float = field(default=0.1, metadata=_check(_positive, "must be > 0"))
    child_checkpoints: str = field(default="schedule", metadata=_check(
        lambda v: v in ("schedule", "final"), "must be 'schedule' (the parent's schedule after the spawn) or 'final'"))


RUN_SELECTIONS = ("all", "parents", "children", "lowlr_children")
CHECKPOINT_SELECTIONS = ("all", "final", "init_final", "spawn")


@dataclass(frozen=True)
class ProbeSelection:
    """Keys every ``[probes.NAME]`` table accepts besides the probe's own params: which runs and
    checkpoints the probe measures. A pair job is kept when all its checkpoints qualify."""

    on_runs: str = field(default="all", metadata=_check(lambda v: v in RUN_SELECTIONS,
                                                        f"must be one of {', '.join(RUN_SELECTIONS)}"))
    on_checkpoints: str = field(default="all", metadata=_check(lambda v: v in CHECKPOINT_SELECTIONS,
                                                               f"must be one of {', '.join(CHECKPOINT_SELECTIONS)}"))
    on_variants: tuple[str, ...] = ()  # empty = every variant


SELECTOR_KEYS = tuple(f.name for f in fields(ProbeSelection))


@dataclass(frozen=True)
class ExperimentSpec:
    name: str = "experiment"
    seeds: tuple[int, ...] = (0,)


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
        return out

    def identity(self) -> str:
        return sha256_json(self.canonical())


def non_default(obj) -> dict[str, Any]:
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            value = non_default(value)
            if value:
                out[f.name] = value
        elif value != f.default:
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def sha256_json(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()


def _json_default(o):
    if isinstance(o, tuple):
        return list(o)
    if dataclasses.is_dataclass(o):
        return non_default(o)
    raise TypeError(f"not serialisable: {o!r}")


# ----------------------------------------------------------------------------------- parsing

def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    if not path.exists():
        raise SpecError(f"{path}: no such spec file")
    return parse_spec(path.read_text(), source=str(path))


def parse_spec(text: str, source: str = "<spec>") -> Spec:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{source}: malformed TOML: {e}") from None
    where = _Locator(text, source)
    _reject_unknown(raw, list(SECTIONS) + ["probes", "variants"], where, ())
    kwargs: dict[str, Any] = {"source": source}
    for section, cls in SECTIONS.items():
        table = raw.get(section, {})
        if not isinstance(table, dict):
            raise SpecError(f"{where.at((), section)}: [{section}] must be a table")
        kwargs[section] = build_dataclass(cls, table, where, (section,))
    kwargs["probes"] = _parse_probes(raw.get("probes", {}), where)
    kwargs["variants"] = _parse_variants(raw.get("variants", {}), kwargs, where)
    spec = Spec(**kwargs)
    _check_cross_fields(spec, where)
    return spec


def build_dataclass(cls, table: dict, where: "_Locator", path: tuple[str, ...], partial: bool = False,
                    extra_valid: tuple[str, ...] = ()):
    """Validate ``table`` against dataclass ``cls``: names, types and per-field checks."""
    known = {f.name: f for f in fields(cls)}
    _reject_unknown(table, list(known) + list(extra_valid), where, path)
    values = {}
    for key, value in table.items():
        f = known[key]
        values[key] = _coerce(value, f, where, path)
        check = f.metadata.get("check")
        if check and not check(values[key]):
            raise SpecError(f"{where.at(path, key)}: {'.'.join(path + (key,))} = {value!r} {f.metadata['message']}")
    return values if partial else cls(**values)


def _coerce(value, f, where, path):
    default = f.default
    name = ".".join(path + (f.name,))
    want = type(default)
    if isinstance(default, tuple):
        if not isinstance(value, list):
            raise SpecError(f"{where.at(path, f.name)}: {name} must be a list, got {value!r}")
        hint = str(f.type)
        item = float if "float" in hint else int if "int" in hint else str
        return tuple(_coerce_scalar(v, item, name, where, path, f.name) for v in value)
    return _coerce_scalar(value, want, name, where, path, f.name)


def _coerce_scalar(value, want, name, where, path, key):
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if want is bool or isinstance(value, bool):
        if not isinstance(value, bool) or want is not bool:
            raise SpecError(f"{where.at(path, key)}: {name} must be {want.__name__}, got {value!r}")
    if not isinstance(value, want):
        raise SpecError(f"{where.at(path, key)}: {name} must be {want.__name__}, got {value!r}")
    if want is float and not math.isfinite(value):
        raise SpecError(f"{where.at(path, key)}: {name} must be finite, got {value!r}")
    return value


def _reject_unknown(table: dict, valid: list[str], where, path):
    for key in table:
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(valid)}"
            label = ".".join(path + (key,))
            raise SpecError(f"{where.at(path, key)}: unknown key '{label}'{hint}")


def _parse_probes(table, where) -> tuple:
    from lsdb.probes import PROBES, probe_params_class

    if not isinstance(table, dict):
        raise SpecError(f"{where.source}: [probes] must be a table of probe names")
    out = []
    for name, params in table.items():
        if name not in PROBES:
            near = difflib.get_close_matches(name, list(PROBES), n=1)
            hint = f"did you mean '{near[0]}'?" if near else f"valid probes: {', '.join(PROBES)}"
            raise SpecError(f"{where.at(('probes',), name)}: unknown probe '{name}'; {hint}")
        if not isinstance(params, dict):
            raise SpecError(f"{where.at(('probes',), name)}: [probes.{name}] must be a table")
        selection = {k: v for k, v in params.items() if k in SELECTOR_KEYS}
        build_dataclass(ProbeSelection, selection, where, ("probes", name))
        rest = {k: v for k, v in params.items() if k not in SELECTOR_KEYS}
        build_dataclass(probe_params_class(name), rest, where, ("probes", name), extra_valid=SELECTOR_KEYS)
        out.append((name, tuple(sorted(params.items(), key=lambda kv: kv[0]))))
    return tuple(out)


def _parse_variants(table, sections, where) -> tuple:
    out = []
    for vname, body in table.items():
        if vname == "base":
            raise SpecError(f"{where.at(('variants',), vname)}: 'base' is reserved for the unmodified configuration")
        _reject_unknown(body, list(VARIANT_SECTIONS), where, ("variants", vname))
        items = []
        for section, overrides in body.items():
            values = build_dataclass(SECTIONS[section], overrides, where, ("variants", vname, section), partial=True)
            items.append((section, tuple(sorted(values.items()))))
        out.append((vname, tuple(items)))
    return tuple(out)


def _check_cross_fields(spec: Spec, where):
    for cfg in spec.run_configs():
        prefix = () if cfg.variant == "base" else ("variants", cfg.variant)
        for t in cfg.spawn.times:
            if t < 0 or t >= cfg.optim.epochs:
                raise SpecError(
                    f"{where.at(prefix + ('spawn',), 'times')}: spawn time {t} must be in [0, epochs = {cfg.optim.epochs})"
                )
        for t in cfg.optim.lr_drops:
            if t <= 0 or t >= cfg.optim.epochs:
                raise SpecError(f"{where.at(prefix + ('optim',), 'lr_drops')}: lr drop at {t} must be in (0, epochs)")
        if cfg.model.name == "cnn1d" and len(cfg.model.kernels) != cfg.model.depth:
            raise SpecError(
                f"{where.at(prefix + ('model',), 'kernels')}: model.kernels has {len(cfg.model.kernels)} entries "
                f"but model.depth = {cfg.model.depth}; give one kernel size per conv layer"
            )
    if not spec.experiment.seeds:
        raise SpecError(f"{where.at(('experiment',), 'seeds')}: experiment.seeds must list at least one seed")


class _Locator:
    """Finds the line of ``key`` inside table ``path`` of the TOML text, for error messages."""

    def __init__(self, text: str, source: str):
        self.lines = text.splitlines()
        self.source = source

    def at(self, path: tuple[str, ...], key: str) -> str:
        table: tuple[str, ...] = ()
        header = re.compile(r"^\s*\[+\s*([^\]]+?)\s*\]+")
        assign = re.compile(r"^\s*(" + re.escape(key) + r'|"' + re.escape(key) + r'")\s*=')
        for number, line in enumerate(self.lines, 1):
            m = header.match(line)
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
