"""The registry's SQLite database: schema, write transactions and the revision counter.

WAL mode lets readers run beside one writer; every write is a ``BEGIN IMMEDIATE``
transaction, so read-modify-write sequences (next version number, alias moves) of several
processes serialize instead of losing updates. Each write transaction that changes anything
bumps the revision, the change feed that servers poll. `SqliteDatabase` implements the
storage seam (registry/storage/backend.py); postgres.py is the other backend.
"""

from __future__ import annotations

import fcntl
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from registry.errors import RegistryBusy
from registry.storage.backend import (
    BUSY_TIMEOUT_ENV,
    DEFAULT_BUSY_TIMEOUT_S,
    SCHEMA_VERSION,
    Database,
    Transaction,
    default_busy_timeout_s,
)

__all__ = ["DEFAULT_BUSY_TIMEOUT_S", "SQLITE_BUSY_CODES", "SqliteDatabase"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS registry (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    schema_version INTEGER NOT NULL,
    revision INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    max_rank INTEGER NOT NULL,
    base_fingerprint TEXT NOT NULL,
    base TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    adapter TEXT NOT NULL,
    version INTEGER NOT NULL,
    digest TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('active', 'archived')),
    created_at TEXT NOT NULL,
    actor TEXT NOT NULL,
    rank INTEGER NOT NULL,
    alpha REAL NOT NULL,
    size_bytes INTEGER NOT NULL,
    base_fingerprint TEXT NOT NULL,
    target_modules TEXT NOT NULL,
    features TEXT NOT NULL,
    unservable TEXT NOT NULL,
    metadata TEXT NOT NULL,
    archived_at TEXT,
    purged INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (adapter, version),
    UNIQUE (adapter, digest)
);
CREATE TABLE IF NOT EXISTS aliases (
    adapter TEXT NOT NULL,
    alias TEXT NOT NULL,
    version INTEGER NOT NULL,
    weight REAL,
    updated_at TEXT NOT NULL,
    revision INTEGER NOT NULL,
    PRIMARY KEY (adapter, alias),
    FOREIGN KEY (adapter, version) REFERENCES versions (adapter, version)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    revision INTEGER NOT NULL,
    at TEXT NOT NULL,
    actor TEXT NOT NULL,
    reason TEXT NOT NULL,
    action TEXT NOT NULL,
    adapter TEXT,
    version INTEGER,
    alias TEXT,
    previous INTEGER,
    weight REAL,
    -- for alias events: the event whose holder a rollback returns to
    below INTEGER REFERENCES events (id)
);
CREATE INDEX IF NOT EXISTS events_by_alias ON events (adapter, alias, id);
-- the dashboard's reads by kind: each adapter's last alias move, the canary verdicts
CREATE INDEX IF NOT EXISTS events_by_action ON events (action, adapter, id);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    response_id TEXT NOT NULL,
    adapter TEXT,
    version INTEGER,
    score REAL NOT NULL,
    correction TEXT,
    prompt TEXT,
    output TEXT
);
CREATE INDEX IF NOT EXISTS feedback_by_version ON feedback (adapter, version, id);
-- Per-adapter settings of the loop (registry/storage/settings.py), one JSON document each.
CREATE TABLE IF NOT EXISTS settings (
    adapter TEXT PRIMARY KEY,
    settings TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
-- Retraining jobs (registry/storage/jobs.py): queued -> running -> succeeded | failed.
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    adapter TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed')),
    trigger TEXT NOT NULL,
    created_at TEXT NOT NULL,
    actor TEXT NOT NULL,
    reason TEXT NOT NULL,
    details TEXT NOT NULL,
    started_at TEXT,
    heartbeat_at TEXT,
    finished_at TEXT,
    worker TEXT,
    parent_version INTEGER,
    version INTEGER,
    result TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, id);
CREATE INDEX IF NOT EXISTS jobs_by_adapter ON jobs (adapter, id);
-- Retraining schedules: one per adapter, every N seconds or a cron expression.
CREATE TABLE IF NOT EXISTS schedules (
    adapter TEXT PRIMARY KEY,
    every_s REAL,
    cron TEXT,
    next_at TEXT NOT NULL,
    created_at TEXT NOT NULL,
    actor TEXT NOT NULL
);
-- Alerts received from Alertmanager, one row per firing episode (fingerprint, startsAt).
CREATE TABLE IF NOT EXISTS alerts (
    fingerprint TEXT NOT NULL,
    starts_at TEXT NOT NULL,
    received_at TEXT NOT NULL,
    alertname TEXT NOT NULL,
    adapter TEXT,
    labels TEXT NOT NULL,
    outcome TEXT NOT NULL,
    job_id INTEGER REFERENCES jobs (id),
    PRIMARY KEY (fingerprint, starts_at)
);
"""
# Columns added after schema version 1: (table, column, definition).
MIGRATIONS = (
    ("events", "job", "INTEGER"),
    ("feedback", "review", "TEXT NOT NULL DEFAULT 'pending'"),
)

SQLITE_BUSY_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})


class SqliteTransaction(Transaction):
    """An open write transaction; `revision` bumps the counter once, on first use."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._revision: int | None = None

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, tuple(params))

    @property
    def revision(self) -> int:
        if self._revision is None:
            row = self.conn.execute(
                "UPDATE registry SET revision = revision + 1 WHERE id = 1 RETURNING revision"
            ).fetchone()
            assert row is not None, "registry row missing"
            self._revision = int(row[0])
        return self._revision


class SqliteDatabase(Database):
    """One SQLite connection, shared by the threads of a process under a lock."""

    def __init__(self, path: Path, busy_timeout_s: float | None = None) -> None:
        """`busy_timeout_s`: how long a statement waits for another process's lock before
        RegistryBusy (default $LORAFLEET_BUSY_TIMEOUT_S, else 30)."""
        self.path = path
        self.location = str(path)
        self.dialect = "sqlite"
        self.busy_timeout_s = default_busy_timeout_s() if busy_timeout_s is None else busy_timeout_s
        self._lock = threading.RLock()
        self._reader: sqlite3.Connection | None = None  # reads while another thread writes
        self._reader_lock = threading.Lock()
        self._conn = self._connect()
        with self._busy_errors("open"):
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.executescript(SCHEMA)
        self._migrate()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        conn.row_factory = sqlite3.Row
        return conn

    def close(self) -> None:
        with self._lock, self._reader_lock:
            self._conn.close()
            if self._reader is not None:
                self._reader.close()

    def _columns(self, table: str) -> set[str]:
        return {str(r["name"]) for r in self._conn.execute(f"PRAGMA table_info({table})")}

    def _migrate(self) -> None:
        """Bring a registry of an older schema version up to date (idempotent, and safe
        when several processes open it at once: each re-checks inside its transaction)."""
        if all(column in self._columns(table) for table, column, _ in MIGRATIONS):
            return
        with self.write("schema migration") as txn:
            for table, column, definition in MIGRATIONS:
                if column not in self._columns(table):
                    txn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
            txn.execute("UPDATE registry SET schema_version = ? WHERE id = 1", (SCHEMA_VERSION,))

    @contextmanager
    def _busy_errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as err:
            if getattr(err, "sqlite_errorcode", None) in SQLITE_BUSY_CODES:
                raise RegistryBusy(
                    f"registry database {self.path} stayed locked by another process for more "
                    f"than {self.busy_timeout_s:g} s during {what}; nothing was written. Retry, "
                    f"find the process holding it (fuser {self.path}), or wait longer with "
                    f"{BUSY_TIMEOUT_ENV}=SECONDS"
                ) from err
            raise

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """The connection for a read: the main one when it is free (or held by this thread's
        transaction); else a second one beside it. Another thread may hold the main one for
        a write waiting out another process's lock, and in WAL mode a writer never blocks
        readers, so the server's poller, first loads of versions and the dashboard do not
        wait for that write."""
        if self._lock.acquire(blocking=False):
            try:
                yield self._conn
            finally:
                self._lock.release()
            return
        with self._reader_lock:
            if self._reader is None:
                self._reader = self._connect()
            yield self._reader

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """Run a read-only statement and return all rows."""
        with self._reading() as conn, self._busy_errors("a read"):
            return conn.execute(sql, tuple(params)).fetchall()

    @contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """Several reads that see one consistent state (a deferred read transaction)."""
        with self._reading() as conn:
            with self._busy_errors("a read"):
                conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    @contextmanager
    def write(self, what: str = "a write", *, locked: bool = True) -> Iterator[SqliteTransaction]:
        """A ``BEGIN IMMEDIATE`` transaction: committed on success, rolled back on error."""
        with self._lock:
            with self._busy_errors(what):
                self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield SqliteTransaction(self._conn)
                with self._busy_errors(what):
                    self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    @contextmanager
    def artifacts_lock(self, exclusive: bool) -> Iterator[None]:
        """A file lock beside the database: every process that opens this file runs on
        this host."""
        with (self.path.parent / "artifacts.lock").open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def wait_for_change(self, timeout_s: float) -> bool:
        """SQLite has no notices: readers poll the revision."""
        time.sleep(timeout_s)
        return False

    def integrity_problems(self) -> list[str]:
        """SQLite's own integrity check; an empty list when the file is sound."""
        rows = self.query("PRAGMA integrity_check")
        problems = [str(r[0]) for r in rows if str(r[0]) != "ok"]
        problems += [
            f"foreign key violation in {r[0]}" for r in self.query("PRAGMA foreign_key_check")
        ]
        return problems
