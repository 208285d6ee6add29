"""Probe registry: a plain dict from probe name to the module that implements it.

Modules are imported on first use so that ``lsdb --help`` never imports torch.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from lsdb.errors import SpecError

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
}


def probe_module(name: str) -> ModuleType:
    if name not in PROBES:
        raise SpecError(f"unknown probe '{name}'; valid probes: {', '.join(PROBES)}")
    return importlib.import_module(PROBES[name])


def probe_params_class(name: str):
    return probe_module(name).Params
