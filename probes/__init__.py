"""Probe registry: a plain dict from probe name to the module that implements it.

Modules are imported on first use so that ``lsdb --help`` never imports torch. ``PARAMS`` is the
same registry seen as name → ``Params`` dataclass, for validating a spec's ``[probes.NAME]`` tables.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from types import ModuleType

from lsdb.errors import ProbeError

PROBES: dict[str, str] = {
    "eval": "lsdb.probes.eval",
    "weights": "lsdb.probes.weights",
    "ntk": "lsdb.probes.ntk",
    "ntk_distance": "lsdb.probes.ntk_distance",
    "kernel_accuracy": "lsdb.probes.kernel_accuracy",
    "barrier": "lsdb.probes.barrier",
    "hessian": "lsdb.probes.hessian",
    "flatness": "lsdb.probes.flatness",
    "slice": "lsdb.probes.slice",
    "merge": "lsdb.probes.merge",
    "soup": "lsdb.probes.soup",
    "task_arithmetic": "lsdb.probes.task_arithmetic",
}


def probe_module(name: str) -> ModuleType:
    if name not in PROBES:
        raise ProbeError(f"unknown probe '{name}'; valid probes: {', '.join(PROBES)}")
    return importlib.import_module(PROBES[name])


class _Params(Mapping):
    """Probe name → its ``Params`` dataclass, importing the module only when asked."""

    def __getitem__(self, name: str) -> type:
        if name not in PROBES:
            raise KeyError(name)
        return probe_module(name).Params

    def __iter__(self) -> Iterator[str]:
        return iter(PROBES)

    def __len__(self) -> int:
        return len(PROBES)


PARAMS: Mapping[str, type] = _Params()


def tables_of(name: str) -> tuple[str, ...]:
    """The result tables probe ``name`` may write (its ``TABLES``); ingest accepts no others."""
    return tuple(probe_module(name).TABLES)
