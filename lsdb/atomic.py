"""Files written atomically: under a temporary name in the same folder, fsynced, then renamed.

A temporary's name says who writes it (``.<final name>.tmp@<host>@<pid>``), so that cleaning up
after a killed writer (``lsdb.spool.clean_temporaries``) never removes a file that a live
process, here or on another machine sharing the store, is still writing.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

TEMP_MAX_AGE_S = 6 * 3600  # a temporary this old is abandoned whoever wrote it


def temp_path(final: Path) -> Path:
    final = Path(final)
    return final.with_name(f".{final.name}.tmp@{socket.gethostname()}@{os.getpid()}")


def is_temp(path: Path) -> bool:
    return Path(path).name.startswith(".") and ".tmp@" in Path(path).name


def abandoned(path: Path) -> bool:
    """A temporary whose writer is dead (same host, PID gone) or that is older than
    ``TEMP_MAX_AGE_S`` (a writer on another host we cannot ask)."""
    try:
        age = time.time() - Path(path).stat().st_mtime
    except FileNotFoundError:
        return False
    if age > TEMP_MAX_AGE_S:
        return True
    _, host, pid = Path(path).name.rsplit("@", 2)
    return host == socket.gethostname() and pid.isdigit() and not _alive(int(pid))


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
