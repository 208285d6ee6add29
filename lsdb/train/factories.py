"""The researcher's own models and data: ``package.module:function`` named in a spec.

The module must be importable wherever lsdb runs (the coordinator and every worker). Folders in
``$LSDB_PATH`` (``os.pathsep``-separated; ``lsdb run --path DIR`` adds to it, and worker
processes inherit it) are put on ``sys.path`` first. Factory strings come only from the user's
spec or manifest, never from a store: nothing stored is executed as code.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable

from lsdb.errors import SpecError

PATH_VAR = "LSDB_PATH"


def add_import_path(*folders: str) -> None:
    """Make modules in ``folders`` importable here and in worker processes started from here."""
    current = [p for p in os.environ.get(PATH_VAR, "").split(os.pathsep) if p]
    for folder in reversed([os.path.abspath(f) for f in folders]):
        if folder not in current:
            current.insert(0, folder)
    os.environ[PATH_VAR] = os.pathsep.join(current)


def resolve(factory: str, what: str) -> Callable:
    """The function ``factory`` names; ``SpecError`` naming it when it cannot be imported."""
    for folder in reversed([p for p in os.environ.get(PATH_VAR, "").split(os.pathsep) if p]):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    module_name, _, attr = factory.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or the module's own code failing
        raise SpecError(f"{what} factory {factory}: cannot import {module_name} ({type(e).__name__}: {_first(e)}); "
                        f"put its folder on the path: lsdb run --path DIR, or ${PATH_VAR}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise SpecError(f"{what} factory {factory}: module {module_name} has no function {attr}")
    return fn


def call(factory: str, what: str, *args, **kwargs):
    """Call the factory; its own failure becomes one line naming it."""
    fn = resolve(factory, what)
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        raise SpecError(f"{what} factory {factory} failed: {type(e).__name__}: {_first(e)}") from None


def _first(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no message"
