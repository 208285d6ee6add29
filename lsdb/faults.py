"""Fault injection for the reliability suite (tests/test_faults.py, docs/reliability.md).

``LSDB_KILL_AT="POINT:N"`` makes the process that reaches the named point for the N-th time kill
itself with SIGKILL, as a power cut or the out-of-memory killer would: no cleanup, no ``finally``.
Unset (always, outside the tests) a point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_TARGET: tuple[str, int] | None = None
_SEEN: dict[str, int] = {}


def _target() -> tuple[str, int] | None:
    spec = os.environ.get("LSDB_KILL_AT", "")
    if not spec:
        return None
    name, _, n = spec.rpartition(":")
    return (name, int(n)) if name and n.isdigit() else None


_TARGET = _target()


def point(name: str) -> None:
    """A place where a crash must lose nothing: killed here, a rerun must end as if never killed."""
    if _TARGET is None or _TARGET[0] != name:
        return
    _SEEN[name] = _SEEN.get(name, 0) + 1
    if _SEEN[name] == _TARGET[1]:
        os.kill(os.getpid(), signal.SIGKILL)
