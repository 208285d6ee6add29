"""A store is a directory: ``lsdb.duckdb``, ``checkpoints/``, ``spool/``, ``artifacts/``, ``exports/``.

DuckDB lets one process open a file read-write, and while it does no other process can open it
at all. So the database is opened read-write only for short transactions (ingest, recording a
run), read commands retry briefly, and long work (``lsdb run``) holds ``lsdb.lock`` so that a
second ``lsdb run`` on the same store fails at once with the holder's PID.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from pathlib import Path

from lsdb.artifacts import Artifacts
from lsdb.errors import StoreError, StoreLocked
from lsdb.ids import utcnow

DB_NAME = "lsdb.duckdb"
SUBDIRS = ("checkpoints", "spool", "spool/ingested", "artifacts", "exports")
DEFAULT_STORE = "lsdb-store"


def resolve_store_path(store: str | os.PathLike | None) -> Path:
    """``--store DIR``, else ``$LSDB_STORE``, else ``./lsdb-store``."""
    return Path(store or os.environ.get("LSDB_STORE") or DEFAULT_STORE)


class Store:
    """Owns a store's paths. Pass it explicitly; never keep one in a global."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.db_path = self.root / DB_NAME
        self.checkpoints = self.root / "checkpoints"
        self.spool = self.root / "spool"
        self.ingested = self.spool / "ingested"
        self.artifacts_dir = self.root / "artifacts"
        self.exports = self.root / "exports"
        self.lock_path = self.root / "lsdb.lock"

    # -------------------------------------------------------------------------- lifecycle
    @classmethod
    def init(cls, root=None) -> "Store":
        """Create (or upgrade) a store; idempotent."""
        return cls(resolve_store_path(root)).create()

    def create(self) -> "Store":
        """Create this store's folders and database, or check and upgrade an existing one."""
        for sub in ("",) + SUBDIRS:
            self._make_dir(self.root / sub)
        self.migrate()
        return self

    def _make_dir(self, path: Path) -> None:
        if path.exists() and not path.is_dir():
            raise StoreError(f"store path {path} is a file, not a directory; choose another --store")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create store folder {path}: {e.strerror}") from None

    @classmethod
    def open(cls, root=None) -> "Store":
        store = cls(resolve_store_path(root))
        if not store.db_path.exists():
            raise StoreError(f"no store at {store.root} (no {DB_NAME}); create one with: lsdb init --store {store.root}")
        store.check_version()
        return store

    def migrate(self) -> None:
        """Create missing tables, apply ordered upgrades, (re)create views."""
        import sqlalchemy as sa

        from lsdb._version import __version__
        from lsdb.schema import MIN_SCHEMA_VERSION, SCHEMA_VERSION, UPGRADES, Base, SchemaVersion, views_sql

        with self.write() as conn:
            current = self._stored_version(conn)
            if current is not None and current > SCHEMA_VERSION:
                raise StoreError(self._newer_message(current))
            if current is not None and current < MIN_SCHEMA_VERSION:
                raise StoreError(self._older_message(current))
            Base.metadata.create_all(conn)
            start = current if current is not None else SCHEMA_VERSION
            for v in range(start + 1, SCHEMA_VERSION + 1):
                for statement in UPGRADES.get(v, []):
                    conn.execute(sa.text(statement))
            if current != SCHEMA_VERSION:
                conn.execute(sa.insert(SchemaVersion).values(version=SCHEMA_VERSION, applied_at=utcnow(),
                                                              lsdb_version=__version__))
            for statement in views_sql():
                conn.execute(sa.text(statement))

    def check_version(self) -> None:
        from lsdb.schema import MIN_SCHEMA_VERSION, SCHEMA_VERSION

        with self.read() as con:
            rows = con.execute("SELECT max(version) FROM schema_version").fetchall()
        stored = rows[0][0] if rows else None
        if stored is not None and stored > SCHEMA_VERSION:
            raise StoreError(self._newer_message(stored))
        if stored is not None and stored < MIN_SCHEMA_VERSION:
            raise StoreError(self._older_message(stored))
        if stored is None or stored < SCHEMA_VERSION:
            self.migrate()

    def _stored_version(self, conn):
        import sqlalchemy as sa

        if not sa.inspect(conn).has_table("schema_version"):
            return None
        return conn.execute(sa.text("SELECT max(version) FROM schema_version")).scalar()

    def _older_message(self, stored: int) -> str:
        return (f"store {self.root} has schema {stored}, from lsdb 0.1, whose run ids hashed the checkpoint "
                f"schedule; this lsdb cannot reuse its runs: start a new store (--store NEW) and rerun the spec, "
                f"or open this one with lsdb 0.1")

    def _newer_message(self, stored: int) -> str:
        from lsdb.schema import SCHEMA_VERSION

        return (f"store {self.root} was written by a newer lsdb (schema {stored} > {SCHEMA_VERSION}); "
                f"upgrade lsdb (pip install -U lsdb) to open it")

    # ------------------------------------------------------------------------ connections
    @contextlib.contextmanager
    def write(self, timeout: float = 30.0):
        """A short read-write transaction (SQLAlchemy Connection); commits on success."""
        import sqlalchemy as sa

        engine = _retry(lambda: _connected(sa.create_engine(f"duckdb:///{self.db_path}")), self, timeout)
        try:
            with engine.begin() as conn:
                yield conn
        finally:
            engine.dispose()

    @contextlib.contextmanager
    def read(self, timeout: float = 10.0, *, untrusted: bool = False, allow_files: bool = False):
        """A read-only DuckDB connection; retries while a writer holds the file.

        ``untrusted=True`` is for SQL a user typed (``lsdb sql``, ``Session.sql``): the connection
        cannot reach files, the network or Python objects (``enable_external_access``), load or
        install extensions, or change any setting (``lock_configuration``). ``allow_files=True``
        lets it read local files again; refusing writes is then the statement guard's job
        (``lsdb.query.session.check_read_only``). The planner, runner and checks keep the default.
        DuckDB shares one database per file within a process, so an untrusted connection cannot
        be opened while a default one to the same store is open, nor the other way round."""
        import duckdb

        if not self.db_path.exists():
            raise StoreError(f"no store at {self.root}; create one with: lsdb init --store {self.root}")
        config = {}
        if untrusted:
            config = {
                "enable_external_access": bool(allow_files),
                "autoinstall_known_extensions": False,
                "autoload_known_extensions": False,
                "allow_community_extensions": False,
                "allow_unsigned_extensions": False,
                "allow_persistent_secrets": False,
                "python_enable_replacements": False,
                "lock_configuration": True,
            }
        con = _retry(lambda: duckdb.connect(str(self.db_path), read_only=True, config=config), self, timeout)
        try:
            yield con
        finally:
            con.close()

    # ---------------------------------------------------------------------------- locking
    @contextlib.contextmanager
    def lock(self, what: str = "lsdb run"):
        """Exclusive lock for long work on the store (training, probing)."""
        self._make_dir(self.root)
        try:
            fh = open(self.lock_path, "a+")
        except OSError as e:
            raise StoreError(f"cannot open the store's lock file {self.lock_path}: {e.strerror}") from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise StoreLocked(f"store {self.root} is busy: {holder}; wait for it to finish or stop it") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"'{what}' (pid {os.getpid()}) since {utcnow():%Y-%m-%d %H:%M:%S} UTC")
        fh.flush()
        try:
            yield self
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()

    # ------------------------------------------------------------------------------ paths
    def checkpoint_path(self, sha: str) -> Path:
        return self.checkpoints / f"{sha}.safetensors"

    def artifacts(self) -> Artifacts:
        return Artifacts(self.artifacts_dir)


def _connected(engine):
    # create_engine is lazy: connect now so that a lock conflict surfaces inside the retry loop
    with engine.connect():
        pass
    return engine


_LOCK_HINT = re.compile(r"(Could not set lock|Conflicting lock|lock on file)", re.I)
_PID = re.compile(r"PID (\d+)")
_DAMAGED = re.compile(r"(not a valid DuckDB database|corrupt|checksum)", re.I)


def _retry(connect, store: Store, timeout: float):
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        try:
            return connect()
        except Exception as e:  # duckdb.IOException, or wrapped by SQLAlchemy
            text = str(e)
            if not _LOCK_HINT.search(text):
                first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
                hint = (f"rebuild it from the log: lsdb rebuild --store {store.root}" if _DAMAGED.search(text)
                        else "close other connections to it in this process and retry")
                raise StoreError(f"store {store.root}: cannot open {store.db_path.name} ({first}); {hint}") from None
            if time.monotonic() >= deadline:
                pid = _PID.search(text)
                who = f"process {pid.group(1)}" if pid else "another process"
                raise StoreLocked(
                    f"store {store.root} is held by {who} (DuckDB allows one writer and no readers beside it); "
                    f"retry when it finishes"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
