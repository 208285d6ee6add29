"""Typed errors. Each message names the thing at fault and what to do next.

The CLI maps every ``LsdbError`` to one line on stderr and exit code 1.
"""


class LsdbError(Exception):
    """Base class for errors that are the user's input, not a bug in lsdb."""


class SpecError(LsdbError):
    """A malformed or invalid experiment spec."""


class StoreError(LsdbError):
    """A store that is missing, unreadable or from an incompatible version."""


class StoreLocked(StoreError):
    """Another process holds the store."""


class CheckpointCorrupt(LsdbError):
    """A checkpoint file whose content does not match its recorded hash."""


class ArtifactCorrupt(LsdbError):
    """An artifact file that is missing or whose content does not match its hash."""


class ProbeError(LsdbError):
    """A probe that cannot run on the input it was given."""


class ProbeSkipped(Exception):
    """Raised by a probe when its input makes the measurement meaningless (e.g. non-finite loss).

    The job is stored as ``skipped`` with this reason instead of failing.
    """


class WorkerDied(LsdbError):
    """A worker process vanished mid-task (killed, out of memory)."""


class QueryError(LsdbError):
    """A query the store cannot answer (unknown metric, write attempt, bad SQL)."""
