"""Timeouts in tests catch hangs, not slowness: a loaded CI machine may run many times slower than
a laptop, so every subprocess timeout is generous and scaled by ``LSDB_TEST_TIMEOUT_SCALE``."""

from __future__ import annotations

import os

DEFAULT_SCALE = 3.0


def hang_timeout(seconds: float) -> float:
    """``seconds`` (what a hang means on an idle machine) times ``LSDB_TEST_TIMEOUT_SCALE`` (default 3)."""
    raw = os.environ.get("LSDB_TEST_TIMEOUT_SCALE", "")
    try:
        scale = float(raw) if raw else DEFAULT_SCALE
    except ValueError:
        raise ValueError(f"LSDB_TEST_TIMEOUT_SCALE={raw!r} is not a number; unset it or give e.g. 5") from None
    if scale <= 0:
        raise ValueError(f"LSDB_TEST_TIMEOUT_SCALE={raw!r} must be positive")
    return seconds * scale
